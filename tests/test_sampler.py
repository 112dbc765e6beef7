"""The on-device sampler against numpy oracles and sampling statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.sampler import MAX_LOGPROBS, SamplingKernels, apply_adjustments, argmax, sample
from jpaged.sampling_params import SamplingParams
from jpaged.engine.scheduler_output import ScheduledRequest
from jpaged.step_metadata import SamplingMetadata, logit_entries, pack_sampling
from pallas_kernels import cpu
from pallas_kernels.reference import apply_min_p, apply_top_k_top_p

VOCAB = 32
_sample = jax.jit(sample)
# The C++ kernels' cases run wherever the library builds (as in CI); elsewhere only those.
with_cpu_kernels = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not cpu.is_available(), reason=f"CPU kernels unavailable: {cpu.load_error()}"))]


def make_meta(num_seqs, **fields):
    """SamplingMetadata with neutral defaults; fields override per-row arrays."""
    base = dict(
        temperature=np.zeros(num_seqs, np.float32), top_k=np.zeros(num_seqs, np.int32),
        top_p=np.ones(num_seqs, np.float32), min_p=np.zeros(num_seqs, np.float32),
        presence_penalty=np.zeros(num_seqs, np.float32), frequency_penalty=np.zeros(num_seqs, np.float32),
        repetition_penalty=np.ones(num_seqs, np.float32), seeds=np.zeros(num_seqs, np.int32),
        output_index=np.zeros(num_seqs, np.int32), num_logprobs=np.full(num_seqs, -1, np.int32),
        mask_raw=np.zeros(num_seqs, np.int32),
        entry_rows=np.zeros(0, np.int32), entry_token_ids=np.zeros(0, np.int32), entry_bias=np.zeros(0, np.float32),
        entry_output_counts=np.zeros(0, np.float32), entry_seen=np.zeros(0, np.int32))
    for name, value in fields.items():
        base[name] = np.asarray(value, base[name].dtype)
    return SamplingMetadata(**{k: jnp.asarray(v) for k, v in base.items()})


def test_greedy_is_argmax_and_ignores_seed():
    logits = np.random.default_rng(0).normal(size=(8, VOCAB)).astype(np.float32)
    out = _sample(jnp.asarray(logits), make_meta(8, seeds=np.arange(8)))
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))


@pytest.mark.parametrize("vocab", [49152, 1000, 7])
def test_two_level_argmax_equals_numpy(vocab):
    """First index on ties and all -inf rows as np.argmax, chunked or not; a NaN row (a broken
    model) still gets an index inside the vocabulary."""
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((9, vocab)).astype(np.float32)
    logits[1, :] = -np.inf
    logits[2, [3 % vocab, 200 % vocab, vocab - 1]] = 50.0  # ties, across chunks when the vocab allows
    logits[3, vocab // 2] = np.nan
    logits[4, :] = 1.0
    logits[5, vocab - 1] = np.inf
    logits[6] = np.round(logits[6])  # many ties inside chunks
    ids = np.asarray(jax.jit(argmax)(jnp.asarray(logits)))
    assert 0 <= ids[3] < vocab
    keep = np.arange(len(logits)) != 3
    np.testing.assert_array_equal(ids[keep], np.argmax(logits, axis=-1)[keep])


@pytest.mark.parametrize("vocab", [VOCAB, 49152])
@pytest.mark.parametrize("backend", with_cpu_kernels)
def test_top_k_top_p_mask_matches_numpy(backend, vocab):
    """The reference's bisections and the C++ kernel's histogram thresholds keep the same tokens."""
    mask = jax.jit(apply_top_k_top_p if backend == "reference" else cpu.apply_top_k_top_p)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, vocab)).astype(np.float32) * 3
    logits[7, :vocab // 2] = -np.inf  # masked tokens (bitmask, min_p) stay out
    top_k = np.array([0, 1, 5, 0, 3, 40, 200, 40], np.int32)
    top_p = np.array([1.0, 1.0, 1.0, 0.5, 0.9, 0.3, 0.95, 0.8], np.float32)
    got = np.asarray(mask(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for row in range(8):
        order = np.argsort(-logits[row])
        k = top_k[row] if top_k[row] > 0 else vocab
        kept = order[:k]
        probs = np.exp(logits[row, kept] - logits[row, kept].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        kept = kept[before < top_p[row]]
        expect = np.full(vocab, -np.inf, np.float32)
        expect[kept] = logits[row, kept]
        np.testing.assert_array_equal(got[row], expect, err_msg=f"row {row}")


def test_min_p_mask_matches_numpy():
    logits = np.random.default_rng(2).normal(size=(3, VOCAB)).astype(np.float32) * 2
    min_p = np.array([0.0, 0.1, 0.5], np.float32)
    got = np.asarray(apply_min_p(jnp.asarray(logits), jnp.asarray(min_p)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = probs >= min_p[:, None] * probs.max(-1, keepdims=True)
    np.testing.assert_array_equal(np.isfinite(got), keep)
    np.testing.assert_allclose(got[keep], logits[keep])


def test_penalties_and_bias_match_numpy():
    """Packed through the blob (padded entries included) against a dense numpy oracle."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, VOCAB)).astype(np.float32)
    prompts = [[1, 2, 3], [4, 4], [5], [6]]
    outputs = [[3, 3, 7], [], [5, 9, 9, 9], [6, 6]]
    presence, frequency, repetition = [0.5, 0.0, -1.0, 0.0], [0.25, 1.0, 0.5, 0.0], [1.3, 1.0, 0.7, 1.0]
    bias = [{}, {4: -2.0}, {9: 1.5, 11: 3.0}, {6: 1.0}]  # row 3: bias only, no penalties
    reqs = [_request(SamplingParams(temperature=0, presence_penalty=presence[i], frequency_penalty=frequency[i],
                                    repetition_penalty=repetition[i], logit_bias=bias[i]), prompts[i], outputs[i])
            for i in range(4)]
    blob = pack_sampling(reqs, [0] * 4, num_seqs=8, num_entries=32, entries=[logit_entries(r) for r in reqs])
    got = np.asarray(apply_adjustments(jnp.asarray(logits), SamplingMetadata.unpack(jnp.asarray(blob), 8, 32)))
    expect = logits.copy()
    for i in range(4):
        for tok, value in bias[i].items():
            expect[i, tok] += value
    for i in range(3):
        for tok in set(prompts[i]) | set(outputs[i]):
            x = expect[i, tok]
            expect[i, tok] = x / repetition[i] if x > 0 else x * repetition[i]
        for tok in set(outputs[i]):
            expect[i, tok] -= frequency[i] * outputs[i].count(tok) + presence[i]
    np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_draw_frequencies_follow_softmax():
    """Chi-square of 4096 seeded draws against softmax(logits / temperature)."""
    num = 4096
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5], np.float32)
    temperature = 0.8
    meta = make_meta(num, temperature=np.full(num, temperature), seeds=np.arange(num) * 7919,
                     output_index=np.arange(num) % 5)
    out = jax.jit(sample)(jnp.tile(jnp.asarray(logits), (num, 1)), meta)
    counts = np.bincount(np.asarray(out.token_ids), minlength=8)
    probs = np.exp(logits / temperature)
    probs /= probs.sum()
    expected = probs * num
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3, (chi2, counts, expected)  # df=7, p=0.001


