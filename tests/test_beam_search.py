"""Beam search (jpaged/beam_search.py): `LLM.beam_search` and the server's `use_beam_search`.

Oracles: a dense no-cache beam search written here from the algorithm's definition (every live
beam extended by its top 2 * width tokens of llama.forward_dense's log_softmax, EOS extensions
set aside, the width best by cumulative logprob kept, the end ranked by length-penalised score)
on the bundled SmolLM2, whose chat replies end on EOS; the same search run to max_tokens without
early stopping, on scripted distributions; the engine's stats for freed blocks.
"""

import asyncio
import math

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import LLM, BeamSearchParams
from jpaged.beam_search import BeamSearch, run_beam_search, score
from jpaged.models import llama
from jpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from server_harness import API_KEY, MODEL_NAME, wait_until_idle
from test_server import client, server  # noqa: F401 (fixtures: the tiny model's server and an openai client)

PADDED_LENS = (32, 64, 96)  # the oracle's padded lengths: the dense forward costs rows x length
DENSE_ROWS = 3  # the oracle's batch, padded: one program per model and length for every width and step
_forward_dense = jax.jit(llama.forward_dense, static_argnums=1)


def dense_beam_search(params, config, prompt, width, max_tokens, length_penalty, eos_ids, ignore_eos=False):
    """[(tokens, cum_logprob)] of the best `width` sequences, best first (tokens include the prompt)."""
    assert width <= DENSE_ROWS
    live, finished = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        padded_len = next(n for n in PADDED_LENS if n >= max(len(tokens) for tokens, _ in live))
        ids = np.zeros((DENSE_ROWS, padded_len), np.int32)
        for i, (tokens, _) in enumerate(live):
            ids[i, :len(tokens)] = tokens
        logits = _forward_dense(params, config, jnp.asarray(ids))
        last = logits[np.arange(len(live)), np.array([len(tokens) - 1 for tokens, _ in live])]
        logprobs = np.asarray(jax.nn.log_softmax(last.astype(jnp.float32), axis=-1))
        candidates = []
        for (tokens, cum), row in zip(live, logprobs):
            for token in np.argsort(-row, kind="stable")[:2 * width]:
                extended = (tokens + [int(token)], cum + float(row[token]))
                (finished if int(token) in eos_ids and not ignore_eos else candidates).append(extended)
        live = sorted(candidates, key=lambda c: -c[1])[:width]

    def ranked(sequence):
        tokens, cum = sequence
        return cum / (len(tokens) - (tokens[-1] in eos_ids)) ** length_penalty

    return sorted(finished + live, key=ranked, reverse=True)[:width]


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_path):
    return LLM(smollm2_path, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64,
               compilation_cache_dir="", seed=0)


def test_beam_search_matches_a_dense_beam_search(smollm2_llm):
    llm, tokenizer = smollm2_llm, smollm2_llm.get_tokenizer()
    engine = llm.llm_engine
    eos_ids = set(tokenizer.eos_token_ids)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True)
    prompts = [tokenizer.encode(chat), tokenizer.encode("Paged attention stores the KV cache in")]
    seen_eos = False
    for width, length_penalty in ((3, 1.0), (2, 0.0), (1, 2.0)):
        params = BeamSearchParams(beam_width=width, max_tokens=14, length_penalty=length_penalty)
        outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
        for prompt, output in zip(prompts, outputs):
            want = dense_beam_search(engine.runner.params, engine.model_config, prompt, width, 14,
                                     length_penalty, eos_ids)
            assert [s.tokens for s in output.sequences] == [tokens for tokens, _ in want]
            for sequence, (tokens, cum) in zip(output.sequences, want):
                assert math.isclose(sequence.cum_logprob, cum, abs_tol=1e-3)
                assert sequence.tokens[:len(prompt)] == prompt
                assert sequence.text == tokenizer.decode(sequence.tokens)  # vLLM's: prompt included
                assert len(sequence.logprobs) == len(sequence.tokens) - len(prompt)
                ends_on_eos = tokens[-1] in eos_ids
                seen_eos |= ends_on_eos
                assert sequence.finish_reason == ("stop" if ends_on_eos else "length")
    assert seen_eos, "the chat prompt's beams should end on EOS"
    stats = engine.get_stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0
    assert stats.prefix_cache_hits > 0, "the beams' steps should reuse their shared prefix"


