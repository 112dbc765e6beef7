"""KV pool sizing and allocation: a list of (k_pages, v_pages) per layer, block 0 the null block.

Sizing (first rule that applies):
1. --num-gpu-blocks-override: exactly that many blocks (including the null block).
2. --kv-cache-memory GiB (--kv-cache-memory-bytes arrives as the same GiB).
3. GPU: --gpu-memory-utilization x the device's TOTAL memory (vLLM's meaning), minus what is
   already in use (the weights) and minus what the largest compiled step needs besides the
   weights and the pool (its temporaries and outputs, from `compiled.memory_analysis()`).
   CPU: min(4 GiB, --gpu-memory-utilization x available host memory), divided among the
   --data-parallel-size replicas (their fake CPU devices share the host's memory).
On CPU (rules 2-3) the pool is also capped at what max_num_seqs sequences of max_model_len can
use, so small models do not allocate gigabytes they can never fill.

XLA's GPU allocator may hold XLA_PYTHON_CLIENT_MEM_FRACTION of the device's total memory (75 %
when unset) and reports that limit as `memory_stats()["bytes_limit"]`. `configure_xla_allocator`
(called before JAX starts its backends) sets the variable to --gpu-memory-utilization when the
user left it unset, so the two agree; total memory is bytes_limit divided by the fraction. A
utilization above a fraction the user set fails at start naming both; above JAX's default (JAX
was started before the engine) it is lowered to the allocator's limit with a warning.

On Linux CPUs the pool is backed by transparent huge pages where the kernel allows it
(`advise_huge_pages`, `zero_pages`): attention reads each sequence's blocks at scattered places
in the pool, and with 4 KiB pages nearly every (block, KV head) read starts with a TLB miss.
"""

import ctypes
import dataclasses
import logging
import math
import mmap
import os
import sys

import jax
import jax.numpy as jnp

import pallas_kernels.cpu as cpu_kernels
from jpaged.buckets import cdiv
from jpaged.config import DEFAULT_CPU_KV_CACHE_GIB
from pallas_kernels.reference import get_kv_cache_shape

logger = logging.getLogger(__name__)

GIB = 1 << 30
XLA_MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
XLA_DEFAULT_MEM_FRACTION = 0.75  # what JAX's GPU allocator may hold when the variable is unset


@dataclasses.dataclass(frozen=True)
class KVPoolSpec:
    num_blocks: int  # including the null block 0
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    # Sized from a GPU's free memory: `allocate` may settle for fewer blocks, down to this many,
    # when XLA's allocator cannot place them all (fragmentation its totals do not show). 0: exact.
    min_blocks: int = 0

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


def configure_xla_allocator(gpu_memory_utilization: float, environ=os.environ) -> None:
    """Makes XLA's GPU allocator limit --gpu-memory-utilization x total device memory: sets
    XLA_PYTHON_CLIENT_MEM_FRACTION when the user left it unset and JAX has not started its
    backends (the variable is read once, then). Call before anything touches a device."""
    from jax._src import xla_bridge  # backends_are_initialized is not public API

    if XLA_MEM_FRACTION in environ or xla_bridge.backends_are_initialized():
        return
    environ[XLA_MEM_FRACTION] = f"{gpu_memory_utilization:g}"