def test_draws_depend_only_on_seed_and_output_index():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(8, VOCAB)).astype(np.float32)
    seeds = rng.integers(0, 2**31, size=8)
    index = rng.integers(0, 100, size=8)
    meta = make_meta(8, temperature=np.ones(8), seeds=seeds, output_index=index)
    first = np.asarray(_sample(jnp.asarray(logits), meta).token_ids)
    perm = rng.permutation(8)
    meta_perm = make_meta(8, temperature=np.ones(8), seeds=seeds[perm], output_index=index[perm])
    second = np.asarray(_sample(jnp.asarray(logits[perm]), meta_perm).token_ids)
    np.testing.assert_array_equal(first[perm], second)
    # A different output index draws differently somewhere.
    meta_next = make_meta(8, temperature=np.ones(8), seeds=seeds, output_index=index + 1)
    assert (np.asarray(_sample(jnp.asarray(logits), meta_next).token_ids) != first).any()


def _kernels(backend):
    if backend == "reference":
        return SamplingKernels()
    return SamplingKernels(cpu.sample_tokens, cpu.apply_top_k_top_p, cpu.logprob_outputs)


@pytest.mark.parametrize("backend", with_cpu_kernels)
def test_processed_logprobs_with_ranks(backend):
    logits = np.random.default_rng(5).normal(size=(8, VOCAB)).astype(np.float32)
    meta = make_meta(8, temperature=[0, 0.5, 0, 0, 0, 0, 0, 0], top_k=[0, 4, 0, 0, 0, 0, 0, 0],
                     seeds=np.arange(8), num_logprobs=[3, 2, -1, -1, -1, -1, -1, -1])
    out = jax.jit(functools.partial(sample, kernels=_kernels(backend), logprobs_mode="processed_logprobs"))(
        jnp.asarray(logits), meta)
    assert out.top_logprobs.shape == (8, MAX_LOGPROBS) and out.top_token_ids.shape == (8, MAX_LOGPROBS)
    ref = jax.nn.log_softmax(logits[0])
    np.testing.assert_allclose(out.logprobs[0], ref.max(), rtol=1e-6)
    assert int(out.ranks[0]) == 1
    np.testing.assert_array_equal(np.asarray(out.top_token_ids[0, :3]), np.argsort(-logits[0])[:3])
    # Row 1: temperature 0.5 and top_k 4; the distribution has exactly 4 finite entries.
    scaled = logits[1] / 0.5
    top4 = np.argsort(-scaled)[:4]
    ref1 = scaled[top4] - np.log(np.exp(scaled[top4] - scaled[top4].max()).sum()) - scaled[top4].max()
    np.testing.assert_allclose(np.asarray(out.top_logprobs[1, :4]), ref1, rtol=1e-5)
    assert np.isneginf(np.asarray(out.top_logprobs[1, 4]))
    assert int(out.token_ids[1]) in top4
    processed_logits = jax.jit(functools.partial(sample, kernels=_kernels(backend), logprobs_mode="processed_logits"))(
        jnp.asarray(logits), meta)
    np.testing.assert_allclose(np.asarray(processed_logits.top_logprobs[1, :4]), scaled[top4], rtol=1e-6)


