"""The C++ CPU matmul over packed weight panels (float32, bfloat16 with pairs of rows
interleaved, and q4 / q8 block-quantized for float32 x) against numpy and the pure-JAX reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_HF_CONFIG

from jpaged.models import llama, quantization
from jpaged.models.config import ModelConfig
from pallas_kernels import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"no CPU kernel: {cpu.load_error()}")

# (M, K, N): decode and prefill row counts, remainders of every row block (8, 4, 2, 1), a last
# panel narrower than 48 columns, K past four 256-row chunks, M past one 256-row chunk. Every K
# is even, as bfloat16 panels need.
SHAPES = [(1, 576, 576), (3, 64, 48), (7, 40, 100), (16, 576, 192), (15, 1536, 576), (64, 96, 1),
          (300, 72, 130), (513, 24, 49), (5, 1030, 97)]

packed_matmul = jax.jit(cpu.packed_matmul, static_argnums=2)


DTYPES = [jnp.float32, jnp.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_integer_products_are_exact(m, k, n, dtype):
    """Small integers are exact in bf16 and multiply and add exactly in f32 in any order, so
    every output must equal numpy's integer product: a wrong row, column, panel, pair of rows or
    K chunk shows as a mismatch."""
    rng = np.random.default_rng(m * 7 + n)
    x = rng.integers(-4, 5, (m, k))
    w = rng.integers(-4, 5, (k, n))
    got = packed_matmul(jnp.asarray(x, dtype), reference.pack_panels(jnp.asarray(w, dtype)), n)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), (x @ w).astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_float_products_match_numpy_and_reference(m, k, n, dtype):
    """Against the float64 product of the same (for bf16: rounded) operands: both accumulate in
    float32, so the error bound is float32's whatever the operands' dtype."""
    rng = np.random.default_rng(m + n)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    panels = reference.pack_panels(w)
    expect = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    tol = 1e-5 * np.sqrt(k) * np.abs(expect).max()
    np.testing.assert_allclose(np.asarray(packed_matmul(x, panels, n)), expect, rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(reference.packed_matmul(x, panels, n)), expect, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [0, 1, 9, 140, 300, -2])
def test_num_rows_multiplies_the_first_rows_and_zeros_the_rest(num_rows, dtype):
    """With num_rows (traced), the first rows equal the full product bit for bit (the same
    additions in the same order) and the rest are zeros; the count is clamped to [0, M]. The
    reference does the same."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.integers(-4, 5, (260, 96)), dtype)
    w = jnp.asarray(rng.standard_normal((96, 130)), dtype)
    panels = reference.pack_panels(w)
    full = np.asarray(packed_matmul(x, panels, 130))
    got = np.asarray(jax.jit(cpu.packed_matmul, static_argnums=2)(x, panels, 130, jnp.int32(num_rows)))
    real = min(max(num_rows, 0), 260)
    np.testing.assert_array_equal(got[:real], full[:real])
    assert not got[real:].any()
    expect = np.asarray(reference.packed_matmul(x, panels, 130, jnp.int32(num_rows)))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-4)
    assert not expect[real:].any()
    with pytest.raises(ValueError, match="scalar"):
        cpu.packed_matmul(x, panels, 130, jnp.ones((2,), jnp.int32))


# (M, K, N) for quantized panels, K a multiple of 32: the row-block remainders, a narrow last
# panel, K past several 256-row chunks, M past one 256-row chunk, and both sides of the row
# limits of the in-register path (4 with AVX2, 16 with AVX-512).
QUANT_SHAPES = [(1, 576, 576), (3, 64, 48), (7, 32, 100), (16, 576, 192), (15, 1536, 576), (4, 96, 144),
                (6, 64, 48), (17, 64, 48), (300, 96, 130), (513, 32, 49), (5, 1056, 97)]


