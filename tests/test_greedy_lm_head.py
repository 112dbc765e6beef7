"""The C++ greedy lm_head (pallas_kernels/cpu/greedy_lm_head.cc) against its oracle: argmax over
the packed matmul's logits of the same Q8_0 weights, ids and logits bit for bit; and the model
and runner paths that use it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.loaders import load_model
from jpaged.models import llama, quantization
from pallas_kernels import cpu, reference

needs_kernel = pytest.mark.skipif(not cpu.greedy_lm_head_supported(),
                                  reason=f"no greedy lm_head kernel on this CPU (needs AVX512-VNNI or AVX2): {cpu.load_error()}")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _q8_lm_head(vocab, k, seed):
    """values i8[vocab, k] and f16 scales [vocab, k / 32] like a GGUF Q8_0 tensor's (each block's
    largest |value| 127), with a spread of row norms so that some entries stand out."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((vocab, k)) * rng.uniform(0.2, 2.0, (vocab, 1)) * 0.05
    blocks = w.reshape(vocab, -1, 32)
    scale = (np.abs(blocks).max(-1) / 127).astype(np.float16)
    values = np.clip(np.rint(blocks / scale.astype(np.float64)[..., None]), -127, 127).astype(np.int8)
    return values.reshape(vocab, k), scale


def _hidden(m, k, seed):
    """f32[m, k] with a few large outlier channels, as final hidden states have."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((m, k)).astype(np.float32)
    h[:, rng.choice(k, 3, replace=False)] *= 30
    return h


def _float_rows(values, scale, seed):
    """Float32 rows near the Q8_0 ones, off their int8 grid (as a float checkpoint's are)."""
    w = values.astype(np.float32) * np.repeat(scale.astype(np.float32), 32, axis=1)
    noise = np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32)
    return (w + noise * np.abs(w).mean() * 0.3).astype(np.float32)


def _oracle(hidden, values, scale=None):
    """(argmax ids, logits) of cpu.packed_matmul over the q8 panels (or, with scale None, the
    float32 panels) of the same weights."""
    if scale is None:
        panels, kwargs = reference.pack_panels(jnp.asarray(values).T), {}
    else:
        panels, panel_scale = reference.pack_q8_panels(values.T, scale.astype(np.float32).T)
        kwargs = dict(scale=panel_scale)
    logits = np.asarray(cpu.packed_matmul(jnp.asarray(hidden), panels, values.shape[0], **kwargs))
    return np.argmax(logits, axis=-1), logits


def _greedy(hidden, values, scale=None, num_rows=None):
    """The kernel over Q8_0 rows (values, scale) or float32 rows (values, scale None)."""
    rows = (jnp.asarray(values),) + (() if scale is None else (jnp.asarray(scale),))
    packed = reference.pack_greedy_lm_head(*rows)
    num_rows = hidden.shape[0] if num_rows is None else num_rows
    ids, logits = jax.jit(cpu.greedy_lm_head)(jnp.asarray(hidden), num_rows, *packed, *rows)
    return np.asarray(ids), np.asarray(logits)


