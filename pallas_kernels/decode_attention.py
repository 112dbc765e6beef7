"""Decode-only paged attention in Pallas (Triton lowering): one query token per sequence.

Same signature as `pallas_kernels.reference.ragged_paged_attention`, valid only when every
sequence's q_len (cu_q_lens[s + 1] - cu_q_lens[s]) is 0 or 1 -- decode steps, which dominate
serving. One program handles (sequence, KV head, KV split): its rows are the GQA group padded to
at least 16, and the sequence's context is split across `num_kv_splits` programs whose partial
softmax results are merged afterwards with their log-sum-exp weights (flash-decoding: a small
batch with long contexts still fills the GPU). The split count is static, chosen per bucket from
the shapes (`default_num_kv_splits`); each split takes an equal share of its sequence's real
compute blocks, so short contexts are not penalized by a wide table.
The runner calls this kernel for the steps it knows are decode-only (every scheduled request
has one new token) and compiles separate programs for them; the kernel does not check q_lens.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import paged_flash_kernel, reference

TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs; a guess until GPU timings exist
MAX_KV_SPLITS = 8  # more splits write and merge more partial results than they save


def default_num_kv_splits(num_seqs: int, num_kv_heads: int, pages_per_seq: int,
                          pages_per_compute_block: int) -> int:
    """Programs sharing one sequence's context, from static shapes only.

    Enough that num_seqs * num_kv_heads * splits reaches TARGET_PROGRAMS, at most MAX_KV_SPLITS,
    and never more than the widest table's compute blocks (a split without a block only costs).
    Large batches get 1: no partial results are written and merged.
    """
    max_steps = pl.cdiv(pages_per_seq, pages_per_compute_block)
    wanted = TARGET_PROGRAMS // (num_seqs * num_kv_heads)
    return max(1, min(MAX_KV_SPLITS, max_steps, wanted))


@functools.partial(
    jax.jit,
    static_argnames=[
        "sm_scale", "sliding_window", "soft_cap", "pages_per_compute_block", "num_kv_splits",
        "num_warps", "num_stages", "interpret",
    ],
)
def decode_attention(
    q,  # [num_tokens, num_q_heads, head_dim]
    k_pages,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_pages,  # [num_blocks, num_kv_heads, block_size, head_dim]
    kv_lens,  # i32[num_seqs]: context length including this step's token; 0 for padding
    block_tables,  # i32[num_seqs, pages_per_seq]: padded with the null block 0
    cu_q_lens,  # i32[num_seqs + 1]: cumulative query lengths, each step 0 or 1
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale=None,
    v_scale=None,
    pages_per_compute_block: int | None = None,
    num_kv_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Decode attention over paged K/V. Returns [num_tokens, num_q_heads, head_dim] in q.dtype.

    Precondition: every q_len is 0 or 1 (not checked: the result is wrong otherwise). Semantics
    otherwise as `reference.ragged_paged_attention` (including int8 / fp8 pages with k_scale /
    v_scale). Static tuning knobs:
      pages_per_compute_block: pages per inner step (a power of two); None picks 128 keys' worth,
        fewer for wide tiles (`paged_flash_kernel.default_pages_per_compute_block`).
      num_kv_splits: programs sharing one sequence's context; None: `default_num_kv_splits`.
      num_warps, num_stages: Triton launch parameters. interpret: run the Pallas interpreter.
    """
    if pages_per_compute_block is None:
        pages_per_compute_block = paged_flash_kernel.default_pages_per_compute_block(
            128, k_pages.shape[2], k_pages.shape[3], k_pages.dtype.itemsize)
    paged_flash_kernel.check_inputs(
        q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens,
        pages_per_compute_block=pages_per_compute_block, k_scale=k_scale, v_scale=v_scale,
    )
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_pages.shape
    num_seqs = kv_lens.shape[0]
    group = num_q_heads // num_kv_heads
    group_rows = max(16, pl.next_power_of_2(group))
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(num_seqs, num_kv_heads, block_tables.shape[1],
                                              pages_per_compute_block)

    has_query = cu_q_lens[1:] > cu_q_lens[:-1]  # bool[num_seqs]
    first_pos = kv_lens - 1
    kv_end = jnp.where(has_query, kv_lens, 0)
    first_page = paged_flash_kernel.first_compute_page(
        first_pos, sliding_window, block_size, pages_per_compute_block
    )
    seq = jnp.arange(num_seqs, dtype=jnp.int32)
    item_meta = jnp.stack([seq, first_pos, kv_end, first_page], axis=1)  # i32[num_seqs, 4]

    q_rows = q[jnp.minimum(cu_q_lens[:-1], num_tokens - 1)]  # [num_seqs, num_q_heads, head_dim]
    q_rows = jnp.where(has_query[:, None, None], q_rows, jnp.zeros((), q.dtype))
    q_items = q_rows.reshape(num_seqs, num_kv_heads, group, head_dim)
    q_items = jnp.pad(q_items, ((0, 0), (0, 0), (0, group_rows - group), (0, 0)))

    out_items = paged_flash_kernel.paged_flash_attention(
        q_items, item_meta, block_tables, k_pages, v_pages,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        group_rows=group_rows, pages_per_compute_block=pages_per_compute_block,
        num_kv_splits=num_kv_splits, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret,
        k_scale=reference.kv_scales(k_scale, num_kv_heads),
        v_scale=reference.kv_scales(v_scale, num_kv_heads),
    )  # f32[num_seqs, num_kv_heads, group_rows, head_dim]

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    token_seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), num_seqs - 1)
    out = out_items[token_seq, :, :group]  # [num_tokens, num_kv_heads, group, head_dim]
    out = jnp.where((token < cu_q_lens[num_seqs])[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
