"""Run by tests/test_tensor_parallel.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must be
set before jax starts): greedy tokens at tensor parallel 1, 2 and 4 (and 2 data-parallel replicas of
TP 2), and the shardings of the params and the KV pool. Prints one JSON line per engine.

usage: python tests/tensor_parallel_checks.py MODEL_DIR:BACKEND ...
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402
from jpaged.models import llama  # noqa: E402
from jpaged.models.config import ModelConfig  # noqa: E402
from jpaged.models.llama import LlamaForCausalLM  # noqa: E402
from jpaged.models.quantization import PackedWeight, QuantizedWeight  # noqa: E402

PROMPTS = [[1, 5, 9, 200, 17, 4000, 31, 8, 77, 12, 5, 6, 99, 100, 101, 7, 3000, 45], [1, 42, 43], [1, 7] * 12]


def spec(array) -> list:
    return [None if axis is None else str(axis) for axis in array.sharding.spec]


def specs(weight):
    """A param's mesh axes; a quantized weight's per array: {"data": [...], "scale": [...]}; a
    packed one's (one device only) are its panels'."""
    if isinstance(weight, QuantizedWeight):
        return {name: spec(getattr(weight, name)) for name in ("data", "scale")}
    return spec(weight.panels if isinstance(weight, PackedWeight) else weight)


def sharp_params(model_dir: str):
    """The model's dummy weights scaled up, so greedy picks are far from ties and vary by context."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = ModelConfig.from_hf_config(json.load(f), dtype="float32")
    params = llama.init_params(config, jax.random.key(0))
    scale = lambda path, x: x if str(path[-1]).endswith("norm')") else x * 4  # noqa: E731
    return LlamaForCausalLM(config), jax.tree.map_with_path(scale, params)


def run_data_parallel(model_dir: str, backend: str) -> dict:
    """2 replicas of TP 2 on devices 0-1 and 2-3, on the model's dummy weights (a data-parallel
    engine loads its own weights)."""
    llm = LLM(model_dir, load_format="dummy", data_parallel_size=2, tensor_parallel_size=2, attention_backend=backend,
              max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=24,
              enforce_eager=True, compilation_cache_dir="")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return {"model": model_dir, "backend": backend, "dp": 2, "tp": 2,
            "tokens": [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)],
            "devices": [[d.id for d in r.engine.runner.mesh.devices.flat] for r in llm.data_parallel.replicas]}


def run(model_dir: str, backend: str, tp: int, dummy: bool = False, num_blocks: int = 24,
        swap_space: float = 0.0, kv_cache_dtype: str = "auto", quantization: str | None = None) -> dict:
    """One engine at TP tp on the sharpened weights (dummy: the plain dummy weights, as loaded).
    With few blocks and swap space, requests are preempted by swapping their blocks out and in."""
    model, params = sharp_params(model_dir) if not (dummy or quantization) else (None, None)
    llm = LLM(model_dir, load_format="dummy", flax_model=model, params=params, tensor_parallel_size=tp,
              attention_backend=backend,
              max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=num_blocks,
              swap_space=swap_space, kv_cache_dtype=kv_cache_dtype, quantization=quantization, enforce_eager=True,
              compilation_cache_dir="")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]
    runner = llm.llm_engine.runner
    layer = runner.params["layers"][0]
    shardings = {name: specs(layer[name]) for name in sorted(layer)}
    shardings.update({name: specs(runner.params[name]) for name in ("embed", "final_norm", "lm_head")
                      if name in runner.params})
    k_pages = runner.kv_cache[0][0]
    return {"model": model_dir, "backend": backend, "tp": tp, "tokens": tokens, "shardings": shardings,
            "preemptions": llm.llm_engine.scheduler.num_preemptions,
            "kv_scale": None if runner.kv_scales is None else spec(runner.kv_scales[0][0]),
            "kv_pool": spec(k_pages), "kv_shard_shape": list(k_pages.addressable_shards[0].data.shape),
            "devices": sorted(d.id for d in k_pages.sharding.device_set)}


def main():
    assert jax.device_count() == 8, jax.devices()
    for item in sys.argv[1:]:
        model_dir, backend = item.rsplit(":", 1)
        for tp in (1, 2, 4):
            print(json.dumps(run(model_dir, backend, tp)), flush=True)
    model_dir, backend = sys.argv[1].rsplit(":", 1)
    print(json.dumps(dict(run(model_dir, backend, 1, dummy=True), dp=1)), flush=True)
    print(json.dumps(run_data_parallel(model_dir, backend)), flush=True)
    print(json.dumps(dict(run(model_dir, backend, 2, num_blocks=5, swap_space=0.01), dp="swap")), flush=True)
    for tp in (1, 2):
        print(json.dumps(dict(run(model_dir, backend, tp, kv_cache_dtype="int8"), dp="int8")), flush=True)
        print(json.dumps(dict(run(model_dir, backend, tp, quantization="int8"), dp="int8-weights")), flush=True)


if __name__ == "__main__":
    main()
