"""The Pallas program behind both GPU attention kernels: flash attention of one work item.

A work item is a run of up to `block_q` consecutive query tokens of ONE sequence. The ragged
kernel cuts every sequence's new tokens into such items; the decode kernel makes one item per
sequence with `block_q == 1`. A program handles (work item, KV head, KV split): it walks the
item's pages `pages_per_compute_block` at a time through the sequence's block table, keeps a
running max / sum / accumulator (online softmax, float32), and writes its partial result; the
caller merges the KV splits (`merge_kv_splits`).

Rows of a program are (token, query head of the group) pairs, token-major:
row = token * group_rows + head_in_group, where `group_rows` is the GQA group size padded to a
power of two (the Triton lowering wants power-of-two shapes and `tl.dot` wants at least 16 rows).

Nothing outside [first visible key, kv_end) of the item's own pages is used: keys past the
context are masked and their K/V zeroed before the dots, so garbage (even NaN) in the null
block or in unused slots never reaches the output.

Lowering: Pallas Triton on NVIDIA GPUs (compiler params passed explicitly, since jax 0.10
defaults GPU Pallas to Mosaic GPU), or `interpret=True` anywhere (the CPU tests).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so masked rows never make NaN
NUM_META = 4  # item_meta columns: seq, first_pos, kv_end, first_page


def _triton_compiler_params(num_warps: int, num_stages: int):
    # jax 0.10.2 .. 0.12 call it CompilerParams; older releases TritonCompilerParams.
    params = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return params(num_warps=num_warps, num_stages=num_stages)


def _kernel(
    meta_ref,  # i32[NUM_META]: seq, first_pos, kv_end, first_page of this item
    block_tables_ref,  # i32[num_seqs, padded_pages_per_seq]
    q_ref,  # [rows, head_dim]
    k_pages_ref,  # [num_blocks, block_size, head_dim] (this program's KV head)
    v_pages_ref,  # [num_blocks, block_size, head_dim]
    k_scale_ref,  # f32[1]: this KV head's k_scale (used when `quantized`)
    v_scale_ref,  # f32[1]
    o_ref,  # f32[rows, head_dim]: this split's normalized output
    m_ref,  # f32[rows]: this split's running max
    l_ref,  # f32[rows]: this split's softmax denominator
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group_rows: int,
    pages_per_compute_block: int,
    num_kv_splits: int,
    quantized: bool,
):
    split = pl.program_id(2)
    rows, head_dim = q_ref.shape
    block_size = k_pages_ref.shape[1]
    keys_per_step = pages_per_compute_block * block_size
    seq, first_pos, kv_end, first_page = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]

    # This split's share of the item's pages, in whole compute blocks.
    end_page = pl.cdiv(kv_end, block_size)
    steps = pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_compute_block)
    steps_per_split = pl.cdiv(steps, num_kv_splits)
    step_lo = jnp.minimum(split * steps_per_split, steps)
    step_hi = jnp.minimum(step_lo + steps_per_split, steps)

    q = q_ref[...]
    scale = sm_scale * k_scale_ref[0] if quantized else sm_scale
    row_pos = first_pos + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group_rows  # [rows, 1]

    def step(i, carry):
        acc, m_prev, l_prev = carry  # [rows, head_dim], [rows], [rows]
        page = first_page + i * pages_per_compute_block
        block_ids = block_tables_ref[seq, pl.ds(page, pages_per_compute_block)]
        k = k_pages_ref[block_ids].reshape(keys_per_step, head_dim)
        v = v_pages_ref[block_ids].reshape(keys_per_step, head_dim)
        key_pos = page * block_size + lax.broadcasted_iota(jnp.int32, (1, keys_per_step), 1)
        key_rows = page * block_size + lax.broadcasted_iota(jnp.int32, (keys_per_step, 1), 0)
        in_context = key_pos < kv_end  # [1, keys]
        if k.dtype != q.dtype:  # e.g. int8 / fp8 -> q.dtype, exact; scales go to s and acc
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        k = jnp.where(key_rows < kv_end, k, jnp.zeros_like(k))
        v = jnp.where(key_rows < kv_end, v, jnp.zeros_like(v))
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [rows, keys]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        visible = in_context & (key_pos <= row_pos)
        if sliding_window is not None:
            visible = visible & (key_pos > row_pos - sliding_window)
        s = jnp.where(visible, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(visible, jnp.exp(s - m_next[:, None]), 0.0)
        l_next = l_prev * correction + p.sum(axis=1)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc * correction[:, None] + pv, m_next, l_next

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(step_lo, step_hi, step, init)
    safe_l = jnp.where(l > 0.0, l, 1.0)
    if quantized:
        acc = acc * v_scale_ref[0]
    o_ref[...] = acc / safe_l[:, None]
    m_ref[...] = m
    l_ref[...] = l


def paged_flash_attention(
    q_items,  # [num_items, num_kv_heads, rows, head_dim]
    item_meta,  # i32[num_items, NUM_META]
    block_tables,  # i32[num_seqs, pages_per_seq]
    k_pages,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_pages,  # [num_blocks, num_kv_heads, block_size, head_dim]
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group_rows: int,
    pages_per_compute_block: int,
    num_kv_splits: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    k_scale=None,  # None, or f32[num_kv_heads] for int8 / fp8 pages
    v_scale=None,
):
    """Runs the kernel over (item, KV head, KV split). Returns f32[num_items, num_kv_heads, rows, head_dim].

    item_meta columns: the item's sequence, the position of its first query token, kv_end (one
    past the last key any of its tokens may see; 0 for an empty item) and first_page (the page
    of the first key it may see, a multiple of pages_per_compute_block).
    """
    num_items, num_kv_heads, rows, head_dim = q_items.shape
    num_blocks, _, block_size, _ = k_pages.shape
    # Pad the table so a compute block starting at any page of the table stays inside it.
    pages_per_seq = block_tables.shape[1]
    padded = pl.cdiv(pages_per_seq, pages_per_compute_block) * pages_per_compute_block
    block_tables = jnp.pad(block_tables, ((0, 0), (0, padded - pages_per_seq)))

    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        group_rows=group_rows,
        pages_per_compute_block=pages_per_compute_block,
        num_kv_splits=num_kv_splits,
        quantized=k_scale is not None,
    )
    if k_scale is None:
        k_scale = v_scale = jnp.ones((num_kv_heads,), jnp.float32)
    pages_spec = pl.BlockSpec((num_blocks, None, block_size, head_dim), lambda i, h, s: (0, h, 0, 0))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(num_items, num_kv_heads, num_kv_splits),
        in_specs=[
            pl.BlockSpec((None, NUM_META), lambda i, h, s: (i, 0)),
            pl.BlockSpec(block_tables.shape, lambda i, h, s: (0, 0)),
            pl.BlockSpec((None, None, rows, head_dim), lambda i, h, s: (i, h, 0, 0)),
            pages_spec,
            pages_spec,
            pl.BlockSpec((1,), lambda i, h, s: (h,)),
            pl.BlockSpec((1,), lambda i, h, s: (h,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda i, h, s: (s, i, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (s, i, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (s, i, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_kv_splits, num_items, num_kv_heads, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits, num_items, num_kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits, num_items, num_kv_heads, rows), jnp.float32),
        ],
        compiler_params=_triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"paged_flash_rows{rows}_pages{pages_per_compute_block}_splits{num_kv_splits}",
    )(item_meta, block_tables, q_items, k_pages, v_pages, k_scale, v_scale)
    return merge_kv_splits(o, m, l)


def merge_kv_splits(o, m, l):
    """Merges per-split results: o f32[splits, ...rows, head_dim], m and l f32[splits, ...rows]."""
    m_all = m.max(axis=0)
    weight = jnp.exp(m - m_all[None]) * l  # zero for a split that saw no key
    total = weight.sum(axis=0)
    merged = (o * weight[..., None]).sum(axis=0)
    return jnp.where(total[..., None] > 0.0, merged / jnp.where(total > 0.0, total, 1.0)[..., None], 0.0)


# Keys of one inner step: at most this many bytes of K (and as many of V). Measured with XLA's
# deviceless compile for an H100 (Hopper: 227 KiB of shared memory per SM): the decode kernel at
# 128 float32 keys of head_dim 128 (64 KiB of K) asked for 264 KiB with full-precision dots.
MAX_TILE_BYTES = 32 * 1024


def default_pages_per_compute_block(max_keys: int, block_size: int, head_dim: int, itemsize: int) -> int:
    """Pages per inner step: up to `max_keys` keys, fewer where their K tile would pass
    MAX_TILE_BYTES (float32 pages, head_dim 256), never less than one page (a power of two)."""
    keys = min(max_keys, max(1, MAX_TILE_BYTES // (head_dim * itemsize)))
    keys = 1 << (keys.bit_length() - 1)  # down to a power of two
    return max(1, keys // block_size)


def first_compute_page(first_pos, sliding_window, block_size, pages_per_compute_block):
    """i32 page where an item's walk starts: page 0, or the window's first page rounded down."""
    if sliding_window is None:
        return jnp.zeros_like(first_pos)
    first_key = jnp.maximum(first_pos - sliding_window + 1, 0)
    return first_key // block_size // pages_per_compute_block * pages_per_compute_block


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_inputs(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, *, pages_per_compute_block,
                 k_scale=None, v_scale=None):
    """Raises ValueError naming the argument when shapes or dtypes break the kernels' contract."""
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(
            "k_pages and v_pages must both be [num_blocks, num_kv_heads, block_size, head_dim] of "
            f"one dtype, got {k_pages.shape} {k_pages.dtype} and {v_pages.shape} {v_pages.dtype}"
        )
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, block_size, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of k_pages ({kv_head_dim}) differ")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    for name, value in (("head_dim", head_dim), ("block_size", block_size),
                        ("pages_per_compute_block", pages_per_compute_block)):
        if not _is_power_of_two(value):
            raise ValueError(f"{name} must be a power of two for the Pallas Triton kernels, got {value}")
    if pages_per_compute_block * block_size < 16 or head_dim < 16:
        raise ValueError(
            f"Triton dots need >= 16 keys per step and head_dim >= 16: pages_per_compute_block "
            f"{pages_per_compute_block} * block_size {block_size} keys, head_dim {head_dim}"
        )
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale (quantized KV) or neither")
    if k_scale is None and jnp.dtype(k_pages.dtype).itemsize == 1:
        raise ValueError(f"k_pages/v_pages are {k_pages.dtype}: quantized KV needs k_scale and v_scale")
    num_seqs = kv_lens.shape[0]
    expected = {"kv_lens": (num_seqs,), "block_tables": (num_seqs, block_tables.shape[-1]),
                "cu_q_lens": (num_seqs + 1,)}
    for name, array in (("kv_lens", kv_lens), ("block_tables", block_tables), ("cu_q_lens", cu_q_lens)):
        if array.shape != expected[name] or array.dtype != jnp.int32:
            raise ValueError(f"{name} must be i32{list(expected[name])}, got {array.dtype}{list(array.shape)}")
