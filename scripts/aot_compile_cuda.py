"""Compiles every program the runner would compile on an H100, on a machine without a GPU.

XLA's CUDA PJRT plugin can compile without a device (ahead-of-time) when given a GPU target
config; this runs the full XLA GPU pipeline, including the Pallas kernels' Triton compilation to
PTX for sm_90a, and reports each program's compile time and `memory_analysis()`. It is what CPU
tests cannot otherwise reach: the real GPU compiler on the real programs.

    python scripts/aot_compile_cuda.py --plugin-dir DIR [--out result.json]
    python scripts/aot_compile_cuda.py --plugin-dir DIR --kernels   # the kernels' widest tiles

DIR holds the unpacked wheels of the CUDA plugin matching this jax (`jax_plugins/xla_cuda12/` and
`jax_cuda12_plugin/`); do NOT pip-install them on a GPU-less machine (every JAX process would
then probe CUDA at start). For example:

    pip download --no-deps -d /tmp/w jax-cuda12-plugin==$JAX_VERSION jax-cuda12-pjrt==$JAX_VERSION
    mkdir DIR && for w in /tmp/w/*.whl; do unzip -q -o "$w" -d DIR; done

The model is Llama-3-8B-shaped in bf16 (abstract weights, nothing allocated) with the engine's
bucket flags; the target is scripts/h100_target_config.txtpb (an H100 SXM's published limits).
Autotuning needs a device, so XLA picks its default GEMM configurations: compile times and
temporaries are indicative, not the GPU's final ones.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin-dir", required=True, help="unpacked jax-cuda12-plugin and jax-cuda12-pjrt wheels")
    parser.add_argument("--target-config", default=os.path.join(ROOT, "scripts", "h100_target_config.txtpb"))
    parser.add_argument("--model-config", default=os.path.join(ROOT, "scripts", "llama3_8b_config.json"))
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--num-scheduler-steps", type=int, default=1,
                        help="> 1 also compiles the multi-step decode programs (one per decode bucket)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--kernels", action="store_true",
                        help="instead: compile the decode and ragged kernels alone where their tiles are widest "
                             "(float32 and head_dim 256 pages, default and 'highest' matmul precision): the "
                             "shared-memory limit is only checked by Triton's compile")
    args = parser.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"  # the host runs on the CPU; the CUDA plugin only compiles
    sys.path.insert(0, os.path.abspath(args.plugin_dir))

    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jpaged.kv_pool import KVPoolSpec
    from jpaged.models import llama
    from jpaged.models.config import ModelConfig
    from jpaged.config import EngineArgs
    from jpaged.runner import ModelRunner, max_sampler_entries
    from jpaged.sharding import make_mesh
    from pallas_kernels.decode_attention import decode_attention
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention
    from pallas_kernels.reference import write_kv

    with open(args.target_config) as f:
        topology = topologies.get_topology_desc("", "cuda", topology="1x1x1", target_config=f.read())
    gpu_mesh = Mesh(topology.devices, ("x",))
    gpu = NamedSharding(gpu_mesh, PartitionSpec())
    if args.kernels:
        sys.exit(compile_kernels(gpu_mesh))
    with open(args.model_config) as f:
        config = ModelConfig.from_hf_config(json.load(f), dtype="bfloat16")

    def on_gpu(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=gpu), tree)

    results = []

    class Compile:
        """Stands in for a runner jit: `lower(...)` lowers for the H100 target and returns a
        program whose `compile()` compiles it there. Results keep the order of lowering (the
        runner compiles on a thread pool)."""

        def __init__(self, jitted, name):
            self.jitted, self.name = jitted, name

        def lower(self, *lower_args, **static):
            result = {"program": self.name, **static}
            results.append(result)
            return Program(self.jitted.lower(*on_gpu(lower_args), **static), result)

    class Program:
        def __init__(self, lowered, result):
            self.lowered, self.result = lowered, result

        def compile(self):
            start = time.perf_counter()
            memory = self.lowered.compile().memory_analysis()
            self.result.update({"compile_s": round(time.perf_counter() - start, 1),
                                "temp_mib": round(memory.temp_size_in_bytes / 2**20, 1),
                                "output_mib": round(memory.output_size_in_bytes / 2**20, 1),
                                "alias_mib": round(memory.alias_size_in_bytes / 2**20, 1)})
            print(self.result, flush=True)

    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16), llama.param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    spec = KVPoolSpec(num_blocks=2, block_size=16, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                      head_dim=config.head_dim, dtype="bfloat16")
    runner = ModelRunner(config, params, pool_spec=spec, num_swap_blocks=0,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                         max_model_len=args.max_model_len, attention_fn=ragged_paged_attention, write_kv_fn=write_kv,
                         bucket_pages=False, mesh=make_mesh(jax.devices()[:1]), decode_attention_fn=decode_attention,
                         max_entries_per_seq=max_sampler_entries(config, EngineArgs(), args.max_model_len),
                         max_logprobs=EngineArgs().max_logprobs, num_scheduler_steps=args.num_scheduler_steps)
    # The pool the programs see: 20000 blocks (~40 GiB for Llama-3-8B), donated.
    runner.kv_cache = [(jax.ShapeDtypeStruct((20000, *spec.page_shape[1:]), jnp.bfloat16),) * 2] * config.num_layers
    for name in ("_forward_jit", "_decode_jit", "_decode_steps_jit", "_sample_jit", "_prompt_logprobs_jit"):
        setattr(runner, name, Compile(getattr(runner, name), name.strip("_").removesuffix("_jit")))
    start = time.perf_counter()
    with jax.sharding.use_abstract_mesh(gpu_mesh.abstract_mesh):  # jax >= 0.11 lowers Pallas for its device
        runner.warmup(show_progress=False)
    total = round(time.perf_counter() - start, 1)
    summary = {"device": topology.devices[0].device_kind, "jax": jax.__version__, "programs": len(results),
               "total_compile_s": total, "results": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


def compile_kernels(gpu_mesh) -> int:
    """Compiles both kernels for 64 sequences x 16 pages of 16 tokens, 32 query / 8 KV heads,
    over (page dtype, head_dim, precision); prints one JSON line per case. Returns 1 if any failed."""
    import functools
    import itertools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from pallas_kernels.decode_attention import decode_attention
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention

    gpu = NamedSharding(gpu_mesh, PartitionSpec())
    failed = 0
    cases = itertools.product((decode_attention, ragged_paged_attention),
                              ((jnp.float32, 128), (jnp.bfloat16, 256), (jnp.float32, 256)), (None, "highest"))
    for kernel, (dtype, head_dim), precision in cases:
        pages = (1025, 8, 16, head_dim)
        shapes = [((512, 32, head_dim), dtype), (pages, dtype), (pages, dtype), ((64,), jnp.int32),
                  ((64, 16), jnp.int32), ((65,), jnp.int32)]
        fn = jax.jit(functools.partial(kernel, sm_scale=head_dim**-0.5, sliding_window=50, soft_cap=20.0))
        result = {"kernel": kernel.__name__, "dtype": jnp.dtype(dtype).name, "head_dim": head_dim,
                  "precision": precision or "default"}
        try:
            with jax.sharding.use_abstract_mesh(gpu_mesh.abstract_mesh), jax.default_matmul_precision(precision):
                fn.lower(*[jax.ShapeDtypeStruct(shape, d, sharding=gpu) for shape, d in shapes]).compile()
            result["compiled"] = True
        except Exception as e:  # Triton's resource checks surface as XLA runtime errors
            result.update(compiled=False, error=str(e).splitlines()[0][:300])
            failed = 1
        print(json.dumps(result), flush=True)
    return failed


if __name__ == "__main__":
    main()