def test_beam_search_checks_the_request_and_the_batching_limit(smollm2_llm):
    with pytest.raises(ValueError, match="context length"):
        smollm2_llm.beam_search("Hi", BeamSearchParams(beam_width=2, max_tokens=300))
    with pytest.raises(ValueError, match="--max-logprobs"):
        smollm2_llm.beam_search("Hi", BeamSearchParams(beam_width=11, max_tokens=4))
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    prompts = ["One", "Two", "Three"]
    params = BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True)
    together = smollm2_llm.beam_search(prompts, params)
    one_at_a_time = smollm2_llm.beam_search(prompts, params, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in together] == \
        [[s.tokens for s in o.sequences] for o in one_at_a_time]


# --------------------------------------------------------------------------- the search itself

class ScriptedModel:
    """A next-token distribution per sequence over a 12-token vocabulary (token 0 is EOS),
    drawn from the sequence itself, answering a step as the engine would (the top logprobs)."""

    def __init__(self, seed: int):
        self.seed = seed

    def step(self, tokens: list[int], num_top: int) -> RequestOutput:
        rng = np.random.default_rng([self.seed, *tokens])
        logits = rng.normal(size=12) * 2.0
        logprobs = logits - np.log(np.exp(logits).sum())
        order = np.argsort(-logprobs)[:num_top]
        top = {int(t): Logprob(float(logprobs[t]), rank + 1) for rank, t in enumerate(order)}
        completion = CompletionOutput(0, "", [int(order[0])], None, [top], "length")
        return RequestOutput("step", None, tokens, None, [completion], True, RequestMetrics())


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 0.5, 1.0, 2.0])
def test_stopping_early_returns_what_running_to_max_tokens_returns(length_penalty, monkeypatch):
    settled_early = 0
    for seed in range(40):
        model = ScriptedModel(seed)
        params = BeamSearchParams(beam_width=1 + seed % 4, max_tokens=12, length_penalty=length_penalty)

        def run(early: bool):
            search = BeamSearch([5, 7], params, eos_token_ids=[0])
            steps = 0
            while not (search.done if early else (not search.live or search.steps >= params.max_tokens)):
                search.advance([model.step(beam.tokens, 2 * params.beam_width) for beam in search.live])
                steps += 1
            return [(b.tokens, b.cum_logprob, b.finish_reason) for b in search.best()], steps

        (early, early_steps), (full, full_steps) = run(True), run(False)
        assert early == full
        settled_early += early_steps < full_steps
    assert settled_early > 0, "some searches should settle before max_tokens"


def test_scores_count_the_prompt_and_not_a_final_eos():
    search = BeamSearch([1, 2, 3], BeamSearchParams(beam_width=1, max_tokens=2), eos_token_ids=[0])
    search.advance([ScriptedModel(0).step([1, 2, 3], 2)])
    beam = search.live[0]
    assert score(beam, {0}, 1.0) == beam.cum_logprob / 4
    ended = type(beam)(beam.tokens + [0], cum_logprob=-2.0)
    assert score(ended, {0}, 2.0) == -2.0 / 16


def test_an_aborted_step_ends_the_search_with_its_beams():
    model = ScriptedModel(3)
    search = BeamSearch([4], BeamSearchParams(beam_width=2, max_tokens=8), eos_token_ids=[0])
    search.advance([model.step([4], 4)])
    aborted = model.step(search.live[0].tokens, 4)
    aborted.outputs[0].finish_reason = "abort"
    search.advance([aborted, model.step(search.live[1].tokens, 4)])
    assert search.done
    assert [b.finish_reason for b in search.best()] == ["abort", "abort"]


def test_run_beam_search_cancels_the_steps_of_a_failed_one():
    model = ScriptedModel(5)
    started, cancelled = [], []

    async def run_step(tokens, step_id):
        started.append(step_id)
        if step_id == "1-1":
            raise RuntimeError("step failed")
        try:
            await asyncio.sleep(0 if step_id.startswith("0-") else 10)
        except asyncio.CancelledError:
            cancelled.append(step_id)
            raise
        return model.step(tokens, 6)

    search = BeamSearch([9], BeamSearchParams(beam_width=3, max_tokens=5), eos_token_ids=[0])
    with pytest.raises(RuntimeError, match="step failed"):
        asyncio.run(run_beam_search(search, run_step))
    assert started == ["0-0", "1-0", "1-1", "1-2"]
    assert sorted(cancelled) == ["1-0", "1-2"]


