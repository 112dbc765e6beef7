"""The OpenAI-compatible server, end to end: a real uvicorn on 127.0.0.1, the real AsyncLLM on the
tiny random model, driven by the official `openai` client (sync, async, streaming) and httpx.

Oracles: a dense no-cache greedy loop (llama.forward_dense) for content, the tokenizer for usage
counts, the non-streamed response for the streamed one, and the engine's own stats (through
AsyncLLM.get_stats) for freed KV blocks after disconnects.
"""

import asyncio
import dataclasses
import json
import re
import types

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from jpaged.admission import QUEUE_LIMIT_REASONS, Admission
from jpaged.config import EngineArgs
from jpaged.loaders import load_model
from jpaged.models import llama
from prometheus_client import CollectorRegistry, generate_latest
from serving.metrics import EngineStatsCollector
from server_harness import API_KEY, MAX_REQUEST_BYTES, MODEL_NAME, ThreadedServer, health_ok, wait_until_idle

MAX_MODEL_LEN = 128
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # Small buckets: two forward programs and one sampler program to compile.
    engine_args = EngineArgs(model=str(tiny_model_dir), max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                             max_num_batched_tokens=16, num_gpu_blocks_override=64,
                             compilation_cache_dir="")
    srv = ThreadedServer(engine_args)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(str(tiny_model_dir))


_forward_dense = jax.jit(llama.forward_dense, static_argnums=1)


def dense_greedy(model, prompt_ids: list[int], num_tokens: int, padded_len: int = 64) -> list[int]:
    """The oracle: greedy decoding with a full no-cache causal forward per token (the sequence
    is padded at the end to one length, so this compiles once)."""
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        padded = jnp.asarray([ids + [0] * (padded_len - len(ids))], dtype=jnp.int32)
        logits = _forward_dense(model.params, model.config, padded)
        ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
    return ids[len(prompt_ids):]


