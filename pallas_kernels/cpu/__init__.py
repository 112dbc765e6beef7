"""C++ kernels for CPUs, registered with XLA through `jax.ffi`: paged attention, a matmul
over packed weight panels, the greedy token of an lm_head, and the sampler's draw, masks and
logprobs.

`ragged_paged_attention` has the signature and results of
`pallas_kernels.reference.ragged_paged_attention` and works inside `jit` (also with a donated KV
pool); `packed_matmul` those of `pallas_kernels.reference.packed_matmul`; `greedy_lm_head`
those of `pallas_kernels.reference.greedy_lm_head` (where `greedy_lm_head_supported()`);
`sample_tokens`, `apply_top_k_top_p` and `logprob_outputs` those of their namesakes in
`pallas_kernels.reference`.
The library is built on first use when no build for these sources, jaxlib, compiler and CPU
exists yet (see `build.py`); when that fails `is_available()` is False and `load_error()` says
why, so callers can fall back to the reference.
"""

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference

FFI_TARGET = "jpaged_ragged_paged_attention"
WRITE_KV_TARGET = "jpaged_write_kv"
PACKED_MATMUL_TARGET = "jpaged_packed_matmul"
PACKED_MATMUL_BF16_TARGET = "jpaged_packed_matmul_bf16"
PACKED_MATMUL_Q4_TARGET = "jpaged_packed_matmul_q4"
PACKED_MATMUL_Q8_TARGET = "jpaged_packed_matmul_q8"
GREEDY_LM_HEAD_Q8_TARGET = "jpaged_greedy_lm_head_q8"
GREEDY_LM_HEAD_F32_TARGET = "jpaged_greedy_lm_head_f32"
SAMPLE_TOKENS_TARGET = "jpaged_sample_tokens"
TOP_K_TOP_P_TARGET = "jpaged_top_k_top_p_mask"
LOGPROB_OUTPUTS_TARGET = "jpaged_logprob_outputs"
UNINITIALIZED_TARGET = "jpaged_uninitialized"
_Q_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_KV_DTYPES = _Q_DTYPES + (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


_greedy_lm_head_supported = False  # set by _load(): whether this CPU runs greedy_lm_head


@functools.cache
def _load() -> str | None:
    """Builds if needed, loads and registers the kernel once. Returns None or the error."""
    # Imported here, not at the top: `python -m pallas_kernels.cpu.build` imports this package
    # first, and a module already imported when runpy executes it draws a RuntimeWarning.
    from pallas_kernels.cpu import build

    try:
        path = build.build()
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(library.JpagedRaggedPagedAttention),
                                    platform="cpu")
        jax.ffi.register_ffi_target(WRITE_KV_TARGET, jax.ffi.pycapsule(library.JpagedWriteKV), platform="cpu")
        jax.ffi.register_ffi_target(PACKED_MATMUL_TARGET, jax.ffi.pycapsule(library.JpagedPackedMatmul),
                                    platform="cpu")
        jax.ffi.register_ffi_target(PACKED_MATMUL_BF16_TARGET, jax.ffi.pycapsule(library.JpagedPackedMatmulBF16),
                                    platform="cpu")
        jax.ffi.register_ffi_target(PACKED_MATMUL_Q4_TARGET, jax.ffi.pycapsule(library.JpagedPackedMatmulQ4),
                                    platform="cpu")
        jax.ffi.register_ffi_target(PACKED_MATMUL_Q8_TARGET, jax.ffi.pycapsule(library.JpagedPackedMatmulQ8),
                                    platform="cpu")
        jax.ffi.register_ffi_target(GREEDY_LM_HEAD_Q8_TARGET, jax.ffi.pycapsule(library.JpagedGreedyLmHeadQ8),
                                    platform="cpu")
        jax.ffi.register_ffi_target(GREEDY_LM_HEAD_F32_TARGET, jax.ffi.pycapsule(library.JpagedGreedyLmHeadF32),
                                    platform="cpu")
        global _greedy_lm_head_supported
        _greedy_lm_head_supported = bool(library.JpagedGreedyLmHeadSupported())
        jax.ffi.register_ffi_target(SAMPLE_TOKENS_TARGET, jax.ffi.pycapsule(library.JpagedSampleTokens),
                                    platform="cpu")
        jax.ffi.register_ffi_target(TOP_K_TOP_P_TARGET, jax.ffi.pycapsule(library.JpagedTopKTopPMask),
                                    platform="cpu")
        jax.ffi.register_ffi_target(LOGPROB_OUTPUTS_TARGET, jax.ffi.pycapsule(library.JpagedLogprobOutputs),
                                    platform="cpu")
        jax.ffi.register_ffi_target(UNINITIALIZED_TARGET, jax.ffi.pycapsule(library.JpagedUninitialized),
                                    platform="cpu")
    except (build.BuildError, OSError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _require_library(advice: str = "") -> None:
    """RuntimeError with load_error() (and `advice`) when the library is unavailable."""
    error = _load()
    if error is not None:
        raise RuntimeError(f"the CPU kernels are unavailable ({error}){advice}")


def is_available() -> bool:
    """Whether the kernels are built (building them now if needed) and registered."""
    return _load() is None


def greedy_lm_head_supported() -> bool:
    """Whether the kernels are available and this CPU runs `greedy_lm_head` (AVX512-VNNI
    and AVX512-BW, or AVX2 and FMA; and F16C)."""
    return _load() is None and _greedy_lm_head_supported


def load_error() -> str | None:
    """Why the kernel is unavailable (compiler missing, build failure, ...), or None."""
    return _load()


def _validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens):
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim] and k_pages "
                         f"[num_blocks, num_kv_heads, block_size, head_dim]; got q {q.shape}, "
                         f"k_pages {k_pages.shape}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[1]
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages {v_pages.shape} {v_pages.dtype} must match k_pages "
                         f"{k_pages.shape} {k_pages.dtype}")
    if k_pages.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and k_pages ({k_pages.shape[3]}) differ")
    if head_dim % 8 != 0:
        raise ValueError(f"the CPU kernel needs head_dim % 8 == 0, got {head_dim}; "
                         f"use --attention-backend reference")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if jnp.dtype(q.dtype) not in _Q_DTYPES:
        raise ValueError(f"q dtype {q.dtype} unsupported: use float32 or bfloat16")
    if jnp.dtype(k_pages.dtype) not in _KV_DTYPES:
        raise ValueError(f"KV page dtype {k_pages.dtype} unsupported: use one of "
                         f"{', '.join(str(d) for d in _KV_DTYPES)}")
    num_seqs = block_tables.shape[0]
    if block_tables.ndim != 2 or kv_lens.shape != (num_seqs,) or cu_q_lens.shape != (num_seqs + 1,):
        raise ValueError(f"need block_tables [num_seqs, pages_per_seq], kv_lens [num_seqs], "
                         f"cu_q_lens [num_seqs + 1]; got {block_tables.shape}, {kv_lens.shape}, "
                         f"{cu_q_lens.shape}")
    for name, a in (("kv_lens", kv_lens), ("block_tables", block_tables), ("cu_q_lens", cu_q_lens)):
        if jnp.dtype(a.dtype) != jnp.int32:
            raise ValueError(f"{name} must be int32, got {a.dtype}")


