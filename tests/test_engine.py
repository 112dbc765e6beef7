"""The paged engine end to end: greedy equality with a dense no-cache loop, seeds, compiles, the pool."""

import contextlib
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tqdm.auto import tqdm

import pallas_kernels.cpu as cpu_kernels
from jpaged import LLM, EngineArgs, SamplingParams, kv_pool
from jpaged.buckets import Buckets
from jpaged.models import llama
from jpaged.models.config import ModelConfig
from jpaged.reasoning import reasoning_tokens
from jpaged.sampling_params import RequestOutputKind

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# A small engine: 16/32-token steps (chunked prefill), 8 sequences, tables of 4 or 8 blocks, and a
# 16-block pool (15 usable) that the workload below overfills, forcing preemption.
ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, num_gpu_blocks_override=16,
                     attention_backend="reference", compilation_cache_dir="", seed=0)


@contextlib.contextmanager
def count_compiles(names=(COMPILE_EVENT,)):
    """Counts XLA backend compiles (or the jax duration events `names`) inside the block: yields
    a list whose len is the count."""
    events = []

    def listener(event, duration, **kwargs):
        if event in names:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def dense_greedy(params, config, prompts, max_tokens, length):
    """Greedy completions from llama.forward_dense (no cache): the oracle. All rows padded to `length`."""
    forward = jax.jit(lambda p, ids: llama.forward_dense(p, config, ids))
    rows = [list(p) for p in prompts]
    for _ in range(max_tokens):
        ids = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        logits = np.asarray(forward(params, jnp.asarray(ids)))
        for i, row in enumerate(rows):
            row.append(int(logits[i, len(row) - 1].argmax()))
    return [row[len(p):] for row, p in zip(rows, prompts)]


def sharpened(params, scale):
    """The same model with every weight scaled: logits vary more, so greedy paths are less flat."""
    return jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)


def assert_pool_free(llm):
    scheduler = llm.llm_engine.scheduler
    stats = scheduler.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == llm.llm_engine.runner.pool_spec.num_blocks - 1


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), **ENGINE_KWARGS)
    base = llm.llm_engine.runner.params
    llm.update_weights(sharpened(base, 3.0))
    yield llm
    assert_pool_free(llm)


def test_max_num_active_seqs_caps_the_running_batch_below_max_num_seqs(tiny_model_dir, tiny_llm):
    """vLLM's --max-num-active-seqs: at most 2 requests run at once while the step shapes stay
    --max-num-seqs' (8); the greedy tokens are the dense oracle's."""
    llm = LLM(str(tiny_model_dir), **{**ENGINE_KWARGS, "max_num_active_seqs": 2, "enforce_eager": True})
    engine = llm.llm_engine
    llm.update_weights(tiny_llm.llm_engine.runner.params)  # the sharpened weights
    assert engine.runner.buckets.num_seqs[-1] == 8
    prompts = mixed_prompts()[:5]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, SamplingParams(max_tokens=6, temperature=0,
                                                                                ignore_eos=True))
    most_running, tokens = 0, {}
    while engine.has_unfinished_requests():
        tokens.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
        most_running = max(most_running, engine.scheduler.num_running)
    assert most_running == 2
    expected = dense_greedy(engine.runner.params, engine.model_config, prompts, 6, 128)
    assert [list(tokens[str(i)]) for i in range(len(prompts))] == expected
    assert_pool_free(llm)


def mixed_prompts(seed=0):
    rng = np.random.default_rng(seed)
    shared = rng.integers(100, 40000, size=40).tolist()
    prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in (3, 17, 33, 50, 70, 9)]
    prompts += [shared + [5, 6, 7], shared + [8, 9], list(prompts[2])]  # prefix-cache hits
    return prompts


@pytest.mark.parametrize("swap_space, long_prefill_token_threshold", [(0.0, 0), (0.001, 0), (0.0, 5)])
def test_greedy_matches_dense_with_chunking_prefix_cache_and_preemption(tiny_model_dir, tiny_llm, swap_space,
                                                                         long_prefill_token_threshold):
    if swap_space:
        llm = LLM(str(tiny_model_dir), swap_space=swap_space, **ENGINE_KWARGS)
        llm.update_weights(tiny_llm.llm_engine.runner.params)
        assert llm.llm_engine.runner.num_swap_blocks > 0
    else:
        llm = tiny_llm
    engine = llm.llm_engine
    prompts = mixed_prompts()
    before = engine.get_stats()
    engine.scheduler.long_prefill_token_threshold = long_prefill_token_threshold  # several prompts mid-prefill
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    finally:
        engine.scheduler.long_prefill_token_threshold = 0
    after = engine.get_stats()
    expect = dense_greedy(engine.runner.params, engine.model_config, prompts, 16, 128)
    for prompt, output, want in zip(prompts, outputs, expect):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == want
        assert output.outputs[0].finish_reason == "length"
    assert after.num_preemptions > before.num_preemptions, "the workload must force preemption"
    assert after.prefix_cache_hits > before.prefix_cache_hits, "the workload must hit the prefix cache"
    assert len({tuple(w) for w in expect}) > 3, "the oracle's outputs should differ between prompts"
    assert_pool_free(llm)


def test_seeded_request_same_alone_and_in_a_batch(tiny_llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    prompt = {"prompt_token_ids": mixed_prompts()[1]}
    alone = tiny_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    rng = np.random.default_rng(1)
    others = [{"prompt_token_ids": rng.integers(100, 40000, size=int(rng.integers(2, 24))).tolist()}
              for _ in range(30)]
    other_params = [SamplingParams(temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(0, 50)),
                                   max_tokens=int(rng.integers(1, 8)), ignore_eos=True) for _ in others]
    batch = tiny_llm.generate(others[:15] + [prompt] + others[15:], other_params[:15] + [params] + other_params[15:],
                              use_tqdm=False)
    assert batch[15].outputs[0].token_ids == alone
    unseeded = tiny_llm.generate([prompt] * 2, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
                                 use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def random_feature_requests(rng, count):
    """Prompts and SamplingParams mixing every request feature (each shape must be precompiled)."""
    prompts, params = [], []
    for i in range(count):
        prompts.append({"prompt_token_ids": rng.integers(100, 40000, size=int(rng.integers(1, 70))).tolist()})
        params.append(SamplingParams(
            n=int(rng.integers(1, 3)), temperature=float(rng.choice([0.0, 0.7, 1.3])),
            top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.8])), min_p=float(rng.choice([0.0, 0.1])),
            seed=int(rng.integers(0, 1000)) if i % 2 else None, max_tokens=int(rng.integers(1, 12)),
            logprobs=int(rng.choice([0, 3, 20])) if i % 3 == 0 else None, stop=["the"] if i % 4 == 0 else None,
            presence_penalty=float(rng.choice([0.0, 0.5])), frequency_penalty=float(rng.choice([0.0, 0.3])),
            repetition_penalty=float(rng.choice([1.0, 1.2])),
            logit_bias={int(t): float(rng.uniform(-5, 5)) for t in rng.integers(0, 49152, int(rng.choice([0, 3, 300])))},
            min_tokens=int(rng.choice([0, 1])), stop_token_ids=rng.integers(0, 49152, int(rng.choice([0, 64]))).tolist(),
            prompt_logprobs=int(rng.choice([0, 5])) if i % 5 == 0 else None,
            allowed_token_ids=rng.integers(0, 49152, 40).tolist() if i % 6 == 1 else None,
            bad_words=["the", " of it"] if i % 6 == 2 else None))
    return prompts, params


