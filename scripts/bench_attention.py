"""Paged-attention speed per layer: the pure-JAX reference vs the C++ CPU kernel (and the Pallas
kernels when jax sees a GPU), against the floor set by the machine's memory bandwidth, measured
in the same run.

    python scripts/bench_attention.py [--quick] [--out docs/kernels_cpu.png] [--kv-dtype int8]

Shapes are SmolLM2-135M's: 9 query heads, 3 KV heads, head_dim 64, block size 16, fp32 KV
(--kv-dtype: bfloat16, or int8 / float8_e4m3fn / float8_e5m2 pages with per-head scales;
--soft-cap C: Gemma 2's C * tanh(score / C) on every score).
Block tables are as wide as the engine buckets them (the batch's longest context in blocks,
rounded up to a power of two). Pools are made as the engine makes them: zeros handed to
transparent huge pages on Linux (`jpaged.kv_pool.advise_huge_pages`; --no-huge-pages keeps
4 KiB pages), then filled in place. Each time is the best of several calls of a jitted function
(this machine is shared, so the best call is the one least disturbed); "floor" is the bytes of
K and V the step must read divided by the read bandwidth, probed just before and after each
row (the best of the two). Prints a Markdown table.
"""

import argparse
import importlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.kv_pool import advise_huge_pages
from pallas_kernels import cpu, reference

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
SM_SCALE = HEAD_DIM**-0.5
DECODE_BATCHES = (1, 8, 32, 64, 128)
DECODE_CONTEXTS = (128, 512, 2048)
PREFILL_TOKENS = 2048
HUGE_PAGES = True  # --no-huge-pages sets False
KV_DTYPE = jnp.dtype(jnp.float32)  # --kv-dtype
KV_SCALE = jnp.asarray([0.03, 0.02, 0.025], jnp.float32)  # per KV head, for int8 / fp8 pages
SOFT_CAP = None  # --soft-cap


def kv_scales():
    """{k_scale, v_scale} keywords for the attention call: empty unless the pages are quantized."""
    return {"k_scale": KV_SCALE, "v_scale": KV_SCALE} if KV_DTYPE.itemsize == 1 else {}


