"""The C++ CPU paged-attention kernel against the pure-JAX reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu, reference
from pallas_kernels.cpu import build

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"no CPU kernel: {cpu.load_error()}")


@dataclasses.dataclass
class Problem:
    q: jax.Array  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_pages: jax.Array
    kv_lens: jax.Array  # i32[num_seqs]
    block_tables: jax.Array  # i32[num_seqs, pages_per_seq]
    cu_q_lens: jax.Array  # i32[num_seqs + 1]

    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.block_tables, self.cu_q_lens)


def make_problem(seed, q_lens, kv_lens, *, num_q_heads, num_kv_heads, head_dim, block_size,
                 num_padded_seqs=1, num_padded_tokens=3, dtype=jnp.float32):
    """Random sequences with permuted block tables; everything no sequence may read is NaN:
    the null block, blocks nobody owns, slots past kv_len in a sequence's last block."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens) + num_padded_seqs
    pages = [-(-n // block_size) for n in kv_lens]
    pages_per_seq = max(pages) + 2
    num_blocks = sum(pages) + 5
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k = rng.standard_normal(shape, np.float32)
    v = rng.standard_normal(shape, np.float32)
    owned = np.zeros(num_blocks, bool)
    block_tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    free = iter(rng.permutation(np.arange(1, num_blocks)))
    for s, (n, kv_len) in enumerate(zip(pages, kv_lens)):
        block_tables[s, :n] = [next(free) for _ in range(n)]
        owned[block_tables[s, :n]] = True
        last, used = block_tables[s, n - 1], kv_len - (n - 1) * block_size
        k[last, :, used:] = np.nan
        v[last, :, used:] = np.nan
    k[~owned] = np.nan
    v[~owned] = np.nan
    num_tokens = sum(q_lens) + num_padded_tokens
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim), np.float32)
    q[sum(q_lens):] = np.nan  # padded query rows must come back as zeros anyway
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)] * num_padded_seqs])
    kv = np.concatenate([kv_lens, [0] * num_padded_seqs])
    return Problem(jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
                   jnp.asarray(kv, jnp.int32), jnp.asarray(block_tables),
                   jnp.asarray(cu_q_lens, jnp.int32))


def run_both(p, **attrs):
    sm_scale = p.q.shape[-1] ** -0.5
    ref = jax.jit(lambda *a: reference.ragged_paged_attention(*a, sm_scale=sm_scale, **attrs))
    ker = jax.jit(lambda *a: cpu.ragged_paged_attention(*a, sm_scale=sm_scale, **attrs))
    return np.asarray(ref(*p.args()), np.float32), np.asarray(ker(*p.args()), np.float32)


# Decode rows (q_len 1), prefill chunks (whole or continuing a context) and lengths off block
# boundaries, from 1 token to many blocks.
MIXED_Q_LENS = [1, 1, 7, 1, 19, 3]
MIXED_KV_LENS = [1, 33, 7, 250, 40, 66]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,block_size", [
    (4, 4, 64, 16),  # MHA
    (9, 3, 64, 16),  # SmolLM2
    (8, 2, 128, 8),  # group 4, head_dim 128
    (16, 2, 64, 32),  # group 8
    (9, 3, 64, 12),  # block size off the 8-lane vectors
    (4, 2, 64, 5),  # odd block size: every block ends mid-vector
])
def test_fp32_matches_reference(num_q_heads, num_kv_heads, head_dim, block_size):
    p = make_problem(0, MIXED_Q_LENS, MIXED_KV_LENS, num_q_heads=num_q_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    ref, out = run_both(p)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not out[sum(MIXED_Q_LENS):].any(), "padded query rows must be zeros"


def test_long_prefill_and_single_long_decode():
    """A 300-token chunk after 200 cached tokens; one decode and one 8-token chunk over 1000
    tokens (too few items for the threads: block ranges are split and merged)."""
    for q_lens, kv_lens in (([300], [500]), ([1], [1000]), ([8], [1000])):
        p = make_problem(1, q_lens, kv_lens, num_q_heads=9, num_kv_heads=3, head_dim=64,
                         block_size=16)
        ref, out = run_both(p)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", [{"sliding_window": 5}, {"soft_cap": 1.5},
                                   {"sliding_window": 40, "soft_cap": 30.0}])