def sse_payloads(raw: str) -> list[str]:
    """Splits an SSE body into its `data:` payloads, checking the framing on the way."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:500]
    return [e[len("data: "):] for e in events]


# --------------------------------------------------------------------------- completions


def test_completion_greedy_matches_dense_oracle(server, client, tiny_model):
    prompt = "The capital of France is"
    prompt_ids = tiny_model.tokenizer.encode(prompt)
    expected = dense_greedy(tiny_model, prompt_ids, 6)
    result = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.text == tiny_model.tokenizer.decode(expected)
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == 6
    assert result.usage.total_tokens == len(prompt_ids) + 6
    # The same prompt as token ids gives the same completion.
    by_ids = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == choice.text
    wait_until_idle(server)


def test_allowed_token_ids_and_bad_words(server, client, tiny_model):
    """The fields reach the engine: greedy over the dense logits of the allowed tokens only,
    never the banned word (a one-token word: both its plain and its spaced token)."""
    prompt_ids = tiny_model.tokenizer.encode("Restricted choices")
    free = dense_greedy(tiny_model, prompt_ids, 4)
    allowed = sorted(set(range(500, 520)) - set(free))
    expected, ids = [], list(prompt_ids)
    for _ in range(4):
        padded = jnp.asarray([ids + [0] * (64 - len(ids))], dtype=jnp.int32)
        logits = np.asarray(_forward_dense(tiny_model.params, tiny_model.config, padded)[0, len(ids) - 1])
        ids.append(allowed[int(np.argmax(logits[allowed]))])
        expected.append(ids[-1])
    result = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert result.choices[0].text == tiny_model.tokenizer.decode(expected) != tiny_model.tokenizer.decode(free)
    word = tiny_model.tokenizer.decode([free[0]])
    banned = {t for w in (word.lstrip(), " " + word.lstrip()) for t in tiny_model.tokenizer.encode(w)[:1]}
    result = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=4, temperature=0, logprobs=0,
                                       extra_body={"ignore_eos": True, "bad_words": [word]})
    tokens = [tiny_model.tokenizer.encode(t)[0] if t else None for t in result.choices[0].logprobs.tokens]
    assert free[0] in banned and not banned & set(tokens)


def test_completion_batch_with_n(server, client, tiny_model):
    prompts = ["Once upon a time", "Paged attention"]
    result = client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, max_tokens=5,
                                       temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage.prompt_tokens == sum(len(tiny_model.tokenizer.encode(p)) for p in prompts)
    assert result.usage.completion_tokens == 4 * 5
    # Seeded sampling is reproducible: the same request again gives the same texts.
    again = client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, max_tokens=5,
                                      temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in result.choices]


def test_completion_stream_equals_non_stream(server, client):
    kwargs = dict(model=MODEL_NAME, prompt="Streaming test:", max_tokens=12, temperature=0.8, seed=1234,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens == 12
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_interval_batches_tokens_into_fewer_chunks(server, client):
    """vLLM's stream_interval: the first token at once, then chunks of 4 new tokens (with their
    logprobs), the rest with the finish; the same text and tokens as the non-streamed reply."""
    kwargs = dict(model=MODEL_NAME, prompt="Interval test:", max_tokens=11, temperature=0, logprobs=1,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.completions.create(**kwargs).choices[0]
    kwargs["extra_body"]["stream_interval"] = 4
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
    assert [len(c.token_ids) for c in chunks] == [1, 4, 4, 2]
    assert [len(c.logprobs.tokens) for c in chunks] == [1, 4, 4, 2]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert [t for c in chunks for t in c.logprobs.token_logprobs] == whole.logprobs.token_logprobs


def test_completion_sse_framing(server):
    body = {"prompt": "SSE framing", "max_tokens": 4, "stream": True, "temperature": 0, "ignore_eos": True}
    response = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "usage" not in chunks[-1]  # no include_usage: no usage anywhere


def test_completion_logprobs_shape(server, client, tiny_model):
    result = client.completions.create(model=MODEL_NAME, prompt="Logprobs", max_tokens=5, temperature=0,
                                       logprobs=3, extra_body={"ignore_eos": True})
    choice = result.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert lp.text_offset == offsets
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4
        assert top[token] == logprob
        # Greedy picks the most likely token, so its logprob is the best of the top ones.
        assert logprob == pytest.approx(max(top.values()))
        assert logprob <= 0


def test_completion_echo_with_logprobs(server, client, tiny_model):
    prompt = "Hello there, world"
    prompt_len = len(tiny_model.tokenizer.encode(prompt))
    result = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, temperature=0,
                                       echo=True, logprobs=2, extra_body={"ignore_eos": True})
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == prompt_len + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts token 0
    assert "".join(lp.tokens[:prompt_len]) == prompt
    assert result.choices[0].text.startswith(prompt)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(prompt_len + 3)]
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == logprob and 2 <= len(top) <= 3
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, temperature=0,
                                         echo=True, logprobs=2, stream=True, extra_body={"ignore_eos": True})
    pieces = [chunk.choices[0].logprobs for chunk in streamed]
    assert sum((p.tokens for p in pieces), []) == lp.tokens
    assert sum((p.text_offset for p in pieces), []) == lp.text_offset


def test_echo_with_max_tokens_zero_scores_the_prompt_only(server, client, tiny_model):
    """vLLM's echo without generation: the prompt and its logprobs come back, no generated token."""
    prompt = "Score this prompt"
    prompt_len = len(tiny_model.tokenizer.encode(prompt))
    generating = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0,
                                           echo=True, logprobs=1)
    scored = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice, reference = scored.choices[0], generating.choices[0].logprobs
    assert choice.text == prompt and choice.finish_reason == "length"
    assert choice.logprobs.tokens == reference.tokens[:prompt_len]
    assert choice.logprobs.token_logprobs == reference.token_logprobs[:prompt_len]
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == prompt


