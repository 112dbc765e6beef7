"""The pure-JAX reference paged attention against a dense softmax attention (no paging)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from paged_attention_cases import assert_close, dense_attention, make_case, quantize_case

# (q_len, kv_len): decode rows, whole prefills, chunked prefills, lengths on and off block
# boundaries, a sequence longer than one query tile.
MIXED = [(1, 1), (1, 37), (5, 5), (16, 16), (7, 40), (1, 64), (20, 53)]


def run_reference(case, **kwargs):
    fn = jax.jit(functools.partial(reference.ragged_paged_attention, **kwargs))
    return fn(case.q, case.k_pages, case.v_pages, case.kv_lens, case.block_tables, case.cu_q_lens)


@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size",
    [(2, 2, 64, 16), (9, 3, 64, 16), (8, 2, 128, 32), (16, 2, 64, 8)],
    ids=["gqa1", "gqa3", "gqa4-d128-bs32", "gqa8-bs8"],
)
def test_matches_dense_attention(num_q_heads, num_kv_heads, head_dim, block_size):
    case = make_case(
        0, MIXED, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, num_tokens=64, num_seqs=8, pages_per_seq=-(-64 // block_size),
    )
    sm_scale = head_dim**-0.5
    out = run_reference(case, sm_scale=sm_scale)
    assert_close(out, dense_attention(case, sm_scale=sm_scale), jnp.float32)


@pytest.mark.parametrize("sliding_window,soft_cap", [(8, None), (17, 2.0)], ids=["window", "window-softcap"])
def test_sliding_window_and_soft_cap(sliding_window, soft_cap):
    case = make_case(
        1, MIXED, num_q_heads=6, num_kv_heads=2, head_dim=64, block_size=16,
        num_tokens=64, num_seqs=8, pages_per_seq=4,
    )
    kwargs = dict(sm_scale=0.3, sliding_window=sliding_window, soft_cap=soft_cap)
    out = run_reference(case, **kwargs)
    assert_close(out, dense_attention(case, **kwargs), jnp.float32)


def test_query_tiles_split_sequences():
    # Work items of 4 tokens: the prefills span several items.
    case = make_case(
        2, MIXED, num_q_heads=4, num_kv_heads=1, head_dim=64, block_size=16,
        num_tokens=64, num_seqs=8, pages_per_seq=4,
    )
    out = run_reference(case, sm_scale=0.125, query_tile=4)
    assert_close(out, dense_attention(case, sm_scale=0.125), jnp.float32)


def test_decode_bucket():
    # num_tokens == num_seqs picks one token per work item; an idle sequence has context but no query.
    assert reference.default_query_tile(8, 8) == 1
    case = make_case(
        6, [(1, 1), (1, 17), (0, 30), (1, 64), (1, 33)], num_q_heads=9, num_kv_heads=3,
        head_dim=64, block_size=16, num_tokens=8, num_seqs=8, pages_per_seq=4,
    )
    out = run_reference(case, sm_scale=0.125)
    assert_close(out, dense_attention(case, sm_scale=0.125), jnp.float32)


def test_bfloat16():
    case = make_case(
        3, MIXED, num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
        num_tokens=64, num_seqs=8, pages_per_seq=4, dtype=jnp.bfloat16,
    )
    out = run_reference(case, sm_scale=0.125)
    assert out.dtype == jnp.bfloat16
    assert_close(out, dense_attention(case, sm_scale=0.125), jnp.bfloat16)


def test_padding_rows_are_zero():
    case = make_case(
        4, [(3, 10), (1, 20)], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
        num_tokens=16, num_seqs=4, pages_per_seq=2,
    )
    out = np.asarray(run_reference(case, sm_scale=0.125))
    assert (out[4:] == 0).all()


def test_write_kv_puts_each_token_in_its_slot():
    k_pages = jnp.zeros((4, 2, 8, 64))
    v_pages = jnp.zeros((4, 2, 8, 64))
    rng = np.random.default_rng(5)
    slot_mapping = jnp.asarray([8 * 3 + 7, 8 * 1 + 0, 8 * 1 + 5, 0], jnp.int32)
    k = jnp.asarray(rng.standard_normal((4, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((4, 2, 64)), jnp.float32)
    new_k, new_v = jax.jit(reference.write_kv)(k_pages, v_pages, k, v, slot_mapping)
    for t, slot in enumerate(np.asarray(slot_mapping)):
        np.testing.assert_array_equal(new_k[slot // 8, :, slot % 8], k[t])
        np.testing.assert_array_equal(new_v[slot // 8, :, slot % 8], v[t])
    written = np.zeros((4, 8), bool)
    written[np.asarray(slot_mapping) // 8, np.asarray(slot_mapping) % 8] = True
    assert (np.asarray(new_k).transpose(0, 2, 1, 3)[~written] == 0).all()


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2], ids=["int8", "fp8", "fp8_e5m2"])
def test_quantized_kv(kv_dtype):
    case = make_case(
        7, MIXED, num_q_heads=6, num_kv_heads=2, head_dim=64, block_size=16,
        num_tokens=64, num_seqs=8, pages_per_seq=4,
    )
    k_scale, v_scale = np.asarray([0.03, 0.05], np.float32), np.asarray([0.02, 0.04], np.float32)
    case = quantize_case(case, kv_dtype, k_scale, v_scale)
    out = run_reference(case, sm_scale=0.125, k_scale=jnp.asarray(k_scale), v_scale=jnp.asarray(v_scale))
    assert_close(out, dense_attention(case, sm_scale=0.125), jnp.float32)


def test_write_kv_quantizes_int8_per_head():
    rng = np.random.default_rng(8)
    k = jnp.asarray(rng.standard_normal((3, 2, 64)) * 2, jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, 2, 64)), jnp.float32)
    pages = jnp.zeros((2, 2, 4, 64), jnp.int8)
    k_scale, v_scale = jnp.asarray([0.01, 0.05]), jnp.asarray(0.02)
    slots = jnp.asarray([4, 5, 0], jnp.int32)
    new_k, new_v = jax.jit(reference.write_kv)(pages, pages, k, v, slots, k_scale=k_scale, v_scale=v_scale)
    assert new_k.dtype == jnp.int8
    for pages_out, x, scale in ((new_k, k, np.asarray([0.01, 0.05])), (new_v, v, np.full(2, 0.02))):
        stored = np.asarray(pages_out)[1, :, :2].transpose(1, 0, 2).astype(np.float32)  # tokens 0, 1
        limit = 127 * scale[:, None]
        expected = np.clip(np.asarray(x[:2]), -limit, limit)  # large values saturate at +-127
        assert (np.abs(stored * scale[:, None] - expected) <= 0.5 * scale[:, None] + 1e-6).all()
    assert np.abs(np.asarray(new_k)).max() == 127