def test_sliding_window_and_soft_cap(attrs):
    p = make_problem(2, MIXED_Q_LENS, MIXED_KV_LENS, num_q_heads=9, num_kv_heads=3, head_dim=64,
                     block_size=16)
    ref, out = run_both(p, **attrs)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", [{}, {"sliding_window": 64}, {"sliding_window": 64, "soft_cap": 30.0}])
def test_long_prefill_tiles_skip_masks_only_where_every_key_is_visible(attrs):
    """Prefill tiles skip the masks of blocks that every real row sees whole. Chunks of 100 and
    40 tokens over longer contexts give tiles whose blocks are whole, cut by the causal edge,
    cut by the window's lower edge, or outside it, and a last tile with padded lanes."""
    p = make_problem(4, [100, 40, 1], [300, 40, 90], num_q_heads=9, num_kv_heads=3, head_dim=64,
                     block_size=16)
    ref, out = run_both(p, **attrs)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_kv_matches_reference(q_dtype):
    """bf16 pages (and optionally bf16 q): the kernel widens to fp32 exactly as the reference
    does, so the only differences are summation order and the bf16 rounding of the output:
    within 1e-2 absolute + relative (bf16 has an 8-bit mantissa)."""
    p = make_problem(3, MIXED_Q_LENS, MIXED_KV_LENS, num_q_heads=9, num_kv_heads=3, head_dim=64,
                     block_size=16, dtype=jnp.bfloat16)
    p.q = p.q.astype(q_dtype)
    ref, out = run_both(p)
    assert out.dtype == np.float32 and not np.isnan(out).any()
    tol = 1e-5 if q_dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,scale", [(jnp.int8, [0.02, 0.05, 0.03]),
                                         (jnp.float8_e4m3fn, [0.5, 0.25, 1.0]),
                                         (jnp.float8_e5m2, [0.5, 0.25, 1.0])])