def xla_mem_fraction(environ=os.environ) -> float | None:
    """The fraction of total device memory XLA's GPU allocator may hold, when set (None: JAX's
    default, XLA_DEFAULT_MEM_FRACTION)."""
    value = environ.get(XLA_MEM_FRACTION)
    return None if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class GpuMemory:
    """A GPU's memory at pool-sizing time, in bytes."""

    total: int  # the device's memory
    allocator_limit: int  # what XLA's allocator may hold (XLA_PYTHON_CLIENT_MEM_FRACTION x total)
    in_use: int  # already allocated: the weights
    step: int  # what the largest compiled step needs besides the weights and the pool
    fraction: float  # XLA_PYTHON_CLIENT_MEM_FRACTION in effect
    fraction_set: bool  # whether the variable was set (by the user, or by configure_xla_allocator)

    @classmethod
    def from_stats(cls, stats: dict | None, fraction: float | None, step: int) -> "GpuMemory":
        """From `device.memory_stats()` and XLA_PYTHON_CLIENT_MEM_FRACTION (None: unset)."""
        if not stats or "bytes_limit" not in stats:
            raise ValueError(
                "JAX reports no GPU memory limit (XLA_PYTHON_CLIENT_ALLOCATOR=platform?), so "
                "--gpu-memory-utilization cannot size the KV cache; pass --kv-cache-memory or "
                "--num-gpu-blocks-override, or use XLA's default allocator.")
        limit = stats["bytes_limit"]
        fraction_set = fraction is not None
        fraction = fraction if fraction_set else XLA_DEFAULT_MEM_FRACTION
        return cls(total=int(limit / fraction), allocator_limit=limit, in_use=stats["bytes_in_use"], step=step,
                   fraction=fraction, fraction_set=fraction_set)

    def kv_budget(self, utilization: float) -> int:
        """Bytes left for the KV pool under --gpu-memory-utilization (negative: over budget)."""
        wanted = int(utilization * self.total)
        if wanted > self.allocator_limit * 1.001 and not self.fraction_set:  # XLA rounds the limit down a little
            # JAX started its GPU client (default fraction) before the engine could set the variable.
            logger.warning(
                "JAX started on the GPU before the engine could set %s, so its allocator holds only "
                "%.2f of the device (%.2f GiB), less than --gpu-memory-utilization %g; sizing from that. "
                "Set %s=%g before the first JAX call to use the flag's share.", XLA_MEM_FRACTION,
                self.fraction, self.allocator_limit / GIB, utilization, XLA_MEM_FRACTION, utilization)
            wanted = self.allocator_limit
        elif wanted > self.allocator_limit * 1.001:
            raise ValueError(
                f"--gpu-memory-utilization {utilization:g} asks for {wanted / GIB:.2f} GiB of the "
                f"device's {self.total / GIB:.2f} GiB, but {XLA_MEM_FRACTION}={self.fraction:g} "
                f"lets JAX's allocator hold only {self.allocator_limit / GIB:.2f} GiB. Lower "
                f"--gpu-memory-utilization or raise {XLA_MEM_FRACTION} (unset, the engine sets it to "
                f"--gpu-memory-utilization before JAX starts on the GPU).")
        return min(wanted, self.allocator_limit) - self.in_use - self.step

    def utilization_for(self, kv_bytes: int) -> float:
        """The --gpu-memory-utilization that leaves kv_bytes for the pool."""
        return (self.in_use + self.step + kv_bytes) / self.total


def compiled_step_bytes(memory_analysis) -> int:
    """Device bytes a compiled program needs besides its inputs: temporaries plus the outputs
    that do not alias a (donated) input. `memory_analysis`: `compiled.memory_analysis()`, which
    is None where the backend cannot tell (then 0, with a warning)."""
    m = memory_analysis
    if m is None:
        logger.warning("XLA gave no memory analysis for a compiled step; the KV cache reserves nothing "
                       "for its temporaries (lower --gpu-memory-utilization if the first steps run out of memory).")
        return 0
    return m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def _cpu_budget(args) -> int:
    """Bytes of one replica's pool where no GPU's memory decides: --kv-cache-memory, else
    min(4 GiB, --gpu-memory-utilization x available host memory) shared by the replicas."""
    if args.kv_cache_memory is not None:
        return int(args.kv_cache_memory * GIB)
    shared = min(DEFAULT_CPU_KV_CACHE_GIB * GIB, args.gpu_memory_utilization * _available_host_bytes())
    return int(shared / args.data_parallel_size)


def _memory_budget(args, device, step_bytes) -> tuple[int, GpuMemory | None]:
    if args.kv_cache_memory is not None or device.platform == "cpu":
        return _cpu_budget(args), None
    memory = GpuMemory.from_stats(device.memory_stats(), xla_mem_fraction(), step_bytes() if step_bytes else 0)
    return memory.kv_budget(args.gpu_memory_utilization), memory


