"""vLLM's token-in / token-out API (POST /inference/v1/generate, the /v1/*/render routes) and
its generative scoring (POST /generative_scoring) on the tiny random model.

Oracles: the dense no-cache greedy loop for the token ids; the tokenizer for output_mode "text";
the same seeded request whole and streamed; vLLM 0.32's field names (its GenerateResponse and
stream chunk models, read from its source); the engine's stats for freed KV blocks.
"""

import dataclasses
import json
import threading

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from test_server import AUTH, dense_greedy, tiny_model  # noqa: F401 (tiny_model: a fixture)

from jpaged.config import EngineArgs
from jpaged.models import llama
from jpaged.sampling_params import SamplingParams
from serving.generate_tokens import GenerateSamplingParams
from server_harness import MODEL_NAME, ThreadedServer, wait_until_idle

PROMPT = [504, 1142, 314, 253, 1837, 30, 216, 4917, 28, 1142]
# vLLM's GenerateTokensResponse.model_dump() keys, and its choices'
RESPONSE_KEYS = {"request_id", "model", "created", "usage", "prompt_logprobs", "prompt_token_id_logprobs",
                 "prompt_token_ids", "mm_placeholders", "metrics", "kv_transfer_params", "ec_transfer_params",
                 "output_mode", "choices"}
CHOICE_KEYS = {"index", "finish_reason", "stop_reason", "token_ids", "routed_experts", "sampling_mask",
               "weight_versions", "logprobs"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = EngineArgs(model=str(tiny_model_dir), max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                      num_gpu_blocks_override=64, compilation_cache_dir="")
    srv = ThreadedServer(args, app_kwargs={"enable_scale_out": True, "server_dev_mode": True})  # dev: /pause
    yield srv
    srv.stop()


def _generate(server, headers=None, **body) -> httpx.Response:
    return httpx.post(server.url + "/inference/v1/generate", json={"token_ids": PROMPT, **body},
                      headers={**AUTH, **(headers or {})}, timeout=120)


def _chunks(response: httpx.Response) -> list[dict]:
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]", lines[-1]
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_greedy_tokens_match_the_dense_oracle(server, tiny_model):  # noqa: F811
    """Token ids in, token ids out: the dense loop's greedy tokens, vLLM's response fields, the
    reply id from X-Request-Id, usage, the prompt's ids with return_token_ids; max_tokens unset
    is generation_config's, not SamplingParams' 16."""
    response = _generate(server, headers={"X-Request-Id": "rl-7"}, return_token_ids=True, model=MODEL_NAME,
                         sampling_params={"temperature": 0, "max_tokens": 20, "ignore_eos": True})
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == RESPONSE_KEYS and data["output_mode"] == "tokens"
    assert data["request_id"] == "generate-tokens-rl-7" and data["model"] == MODEL_NAME
    (choice,) = data["choices"]
    assert set(choice) == CHOICE_KEYS
    expected = dense_greedy(tiny_model, PROMPT, 20)
    assert choice["token_ids"] == expected
    assert (choice["finish_reason"], choice["stop_reason"], choice["logprobs"]) == ("length", None, None)
    assert data["prompt_token_ids"] == PROMPT
    assert data["usage"]["prompt_tokens"] == len(PROMPT) and data["usage"]["completion_tokens"] == 20
    assert data["usage"]["total_tokens"] == len(PROMPT) + 20
    server.ctx.generation_defaults["max_tokens"] = 24
    try:
        unset = _generate(server, sampling_params={"temperature": 0, "ignore_eos": True}).json()["choices"][0]
    finally:
        del server.ctx.generation_defaults["max_tokens"]
    assert unset["token_ids"] == dense_greedy(tiny_model, PROMPT, 24)
    wait_until_idle(server)