@pytest.mark.parametrize("swap_space", [0.0, 0.001])
def test_no_compiles_after_warmup_with_every_request_feature(tiny_model_dir, tiny_llm, swap_space):
    """Penalties, logit_bias (up to the cap), min_tokens with stop_token_ids, logprobs up to the cap,
    prompt_logprobs, n > 1, seeds, stops, allowed_token_ids, bad_words, preemption by recompute and
    by swap: nothing compiles."""
    llm = LLM(str(tiny_model_dir), swap_space=swap_space, **ENGINE_KWARGS) if swap_space else tiny_llm
    prompts, params = random_feature_requests(np.random.default_rng(2), 16)
    before = llm.llm_engine.get_stats()
    with count_compiles() as compiles:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == 16 and all(o.finished for o in outputs)
    assert llm.llm_engine.get_stats().num_preemptions > before.num_preemptions
    assert compiles == []
    assert_pool_free(llm)


def test_update_weights_changes_outputs_without_compiling(tiny_llm):
    engine = tiny_llm.llm_engine
    prompt = {"prompt_token_ids": mixed_prompts()[3]}
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    original = engine.runner.params
    before = tiny_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    with count_compiles() as compiles:
        tiny_llm.update_weights(sharpened(original, 1.7))
        changed = tiny_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
        tiny_llm.update_weights(original)
        restored = tiny_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert changed != before and restored == before
    assert compiles == []
    # The prompt's full blocks were cached under the original weights: after a swap they must not
    # be reused, so the output equals the dense model with the new weights.
    new_params = sharpened(original, 1.7)
    tiny_llm.update_weights(new_params)
    again = tiny_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    tiny_llm.update_weights(original)
    assert again == dense_greedy(new_params, engine.model_config, [prompt["prompt_token_ids"]], 8, 128)[0]
    with pytest.raises(ValueError, match="update_weights"):
        tiny_llm.update_weights(jax.tree.map(lambda x: x.astype(jnp.bfloat16), original))


def test_abort_frees_blocks(tiny_llm):
    engine = tiny_llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": list(range(100, 160))}, SamplingParams(max_tokens=50))
    engine.add_request("b", {"prompt_token_ids": list(range(200, 230))}, SamplingParams(max_tokens=50))
    for _ in range(4):
        engine.step()
    assert engine.get_stats().kv_cache_usage > 0
    out = engine.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    assert_pool_free(tiny_llm)
    # vLLM's prompt_tokens counts a prompt when its first token comes: not one aborted before.
    before = engine.get_stats().prompt_tokens_total
    engine.add_request("c", {"prompt_token_ids": list(range(600, 620))}, SamplingParams(max_tokens=5, n=2))
    engine.abort_request("c")
    assert engine.get_stats().prompt_tokens_total == before
    tiny_llm.generate({"prompt_token_ids": list(range(600, 620))}, SamplingParams(max_tokens=2, n=2), use_tqdm=False)
    assert engine.get_stats().prompt_tokens_total == before + 2 * 20


def test_stop_strings_finish_reasons_n_and_logprobs(tiny_llm):
    engine = tiny_llm.llm_engine
    prompt = {"prompt_token_ids": mixed_prompts()[4]}
    full = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and full.stop_reason is None and len(full.token_ids) == 20
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = full.text[:full.text.index(stop)]
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop]),
                            use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (cut, "stop", stop)
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=stop,
                                                   include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == cut + stop
    token = full.token_ids[len(full.token_ids) // 2]
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[token]),
                            use_tqdm=False)[0].outputs[0]
    first = full.token_ids.index(token)
    assert out.token_ids == full.token_ids[:first + 1] and (out.finish_reason, out.stop_reason) == ("stop", token)

    # n samples: child i uses seed + i, so sample 1 equals a single request seeded seed + 1.
    sampled = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True, logprobs=2)
    multi = tiny_llm.generate(prompt, sampled, use_tqdm=False)[0]
    assert [c.index for c in multi.outputs] == [0, 1, 2]
    single = SamplingParams(temperature=1.0, seed=8, max_tokens=6, ignore_eos=True)
    assert tiny_llm.generate(prompt, single, use_tqdm=False)[0].outputs[0].token_ids == multi.outputs[1].token_ids
    for completion in multi.outputs:
        assert len(completion.logprobs) == 6
        for token_id, entry in zip(completion.token_ids, completion.logprobs):
            assert token_id in entry and 1 <= len(entry) <= 3
        total = sum(entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs))
        assert completion.cumulative_logprob == pytest.approx(total)

    # Greedy logprobs equal the dense model's log-softmax.
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1),
                            use_tqdm=False)[0].outputs[0]
    ids = jnp.asarray([prompt["prompt_token_ids"] + out.token_ids[:2]])
    logprobs = jax.nn.log_softmax(llama.forward_dense(engine.runner.params, engine.model_config, ids)[0], axis=-1)
    for step, token_id in enumerate(out.token_ids):
        row = len(prompt["prompt_token_ids"]) - 1 + step
        assert out.logprobs[step][token_id].rank == 1
        assert out.logprobs[step][token_id].logprob == pytest.approx(float(logprobs[row, token_id]), abs=1e-4)

    # Sampled logprobs are the model's own by default (vLLM's raw_logprobs), not those of the
    # temperature-scaled, top_k-masked distribution the tokens are drawn from.
    sampled = SamplingParams(temperature=0.5, top_k=3, seed=3, max_tokens=3, ignore_eos=True, logprobs=4,
                             repetition_penalty=1.3)
    out = tiny_llm.generate(prompt, sampled, use_tqdm=False)[0].outputs[0]
    ids = jnp.asarray([prompt["prompt_token_ids"] + out.token_ids[:2]])
    logprobs = jax.nn.log_softmax(llama.forward_dense(engine.runner.params, engine.model_config, ids)[0], axis=-1)
    for step, token_id in enumerate(out.token_ids):
        row = np.asarray(logprobs[len(prompt["prompt_token_ids"]) - 1 + step])
        top = np.argsort(-row, kind="stable")[:4]
        assert set(top) <= set(out.logprobs[step])
        for t in [token_id, *top]:
            assert out.logprobs[step][t].logprob == pytest.approx(float(row[t]), abs=1e-4)
        above = [1 + int((row > row[token_id] + d).sum()) for d in (1e-4, -1e-4)]
        assert above[0] <= out.logprobs[step][token_id].rank <= above[1]


