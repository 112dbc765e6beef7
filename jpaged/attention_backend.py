"""Picks the paged-attention implementation for --attention-backend.

All backends share `pallas_kernels.reference.ragged_paged_attention`'s signature:
- reference: pure JAX, runs everywhere (the oracle);
- pallas: Pallas/Triton kernels, NVIDIA GPUs only;
- cpu: the C++ kernel registered through jax.ffi (built by `python -m pallas_kernels.cpu.build`);
- auto: pallas on GPU, cpu on CPU, falling back to reference with one warning when the C++
  kernel is unavailable.

The pallas backend also has a decode-only kernel (`decode_only_attention`): the runner compiles
separate programs for steps it knows hold one new token per sequence, where that kernel reads
each context with fewer wasted rows and splits long contexts across programs (flash-decoding).
"""

import importlib
import logging

from jpaged.sampler import SamplingKernels

logger = logging.getLogger(__name__)


def _cpu_kernel():
    """(module, None) or (None, reason the C++ kernel cannot be used)."""
    try:
        module = importlib.import_module("pallas_kernels.cpu")
    except ImportError as e:
        return None, f"pallas_kernels.cpu cannot be imported ({e})"
    if not module.is_available():
        return None, module.load_error()
    return module, None


def select_attention(backend: str, platform: str):
    """Returns (name, attention_fn) for --attention-backend `backend` on `platform` ("cpu"/"gpu")."""
    if backend == "auto":
        backend = "pallas" if platform == "gpu" else "cpu"
        if backend == "cpu":
            module, reason = _cpu_kernel()
            if module is None:
                logger.warning("The C++ CPU kernels are unavailable (%s); using the reference attention "
                               "and XLA's dots, which are several times slower. Build them with "
                               "`python -m pallas_kernels.cpu.build`.", reason)
                backend = "reference"
    if backend == "reference":
        from pallas_kernels.reference import ragged_paged_attention
        return "reference", ragged_paged_attention
    if backend == "pallas":
        if platform != "gpu":
            raise ValueError(f"--attention-backend pallas needs an NVIDIA GPU, but jax runs on {platform}; "
                             f"use --attention-backend auto, cpu or reference.")
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention
        return "pallas", ragged_paged_attention
    if backend == "cpu":
        if platform != "cpu":
            raise ValueError(f"--attention-backend cpu runs on CPU only, but jax runs on {platform}.")
        module, reason = _cpu_kernel()
        if module is None:
            raise ValueError(f"--attention-backend cpu: the C++ kernel is unavailable ({reason}). "
                             f"Build it with `python -m pallas_kernels.cpu.build` or use --attention-backend reference.")
        return "cpu", module.ragged_paged_attention
    raise ValueError(f"unknown --attention-backend {backend!r}; choose auto, reference, pallas or cpu.")


def select_kv_writer(backend: str):
    """The KV-write function (`pallas_kernels.reference.write_kv`'s signature) for a selected backend.

    The C++ library writes in place for every page dtype; XLA's CPU scatter rewrites the whole
    pool for bf16 pages. Other backends use the XLA scatter.
    """
    if backend == "cpu":
        from pallas_kernels.cpu import write_kv
        return write_kv
    from pallas_kernels.reference import write_kv
    return write_kv


def select_sampling_kernels(backend: str, tp: int):
    """The sampler's draw, top_k / top_p mask and logprobs (`jpaged.sampler.SamplingKernels`):
    the C++ ones with the cpu backend on one device (a few passes over each row where the
    references bisect for the thresholds: ~2 ms instead of ~60-90 for 64 rows of a 49k
    vocabulary with top_p; logprobs without a sort: ~1 ms instead of ~10), else the references."""
    if backend == "cpu" and tp == 1:
        from pallas_kernels import cpu
        return SamplingKernels(cpu.sample_tokens, cpu.apply_top_k_top_p, cpu.logprob_outputs)
    return SamplingKernels()


def decode_only_attention(backend: str):
    """The attention for steps where every sequence has 0 or 1 new token, when `backend` (a name
    returned by `select_attention`) has one that beats its general kernel there; else None."""
    if backend == "pallas":
        from pallas_kernels.decode_attention import decode_attention
        return decode_attention
    return None
