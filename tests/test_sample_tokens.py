"""The sampler's draw: `reference.sample_tokens` and the C++ kernel against a float64 numpy
oracle of the same definition, sampling statistics, and the kernel's edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu, reference

requires_kernel = pytest.mark.skipif(not cpu.is_available(), reason=f"CPU kernels unavailable: {cpu.load_error()}")

_reference = jax.jit(reference.sample_tokens)
_kernel = jax.jit(cpu.sample_tokens)
EDGE = 1e-5  # draws and nucleus edges this close (relative) to a boundary may go either way in float32


def _mix32(x):
    x = np.uint32(x)
    x ^= x >> np.uint32(16)
    x = np.uint32((int(x) * 0x85EBCA6B) & 0xFFFFFFFF)
    x ^= x >> np.uint32(13)
    x = np.uint32((int(x) * 0xC2B2AE35) & 0xFFFFFFFF)
    return x ^ (x >> np.uint32(16))


def _uniform(seed, output_index):
    """row_uniform written again with Python integers."""
    index = np.uint32(output_index & 0xFFFFFFFF)
    key = _mix32(np.uint32(seed & 0xFFFFFFFF) ^ _mix32(np.uint32((int(index) * 0x9E3779B9 + 0x632BE5AB) & 0xFFFFFFFF)))
    return ((int(_mix32(key)) >> 8) + 0.5) / (1 << 24)


def oracle(row, temperature, top_k, top_p, min_p, seed, output_index):
    """(token, near_edge) in float64: the kept tokens by sorting, then the inverse CDF in id order.
    near_edge: the draw or a mask threshold sits within EDGE of a boundary (for top_p: within the
    mass of the tokens whose place in the nucleus is that close to the edge)."""
    scaled = row.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    kept = probs >= min_p * probs.max()
    near = min_p > 0 and bool(np.any(np.abs(probs - min_p * probs.max()) < EDGE * probs.max()))
    order = np.argsort(-np.where(kept, scaled, -np.inf), kind="stable")
    if 0 < top_k < kept.sum():
        kth = scaled[order[top_k - 1]]
        near |= bool(kth - scaled[order[top_k]] < 4 * np.spacing(np.float32(kth)))
        kept &= scaled >= kth
    slack = EDGE
    if top_p < 1.0:
        mass = np.where(kept, probs, 0.0)
        mass /= mass.sum()
        head = np.cumsum(mass[order])
        count = int(np.searchsorted(head, top_p - 1e-12) + 1)  # smallest head with mass >= top_p
        slack += mass[order][np.abs(head - top_p) < EDGE].sum()
        cut = scaled[order[min(count, len(order)) - 1]]
        kept &= scaled >= cut
    weights = np.where(kept, probs, 0.0)
    cdf = np.cumsum(weights)
    target = _uniform(seed, output_index) * cdf[-1]
    token = int(np.searchsorted(cdf, target, side="right"))
    near |= bool(np.any(np.abs(cdf[weights > 0] - target) < slack * cdf[-1]))
    return token, near


def _rows(rng, num, vocab, scale):
    logits = (rng.standard_normal((num, vocab)) * scale).astype(np.float32)
    params = dict(
        temperature=rng.choice([0.3, 0.7, 1.0, 1.5], num).astype(np.float32),
        top_k=rng.choice([0, 0, 1, 5, 50, vocab + 3], num).astype(np.int32),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5, 0.05], num).astype(np.float32),
        min_p=rng.choice([0.0, 0.0, 0.0, 0.05], num).astype(np.float32),
        seeds=rng.integers(-2**31, 2**31, num).astype(np.int32),
        output_index=rng.integers(0, 5000, num).astype(np.int32))
    return logits, params


def _call(fn, logits, params):
    order = ("temperature", "top_k", "top_p", "min_p", "seeds", "output_index")
    return np.asarray(fn(jnp.asarray(logits), *(jnp.asarray(params[name]) for name in order)))


def _check_against_oracle(fn, logits, params):
    got = _call(fn, logits, params)
    near_rows = 0
    for r in range(len(logits)):
        args = {name: value[r].item() for name, value in params.items()}
        token, near = oracle(logits[r], args["temperature"], args["top_k"], args["top_p"], args["min_p"],
                             args["seeds"], args["output_index"])
        if near:
            near_rows += 1
            continue
        assert got[r] == token, (r, args, got[r], token)
    assert near_rows <= len(logits) // 10, near_rows


@pytest.mark.parametrize("vocab, scale", [(1000, 2.0), (49152, 3.0), (97, 0.5)])
def test_reference_draws_the_oracle_token(vocab, scale):
    rng = np.random.default_rng(vocab)
    _check_against_oracle(_reference, *_rows(rng, 96, vocab, scale))


@requires_kernel
@pytest.mark.parametrize("vocab, scale", [(1000, 2.0), (49152, 3.0), (49152, 12.0), (97, 0.5), (7, 1.0)])
def test_kernel_draws_the_oracle_token(vocab, scale):
    """Peaked rows (scale 12: few tokens above 2^-20 of the largest weight) and flat ones (the
    kernel's fallback to every token as a candidate), vocabularies off the vector width."""
    rng = np.random.default_rng(vocab + int(scale))
    _check_against_oracle(_kernel, *_rows(rng, 96, vocab, scale))


@requires_kernel
def test_kernel_heavy_tail_of_light_tokens():
    """One token of weight 1 and 262,143 just below the kernel's 2^-20 candidate cut, 8 % of the
    mass together: top_p 0.95 and top_k 5 need them (the fallback to every token as a candidate)."""
    num, vocab = 96, 262144
    rng = np.random.default_rng(3)
    logits = np.tile(-13.9 - np.arange(vocab, dtype=np.float32) * 1e-5, (num, 1))
    logits[np.arange(num), rng.integers(0, vocab, num)] = 0.0
    params = dict(temperature=np.ones(num, np.float32), top_k=np.tile(np.array([0, 5, 0], np.int32), num // 3),
                  top_p=np.tile(np.array([0.95, 1.0, 0.999], np.float32), num // 3), min_p=np.zeros(num, np.float32),
                  seeds=np.full(num, 99, np.int32), output_index=np.arange(num, dtype=np.int32))
    _check_against_oracle(_kernel, logits, params)
    draws = _call(_kernel, logits, params)
    assert (logits[np.arange(num), draws] < 0).any()  # the tail was drawn from


@requires_kernel
def test_kernel_matches_reference_on_real_shaped_rows():
    rng = np.random.default_rng(7)
    logits, params = _rows(rng, 64, 49152, 3.0)
    params["output_index"] = np.arange(64, dtype=np.int32)
    same = _call(_kernel, logits, params) == _call(_reference, logits, params)
    assert same.sum() >= 62, same


@requires_kernel
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.6)])
def test_kernel_frequencies_follow_the_kept_distribution(top_k, top_p):
    """Chi-square of 4096 draws (distinct output indices) against the oracle's renormalized
    probabilities of the kept tokens."""
    num = 4096
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5], np.float32)
    temperature = 0.8
    params = dict(temperature=np.full(num, temperature, np.float32), top_k=np.full(num, top_k, np.int32),
                  top_p=np.full(num, top_p, np.float32), min_p=np.zeros(num, np.float32),
                  seeds=np.full(num, 1234, np.int32), output_index=np.arange(num, dtype=np.int32))
    counts = np.bincount(_call(_kernel, np.tile(logits, (num, 1)), params), minlength=8)
    probs = np.exp(logits / temperature)
    order = np.argsort(-probs)
    keep = np.zeros(8, bool)
    keep[order[:top_k or 8]] = True
    head = np.cumsum(probs[order] * keep[order]) / (probs * keep).sum()
    keep[order[np.searchsorted(head, top_p - 1e-9) + 1:]] = False
    expected = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum() * num
    assert (counts[~keep] == 0).all(), counts
    dof = keep.sum() - 1
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert chi2 < {7: 24.3, 2: 13.8, 1: 10.8}[dof], (chi2, counts, expected)  # p = 0.001