def test_enqueue_and_wait_for_completion(tiny_llm):
    """vLLM's enqueue (enqueue_chat) / wait_for_completion: enqueued prompts run when waited for (or during a
    generate call, which returns only its own outputs) and come back in enqueue order with the
    tokens generate gives; an invalid prompt enqueues nothing; enqueueing works while scheduling
    is paused, waiting does not."""
    engine = tiny_llm.llm_engine
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts()[:3]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, greedy, use_tqdm=False)]
    first = tiny_llm.enqueue(prompts[:2], greedy)
    (own,) = tiny_llm.generate(prompts[2], greedy, use_tqdm=False)
    assert own.request_id not in first and own.outputs[0].token_ids == expected[2]
    second = tiny_llm.enqueue(prompts[2], greedy, priority=0)
    bars = []

    class RecordingBar(tqdm):  # vLLM's use_tqdm may be the progress bar's class
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    outputs = tiny_llm.wait_for_completion(use_tqdm=RecordingBar)
    assert [(bar.total, bar.n) for bar in bars] == [(3, 3)]  # one of them finished during generate
    assert "est. speed input: " in bars[0].postfix and " toks/s, output: " in bars[0].postfix  # vLLM's
    assert [o.request_id for o in outputs] == first + second
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert tiny_llm.wait_for_completion(use_tqdm=False) == []
    with pytest.raises(ValueError, match="vocabulary|token"):
        tiny_llm.enqueue([prompts[0], {"prompt_token_ids": [10 ** 8]}], greedy)
    assert not engine.has_unfinished_requests() and tiny_llm.wait_for_completion(use_tqdm=False) == []
    chat = [{"role": "user", "content": "Hello there"}]
    (chat_id,) = tiny_llm.enqueue_chat(chat, greedy)
    (replied,) = tiny_llm.wait_for_completion(use_tqdm=False)
    assert replied.request_id == chat_id
    assert replied.outputs[0].token_ids == tiny_llm.chat(chat, greedy, use_tqdm=False)[0].outputs[0].token_ids
    engine.pause(mode="keep")
    queued = tiny_llm.enqueue(prompts, greedy)
    with pytest.raises(RuntimeError, match="asleep"):
        tiny_llm.wait_for_completion()
    engine.resume()
    outputs = tiny_llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outputs] == queued and [o.outputs[0].token_ids for o in outputs] == expected
    assert_pool_free(tiny_llm)


def first_repetition(token_ids, max_size, count, from_len):
    """The shortest prefix of token_ids, at least from_len long, ending in a pattern of 1..max_size
    tokens repeated `count` times (None if none): the oracle of repetition_detection."""
    for end in range(max(from_len, 1), len(token_ids) + 1):
        head = token_ids[:end]
        for size in range(1, max_size + 1):
            if size * count <= end and all(head[end - size * (k + 1):end - size * k] == head[end - size:]
                                           for k in range(count)):
                return head
    return None


def test_repetition_detection_ends_a_looping_output(tiny_llm):
    """vLLM's repetition_detection: the output ends at the first token that completes a pattern of
    up to max_pattern_size tokens repeated min_count times (finish_reason "repetition",
    stop_reason "repetition_detected"), never before min_tokens; tokens before it are those of
    the run without it. Multi-step rounds drop the tokens after the stop."""
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts()[:4]]
    free = tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    detect = {"max_pattern_size": 4, "min_count": 2}
    cut = [first_repetition(o.outputs[0].token_ids, 4, 2, 1) for o in free]
    assert any(c is not None for c in cut), "the tiny model's greedy outputs should repeat somewhere"
    for params_min_tokens in (0, 20):
        params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, min_tokens=params_min_tokens,
                                repetition_detection=detect)
        for output, full in zip(tiny_llm.generate(prompts, params, use_tqdm=False), free):
            full_ids = full.outputs[0].token_ids
            expected = first_repetition(full_ids, 4, 2, params_min_tokens)
            completion = output.outputs[0]
            if expected is None:
                assert (completion.token_ids, completion.finish_reason) == (full_ids, "length")
            else:
                assert completion.token_ids == expected
                assert (completion.finish_reason, completion.stop_reason) == ("repetition", "repetition_detected")
    assert_pool_free(tiny_llm)
    with pytest.raises(ValueError, match="repetition_detection needs min_count >= 2"):
        SamplingParams(repetition_detection={"max_pattern_size": 3, "min_count": 1})
    with pytest.raises(ValueError, match="min_pattern_size <= max_pattern_size"):
        SamplingParams(repetition_detection={"max_pattern_size": 2, "min_pattern_size": 3, "min_count": 2})
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(repetition_detection={"max_pattern": 2})


def test_thinking_token_budget_forces_the_end_marker(tiny_llm, monkeypatch):
    """vLLM's thinking_token_budget: once a reply has `budget` reasoning tokens after the latest
    start marker (the prompt's count), reasoning_end_str's tokens are forced one by one; before
    that the tokens are the free run's (greedy, and each of n seeded samples), after it those of
    a free run from the prompt plus what came so far. A reasoning the prompt already closed is not
    limited. No compiles, no leaked blocks; refused without reasoning markers."""
    engine = tiny_llm.llm_engine
    budget_params = SamplingParams(max_tokens=4, thinking_token_budget=2)
    with pytest.raises(ValueError, match="reasoning_config is not configured"):
        engine.add_request("no-markers", {"prompt_token_ids": [5, 6]}, budget_params)
    assert "no-markers" not in engine.scheduler.requests
    markers = reasoning_tokens(None, {"reasoning_start_str": "<think>", "reasoning_end_str": "So: </think>"},
                               engine.tokenizer)
    assert len(markers.end) > 1 and markers.natural_end == markers.end
    monkeypatch.setattr(engine, "reasoning_tokens", markers)
    base = mixed_prompts()[2]
    opened = base + list(markers.start) + [300, 301]  # the prompt opens the reasoning: 2 tokens so far
    closed = opened + list(markers.end) + [302]  # ... and closes it
    plain = {"prompt_token_ids": base}
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    free = tiny_llm.generate([{"prompt_token_ids": opened}, {"prompt_token_ids": closed}, plain],
                             SamplingParams(**greedy), use_tqdm=False)
    free = [o.outputs[0].token_ids for o in free]
    seeded = dict(temperature=1.0, seed=7, n=2, max_tokens=12, ignore_eos=True)
    free_seeded = [c.token_ids for c in tiny_llm.generate({"prompt_token_ids": opened}, SamplingParams(**seeded),
                                                          use_tqdm=False)[0].outputs]
    with count_compiles() as compiles:
        limited = tiny_llm.generate([{"prompt_token_ids": opened}, {"prompt_token_ids": closed}, plain,
                                     {"prompt_token_ids": opened}],
                                    [SamplingParams(**greedy, thinking_token_budget=b) for b in (5, 0, 1, 0)],
                                    use_tqdm=False)
        limited_seeded = tiny_llm.generate({"prompt_token_ids": opened},
                                           SamplingParams(**seeded, thinking_token_budget=4), use_tqdm=False)
    assert not compiles
    end = list(markers.end)
    thought = free[0][:3]  # 2 reasoning tokens in the prompt, 3 more reach the budget of 5
    rest = tiny_llm.generate({"prompt_token_ids": opened + thought + end},
                             SamplingParams(**{**greedy, "max_tokens": 24 - 3 - len(end)}), use_tqdm=False)
    assert limited[0].outputs[0].token_ids == thought + end + rest[0].outputs[0].token_ids
    assert limited[1].outputs[0].token_ids == free[1]  # the prompt closed its reasoning
    assert limited[2].outputs[0].token_ids == free[2]  # no start marker at all
    assert limited[3].outputs[0].token_ids[:len(end)] == end  # over budget already: forced at once
    for completion, alone in zip(limited_seeded[0].outputs, free_seeded):
        assert completion.token_ids[:2 + len(end)] == alone[:2] + end
    assert_pool_free(tiny_llm)
    with pytest.raises(ValueError, match="thinking_token_budget must be a non-negative integer or -1"):
        SamplingParams(thinking_token_budget=-2)
    assert SamplingParams(thinking_token_budget=-1).thinking_token_budget is None


