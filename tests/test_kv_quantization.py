"""--kv-cache-dtype int8 / fp8 / fp8_e5m2: flags, pool dtypes and bytes, scales, the engine vs fp32 KV."""

import dataclasses
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jpaged import LLM, EngineArgs, SamplingParams, kv_pool, kv_quantization
from jpaged.loaders import load_model
from jpaged.models import llama
from test_engine import ENGINE_KWARGS, assert_pool_free, mixed_prompts, sharpened

QUANTIZED = ["int8", "fp8", "fp8_e5m2"]
PAGE_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
SMOLLM2 = types.SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)  # what pool sizing reads


@pytest.mark.parametrize("name", ["auto", "float32", "bfloat16", "int8", "fp8", "fp8_e4m3", "fp8_e5m2"])
def test_kv_cache_dtype_names(name):
    EngineArgs(kv_cache_dtype=name)
    want = {"auto": "float32", "float32": "float32", "bfloat16": "bfloat16"}.get(name) or jnp.dtype(PAGE_DTYPES[name]).name
    assert kv_quantization.page_dtype(name, "float32") == want


def test_unknown_kv_cache_dtype_fails_with_the_choices():
    with pytest.raises(ValueError, match="fp8_e4m3x.*'int8', 'fp8', 'fp8_e4m3', 'fp8_e5m2'"):
        EngineArgs(kv_cache_dtype="fp8_e4m3x")


@pytest.mark.parametrize("dtype,ratio", [("int8", 4), ("float8_e4m3fn", 4), ("float8_e5m2", 4), ("bfloat16", 2)])
def test_same_memory_gives_proportionally_more_blocks(dtype, ratio):
    """SmolLM2's block (16 tokens, 30 layers, 3 KV heads of 64) is 737,280 bytes in fp32."""
    assert kv_pool.bytes_per_block(SMOLLM2, 16, "float32") == 737_280
    assert kv_pool.bytes_per_block(SMOLLM2, 16, dtype) * ratio == 737_280
    args = EngineArgs(kv_cache_memory=0.5, max_num_seqs=256)  # 0.5 GiB, never capped by max_num_seqs
    cpu = jax.devices("cpu")[0]
    assert kv_pool.size_pool(SMOLLM2, args, 2048, "float32", cpu).num_blocks == 728  # 2^29 // 737,280
    assert kv_pool.size_pool(SMOLLM2, args, 2048, dtype, cpu).num_blocks == (1 << 29) // (737_280 // ratio)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "float8_e5m2"])
def test_allocated_pool_dtype_and_bytes(dtype):
    spec = kv_pool.KVPoolSpec(num_blocks=5, block_size=16, num_layers=2, num_kv_heads=3, head_dim=64, dtype=dtype)
    pool = kv_pool.allocate(spec, jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))
    assert len(pool) == 2
    for k, v in pool:
        assert k.dtype == v.dtype == jnp.dtype(dtype) and k.shape == (5, 3, 16, 64)
        assert k.nbytes == 5 * 3 * 16 * 64  # one byte per element


def quantized_llm(tiny_model_dir, tiny_params, kv_cache_dtype, **kwargs):
    llm = LLM(str(tiny_model_dir), kv_cache_dtype=kv_cache_dtype, **{**ENGINE_KWARGS, **kwargs})
    llm.update_weights(tiny_params)  # recalibrates the scales for these weights
    return llm


@pytest.fixture(scope="module")
def tiny_params(tiny_model_dir):
    return sharpened(load_model(str(tiny_model_dir)).params, 3.0)


@pytest.fixture(scope="module")
def fp32_logprobs(tiny_model_dir, tiny_params):
    """backend -> prompt_logprobs of PROMPTS from an fp32-KV engine (computed once per backend)."""
    cache = {}

    def get(backend):
        if backend not in cache:
            llm = quantized_llm(tiny_model_dir, tiny_params, "float32", attention_backend=backend, enforce_eager=True)
            cache[backend] = prompt_logprobs(llm, PROMPTS)
        return cache[backend]

    return get


