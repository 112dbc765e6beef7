"""Pure-JAX references: the oracle for every kernel and the fallback everywhere.

Paged attention (`ragged_paged_attention`, `write_kv`), the matmul over packed weight panels
(`pack_panels`, `packed_matmul`), described below in that order, the greedy token of an lm_head
(`pack_greedy_lm_head`, `greedy_lm_head`), the sampler's draw (`sample_tokens`, with the
masks it applies) and its logprobs (`logprob_outputs`).

KV pool layout, per layer, for K and V alike (chosen so one (block, kv head) tile is contiguous,
which is what the GPU and CPU kernels read):

    k_pages, v_pages: [num_blocks, num_kv_heads, block_size, head_dim]

Block 0 is the null block: padded tokens write there and padded block-table entries point there,
so its contents are garbage and are never read unmasked.

A step's queries are packed over sequences ("ragged"): sequence s owns query rows
cu_q_lens[s]:cu_q_lens[s+1]; they are its last q_len tokens, at positions
kv_lens[s] - q_len .. kv_lens[s] - 1, and each attends causally to positions <= its own.
Padded sequences have q_len 0 and kv_len 0; padded query rows (>= cu_q_lens[-1]) return zeros.

Quantized KV (optional): pages of dtype int8 or float8_e4m3fn hold K / k_scale and V / v_scale
(int8 rounded and clipped to +-127), with k_scale, v_scale f32 scalars or f32[num_kv_heads]
(static per layer and head, as vLLM's k_scale/v_scale); `write_kv` quantizes and attention
dequantizes when the scales are passed.

Packed weight panels: a weight w f32[K, N] (x @ w) is stored as panels f32[P, K, PANEL_WIDTH],
P = ceil(N / PANEL_WIDTH), panel p holding columns p * PANEL_WIDTH onward, the last one padded
with zero columns. Each panel is contiguous, which is what the CPU matmul kernel streams. A
bfloat16 weight (K even) is stored as bf16[P, K / 2, PANEL_WIDTH, 2]: the same panels with rows
k and k + 1 interleaved, so that a column's two weights are adjacent (one 32-bit lane, the
operand of AVX512-BF16's pairwise dot product).

Quantized panels (`pack_q4_panels`, `pack_q8_panels`) hold GGUF-style block weights for float32
x: values in the same panel order plus, per 32-row block (QUANT_BLOCK) of each column, a
float32 scale (and for 4-bit weights an offset), padded columns all zero:
  q4: values u8[P, K / 2, PANEL_WIDTH] (rows k, k + 1 of a column in the low, high nibble of one
      byte), scale and offset f32[P, K / 32, PANEL_WIDTH]: w = nibble * scale + offset;
  q8: values i8[P, K, PANEL_WIDTH], scale f32[P, K / 32, PANEL_WIDTH]: w = value * scale.
"""

import jax
import jax.numpy as jnp

PANEL_WIDTH = 48  # weight columns per packed panel
QUANT_BLOCK = 32  # rows of a column that share one scale (and offset) in quantized panels
_ROWS_PER_STEP = 64  # query tokens gathered per lax.map step: bounds the [n, context] temporaries


def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int):
    """Shape of one layer's K (or V) pages."""
    return (num_blocks, num_kv_heads, block_size, head_dim)


def kv_scales(scale, num_kv_heads: int):
    """f32[num_kv_heads] from a scalar or per-head scale; None stays None."""
    if scale is None:
        return None
    return jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (num_kv_heads,))