def test_multi_step_rounds_give_the_tokens_of_single_steps(tiny_model_dir, tiny_llm):
    """--num-scheduler-steps 4 against 1 on the same weights: the same greedy and seeded tokens
    and texts, stops on a string or a token id inside a round (the round's later tokens dropped),
    a request with logprobs in the batch (no rounds while it runs), no compiles, every block freed."""
    kwargs = {**ENGINE_KWARGS, "num_gpu_blocks_override": 128}
    engines = {k: LLM(str(tiny_model_dir), num_scheduler_steps=k, **kwargs) for k in (1, 4)}
    for llm in engines.values():
        llm.update_weights(tiny_llm.llm_engine.runner.params)
    rounds = []
    runner = engines[4].llm_engine.runner
    run_round = runner._execute_decode_steps
    runner._execute_decode_steps = lambda *a: rounds.append(a[0].num_steps) or run_round(*a)
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts()[:6]]
    greedy = SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)
    full = [o.outputs[0] for o in engines[1].generate(prompts, greedy, use_tqdm=False)]
    stop_at = next(i for i in range(6, 21) if full[2].token_ids.index(full[2].token_ids[i]) == i)
    params = [greedy,
              SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=21, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=21, stop_token_ids=[full[2].token_ids[stop_at]]),
              SamplingParams(temperature=0, max_tokens=21, stop=[full[3].text[len(full[3].text) // 2:][:3]]),
              SamplingParams(temperature=0.8, seed=5, max_tokens=17, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)]
    for with_logprobs in (False, True):
        if with_logprobs:
            params[5] = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
        with count_compiles() as compiles:  # the rounds' programs are compiled at start too
            outputs = {k: [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
                       for k, llm in engines.items()}
        assert compiles == []
        for single, multi in zip(outputs[1], outputs[4]):
            assert (multi.token_ids, multi.text, multi.finish_reason, multi.stop_reason) == (
                single.token_ids, single.text, single.finish_reason, single.stop_reason)
        assert [o.finish_reason for o in outputs[1][2:4]] == ["stop", "stop"]
        assert len(outputs[1][2].token_ids) == stop_at + 1 and len(outputs[1][3].token_ids) < 21
    assert outputs[4][0].token_ids == full[0].token_ids
    assert rounds and set(rounds) == {4}, "the 4-step engine must run rounds"
    for llm in engines.values():
        assert_pool_free(llm)


def test_invalid_requests_raise_with_numbers(tiny_llm):
    with pytest.raises(ValueError, match="maximum context length is 128"):
        tiny_llm.generate({"prompt_token_ids": list(range(100, 200))}, SamplingParams(max_tokens=50), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_llm.generate([[10**7]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt_logprobs is 21, over this server.s limit of 20 \(--max-logprobs\)"):
        tiny_llm.generate("hi", SamplingParams(prompt_logprobs=21), use_tqdm=False)
    assert_pool_free(tiny_llm)


def test_cache_salt_shares_prefix_blocks_only_within_a_salt(tiny_llm):
    """vLLM's cache_salt: the same prompt under another salt (or none) gets no prefix-cache hit,
    under the same salt the hits an unsalted repeat gets; greedy tokens are the same every time."""
    prompt = list(range(300, 340))  # 2 full blocks of 16 tokens, then 8
    params = SamplingParams(temperature=0, max_tokens=4)

    def run(**salt):
        (output,) = tiny_llm.generate([{"prompt_token_ids": prompt, **salt}], params, use_tqdm=False)
        return output

    outputs = [run(cache_salt="tenant-a"), run(cache_salt="tenant-b"), run(), run(cache_salt="tenant-a"), run()]
    engine = tiny_llm.llm_engine
    engine.add_request("keyword-salt", prompt, params, cache_salt="tenant-b")  # the server's way
    while engine.has_unfinished_requests():
        outputs += [output for output in engine.step() if output.finished]
    assert [output.num_cached_tokens for output in outputs] == [0, 0, 0, 32, 32, 32]
    assert len({tuple(output.outputs[0].token_ids) for output in outputs}) == 1
    with pytest.raises(ValueError, match="Parameter 'cache_salt' must be a non-empty string if provided."):
        run(cache_salt="")
    with pytest.raises(ValueError, match="cache_salt is given twice"):
        engine.add_request("twice", {"prompt_token_ids": prompt, "cache_salt": "a"}, params, cache_salt="b")
    assert_pool_free(tiny_llm)


def test_logprob_token_ids_match_dense_log_softmax(tiny_llm):
    """vLLM's logprob_token_ids: each sampled token's logprobs are its own and those of the listed
    tokens (in place of the top ones, ranked by their place in the list), the dense model's
    log-softmax there; in a batch beside penalties, logit_bias and a plain request, with n=2
    seeded samples, and alone turning logprobs on. No compiles; greedy tokens unchanged."""
    engine = tiny_llm.llm_engine
    prompt = mixed_prompts()[2]
    listed = [7, 500, 12345, 49151, 500 + 1]
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with count_compiles() as compiles:
        outputs = tiny_llm.generate(
            [{"prompt_token_ids": prompt}] * 3,
            [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprob_token_ids=listed),
             SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=4, ignore_eos=True, logprobs=2,
                            logprob_token_ids=listed[:2], presence_penalty=0.5, logit_bias={9: 1.0}),
             plain], use_tqdm=False)
    assert not compiles
    assert outputs[0].outputs[0].token_ids == outputs[2].outputs[0].token_ids
    assert outputs[2].outputs[0].logprobs is None
    for output, ids in ((outputs[0], listed), (outputs[1], listed[:2])):
        for completion in output.outputs:
            tokens = completion.token_ids
            dense = jax.nn.log_softmax(llama.forward_dense(
                engine.runner.params, engine.model_config, jnp.asarray([prompt + tokens[:-1]]))[0], axis=-1)
            for step, (token_id, entry) in enumerate(zip(tokens, completion.logprobs, strict=True)):
                row = np.asarray(dense[len(prompt) - 1 + step])
                assert list(entry) == [token_id] + [t for t in ids if t != token_id]
                above = [1 + int((row > row[token_id] + d).sum()) for d in (1e-4, -1e-4)]
                assert above[0] <= entry[token_id].rank <= above[1]
                for place, t in enumerate(ids, 1):
                    assert entry[t].logprob == pytest.approx(float(row[t]), abs=1e-4)
                    if t != token_id:
                        assert entry[t].rank == place
    assert_pool_free(tiny_llm)
    with pytest.raises(ValueError, match="logprob_token_ids must list 1 to 128 token ids"):
        SamplingParams(logprob_token_ids=list(range(129)))
    with pytest.raises(ValueError, match="logprob_token_ids has token ids outside the vocabulary"):
        tiny_llm.generate("hi", SamplingParams(logprob_token_ids=[10**6]), use_tqdm=False)


def test_skip_reading_prefix_cache(tiny_llm):
    """vLLM's skip_reading_prefix_cache: such a request finds no cached prefix (a later one still
    finds its blocks); unset it is True exactly with prompt_logprobs, which cannot have it False."""
    prompt = {"prompt_token_ids": list(range(500, 540))}  # 2 full blocks of 16 tokens, then 8
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    skip = SamplingParams(**greedy, skip_reading_prefix_cache=True)
    outputs = [tiny_llm.generate(prompt, params, use_tqdm=False)[0]
               for params in (skip, skip, SamplingParams(**greedy), SamplingParams(**greedy, prompt_logprobs=1))]
    assert [output.num_cached_tokens for output in outputs] == [0, 0, 32, 0]
    assert len({tuple(output.outputs[0].token_ids) for output in outputs}) == 1
    assert SamplingParams(prompt_logprobs=0).skip_reading_prefix_cache is True
    assert SamplingParams().skip_reading_prefix_cache is False
    with pytest.raises(ValueError, match="skip_reading_prefix_cache cannot be False with prompt_logprobs"):
        SamplingParams(prompt_logprobs=1, skip_reading_prefix_cache=False)
    assert_pool_free(tiny_llm)


def test_stream_interval_sends_the_first_token_then_every_nth_and_the_finish(tiny_llm):
    """vLLM's stream interval: streamed (DELTA) outputs carry a sample's first token at once, then
    `interval` new tokens each, then the rest with the finish; joined, they are the unbatched
    stream. A request's stream_interval only raises the engine's --stream-interval."""
    engine = tiny_llm.llm_engine
    prompt = mixed_prompts()[1]

    def stream(request_id, **interval):
        params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=11, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA, **interval)
        engine.add_request(request_id, prompt, params)
        chunks = {0: [], 1: []}
        while engine.has_unfinished_requests():
            for output in engine.step():
                for c in output.outputs:
                    chunks[c.index].append((c.token_ids, c.text, c.finish_reason))
        return chunks

    def joined(chunks):
        return [t for ids, _, _ in chunks for t in ids], "".join(text for _, text, _ in chunks)

    plain = stream("plain")
    batched = {3: stream("interval-3", stream_interval=3)}
    engine_args = engine.engine_args
    engine.engine_args = dataclasses.replace(engine_args, stream_interval=4)
    try:
        batched[4] = stream("engine-4", stream_interval=2)
    finally:
        engine.engine_args = engine_args
    for index in (0, 1):
        assert [len(ids) for ids, _, _ in plain[index]] == [1] * 11
        for interval, sizes in ((3, [1, 3, 3, 3, 1]), (4, [1, 4, 4, 2])):
            assert [len(ids) for ids, _, _ in batched[interval][index]] == sizes
            assert joined(batched[interval][index]) == joined(plain[index])
            assert [f for _, _, f in batched[interval][index]] == [None] * (len(sizes) - 1) + ["length"]
    assert_pool_free(tiny_llm)


def test_priority_needs_the_priority_scheduling_policy(tiny_llm):
    with pytest.raises(ValueError, match="Got priority 1 but Priority scheduling is not enabled."):
        tiny_llm.generate(["a", "b"], use_tqdm=False, priority=[0, 1])
    with pytest.raises(ValueError, match="got 1 priority entries for 2 prompts"):
        tiny_llm.generate(["a", "b"], use_tqdm=False, priority=[0])
    assert_pool_free(tiny_llm)


def test_prompt_logprobs_match_dense_log_softmax(tiny_llm):
    """A 50-token prompt (two 32-token chunks), asked twice so the second could hit the prefix cache."""
    engine = tiny_llm.llm_engine
    prompt = mixed_prompts()[3]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    tiny_llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1), use_tqdm=False)
    outputs = tiny_llm.generate([{"prompt_token_ids": prompt}] * 2, [params, params.clone()], use_tqdm=False)
    logits = llama.forward_dense(engine.runner.params, engine.model_config, jnp.asarray([prompt]))[0]
    expect = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for output in outputs:
        entries = output.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for position in range(1, len(prompt)):
            token = prompt[position]
            row = expect[position - 1]
            entry = entries[position]
            assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4)
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            assert set(np.argsort(-row)[:2]) <= set(entry) and len(entry) <= 3
    assert_pool_free(tiny_llm)