def _random_blocks(bits, k, n, seed):
    """(values, scale, offset or None) of random q4 / q8 weights [k, n] with f16-valued scales."""
    rng = np.random.default_rng(seed)
    f16 = lambda shape, s: (rng.standard_normal(shape) * s).astype(np.float16).astype(np.float32)  # noqa: E731
    if bits == 4:
        return rng.integers(0, 16, (k, n)).astype(np.uint8), f16((k // 32, n), 0.01), f16((k // 32, n), 0.05)
    return rng.integers(-128, 128, (k, n)).astype(np.int8), f16((k // 32, n), 0.01), None


def _pack_blocks(bits, values, scale, offset):
    if bits == 4:
        panels, scale, offset = reference.pack_q4_panels(values, scale, offset)
        return panels, dict(scale=scale, offset=offset)
    panels, scale = reference.pack_q8_panels(values, scale)
    return panels, dict(scale=scale)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n", QUANT_SHAPES)
def test_quantized_panels_give_the_dequantized_weights_results_bit_for_bit(m, k, n, bits):
    """q4 / q8 panels are dequantized into exactly the float32 panels of w = value * scale
    (+ offset) and multiplied the same way: the output equals that of pack_panels(w) bit for
    bit, and numpy's float64 product of w within float32's bound; the reference agrees."""
    values, scale, offset = _random_blocks(bits, k, n, seed=m + n + bits)
    w = values.astype(np.float32) * np.repeat(scale, 32, axis=0)
    if offset is not None:
        w = w + np.repeat(offset, 32, axis=0)
    panels, scales = _pack_blocks(bits, values, scale, offset)
    np.testing.assert_array_equal(np.asarray(reference.unpack_panels(panels, n, **scales)), w)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.float32)
    got = np.asarray(jax.jit(cpu.packed_matmul, static_argnums=2)(x, panels, n, **scales))
    np.testing.assert_array_equal(got, np.asarray(packed_matmul(x, reference.pack_panels(w), n)))
    expect = np.asarray(x, np.float64) @ w.astype(np.float64)
    tol = 1e-5 * np.sqrt(k) * np.abs(expect).max()
    np.testing.assert_allclose(got, expect, rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(reference.packed_matmul(x, panels, n, **scales)), expect, rtol=0, atol=tol)
    rows = jnp.int32(m // 2)
    part = np.asarray(cpu.packed_matmul(x, panels, n, rows, **scales))
    np.testing.assert_array_equal(part[:m // 2], got[:m // 2])
    assert not part[m // 2:].any()


@pytest.mark.parametrize("m,k,n", [(1, 576, 576), (17, 64, 48), (40, 1536, 100), (300, 96, 130), (513, 32, 49)])
def test_q4_rows_after_vector_rows_are_exact_on_integers(m, k, n):
    """Rows from vector_rows on take AMX tiles where the CPU has them (x split into three
    bfloat16, nibbles as bfloat16, scale and offset applied per GGUF block), the others the
    vector path. With small integer x, nibbles, scales and offsets every product and sum is
    exact on both paths, so each output must equal numpy's integer product: a wrong tile, piece,
    pair of k, block sum, row block or panel column shows as a mismatch."""
    rng = np.random.default_rng(m + k)
    values = rng.integers(0, 16, (k, n)).astype(np.uint8)
    scale = rng.integers(1, 4, (k // 32, n)).astype(np.float32)
    offset = rng.integers(-8, 1, (k // 32, n)).astype(np.float32)
    w = values.astype(np.int64) * np.repeat(scale, 32, axis=0).astype(np.int64) + np.repeat(offset, 32, axis=0)
    x = rng.integers(-300, 301, (m, k))  # 9 significant bits: the mid piece is not empty
    panels, scales = _pack_blocks(4, values, scale, offset)
    for vector_rows in (0, m // 3, m):
        got = jax.jit(cpu.packed_matmul, static_argnums=2)(jnp.asarray(x, jnp.float32), panels, n,
                                                             vector_rows=jnp.int32(vector_rows), **scales)
        np.testing.assert_array_equal(np.asarray(got), (x @ w).astype(np.float32), err_msg=f"vector_rows {vector_rows}")


def test_q4_a_rows_result_depends_only_on_its_side_of_vector_rows():
    """Random floats: rows before vector_rows equal the vector path's bit for bit; rows after it
    equal their own product computed with every row on the tiles, in any batch (the last rows
    alone), and stay within float32's bound of the float64 product, as the reference does."""
    m, k, n = 300, 576, 100
    values, scale, offset = _random_blocks(4, k, n, seed=11)
    panels, scales = _pack_blocks(4, values, scale, offset)
    x = jnp.asarray(np.random.default_rng(12).standard_normal((m, k)), jnp.float32)
    matmul = jax.jit(cpu.packed_matmul, static_argnums=2)
    vector = np.asarray(matmul(x, panels, n, **scales))
    tiles = np.asarray(matmul(x, panels, n, vector_rows=jnp.int32(0), **scales))
    split = np.asarray(matmul(x, panels, n, vector_rows=jnp.int32(120), **scales))
    np.testing.assert_array_equal(split[:120], vector[:120])
    np.testing.assert_array_equal(split[120:], tiles[120:])
    for rows in (1, 5, 16, 17, 40, 299):
        np.testing.assert_array_equal(np.asarray(matmul(x[-rows:], panels, n, vector_rows=jnp.int32(0), **scales)),
                                      tiles[-rows:], err_msg=f"{rows} rows")
    w = values.astype(np.float64) * np.repeat(scale, 32, axis=0) + np.repeat(offset, 32, axis=0)
    expect = np.asarray(x, np.float64) @ w
    tol = 1e-5 * np.sqrt(k) * np.abs(expect).max()
    np.testing.assert_allclose(tiles, expect, rtol=0, atol=tol)
    # As close to the exact sums as the vector path (x's three pieces hold all 24 bits of it):
    # errors relative to sum |x| |w|, ~4e-9 against ~1e-8; a dropped low piece gives ~1e-6.
    magnitude = np.abs(np.asarray(x, np.float64)) @ np.abs(w)
    assert np.mean(np.abs(tiles - expect) / magnitude) <= 2 * np.mean(np.abs(vector - expect) / magnitude)
    with pytest.raises(ValueError, match="scalar"):
        cpu.packed_matmul(x, panels, n, vector_rows=jnp.ones((2,), jnp.int32), **scales)


def test_q4_panels_pair_rows_in_nibbles():
    """q4 panel p, byte (i, c) holds rows 2i (low nibble) and 2i + 1 (high) of column 48p + c;
    each 32-row block of a column has one scale and offset; padded columns are all zeros."""
    values = (np.arange(64 * 100) % 16).astype(np.uint8).reshape(64, 100)
    scale = np.arange(2 * 100, dtype=np.float32).reshape(2, 100)
    panels, scales, offsets = reference.pack_q4_panels(values, scale, -scale)
    assert panels.shape == (3, 32, 48) and panels.dtype == jnp.uint8 and scales.shape == (3, 2, 48)
    panels = np.asarray(panels)
    np.testing.assert_array_equal(panels[1, 5] & 0xF, values[10, 48:96])
    np.testing.assert_array_equal(panels[1, 5] >> 4, values[11, 48:96])
    np.testing.assert_array_equal(np.asarray(scales)[2, 1, :4], scale[1, 96:])
    np.testing.assert_array_equal(np.asarray(offsets)[0, 0], -scale[0, :48])
    assert not panels[2, :, 4:].any() and not np.asarray(scales)[2, :, 4:].any()


def test_bad_quantized_operands_are_refused():
    panels, scales = _pack_blocks(4, *_random_blocks(4, 64, 100, seed=0))
    q8_panels, q8_scales = _pack_blocks(8, *_random_blocks(8, 64, 100, seed=0))
    with pytest.raises(ValueError, match="float32 x"):
        cpu.packed_matmul(jnp.ones((2, 64), jnp.bfloat16), panels, 100, **scales)
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu.packed_matmul(jnp.ones((2, 48)), panels, 100, **scales)
    with pytest.raises(ValueError, match="q4"):
        cpu.packed_matmul(jnp.ones((2, 64)), panels, 100, scale=scales["scale"])  # no offset
    with pytest.raises(ValueError, match="q8"):
        cpu.packed_matmul(jnp.ones((2, 64)), q8_panels, 100, scale=q8_scales["scale"], offset=q8_scales["scale"])
    with pytest.raises(ValueError, match="out_features 150"):
        cpu.packed_matmul(jnp.ones((2, 64)), q8_panels, 150, **q8_scales)
    with pytest.raises(ValueError, match="multiple of 32"):
        reference.pack_q8_panels(np.ones((40, 8), np.int8), np.ones((1, 8), np.float32))


def test_panels_layout():
    """Panel p holds columns 48p.. of w, row by row; the last one is padded with zeros."""
    w = np.arange(5 * 100, dtype=np.float32).reshape(5, 100)
    panels = np.asarray(reference.pack_panels(w))
    assert panels.shape == (3, 5, reference.PANEL_WIDTH)
    np.testing.assert_array_equal(panels[1], w[:, 48:96])
    np.testing.assert_array_equal(panels[2, :, :4], w[:, 96:])
    assert not panels[2, :, 4:].any()


def test_bfloat16_panels_interleave_pairs_of_rows():
    """bf16 panel p, pair i holds rows 2i and 2i + 1 of columns 48p.., column by column."""
    w = jnp.asarray(np.arange(6 * 100).reshape(6, 100), jnp.bfloat16)
    panels = reference.pack_panels(w)
    assert panels.shape == (3, 3, reference.PANEL_WIDTH, 2) and panels.dtype == jnp.bfloat16
    panels, w = np.asarray(panels, np.float32), np.asarray(w, np.float32)
    np.testing.assert_array_equal(panels[1, 2, :, 0], w[4, 48:96])
    np.testing.assert_array_equal(panels[1, 2, :, 1], w[5, 48:96])
    np.testing.assert_array_equal(panels[2, 0, :4], w[0:2, 96:].T)
    assert not panels[2, :, 4:].any()
    np.testing.assert_array_equal(np.asarray(reference.unpack_panels(reference.pack_panels(w), 100)), w)
    with pytest.raises(ValueError, match="odd"):
        reference.pack_panels(jnp.ones((5, 8), jnp.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    """Each row's sums are its own, whichever row block (or AMX tile) holds it, so a sequence's
    logits do not depend on the batch it runs in: the last rows alone, in decode- and
    prefill-sized batches, give the same bits as in the full product."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((300, 576)), dtype)
    panels = reference.pack_panels(jnp.asarray(rng.standard_normal((576, 100)), dtype))
    full = np.asarray(packed_matmul(x, panels, 100))
    for m in (1, 5, 16, 17, 40, 299):
        np.testing.assert_array_equal(np.asarray(packed_matmul(x[-m:], panels, 100)), full[-m:], err_msg=f"{m} rows")


def test_results_repeat_bit_for_bit():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 576), np.float32)
    panels = reference.pack_panels(rng.standard_normal((576, 1536), np.float32))
    first = np.asarray(packed_matmul(x, panels, 1536))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(packed_matmul(x, panels, 1536)), first)


def test_bad_operands_are_refused():
    panels = reference.pack_panels(np.ones((8, 100), np.float32))
    with pytest.raises(ValueError, match="panels"):
        cpu.packed_matmul(jnp.ones((2, 9)), panels, 100)
    with pytest.raises(ValueError, match="panels"):
        cpu.packed_matmul(jnp.ones((2, 8)), panels, 150)
    with pytest.raises(ValueError, match="same dtype"):
        cpu.packed_matmul(jnp.ones((2, 8), jnp.bfloat16), panels, 100)
    bf16_panels = reference.pack_panels(jnp.ones((8, 100), jnp.bfloat16))
    with pytest.raises(ValueError, match="same dtype"):
        cpu.packed_matmul(jnp.ones((2, 8)), bf16_panels, 100)
    with pytest.raises(ValueError, match="K / 2"):
        cpu.packed_matmul(jnp.ones((2, 9), jnp.bfloat16), bf16_panels, 100)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_over_packed_weight_equals_plain_weight(dtype):
    """quantization.linear takes any leading axes and a bias, as for a plain [in, out] weight,
    and returns x's dtype."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.integers(-3, 4, (2, 5, 40)), dtype)
    w = jnp.asarray(rng.integers(-3, 4, (40, 70)), dtype)
    bias = jnp.asarray(rng.integers(-3, 4, (70,)), dtype)
    packed = quantization.pack_linears({"embed": jnp.ones((3, 4)), "layers": [{"q_proj": w}]})
    weight = packed["layers"][0]["q_proj"]
    assert isinstance(weight, quantization.PackedWeight) and weight.shape == (40, 70)
    got = jax.jit(quantization.linear)(x, weight, bias)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(quantization.linear(x, w, bias), np.float32))


def test_pack_linears_keeps_what_it_cannot_pack():
    """Quantized weights, norms and bf16 weights with an odd `in` stay; f32 and bf16 linears are
    packed; a tied embedding gains a packed lm_head in its dtype."""
    rng = np.random.default_rng(3)
    embed = jnp.asarray(rng.standard_normal((50, 8)), jnp.float32)
    layer = {"o_proj": jnp.ones((7, 8), jnp.bfloat16), "input_norm": jnp.ones((8,)),
             "k_proj": quantization.quantize(np.ones((8, 8)), "int8")}
    packed = quantization.pack_linears({"embed": embed, "layers": [dict(layer, q_proj=jnp.ones((8, 6), jnp.bfloat16))]})
    assert {name: w for name, w in packed["layers"][0].items() if name != "q_proj"} == layer
    assert packed["layers"][0]["q_proj"].panels.dtype == jnp.bfloat16 and packed["embed"] is embed
    np.testing.assert_array_equal(
        np.asarray(reference.packed_matmul(jnp.eye(8), packed["lm_head"].panels, 50)), np.asarray(embed.T))
    tied_bf16 = quantization.pack_linears({"embed": embed.astype(jnp.bfloat16), "layers": []})
    assert tied_bf16["lm_head"].panels.dtype == jnp.bfloat16 and tied_bf16["lm_head"].shape == (8, 50)
    quantized = quantization.quantize(np.ones((50, 8)), "int8")
    assert "lm_head" not in quantization.pack_linears({"embed": quantized, "layers": []})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_lm_head_uses_packed_copy_up_to_its_row_limit(dtype):
    """compute_logits reads a tied embedding's packed copy up to PACKED_LM_HEAD_MAX_ROWS rows
    and XLA's dot over the embedding beyond, with the same logits either way."""
    config = ModelConfig.from_hf_config(TINY_HF_CONFIG, dtype=dtype)
    params = quantization.pack_linears(llama.init_params(config, jax.random.key(0)))
    assert config.tie_word_embeddings and isinstance(params["lm_head"], quantization.PackedWeight)
    limit = llama.PACKED_LM_HEAD_MAX_ROWS
    hidden = jnp.asarray(np.random.default_rng(4).standard_normal((limit + 1, config.hidden_size)), config.dtype)

    def logits_and_kernel_calls(rows):
        fn = functools.partial(llama.compute_logits, params, config)
        return np.asarray(fn(rows)), str(jax.make_jaxpr(fn)(rows)).count(cpu.PACKED_MATMUL_TARGET)  # either dtype's target

    at_limit, at_limit_calls = logits_and_kernel_calls(hidden[:limit])
    beyond, beyond_calls = logits_and_kernel_calls(hidden)
    assert (at_limit_calls, beyond_calls) == (1, 0)
    np.testing.assert_allclose(beyond[:limit], at_limit, rtol=1e-5, atol=1e-5)


def test_lm_head_skips_the_rows_after_num_rows():
    """compute_logits with num_rows (the runner passes a step's real sequence count) gives the
    same logits for those rows, and the packed lm_head does not compute the padding after them."""
    config = ModelConfig.from_hf_config(TINY_HF_CONFIG, dtype="float32")
    params = quantization.pack_linears(llama.init_params(config, jax.random.key(0)))
    hidden = jnp.asarray(np.random.default_rng(5).standard_normal((8, config.hidden_size)), jnp.float32)
    full = np.asarray(llama.compute_logits(params, config, hidden))
    real = np.asarray(llama.compute_logits(params, config, hidden, jnp.int32(3)))
    np.testing.assert_array_equal(real[:3], full[:3])
    assert full[3:].any() and not real[3:].any()
