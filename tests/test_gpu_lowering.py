"""Every program the runner compiles on a GPU, lowered for CUDA on this CPU-only machine, for a
Llama-3-8B-shaped model (bf16, abstract weights: nothing 8B-sized is allocated).

The runner's own `warmup` enumerates the programs; its jitted functions are wrapped so that
`lower(...).compile()` becomes `trace(...).lower(lowering_platforms=("cuda",))` under an abstract
mesh of one H100 (the Pallas Triton lowering wants the target device). This runs JAX's whole
CUDA lowering (StableHLO for the model and sampler, the Pallas->Triton kernel lowering); what it
cannot run without a GPU is XLA's GPU compiler and Triton's PTX compilation.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

from jpaged import EngineArgs
from jpaged import runner as runner_module
from jpaged.kv_pool import KVPoolSpec
from jpaged.models import llama
from jpaged.models.config import ModelConfig
from jpaged.sharding import make_mesh
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import write_kv
from test_pallas_kernels import _abstract_cuda_mesh

LLAMA3_8B = os.path.join(os.path.dirname(__file__), "..", "scripts", "llama3_8b_config.json")
TRITON_CALL = "__gpu$xla.gpu.triton"


class CudaLowering:
    """Stands in for a jitted function: `lower(*args).compile()` lowers for CUDA and records it."""

    def __init__(self, jitted, name, record):
        self.jitted, self.name, self.record = jitted, name, record

    def lower(self, *args, **kwargs):
        lowered = self.jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
        self.record.append((self.name, kwargs, lowered.as_text()))
        return self

    def compile(self):
        return None


def llama3_8b_config() -> ModelConfig:
    with open(LLAMA3_8B) as f:
        return ModelConfig.from_hf_config(json.load(f), dtype="bfloat16")


def test_every_runner_program_lowers_for_cuda():
    mesh = _abstract_cuda_mesh()
    if mesh is None:
        pytest.skip("this jax has no jax.sharding.AbstractDevice to lower for CUDA on CPU")
    config = llama3_8b_config()
    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16), llama.param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    # A two-block pool is allocated on the host; the lowering sees the pool as abstract shapes.
    spec = KVPoolSpec(num_blocks=2, block_size=16, num_layers=config.num_layers,
                      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype="bfloat16")
    runner = runner_module.ModelRunner(
        config, params, pool_spec=spec, num_swap_blocks=0, max_num_batched_tokens=512, max_num_seqs=64,
        max_model_len=8192, attention_fn=ragged_paged_attention, write_kv_fn=write_kv, bucket_pages=False,
        mesh=make_mesh(jax.devices()[:1]), decode_attention_fn=decode_attention,
        max_entries_per_seq=runner_module.max_sampler_entries(config, EngineArgs(), 8192), max_logprobs=20,
        num_scheduler_steps=4)
    # Unplaced input specs: the runner's are placed on its CPU mesh, which jax >= 0.11 refuses to
    # trace under the abstract CUDA mesh (one device either way, so nothing is lost).
    runner._abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    runner.replicated = None
    record = []
    for name in ("_forward_jit", "_decode_jit", "_decode_steps_jit", "_sample_jit", "_prompt_logprobs_jit"):
        setattr(runner, name, CudaLowering(getattr(runner, name), name, record))
    with jax.sharding.use_abstract_mesh(mesh):
        num_programs, _ = runner.warmup(show_progress=False)
        # Swap copies (compiled at start when --swap-space > 0), on a 4096-block pool.
        pool = [(jax.ShapeDtypeStruct((4096, *spec.page_shape[1:]), jnp.bfloat16),) * 2] * config.num_layers
        ids = jax.ShapeDtypeStruct((64,), jnp.int32)
        blocks = [(jax.ShapeDtypeStruct((64, *spec.page_shape[1:]), jnp.bfloat16),) * 2] * config.num_layers
        CudaLowering(jax.jit(runner_module._gather_blocks), "swap_out", record).lower(pool, ids)
        CudaLowering(jax.jit(runner_module._scatter_blocks, donate_argnums=(0,)), "swap_in", record).lower(
            pool, ids, blocks)
    assert num_programs == len(record) - 2
    forwards = [(kw["num_tokens"], kw["num_seqs"]) for name, kw, _ in record if name == "_forward_jit"]
    decodes = [(kw["num_tokens"], kw["num_seqs"]) for name, kw, _ in record if name == "_decode_jit"]
    assert forwards == [(16, 16), (32, 32), (64, 64), (128, 64), (256, 64), (512, 64)]
    assert decodes == [(16, 16), (32, 32), (64, 64)]
    # Multi-step rounds (--num-scheduler-steps 4): one program per decode bucket.
    rounds = [(kw["num_tokens"], kw["num_seqs"]) for name, kw, _ in record if name == "_decode_steps_jit"]
    assert rounds == decodes
    for name, kwargs, text in record:
        if name in ("_sample_jit", "_prompt_logprobs_jit", "swap_out", "swap_in"):
            assert TRITON_CALL not in text
        else:  # one Triton attention kernel (a shared function), called once per layer
            decode = name in ("_decode_jit", "_decode_steps_jit")
            kernel = "decode_attention" if decode else "ragged_paged_attention"
            assert text.count(TRITON_CALL) == 1, (name, kwargs)
            assert len(re.findall(rf"call @{kernel}\b", text)) == config.num_layers, (name, kwargs)
            assert f"paged_flash_rows{16 if decode else 64}" in text


@pytest.fixture(scope="session")
def cuda_plugin_dir():
    """The unpacked CUDA plugin wheels matching this jax: $JPAGED_CUDA_PLUGIN_DIR, else fetched once
    from the package registry into ~/.cache/jpaged/cuda_plugin/<version> (unpacked, never
    installed: an installed plugin would make every JAX process here probe CUDA)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    if os.environ.get("JPAGED_CUDA_PLUGIN_DIR"):
        return os.environ["JPAGED_CUDA_PLUGIN_DIR"]
    version = jax.__version__
    target = os.path.join(os.path.expanduser("~"), ".cache", "jpaged", "cuda_plugin", version)
    if os.path.isdir(os.path.join(target, "jax_plugins")):
        return target
    # Downloaded and unpacked under this process's own names, then renamed into place: two test
    # processes may fetch at once, and the first rename wins.
    wheels = f"{target}.wheels.{os.getpid()}"
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", wheels,
                              f"jax-cuda12-plugin=={version}", f"jax-cuda12-pjrt=={version}"],
                             capture_output=True, text=True, timeout=900)
    if fetched.returncode != 0:
        pytest.skip(f"the CUDA plugin wheels for jax {version} could not be fetched: {fetched.stderr[-500:]}")
    partial = f"{target}.partial.{os.getpid()}"
    os.makedirs(partial, exist_ok=True)
    for name in os.listdir(wheels):
        with zipfile.ZipFile(os.path.join(wheels, name)) as wheel:
            wheel.extractall(partial)
    shutil.rmtree(wheels)
    try:
        os.rename(partial, target)
    except OSError:  # another process's copy is in place
        shutil.rmtree(partial)
    return target


