"""KV pool sizing and allocation: a list of (k_pages, v_pages) per layer, block 0 the null block.

Sizing (first rule that applies):
1. --num-gpu-blocks-override: exactly that many blocks (including the null block).
2. --kv-cache-memory GiB.
3. GPU: --gpu-memory-utilization x device memory, minus what is already in use (the weights).
   CPU: min(4 GiB, --gpu-memory-utilization x available host memory).
On CPU (rules 2-3) the pool is also capped at what max_num_seqs sequences of max_model_len can
use, so small models do not allocate gigabytes they can never fill.

On Linux CPUs the pool is backed by transparent huge pages where the kernel allows it
(`advise_huge_pages`): attention reads each sequence's blocks at scattered places in the pool,
and with 4 KiB pages nearly every (block, KV head) read starts with a TLB miss.
"""

import ctypes
import dataclasses
import logging
import sys

import jax
import jax.numpy as jnp

from jpaged.buckets import cdiv
from jpaged.config import DEFAULT_CPU_KV_CACHE_GIB
from pallas_kernels.reference import get_kv_cache_shape

logger = logging.getLogger(__name__)

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class KVPoolSpec:
    num_blocks: int  # including the null block 0
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def page_shape(self) -> tuple[int, ...]:
        return get_kv_cache_shape(self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


def bytes_per_block(model_config, block_size: int, dtype: str) -> int:
    """K and V of one block over all layers."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * model_config.num_layers * model_config.num_kv_heads * block_size * model_config.head_dim * itemsize


def _available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def _memory_budget(args, device) -> int:
    if args.kv_cache_memory is not None:
        return int(args.kv_cache_memory * GIB)
    if device.platform == "cpu":
        return int(min(DEFAULT_CPU_KV_CACHE_GIB * GIB, args.gpu_memory_utilization * _available_host_bytes()))
    stats = device.memory_stats()
    return int(stats["bytes_limit"] * args.gpu_memory_utilization) - stats["bytes_in_use"]


def size_pool(model_config, args, max_model_len: int, kv_dtype: str, device) -> KVPoolSpec:
    """Chooses num_blocks (see the module docstring); fails when one max_model_len sequence cannot fit."""
    block_bytes = bytes_per_block(model_config, args.block_size, kv_dtype)
    blocks_per_seq = cdiv(max_model_len, args.block_size)
    if args.num_gpu_blocks_override is not None:
        num_blocks = args.num_gpu_blocks_override
        source = f"--num-gpu-blocks-override {num_blocks}"
    else:
        budget = _memory_budget(args, device)
        num_blocks = max(0, budget // block_bytes)
        source = f"{budget / GIB:.2f} GiB of KV memory ({block_bytes} bytes per block)"
        if device.platform == "cpu":
            num_blocks = min(num_blocks, args.max_num_seqs * blocks_per_seq + 1)
    if num_blocks - 1 < blocks_per_seq:
        raise ValueError(
            f"The KV cache has {max(num_blocks - 1, 0)} usable blocks of {args.block_size} tokens "
            f"({max(num_blocks - 1, 0) * args.block_size} tokens, from {source}), but one sequence of "
            f"max_model_len={max_model_len} needs {blocks_per_seq} blocks. Increase --kv-cache-memory / "
            f"--gpu-memory-utilization / --num-gpu-blocks-override, or decrease --max-model-len.")
    spec = KVPoolSpec(num_blocks=num_blocks, block_size=args.block_size, num_layers=model_config.num_layers,
                      num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, dtype=kv_dtype)
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, from %s); max concurrency at "
        "max_model_len=%d: %.2fx", num_blocks, args.block_size, (num_blocks - 1) * args.block_size,
        num_blocks * block_bytes / GIB, source, max_model_len, (num_blocks - 1) / blocks_per_seq)
    return spec


def num_swap_blocks(model_config, args, kv_dtype: str) -> int:
    """Host blocks that --swap-space GiB holds (0: preemption recomputes)."""
    return int(args.swap_space * GIB) // bytes_per_block(model_config, args.block_size, kv_dtype)


def allocate(spec: KVPoolSpec, device) -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed pool on `device`: one (k_pages, v_pages) per layer. On CPU, backed by transparent
    huge pages where the kernel allows it."""
    zeros = jax.jit(lambda: jnp.zeros(spec.page_shape, spec.dtype),
                    out_shardings=jax.sharding.SingleDeviceSharding(device))
    pool, huge = [], 0

    def pages():
        # One array at a time, each advised before the next is zeroed: the zeroing touches every
        # page, so advising the whole pool at the end would take all of it into memory first.
        array = jax.block_until_ready(zeros())
        nonlocal huge
        huge += advise_huge_pages(array) if device.platform == "cpu" else 0
        return array

    for _ in range(spec.num_layers):
        pool.append((pages(), pages()))
    if huge:
        logger.info("KV cache: %.2f GiB advised onto transparent huge pages", huge / GIB)
    return pool


_HUGE_PAGE = 2 << 20
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14


def advise_huge_pages(zeroed: jax.Array) -> int:
    """Hands the memory of a freshly zeroed CPU array (its 2 MiB-aligned part) to transparent
    huge pages: MADV_HUGEPAGE, then MADV_DONTNEED, so its pages come back as zero-filled 2 MiB
    pages when first written. Instant, and memory is taken only as the array fills. Contents must
    be zeros: that is what dropped anonymous pages read back as. Returns the bytes advised; 0
    where nothing was done (not Linux, THP disabled, not anonymous memory, under 2 MiB). The advice
    belongs to the address range; the runner donates the pool to every step and XLA updates it in
    place, so it lasts as long as the pool."""
    if not sys.platform.startswith("linux"):
        return 0
    address = zeroed.unsafe_buffer_pointer()
    begin = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + zeroed.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end <= begin or not _is_anonymous(begin, end):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(begin, end - begin, _MADV_HUGEPAGE) != 0:
        return 0  # THP disabled
    return end - begin if libc.madvise(begin, end - begin, _MADV_DONTNEED) == 0 else 0


def _is_anonymous(begin: int, end: int) -> bool:
    """Whether [begin, end) lies in private anonymous mappings (heap or mmap), where dropped pages
    read back as zeros; a file-backed mapping would read back the file."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if hi <= begin or lo >= end:
                continue
            name = fields[5] if len(fields) > 5 else ""
            if fields[1][3] != "p" or (name and not name.startswith("[heap") and not name.startswith("[anon")):
                return False
    return True