@pytest.mark.parametrize("backend", with_cpu_kernels)
@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits"])
def test_raw_logprobs_ignore_every_processor_but_a_grammar_mask(backend, mode):
    """vLLM's default: the model's distribution, whatever temperature, top_k, min_p, logit_bias
    and penalties a row has (its drawn token still follows them); a structured-output token
    mask (mask_raw) comes first, an allowed_token_ids / bad_words one (no mask_raw) only limits
    the draw. Rows that asked for no logprobs get zeros."""
    logits = np.random.default_rng(6).normal(size=(5, VOCAB)).astype(np.float32)
    meta = make_meta(5, temperature=[0, 0.5, 1.0, 0, 0], top_k=[0, 3, 0, 0, 0], min_p=[0, 0, 0.3, 0, 0],
                     repetition_penalty=[1.5, 1, 1, 1, 1], seeds=np.arange(5), num_logprobs=[5, 5, 5, 5, -1],
                     mask_raw=[0, 0, 1, 0, 0],
                     entry_rows=[0, 0, 1], entry_token_ids=[4, 9, 7], entry_bias=[0.0, 0.0, 30.0],
                     entry_output_counts=[1, 2, 0], entry_seen=[1, 1, 0])
    bitmask = np.full((5, 1), -1, np.int32)
    bitmask[2] = (1 << 3) | (1 << 17)  # row 2 may only emit tokens 3 and 17 (a grammar)
    bitmask[3] = (1 << 5) | (1 << 11)  # row 3 only 5 and 11 (allowed_token_ids)
    out = jax.jit(functools.partial(sample, kernels=_kernels(backend), logprobs_mode=mode))(
        jnp.asarray(logits), meta, jnp.asarray(bitmask))
    raw = logits.astype(np.float64).copy()
    raw[2, [t for t in range(VOCAB) if t not in (3, 17)]] = -np.inf
    values = raw - raw.max(1, keepdims=True) - np.log(np.exp(raw - raw.max(1, keepdims=True)).sum(1, keepdims=True))
    values = values if mode == "raw_logprobs" else raw
    ids = np.asarray(out.token_ids)
    assert int(ids[1]) == 7 and int(ids[2]) in (3, 17)  # the bias and the mask still decide the draw
    assert int(ids[3]) == (5 if logits[3, 5] > logits[3, 11] else 11)
    for row in range(4):
        order = np.argsort(-values[row], kind="stable")[:5]
        np.testing.assert_array_equal(np.asarray(out.top_token_ids[row, :5]), order)
        np.testing.assert_allclose(np.asarray(out.top_logprobs[row, :5]), values[row, order], rtol=1e-5)
        np.testing.assert_allclose(float(out.logprobs[row]), values[row, ids[row]], rtol=1e-5)
        assert int(out.ranks[row]) == 1 + int((values[row] > values[row, ids[row]]).sum())
    assert float(out.logprobs[4]) == 0 and int(out.ranks[4]) == 0 and not np.asarray(out.top_logprobs[4]).any()