def test_text_mode_and_logprobs(server, tiny_model):  # noqa: F811
    """output_mode "text": the text is the tokens' decoding, logprobs in chat's shape; tokens mode
    gives the same logprobs keyed by token id, the sampled token first in top_logprobs."""
    params = {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "logprobs": 2}
    text = _generate(server, output_mode="text", sampling_params=params).json()
    tokens = _generate(server, sampling_params=params).json()
    assert text["output_mode"] == "text" and "text" in text["choices"][0] and "text" not in tokens["choices"][0]
    ids = tokens["choices"][0]["token_ids"]
    assert ids == text["choices"][0]["token_ids"] == dense_greedy(tiny_model, PROMPT, 6)
    assert text["choices"][0]["text"] == server.ctx.tokenizer.decode(ids)
    text_steps = text["choices"][0]["logprobs"]["content"]
    token_steps = tokens["choices"][0]["logprobs"]["content"]
    for token_id, text_step, step in zip(ids, text_steps, token_steps, strict=True):
        assert step["token_id"] == token_id and step["rank"] == 1  # greedy: the best token
        assert step["logprob"] == pytest.approx(text_step["logprob"])
        assert text_step["token"] == server.ctx.tokenizer.decode([token_id])
        assert [t["token_id"] for t in step["top_logprobs"]][0] == token_id and len(step["top_logprobs"]) == 2
        assert [t["logprob"] for t in step["top_logprobs"]] == pytest.approx([t["logprob"] for t in
                                                                             text_step["top_logprobs"]])
    wait_until_idle(server)


def test_logprob_token_ids(server):
    """sampling_params.logprob_token_ids (vLLM's): each token's top_logprobs are the sampled token,
    then the listed ones; the sampled token's logprob is the one logprobs reports."""
    listed = [5, 9, 4000]
    params = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}
    scored = _generate(server, sampling_params={**params, "logprob_token_ids": listed}).json()["choices"][0]
    plain = _generate(server, sampling_params={**params, "logprobs": 0}).json()["choices"][0]
    assert scored["token_ids"] == plain["token_ids"]
    for step, plain_step in zip(scored["logprobs"]["content"], plain["logprobs"]["content"], strict=True):
        assert [t["token_id"] for t in step["top_logprobs"]] == [step["token_id"], *listed]
        assert [t["rank"] for t in step["top_logprobs"][1:]] == [1, 2, 3]  # places in the list, as vLLM's
        assert step["logprob"] == pytest.approx(plain_step["logprob"])
        assert all(t["logprob"] < 0 for t in step["top_logprobs"])
    refused = _generate(server, sampling_params={"logprob_token_ids": [10**7]})
    assert refused.status_code == 400 and "logprob_token_ids" in refused.json()["error"]["message"]
    wait_until_idle(server)


def test_logprob_token_ids_in_chat_and_completions(server):
    """Chat (with logprobs) and completions take logprob_token_ids as vLLM's do: each token's top
    list is the sampled token, then the listed ones, with the generate route's logprobs."""
    listed = [500, 4000]
    decode = server.ctx.tokenizer.decode
    body = {"model": MODEL_NAME, "messages": MESSAGES, "temperature": 0, "max_tokens": 3}
    chat = _post(server, "/v1/chat/completions", {**body, "logprobs": True, "logprob_token_ids": listed,
                                                  "return_token_ids": True}).json()["choices"][0]
    request = _post(server, "/v1/chat/completions/render", body).json()
    request["sampling_params"]["logprob_token_ids"] = listed
    generated = _post(server, "/inference/v1/generate", request).json()["choices"][0]
    assert chat["token_ids"] == generated["token_ids"]
    for item, step in zip(chat["logprobs"]["content"], generated["logprobs"]["content"], strict=True):
        assert [t["token"] for t in item["top_logprobs"]] == [item["token"], *map(decode, [[t] for t in listed])]
        assert [t["logprob"] for t in item["top_logprobs"]] == pytest.approx(
            [t["logprob"] for t in step["top_logprobs"]])
    completion = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 0,
                                                   "logprob_token_ids": listed}).json()["choices"][0]
    for token, top in zip(completion["logprobs"]["tokens"], completion["logprobs"]["top_logprobs"], strict=True):
        assert list(top) == [token, decode([500]), decode([4000])]
    beam = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "use_beam_search": True,
                                             "logprob_token_ids": listed})
    assert beam.status_code == 400 and "logprob_token_ids" in beam.json()["error"]["message"]
    wait_until_idle(server)


