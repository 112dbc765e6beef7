"""Random paged-attention inputs and an independent dense oracle, shared by the kernel tests.

The oracle never reads the pool: each sequence's K/V are drawn densely first and only then
scattered into randomly permuted blocks, so a wrong block-table walk cannot agree with it.
Everything the attention must not read (the null block 0, unused blocks, slots past a
sequence's length, padded query rows) is NaN, so an out-of-bounds read shows up as NaN.
"""

import dataclasses

import numpy as np
import jax.numpy as jnp


@dataclasses.dataclass
class PagedCase:
    q: jnp.ndarray  # [num_tokens, num_q_heads, head_dim]
    k_pages: jnp.ndarray  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_pages: jnp.ndarray  # [num_blocks, num_kv_heads, block_size, head_dim]
    kv_lens: jnp.ndarray  # i32[num_seqs]
    block_tables: jnp.ndarray  # i32[num_seqs, pages_per_seq]
    cu_q_lens: jnp.ndarray  # i32[num_seqs + 1]
    dense_k: list  # per real sequence, f64[kv_len, num_kv_heads, head_dim]
    dense_v: list
    q_lens: list  # per real sequence


def make_case(
    seed,
    seq_lens,  # [(q_len, kv_len)] of the real sequences
    *,
    num_q_heads,
    num_kv_heads,
    head_dim,
    block_size,
    num_tokens,
    num_seqs,
    pages_per_seq,
    spare_blocks=3,
    dtype=jnp.float32,
):
    rng = np.random.default_rng(seed)
    pages_needed = [-(-kv // block_size) for _, kv in seq_lens]
    assert max(pages_needed) <= pages_per_seq and len(seq_lens) <= num_seqs
    assert sum(q for q, _ in seq_lens) <= num_tokens
    num_blocks = 1 + sum(pages_needed) + spare_blocks
    block_ids = rng.permutation(np.arange(1, num_blocks))  # block 0 stays the null block

    def rounded(x):  # the values the pool actually holds, as float64
        return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)

    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_pages = np.full(shape, np.nan, np.float32)
    v_pages = np.full(shape, np.nan, np.float32)
    block_tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    cu_q_lens = np.zeros(num_seqs + 1, np.int32)
    q = np.full((num_tokens, num_q_heads, head_dim), np.nan, np.float32)
    dense_k, dense_v = [], []
    next_block = 0
    for s, (q_len, kv_len) in enumerate(seq_lens):
        assert 0 <= q_len <= kv_len
        k = rounded(rng.standard_normal((kv_len, num_kv_heads, head_dim)))
        v = rounded(rng.standard_normal((kv_len, num_kv_heads, head_dim)))
        dense_k.append(k)
        dense_v.append(v)
        for page in range(pages_needed[s]):
            block = block_ids[next_block]
            next_block += 1
            block_tables[s, page] = block
            lo, hi = page * block_size, min(kv_len, (page + 1) * block_size)
            k_pages[block, :, : hi - lo] = k[lo:hi].transpose(1, 0, 2)
            v_pages[block, :, : hi - lo] = v[lo:hi].transpose(1, 0, 2)
        kv_lens[s] = kv_len
        cu_q_lens[s + 1] = cu_q_lens[s] + q_len
        q[cu_q_lens[s] : cu_q_lens[s + 1]] = rng.standard_normal((q_len, num_q_heads, head_dim))
    cu_q_lens[len(seq_lens) + 1 :] = cu_q_lens[len(seq_lens)]
    return PagedCase(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, dtype),
        v_pages=jnp.asarray(v_pages, dtype),
        kv_lens=jnp.asarray(kv_lens),
        block_tables=jnp.asarray(block_tables),
        cu_q_lens=jnp.asarray(cu_q_lens),
        dense_k=dense_k,
        dense_v=dense_v,
        q_lens=[q_len for q_len, _ in seq_lens],
    )


def dense_attention(case, *, sm_scale, sliding_window=None, soft_cap=None):
    """float64 softmax attention per sequence, without pages. Padded rows are zero."""
    num_tokens, num_q_heads, head_dim = case.q.shape
    q = np.asarray(case.q.astype(jnp.float32), np.float64)
    out = np.zeros((num_tokens, num_q_heads, head_dim))
    start = 0
    for q_len, k, v in zip(case.q_lens, case.dense_k, case.dense_v):
        kv_len, num_kv_heads, _ = k.shape
        group = num_q_heads // num_kv_heads
        k = np.repeat(k, group, axis=1)  # [kv_len, num_q_heads, head_dim]
        v = np.repeat(v, group, axis=1)
        rows = q[start : start + q_len]  # [q_len, num_q_heads, head_dim]
        scores = np.einsum("qhd,khd->hqk", rows, k) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * np.tanh(scores / soft_cap)
        q_pos = np.arange(kv_len - q_len, kv_len)[:, None]
        k_pos = np.arange(kv_len)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores = np.where(visible[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[start : start + q_len] = np.einsum("hqk,khd->qhd", probs, v)
        start += q_len
    return out


def assert_close(actual, expected, dtype, *, what=""):
    """Per-row tolerance by dtype: fp32 1e-5, bf16 2e-2 (abs and rel), and no NaN anywhere."""
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    assert not np.isnan(actual).any(), f"{what}: NaN in the output (an unmasked read of a poisoned slot)"
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}[dtype]
    np.testing.assert_allclose(actual, expected, atol=tol, rtol=tol, err_msg=what)


def quantize_case(case, dtype, k_scale, v_scale):
    """The case with int8 / fp8 pages holding K / k_scale, V / v_scale (k_scale, v_scale:
    f32[num_kv_heads]), and dense K/V replaced by what those pages dequantize to."""
    from pallas_kernels.reference import quantize_kv

    def dequantized(x, scale):
        return np.asarray(quantize_kv(jnp.asarray(x, jnp.float32), scale, dtype).astype(jnp.float32)
                          * scale[:, None], np.float64)

    def pages(p, scale):  # quantize_kv works on [..., num_kv_heads, head_dim]
        return quantize_kv(p.transpose(0, 2, 1, 3), scale, dtype).transpose(0, 2, 1, 3)

    return dataclasses.replace(
        case,
        k_pages=pages(case.k_pages, k_scale),
        v_pages=pages(case.v_pages, v_scale),
        dense_k=[dequantized(k, k_scale) for k in case.dense_k],
        dense_v=[dequantized(v, v_scale) for v in case.dense_v],
    )