def prompt_logprobs(llm, prompts):
    """Each prompt's log-probability of its own tokens 1.. (chunked prefill over the KV cache)."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return np.concatenate([[entry[t].logprob for entry, t in zip(o.prompt_logprobs[1:], p[1:])]
                           for o, p in zip(outputs, prompts)])


PROMPTS = mixed_prompts()[2:5]  # 33-70 tokens: chunks of 32 read the earlier chunks' quantized KV
# Largest |log p| difference from the fp32 KV engine over the prompts' 150 tokens, about 3x what
# was measured on both backends (int8 0.011, fp8 e4m3 0.059, e5m2 0.084; the log-probs span 2.5).
LOGPROB_TOLERANCE = {"int8": 0.03, "fp8": 0.15, "fp8_e5m2": 0.25}


@pytest.mark.parametrize("kv_cache_dtype,backend", [("int8", "reference"), ("int8", "cpu"), ("fp8", "cpu"),
                                                    ("fp8_e5m2", "cpu")])
def test_engine_logprobs_close_to_fp32_kv(tiny_model_dir, tiny_params, fp32_logprobs, kv_cache_dtype, backend):
    want = fp32_logprobs(backend)
    llm = quantized_llm(tiny_model_dir, tiny_params, kv_cache_dtype, attention_backend=backend, enforce_eager=True)
    k_pages, v_pages = llm.llm_engine.runner.kv_cache[0]
    assert k_pages.dtype == v_pages.dtype == jnp.dtype(PAGE_DTYPES[kv_cache_dtype])
    got = prompt_logprobs(llm, PROMPTS)
    error = np.abs(got - want).max()
    assert 0 < error < LOGPROB_TOLERANCE[kv_cache_dtype], error
    assert np.ptp(want) > 2  # the sharpened model's log-probs vary, so the comparison means something
    assert_pool_free(llm)


def test_preemption_by_swap_with_int8_pages(tiny_model_dir, tiny_params):
    """Swapped blocks come back byte for byte (the scales never change): greedy equals an int8
    engine whose pool is large enough to never preempt; no block leaks."""
    prompts = mixed_prompts()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    roomy = quantized_llm(tiny_model_dir, tiny_params, "int8", num_gpu_blocks_override=64, enforce_eager=True)
    want = [o.outputs[0].token_ids for o in roomy.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                           use_tqdm=False)]
    llm = quantized_llm(tiny_model_dir, tiny_params, "int8", swap_space=0.001, enforce_eager=True)
    runner = llm.llm_engine.runner
    assert runner.num_swap_blocks > 0 and runner._host_k[0].dtype == np.int8
    scales = jax.device_get(runner.kv_scales)
    ids = kv_quantization.calibration_token_ids(llm.get_tokenizer())  # update_weights recalibrated:
    jax.tree.map(np.testing.assert_array_equal, scales,
                 jax.device_get(kv_quantization.calibrate(tiny_params, runner.model_config, ids, "int8")))
    before = llm.llm_engine.get_stats()
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                        use_tqdm=False)]
    assert llm.llm_engine.get_stats().num_preemptions > before.num_preemptions
    assert got == want
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(runner.kv_scales), scales)
    assert_pool_free(llm)


@pytest.mark.parametrize("kv_cache_dtype", QUANTIZED)
def test_calibrated_scales_are_absmax_over_qmax(tiny_model_dir, tiny_params, kv_cache_dtype):
    """Layer 0's scales against K and V computed without the paged path: absmax over the
    calibration text per KV head x margin / the dtype's largest value (127, 448 or 57344)."""
    loaded = load_model(str(tiny_model_dir))
    config, dtype = loaded.config, kv_quantization.page_dtype(kv_cache_dtype, "float32")
    ids = kv_quantization.calibration_token_ids(loaded.tokenizer)
    assert len(ids) > 200
    scales = kv_quantization.calibrate(tiny_params, config, ids, dtype)
    assert len(scales) == config.num_layers
    x = jnp.take(tiny_params["embed"], jnp.asarray(ids), axis=0)
    rope = llama.rope_tables(config, jnp.arange(len(ids)))
    _, k, v = llama._attention_inputs(tiny_params["layers"][0], config, x, rope)
    factor = kv_quantization.KV_SCALE_MARGIN[dtype] / kv_quantization.QMAX[dtype]
    k_scale, v_scale = scales[0]
    assert k_scale.shape == v_scale.shape == (config.num_kv_heads,)
    np.testing.assert_allclose(k_scale, jnp.abs(k).max(axis=(0, 2)) * factor, rtol=1e-5)
    np.testing.assert_allclose(v_scale, jnp.abs(v).max(axis=(0, 2)) * factor, rtol=1e-5)


