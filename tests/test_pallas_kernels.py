"""Pallas paged-attention kernels: interpret mode on CPU against a dense oracle, CUDA lowering on
CPU through an abstract H100, and the compiled kernels on a GPU when one is present."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_flash_kernel, reference
from pallas_kernels.decode_attention import TARGET_PROGRAMS, decode_attention, default_num_kv_splits
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from paged_attention_cases import assert_close, dense_attention, make_case, quantize_case

# (q_len, kv_len): decode rows, prefills longer than one work item, chunked prefills, an idle
# sequence with context but no query, lengths on and off block boundaries.
MIXED = [(1, 1), (1, 37), (20, 20), (0, 9), (16, 16), (7, 70), (1, 64), (23, 53)]
DECODE = [(1, 1), (1, 17), (1, 64), (0, 30), (1, 100), (1, 33)]
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


def run(kernel, case, **kwargs):
    return kernel(case.q, case.k_pages, case.v_pages, case.kv_lens, case.block_tables,
                  case.cu_q_lens, **kwargs)


def paged_case(seed, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size,
               dtype=jnp.float32, num_tokens=128):
    return make_case(
        seed, seq_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, num_tokens=num_tokens, num_seqs=len(seq_lens) + 2,
        pages_per_seq=-(-128 // block_size), dtype=dtype,
    )


@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size,block_q",
    [(2, 2, 64, 16, 16), (9, 3, 64, 16, None), (8, 2, 128, 32, None), (16, 2, 64, 64, None)],
    ids=["gqa1", "gqa3", "gqa4-d128-bs32", "gqa8-bs64"],
)
def test_ragged_matches_dense(num_q_heads, num_kv_heads, head_dim, block_size, block_q):
    case = paged_case(0, MIXED, num_q_heads, num_kv_heads, head_dim, block_size)
    sm_scale = head_dim**-0.5
    out = run(ragged_paged_attention, case, sm_scale=sm_scale, block_q=block_q, interpret=True)
    assert_close(out, dense_attention(case, sm_scale=sm_scale), jnp.float32, what="ragged")


def test_ragged_window_soft_cap_and_kv_splits():
    # The window starts mid-page and mid compute block; three splits do not divide the steps.
    case = paged_case(1, MIXED, 6, 2, 64, 16)
    kwargs = dict(sm_scale=0.3, sliding_window=21, soft_cap=4.0)
    out = run(ragged_paged_attention, case, **kwargs, pages_per_compute_block=2, num_kv_splits=3,
              interpret=True)
    assert_close(out, dense_attention(case, **kwargs), jnp.float32, what="ragged window")


def test_ragged_bfloat16():
    case = paged_case(2, MIXED, 9, 3, 128, 32, dtype=jnp.bfloat16)
    out = run(ragged_paged_attention, case, sm_scale=0.1, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert_close(out, dense_attention(case, sm_scale=0.1), jnp.bfloat16, what="ragged bf16")


@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size,num_kv_splits",
    [(2, 2, 64, 16, 1), (9, 3, 64, 16, 3), (16, 2, 128, 32, 8)],
    ids=["gqa1", "gqa3-split3", "gqa8-d128-split8"],
)
def test_decode_matches_dense(num_q_heads, num_kv_heads, head_dim, block_size, num_kv_splits):
    case = paged_case(3, DECODE, num_q_heads, num_kv_heads, head_dim, block_size, num_tokens=8)
    sm_scale = head_dim**-0.5
    out = run(decode_attention, case, sm_scale=sm_scale, num_kv_splits=num_kv_splits,
              interpret=True)
    assert_close(out, dense_attention(case, sm_scale=sm_scale), jnp.float32, what="decode")


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (6, 3), (9, 3), (8, 2), (16, 2)],
                         ids=["gqa1", "gqa2", "gqa3", "gqa4", "gqa8"])
def test_flash_decoding_default_splits(num_q_heads, num_kv_heads):
    """Few sequences with long contexts: the default split count (from the bucket's static
    shapes) splits each context across programs, and the log-sum-exp merge of the partial
    softmaxes equals both the dense oracle and the pure-JAX reference. Random lengths off page
    boundaries, permuted tables, NaN-poisoned unused pages (make_case), padded sequences."""
    rng = np.random.default_rng(num_q_heads * 10 + num_kv_heads)
    lens = [int(n) for n in rng.integers(1, 500, size=3)] + [16 * int(rng.integers(1, 31)) + 1]
    case = make_case(
        7, [(1, n) for n in lens], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=64, block_size=16, num_tokens=8, num_seqs=8, pages_per_seq=32,
    )
    assert default_num_kv_splits(8, num_kv_heads, 32, 8) == 4  # 32 pages / 8 per compute block
    out = run(decode_attention, case, sm_scale=0.125, interpret=True)
    assert_close(out, dense_attention(case, sm_scale=0.125), jnp.float32, what="flash-decoding")
    want = run(reference.ragged_paged_attention, case, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_default_num_kv_splits_from_static_shapes():
    # Few sequences x KV heads: enough splits for TARGET_PROGRAMS, capped at MAX_KV_SPLITS.
    assert default_num_kv_splits(8, 3, 128, 8) == 8
    assert default_num_kv_splits(8, 8, 128, 8) == TARGET_PROGRAMS // 64
    # Never more splits than the widest table has compute blocks.
    assert default_num_kv_splits(8, 3, 16, 8) == 2
    # Large batches: no split, nothing to merge.
    assert default_num_kv_splits(64, 8, 128, 8) == 1
    assert default_num_kv_splits(256, 1, 4096, 8) == 1


def test_decode_window_soft_cap_bfloat16():
    case = paged_case(4, DECODE, 12, 4, 64, 16, dtype=jnp.bfloat16, num_tokens=8)
    kwargs = dict(sm_scale=0.125, sliding_window=40, soft_cap=2.5)
    out = run(decode_attention, case, **kwargs, pages_per_compute_block=2, num_kv_splits=2,
              interpret=True)
    assert_close(out, dense_attention(case, **kwargs), jnp.bfloat16, what="decode window bf16")


@pytest.mark.parametrize(
    "kernel,kv_dtype", [(ragged_paged_attention, jnp.int8), (decode_attention, jnp.float8_e4m3fn),
                        (ragged_paged_attention, jnp.float8_e5m2), (decode_attention, jnp.float8_e5m2)],
    ids=["ragged-int8", "decode-fp8", "ragged-fp8_e5m2", "decode-fp8_e5m2"],
)
def test_quantized_kv(kernel, kv_dtype):
    seq_lens = DECODE if kernel is decode_attention else MIXED
    case = paged_case(6, seq_lens, 6, 2, 64, 16, num_tokens=80)
    k_scale, v_scale = np.asarray([0.03, 0.05], np.float32), np.asarray([0.02, 0.04], np.float32)
    case = quantize_case(case, kv_dtype, k_scale, v_scale)
    out = run(kernel, case, sm_scale=0.125, k_scale=jnp.asarray(k_scale), v_scale=jnp.asarray(v_scale),
              interpret=True)
    assert_close(out, dense_attention(case, sm_scale=0.125), jnp.float32, what="quantized")


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(q=jnp.zeros((8, 5, 64))), "num_q_heads 5 is not a multiple of num_kv_heads 2"),
        (dict(kv_lens=jnp.zeros((4,), jnp.float32)), "kv_lens must be i32"),
        (dict(cu_q_lens=jnp.zeros((4,), jnp.int32)), r"cu_q_lens must be i32\[5\]"),
        (dict(k_pages=jnp.zeros((4, 2, 12, 64)), v_pages=jnp.zeros((4, 2, 12, 64))),
         "block_size must be a power of two"),
        (dict(k_pages=jnp.zeros((4, 2, 16, 64), jnp.int8), v_pages=jnp.zeros((4, 2, 16, 64), jnp.int8)),
         "int8: quantized KV needs k_scale and v_scale"),
        (dict(pages_per_compute_block=1, k_pages=jnp.zeros((4, 2, 8, 64)), v_pages=jnp.zeros((4, 2, 8, 64))),
         "Triton dots need >= 16 keys per step"),
    ],
)
@pytest.mark.parametrize("kernel", [ragged_paged_attention, decode_attention], ids=["ragged", "decode"])
def test_bad_inputs_name_the_argument(kernel, bad, match):
    args = dict(q=jnp.zeros((8, 4, 64)), k_pages=jnp.zeros((4, 2, 16, 64)),
                v_pages=jnp.zeros((4, 2, 16, 64)), kv_lens=jnp.zeros((4,), jnp.int32),
                block_tables=jnp.zeros((4, 2), jnp.int32), cu_q_lens=jnp.zeros((5,), jnp.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        kernel(**args, sm_scale=0.125, interpret=True)


def _abstract_cuda_mesh():
    """An AbstractMesh over one abstract H100, or None where this jax lacks the (private) API."""
    try:
        from jax.sharding import AbstractDevice, AbstractMesh  # AbstractDevice is not public API
        device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
        return AbstractMesh((1,), ("x",), abstract_device=device)
    except (ImportError, TypeError):
        return None


@pytest.mark.parametrize("kernel", [ragged_paged_attention, decode_attention], ids=["ragged", "decode"])
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size,kv_dtype",
    [(9, 3, 64, 16, jnp.bfloat16), (32, 8, 128, 32, jnp.int8), (8, 8, 128, 64, jnp.float8_e4m3fn),
     (9, 3, 64, 16, jnp.float8_e5m2)],
    ids=["smollm2-bf16", "llama3-8b-bs32-int8", "mha-bs64-fp8", "smollm2-fp8_e5m2"],
)
def test_lowers_to_triton_for_cuda(kernel, num_q_heads, num_kv_heads, head_dim, block_size, kv_dtype):
    """Catches Triton lowering errors (non power-of-two shapes, unsupported ops) without a GPU."""
    mesh = _abstract_cuda_mesh()
    if mesh is None:
        pytest.skip("this jax has no jax.sharding.AbstractDevice to lower for CUDA on CPU")
    num_tokens, num_seqs, pages_per_seq, num_blocks = 200, 13, 100, 777  # not powers of two
    pages = jax.ShapeDtypeStruct((num_blocks, num_kv_heads, block_size, head_dim), kv_dtype)
    args = (
        jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), jnp.bfloat16), pages, pages,
        jax.ShapeDtypeStruct((num_seqs,), jnp.int32),
        jax.ShapeDtypeStruct((num_seqs, pages_per_seq), jnp.int32),
        jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32),
    )
    fn = functools.partial(kernel, sm_scale=0.125, sliding_window=100, soft_cap=30.0)
    if jnp.dtype(kv_dtype).itemsize == 1:
        fn = functools.partial(fn, k_scale=jnp.full((num_kv_heads,), 0.1), v_scale=0.2)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype,kv_dtype", [(jnp.float32, None), (jnp.bfloat16, None),
                                            (jnp.bfloat16, jnp.float8_e4m3fn), (jnp.float32, jnp.int8),
                                            (jnp.bfloat16, jnp.float8_e5m2)],
                         ids=["fp32", "bf16", "bf16-fp8kv", "fp32-int8kv", "bf16-fp8_e5m2kv"])
@pytest.mark.parametrize("kernel", [ragged_paged_attention, decode_attention], ids=["ragged", "decode"])
def test_compiled_kernel_matches_dense_on_gpu(kernel, dtype, kv_dtype):
    seq_lens = DECODE * 8 if kernel is decode_attention else MIXED * 4
    case = make_case(
        5, seq_lens, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
        num_tokens=512, num_seqs=64, pages_per_seq=16, dtype=dtype,
    )
    kwargs = dict(sm_scale=128**-0.5, sliding_window=50, soft_cap=20.0)
    scales = {}
    if kv_dtype is not None:
        k_scale, v_scale = np.full(8, 0.02, np.float32), np.full(8, 0.03, np.float32)
        case = quantize_case(case, kv_dtype, k_scale, v_scale)
        scales = dict(k_scale=jnp.asarray(k_scale), v_scale=jnp.asarray(v_scale))
    expected = dense_attention(case, **kwargs)
    if dtype == jnp.float32:
        # The kernel's float32 dots follow JAX's matmul precision, as XLA's own dots do: TF32 on
        # the tensor cores by default (measured on an H200: errors up to 1.7e-3), full float32
        # under "highest".
        np.testing.assert_allclose(run(kernel, case, **kwargs, **scales), expected, atol=5e-3, rtol=5e-3)
        with jax.default_matmul_precision("highest"):
            out = run(kernel, case, **kwargs, **scales)
    else:
        out = run(kernel, case, **kwargs, **scales)
    assert_close(out, expected, dtype, what="compiled on gpu")


@pytest.mark.parametrize("max_keys,block_size,head_dim,itemsize,pages", [
    (128, 16, 128, 2, 8),  # bf16, Llama heads: 128 keys
    (128, 16, 128, 1, 8),  # int8 / fp8 pages: still 128 keys
    (128, 16, 128, 4, 4),  # float32: 64 keys (32 KiB of K)
    (128, 16, 256, 2, 4),  # head_dim 256: 64 keys
    (64, 16, 256, 4, 2),  # the ragged kernel's 64 keys, float32 x 256: 32
    (128, 64, 256, 4, 1),  # a 64-token page is wider than the budget: still one page
    (128, 16, 96, 2, 8),  # 170 keys fit: down to 128, then the max
])
def test_default_compute_block_keeps_tiles_within_shared_memory(max_keys, block_size, head_dim, itemsize, pages):
    assert paged_flash_kernel.default_pages_per_compute_block(max_keys, block_size, head_dim, itemsize) == pages