def ragged_paged_attention(
    q,  # [num_tokens, num_q_heads, head_dim], f32 or bf16
    k_pages,  # [num_blocks, num_kv_heads, block_size, head_dim], f32 or bf16
    v_pages,  # [num_blocks, num_kv_heads, block_size, head_dim], same as k_pages
    kv_lens,  # i32[num_seqs]: context length including this step's tokens; 0 for padding
    block_tables,  # i32[num_seqs, pages_per_seq]: padded with the null block 0
    cu_q_lens,  # i32[num_seqs + 1]: cumulative query lengths; padding repeats the last value
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    query_tile: int | None = None,
    k_scale=None,
    v_scale=None,
):
    """Attention of packed queries over paged K/V on the CPU. Returns [num_tokens, num_q_heads,
    head_dim] in q.dtype.

    Semantics as `pallas_kernels.reference.ragged_paged_attention`: GQA, causal within each
    sequence's new tokens, optional sliding window and soft cap, fp32 softmax, zeros for padded
    query rows; int8 / float8_e4m3fn / float8_e5m2 pages hold K / k_scale and V / v_scale (k_scale, v_scale:
    f32 scalars or f32[num_kv_heads]; None means 1). `query_tile` is accepted for signature
    compatibility; the kernel picks its own tiles. Raises RuntimeError with `load_error()` when
    the kernel is unavailable.
    """
    del query_tile  # the C++ kernel tiles queries itself
    _validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens)
    _require_library("; use --attention-backend reference")
    num_kv_heads = k_pages.shape[1]
    ones = jnp.ones((num_kv_heads,), jnp.float32)
    k_scale = ones if k_scale is None else reference.kv_scales(k_scale, num_kv_heads)
    v_scale = ones if v_scale is None else reference.kv_scales(v_scale, num_kv_heads)
    call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(
        q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, k_scale, v_scale,
        sm_scale=np.float32(sm_scale),
        sliding_window=np.int32(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
    )


def uninitialized(shape: tuple[int, ...], dtype):
    """An array of `shape` and `dtype` whose memory XLA allocates and nothing writes: its contents
    are whatever that memory held. For a buffer the caller zeroes another way (the engine's KV
    pool: `jpaged.kv_pool.zero_pages`). Works inside `jit`."""
    _require_library()
    return jax.ffi.ffi_call(UNINITIALIZED_TARGET, jax.ShapeDtypeStruct(shape, dtype))()


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, k_scale=None, v_scale=None):
    """`pallas_kernels.reference.write_kv` done in place by the C++ library (donate the pages).

    XLA's CPU scatter widens 2-byte float pages to f32 and back, rewriting the whole pool on
    every call (50 ms per layer for a bf16 pool of 2,561 blocks against 0.04 ms in f32); this
    copies only the new rows. Quantization to int8 / fp8 pages happens in JAX first.
    """
    _require_library("; use --attention-backend reference")
    num_kv_heads = k_pages.shape[1]
    k = reference.quantize_kv(k, reference.kv_scales(k_scale, num_kv_heads), k_pages.dtype)
    v = reference.quantize_kv(v, reference.kv_scales(v_scale, num_kv_heads), v_pages.dtype)
    pages = jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)
    call = jax.ffi.ffi_call(WRITE_KV_TARGET, (pages, pages), input_output_aliases={0: 0, 1: 1})
    return call(k_pages, v_pages, k, v, slot_mapping.astype(jnp.int32))


