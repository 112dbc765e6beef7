"""Ragged paged attention in Pallas (Triton lowering): one kernel for mixed prefill + decode steps.

Same signature and semantics as `pallas_kernels.reference.ragged_paged_attention`. Each
sequence's new tokens are cut into work items of `block_q` tokens; one program computes one
(work item, KV head), with the item's tokens times the padded GQA group as its rows, walking the
sequence's pages through its block table (see `paged_flash_kernel`). The static number of items
is min(num_tokens, num_seqs + cdiv(num_tokens, block_q)), an upper bound on
sum(cdiv(q_len, block_q)) since every item holds a token; spare items are empty and cost one
program launch each.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import paged_flash_kernel, reference


@functools.partial(
    jax.jit,
    static_argnames=[
        "sm_scale", "sliding_window", "soft_cap", "block_q", "pages_per_compute_block",
        "num_kv_splits", "num_warps", "num_stages", "interpret",
    ],
)
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
    k_scale=None,
    v_scale=None,
    block_q: int | None = None,
    pages_per_compute_block: int | None = None,
    num_kv_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Attention of packed queries over paged K/V. Returns [num_tokens, num_q_heads, head_dim] in q.dtype.

    Semantics as `reference.ragged_paged_attention` (causal within each sequence, GQA, optional
    sliding window and soft cap, float32 softmax, zeros for padded rows, int8 / fp8 pages
    dequantized with k_scale / v_scale, f32 scalars or f32[num_kv_heads]). Static tuning knobs:
      block_q: query tokens per program (a power of two); None picks 64 // padded group size,
        at least 1. Rows per program = block_q * next_power_of_two(group) must be >= 16.
      pages_per_compute_block: pages per inner step (a power of two); None picks 64 keys' worth,
        fewer for wide tiles (`paged_flash_kernel.default_pages_per_compute_block`).
      num_kv_splits: programs sharing one item's context (merged afterwards).
      num_warps, num_stages: Triton launch parameters. interpret: run the Pallas interpreter.
    head_dim and block_size must be powers of two.
    """
    if pages_per_compute_block is None:
        pages_per_compute_block = paged_flash_kernel.default_pages_per_compute_block(
            64, k_pages.shape[2], k_pages.shape[3], k_pages.dtype.itemsize)
    paged_flash_kernel.check_inputs(
        q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens,
        pages_per_compute_block=pages_per_compute_block, k_scale=k_scale, v_scale=v_scale,
    )
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_pages.shape
    num_seqs = kv_lens.shape[0]
    group = num_q_heads // num_kv_heads
    group_rows = pl.next_power_of_2(group)
    if block_q is None:
        block_q = max(1, 64 // group_rows)
    rows = block_q * group_rows
    if rows < 16 or rows & (rows - 1):
        raise ValueError(
            f"block_q * padded GQA group = {block_q} * {group_rows} = {rows} rows per program; "
            "it must be a power of two >= 16 (Triton dots): raise block_q"
        )

    # Work items: sequence s owns items item_start[s] .. item_end[s] - 1.
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # i32[num_seqs]
    items_per_seq = pl.cdiv(q_lens, block_q)
    item_end = jnp.cumsum(items_per_seq).astype(jnp.int32)
    item_start = item_end - items_per_seq
    num_items = min(num_tokens, num_seqs + pl.cdiv(num_tokens, block_q))
    item = jnp.arange(num_items, dtype=jnp.int32)
    item_seq = jnp.minimum(jnp.searchsorted(item_end, item, side="right"), num_seqs - 1).astype(jnp.int32)
    chunk_start = (item - item_start[item_seq]) * block_q  # offset of the item in its sequence
    num_q = jnp.where(item < item_end[-1], jnp.clip(q_lens[item_seq] - chunk_start, 0, block_q), 0)
    first_pos = kv_lens[item_seq] - q_lens[item_seq] + chunk_start
    kv_end = jnp.where(num_q > 0, first_pos + num_q, 0)
    first_page = paged_flash_kernel.first_compute_page(
        first_pos, sliding_window, block_size, pages_per_compute_block
    )
    item_meta = jnp.stack([item_seq, first_pos, kv_end, first_page], axis=1)  # i32[num_items, 4]

    # q_items[i, h, t * group_rows + g] = q[first token of item i + t, h * group + g].
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    tokens = cu_q_lens[item_seq][:, None] + chunk_start[:, None] + offsets  # [num_items, block_q]
    q_items = jnp.where(
        (offsets < num_q[:, None])[:, :, None, None],
        q[jnp.minimum(tokens, num_tokens - 1)],
        jnp.zeros((), q.dtype),
    )  # [num_items, block_q, num_q_heads, head_dim]
    q_items = q_items.reshape(num_items, block_q, num_kv_heads, group, head_dim)
    q_items = jnp.pad(q_items, ((0, 0), (0, 0), (0, 0), (0, group_rows - group), (0, 0)))
    q_items = q_items.transpose(0, 2, 1, 3, 4).reshape(num_items, num_kv_heads, rows, head_dim)

    out_items = paged_flash_kernel.paged_flash_attention(
        q_items, item_meta, block_tables, k_pages, v_pages,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        group_rows=group_rows, pages_per_compute_block=pages_per_compute_block,
        num_kv_splits=num_kv_splits, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret,
        k_scale=reference.kv_scales(k_scale, num_kv_heads),
        v_scale=reference.kv_scales(v_scale, num_kv_heads),
    )  # f32[num_items, num_kv_heads, rows, head_dim]

    # Back to packed token order.
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    token_seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), num_seqs - 1)
    offset = token - cu_q_lens[token_seq]
    out_items = out_items.reshape(num_items, num_kv_heads, block_q, group_rows, head_dim)
    out = out_items[item_start[token_seq] + offset // block_q, :, offset % block_q, :group]
    out = jnp.where((token < cu_q_lens[num_seqs])[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