def _request(params, prompt, output, eos=(2,)):
    """A decode step's ScheduledRequest for pack_sampling: its pending token, no drafts."""
    return ScheduledRequest(request_id="r", token_ids=(prompt + output)[-1:], start_position=len(prompt + output) - 1,
                            block_table=[], sample=True, sampling_params=params, prompt_token_ids=prompt,
                            output_token_ids=output, eos_token_ids=eos)


def test_packed_logit_bias_and_min_tokens_masks():
    """pack_sampling -> unpack -> sample: bias forces a token; min_tokens bans eos and stop ids."""
    logits = np.zeros((8, VOCAB), np.float32)
    logits[:, 2] = 10.0  # eos would win
    logits[:, 5] = 9.0  # then the stop token id
    reqs = [
        _request(SamplingParams(temperature=0, logit_bias={7: 100.0}), [1], []),
        _request(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5]), [1], [3]),
        _request(SamplingParams(temperature=0, min_tokens=1), [1], [3]),  # min_tokens reached
    ]
    blob = pack_sampling(reqs, [0, 0, 0], num_seqs=8, num_entries=16, entries=[logit_entries(r) for r in reqs])
    meta = SamplingMetadata.unpack(jnp.asarray(blob), 8, 16)
    out = _sample(jnp.asarray(logits), meta)
    assert list(np.asarray(out.token_ids[:3])) == [7, 0, 2]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_packed_penalties_roundtrip(temperature):
    """A repetition penalty packed through the blob demotes a repeated argmax."""
    logits = np.zeros((8, VOCAB), np.float32)
    logits[:, 4] = 2.0
    logits[:, 6] = 1.9
    params = SamplingParams(temperature=temperature, top_k=1 if temperature else 0, repetition_penalty=2.0, seed=1)
    reqs = [_request(params, [1, 4], [])]
    blob = pack_sampling(reqs, [1], num_seqs=8, num_entries=16, entries=[logit_entries(r) for r in reqs])
    out = _sample(jnp.asarray(logits), SamplingMetadata.unpack(jnp.asarray(blob), 8, 16))
    assert int(out.token_ids[0]) == 6


@pytest.mark.parametrize("backend", with_cpu_kernels)
def test_max_logprobs_zero_still_gives_the_chosen_tokens_logprob(backend):
    """--max-logprobs 0 compiles a sampler whose top list is empty; logprobs=0 asks for the
    chosen token's logprob only."""
    logits = np.random.default_rng(7).normal(size=(2, VOCAB)).astype(np.float32)
    meta = make_meta(2, num_logprobs=[0, -1])
    out = jax.jit(functools.partial(sample, kernels=_kernels(backend), max_logprobs=0))(jnp.asarray(logits), meta)
    assert out.top_logprobs.shape == (2, 0) and out.top_token_ids.shape == (2, 0)
    np.testing.assert_allclose(float(out.logprobs[0]), np.asarray(jax.nn.log_softmax(logits[0])).max(), rtol=1e-6)
    assert int(out.ranks[0]) == 1