def test_prompt_logprobs_match_the_dense_model(server, tiny_model):
    """vLLM's prompt_logprobs (completions: per choice; chat: on the response): None for the first
    token, then the prompt token's logprob, rank and text plus the top k, against log_softmax of
    a dense no-cache forward."""
    prompt = "Prompt logprobs, please"
    ids = tiny_model.tokenizer.encode(prompt)
    padded = jnp.asarray([ids + [0] * (64 - len(ids))], dtype=jnp.int32)
    oracle = np.asarray(jax.nn.log_softmax(_forward_dense(tiny_model.params, tiny_model.config, padded)[0], axis=-1))
    body = {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}
    result = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH).json()
    entries = result["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for position, entry in enumerate(entries[1:], 1):
        expected = oracle[position - 1]
        own = entry[str(ids[position])]
        assert own["logprob"] == pytest.approx(expected[ids[position]], abs=1e-4)
        assert own["rank"] == 1 + int(np.sum(expected > expected[ids[position]]))
        assert own["decoded_token"] == tiny_model.tokenizer.decode([ids[position]], skip_special_tokens=False)
        top = sorted((v["rank"], int(k)) for k, v in entry.items() if v["rank"] <= 2)
        assert [token for _, token in top] == list(np.argsort(-expected, kind="stable")[:2])
        assert len(entry) in (2, 3)
    chat_body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "prompt_logprobs": 0}
    chat = httpx.post(server.url + "/v1/chat/completions", json=chat_body, headers=AUTH).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 for entry in chat["prompt_logprobs"][1:])


def test_completion_stop_string(server, client):
    base = client.completions.create(model=MODEL_NAME, prompt="Stops", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[3:5]
    assert stop.strip(), f"pick a prompt whose greedy text has visible characters, got {base!r}"
    result = client.completions.create(model=MODEL_NAME, prompt="Stops", max_tokens=10, temperature=0,
                                       stop=[stop], extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == base[:base.index(stop)]
    assert choice.model_extra["stop_reason"] == stop


def test_completion_echo_logit_bias_and_stop_token_ids(server, client, tiny_model):
    prompt = "Echo this"
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    echoed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0,
                                       echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    # OpenAI sends logit_bias keys as strings; +100 on one token makes greedy pick only it.
    token_id = tiny_model.tokenizer.encode(" paged", add_special_tokens=False)[0]
    biased = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={str(token_id): 100}, extra_body={"ignore_eos": True})
    assert biased.choices[0].text == tiny_model.tokenizer.decode([token_id] * 4)
    stopped = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0,
                                        logit_bias={str(token_id): 100},
                                        extra_body={"ignore_eos": True, "stop_token_ids": [token_id]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == token_id
    assert stopped.usage.completion_tokens == 1


# --------------------------------------------------------------------------- chat


MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]


def test_chat_logprobs_and_usage(server, client, tiny_model):
    prompt = tiny_model.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    prompt_ids = tiny_model.tokenizer.encode(prompt, add_special_tokens=False)
    expected = dense_greedy(tiny_model, prompt_ids, 5)
    result = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5,
                                            temperature=0, logprobs=True, top_logprobs=2,
                                            extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tiny_model.tokenizer.decode(expected)
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == 5
    content = choice.logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy = rank 1
    # /tokenize renders the same template and counts the same tokens.
    tokenized = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=AUTH).json()
    assert tokenized["tokens"] == prompt_ids


def test_chat_async_stream_equals_non_stream(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0.7, seed=99, n=2,
                      extra_body={"ignore_eos": True})
        whole = await client.chat.completions.create(**kwargs)
        stream = await client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                      **kwargs)
        chunks = [chunk async for chunk in stream]
        await client.close()
        return whole, chunks

    whole, chunks = asyncio.run(run())
    # The first chunk of each choice carries the role and no text.
    firsts = {}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            firsts.setdefault(c.index, c)
    assert all(c.delta.role == "assistant" and c.delta.content == "" for c in firsts.values())
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_concurrent_requests_match_solo_runs(server):
    """Sixteen concurrent seeded requests (two batches' worth) give what each gives alone."""
    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

        async def one(seed: int) -> str:
            result = await client.completions.create(model=MODEL_NAME, prompt=f"Request {seed}:", max_tokens=6,
                                                     temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
            return result.choices[0].text

        together = await asyncio.gather(*(one(seed) for seed in range(16)))
        alone = [await one(seed) for seed in (0, 7, 15)]
        await client.close()
        return together, alone

    together, alone = asyncio.run(run())
    assert [together[0], together[7], together[15]] == alone
    wait_until_idle(server)


# --------------------------------------------------------------------------- other routes


def test_models_version_tokenize_detokenize(server, tiny_model):
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", httpx.get(server.url + "/version").json()["version"])
    assert httpx.get(server.url + "/ping").status_code == httpx.post(server.url + "/ping").status_code == 200
    text = "Hello, paged world!"
    tokenized = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers=AUTH).json()
    assert tokenized["tokens"] == tiny_model.tokenizer.encode(text)
    assert tokenized["count"] == len(tokenized["tokens"])
    detokenized = httpx.post(server.url + "/detokenize", json={"tokens": tokenized["tokens"]}, headers=AUTH).json()
    assert detokenized["prompt"] == tiny_model.tokenizer.decode(tokenized["tokens"], skip_special_tokens=False)