def run_aot_compile(cuda_plugin_dir, *args):
    """scripts/aot_compile_cuda.py with these arguments, in a subprocess (the plugin on its path)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "aot_compile_cuda.py")
    return subprocess.run([sys.executable, script, "--plugin-dir", cuda_plugin_dir, *args],
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_every_runner_program_compiles_for_h100_without_a_gpu(tmp_path, cuda_plugin_dir):
    """XLA's CUDA plugin compiles (deviceless, for an H100 target config) every program the runner
    compiles at start: the full GPU pipeline, the Pallas kernels through Triton to PTX. Four of
    Llama-3-8B's 32 layers and up to 16 sequences (every layer, and every bucket of a kind,
    compiles alike; all 32 layers and 64 sequences took 2.5x as long here)."""
    with open(LLAMA3_8B) as f:
        hf_config = {**json.load(f), "num_hidden_layers": 4}
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(hf_config))
    out = tmp_path / "aot.json"
    done = run_aot_compile(cuda_plugin_dir, "--model-config", str(model_config), "--max-num-batched-tokens", "64",
                           "--max-num-seqs", "16", "--num-scheduler-steps", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "NVIDIA H100 80GB HBM3"
    programs = [(r["program"], r.get("num_tokens", r.get("num_seqs"))) for r in result["results"]]
    samplers = [("sample", s) for s in (8, 16) for _ in range(4)]  # (no entries, all entries) x masked
    assert programs == ([("forward", 16), ("forward", 32), ("forward", 64), ("decode", 16), ("decode_steps", 16)]
                        + samplers + [("prompt_logprobs", None)] * 3)
    # The pool is donated: every forward (and multi-step decode) aliases it instead of copying it
    # (20000 blocks x 16 tokens x 8 KV heads x 128 bf16 per layer: 625 MiB each for K and V).
    assert all(r["alias_mib"] == 4 * 2 * 625.0 for r in result["results"]
               if r["program"] in ("forward", "decode", "decode_steps"))


@pytest.mark.slow
def test_kernels_with_wide_tiles_compile_for_h100_without_a_gpu(cuda_plugin_dir):
    """Triton checks shared memory only when it compiles: float32 pages with full-precision dots,
    or head_dim 256, once asked an H100 for up to 528 KiB (it has 227 KiB per SM)."""
    done = run_aot_compile(cuda_plugin_dir, "--kernels")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 12, done.stderr[-3000:]
    assert all(r["compiled"] for r in results), [r for r in results if not r["compiled"]]
    assert done.returncode == 0