def test_stream_gives_the_whole_replys_tokens(server):
    """Streamed, n=2 seeded samples: each index's chunks add up to the whole reply's tokens;
    vLLM's chunk fields (prompt_token_ids in the first only), continuous usage per chunk and a
    last usage chunk without choices."""
    params = {"temperature": 1.0, "seed": 11, "n": 2, "max_tokens": 9, "ignore_eos": True}
    whole = _generate(server, sampling_params=params).json()["choices"]
    streamed = _generate(server, stream=True, return_token_ids=True, sampling_params=params,
                         stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert streamed.status_code == 200, streamed.text
    chunks = _chunks(streamed)
    *pieces, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 18
    assert set(pieces[0]) == {"request_id", "usage", "output_mode", "choices", "prompt_token_ids"}
    assert pieces[0]["prompt_token_ids"] == PROMPT
    assert all(set(chunk) == {"request_id", "usage", "output_mode", "choices"} for chunk in pieces[1:])
    tokens, finish = {0: [], 1: []}, {}
    for chunk in pieces:
        (choice,) = chunk["choices"]
        tokens[choice["index"]] += choice["token_ids"]
        assert chunk["usage"]["completion_tokens"] == len(tokens[choice["index"]])
        finish[choice["index"]] = choice["finish_reason"] or finish.get(choice["index"])
    assert [tokens[c["index"]] for c in whole] == [c["token_ids"] for c in whole]
    assert finish == {0: "length", 1: "length"}
    wait_until_idle(server)


def test_abort_by_the_reply_id(server):
    """/inference/v1/abort_requests ends a streamed request by the id its chunks carry; an empty
    list ends nothing; a body without request_ids is a 400. The request is held by /pause?mode=keep
    (the tiny model would finish it before any abort arrives)."""
    result = {}

    def run():
        result["response"] = _generate(server, headers={"X-Request-Id": "long"}, stream=True,
                                       sampling_params={"temperature": 0, "max_tokens": 200, "ignore_eos": True})

    def post(path, **kwargs):
        return httpx.post(server.url + path, headers=AUTH, timeout=30, **kwargs)

    assert post("/pause?mode=keep").status_code == 200
    thread = threading.Thread(target=run)
    try:
        thread.start()
        while not server.ctx.in_flight:
            thread.join(0.01)
        assert post("/inference/v1/abort_requests", json={"request_ids": []}).status_code == 200
        missing = post("/inference/v1/abort_requests", json={})
        assert missing.status_code == 400 and "request_ids" in missing.json()["error"]["message"]
        thread.join(0.3)
        assert list(server.ctx.in_flight.values()) == ["generate-tokens-long"]
        abort = post("/inference/v1/abort_requests", json={"request_ids": ["generate-tokens-long"]})
        assert abort.status_code == 200 and abort.content == b""
        thread.join(60)
    finally:
        assert post("/resume").status_code == 200
    chunks = _chunks(result["response"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 0
    wait_until_idle(server)


GENERATE_REQUEST_KEYS = {"request_id", "token_ids", "token_offsets", "features", "content_parts", "sampling_params",
                         "model", "reasoning_ended", "reasoning_parser_kwargs", "return_token_ids", "output_mode",
                         "stream", "stream_options", "cache_salt", "priority", "kv_transfer_params",
                         "ec_transfer_params"}
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def _post(server, path: str, body: dict, headers=None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**AUTH, **(headers or {})}, timeout=120)


def test_render_then_generate_is_the_chat_reply(server):
    """/v1/chat/completions/render gives vLLM's GenerateRequest: the prompt the chat route runs and
    its sampling fields (max_tokens unset: up to the context); sent to /inference/v1/generate it
    gives the chat reply's tokens. /v1/messages/render and /v1/responses/render go through the
    same chat request (the latter stateless: no previous_response_id)."""
    body = {"model": MODEL_NAME, "messages": MESSAGES, "temperature": 0, "max_tokens": 7, "seed": 3,
            "logit_bias": {"11": 2.5}, "stop": ["zz"]}
    rendered = _post(server, "/v1/chat/completions/render", body, {"X-Request-Id": "r1"})
    assert rendered.status_code == 200, rendered.text
    request = rendered.json()
    assert set(request) == GENERATE_REQUEST_KEYS and request["request_id"] == "chatcmpl-r1"
    assert request["sampling_params"]["max_tokens"] == 7 and request["sampling_params"]["logit_bias"] == {"11": 2.5}
    chat = _post(server, "/v1/chat/completions", {**body, "return_token_ids": True}).json()
    assert request["token_ids"] == chat["prompt_token_ids"]
    generated = _post(server, "/inference/v1/generate", request).json()
    assert generated["choices"][0]["token_ids"] == chat["choices"][0]["token_ids"]
    unset = _post(server, "/v1/chat/completions/render", {"messages": MESSAGES}).json()
    assert unset["sampling_params"]["max_tokens"] == 256 - len(unset["token_ids"])
    messages = _post(server, "/v1/messages/render", {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 7,
                                                     "temperature": 0}).json()
    assert messages["token_ids"] == request["token_ids"] and messages["request_id"].startswith("chatcmpl-")
    responses = _post(server, "/v1/responses/render", {"model": MODEL_NAME, "input": MESSAGES[0]["content"],
                                                       "max_output_tokens": 7, "request_id": "resp_x"}).json()
    assert responses["token_ids"] == request["token_ids"] and responses["request_id"] == "resp_x"
    assert responses["sampling_params"]["max_tokens"] == 7
    stateful = _post(server, "/v1/responses/render", {"input": "Hi", "previous_response_id": "resp_y"})
    assert stateful.status_code == 400 and "stateless render endpoint" in stateful.json()["error"]["message"]
    wait_until_idle(server)


def test_completions_render_one_request_per_prompt(server, tiny_model):  # noqa: F811
    rendered = _post(server, "/v1/completions/render", {"prompt": [PROMPT, PROMPT[:5]], "max_tokens": 5,
                                                          "temperature": 0, "ignore_eos": True},
                     {"X-Request-Id": "c"}).json()
    assert [r["request_id"] for r in rendered] == ["cmpl-c-0", "cmpl-c-1"]
    assert [r["token_ids"] for r in rendered] == [PROMPT, PROMPT[:5]]
    (text,) = _post(server, "/v1/completions/render", {"prompt": "Hello there"}).json()
    assert text["token_ids"] == server.ctx.tokenizer.encode("Hello there")
    assert text["sampling_params"]["max_tokens"] == 16  # the completions default, as in vLLM
    generated = _post(server, "/inference/v1/generate", rendered[0]).json()
    assert generated["choices"][0]["token_ids"] == dense_greedy(tiny_model, PROMPT, 5)
    for field, fragment in (("use_beam_search", "use_beam_search is not supported"), ("echo", "echo")):
        refused = _post(server, "/v1/completions/render", {"prompt": "a", field: True})
        assert refused.status_code == 400 and fragment in refused.json()["error"]["message"]
    over = _post(server, "/v1/completions/render", {"prompt": "a", "max_tokens": 1000})
    assert over.status_code == 400 and "maximum context length" in over.json()["error"]["message"]
    wait_until_idle(server)


@pytest.mark.parametrize("body, status, fragment", [
    ({"sampling_params": {"temperature": 0, "beam": 2}}, 400, "unknown fields ['beam']"),
    ({"sampling_params": {"prompt_logprob_token_ids": [[3]]}}, 400,
     "sampling_params.prompt_logprob_token_ids is not supported"),
    ({"sampling_params": {"flat_logprobs": False, "output_kind": 2, "max_tokens": 1}}, 200, ""),
    ({"sampling_params": {"temperature": -1}}, 400, "temperature must be non-negative"),
    ({"sampling_params": {"n": "two"}}, 422, "sampling_params.n"),
    ({"sampling_params": {"structured_outputs": {"regex": "a", "backend": "x"}}}, 400, "backend"),
    ({"sampling_params": {"detokenize": False}, "output_mode": "text"}, 400, "requires sampling_params.detokenize"),
    ({"sampling_params": {}, "features": {"mm_hashes": {}}}, 400, "features is not supported"),
    ({"sampling_params": {}, "kv_transfer_params": {"do_remote_decode": True}}, 400, "kv_transfer_params"),
    ({"sampling_params": {}, "token_ids": []}, 400, "token_ids"),
    ({"sampling_params": {}, "token_ids": [-1]}, 400, "token_ids"),
    ({"sampling_params": {}, "token_ids": [10**7]}, 400, "token_ids"),
    ({"sampling_params": {"max_tokens": 300}}, 400, "maximum context length"),
    ({}, 422, "sampling_params"),
    ({"sampling_params": {"seed": "x"}}, 422, "seed"),
    ({"sampling_params": {"logit_bias": [1]}}, 422, "logit_bias"),
    ({"sampling_params": {"min_tokens": 10**30, "max_tokens": 4}}, 400, "min_tokens"),
    ({"sampling_params": {"min_tokens": 247}}, 400, "min_tokens must be less than or equal to max_tokens=246"),
    ({"sampling_params": {"min_tokens": 246, "ignore_eos": True}}, 200, ""),
    ({"sampling_params": {"logprobs": 10**30}}, 400, "logprobs"),
    ({"sampling_params": {}, "model": "other"}, 404, "other"),
])
def test_bad_requests(server, body, status, fragment):
    response = _generate(server, **body)
    assert response.status_code == status, response.text
    if status != 200:
        assert fragment in response.json()["error"]["message"]
    wait_until_idle(server)


def test_sampling_fields_are_samplingparams_fields():
    """The route's typed sampling_params cover SamplingParams' fields (output_kind is the server's)."""
    assert set(GenerateSamplingParams.model_fields) == {f.name for f in dataclasses.fields(SamplingParams)} - {
        "output_kind"}


def test_disabled_without_the_flag(tiny_model_dir):
    """Without --enable-scale-out the routes answer vLLM's 403."""
    args = EngineArgs(model=str(tiny_model_dir), max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16,
                      num_gpu_blocks_override=16, compilation_cache_dir="", enforce_eager=True)
    srv = ThreadedServer(args)
    try:
        for path, body in (("/inference/v1/generate", {"token_ids": [1], "sampling_params": {}}),
                           ("/inference/v1/abort_requests", {"request_ids": ["x"]}),
                           ("/v1/chat/completions/render", {"messages": MESSAGES}),
                           ("/v1/completions/render", {"prompt": "a"}),
                           ("/v1/messages/render", {"messages": MESSAGES, "max_tokens": 1}),
                           ("/v1/responses/render", {"input": "Hi"})):
            response = httpx.post(srv.url + path, json=body, headers=AUTH)
            assert response.status_code == 403 and "--enable-scale-out" in response.json()["error"]["message"]
        assert httpx.post(srv.url + "/inference/v1/generate", json={}).status_code == 401  # the key guards it
    finally:
        srv.stop()


def test_generative_scoring_matches_the_dense_next_token_distribution(server, tiny_model):  # noqa: F811
    """vLLM's /generative_scoring: per item, the first label's next-token probability after
    query + item (item + query with item_first), over the labels or the whole vocabulary: the
    dense forward's softmax at the prompt's last position."""
    labels = [11, 4000, 3]
    items = [[100, 200, 300], [7, 8]]

    def dense_probs(prompt):
        logits = _forward_dense_logits(tiny_model, prompt)
        return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    for apply_softmax, item_first in ((True, False), (False, True)):
        response = _post(server, "/generative_scoring", {"model": MODEL_NAME, "query": PROMPT, "items": items,
                                                         "label_token_ids": labels, "apply_softmax": apply_softmax,
                                                         "item_first": item_first}, {"X-Request-Id": "s"})
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["id"] == "generative-scoring-s" and data["object"] == "list" and data["model"] == MODEL_NAME
        assert data["usage"]["prompt_tokens"] == 2 * len(PROMPT) + 5 and data["usage"]["completion_tokens"] == 2
        for index, (item, result) in enumerate(zip(items, data["data"], strict=True)):
            probs = dense_probs(item + PROMPT if item_first else PROMPT + item)
            expected = probs[labels[0]] / probs[labels].sum() if apply_softmax else probs[labels[0]]
            assert result == {"index": index, "object": "score", "score": pytest.approx(float(expected), rel=1e-3)}
    text = _post(server, "/generative_scoring", {"query": "Is the sky blue?", "items": [" Yes", " No"],
                                                 "label_token_ids": labels}).json()
    assert [r["index"] for r in text["data"]] == [0, 1] and all(0 < r["score"] < 1 for r in text["data"])
    for body, fragment in (({"label_token_ids": []}, "at least one token ID"),
                           ({"label_token_ids": [10**7]}, "out of vocabulary range"),
                           ({"items": []}, "at least one item")):
        bad = _post(server, "/generative_scoring", {"query": PROMPT, "items": items, "label_token_ids": labels,
                                                    **body})
        assert bad.status_code == 400 and fragment in bad.json()["error"]["message"]
    assert httpx.post(server.url + "/generative_scoring", json={}).status_code == 401
    wait_until_idle(server)


def _forward_dense_logits(model, prompt: list[int]) -> np.ndarray:
    """The dense no-cache forward's logits after `prompt` (f32[vocab])."""
    logits = llama.forward_dense(model.params, model.config, jnp.asarray([prompt], dtype=jnp.int32))
    return np.asarray(logits[0, -1], dtype=np.float64)