def test_quantized_kv_matches_reference(dtype, scale):
    """int8 / fp8 pages hold K / k_scale and V / v_scale per KV head; both sides widen the pages
    exactly, so the tolerance is fp32's. Unused slots stay poisoned (NaN where fp8 has one)."""
    p = make_problem(7, MIXED_Q_LENS, MIXED_KV_LENS, num_q_heads=9, num_kv_heads=3, head_dim=64,
                     block_size=16)
    k_scale = jnp.asarray(scale, jnp.float32)
    v_scale = 2 * k_scale

    def quantize(pages, s):  # [NB, KVH, BS, D] -> quantize_kv's [..., KVH, D] and back
        return reference.quantize_kv(pages.transpose(0, 2, 1, 3), s, dtype).transpose(0, 2, 1, 3)

    p.k_pages, p.v_pages = quantize(p.k_pages, k_scale), quantize(p.v_pages, v_scale)
    ref, out = run_both(p, k_scale=k_scale, v_scale=v_scale)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_inside_jit_with_donated_pool_and_bit_identical_repeats():
    """write_kv + attention in one jit that donates the pool, like the model's step."""
    p = make_problem(4, [1, 12, 1], [90, 12, 17], num_q_heads=9, num_kv_heads=3, head_dim=64,
                     block_size=16, num_padded_tokens=0)
    rng = np.random.default_rng(5)
    num_tokens = p.q.shape[0]
    k_new = jnp.asarray(rng.standard_normal((num_tokens, 3, 64), np.float32))
    v_new = jnp.asarray(rng.standard_normal((num_tokens, 3, 64), np.float32))
    # Slots of each sequence's last q_len positions.
    slots = []
    for s, (q_len, kv_len) in enumerate([(1, 90), (12, 12), (1, 17)]):
        for pos in range(kv_len - q_len, kv_len):
            slots.append(int(p.block_tables[s, pos // 16]) * 16 + pos % 16)
    slot_mapping = jnp.asarray(slots, jnp.int32)

    def step(attention, k_pages, v_pages):
        k_pages, v_pages = reference.write_kv(k_pages, v_pages, k_new, v_new, slot_mapping)
        out = attention(p.q, k_pages, v_pages, p.kv_lens, p.block_tables, p.cu_q_lens,
                        sm_scale=0.125)
        return out, k_pages, v_pages

    ref_out, _, _ = jax.jit(lambda k, v: step(reference.ragged_paged_attention, k, v))(
        p.k_pages, p.v_pages)
    donated = jax.jit(lambda k, v: step(cpu.ragged_paged_attention, k, v), donate_argnums=(0, 1))
    k_pages, v_pages = jnp.copy(p.k_pages), jnp.copy(p.v_pages)
    outs = []
    for _ in range(3):
        out, k_pages, v_pages = donated(k_pages, v_pages)
        outs.append(np.asarray(out))
    np.testing.assert_allclose(outs[0], np.asarray(ref_out), rtol=1e-5, atol=1e-5)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_a_query_rows_bits_do_not_depend_on_the_batch():
    """Batch invariance: one sequence's query rows give bit-identical outputs whatever else is in
    the call and wherever its chunk starts. A lone decode token of a 773-token context (its keys
    split at 512) alone vs beside 1-15 other sequences (a split chosen by the item count would
    differ); prompt rows 512..772 in one chunk vs chunks starting at 412, 500 (a 1-token last
    tile) or 505, without and with a sliding window."""
    rng = np.random.default_rng(1)
    num_q_heads, num_kv_heads, head_dim, block_size, num_blocks = 9, 3, 64, 16, 200
    k_pages = jnp.asarray(rng.standard_normal((num_blocks, num_kv_heads, block_size, head_dim), np.float32))
    v_pages = jnp.asarray(rng.standard_normal((num_blocks, num_kv_heads, block_size, head_dim), np.float32))
    kv_len, width = 773, 64
    table = np.arange(1, 1 + width, dtype=np.int32)
    queries = rng.standard_normal((kv_len, num_q_heads, head_dim)).astype(np.float32)

    def attend(seqs, **attrs):  # [(block table, kv_len, query rows)] -> the first sequence's outputs
        q = np.concatenate([rows for _, _, rows in seqs])
        cu_q_lens = np.cumsum([0] + [len(rows) for _, _, rows in seqs]).astype(np.int32)
        out = cpu.ragged_paged_attention(
            jnp.asarray(q), k_pages, v_pages, jnp.asarray([n for _, n, _ in seqs], jnp.int32),
            jnp.asarray(np.stack([t for t, _, _ in seqs])), jnp.asarray(cu_q_lens), sm_scale=0.125,
            **attrs)
        return np.asarray(out)[:len(seqs[0][2])]

    def other(i, q_len, context):
        table = (np.arange(width, dtype=np.int32) + 100 + 10 * i) % num_blocks
        return table, context, rng.standard_normal((q_len, num_q_heads, head_dim)).astype(np.float32)

    decode = (table, kv_len, queries[-1:])
    alone = attend([decode])
    for others in ([other(0, 1, 100)], [other(i, 1, 150) for i in range(3)],
                   [other(i, 1, 300) for i in range(15)], [other(0, 50, 60)]):
        np.testing.assert_array_equal(attend([decode] + others), alone)
    chunk = attend([(table, kv_len, queries[512:])])
    for start in (412, 500, 505):
        np.testing.assert_array_equal(attend([(table, kv_len, queries[start:])])[512 - start:], chunk)
    # With a sliding window a tile's first block follows its rows, so where the chunk starts
    # moves it; the keys' softmax steps must not move with it.
    chunk = attend([(table, kv_len, queries[512:])], sliding_window=200)
    for start in (412, 500, 505):
        np.testing.assert_array_equal(
            attend([(table, kv_len, queries[start:])], sliding_window=200)[512 - start:], chunk)


def test_bad_inputs_name_the_problem():
    p = make_problem(6, [1], [5], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cpu.ragged_paged_attention(p.q[:, :3], p.k_pages, p.v_pages, p.kv_lens, p.block_tables,
                                   p.cu_q_lens, sm_scale=1.0)
    with pytest.raises(ValueError, match="head_dim"):
        cpu.ragged_paged_attention(p.q[..., :60], p.k_pages[..., :60], p.v_pages[..., :60],
                                   p.kv_lens, p.block_tables, p.cu_q_lens, sm_scale=1.0)
    with pytest.raises(ValueError, match="kv_lens must be int32"):
        cpu.ragged_paged_attention(*p.args()[:3], p.kv_lens.astype(jnp.float32),
                                   p.block_tables, p.cu_q_lens, sm_scale=1.0)


def test_failed_build_is_reported(monkeypatch, tmp_path):
    """A compiler that fails gives a BuildError naming the command, and nothing is left behind."""
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setattr(build, "candidate_dirs", lambda: [tmp_path])
    with pytest.raises(build.BuildError, match="false"):
        build.build()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("index", range(len(build.SOURCES + build.HEADERS)))
def test_build_key_follows_every_source(monkeypatch, tmp_path, index):
    compiler = build.find_compiler()
    key = build.build_key(compiler)
    files = list(build.SOURCES + build.HEADERS)
    changed = tmp_path / files[index].name
    changed.write_text(files[index].read_text() + "\n// changed\n")
    files[index] = changed
    monkeypatch.setattr(build, "SOURCES", tuple(files[:len(build.SOURCES)]))
    monkeypatch.setattr(build, "HEADERS", tuple(files[len(build.SOURCES):]))
    assert build.build_key(compiler) != key


def test_unavailable_kernel_reports_why(monkeypatch):
    """A failed build becomes load_error()'s text, and calls name the fallback backend."""
    def fail():
        raise build.BuildError("no C++ compiler found")

    monkeypatch.setattr(build, "build", fail)
    assert cpu._load.__wrapped__() == "BuildError: no C++ compiler found"
    monkeypatch.setattr(cpu, "_load", cpu._load.__wrapped__)
    p = make_problem(8, [1], [5], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler.*--attention-backend reference"):
        cpu.ragged_paged_attention(*p.args(), sm_scale=1.0)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("q_len", [1, 5], ids=["decode-rows", "prefill-lanes"])
def test_every_quantized_byte_widens_exactly(dtype, q_len):
    """All 256 byte values of a page element, read by the kernel, equal ml_dtypes' conversion to
    fp32 exactly (fp8 subnormals, e5m2 inf and NaN included). They sit in V row 0 of a
    one-block sequence whose K is zero: query row 0 sees only key 0, so its output is that row
    times v_scale 1 (exact). q_len 1 goes through the decode (rows) path, 5 through the prefill (lanes)
    path, which widen the pages differently."""
    values = np.arange(256, dtype=np.uint8).view(np.dtype(dtype))
    want = values.astype(np.float32)
    v = np.zeros((2, 1, 8, 256), np.dtype(dtype))  # [num_blocks, KVH, block_size, head_dim]
    v[1, 0, 0] = values
    k = np.zeros_like(v)
    q = jnp.ones((q_len, 1, 256), jnp.float32)
    ones = jnp.ones((1,), jnp.float32)
    out = cpu.ragged_paged_attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray([q_len], jnp.int32),
                                     jnp.asarray([[1]], jnp.int32), jnp.asarray([0, q_len], jnp.int32),
                                     sm_scale=1.0, k_scale=ones, v_scale=ones)
    got = np.asarray(out)[0, 0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite], want[finite])  # -0 reads back as +0: acc starts at +0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_write_kv_matches_reference_in_place(dtype):
    """cpu.write_kv writes exactly what reference.write_kv writes, into the donated buffer."""
    rng = np.random.default_rng(3)
    shape = (9, 2, 4, 16)  # [num_blocks, num_kv_heads, block_size, head_dim]
    pages = jnp.asarray(rng.standard_normal(shape, np.float32) * 4, dtype)
    k = jnp.asarray(rng.standard_normal((6, 2, 16), np.float32) * 4)
    v = k * -0.5
    slots = jnp.asarray([5, 6, 7, 33, 0, 0], jnp.int32)  # two padded tokens write the null block
    scale = None if dtype in (jnp.float32, jnp.bfloat16) else jnp.asarray([0.5, 2.0], jnp.float32)
    want = jax.jit(functools.partial(reference.write_kv, k_scale=scale, v_scale=scale))(pages, pages, k, v, slots)
    write = jax.jit(functools.partial(cpu.write_kv, k_scale=scale, v_scale=scale), donate_argnums=(0, 1))
    k_pages, v_pages = pages + 0, pages + 0
    pointer = k_pages.unsafe_buffer_pointer()
    got = write(k_pages, v_pages, k, v, slots)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.asarray(w.astype(jnp.float32)), np.asarray(g.astype(jnp.float32)))
    assert got[0].unsafe_buffer_pointer() == pointer
