"""The logprobs of a step: `reference.logprob_outputs` and the C++ kernel against a float64
numpy oracle (log-softmax, a stable sort for the top list, a count for the rank)."""

import functools

import jax
import numpy as np
import pytest

from pallas_kernels import cpu, reference

implementations = [
    pytest.param(reference.logprob_outputs, id="reference"),
    pytest.param(cpu.logprob_outputs, id="cpu", marks=pytest.mark.skipif(
        not cpu.is_available(), reason=f"CPU kernels unavailable: {cpu.load_error()}")),
]


def oracle(scores, token_ids, wanted, num_top, normalize):
    """float64 values, then what the contract asks of them: the chosen value, 1 + the count of
    values above it, the num_top largest (ties by lower id); zeros where not wanted."""
    x = scores.astype(np.float64)
    values = x - x.max(axis=1, keepdims=True)
    values -= np.log(np.exp(values).sum(axis=1, keepdims=True))
    values = values if normalize else x
    rows = np.arange(len(x))
    chosen = values[rows, token_ids]
    ranks = 1 + (values > chosen[:, None]).sum(axis=1)
    top_ids = np.argsort(-values, axis=1, kind="stable")[:, :num_top]
    top = np.take_along_axis(values, top_ids, axis=1)
    keep = wanted[:, None]
    return (np.where(wanted, chosen, 0), np.where(wanted, ranks, 0), np.where(keep, top, 0), np.where(keep, top_ids, 0))


def rows_with_ties(rng, num_rows, vocab):
    """Logits in steps of 1/8 (exact ties, gaps far above float32 rounding), a row with -inf
    entries, one with fewer finite entries than any top list asks for, one ascending (every
    score enters the top list) and one constant."""
    x = np.round(rng.normal(0, 3, (num_rows, vocab)) * 8) / 8
    x[1, ::3] = -np.inf
    x[2, :] = -np.inf
    x[2, [5 % vocab, vocab - 1]] = [1.0, 2.0]
    x[3] = np.arange(vocab) / 8
    x[4] = 0.5
    return x.astype(np.float32)


@pytest.mark.parametrize("fn", implementations)
@pytest.mark.parametrize("vocab,num_top", [(7, 3), (7, 7), (32, 0), (32, 20), (49152, 20), (262144, 5)])
@pytest.mark.parametrize("normalize", [True, False])
def test_against_float64_oracle(fn, vocab, num_top, normalize):
    rng = np.random.default_rng(vocab + num_top)
    scores = rows_with_ties(rng, 9, vocab)
    token_ids = rng.integers(0, vocab, 9).astype(np.int32)
    token_ids[1] = 1  # an id with a finite score in the row with -inf entries
    token_ids[2] = 5 % vocab
    wanted = np.ones(9, bool)
    wanted[[6, 8]] = False
    got = jax.jit(functools.partial(fn, num_top=num_top, normalize=normalize))(scores, token_ids, wanted)
    got = [np.asarray(a) for a in got]
    want = oracle(scores, token_ids, wanted, num_top, normalize)
    assert [a.dtype for a in got] == [np.float32, np.int32, np.float32, np.int32]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=2e-6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=2e-6)
    np.testing.assert_array_equal(got[3], want[3])


@pytest.mark.parametrize("fn", implementations)
def test_normalized_row_without_a_finite_score_is_nan(fn):
    scores = np.zeros((2, 16), np.float32)
    scores[0] = -np.inf
    chosen, ranks, top, _ = jax.jit(functools.partial(fn, num_top=4))(scores, np.zeros(2, np.int32), np.ones(2, bool))
    assert np.isnan(chosen[0]) and np.isnan(np.asarray(top[0])).all() and int(ranks[0]) == 1
    np.testing.assert_allclose(np.asarray(top[1]), np.log(1 / 16), rtol=1e-6)


@pytest.mark.skipif(not cpu.is_available(), reason=f"CPU kernels unavailable: {cpu.load_error()}")
def test_kernel_on_real_scale_rows_matches_reference():
    """Continuous logits (no planted ties): ids and ranks exactly as the reference's, values to
    float32 rounding of the log-sum-exp."""
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 4, (64, 49152)).astype(np.float32)
    token_ids = rng.integers(0, 49152, 64).astype(np.int32)
    token_ids[::4] = scores[::4].argmax(axis=1)
    wanted = rng.random(64) < 0.7
    ref = jax.jit(functools.partial(reference.logprob_outputs, num_top=20))(scores, token_ids, wanted)
    got = jax.jit(functools.partial(cpu.logprob_outputs, num_top=20))(scores, token_ids, wanted)
    for g, r in zip(got, ref):
        if np.issubdtype(np.asarray(r).dtype, np.integer):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-5)
    assert (np.asarray(got[1])[::4][wanted[::4]] == 1).all()


@pytest.mark.skipif(not cpu.is_available(), reason=f"CPU kernels unavailable: {cpu.load_error()}")
def test_kernel_rejects_bad_shapes():
    scores = np.zeros((4, 10), np.float32)
    with pytest.raises(ValueError, match="logprob_outputs needs"):
        cpu.logprob_outputs(scores, np.zeros(3, np.int32), np.ones(4, bool), 2)
    with pytest.raises(ValueError, match="logprob_outputs needs"):
        cpu.logprob_outputs(scores, np.zeros(4, np.int32), np.ones(4, bool), 11)
    with pytest.raises(ValueError, match="logprob_outputs needs"):
        cpu.logprob_outputs(scores, np.zeros(4, np.int32), np.ones(4, bool), -1)
    with pytest.raises(ValueError, match="logprob_outputs needs"):
        cpu.logprob_outputs(scores.astype(np.float16), np.zeros(4, np.int32), np.ones(4, bool), 2)