def test_vllm_defaults_of_the_serving_flags(server):
    """Without tests/test_server_flags.py's flags, vLLM's defaults: no prompt_tokens_details, no
    usage chunk unless asked, no X-Request-Id header, /load at 0, the assistant's role, no empty
    tool_calls, logprob tokens as text, no /tokenizer_info."""
    reply = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "user", "content": "u"}], "max_tokens": 2, "logprobs": True})
    data = reply.json()
    assert data["usage"]["prompt_tokens_details"] is None
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert "tool_calls" not in data["choices"][0]["message"]  # vLLM leaves an empty list out
    assert not data["choices"][0]["logprobs"]["content"][0]["token"].startswith("token_id:")
    assert "x-request-id" not in reply.headers
    with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "p", "max_tokens": 30, "stream": True}) as response:
        lines = response.iter_lines()
        first = next(lines)
        assert httpx.get(server.url + "/load").json() == {"server_load": 0}
        payloads = [line for line in [first, *lines] if line]
    assert payloads[-1] == "data: [DONE]" and all('"usage"' not in p for p in payloads)
    # priority needs --scheduling-policy priority (vLLM's message)
    refused = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": "p", "priority": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
    assert "Priority scheduling is not enabled" in refused.json()["error"]["message"]
    # GET /tokenizer_info only with --enable-tokenizer-info-endpoint (vLLM's 404), the dev routes only in dev mode
    assert httpx.get(server.url + "/tokenizer_info", headers=AUTH).status_code == 404
    for path in ("/pause", "/resume", "/abort_requests", "/reset_prefix_cache", "/start_profile", "/stop_profile"):
        assert httpx.post(server.url + path, headers=AUTH, json={}).status_code == 404, path
    assert httpx.get(server.url + "/is_paused", headers=AUTH).status_code == 404
    assert httpx.get(server.url + "/server_info", headers=AUTH).status_code == 404