def packed_matmul(x, panels, out_features: int, num_rows=None, *, scale=None, offset=None, vector_rows=None):
    """x [M, K] @ w, for w [K, out_features] packed by `reference.pack_panels`: x f32 with
    panels f32[ceil(N / 48), K, 48], or x bf16 with panels bf16[ceil(N / 48), K / 2, 48, 2].
    Or x f32 with quantized panels: q4 (`reference.pack_q4_panels`: u8 panels, scale, offset)
    or q8 (`reference.pack_q8_panels`: i8 panels, scale), whose results are bit-identical to
    those of the float32 panels of the dequantized w.
    Returns f32[M, out_features], accumulated in float32. With `num_rows` (an int32 scalar,
    traced or not; None means M), only x's first num_rows rows are multiplied and the rows after
    them are zeros: a step padded to a shape bucket pays for its real rows.

    vector_rows (an int32 scalar, traced or not; None means num_rows): with q4 panels, on a CPU
    with AMX (and Linux granting it), the rows from vector_rows to num_rows are multiplied on
    AMX tiles: x split exactly into three bfloat16, sums of exact products, 1.3-1.5x faster from
    64 rows on, even at 16, slower below (docs/kernels_cpu.md); they are as close to the exact product as the vector path's, but
    rounded differently, so a row's result depends on which side of vector_rows it is (on
    nothing else). Elsewhere, and for the other formats, every row takes the vector path.

    Streams each panel once from memory, in address order, for every M; at decode sizes
    (M <= 64) that is 1.3-1.8x faster than XLA's float32 dot over w [K, N], and more in bfloat16
    (docs/kernels_cpu.md). The order of the additions is fixed, so results are the same for
    every thread count.
    """
    num_rows = jnp.asarray(x.shape[0] if num_rows is None else num_rows, jnp.int32)
    vector_rows = num_rows if vector_rows is None else jnp.asarray(vector_rows, jnp.int32)
    for name, count in (("num_rows", num_rows), ("vector_rows", vector_rows)):
        if count.shape != ():
            raise ValueError(f"packed_matmul's {name} must be a scalar, got shape {count.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], out_features), jnp.float32)
    if scale is not None:
        return _quantized_matmul(x, panels, scale, offset, out, num_rows, vector_rows)
    width = reference.PANEL_WIDTH
    num_panels = -(-out_features // width)
    bf16 = jnp.dtype(panels.dtype) == jnp.bfloat16
    expected = (num_panels, x.shape[-1] // 2, width, 2) if bf16 else (num_panels, x.shape[-1], width)
    if x.ndim != 2 or tuple(panels.shape) != expected or (bf16 and x.shape[1] % 2):
        layout = "[ceil(N / 48), K / 2, 48, 2] with K even" if bf16 else "[ceil(N / 48), K, 48]"
        raise ValueError(f"packed_matmul needs x [M, K] and {panels.dtype} panels {layout} for N = out_features; "
                         f"got x {x.shape}, panels {panels.shape}, out_features {out_features}")
    if jnp.dtype(x.dtype) != jnp.dtype(panels.dtype) or not bf16 and jnp.dtype(x.dtype) != jnp.float32:
        raise ValueError(f"packed_matmul takes float32 or bfloat16 x and panels of the same dtype, "
                         f"got {x.dtype} and {panels.dtype}")
    _require_library()
    target = PACKED_MATMUL_BF16_TARGET if bf16 else PACKED_MATMUL_TARGET
    return jax.ffi.ffi_call(target, out)(x, panels, num_rows)


def _quantized_matmul(x, values, scale, offset, out, num_rows, vector_rows):
    """packed_matmul over q4 (u8 values with an offset) or q8 (i8 values, no offset) panels."""
    width, block = reference.PANEL_WIDTH, reference.QUANT_BLOCK
    q4 = jnp.dtype(values.dtype) == jnp.uint8
    k = x.shape[-1]
    num_panels = -(-out.shape[1] // width)
    blocks = (num_panels, k // block, width)
    if (x.ndim != 2 or k % block or jnp.dtype(x.dtype) != jnp.float32
            or jnp.dtype(values.dtype) not in (jnp.dtype(jnp.uint8), jnp.dtype(jnp.int8))
            or tuple(values.shape) != (num_panels, k // 2 if q4 else k, width)
            or tuple(scale.shape) != blocks or (offset is not None) != q4
            or offset is not None and tuple(offset.shape) != blocks):
        raise ValueError(f"packed_matmul over quantized panels needs float32 x [M, K] (K a multiple of {block}) "
                         f"and q4 (u8 values [ceil(N / 48), K / 2, 48], scale and offset [ceil(N / 48), K / 32, "
                         f"48]) or q8 (i8 values [ceil(N / 48), K, 48], scale) panels for N = out_features; got x "
                         f"{x.dtype}{list(x.shape)}, values {values.dtype}{list(values.shape)}, scale "
                         f"{list(scale.shape)}, offset {None if offset is None else list(offset.shape)}, "
                         f"out_features {out.shape[1]}")
    _require_library()
    if q4:
        return jax.ffi.ffi_call(PACKED_MATMUL_Q4_TARGET, out)(x, values, scale.astype(jnp.float32),
                                                              offset.astype(jnp.float32), num_rows, vector_rows)
    return jax.ffi.ffi_call(PACKED_MATMUL_Q8_TARGET, out)(x, values, scale.astype(jnp.float32), num_rows)


def greedy_lm_head(hidden, num_rows, values, scale, bound, error, lm_head, lm_head_scale=None):
    """`pallas_kernels.reference.greedy_lm_head` on the CPU: (ids i32[M], logits f32[M]), each
    row's greedy token over an lm_head of Q8_0 rows (lm_head i8[V, K], lm_head_scale f16[V, K /
    32]) or float32 rows (lm_head f32[V, K], lm_head_scale None), and its logit, both those of
    `packed_matmul` over the same weights' q8 / float32 panels, bit for bit. values, scale,
    bound, error (None for Q8_0 rows): `reference.pack_greedy_lm_head(lm_head, lm_head_scale)`. Computes an int8
    approximation of every logit with a bound on its error and the exact logit of the few
    entries that can still win (greedy_lm_head.cc). Needs `greedy_lm_head_supported()`.
    """
    m, k = hidden.shape
    vocab = lm_head.shape[0]
    tiles = -(-vocab // reference.GREEDY_TILE)
    blocks = (tiles, k // reference.QUANT_BLOCK, reference.GREEDY_TILE)
    q8 = lm_head_scale is not None
    error_ok = error is None if q8 else error is not None and error.shape == blocks
    rows_ok = error_ok and ((jnp.dtype(lm_head.dtype) == jnp.int8 and jnp.dtype(lm_head_scale.dtype) == jnp.float16
                             and lm_head_scale.shape == (vocab, k // reference.QUANT_BLOCK))
                            if q8 else jnp.dtype(lm_head.dtype) == jnp.float32)
    if (jnp.dtype(hidden.dtype) != jnp.float32 or k % reference.QUANT_BLOCK or lm_head.shape != (vocab, k)
            or not rows_ok or values.shape != (tiles, k // 4, reference.GREEDY_TILE, 4)
            or jnp.dtype(values.dtype) != jnp.uint8 or scale.shape != blocks or bound.shape != blocks):
        raise ValueError(f"greedy_lm_head needs float32 hidden [M, K] (K a multiple of {reference.QUANT_BLOCK}), "
                         f"an lm_head of i8 rows [V, K] with f16 scales [V, K / 32] or of f32 rows [V, K], and its "
                         f"pack_greedy_lm_head operands (error None for i8 rows); got hidden {hidden.dtype}{list(hidden.shape)}, lm_head "
                         f"{lm_head.dtype}{list(lm_head.shape)}, lm_head_scale "
                         f"{None if not q8 else f'{lm_head_scale.dtype}{list(lm_head_scale.shape)}'}, "
                         f"values {values.dtype}{list(values.shape)}, scale {list(scale.shape)}, "
                         f"bound {list(bound.shape)}, error {None if error is None else list(error.shape)}")
    if not greedy_lm_head_supported():
        raise RuntimeError(f"greedy_lm_head needs the CPU kernels ({load_error() or 'built'}) on a CPU with "
                           "AVX512-VNNI and AVX512-BW, or AVX2 and FMA; and F16C")
    out = (jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((m,), jnp.float32))
    operands = (hidden, jnp.asarray(num_rows, jnp.int32), values, scale.astype(jnp.float32),
                bound.astype(jnp.float32))
    if q8:
        return jax.ffi.ffi_call(GREEDY_LM_HEAD_Q8_TARGET, out)(*operands, lm_head, lm_head_scale)
    return jax.ffi.ffi_call(GREEDY_LM_HEAD_F32_TARGET, out)(*operands, error.astype(jnp.float32), lm_head)


def sample_tokens(logits, temperature, top_k, top_p, min_p, seeds, output_index):
    """`pallas_kernels.reference.sample_tokens` on the CPU: i32[S], one token per row of logits
    f32[S, V] drawn from softmax(logits / temperature) under the min_p, top_k and top_p masks, at
    the row's uniform (`reference.row_uniform`); 0 for rows with temperature <= 0. The same
    tokens as the reference except where float rounding moves a draw across the edge between
    two tokens' shares. A few passes over each row instead of the reference's bisections
    (sampling.cc)."""
    num_seqs, vocab = logits.shape
    rows = (temperature, top_k, top_p, min_p, seeds, output_index)
    if jnp.dtype(logits.dtype) != jnp.float32 or any(x.shape != (num_seqs,) for x in rows):
        raise ValueError(f"sample_tokens needs float32 logits [S, V] and temperature, top_k, top_p, min_p, seeds, "
                         f"output_index [S]; got logits {logits.dtype}{list(logits.shape)}, others "
                         f"{[list(x.shape) for x in rows]}")
    _require_library()
    out = jax.ShapeDtypeStruct((num_seqs,), jnp.int32)
    return jax.ffi.ffi_call(SAMPLE_TOKENS_TARGET, out)(
        logits, temperature.astype(jnp.float32), top_k.astype(jnp.int32), top_p.astype(jnp.float32),
        min_p.astype(jnp.float32), seeds.astype(jnp.int32), output_index.astype(jnp.int32))


def apply_top_k_top_p(logits, top_k, top_p):
    """`pallas_kernels.reference.apply_top_k_top_p` on the CPU: logits f32[S, V] with the tokens
    outside each row's top_k (i32[S], 0: off) and top_p (f32[S], 1: off) nucleus set to -inf,
    ties at a threshold kept. The thresholds of `sample_tokens` (sampling.cc) instead of the
    reference's bisections."""
    num_seqs = logits.shape[0]
    if logits.ndim != 2 or jnp.dtype(logits.dtype) != jnp.float32 or top_k.shape != (num_seqs,) \
            or top_p.shape != (num_seqs,):
        raise ValueError(f"apply_top_k_top_p needs float32 logits [S, V], top_k and top_p [S]; got logits "
                         f"{logits.dtype}{list(logits.shape)}, top_k {list(top_k.shape)}, top_p {list(top_p.shape)}")
    _require_library()
    return jax.ffi.ffi_call(TOP_K_TOP_P_TARGET, jax.ShapeDtypeStruct(logits.shape, jnp.float32))(
        logits, top_k.astype(jnp.int32), top_p.astype(jnp.float32))


def logprob_outputs(scores, token_ids, wanted, num_top: int, normalize: bool = True):
    """`pallas_kernels.reference.logprob_outputs` on the CPU: (chosen f32[S], ranks i32[S], top
    f32[S, num_top], top_ids i32[S, num_top]) from scores f32[S, V], token_ids i32[S] and wanted
    bool[S]; rows not wanted are zeros and cost nothing. Three passes over each wanted row (the
    top list, the log-sum-exp, the rank) instead of a sort; the values agree with the reference
    to float rounding of the log-sum-exp, ids and ranks exactly (sampling.cc)."""
    num_seqs, vocab = scores.shape
    if jnp.dtype(scores.dtype) != jnp.float32 or token_ids.shape != (num_seqs,) or wanted.shape != (num_seqs,) \
            or not 0 <= num_top <= vocab:
        raise ValueError(f"logprob_outputs needs float32 scores [S, V], token_ids and wanted [S] and 0 <= num_top <= V; "
                         f"got scores {scores.dtype}{list(scores.shape)}, token_ids {list(token_ids.shape)}, "
                         f"wanted {list(wanted.shape)}, num_top {num_top}")
    _require_library()
    out = (jax.ShapeDtypeStruct((num_seqs,), jnp.float32), jax.ShapeDtypeStruct((num_seqs,), jnp.int32),
           jax.ShapeDtypeStruct((num_seqs, num_top), jnp.float32), jax.ShapeDtypeStruct((num_seqs, num_top), jnp.int32))
    return jax.ffi.ffi_call(LOGPROB_OUTPUTS_TARGET, out)(
        scores, token_ids.astype(jnp.int32), wanted.astype(jnp.int32), normalize=bool(normalize))
