"""Memory per device of Llama-3-8B- and 70B-shaped models under tensor parallel 1/2/4/8.

Run on this machine's CPU with 8 fake devices (nothing model-sized is allocated: the weights are
abstract shapes):

    python scripts/tp_memory.py [--models 8b 70b] [--tp 1 2 4 8] [--max-model-len 8192]

Per device: the weights (each param's shard shape under jpaged's logical rules, bf16), the
largest bucket's forward plus sampler temporaries and outputs (`compiled.memory_analysis()` of
the SPMD program, `runner.largest_step_bytes`; XLA's CPU compiler with the C++ attention kernel,
so a GPU's number differs somewhat), the KV bytes per token, and the tokens an 80 GiB device's
KV pool holds at --gpu-memory-utilization 0.9. Prints a markdown table (docs/distributed.md).
"""

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jpaged import EngineArgs, kv_pool, sharding  # noqa: E402
from jpaged.attention_backend import select_attention, select_kv_writer  # noqa: E402
from jpaged.models import llama  # noqa: E402
from jpaged.models.config import ModelConfig  # noqa: E402
from jpaged.runner import largest_step_bytes  # noqa: E402

GIB = 1 << 30
DEVICE_GIB = 80


def weight_bytes_per_device(model, params, mesh) -> int:
    shardings = sharding.param_shardings(model, params, mesh)
    return sum(int(np.prod(s.shard_shape(p.shape))) * p.dtype.itemsize
               for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))


def row(name, config, tp, args, attention, backend) -> dict:
    mesh = sharding.make_mesh(jax.devices()[:tp])
    model = llama.LlamaForCausalLM(config)
    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16), llama.param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    engine_args = EngineArgs(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    weights = weight_bytes_per_device(model, params, mesh)
    step = largest_step_bytes(config, params, attention, select_kv_writer(backend), engine_args, args.max_model_len,
                              "bfloat16", bucket_pages=backend == "reference", mesh=mesh, model=model)
    kv_per_token = kv_pool.bytes_per_block(config, 1, "bfloat16") // sharding.kv_shards(config, tp)
    kv_budget = 0.9 * DEVICE_GIB * GIB - weights - step
    return {"model": name, "tp": tp, "weights_gib": weights / GIB, "step_gib": step / GIB,
            "kv_kib_per_token": kv_per_token / 1024, "kv_tokens_80gib": max(0, int(kv_budget // kv_per_token)),
            "split": sharding.describe(config, tp)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["8b", "70b"], choices=["8b", "70b"])
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead")
    args = parser.parse_args()
    backend, attention = select_attention("auto", "cpu")
    print(f"attention backend for the probe: {backend}; max_model_len {args.max_model_len}, "
          f"max_num_batched_tokens {args.max_num_batched_tokens}, max_num_seqs {args.max_num_seqs}", flush=True)
    print("| model | TP | weights GiB/device | largest step GiB/device | KV KiB/token/device | "
          f"KV tokens on {DEVICE_GIB} GiB at 0.9 |\n|---|---|---|---|---|---|", flush=True)
    for name in args.models:
        with open(os.path.join(ROOT, "scripts", f"llama3_{name}_config.json")) as f:
            config = ModelConfig.from_hf_config(json.load(f), dtype="bfloat16")
        for tp in args.tp:
            r = row(name, config, tp, args, attention, backend)
            print(json.dumps(r) if args.json else
                  f"| Llama-3-{name.upper()} | {tp} | {r['weights_gib']:.2f} | {r['step_gib']:.2f} | "
                  f"{r['kv_kib_per_token']:.0f} | {r['kv_tokens_80gib']:,} |", flush=True)


if __name__ == "__main__":
    main()