# --------------------------------------------------------------------------- the server

def test_completions_and_chat_serve_beam_search(server, client):  # noqa: F811
    engine = server.engine.engine
    tokenizer, eos_ids = engine.tokenizer, set(engine.tokenizer.eos_token_ids)
    prompt = "Once upon a time"
    prompt_ids = tokenizer.encode(prompt)
    want = dense_beam_search(engine.runner.params, engine.model_config, prompt_ids, 3, 6, 1.0, eos_ids)
    result = client.completions.create(model=MODEL_NAME, prompt=prompt, n=3, max_tokens=6, logprobs=1,
                                       extra_body={"use_beam_search": True})
    assert [c.index for c in result.choices] == [0, 1, 2]
    for choice, (tokens, _) in zip(result.choices, want):
        assert choice.text == tokenizer.decode(tokens[len(prompt_ids):])
        assert choice.finish_reason == "length"
        assert len(choice.logprobs.tokens) == 6
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == 18

    messages = [{"role": "user", "content": "Hello there"}]
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                add_special_tokens=False)
    want = dense_beam_search(engine.runner.params, engine.model_config, chat_ids, 2, 5, 0.5, eos_ids)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, n=2, max_tokens=5,
                                           extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [c.message.content for c in reply.choices] == [tokenizer.decode(t[len(chat_ids):]) for t, _ in want]
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=messages, n=2, max_tokens=5, stream=True,
                                              extra_body={"use_beam_search": True, "length_penalty": 0.5})
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in reply.choices]
    assert wait_until_idle(server).kv_cache_usage == 0


def finished_requests(server, reason: str = "") -> float:
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    prefix = "vllm:request_success_total{" + (f'finished_reason="{reason}"' if reason else "")
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


def test_beam_search_counts_as_one_request_in_metrics(server, client):  # noqa: F811
    before = finished_requests(server)
    client.completions.create(model=MODEL_NAME, prompt="Count me", n=2, max_tokens=4,
                              extra_body={"use_beam_search": True})
    assert finished_requests(server) == before + 1


@pytest.mark.parametrize("body, param, words", [
    ({"stream": True}, "stream", "Streaming"),
    ({"stop": ["x"]}, "stop", "use_beam_search"),
    ({"presence_penalty": 0.5}, "presence_penalty", "use_beam_search"),
    ({"n": 11}, "n", "--max-logprobs"),
    ({"echo": True, "logprobs": 1}, "echo", "prompt logprobs"),
    ({"best_of": 4}, "best_of", "beam width"),
    ({"max_tokens": 500}, "max_tokens", "maximum context length"),
])
def test_beam_search_refusals(server, body, param, words):  # noqa: F811
    payload = {"model": MODEL_NAME, "prompt": "Hi", "use_beam_search": True, "max_tokens": 4, **body}
    response = httpx.post(server.url + "/v1/completions", json=payload, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_chat_beam_search_refuses_a_constrained_reply(server):  # noqa: F811
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    payload = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "use_beam_search": True,
               "tools": tools, "tool_choice": "required"}
    response = httpx.post(server.url + "/v1/chat/completions", json=payload,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"


def test_a_client_leaving_mid_search_frees_every_block(server):  # noqa: F811
    payload = {"model": MODEL_NAME, "prompt": "A long search", "use_beam_search": True, "n": 8, "max_tokens": 90,
               "ignore_eos": True}
    aborted = finished_requests(server, "abort")

    async def leave_once_running():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
            request = asyncio.create_task(http.post(server.url + "/v1/completions", json=payload))
            while server.engine.get_stats().num_running == 0:
                assert not request.done(), "the search ended before the client could leave"
                await asyncio.sleep(0.005)
            request.cancel()  # closes the connection

    asyncio.run(leave_once_running())
    assert wait_until_idle(server).kv_cache_usage == 0
    assert finished_requests(server, "abort") == aborted + 1, "the search should end when its client leaves"