def _one_row(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5, output_index=0, fn=None):
    params = dict(temperature=np.array([temperature], np.float32), top_k=np.array([top_k], np.int32),
                  top_p=np.array([top_p], np.float32), min_p=np.array([min_p], np.float32),
                  seeds=np.array([seed], np.int32), output_index=np.array([output_index], np.int32))
    return int(_call(fn or _kernel, np.asarray(logits, np.float32)[None], params)[0])


@requires_kernel
def test_kernel_edge_rows():
    vocab = 1003
    row = np.full(vocab, -np.inf, np.float32)
    assert _one_row(row) == 0  # nothing finite
    row[17] = np.inf
    assert _one_row(row) == 17
    row = np.zeros(vocab, np.float32)
    row[400] = 1.0
    assert _one_row(row, temperature=1e-30) == 400  # 1 / temperature overflows
    assert _one_row(row, top_k=1) == 400
    assert _one_row(row, min_p=1.0) == 400
    assert _one_row(row, top_p=1e-6) == 400
    assert _one_row(row, temperature=0.0) == 0  # not drawn: the sampler takes the argmax
    row = np.full(vocab, -np.inf, np.float32)
    row[[3, 500, 1002]] = [0.0, 0.0, np.nan]
    draws = {_one_row(row, output_index=i) for i in range(64)}
    assert draws == {3, 500}  # a NaN logit weighs nothing
    ties = np.zeros(vocab, np.float32)
    ties[[10, 20, 30, 40, 50]] = 3.0
    draws = {_one_row(ties, top_k=3, temperature=0.1, output_index=i) for i in range(200)}
    assert draws == {10, 20, 30, 40, 50}  # ties at the top_k-th weight are kept, as in the reference
    assert {_one_row(ties, top_k=3, temperature=0.1, output_index=i, fn=_reference) for i in range(200)} == draws


@requires_kernel
def test_kernel_rows_are_independent_of_the_batch():
    rng = np.random.default_rng(11)
    logits, params = _rows(rng, 32, 3000, 2.0)
    first = _call(_kernel, logits, params)
    perm = rng.permutation(32)
    second = _call(_kernel, logits[perm], {name: value[perm] for name, value in params.items()})
    np.testing.assert_array_equal(first[perm], second)
    single = [_call(_kernel, logits[r:r + 1], {name: value[r:r + 1] for name, value in params.items()})[0]
              for r in range(4)]
    np.testing.assert_array_equal(first[:4], single)


@requires_kernel
def test_kernel_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sample_tokens needs"):
        cpu.sample_tokens(jnp.zeros((2, 8)), *(jnp.zeros(3) for _ in range(6)))
