"""What the host CPU can do fast, read at run time (machines of one kind differ: AVX2-only,
AVX-512, AVX-512 with BF16, AMX), and the compute dtype that follows on a CPU backend."""

import functools
import logging

logger = logging.getLogger(__name__)

# Flags (as /proc/cpuinfo spells them) that give XLA's CPU matmuls native bf16 dot products.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 x bf16 -> f32 matmuls run natively (AVX512-BF16 or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_FLAGS)


def has_amx(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has AMX tiles (the C++ kernels multiply prompt rows on them)."""
    flags = cpu_flags() if flags is None else flags
    return "amx_tile" in flags


def resolve_cpu_dtype(dtype: str, flags: frozenset[str] | None = None) -> str:
    """The compute dtype to use on a CPU backend for --dtype `dtype`.

    bfloat16 / float16 need native bf16 dot products to beat float32; without them the engine
    falls back to float32 (bfloat16 would be slower, float16 far slower) and says so. float16
    runs as bfloat16 where bf16 is native (x86 CPUs have no fast fp16 matmul), as vLLM does.
    """
    if dtype not in ("bfloat16", "float16"):
        return dtype
    if has_fast_bf16(flags):
        if dtype == "float16":
            logger.warning("--dtype float16 on CPU runs as bfloat16 (no fast float16 matmuls on CPUs).")
        return "bfloat16"
    logger.warning("--dtype %s: this CPU has no native bf16 dot products (%s), where bf16 runs slower "
                   "than float32; using float32.", dtype, " / ".join(BF16_FLAGS))
    return "float32"