@pytest.mark.slow
def test_smollm2_greedy_matches_dense():
    llm = LLM(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32, num_gpu_blocks_override=8,
              attention_backend="reference", compilation_cache_dir="", dtype="float32")
    tokenizer = llm.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]
    prompts = [tokenizer.encode(t) for t in texts]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    engine = llm.llm_engine
    expect = dense_greedy(engine.runner.params, engine.model_config, prompts, 10, 32)
    assert [o.outputs[0].token_ids for o in outputs] == expect
    assert "Paris" in outputs[0].outputs[0].text
    assert_pool_free(llm)


def test_buckets_cover_every_step_shape():
    buckets = Buckets.create(max_num_batched_tokens=100, max_num_seqs=24, max_model_len=300, block_size=16)
    assert buckets.num_tokens == (16, 32, 64, 100) and buckets.num_seqs == (8, 16, 24)
    assert buckets.pages_per_seq == (4, 8, 16, 19)
    shapes = set(buckets.step_shapes())
    rng = np.random.default_rng(0)
    for _ in range(500):
        num_tokens = int(rng.integers(1, 101))
        num_seqs = int(rng.integers(1, min(num_tokens, 24) + 1))
        context = int(rng.integers(num_tokens, 301))
        assert buckets.for_step(num_tokens, num_seqs, context, 16) in shapes
    one_width = Buckets.create(max_num_batched_tokens=100, max_num_seqs=24, max_model_len=300, block_size=16,
                               bucket_pages=False)
    assert one_width.pages_per_seq == (19,) and len(set(one_width.step_shapes())) == 4