def _metric(text: str, name: str, *labels: str) -> float:
    """The sum of `name`'s samples (those with all of `labels`, e.g. 'source="disk"')."""
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("prefix", ["jpaged", "vllm"])
def test_metrics(server, client, tiny_model, prefix):
    before = httpx.get(server.url + "/metrics").text
    result = client.completions.create(model=MODEL_NAME, prompt="Count me", max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    streamed = client.completions.create(model=MODEL_NAME, prompt="Count me too", max_tokens=5, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert len([chunk for chunk in streamed if chunk.choices and chunk.choices[0].text]) >= 1
    wait_until_idle(server)
    after = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "time_to_first_token_seconds_count",
                 "time_per_output_token_seconds_count", "e2e_request_latency_seconds_count"):
        assert f"{prefix}:{name}" in after, name
    delta = lambda name: _metric(after, f"{prefix}:{name}") - _metric(before, f"{prefix}:{name}")  # noqa: E731
    assert delta("generation_tokens_total") == 7 + 5
    assert delta("prompt_tokens_total") == result.usage.prompt_tokens + len(tiny_model.tokenizer.encode("Count me too"))
    for histogram in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds",
                      "request_inference_time_seconds"):
        assert delta(histogram + "_count") == 2, histogram
    # One inter-token gap per token after the first, streamed (observed per chunk) or not (the mean gap).
    assert delta("inter_token_latency_seconds_count") == 6 + 4
    assert delta("request_success_total") == 2
    assert _metric(after, f"{prefix}:num_requests_running") == 0
    # vLLM 0.32's per-request families (its TPOT histogram's new name beside the old one)
    assert delta("request_time_per_output_token_seconds_count") == delta("time_per_output_token_seconds_count") == 2
    assert delta("request_params_n_count") == 2 and delta("request_params_n_sum") == 2
    assert delta("request_params_max_tokens_sum") == delta("request_max_num_generation_tokens_sum") == 7 + 5
    assert delta("request_prefill_kv_computed_tokens_sum") == delta("prompt_tokens_total") - (
        delta("prefix_cache_hits_total"))
    assert delta("request_num_preemptions_count") == 2 and delta("request_num_preemptions_sum") == 0
    # Engine families vLLM 0.32 exports beside those: prompt tokens by source, the step-size
    # histogram (every token this test ran, in at least one step per token of the longer request),
    # waiting requests by reason, the KV cache's settings.
    by_source = {source: _metric(after, f"{prefix}:prompt_tokens_by_source_total", f'source="{source}"')
                 - _metric(before, f"{prefix}:prompt_tokens_by_source_total", f'source="{source}"')
                 for source in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    assert sum(by_source.values()) == delta("prompt_tokens_total") and by_source["external_kv_transfer"] == 0
    assert by_source["local_cache_hit"] == delta("prompt_tokens_cached_total") == delta("prefix_cache_hits_total")
    assert delta("prompt_tokens_cached_by_source_total") == delta("prefix_cache_hits_total")
    assert delta("iteration_tokens_total_sum") == by_source["local_compute"] + 7 + 5
    assert 7 <= delta("iteration_tokens_total_count") <= 7 + 5 + 2
    assert _metric(after, f"{prefix}:iteration_tokens_total_bucket", 'le="+Inf"') == _metric(
        after, f"{prefix}:iteration_tokens_total_count")
    assert _metric(after, f"{prefix}:num_requests_waiting_by_reason") == 0
    pool_blocks = server.engine.get_stats().num_kv_blocks
    assert _metric(after, f"{prefix}:cache_config_info", f'num_gpu_blocks="{pool_blocks}"') == 1
    assert f"{prefix}:lora_requests_info" not in after  # LoRA is off


def test_lora_and_waiting_families_join_the_engines(server):
    """lora_requests_info: one series naming every replica's adapters once, in first-seen order;
    waiting requests split by reason per engine."""
    stats = server.engine.get_stats()
    per_engine = [dataclasses.replace(stats, num_waiting=3, num_waiting_deferred=1, running_lora_adapters=("a", "b"),
                                      waiting_lora_adapters=("c",)),
                  dataclasses.replace(stats, num_waiting=0, num_waiting_deferred=0, running_lora_adapters=("b", "d"),
                                      waiting_lora_adapters=())]
    engine = types.SimpleNamespace(get_stats_per_engine=lambda: per_engine, model_config=server.engine.model_config,
                                   engine_args=dataclasses.replace(server.engine.engine_args, enable_lora=True,
                                                                   max_loras=2, max_cpu_loras=2))
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(engine, "m"))
    text = generate_latest(registry).decode()
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and info[0].startswith(
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b,d",waiting_lora_adapters="c"}'), info
    assert _metric(text, "vllm:num_requests_waiting_by_reason", 'engine="0"', 'reason="deferred"') == 1
    assert _metric(text, "vllm:num_requests_waiting_by_reason", 'engine="0"', 'reason="capacity"') == 2
    assert _metric(text, "vllm:num_requests_waiting_by_reason", 'engine="1"') == 0


# --------------------------------------------------------------------------- errors


def test_invocations_routes_by_the_body(server, client):
    """SageMaker's /invocations (vLLM's): `messages` is a chat completion, `prompt` a completion,
    streamed or not, answered as their own routes answer; anything else is a 400; the key guards it."""
    greedy = {"model": MODEL_NAME, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    chat = {**greedy, "messages": [{"role": "user", "content": "Hello"}]}
    reply = httpx.post(server.url + "/invocations", json=chat, headers=AUTH, timeout=60).json()
    direct = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=AUTH, timeout=60).json()
    assert reply["object"] == "chat.completion" and reply["choices"] == direct["choices"]
    assert reply["usage"] == direct["usage"]
    completion = {**greedy, "prompt": "Once upon a time", "stream": True}
    streamed = sse_payloads(httpx.post(server.url + "/invocations", json=completion, headers=AUTH, timeout=60).text)
    expected = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    assert streamed[-1] == "[DONE]"
    assert "".join(json.loads(p)["choices"][0]["text"] for p in streamed[:-1]) == expected
    error = _error(httpx.post(server.url + "/invocations", json={"input": "Hi"}, headers=AUTH), 400)
    assert "`messages`" in error["message"] and "`prompt`" in error["message"]
    _error(httpx.post(server.url + "/invocations", content=b"{not json", headers=AUTH), 400)
    _error(httpx.post(server.url + "/invocations", json=chat), 401)
    wait_until_idle(server)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    return error


ERROR_CASES = {
    "context_length": ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400,
                       "context_length_exceeded", [str(MAX_MODEL_LEN)]),
    "negative_temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, None, ["temperature"]),
    "bad_top_p": ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 1.5}, 400, None, ["top_p"]),
    "wrong_type": ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 422, None, ["max_tokens"]),
    "missing_field": ("/v1/chat/completions", {"model": MODEL_NAME}, 422, None, ["messages"]),
    "empty_prompt": ("/v1/completions", {"prompt": ""}, 400, None, ["prompt"]),
    "token_out_of_vocab": ("/v1/completions", {"prompt": [1, 10**9]}, 400, None, ["1000000000"]),
    "bad_role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422, None, ["role"]),
    "logit_bias_range": ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, 400, None, ["logit_bias"]),
    "stream_options_without_stream": ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
                                      400, None, ["stream_options"]),
    "top_logprobs_without_logprobs": ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400,
                                      None, ["logprobs"]),
    "request_chat_template": ("/v1/chat/completions", {"messages": MESSAGES, "chat_template": "/etc/passwd"},
                              400, None, ["--trust-request-chat-template"]),
    "empty_prompt_in_batch": ("/v1/completions", {"prompt": [[5, 6], []]}, 400, None, ["prompt"]),
    "top_k_over_int32": ("/v1/completions", {"prompt": "hi", "top_k": 10**12}, 400, None, ["top_k"]),
    "n_zero": ("/v1/completions", {"prompt": "hi", "n": 0}, 400, None, ["n"]),
    "stream_interval_zero": ("/v1/completions", {"prompt": "hi", "stream_interval": 0}, 400, None,
                             ["stream_interval"]),
    "min_tokens_over_max_tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, 400,
                                   None, ["min_tokens"]),
    # Checked by the engine itself (ValueError before its first output), not by the server:
    "stop_token_out_of_vocab": ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, 400, None,
                                ["1000000000"]),
    "non_text_content_part": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, None, ["'image_url'", "multimodal"]),
    "unknown_model": ("/v1/completions", {"prompt": "hi", "model": "gpt-5"}, 404, "model_not_found", ["gpt-5"]),
    "unknown_route": ("/v1/edits", {"input": "x"}, 404, "unknown_url", ["/v1/edits"]),
}