def cpu_sequence_capacity(model_config, args, kv_dtype: str, kv_shards: int = 1) -> int:
    """Tokens one sequence can hold in the pool `size_pool` builds on CPU: all of its usable blocks
    (the null block aside). The default max_model_len on CPU is the model's limit capped at this."""
    if args.num_gpu_blocks_override is not None:
        num_blocks = args.num_gpu_blocks_override
    else:
        num_blocks = _cpu_budget(args) // (bytes_per_block(model_config, args.block_size, kv_dtype) // kv_shards)
    return max(num_blocks - 1, 0) * args.block_size


def size_pool(model_config, args, max_model_len: int, kv_dtype: str, device, step_bytes=None,
              kv_shards: int = 1) -> KVPoolSpec:
    """Chooses num_blocks (see the module docstring); fails when one max_model_len sequence cannot fit.

    device: one of the engine's devices (all alike). kv_shards: into how many devices' parts each
    block is split (tensor parallel by KV heads): the memory rules size one device's share.

    step_bytes: on a GPU, a function of no arguments returning what the largest compiled step
    needs besides the weights and the pool (`compiled_step_bytes`); called only when sizing from
    --gpu-memory-utilization.
    """
    block_bytes = bytes_per_block(model_config, args.block_size, kv_dtype) // kv_shards  # on one device
    blocks_per_seq = cdiv(max_model_len, args.block_size)
    gpu = None  # GpuMemory when sized from a GPU's memory
    if args.num_gpu_blocks_override is not None:
        num_blocks = args.num_gpu_blocks_override
        source = f"--num-gpu-blocks-override {num_blocks}"
    else:
        budget, gpu = _memory_budget(args, device, step_bytes)
        num_blocks = max(0, budget // block_bytes)
        source = f"{budget / GIB:.2f} GiB of KV memory ({block_bytes} bytes per block)"
        if gpu is not None:
            source += (f"; {args.gpu_memory_utilization:g} x {gpu.total / GIB:.2f} GiB minus "
                       f"{gpu.in_use / GIB:.2f} GiB in use and {gpu.step / GIB:.2f} GiB for the largest step")
            if num_blocks - 1 < blocks_per_seq:
                kv_needed = (blocks_per_seq + 1) * block_bytes
                needed = math.ceil(gpu.utilization_for(kv_needed) * 1000) / 1000
                fix = (f"Raise --gpu-memory-utilization to at least {needed:g}" if needed <= 1.0 else
                       "Even all of the device would not do; lower --max-num-batched-tokens / --max-num-seqs")
                raise ValueError(
                    f"Out of GPU memory for the KV cache: one sequence of max_model_len={max_model_len} "
                    f"needs {blocks_per_seq} blocks ({kv_needed / GIB:.2f} GiB with the null block), but "
                    f"{source} leaves room for {max(num_blocks - 1, 0)}; short by "
                    f"{(kv_needed - budget) / GIB:.2f} GiB. {fix}, or lower --max-model-len "
                    f"(at most {max(num_blocks - 1, 0) * args.block_size} tokens fit now).")
        if device.platform == "cpu":
            num_blocks = min(num_blocks, args.max_num_seqs * blocks_per_seq + 1)
    if num_blocks - 1 < blocks_per_seq:
        raise ValueError(
            f"The KV cache has {max(num_blocks - 1, 0)} usable blocks of {args.block_size} tokens "
            f"({max(num_blocks - 1, 0) * args.block_size} tokens, from {source}), but one sequence of "
            f"max_model_len={max_model_len} needs {blocks_per_seq} blocks. Increase --kv-cache-memory / "
            f"--gpu-memory-utilization / --num-gpu-blocks-override, or decrease --max-model-len.")
    spec = KVPoolSpec(num_blocks=num_blocks, block_size=args.block_size, num_layers=model_config.num_layers,
                      num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, dtype=kv_dtype,
                      min_blocks=blocks_per_seq + 1 if gpu is not None else 0)
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens of %s KV (%.2f GiB per device%s, from %s); max concurrency "
        "at max_model_len=%d: %.2fx", num_blocks, args.block_size, (num_blocks - 1) * args.block_size, kv_dtype,
        num_blocks * block_bytes / GIB, f", each block split over {kv_shards} devices" if kv_shards > 1 else "",
        source, max_model_len, (num_blocks - 1) / blocks_per_seq)
    return spec