def test_pool_too_small_for_max_model_len_fails_with_numbers(tiny_model_dir):
    config = ModelConfig.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()), dtype="float32")
    args = EngineArgs(num_gpu_blocks_override=5)
    with pytest.raises(ValueError, match=r"4 usable blocks.*max_model_len=128 needs 8 blocks.*--num-gpu-blocks-override"):
        kv_pool.size_pool(config, args, 128, "float32", jax.devices()[0])
    spec = kv_pool.size_pool(config, EngineArgs(kv_cache_memory=0.001, max_num_seqs=4), 128, "float32",
                             jax.devices()[0])
    # 1 MiB / (2 layers * 2 (K, V) * 2 heads * 16 tokens * 16 dims * 4 bytes) = 128 blocks, capped on
    # CPU at what 4 sequences of 128 tokens can use (4 * 8 + the null block).
    assert spec.num_blocks == (33 if jax.devices()[0].platform == "cpu" else 128)


def test_default_max_model_len_is_the_models_limit_capped_on_cpu_by_what_one_sequence_fits(tiny_model_dir, caplog):
    from jpaged.llm_engine import resolve_max_model_len
    config = ModelConfig.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()), dtype="float32")
    limit = 32768
    config = config.replace(max_position_embeddings=limit)
    assert resolve_max_model_len(EngineArgs(), config, "cpu") == limit  # 4 GiB holds 512k tokens of it
    assert resolve_max_model_len(EngineArgs(max_model_len=100), config, "cpu") == 100
    # 2 layers * 2 (K, V) * 2 heads * 16 tokens * 16 dims * 4 bytes = 8 KiB per block.
    small = EngineArgs(kv_cache_memory=64 * 8192 / kv_pool.GIB)  # 64 blocks: 63 usable
    with caplog.at_level("WARNING", logger="jpaged.llm_engine"):
        assert resolve_max_model_len(small, config, "cpu") == 63 * 16
    assert "max_model_len 1008" in caplog.text and f"allows {limit}" in caplog.text
    assert resolve_max_model_len(EngineArgs(num_gpu_blocks_override=9), config, "cpu") == 8 * 16
    assert resolve_max_model_len(EngineArgs(kv_cache_dtype="bfloat16", kv_cache_memory=small.kv_cache_memory),
                                 config, "cpu") == 127 * 16  # half the bytes per block
    assert resolve_max_model_len(small, config, "gpu") == limit  # a GPU keeps vLLM's rule: fit or fail
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        resolve_max_model_len(EngineArgs(max_model_len=limit + 1), config, "cpu")



def _thp_mode() -> str:
    """The bracketed mode of /sys/kernel/mm/transparent_hugepage/enabled, or "never" without it."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="huge-page advice is for CPU pools")
def test_huge_page_advice_keeps_zeros_and_in_place_updates():
    """A zeroed pool reads back zeros after its pages are dropped for huge pages, and donated
    updates (one slot, then every page) land in the same buffer."""
    shape = (1024, 4, 16, 64)  # 16 MiB of fp32 pages: several aligned 2 MiB pages
    pages = jax.block_until_ready(jax.jit(lambda: jnp.zeros(shape, jnp.float32))())
    advised = kv_pool.advise_huge_pages(pages)
    if _thp_mode() == "never" or not sys.platform.startswith("linux"):
        assert advised == 0
    else:
        assert advised >= 12 << 20
    address = pages.unsafe_buffer_pointer()
    assert not np.asarray(pages).any()
    write_slot = jax.jit(lambda p, x: p.at[5, 1, 3].set(x), donate_argnums=0)
    pages = write_slot(pages, jnp.arange(64, dtype=jnp.float32))
    assert pages.unsafe_buffer_pointer() == address, "the pool must be updated in place"
    host = np.array(pages)
    np.testing.assert_array_equal(host[5, 1, 3], np.arange(64, dtype=np.float32))
    host[5, 1, 3] = 0
    assert not host.any()
    data = np.random.default_rng(0).standard_normal(shape, np.float32)
    pages = jax.jit(lambda p, x: p.at[...].set(x), donate_argnums=0)(pages, data)
    assert pages.unsafe_buffer_pointer() == address
    np.testing.assert_array_equal(np.asarray(pages), data)


def _linux_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _resident_kib(begin: int, end: int) -> int:
    """Resident KiB of the mappings overlapping [begin, end) (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and hi > begin
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(jax.devices()[0].platform != "cpu" or not sys.platform.startswith("linux"),
                    reason="populating is for CPU pools on Linux")
def test_populate_takes_a_lazy_pools_memory_without_changing_it():
    """The server populates its pool at start (MADV_POPULATE_WRITE): the pool's pages become
    resident, its contents stay what they were (zeros, and a written slot)."""
    spec = kv_pool.KVPoolSpec(num_blocks=64, block_size=16, num_layers=2, num_kv_heads=4, head_dim=64,
                              dtype="float32")  # 1 MiB per array
    pool = kv_pool.allocate(spec, jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))
    k, v = pool[0]
    k = jax.jit(lambda p: p.at[5, 1, 3].set(jnp.arange(64, dtype=jnp.float32)), donate_argnums=0)(k)
    pool[0] = (k, v)
    ranges = kv_pool.page_ranges(pool)
    assert len(ranges) == 4 and all(end - begin >= (1 << 20) - 4096 for begin, end in ranges)
    before = sum(_resident_kib(*r) for r in ranges)
    populated = kv_pool.populate(ranges)
    if _linux_version() < (5, 14):
        assert populated == 0  # MADV_POPULATE_WRITE is refused: nothing else to check
        return
    assert populated == sum(end - begin for begin, end in ranges)
    assert sum(_resident_kib(*r) for r in ranges) >= before  # never less resident
    assert all(_resident_kib(begin, end) * 1024 >= end - begin for begin, end in ranges)
    host = np.array(k)
    np.testing.assert_array_equal(host[5, 1, 3], np.arange(64, dtype=np.float32))
    host[5, 1, 3] = 0
    assert not host.any() and not np.asarray(v).any() and not any(np.asarray(a).any() for a in pool[1])


@pytest.mark.skipif(jax.devices()[0].platform != "cpu" or not cpu_kernels.is_available(),
                    reason="the pool is allocated unwritten only on CPU with the C++ kernels")