# Cases whose streamed variant must fail the same way, before any SSE is sent.
STREAMED_TOO = {"context_length", "negative_temperature", "bad_top_p", "token_out_of_vocab",
                "top_logprobs_without_logprobs", "stop_token_out_of_vocab", "unknown_model", "non_text_content_part"}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_then_healthy(server, case):
    path, body, status, code, fragments = ERROR_CASES[case]
    for stream in (False, True) if case in STREAMED_TOO else (False,):
        error = _error(httpx.post(server.url + path, json={**body, "stream": stream} if stream else body,
                                  headers=AUTH), status)
        assert error["code"] == code
        for fragment in fragments:
            assert fragment in error["message"], error
    assert health_ok(server)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe{}", b"[" * 30000 + b"]" * 30000,
                                  b'{"prompt": "hi", "n": 1' + b"0" * 5000 + b"}"])
def test_invalid_json_then_healthy(server, body):
    error = _error(httpx.post(server.url + "/v1/completions", content=body, headers=AUTH), 400)
    assert "JSON" in error["message"]
    assert health_ok(server)


def test_oversized_body_then_healthy(server):
    body = {"prompt": "x" * (MAX_REQUEST_BYTES + 1)}
    error = _error(httpx.post(server.url + "/v1/completions", json=body, headers=AUTH), 413)
    assert str(MAX_REQUEST_BYTES) in error["message"] and "--max-request-bytes" in error["message"]
    assert health_ok(server)


