"""Speculative decoding by prompt lookup: the proposer against a brute-force search, the config's
parsing, and the engine's tokens and logprobs against a plain engine's and a dense oracle."""

import random

import numpy as np
import pytest

from jpaged import LLM, EngineArgs, SamplingParams
from jpaged.engine.speculative import SpeculativeConfig, propose_ngram
from test_engine import ENGINE_KWARGS, assert_pool_free, count_compiles, dense_greedy, sharpened


def brute_force_ngram(tokens: list[int], min_n: int, max_n: int, max_drafts: int) -> list[int]:
    """The longest suffix (max_n down to min_n tokens) that also occurs earlier, at its latest
    earlier occurrence: the tokens after that occurrence."""
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + max_drafts]
    return []


def test_propose_ngram_matches_a_brute_force_search():
    rng = random.Random(0)
    for _ in range(3000):
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 40))]
        min_n = rng.randint(1, 4)
        max_n = rng.randint(min_n, 6)
        k = rng.randint(1, 5)
        assert propose_ngram(tokens, min_n, max_n, k) == brute_force_ngram(tokens, min_n, max_n, k), (tokens, min_n,
                                                                                                      max_n, k)
    # The latest occurrence of the longest suffix, not an earlier or a shorter one.
    assert propose_ngram([1, 2, 3, 9, 2, 3, 8, 7, 1, 2, 3], 1, 3, 2) == [9, 2]
    assert propose_ngram([2, 3, 5, 1, 2, 3, 6, 2, 3], 2, 2, 3) == [6, 2, 3]
    assert propose_ngram([1, 2, 3, 4], 1, 3, 2) == []
    assert propose_ngram([7, 7], 1, 1, 4) == [7]  # drafts may run up to the request's last token


def test_speculative_config_parsing():
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4})
    assert (config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == (4, 5, 5)
    config = SpeculativeConfig.from_dict({"model": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (3, 3)
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
                                          "num_speculative_tokens_per_batch_size": [[4, 8, 1], [1, 3, 3],
                                                                                    [12, 64, 0]]})
    assert [config.num_drafts(b) for b in (1, 3, 4, 8, 9, 11, 12, 100)] == [3, 3, 1, 1, 1, 1, 0, 0]
    for bad, match in [({"method": "eagle", "model": "x", "num_speculative_tokens": 2}, "method 'eagle'"),
                       ({"model": "some/draft-model", "num_speculative_tokens": 2}, "draft model"),
                       ({"method": "ngram"}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                         "prompt_lookup_max": 2}, "prompt_lookup_min=4"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
                        "draft_tensor_parallel_size"),
                       ({"method": "ngram", "num_speculative_tokens": 2,
                         "num_speculative_tokens_per_batch_size": [[2, 4, 1]]}, "start at 1"),
                       ({"method": "ngram", "num_speculative_tokens": 2,
                         "num_speculative_tokens_per_batch_size": [[1, 4, 1], [3, 8, 0]]}, "overlap")]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_dict(bad)
    with pytest.raises(ValueError, match="method 'medusa'"):  # at EngineArgs, before any model loads
        EngineArgs(speculative_config={"method": "medusa", "num_speculative_tokens": 2})


def looping_prompts(seed=0):
    """Prompts that repeat a phrase: the sharpened tiny model's greedy text then loops, so
    lookups find drafts, some kept and some not."""
    rng = np.random.default_rng(seed)
    prompts = []
    for n in (3, 5, 8, 12, 20):
        phrase = rng.integers(100, 40000, size=n).tolist()
        prompts.append(rng.integers(100, 40000, size=4).tolist() + phrase * 3)
    prompts.append(rng.integers(100, 40000, size=30).tolist())
    return prompts


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """A plain engine and one with drafts (up to 3, suffixes of 1 to 3 tokens) on the same weights."""
    plain = LLM(str(tiny_model_dir), **ENGINE_KWARGS)
    params = sharpened(plain.llm_engine.runner.params, 3.0)
    plain.update_weights(params)
    spec = LLM(str(tiny_model_dir), speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                         "prompt_lookup_min": 1, "prompt_lookup_max": 3},
               **ENGINE_KWARGS)
    spec.update_weights(params)
    yield plain, spec
    assert_pool_free(plain)
    assert_pool_free(spec)