def quantize_kv(x, scale, dtype):
    """x [..., num_kv_heads, head_dim] / scale (f32[num_kv_heads] or None) stored as `dtype`."""
    if scale is None:
        return x.astype(dtype)
    x = x.astype(jnp.float32) / scale[:, None]
    if jnp.issubdtype(dtype, jnp.integer):
        limit = jnp.iinfo(dtype).max
        return jnp.clip(jnp.round(x), -limit, limit).astype(dtype)
    limit = float(jnp.finfo(dtype).max)
    return jnp.clip(x, -limit, limit).astype(dtype)


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, k_scale=None, v_scale=None):
    """Writes new keys/values into their slots.

    Args:
      k_pages, v_pages: [num_blocks, num_kv_heads, block_size, head_dim] (donate them).
      k, v: [num_tokens, num_kv_heads, head_dim], cast to the pages' dtype.
      slot_mapping: i32[num_tokens]; slot = block_id * block_size + offset. Padded tokens use a
        slot in the null block 0.
      k_scale, v_scale: None, or f32 scalar / f32[num_kv_heads] for int8 / fp8 pages: the pages
        get K / k_scale and V / v_scale (see the module docstring).
    Returns:
      (k_pages, v_pages) updated.
    """
    num_kv_heads, block_size = k_pages.shape[1], k_pages.shape[2]
    block_ids = slot_mapping // block_size
    offsets = slot_mapping % block_size
    k = quantize_kv(k, kv_scales(k_scale, num_kv_heads), k_pages.dtype)
    v = quantize_kv(v, kv_scales(v_scale, num_kv_heads), v_pages.dtype)
    # Advanced indices split by a slice put the token axis first: the target is [T, KVH, D].
    k_pages = k_pages.at[block_ids, :, offsets, :].set(k)
    v_pages = v_pages.at[block_ids, :, offsets, :].set(v)
    return k_pages, v_pages