@pytest.mark.parametrize("shape", [(1024, 4, 16, 64), (5, 3, 16, 64), (7, 3, 5, 33)], ids=["16MiB", "60KiB", "odd"])
def test_unwritten_pool_reads_zeros_after_zero_pages(shape):
    """An array XLA allocates without writing may reuse memory that held other data: zero_pages
    must leave every byte zero (dropped whole pages and written edges), whatever its size and
    alignment, and the array must take donated updates in place."""
    make_garbage = jax.jit(lambda: jnp.full(shape, jnp.nan, jnp.float32))
    uninitialized = jax.jit(lambda: cpu_kernels.uninitialized(shape, jnp.float32))
    for _ in range(3):  # free garbage of the same size first, so the allocator may hand it back
        jax.block_until_ready(make_garbage()).delete()
        pages = jax.block_until_ready(uninitialized())
        advised = kv_pool.zero_pages(pages)
        assert advised >= 0 and advised <= pages.nbytes
        assert not np.asarray(pages).any()
    address = pages.unsafe_buffer_pointer()
    pages = jax.jit(lambda p: p.at[-1].set(1.0), donate_argnums=0)(pages)
    assert pages.unsafe_buffer_pointer() == address
    assert np.asarray(pages)[-1].all() and not np.asarray(pages)[:-1].any()
    spec = kv_pool.KVPoolSpec(num_blocks=9, block_size=16, num_layers=2, num_kv_heads=3, head_dim=64, dtype="float32")
    for k, v in kv_pool.allocate(spec, jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])):
        assert k.shape == v.shape == (9, 3, 16, 64) and not np.asarray(k).any() and not np.asarray(v).any()


def test_min_tokens_holds_back_eos_until_reached(tiny_llm):
    """logit_bias makes eos the greedy choice; min_tokens must ban it for the first outputs."""
    eos = tiny_llm.get_tokenizer().eos_token_ids[0]
    prompt = {"prompt_token_ids": mixed_prompts()[0]}
    params = SamplingParams(temperature=0, logit_bias={eos: 100.0}, min_tokens=3, max_tokens=8)
    out = tiny_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert eos not in out.token_ids[:3]
    assert out.token_ids[3:] == [eos] and out.finish_reason == "stop"
    assert_pool_free(tiny_llm)