def test_checkpoint_scales_are_used(tiny_model_dir, tiny_params, tmp_path):
    """`model.layers.N.self_attn.k_scale` / `v_scale` tensors (scalar or per KV head) win over calibration."""
    folder = tmp_path / "with_scales"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.k_scale"] = np.asarray(0.05, np.float32)
    state["model.layers.0.self_attn.v_scale"] = np.asarray([0.01, 0.02], np.float32)
    state["model.layers.1.self_attn.k_scale"] = np.asarray(0.07, np.float32)
    state["model.layers.1.self_attn.v_scale"] = np.asarray(0.03, np.float32)
    save_file(state, str(folder / "model.safetensors"))
    llm = LLM(str(folder), kv_cache_dtype="fp8", enforce_eager=True, **ENGINE_KWARGS)
    runner = llm.llm_engine.runner
    got = [tuple(np.asarray(s).tolist() for s in pair) for pair in runner.kv_scales]
    np.testing.assert_allclose(got, [([0.05, 0.05], [0.01, 0.02]), ([0.07, 0.07], [0.03, 0.03])])
    llm.update_weights(tiny_params)  # a checkpoint's scales stay
    np.testing.assert_allclose([tuple(np.asarray(s).tolist() for s in p) for p in runner.kv_scales], got)
    out = llm.generate({"prompt_token_ids": mixed_prompts()[1]}, SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@dataclasses.dataclass
class FakeGpu:
    compute_capability: str
    device_kind: str = "NVIDIA A100-SXM4-40GB"


def test_fp8_e4m3_on_pallas_needs_compute_capability_89():
    with pytest.raises(ValueError, match="compute capability >= 8.9.*8.0.*fp8_e5m2 or int8.*reference"):
        kv_quantization.check_backend("pallas", "float8_e4m3fn", FakeGpu("8.0"))
    kv_quantization.check_backend("pallas", "float8_e4m3fn", FakeGpu("9.0"))
    kv_quantization.check_backend("pallas", "float8_e5m2", FakeGpu("8.0"))
    kv_quantization.check_backend("pallas", "int8", FakeGpu("7.5"))
    kv_quantization.check_backend("reference", "float8_e4m3fn", FakeGpu("8.0"))


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype", QUANTIZED)
def test_smollm2_answers_capitals_with_quantized_kv(kv_cache_dtype):
    """Five questions SmolLM2 answers right with a float32 cache. A lossy cache's rounding of a
    value near a step of its grid follows bits far below float32's noise, so one answer can
    flip with any change to the arithmetic (fp8_e5m2 has 2 mantissa bits): most must stay
    right; broken scales or pages get none."""
    capitals = {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "England": "London", "Egypt": "Cairo"}
    llm = LLM(kv_cache_dtype=kv_cache_dtype, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
              compilation_cache_dir="", enforce_eager=True)
    out = llm.chat([[{"role": "user", "content": f"What is the capital of {country}?"}] for country in capitals],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    right = [city in o.outputs[0].text for city, o in zip(capitals.values(), out)]
    assert sum(right) >= 4, [o.outputs[0].text for o in out]
    assert llm.llm_engine.runner.kv_cache[0][0].dtype == jnp.dtype(PAGE_DTYPES[kv_cache_dtype])
    assert_pool_free(llm)