def default_query_tile(num_tokens: int, num_seqs: int) -> int:
    """Query tokens per work item: the largest power of two <= num_tokens // num_seqs, in 1..128.

    Decode buckets (num_tokens == num_seqs) get 1, so no row is wasted; prefill-heavy buckets get
    long tiles, so a sequence's pages are gathered once per tile instead of once per token.
    """
    per_seq = max(1, num_tokens // max(num_seqs, 1))
    return min(128, 1 << (per_seq.bit_length() - 1))


def ragged_paged_attention(
    q,  # [num_tokens, num_q_heads, head_dim]
    k_pages,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_pages,  # [num_blocks, num_kv_heads, block_size, head_dim]
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
    """Attention of packed queries over paged K/V. Returns [num_tokens, num_q_heads, head_dim] in q.dtype.

    GQA: query head h reads KV head h // (num_q_heads // num_kv_heads). Softmax in float32.
    With `sliding_window` w a query at position p sees keys at positions > p - w.
    With `soft_cap` c the scores become c * tanh(scores / c).
    Each sequence's queries are cut into work items of `query_tile` tokens (None:
    `default_query_tile`); an item gathers its sequence's pages once. Items are processed
    `_ROWS_PER_STEP // query_tile` at a time, so a long prefill never materializes
    [num_tokens, context] scores. k_scale, v_scale: None, or f32 scalar / f32[num_kv_heads]
    to dequantize int8 / fp8 pages (see the module docstring).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_q_heads // num_kv_heads
    tile = default_query_tile(num_tokens, num_seqs) if query_tile is None else query_tile
    k_scale, v_scale = kv_scales(k_scale, num_kv_heads), kv_scales(v_scale, num_kv_heads)

    # Work items: sequence s owns items item_start[s] .. item_end[s] - 1. Each item holds at
    # least one token, so there are at most min(num_tokens, num_seqs + cdiv(num_tokens, tile)).
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # i32[num_seqs]
    items_per_seq = -(-q_lens // tile)
    item_end = jnp.cumsum(items_per_seq).astype(jnp.int32)
    item_start = item_end - items_per_seq
    max_items = min(num_tokens, num_seqs + -(-num_tokens // tile))
    # Never pad past max_items: a small decode bucket would otherwise gather 64 contexts.
    items_per_step = max(1, min(_ROWS_PER_STEP // tile, max_items))
    num_items = -(-max_items // items_per_step) * items_per_step
    item = jnp.arange(num_items, dtype=jnp.int32)
    item_seq = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), num_seqs - 1)
    chunk_start = (item - item_start[item_seq]) * tile  # i32[num_items]: offset in its sequence
    num_q = jnp.where(item < item_end[-1], jnp.clip(q_lens[item_seq] - chunk_start, 0, tile), 0)
    offsets = jnp.arange(tile, dtype=jnp.int32)
    token_ok = offsets < num_q[:, None]  # bool[num_items, tile]
    tokens = cu_q_lens[item_seq][:, None] + chunk_start[:, None] + offsets
    q_pos = (kv_lens[item_seq] - q_lens[item_seq] + chunk_start)[:, None] + offsets
    q_items = q[jnp.minimum(tokens, num_tokens - 1)]  # [num_items, tile, num_q_heads, head_dim]
    q_items = q_items.reshape(num_items, tile, num_kv_heads, group, head_dim)
    kv_pos = jnp.arange(pages_per_seq * block_size, dtype=jnp.int32).reshape(pages_per_seq, block_size)

    def attend(args):
        q_s, seq_s, pos_s, ok_s = args  # [n, tile, KVH, G, D], [n], [n, tile], [n, tile]
        n = seq_s.shape[0]
        context = pages_per_seq * block_size
        pages = block_tables[seq_s]  # [n, W]
        # [n, W, KVH, BS, D] -> [n, KVH, W * BS, D]
        k = k_pages[pages].transpose(0, 2, 1, 3, 4).reshape(n, num_kv_heads, context, head_dim)
        v = v_pages[pages].transpose(0, 2, 1, 3, 4).reshape(n, num_kv_heads, context, head_dim)
        if k_scale is not None:
            k = k.astype(q.dtype)  # exact for int8 / fp8 pages; k_scale is applied to the scores
        in_context = kv_pos.reshape(1, context) < kv_lens[seq_s][:, None]  # [n, L]
        # Zero V past the context so garbage (even NaN) in unused slots cannot leak through 0 * NaN;
        # K needs no zeroing because its scores are replaced below.
        v = jnp.where(in_context[:, None, :, None], v, jnp.zeros((), v.dtype))
        q_s = q_s.transpose(0, 2, 3, 1, 4).reshape(n, num_kv_heads, group * tile, head_dim)
        scores = jnp.einsum("nkrd,nkld->nkrl", q_s, k, preferred_element_type=jnp.float32)
        scores = scores * sm_scale
        if k_scale is not None:
            scores = scores * k_scale[None, :, None, None]
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        key_pos, query_pos = kv_pos.reshape(1, 1, context), pos_s[:, :, None]  # [1,1,L], [n,tile,1]
        visible = in_context[:, None] & (key_pos <= query_pos) & ok_s[:, :, None]  # [n, tile, L]
        if sliding_window is not None:
            visible = visible & (key_pos > query_pos - sliding_window)
        visible = jnp.tile(visible, (1, group, 1))[:, None]  # [n, 1, G * tile, L], rows g-major
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jnp.where(visible, jnp.exp(scores - scores.max(axis=-1, keepdims=True)), 0.0)
        denom = probs.sum(axis=-1, keepdims=True)  # [n, KVH, G * tile, 1]; 0 for rows that see nothing
        out = jnp.einsum("nkrl,nkld->nkrd", probs, v.astype(jnp.float32))
        out = out / jnp.where(denom > 0.0, denom, 1.0)
        if v_scale is not None:
            out = out * v_scale[None, :, None, None]
        out = out.reshape(n, num_kv_heads, group, tile, head_dim).transpose(0, 3, 1, 2, 4)
        return out.astype(q.dtype)  # [n, tile, KVH, G, D]

    steps = num_items // items_per_step
    out = jax.lax.map(
        attend,
        (
            q_items.reshape(steps, items_per_step, tile, num_kv_heads, group, head_dim),
            item_seq.reshape(steps, items_per_step),
            q_pos.reshape(steps, items_per_step, tile),
            token_ok.reshape(steps, items_per_step, tile),
        ),
    ).reshape(num_items, tile, num_q_heads, head_dim)

    # Back to packed token order; padded rows (>= cu_q_lens[-1]) are zeros.
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    token_seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), num_seqs - 1)
    offset = token - cu_q_lens[token_seq]
    out = out[item_start[token_seq] + offset // tile, offset % tile]
    return jnp.where((token < cu_q_lens[num_seqs])[:, None, None], out, jnp.zeros((), q.dtype))


def pack_panels(w):
    """Panels of a weight w [K, N] (see the module docstring): f32[ceil(N / PANEL_WIDTH), K,
    PANEL_WIDTH] for a float32 w, bf16[ceil(N / PANEL_WIDTH), K / 2, PANEL_WIDTH, 2] for a
    bfloat16 w with K even. Any other dtype is packed as float32."""
    k, n = w.shape
    num_panels = -(-n // PANEL_WIDTH)
    dtype = jnp.bfloat16 if w.dtype == jnp.bfloat16 else jnp.float32
    w = jnp.pad(jnp.asarray(w, dtype), ((0, 0), (0, num_panels * PANEL_WIDTH - n)))
    if dtype == jnp.float32:
        return w.reshape(k, num_panels, PANEL_WIDTH).transpose(1, 0, 2)
    if k % 2:
        raise ValueError(f"bfloat16 panels pair the rows of w; w has an odd number of rows ({k})")
    return w.reshape(k // 2, 2, num_panels, PANEL_WIDTH).transpose(2, 0, 3, 1)


def _column_panels(a):
    """a [R, N] as [P, R, PANEL_WIDTH], padded with zero columns."""
    rows, n = a.shape
    num_panels = -(-n // PANEL_WIDTH)
    a = jnp.pad(jnp.asarray(a), ((0, 0), (0, num_panels * PANEL_WIDTH - n)))
    return a.reshape(rows, num_panels, PANEL_WIDTH).transpose(1, 0, 2)


def _check_blocks(values, scale, offset=None):
    k, n = values.shape
    if k % QUANT_BLOCK or scale.shape != (k // QUANT_BLOCK, n) or offset is not None and offset.shape != scale.shape:
        raise ValueError(f"quantized panels need values [K, N] with K a multiple of {QUANT_BLOCK} and scales "
                         f"[K / {QUANT_BLOCK}, N]; got values {values.shape}, scale {scale.shape}"
                         + ("" if offset is None else f", offset {offset.shape}"))


def pack_q4_panels(nibbles, scale, offset):
    """q4 panels (values, scale, offset) of w = nibbles * scale + offset, for nibbles u8[K, N]
    (values 0..15) and scale, offset f32[K / 32, N], one per 32-row block of a column."""
    _check_blocks(nibbles, scale, offset)
    paired = _column_panels(jnp.asarray(nibbles, jnp.uint8))  # [P, K, 48]
    values = paired[:, 0::2] | (paired[:, 1::2] << 4)
    return values, _column_panels(jnp.asarray(scale, jnp.float32)), _column_panels(jnp.asarray(offset, jnp.float32))


def pack_q8_panels(values, scale):
    """q8 panels (values, scale) of w = values * scale, for values i8[K, N] and scale f32[K / 32, N]."""
    _check_blocks(values, scale)
    return _column_panels(jnp.asarray(values, jnp.int8)), _column_panels(jnp.asarray(scale, jnp.float32))


GREEDY_TILE = 16  # vocabulary entries side by side in `pack_greedy_lm_head`'s values


def pack_greedy_lm_head(lm_head, lm_head_scale=None):
    """The approximate-pass operands of `greedy_lm_head` for an lm_head w [V, K] (K a multiple of
    32): Q8_0 rows, lm_head i8[V, K] times lm_head_scale (f16 or f32 [V, K / 32], one per 32-block
    of a row), or float32 rows (lm_head_scale None), rounded here to int8 blocks q * d (d = the
    block's largest |w| / 127). Returns (values u8[T, K / 4, 16, 4] = q + 128 with 16 entries side
    by side and each entry's 4 consecutive k adjacent, scale f32[T, K / 32, 16] = d, bound
    f32[T, K / 32, 16] = |d| * sum of the block's |q| / 2, error: None for Q8_0 rows, else
    f32[T, K / 32, 16], an upper bound on the block's |w - q * d|), T = ceil(V / 16), padded
    entries all zero (value 128)."""
    vocab, k = lm_head.shape
    if k % QUANT_BLOCK or lm_head_scale is not None and lm_head_scale.shape != (vocab, k // QUANT_BLOCK):
        raise ValueError(f"pack_greedy_lm_head needs lm_head [V, K] with K a multiple of {QUANT_BLOCK} (and "
                         f"lm_head_scale [V, K / {QUANT_BLOCK}]); got lm_head {lm_head.shape}, lm_head_scale "
                         f"{None if lm_head_scale is None else lm_head_scale.shape}")
    if lm_head_scale is None:
        w = jnp.asarray(lm_head, jnp.float32).reshape(vocab, -1, QUANT_BLOCK)
        largest = jnp.abs(w).max(-1)
        scale = largest / 127
        q = jnp.where(scale[..., None] > 0, jnp.round(w / jnp.where(scale > 0, scale, 1)[..., None]), 0)
        q = jnp.clip(q, -127, 127).astype(jnp.int32)
        # The rounding error, made an upper bound for the float32 arithmetic that measured it.
        error = jnp.abs(w - q * scale[..., None]).max(-1) + largest * 2.0**-20
        q = q.reshape(vocab, k)
    else:
        q = jnp.asarray(lm_head, jnp.int32)
        scale = jnp.asarray(lm_head_scale, jnp.float32)
        error = None
    bound = jnp.abs(scale) * jnp.abs(q).reshape(vocab, -1, QUANT_BLOCK).sum(-1).astype(jnp.float32) / 2
    tiles = -(-vocab // GREEDY_TILE)
    pad = ((0, tiles * GREEDY_TILE - vocab), (0, 0))
    biased = (jnp.pad(q, pad) + 128).astype(jnp.uint8).reshape(tiles, GREEDY_TILE, k // 4, 4).transpose(0, 2, 1, 3)

    def by_tile(a):  # [V, K / 32] -> [T, K / 32, 16]
        return jnp.pad(a, pad).reshape(tiles, GREEDY_TILE, -1).transpose(0, 2, 1)

    return biased, by_tile(scale), by_tile(bound), None if error is None else by_tile(error)


def greedy_lm_head(hidden, num_rows, values, scale, bound, error, lm_head, lm_head_scale=None):
    """Each row's greedy token: (ids i32[M], logits f32[M]), the argmax of hidden f32[M, K] @ w.T
    (the first index on ties) and its logit, for w [V, K] = lm_head i8[V, K] * lm_head_scale (f16
    or f32 [V, K / 32], one per 32-block), or lm_head f32[V, K] (lm_head_scale None). values,
    scale, bound, error: `pack_greedy_lm_head(lm_head, lm_head_scale)`, which the kernels use to
    skip entries that cannot win; this reference computes every logit. Rows from num_rows (an
    int32 scalar) on are zeros."""
    del values, scale, bound, error
    w = lm_head.astype(jnp.float32)
    if lm_head_scale is not None:
        w = w * jnp.repeat(lm_head_scale.astype(jnp.float32), QUANT_BLOCK, axis=1)
    logits = jnp.dot(hidden, w.T, preferred_element_type=jnp.float32)
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    best = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
    real = jnp.arange(hidden.shape[0]) < num_rows
    return jnp.where(real, ids, 0), jnp.where(real, best, 0.0)


def unpack_panels(panels, out_features: int, scale=None, offset=None):
    """The weight [K, out_features] that `pack_panels` (panels alone), `pack_q4_panels` (u8
    panels, scale, offset) or `pack_q8_panels` (i8 panels, scale) packed; quantized ones come
    back dequantized to float32."""
    if scale is not None:
        if panels.dtype == jnp.uint8:
            values = jnp.stack([panels & 0xF, panels >> 4], axis=2).reshape(panels.shape[0], -1, PANEL_WIDTH)
        else:
            values = panels
        block = lambda a: jnp.repeat(a, QUANT_BLOCK, axis=1)  # noqa: E731  [P, K, 48]
        panels = values.astype(jnp.float32) * block(scale)
        if offset is not None:
            panels = panels + block(offset)
        return unpack_panels(panels, out_features)
    if panels.ndim == 3:
        num_panels, k, width = panels.shape
        w = panels.transpose(1, 0, 2).reshape(k, num_panels * width)
    else:
        num_panels, pairs, width, _ = panels.shape
        w = panels.transpose(1, 3, 0, 2).reshape(2 * pairs, num_panels * width)
    return w[:, :out_features]


def packed_matmul(x, panels, out_features: int, num_rows=None, *, scale=None, offset=None, vector_rows=None):
    """x [M, K] @ w, for w [K, out_features] given as `pack_panels(w)` (x and w both float32 or
    both bfloat16), or for float32 x as q4 (panels, scale, offset) or q8 (panels, scale) panels.
    Returns f32[M, out_features], accumulated in float32; rows from `num_rows` (an int32 scalar;
    None means M) on are zeros. vector_rows only chooses the CPU kernel's path for the rows
    after it, never the math: it is ignored here."""
    del vector_rows
    w = unpack_panels(panels, out_features, scale, offset)
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if num_rows is None:
        return y
    return jnp.where(jnp.arange(x.shape[0])[:, None] < num_rows, y, 0.0)


def _largest_threshold(logits, holds, low, high, iterations: int = 32):
    """Per row, bisects for the largest t in [low, high] with holds(t) (holds(low) must be true)."""

    def body(_, bounds):
        low, high = bounds
        mid = (low + high) / 2
        ok = holds(mid[:, None])
        return jnp.where(ok, mid, low), jnp.where(ok, high, mid)

    low, _ = jax.lax.fori_loop(0, iterations, body, (low, high))
    return low[:, None]


def apply_top_k_top_p(logits, top_k, top_p):
    """Masks tokens outside each row's top_k (0: off) and top_p nucleus. f32[S, V] -> f32[S, V].

    Thresholds are found by bisection over logit values (a full sort of the vocabulary is far
    slower on CPU): top_k keeps the logits >= the largest t with at least k logits >= t; top_p
    then keeps the smallest head whose probability mass reaches top_p. Ties at a threshold are kept.
    """
    vocab = logits.shape[1]
    finite = jnp.isfinite(logits)
    low = jnp.min(jnp.where(finite, logits, jnp.inf), axis=-1)
    high = jnp.max(logits, axis=-1) + 1.0
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    k_threshold = _largest_threshold(logits, lambda t: (logits >= t).sum(axis=-1) >= k[:, 0], low, high)
    logits = jnp.where(logits >= k_threshold, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    p_threshold = _largest_threshold(
        logits, lambda t: jnp.where(logits >= t, probs, 0.0).sum(axis=-1) >= top_p, low, high)
    return jnp.where(logits >= p_threshold, logits, -jnp.inf)


def apply_min_p(logits, min_p):
    """Masks the tokens whose probability is below min_p f32[S] times their row's largest, that
    is whose logit is below the largest + log(min_p) (no softmax: XLA:CPU evaluated that one's
    exps again inside the reductions, 10x a softmax's time). f32[S, V]."""
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(jnp.maximum(min_p, 0.0))[:, None]
    return jnp.where((min_p[:, None] <= 0.0) | (logits >= floor), logits, -jnp.inf)


def processed_logits(logits, temperature, top_k, top_p, min_p, top_k_top_p=apply_top_k_top_p):
    """What a sampled row draws from: logits f32[S, V] divided by temperature f32[S], then the
    min_p (f32[S]) and top_k (i32[S], 0: off) / top_p (f32[S], 1: off) masks (-inf outside; the
    latter by `top_k_top_p`, apply_top_k_top_p or a kernel of its signature). Rows with
    temperature <= 0 come back unchanged."""
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    masked = apply_min_p(scaled, min_p)
    restricts = jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0)))
    masked = jax.lax.cond(restricts, lambda x: top_k_top_p(x, top_k, top_p), lambda x: x, masked)
    return jnp.where(greedy[:, None], logits, masked)


def _mix32(x):
    """murmur3's 32-bit finalizer: a bijective hash with full avalanche. u32 -> u32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def row_uniform(seeds, output_index):
    """f32[S] in (0, 1) hashed from each row's seed and output index (i32[S] each) only, so a
    seeded request draws the same tokens in any batch: 24 bits of a counter-based hash."""
    seeds = jax.lax.bitcast_convert_type(seeds, jnp.uint32)
    index = jax.lax.bitcast_convert_type(output_index, jnp.uint32)
    key = _mix32(seeds ^ _mix32(index * jnp.uint32(0x9E3779B9) + jnp.uint32(0x632BE5AB)))
    return ((_mix32(key) >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))


def sample_tokens(logits, temperature, top_k, top_p, min_p, seeds, output_index):
    """One token per row of logits f32[S, V]: i32[S], drawn from softmax(processed_logits(...)),
    the kept tokens' probabilities laid end to end in token-id order: the first token whose
    cumulative probability passes row_uniform(seeds, output_index). Rows with temperature <= 0
    are not drawn: 0 (the sampler takes their argmax)."""
    vocab = logits.shape[1]
    masked = processed_logits(logits, temperature, top_k, top_p, min_p)
    weights = jnp.exp(masked - jnp.max(masked, axis=-1, keepdims=True))
    cdf = jnp.cumsum(weights, axis=-1)
    target = row_uniform(seeds, output_index) * cdf[:, -1]
    drawn = jnp.sum(cdf <= target[:, None], axis=-1)
    # Where rounding leaves the target past the last sum: the last token that weighs.
    last = jnp.max(jnp.where(weights > 0, jnp.arange(vocab), 0), axis=-1)
    return jnp.where(temperature > 0, jnp.minimum(drawn, last), 0).astype(jnp.int32)


def logprob_outputs(scores, token_ids, wanted, num_top: int, normalize: bool = True):
    """The logprobs a step returns, from scores f32[S, V] (logits, raw or processed):
    (chosen f32[S], ranks i32[S], top f32[S, num_top], top_ids i32[S, num_top]).

    With normalize, each row's values are log_softmax(scores) (NaN throughout for a row with no
    finite score); without, the scores themselves (vLLM's *_logits modes). chosen is the value
    at token_ids i32[S], ranks its 1-based rank (1 + the values strictly above it), top the
    num_top largest values in descending order, ties by lower id. Rows where wanted (bool[S]) is
    false are all zeros."""
    values = jax.nn.log_softmax(scores, axis=-1) if normalize else scores
    chosen = jnp.take_along_axis(values, token_ids[:, None], axis=-1)[:, 0]
    ranks = (values > chosen[:, None]).sum(axis=-1).astype(jnp.int32) + 1
    top, top_ids = jax.lax.top_k(values, num_top)
    keep = wanted.astype(bool)
    return (jnp.where(keep, chosen, 0.0), jnp.where(keep, ranks, 0), jnp.where(keep[:, None], top, 0.0),
            jnp.where(keep[:, None], top_ids, 0).astype(jnp.int32))