def test_top_k_beyond_int32_means_off(tiny_llm):
    prompt = {"prompt_token_ids": mixed_prompts()[1]}
    off, huge = (SamplingParams(temperature=1.0, seed=3, top_k=k, max_tokens=6, ignore_eos=True) for k in (0, 2**40))
    outs = tiny_llm.generate([prompt, prompt], [off, huge], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_cpu_dtype_falls_back_without_native_bf16(caplog):
    from jpaged.cpu_features import has_fast_bf16, resolve_cpu_dtype

    avx2 = frozenset({"avx2", "fma"})
    bf16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert not has_fast_bf16(avx2) and has_fast_bf16(bf16) and has_fast_bf16(frozenset({"amx_bf16"}))
    with caplog.at_level("WARNING"):
        assert resolve_cpu_dtype("bfloat16", avx2) == "float32"
    assert "no native bf16" in caplog.text
    assert resolve_cpu_dtype("bfloat16", bf16) == "bfloat16"
    assert resolve_cpu_dtype("float16", bf16) == "bfloat16"
    assert resolve_cpu_dtype("float16", avx2) == "float32"
    assert resolve_cpu_dtype("float32", avx2) == "float32" and resolve_cpu_dtype("auto", avx2) == "auto"


def test_unset_token_budget_is_the_servers_chunk_for_the_device(tiny_model_dir):
    """--max-num-batched-tokens None (what `python -m jpaged.serve` passes when the flag is not
    given) becomes the server's chunk for the platform (on CPU: 384 with AMX, else 768): the
    scheduler's budget and the runner's largest token bucket; LLM's default stays 512."""
    from jpaged.config import server_max_num_batched_tokens
    from jpaged.llm_engine import LLMEngine

    assert EngineArgs().max_num_batched_tokens == 512
    avx512, amx = frozenset({"avx2", "avx512f"}), frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"})
    assert server_max_num_batched_tokens("cpu", avx512) == 768 and server_max_num_batched_tokens("cpu", amx) == 384
    assert server_max_num_batched_tokens("gpu", amx) == 512
    kwargs = dict(ENGINE_KWARGS, max_num_batched_tokens=None, max_model_len=32, num_gpu_blocks_override=8)
    engine = LLMEngine(EngineArgs(model=str(tiny_model_dir), **kwargs), show_progress=False)
    expected = server_max_num_batched_tokens(jax.devices()[0].platform)
    assert engine.engine_args.max_num_batched_tokens == expected
    assert engine.scheduler.max_num_batched_tokens == expected
    assert engine.runner.buckets.num_tokens[-1] == expected


def test_chat_takes_text_parts_and_continues_the_final_message(tiny_llm):
    """LLM.chat as vLLM's: text parts render one per line, continue_final_message leaves the last
    message open (its text is the prompt's end), and the prompts' greedy replies match generate's."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tokenizer = tiny_llm.get_tokenizer()
    parts = [{"role": "user", "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]}]
    joined = [{"role": "user", "content": "One.\nTwo."}]
    by_parts, by_string = tiny_llm.chat([parts, joined], params, use_tqdm=False)
    assert by_parts.prompt == by_string.prompt and "One.\nTwo." in by_parts.prompt
    assert by_parts.outputs[0].token_ids == by_string.outputs[0].token_ids
    opened = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    reply = tiny_llm.chat(opened, params, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    closed = tokenizer.apply_chat_template(opened, add_generation_prompt=False)
    assert reply.prompt.endswith("Hello, I am") and closed.startswith(reply.prompt) and closed != reply.prompt
    direct = tiny_llm.generate({"prompt_token_ids": tokenizer.encode(reply.prompt, add_special_tokens=False)},
                               params, use_tqdm=False)[0]
    assert reply.outputs[0].token_ids == direct.outputs[0].token_ids
    with pytest.raises(ValueError, match="continue_final_message"):
        tiny_llm.chat(opened, params, continue_final_message=True)
    with pytest.raises(ValueError, match="type 'image_url' is not supported"):
        tiny_llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], params)


def test_chat_template_content_format(tiny_llm):
    """LLM.chat's chat_template_content_format (vLLM's keyword): "auto" hands a template that
    loops over the parts a list of them, "string" one string."""
    template = ("{% for m in messages %}{% if m.content is string %}S:{{ m.content }}"
                "{% else %}{% for p in m.content %}P:{{ p.text }};{% endfor %}{% endif %}{% endfor %}")
    params = SamplingParams(temperature=0, max_tokens=1)
    conversation = [{"role": "user", "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]}]
    prompts = {fmt: tiny_llm.chat(conversation, params, use_tqdm=False, chat_template=template,
                                  chat_template_content_format=fmt)[0].prompt for fmt in ("auto", "openai", "string")}
    assert prompts == {"auto": "P:One.;P:Two.;", "openai": "P:One.;P:Two.;", "string": "S:One.\nTwo."}


def test_disable_sliding_window_caps_the_context_at_the_window(tiny_model_dir):
    """vLLM's --disable-sliding-window on a sliding-window model (the tiny Llama made a Mistral with a
    window of 48 by --hf-overrides): full attention, max_model_len capped at the window (a larger
    --max-model-len is refused), greedy tokens those of the dense model without a window."""
    window = {"architectures": ["MistralForCausalLM"], "sliding_window": 48}
    kwargs = {**ENGINE_KWARGS, "hf_overrides": window, "enforce_eager": True}
    windowed = LLM(str(tiny_model_dir), **kwargs).llm_engine
    assert (windowed.model_config.sliding_window, windowed.max_model_len) == (48, 128)
    with pytest.raises(ValueError, match="--max-model-len 128 exceeds .* \\(48\\)"):
        LLM(str(tiny_model_dir), disable_sliding_window=True, **kwargs)
    llm = LLM(str(tiny_model_dir), disable_sliding_window=True, **{**kwargs, "max_model_len": None})
    engine = llm.llm_engine
    assert (engine.model_config.sliding_window, engine.max_model_len) == (None, 48)
    prompt = mixed_prompts()[0][:20]
    (out,) = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)
    assert out.outputs[0].token_ids == dense_greedy(engine.runner.params, engine.model_config, [prompt], 8, 32)[0]
    assert_pool_free(llm)


def test_reset_prefix_cache_with_running_requests(tiny_llm):
    """LLM.reset_prefix_cache: a repeated prompt finds nothing cached afterwards; with
    reset_running_requests=True a request halfway through its tokens goes back to the queue with
    nothing computed, recomputes without the (reset) cache and ends with the undisturbed tokens."""
    engine = tiny_llm.llm_engine
    prompt = {"prompt_token_ids": mixed_prompts()[1]}
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (first,) = tiny_llm.generate([prompt], greedy, use_tqdm=False)
    assert tiny_llm.reset_prefix_cache() is True
    (second,) = tiny_llm.generate([prompt], greedy, use_tqdm=False)
    assert second.num_cached_tokens == 0 and second.outputs[0].token_ids == first.outputs[0].token_ids
    engine.add_request("halfway", prompt, greedy)
    while not engine.scheduler.running or not engine.scheduler.running[0].output_token_ids:
        engine.step()
    assert engine.reset_prefix_cache(reset_running_requests=True) is True
    hits = engine.scheduler.prefix_cache_hits
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 1
    (waiting,) = engine.scheduler.waiting
    assert waiting.num_computed_tokens == 0 and waiting.output_token_ids
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.outputs[0].token_ids for o in outputs] == [first.outputs[0].token_ids]
    assert engine.scheduler.prefix_cache_hits == hits  # the recompute found its own old blocks uncached
    assert_pool_free(tiny_llm)


def test_sleep_releases_memory_and_wake_up_gives_the_same_tokens(tiny_llm, monkeypatch):
    """vLLM's sleep mode: refused unless enabled; level 1 aborts (or keeps) the requests in flight,
    frees the KV pool and forgets the prefix cache; wake_up takes back what its tags name and
    scheduling only last; greedy tokens after waking (and a kept request's) equal those before.
    Level 2 drops the weights: update_weights brings them back."""
    engine = tiny_llm.llm_engine
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts()[:3]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with pytest.raises(ValueError, match="sleep mode is not enabled"):
        tiny_llm.sleep()
    engine_args = engine.engine_args
    engine.engine_args = dataclasses.replace(engine_args, enable_sleep_mode=True)
    try:
        before = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, greedy, use_tqdm=False)]
        engine.add_request("in-flight", prompts[0], greedy)
        engine.step()
        aborted = engine.sleep(level=1, mode="abort")
        assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in aborted] == [
            ("in-flight", True, "abort")]
        assert engine.runner.kv_cache is None and tiny_llm.is_sleeping()
        assert_pool_free(tiny_llm)
        with pytest.raises(RuntimeError, match="asleep"):
            tiny_llm.generate(prompts, greedy, use_tqdm=False)
        assert tiny_llm.wake_up(["kv_cache"]) is False
        with pytest.raises(ValueError, match="scheduling cannot resume before weights"):
            tiny_llm.wake_up(["scheduling"])
        assert tiny_llm.wake_up() is True and not tiny_llm.is_sleeping()
        assert [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, greedy, use_tqdm=False)] == before

        # An engine that populates its pool (the server's) populates the pool wake_up allocates.
        populated = []
        monkeypatch.setattr(kv_pool, "populate", lambda ranges: populated.append(ranges) or 0)
        engine.populate_kv_cache().join()
        engine.sleep(level=1)
        assert tiny_llm.wake_up() is True
        deadline = time.monotonic() + 30
        while len(populated) < 2 and time.monotonic() < deadline:  # wake_up's thread
            time.sleep(0.01)
        assert len(populated) == 2 and populated[1] == kv_pool.page_ranges(engine.runner.kv_cache)
        engine._populates_kv_cache = False

        # "keep": a request halfway through its tokens sleeps with the engine, then finishes as it would have.
        engine.add_request("kept", prompts[1], greedy)
        for _ in range(3):
            engine.step()
        assert engine.sleep(level=1, mode="keep") == [] and engine.step() == []
        assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 1
        assert engine.wake_up() is True
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
        assert [o.outputs[0].token_ids for o in outputs] == [before[1]]

        # Level 2: the weights are gone until update_weights gives them back.
        weights = jax.tree.map(np.array, engine.runner.params)
        engine.sleep(level=2)
        assert engine.runner.weights_released
        with pytest.raises(ValueError, match="update_weights"):
            tiny_llm.wake_up()
        tiny_llm.update_weights(weights)
        assert tiny_llm.wake_up() is True
        assert [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, greedy, use_tqdm=False)] == before
        # Arrays a caller gave update_weights (kept as they are on the same device) stay the caller's.
        mine = jax.tree.map(jnp.asarray, weights)
        tiny_llm.update_weights(mine)
        engine.sleep(level=2)
        assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(mine))
        jax.tree.map(np.testing.assert_array_equal, mine, weights)
        tiny_llm.update_weights(mine)
        assert tiny_llm.wake_up() is True
        with pytest.raises(ValueError, match="sleep level must be one of"):
            tiny_llm.sleep(level=3)
    finally:
        engine.engine_args = engine_args
        if engine.is_sleeping():
            engine.wake_up()
    assert_pool_free(tiny_llm)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED is Linux's")
def test_release_pages_gives_an_arrays_pages_back():
    """What sleep mode runs before deleting the pool and the weights: the array's whole pages are
    dropped (they read back as zeros), so the memory leaves the process even where the allocator
    would keep it."""
    array = jax.jit(lambda: jnp.ones((4096, 1024), jnp.float32))()  # 16 MiB that XLA allocated
    assert float(jnp.sum(array)) == array.size
    assert kv_pool.release_pages(array) >= array.nbytes - 2 * 4096
    assert float(jnp.sum(array)) < 0.01 * array.size
