"""Pure-JAX reference paged attention: the oracle for every kernel and the fallback everywhere.

KV pool layout, per layer, for K and V alike (chosen so one (block, kv head) tile is contiguous,
which is what the GPU and CPU kernels read):

    k_pages, v_pages: [num_blocks, num_kv_heads, block_size, head_dim]

Block 0 is the null block: padded tokens write there and padded block-table entries point there,
so its contents are garbage and are never read unmasked.

A step's queries are packed over sequences ("ragged"): sequence s owns query rows
cu_q_lens[s]:cu_q_lens[s+1]; they are its last q_len tokens, at positions
kv_lens[s] - q_len .. kv_lens[s] - 1, and each attends causally to positions <= its own.
Padded sequences have q_len 0 and kv_len 0; padded query rows (>= cu_q_lens[-1]) return zeros.
"""

import jax
import jax.numpy as jnp


def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int):
    """Shape of one layer's K (or V) pages."""
    return (num_blocks, num_kv_heads, block_size, head_dim)


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """Writes new keys/values into their slots.

    Args:
      k_pages, v_pages: [num_blocks, num_kv_heads, block_size, head_dim] (donate them).
      k, v: [num_tokens, num_kv_heads, head_dim], cast to the pages' dtype.
      slot_mapping: i32[num_tokens]; slot = block_id * block_size + offset. Padded tokens use a
        slot in the null block 0.
    Returns:
      (k_pages, v_pages) updated.
    """
    block_size = k_pages.shape[2]
    block_ids = slot_mapping // block_size
    offsets = slot_mapping % block_size
    # Advanced indices split by a slice put the token axis first: the target is [T, KVH, D].
    k_pages = k_pages.at[block_ids, :, offsets, :].set(k.astype(k_pages.dtype))
    v_pages = v_pages.at[block_ids, :, offsets, :].set(v.astype(v_pages.dtype))
    return k_pages, v_pages


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
    query_tile: int = 128,
):
    """Attention of packed queries over paged K/V. Returns [num_tokens, num_q_heads, head_dim] in q.dtype.

    GQA: query head h reads KV head h // (num_q_heads // num_kv_heads). Softmax in float32.
    With `sliding_window` w a query at position p sees keys at positions > p - w.
    With `soft_cap` c the scores become c * tanh(scores / c).
    Queries are processed `query_tile` rows at a time so a long prefill never gathers
    [num_tokens, context] keys at once.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_q_heads // num_kv_heads
    context = pages_per_seq * block_size

    token_idx = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_ids = jnp.searchsorted(cu_q_lens[1:], token_idx, side="right").astype(jnp.int32)
    token_valid = token_idx < cu_q_lens[num_seqs]
    seq_ids = jnp.minimum(seq_ids, num_seqs - 1)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    positions = kv_lens[seq_ids] - q_lens[seq_ids] + (token_idx - cu_q_lens[seq_ids])

    tile = query_tile if num_tokens % query_tile == 0 else num_tokens
    num_tiles = num_tokens // tile
    kv_pos = jnp.arange(context, dtype=jnp.int32)

    def attend_tile(args):
        q_t, seq_t, pos_t, valid_t = args  # [tile, H, D], [tile], [tile], [tile]
        pages = block_tables[seq_t]  # [tile, pages_per_seq]
        # [tile, W, KVH, BS, D] -> [tile, KVH, W * BS, D]
        k = k_pages[pages].transpose(0, 2, 1, 3, 4).reshape(tile, num_kv_heads, context, head_dim)
        v = v_pages[pages].transpose(0, 2, 1, 3, 4).reshape(tile, num_kv_heads, context, head_dim)
        in_context = kv_pos[None, :] < kv_lens[seq_t][:, None]  # [tile, L]
        # Zero what lies past the context so garbage (even NaN) in unused pages cannot leak.
        k = jnp.where(in_context[:, None, :, None], k.astype(jnp.float32), 0.0)
        v = jnp.where(in_context[:, None, :, None], v.astype(jnp.float32), 0.0)
        qg = q_t.astype(jnp.float32).reshape(tile, num_kv_heads, group, head_dim)
        scores = jnp.einsum("tkgd,tkld->tkgl", qg, k) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        visible = in_context & (kv_pos[None, :] <= pos_t[:, None]) & valid_t[:, None]
        if sliding_window is not None:
            visible = visible & (kv_pos[None, :] > pos_t[:, None] - sliding_window)
        visible = visible[:, None, None, :]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = jnp.where(visible, probs, 0.0)  # rows with nothing visible (padding) give zeros
        out = jnp.einsum("tkgl,tkld->tkgd", probs, v)
        return out.reshape(tile, num_q_heads, head_dim).astype(q.dtype)

    tiled = (
        q.reshape(num_tiles, tile, num_q_heads, head_dim),
        seq_ids.reshape(num_tiles, tile),
        positions.reshape(num_tiles, tile),
        token_valid.reshape(num_tiles, tile),
    )
    out = jax.lax.map(attend_tile, tiled)
    return out.reshape(num_tokens, num_q_heads, head_dim)