def test_drafts_give_the_same_tokens_and_logprobs_without_compiling(engines):
    plain, spec = engines
    engine = spec.llm_engine
    prompts = [{"prompt_token_ids": p} for p in looping_prompts()]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    # Few candidates per draw, so seeded text loops too and kept drafts' rows need their own draws.
    seeded = SamplingParams(temperature=1.0, top_k=3, seed=7, max_tokens=24, ignore_eos=True)
    before = engine.get_stats()
    with count_compiles() as compiles:
        spec_greedy = spec.generate(prompts, greedy, use_tqdm=False)
        between = engine.get_stats()
        spec_seeded = spec.generate(prompts, seeded, use_tqdm=False)
    after = engine.get_stats()
    assert after.spec_num_accepted_tokens > between.spec_num_accepted_tokens
    assert compiles == []
    plain_greedy = plain.generate(prompts, greedy, use_tqdm=False)
    plain_seeded = plain.generate(prompts, seeded, use_tqdm=False)
    oracle = dense_greedy(engine.runner.params, engine.model_config, looping_prompts(), 24, 128)
    for s, p, want in zip(spec_greedy, plain_greedy, oracle):
        assert s.outputs[0].token_ids == p.outputs[0].token_ids == want
        for spec_entry, plain_entry in zip(s.outputs[0].logprobs, p.outputs[0].logprobs):
            assert spec_entry.keys() == plain_entry.keys()
            for token_id, logprob in spec_entry.items():
                assert logprob.rank == plain_entry[token_id].rank
                assert logprob.logprob == pytest.approx(plain_entry[token_id].logprob, abs=1e-4)
        assert s.outputs[0].cumulative_logprob == pytest.approx(p.outputs[0].cumulative_logprob, abs=1e-3)
    for s, p in zip(spec_seeded, plain_seeded):
        assert s.outputs[0].token_ids == p.outputs[0].token_ids
    drafts = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    kept = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    assert 0 < kept < drafts, "the workload should keep some drafts and reject others"
    assert sum(after.spec_accepted_tokens_per_pos) == after.spec_num_accepted_tokens
    assert after.spec_accepted_tokens_per_pos[0] >= after.spec_accepted_tokens_per_pos[-1]
    steps_with_drafts = after.spec_num_drafts - before.spec_num_drafts
    assert steps_with_drafts > 0


def test_drafts_respect_stops_max_tokens_and_n(engines):
    plain, spec = engines
    prompts = [{"prompt_token_ids": p} for p in looping_prompts(1)]
    reference = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                               use_tqdm=False)
    # Stop on a token the loop produces: the output ends there even when later drafts were kept.
    stop_token = reference[0].outputs[0].token_ids[9]
    params = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_token]),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=3, n=2, max_tokens=11, ignore_eos=True)]
    for llm_outputs in zip(*(llm.generate(prompts[:3], params, use_tqdm=False) for llm in (spec, plain))):
        spec_output, plain_output = llm_outputs
        assert [o.token_ids for o in spec_output.outputs] == [o.token_ids for o in plain_output.outputs]
        assert [o.finish_reason for o in spec_output.outputs] == [o.finish_reason for o in plain_output.outputs]
    first = spec.generate(prompts[0], params[0], use_tqdm=False)[0].outputs[0]
    assert first.token_ids[-1] == stop_token and first.finish_reason == "stop"
    assert len(spec.generate(prompts[1], params[1], use_tqdm=False)[0].outputs[0].token_ids) == 7


def test_drafts_with_penalties_logit_bias_min_tokens_and_allowed_tokens(engines):
    """Each drafted row's sampler entries count the drafts before it (penalties, min_tokens) and
    carry the request's logit_bias; allowed_token_ids masks every row: tokens and logprobs equal
    the plain engine's, and drafts were kept under each feature."""
    plain, spec = engines
    prompts = [{"prompt_token_ids": p} for p in looping_prompts(2)[:4]]
    loop_tokens = plain.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0].token_ids
    features = [dict(frequency_penalty=0.05, presence_penalty=0.05),
                dict(repetition_penalty=1.02, logprobs=1),
                dict(logit_bias={loop_tokens[3]: 0.5, 17: -2.0}, min_tokens=6, stop_token_ids=[loop_tokens[1]]),
                dict(allowed_token_ids=sorted(set(loop_tokens) | set(prompts[3]["prompt_token_ids"])))]
    for feature in features:
        for temperature, extra in ((0.0, {}), (1.0, dict(top_k=3, seed=11))):
            params = SamplingParams(temperature=temperature, max_tokens=20, ignore_eos=True, **extra, **feature)
            before = spec.llm_engine.get_stats().spec_num_accepted_tokens
            got = spec.generate(prompts, params, use_tqdm=False)
            kept = spec.llm_engine.get_stats().spec_num_accepted_tokens - before
            want = plain.generate(prompts, params, use_tqdm=False)
            for g, w in zip(got, want):
                assert g.outputs[0].token_ids == w.outputs[0].token_ids, (feature, temperature)
                if feature.get("logprobs") is not None:
                    assert g.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob, abs=1e-3)
            assert kept > 0, (feature, temperature)