def num_swap_blocks(model_config, args, kv_dtype: str) -> int:
    """Host blocks that --swap-space GiB holds (0: preemption recomputes)."""
    return int(args.swap_space * GIB) // bytes_per_block(model_config, args.block_size, kv_dtype)


def allocate(spec: KVPoolSpec, sharding: jax.sharding.Sharding) -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed pool placed by `sharding` (a device's, or split by KV heads over a mesh): one
    (k_pages, v_pages) per layer. On CPU, backed by transparent huge pages where the kernel allows it.
    Its arrays have spec.num_blocks blocks, or fewer (at least spec.min_blocks, with a warning)
    when the device runs out of memory part-way: read the count from `pool[0][0].shape[0]`.

    On one Linux CPU device with the C++ kernels, XLA allocates each array without writing it
    (`pallas_kernels.cpu.uninitialized`) and `zero_pages` has the OS kernel map zero pages on
    first touch: writing the default 4 GiB of zeros took ~3 s of start-up on a 2-core VM."""
    devices = sharding.device_set
    lazy = (len(devices) == 1 and next(iter(devices)).platform == "cpu" and sys.platform.startswith("linux")
            and cpu_kernels.is_available())
    new_array = cpu_kernels.uninitialized if lazy else jnp.zeros
    num_arrays = 2 * spec.num_layers
    while True:
        make = jax.jit(lambda: new_array(spec.page_shape, spec.dtype), out_shardings=sharding)
        # One array at a time, each advised before the next is made: zeroing with XLA touches every
        # page, so advising the whole pool at the end would take all of it into memory first.
        arrays, huge = [], 0
        try:
            for _ in range(num_arrays):
                arrays.append(jax.block_until_ready(make()))
                huge += sum((zero_pages if lazy else advise_huge_pages)(shard.data)
                            for shard in arrays[-1].addressable_shards if shard.device.platform == "cpu")
            break
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            made, state = len(arrays), _allocator_state(devices)  # the state at the failure
            arrays.clear()  # give the memory back before trying again
            fewer = int(spec.num_blocks * made / num_arrays * 0.98)
            reason = (f"the device ran out of memory after {made} of the KV cache's {num_arrays} arrays of "
                      f"{spec.num_blocks} blocks ({str(error).splitlines()[0][:200]}{state})")
            if spec.min_blocks == 0 or fewer < spec.min_blocks:
                raise ValueError(f"Out of device memory for the KV cache: {reason}. Lower --num-gpu-blocks-override, "
                                 f"--kv-cache-memory or --gpu-memory-utilization, or --max-model-len.") from None
            logger.warning("KV cache: %s; trying %d blocks instead.", reason, fewer)
            spec = dataclasses.replace(spec, num_blocks=fewer)
    pool = list(zip(arrays[0::2], arrays[1::2]))
    if huge:
        logger.info("KV cache: %.2f GiB advised onto transparent huge pages", huge / GIB)
    return pool


def _allocator_state(devices) -> str:
    """'; allocator: X GiB in use of Y, largest free block Z GiB' for the first device whose
    `memory_stats()` reports them (XLA's GPU allocator does), else ''."""
    for device in devices:
        stats = device.memory_stats() or {}
        if {"bytes_in_use", "bytes_limit", "largest_free_block_bytes"} <= stats.keys():
            return (f"; allocator: {stats['bytes_in_use'] / GIB:.2f} GiB in use of {stats['bytes_limit'] / GIB:.2f}, "
                    f"largest free block {stats['largest_free_block_bytes'] / GIB:.2f} GiB")
    return ""


_HUGE_PAGE = 2 << 20
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def _madvise(begin: int, end: int, advice: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(begin, end - begin, advice) == 0


def _page_range(address: int, nbytes: int) -> tuple[int, int]:
    """The whole 4 KiB pages [begin, end) of [address, address + nbytes) (empty: end <= begin)."""
    return -(-address // _PAGE) * _PAGE, (address + nbytes) // _PAGE * _PAGE


def _huge_range(address: int, nbytes: int) -> tuple[int, int]:
    """The 2 MiB-aligned part [begin, end) of [address, address + nbytes) (empty: end <= begin)."""
    return -(-address // _HUGE_PAGE) * _HUGE_PAGE, (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE


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
    begin, end = _huge_range(zeroed.unsafe_buffer_pointer(), zeroed.nbytes)
    if end <= begin or not _is_anonymous(begin, end) or not _madvise(begin, end, _MADV_HUGEPAGE):
        return 0  # THP disabled
    return end - begin if _madvise(begin, end, _MADV_DONTNEED) else 0


def release_pages(array: jax.Array) -> int:
    """Gives the whole pages of an array's CPU shards back to the OS (Linux, anonymous memory:
    MADV_DONTNEED) before the array is deleted; the allocator may otherwise keep freed memory
    mapped for its next allocations (sleep mode frees the pool and the weights this way).
    Returns the bytes released."""
    if not sys.platform.startswith("linux"):
        return 0
    released = 0
    for shard in array.addressable_shards:
        if shard.device.platform == "cpu":
            begin, end = _page_range(shard.data.unsafe_buffer_pointer(), shard.data.nbytes)
            if end > begin and _is_anonymous(begin, end) and _madvise(begin, end, _MADV_DONTNEED):
                released += end - begin
    return released


def zero_pages(array: jax.Array) -> int:
    """Zeroes a CPU array (Linux) mostly without writing it: its whole pages are dropped
    (MADV_DONTNEED; anonymous pages come back zero-filled when first touched, as transparent
    huge pages where MADV_HUGEPAGE took) and only the bytes outside them are written. Where the
    pages cannot be dropped (not anonymous memory, madvise refused) every byte is written.
    Returns the bytes advised onto huge pages, as advise_huge_pages."""
    address, nbytes = array.unsafe_buffer_pointer(), array.nbytes
    begin, end = _page_range(address, nbytes)
    if end <= begin or not _is_anonymous(begin, end) or not _madvise(begin, end, _MADV_DONTNEED):
        ctypes.memset(address, 0, nbytes)
        return 0
    ctypes.memset(address, 0, begin - address)
    ctypes.memset(end, 0, address + nbytes - end)
    huge_begin, huge_end = _huge_range(address, nbytes)
    # Advised after the drop: nothing is mapped there until the pool is first written.
    return huge_end - huge_begin if huge_end > huge_begin and _madvise(huge_begin, huge_end, _MADV_HUGEPAGE) else 0


def page_ranges(pool: list[tuple[jax.Array, jax.Array]]) -> list[tuple[int, int]]:
    """The whole pages [begin, end) of a pool's CPU arrays, for `populate` (which may then run on
    another thread while steps donate the arrays: the runner's steps update them in place)."""
    ranges = []
    for array in (a for pair in pool for a in pair):
        for shard in array.addressable_shards:
            if shard.device.platform == "cpu":
                begin, end = _page_range(shard.data.unsafe_buffer_pointer(), shard.data.nbytes)
                if end > begin:
                    ranges.append((begin, end))
    return ranges


def populate(ranges: list[tuple[int, int]]) -> int:
    """Faults in the pages of a CPU pool's `page_ranges` now (MADV_POPULATE_WRITE: the OS kernel
    maps zeroed pages, huge where advised; contents never change, so steps may run meanwhile). A
    lazily zeroed pool otherwise takes its pages on first write, inside engine steps: with prefix
    caching on, freed blocks keep their hashes and allocation walks every untouched block first,
    so the first ~90k tokens of a 4 GiB pool pay page faults (docs/performance.md). Returns the
    bytes populated; 0 where the kernel refuses (before Linux 5.14) or not on Linux."""
    if not sys.platform.startswith("linux"):
        return 0
    return sum(end - begin for begin, end in ranges if _madvise(begin, end, _MADV_POPULATE_WRITE))


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