def best_time(fn, *args, budget_s=1.0, min_calls=3, max_calls=400):
    """Best wall time in ms of fn(*args) over repeated calls, after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times, spent = [], 0.0
    while len(times) < min_calls or (spent < budget_s and len(times) < max_calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return min(times) * 1e3


def bandwidth_probe(num_bytes=512 * 2**20):
    """A function giving the best read bandwidth in GB/s, now, over a buffer far larger than the
    caches: every core sums its share with BLAS (sdot), and XLA reduces the buffer; the faster."""
    x = np.ones(num_bytes // 4, np.float32)
    parts = np.array_split(x, os.cpu_count())
    xla_x = jax.device_put(x, jax.devices("cpu")[0])
    xla_sum = jax.jit(lambda a: a.reshape(64, -1).sum(axis=1))
    pool = ThreadPoolExecutor(len(parts))

    def probe():
        numpy_ms = best_time(lambda: list(pool.map(lambda a: np.dot(a, a), parts)), budget_s=0.3,
                             min_calls=5)
        xla_ms = best_time(xla_sum, xla_x, budget_s=0.3, min_calls=5)
        return num_bytes / min(numpy_ms, xla_ms) / 1e6

    return probe


def make_inputs(q_lens, kv_lens, seed=0):
    """Packed queries and a KV pool holding exactly these sequences, with permuted blocks."""
    rng = np.random.default_rng(seed)
    pages = [-(-n // BLOCK_SIZE) for n in kv_lens]
    width = 1 << (max(pages) - 1).bit_length()
    num_blocks = sum(pages) + 1
    shape = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    k_pages = rng.standard_normal(shape, np.float32)
    v_pages = rng.standard_normal(shape, np.float32)
    block_tables = np.zeros((len(kv_lens), width), np.int32)
    order = iter(1 + rng.permutation(num_blocks - 1))
    for s, n in enumerate(pages):
        block_tables[s, :n] = [next(order) for _ in range(n)]
    q = rng.standard_normal((sum(q_lens), NUM_Q_HEADS, HEAD_DIM), np.float32)
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    k_pages, v_pages = engine_pool(to_kv_dtype(k_pages)), engine_pool(to_kv_dtype(v_pages))
    arrays = (q, np.asarray(kv_lens, np.int32), block_tables, cu_q_lens)
    q, kv_lens, block_tables, cu_q_lens = (jax.device_put(a, jax.devices("cpu")[0]) for a in arrays)
    return q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens


def to_kv_dtype(pages):
    """fp32 pages [NB, KVH, BS, D] as KV_DTYPE (quantized with KV_SCALE when 1 byte wide)."""
    scale = kv_scales().get("k_scale")
    return np.asarray(reference.quantize_kv(jnp.asarray(pages).transpose(0, 2, 1, 3), scale, KV_DTYPE)
                      .transpose(0, 2, 1, 3))


def engine_pool(contents):
    """A pool array made as the engine makes it: zeros (handed to huge pages unless
    --no-huge-pages), then filled in place by a donated update."""
    zeros = jax.block_until_ready(jax.jit(lambda: jnp.zeros(contents.shape, contents.dtype))())
    if HUGE_PAGES:
        advise_huge_pages(zeros)
    return jax.jit(lambda pages, x: pages.at[...].set(x), donate_argnums=0)(zeros, contents)


def kv_bytes(kv_lens):
    return sum(kv_lens) * NUM_KV_HEADS * HEAD_DIM * KV_DTYPE.itemsize * 2


def attention_flops(q_lens, kv_lens):
    """2 matmuls x 2 flops per multiply-add over every visible (query, key) pair."""
    pairs = sum(q * k - q * (q - 1) // 2 for q, k in zip(q_lens, kv_lens))
    return 4 * pairs * NUM_Q_HEADS * HEAD_DIM


def backends(with_reference):
    """(name, attention function, runs on the GPU) for every implementation to time."""
    found = []
    if with_reference:
        found.append(("reference", reference.ragged_paged_attention, False))
    if cpu.is_available():
        found.append(("cpu", cpu.ragged_paged_attention, False))
    else:
        print(f"cpu kernel unavailable: {cpu.load_error()}")
    if any(d.platform == "gpu" for d in jax.devices()):
        ragged = importlib.import_module("pallas_kernels.ragged_paged_attention")
        found.append(("pallas", ragged.ragged_paged_attention, True))
        decode = importlib.import_module("pallas_kernels.decode_attention")
        found.append(("pallas decode", decode.decode_attention, True))
    return found


def time_case(q_lens, kv_lens, fns, num_pools=1):
    """ms per call for each backend on one batch. With num_pools > 1 the calls go round that
    many pools (as an engine's layers do), so what one call leaves in the caches does not help
    the next: the best per-call time of several rounds."""
    pools = [make_inputs(q_lens, kv_lens, seed=i) for i in range(num_pools)]
    times = {}
    for name, fn, on_gpu in fns:
        if name == "pallas decode" and max(q_lens) > 1:
            continue
        jitted = jax.jit(lambda *a, fn=fn: fn(*a, sm_scale=SM_SCALE, soft_cap=SOFT_CAP, **kv_scales()))
        args = [jax.device_put(p, jax.devices("gpu")[0]) if on_gpu else p for p in pools]
        if num_pools == 1:
            times[name] = best_time(jitted, *args[0])
            continue
        for a in args:
            jax.block_until_ready(jitted(*a))  # compile
        calls = []
        for _ in range(20):
            for a in args:
                start = time.perf_counter()
                jax.block_until_ready(jitted(*a))
                calls.append(time.perf_counter() - start)
        times[name] = min(calls) * 1e3
    return times


def write_kv_ms(batch, context, calls=50):
    """Best time of writing one new token per sequence into the pool, as the model's step does."""
    _, k_pages, v_pages, _, block_tables, _ = make_inputs([1] * batch, [context] * batch)
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((batch, NUM_KV_HEADS, HEAD_DIM), np.float32))
    pos = context - 1
    slot_mapping = block_tables[:, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    write = jax.jit(lambda *a: reference.write_kv(*a, **kv_scales()), donate_argnums=(0, 1))
    k_pages, v_pages = jax.block_until_ready(write(k_pages, v_pages, k, k, slot_mapping))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        k_pages, v_pages = jax.block_until_ready(write(k_pages, v_pages, k, k, slot_mapping))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--out", default=None, help="write a PNG plot of the decode times here")
    parser.add_argument("--no-reference", action="store_true", help="time the kernels only")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="keep the KV pools on 4 KiB pages (the engine uses huge pages on "
                             "Linux)")
    parser.add_argument("--kv-dtype", default="float32",
                        choices=["float32", "bfloat16", "int8", "float8_e4m3fn", "float8_e5m2"],
                        help="KV page dtype (1-byte dtypes with per-head scales)")
    parser.add_argument("--soft-cap", type=float, default=None, help="cap every score at C * tanh(score / C)")
    args = parser.parse_args()
    global HUGE_PAGES, KV_DTYPE, SOFT_CAP
    SOFT_CAP = args.soft_cap
    HUGE_PAGES = not args.no_huge_pages
    KV_DTYPE = jnp.dtype(args.kv_dtype)
    fns = backends(with_reference=not args.no_reference)
    names = [name for name, _, _ in fns]
    probe = bandwidth_probe()
    print(f"{os.cpu_count()} CPU cores; {jax.devices()[0].device_kind}; KV pools on "
          f"{'huge' if HUGE_PAGES else '4 KiB'} pages; {KV_DTYPE.name} KV; soft cap {SOFT_CAP}; load average {os.getloadavg()[0]:.1f}\n")

    cases = [(b, c) for b in DECODE_BATCHES for c in DECODE_CONTEXTS] + [(64, 400)]
    if args.quick:
        cases = [(1, 2048), (64, 400)]
    header = ("| batch x context | KV read | read GB/s | floor | " + " | ".join(names) +
              " | cpu / floor |")
    if "reference" in names and "cpu" in names:
        header += " reference / cpu |"
    print("Decode, ms per layer:\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for batch, context in cases:
        kv_lens = [context] * batch
        # The machine's bandwidth drifts (other tenants): probe it around each row, keep the best.
        bandwidth = probe()
        times = time_case([1] * batch, kv_lens, fns)
        bandwidth = max(bandwidth, probe())
        floor = kv_bytes(kv_lens) / bandwidth / 1e6
        cells = [f"{batch} x {context}", f"{kv_bytes(kv_lens) / 2**20:.1f} MiB", f"{bandwidth:.1f}",
                 f"{floor:.3f}"]
        cells += [f"{times[n]:.3f}" if n in times else "-" for n in names]
        if "cpu" in times:
            cells.append(f"{times['cpu'] / floor:.2f}x")
        if "reference" in times and "cpu" in times:
            cells.append(f"{times['reference'] / times['cpu']:.1f}x")
        print("| " + " | ".join(cells) + " |", flush=True)
        rows.append((batch, context, floor, times))

    cold_pools = 4
    bandwidth = probe()
    times = time_case([1] * 64, [400] * 64, fns, num_pools=cold_pools)
    floor = kv_bytes([400] * 64) / max(bandwidth, probe()) / 1e6
    print(f"\n64 x 400 with {cold_pools} pools called in turn, as an engine's layers are (no pool "
          f"stays in the last-level cache between its calls): floor {floor:.3f} ms; " +
          "; ".join(f"{n} {t:.3f} ms ({t / floor:.2f}x floor)" for n, t in times.items()))

    print(f"\nKV write (reference.write_kv, an XLA scatter, pool donated) of 64 decode tokens into "
          f"the 64 x 400 pool: {write_kv_ms(64, 400):.3f} ms")

    print(f"\nPrefill: one chunk of {PREFILL_TOKENS} new tokens (causal), ms per layer:\n")
    flops = attention_flops([PREFILL_TOKENS], [PREFILL_TOKENS])
    times = time_case([PREFILL_TOKENS], [PREFILL_TOKENS], fns)
    print("| backend | ms | GFLOP/s |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} | {flops / ms / 1e6:.0f} |")

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.out:
        plot(rows, names, args.out)


def plot(rows, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({c for _, c, _, _ in rows if c in DECODE_CONTEXTS})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 4), sharey=True)
    for ax, context in zip(np.atleast_1d(axes), contexts):
        sel = [(b, f, t) for b, c, f, t in rows if c == context]
        batches = [b for b, _, _ in sel]
        ax.plot(batches, [f for _, f, _ in sel], "k--", label="memory floor")
        for name in names:
            ax.plot(batches, [t.get(name, np.nan) for _, _, t in sel], "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel="batch (decode rows)",
               title=f"context {context}")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("ms per layer")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle("Paged decode attention, SmolLM2-135M shapes (9 q / 3 kv heads, d 64, fp32 KV)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