def test_api_key_guards_v1_only(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"x-api-key": "wrong"},
                    {"x-api-key": f"Bearer {API_KEY}"}):
        error = _error(httpx.get(server.url + "/v1/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": API_KEY}).status_code == 200  # Anthropic's
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert health_ok(server)


# --------------------------------------------------------------------------- disconnects


def test_every_finish_reason_is_exported_from_the_start(server):
    text = httpx.get(server.url + "/metrics").text
    for reason in ("stop", "length", "abort", "error"):
        assert f'finished_reason="{reason}"' in text, reason


def _aborted_total(server) -> float:
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("jpaged:request_success_total{") and 'finished_reason="abort"' in line)


def test_stream_disconnect_aborts_and_frees_blocks(server):
    wait_until_idle(server)
    generated_before = server.engine.get_stats().generation_tokens_total
    aborted_before = _aborted_total(server)
    max_tokens = MAX_MODEL_LEN - 16
    body = {"prompt": "Disconnect me", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
        assert server.engine.get_stats().kv_cache_usage > 0
    stats = wait_until_idle(server)
    assert stats.generation_tokens_total - generated_before < max_tokens, "the request ran to the end"
    assert _aborted_total(server) == aborted_before + 1
    assert health_ok(server)


def test_non_stream_disconnect_aborts_and_frees_blocks(server):
    wait_until_idle(server)
    generated_before = server.engine.get_stats().generation_tokens_total
    aborted_before = _aborted_total(server)
    max_tokens = MAX_MODEL_LEN - 16
    body = {"prompt": "Disconnect me too", "max_tokens": max_tokens, "ignore_eos": True}

    async def disconnect_while_running():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as http:
            request = asyncio.create_task(http.post("/v1/completions", json=body, timeout=60))
            while server.engine.get_stats().num_running == 0:
                assert not request.done(), request.result().text
                await asyncio.sleep(0.002)
            request.cancel()  # closes the connection: the server sees the client leave

    asyncio.run(disconnect_while_running())
    stats = wait_until_idle(server)
    assert stats.generation_tokens_total - generated_before < max_tokens, "the request ran to the end"
    assert _aborted_total(server) == aborted_before + 1
    assert health_ok(server)


@pytest.mark.parametrize("limits, reason", [((0, None), "max_num_queued_reqs"), ((None, 0), "max_num_queued_tokens")])
def test_queue_limits_answer_503_and_count_rejections(server, client, limits, reason):
    """--max-num-queued-reqs / --max-num-queued-tokens (here at 0: every request is over) refuse
    with vLLM's 503, streamed or not, before any header of a stream; the server keeps serving."""
    saved = server.engine.admission
    server.engine.admission = Admission(*limits)
    before = httpx.get(server.url + "/metrics").text
    try:
        body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}
        plain = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        streamed = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=AUTH, timeout=60)
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    finally:
        server.engine.admission = saved
    for response in (plain, streamed):
        assert response.status_code == 503 and response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", reason)
        assert "Please try again later or on a different instance." in error["message"]
    assert info.value.status_code == 503
    after = httpx.get(server.url + "/metrics").text
    for prefix in ("jpaged", "vllm"):
        rejected = [_metric(text, f"{prefix}:admission_rejections_total", f'reason="{name}"')
                    for text in (before, after) for name in QUEUE_LIMIT_REASONS]
        assert rejected[2 + QUEUE_LIMIT_REASONS.index(reason)] - rejected[QUEUE_LIMIT_REASONS.index(reason)] == 3
    assert client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices[0].finish_reason
    wait_until_idle(server)