@needs_kernel
@pytest.mark.parametrize("rows", ["q8_0", "float32"])
@pytest.mark.parametrize("m,vocab,k", [(1, 1000, 128), (5, 777, 64), (17, 2048, 96), (70, 1000, 128)])
def test_ids_and_logits_are_the_packed_matmul_argmax_bit_for_bit(m, vocab, k, rows):
    """Every row's id is argmax over the packed matmul's logits (vocab not a multiple of the
    16-entry tile, more rows than one pass of 64; Q8_0 rows and float32 rows off the int8 grid)
    and its logit that logit bit for bit; the reference, which computes every logit with
    jnp.dot, picks the same ids."""
    values, scale = _q8_lm_head(vocab, k, seed=m + vocab)
    weights = (values, scale) if rows == "q8_0" else (_float_rows(values, scale, seed=m), None)
    hidden = _hidden(m, k, seed=k)
    expect_ids, logits = _oracle(hidden, *weights)
    ids, best = _greedy(hidden, *weights)
    np.testing.assert_array_equal(ids, expect_ids)
    np.testing.assert_array_equal(best.view(np.int32), logits[np.arange(m), expect_ids].view(np.int32))
    operands = [jnp.asarray(w) for w in weights if w is not None]
    ref_ids, ref_best = reference.greedy_lm_head(jnp.asarray(hidden), m, *reference.pack_greedy_lm_head(*operands),
                                                 *operands)
    np.testing.assert_array_equal(np.asarray(ref_ids), expect_ids)
    np.testing.assert_allclose(np.asarray(ref_best), best, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", ["q8_0", "float32"])
def test_many_close_entries_and_ties_resolve_as_argmax_does(rows):
    """Entries that differ in one value of one block (hundreds of candidates within the bound of
    each other), and exact duplicates of the winner before and after it: the id is still the
    packed matmul's argmax, the first of equal logits."""
    vocab, k = 600, 64
    values, scale = _q8_lm_head(vocab, k, seed=3)
    rng = np.random.default_rng(4)
    base = values[10].copy()
    for v in range(100, 400):  # near copies of entry 10, each nudged by one step in one place
        values[v] = base
        j = rng.integers(k)
        values[v, j] = np.clip(int(base[j]) + rng.choice([-1, 1]), -127, 127)
        scale[v] = scale[10]
    values[[5, 500]] = base  # exact copies: ties with entry 10, one before it
    scale[[5, 500]] = scale[10]
    hidden = np.tile(base.astype(np.float32) * 0.01, (4, 1)) + _hidden(4, k, seed=5) * 0.01
    weights = (values, scale) if rows == "q8_0" else (values * np.float32(0.01), None)  # float rows on the grid
    expect_ids, logits = _oracle(hidden, *weights)
    ids, best = _greedy(hidden, *weights)
    np.testing.assert_array_equal(ids, expect_ids)
    np.testing.assert_array_equal(best.view(np.int32), logits[np.arange(4), expect_ids].view(np.int32))
    exact_copy = _greedy(np.tile(base.astype(np.float32), (1, 1)), weights[0][[10, 5]],
                         None if scale is None or rows != "q8_0" else scale[[10, 5]])[0]
    assert exact_copy[0] == 0  # two equal logits: the first index


@needs_kernel
def test_rows_after_num_rows_zero_and_odd_rows_follow_argmax():
    """Rows from num_rows on get id 0 and logit 0; a zero row (every logit 0) gets id 0, and a
    row with a NaN the first NaN logit's id, as jnp.argmax gives over the packed matmul's logits."""
    vocab, k = 300, 64
    values, scale = _q8_lm_head(vocab, k, seed=7)
    hidden = _hidden(6, k, seed=8)
    hidden[1] = 0.0
    hidden[2, 5] = np.nan
    hidden[3, 7] = np.inf
    ids, best = _greedy(hidden, values, scale, num_rows=5)
    expect_ids, logits = _oracle(hidden[:5], values, scale)
    np.testing.assert_array_equal(ids[:5], np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    assert ids[1] == 0 and best[1] == 0.0 and np.isnan(best[2])
    assert ids[5] == 0 and best[5] == 0.0
    np.testing.assert_array_equal(ids[[0, 4]], expect_ids[[0, 4]])


def test_reference_packs_int8_blocks_and_computes_every_logit():
    """The pure-JAX reference (every CPU): pack_greedy_lm_head's values are q + 128 with 16
    entries side by side, its bounds |d| sum |q| / 2, float rows' errors bound their rounding;
    greedy_lm_head is argmax over the dequantized weights' logits."""
    values, scale = _q8_lm_head(40, 64, seed=2)
    packed, packed_scale, bound, error = reference.pack_greedy_lm_head(jnp.asarray(values), jnp.asarray(scale))
    assert error is None and packed.shape == (3, 16, 16, 4) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(packed)[1, 2, 5], values[16 + 5, 8:12].astype(np.int32) + 128)
    np.testing.assert_array_equal(np.asarray(packed)[2, :, 8:], 128)  # entries 40..47 are padding
    np.testing.assert_allclose(np.asarray(bound)[0, 1, 3],
                               abs(float(scale[3, 1])) * np.abs(values[3, 32:64].astype(np.int64)).sum() / 2, rtol=1e-6)
    w = _float_rows(values, scale, seed=3)
    q, d, _, err = (np.asarray(a) for a in reference.pack_greedy_lm_head(jnp.asarray(w)))
    rebuilt = q.astype(np.float32) - 128  # [T, K / 4, 16, 4]
    rebuilt = rebuilt.transpose(0, 2, 1, 3).reshape(-1, 64)[:40] * np.repeat(d.transpose(0, 2, 1).reshape(-1, 2)[:40], 32, 1)
    worst = np.abs(w - rebuilt).reshape(40, 2, 32).max(-1)
    assert (worst <= err.transpose(0, 2, 1).reshape(-1, 2)[:40]).all()
    hidden = _hidden(3, 64, seed=4)
    dequantized = values.astype(np.float32) * np.repeat(scale.astype(np.float32), 32, axis=1)
    ids, best = reference.greedy_lm_head(jnp.asarray(hidden), 2, packed, packed_scale, bound, None,
                                         jnp.asarray(values), jnp.asarray(scale))
    logits = hidden @ dequantized.T
    np.testing.assert_array_equal(np.asarray(ids), [*np.argmax(logits[:2], -1), 0])
    np.testing.assert_allclose(np.asarray(best)[:2], logits[:2].max(-1), rtol=1e-5)


@needs_kernel
def test_bad_operands_are_refused():
    values, scale = _q8_lm_head(64, 64, seed=1)
    packed = reference.pack_greedy_lm_head(jnp.asarray(values), jnp.asarray(scale))
    with pytest.raises(ValueError, match="greedy_lm_head needs float32 hidden"):
        cpu.greedy_lm_head(jnp.zeros((2, 32), jnp.float32), 2, *packed, jnp.asarray(values), jnp.asarray(scale))
    with pytest.raises(ValueError, match="f16 scales"):
        cpu.greedy_lm_head(jnp.zeros((2, 64), jnp.float32), 2, *packed, jnp.asarray(values),
                           jnp.asarray(scale, jnp.float32))
    with pytest.raises(ValueError, match=r"error None for i8 rows\); got .* error None"):  # float rows need it
        cpu.greedy_lm_head(jnp.zeros((2, 64), jnp.float32), 2, *packed, jnp.zeros((64, 64), jnp.float32))
    with pytest.raises(ValueError, match="pack_greedy_lm_head needs lm_head"):
        reference.pack_greedy_lm_head(jnp.zeros((64, 40), jnp.float32))


@needs_kernel
def test_model_greedy_ids_use_the_kernel_and_equal_the_logits_argmax(tiny):
    """pack_linears gives a Q8_0 lm_head or a tied float32 embedding in a float32 step its
    `lm_head_greedy` operands (not in bfloat16, nor for an untied float lm_head), and the model's
    compute_greedy_ids over them equals the argmax of its compute_logits, whether the kernel
    runs or not."""
    config = tiny.config
    values, scale = _q8_lm_head(config.vocab_size, config.hidden_size, seed=11)
    params = {**tiny.params, "embed": quantization.QuantizedWeight(jnp.asarray(values), jnp.asarray(scale), None,
                                                                  "q8_0")}
    packed = quantization.pack_linears(params)
    assert isinstance(packed["lm_head_greedy"], quantization.GreedyLmHead)
    assert "lm_head_greedy" not in quantization.pack_linears(params, dtype="bfloat16")
    tied_float = quantization.pack_linears(tiny.params)  # the tiny model's tied float32 embedding
    assert tied_float["lm_head_greedy"].row_scale is None
    untied = {**tiny.params, "lm_head": jnp.asarray(tiny.params["embed"]).T}  # [hidden, vocab]: not rows
    assert "lm_head_greedy" not in quantization.pack_linears(untied)
    model = llama.LlamaForCausalLM(config)
    hidden = jnp.asarray(_hidden(9, config.hidden_size, seed=12))

    def both(params, num_rows):
        ids = model.apply({"params": params}, hidden, num_rows, method=model.compute_greedy_ids)
        logits = model.apply({"params": params}, hidden, num_rows, method=model.compute_logits)
        return ids, jnp.argmax(logits, axis=-1)

    for p in (packed, tied_float, {k: v for k, v in packed.items() if k != "lm_head_greedy"}):
        ids, expect = jax.jit(both)(p, jnp.int32(7))
        np.testing.assert_array_equal(np.asarray(ids)[:7], np.asarray(expect)[:7])


@needs_kernel
def test_engine_rounds_with_the_kernel_sample_what_single_steps_sample(smollm2_path):
    """The bundled SmolLM2 (Q8_0 embedding tied to the lm_head): multi-step decode rounds, whose
    all-greedy batches take their ids from the kernel, give the tokens that single steps (every
    logit, then the sampler's argmax) give, also beside a seeded sampled request, whose tokens
    are unchanged too."""
    from jpaged import LLM, SamplingParams

    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 339, 1185, 253, 1690, 30, 1249], [1, 2683, 28]]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    kwargs = dict(max_model_len=128, max_num_seqs=4, compilation_cache_dir="", seed=0)
    outputs = {}
    for steps in (1, 4):
        llm = LLM(smollm2_path, num_scheduler_steps=steps, **kwargs)
        assert "lm_head_greedy" in llm.llm_engine.runner.params
        outputs[steps] = [[o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts] * 2 if mixed else [{"prompt_token_ids": p} for p in prompts],
            [greedy] * 3 + ([greedy, greedy, sampled] if mixed else []), use_tqdm=False)] for mixed in (False, True)]
        del llm
    assert outputs[4] == outputs[1]
    only_greedy, mixed = outputs[4]
    assert mixed[:5] == only_greedy + only_greedy[:2]


@needs_kernel
def test_refresh_packs_the_greedy_operands_again_from_their_rows(tiny):
    """A transformed copy of packed params (what update_weights accepts) gets int8 operands that
    follow its rows, not the transformed old ones."""
    packed = quantization.pack_linears(tiny.params)
    doubled = jax.tree.map(lambda x: x * 2, packed)  # the u8 values wrap around: stale
    refreshed = quantization.refresh_greedy_lm_head(doubled)["lm_head_greedy"]
    expect = quantization.pack_linears({**tiny.params, "embed": tiny.params["embed"] * 2})["lm_head_greedy"]
    for got, want in zip(jax.tree.leaves(refreshed), jax.tree.leaves(expect)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert quantization.refresh_greedy_lm_head(tiny.params) is tiny.params
