"""vLLM's serving flags and per-request extras: return_token_ids, tokens as "token_id:N", client
request ids (X-Request-Id), priority (--scheduling-policy priority), cache_salt, --response-role,
--enable-prompt-tokens-details, --enable-force-include-usage, --default-chat-template-kwargs,
--enable-request-id-headers and GET /load with --enable-server-load-tracking.

Oracles: the tokenizer (prompt ids), a dense no-cache greedy loop (generated ids), the
non-streamed reply for the streamed one, and a server without the flags for the defaults.
"""

import ast
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import socket
import time

import httpx
import jax
import openai
import pytest

from jpaged.config import EngineArgs
from jpaged.loaders import load_model
from server_harness import API_KEY, MODEL_NAME, ThreadedServer, wait_until_idle
from serving.errors import APIError
from serving.responses import ResponsesRequest
from test_engine import first_repetition
from test_server import AUTH, dense_greedy, sse_payloads

# A template that shows its arguments in the prompt: `greeting` comes from the server's defaults
# or the request.
TEMPLATE = "{{ greeting }}|{% if tools %}TOOLS|{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def server(tiny_model_dir, profile_dir):
    engine_args = EngineArgs(model=str(tiny_model_dir), max_model_len=128, max_num_seqs=8,
                             max_num_batched_tokens=16, num_gpu_blocks_override=64, compilation_cache_dir="",
                             scheduling_policy="priority", enable_sleep_mode=True,
                             profiler_config={"profiler": "jax", "jax_profiler_dir": str(profile_dir)},
                             speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                 "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    srv = ThreadedServer(engine_args, app_kwargs={"enable_request_id_headers": True,
                                                  "enable_server_load_tracking": True, "enable_sleep_mode": True,
                                                  "server_dev_mode": True, "enable_profiler": True},
                         response_role="narrator", return_tokens_as_token_ids=True,
                         enable_prompt_tokens_details=True, enable_force_include_usage=True,
                         default_chat_template_kwargs={"greeting": "hello", "unused": 1},
                         trust_request_chat_template=True, exclude_tools_when_tool_choice_none=True,
                         log_requests=True, log_outputs=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**AUTH, **(headers or {})}, timeout=60)


def _events(response: httpx.Response) -> list[dict]:
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_completion_return_token_ids(server, tiny_model):
    prompt = "Token ids, please:"
    prompt_ids = tiny_model.tokenizer.encode(prompt)
    expected = dense_greedy(tiny_model, prompt_ids, 6)
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    choice = _post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["prompt_token_ids"] == prompt_ids
    assert choice["token_ids"] == expected
    chunks = _events(_post(server, "/v1/completions", {**body, "stream": True}))
    pieces = [c["choices"][0] for c in chunks if c["choices"]]
    assert pieces[0]["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in p for p in pieces[1:])
    assert [t for p in pieces for t in p["token_ids"]] == expected
    # Without the field, neither list is sent.
    plain = _post(server, "/v1/completions", {**body, "return_token_ids": False}).json()["choices"][0]
    assert plain["prompt_token_ids"] is None and plain["token_ids"] is None


def test_chat_return_token_ids_and_response_role(server, tiny_model):
    messages = [{"role": "user", "content": "Say something."}]
    prompt_ids = tiny_model.tokenizer.encode(
        tiny_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    expected = dense_greedy(tiny_model, prompt_ids, 5)
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    reply = _post(server, "/v1/chat/completions", body).json()
    assert reply["prompt_token_ids"] == prompt_ids
    assert reply["choices"][0]["token_ids"] == expected
    assert reply["choices"][0]["message"]["role"] == "narrator"  # --response-role
    chunks = _events(_post(server, "/v1/chat/completions", {**body, "stream": True}))
    assert chunks[0]["prompt_token_ids"] == prompt_ids
    assert chunks[0]["choices"][0]["delta"]["role"] == "narrator"
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])] == expected
    # Continuing the last message keeps its role, whatever --response-role says.
    continued = _post(server, "/v1/chat/completions", {
        "messages": messages + [{"role": "assistant", "content": "Well"}], "max_tokens": 2,
        "add_generation_prompt": False, "continue_final_message": True}).json()
    assert continued["choices"][0]["message"]["role"] == "assistant"


def test_logprob_tokens_as_token_ids(server, client):
    """--return-tokens-as-token-ids names every logprob token "token_id:N"; a request can opt out."""
    result = client.completions.create(model=MODEL_NAME, prompt="Name the ids", max_tokens=4, temperature=0,
                                       logprobs=2, extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = result.choices[0]
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in choice.model_extra["token_ids"]]
    assert all(key.startswith("token_id:") for top in choice.logprobs.top_logprobs for key in top)
    # text_offset counts the names, as vLLM's does
    lengths = [len(t) for t in choice.logprobs.tokens]
    assert choice.logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    entries = chat.choices[0].logprobs.content
    assert [e.token for e in entries] == [f"token_id:{t}" for t in chat.choices[0].model_extra["token_ids"]]
    assert all(top.token.startswith("token_id:") for e in entries for top in e.top_logprobs)
    opted_out = client.completions.create(model=MODEL_NAME, prompt="Name the ids", max_tokens=4, temperature=0,
                                          logprobs=2, extra_body={"ignore_eos": True,
                                                                  "return_tokens_as_token_ids": False})
    assert "".join(opted_out.choices[0].logprobs.tokens) == opted_out.choices[0].text


def test_client_request_ids(server):
    """The reply's id comes from X-Request-Id, else the body's request_id; the header is echoed
    (--enable-request-id-headers); a repeated id is no conflict for the engine."""
    body = {"prompt": "ids", "max_tokens": 2}
    named = _post(server, "/v1/completions", body, {"X-Request-Id": "trace-42"})
    assert named.json()["id"] == "cmpl-trace-42"
    assert named.headers["x-request-id"] == "trace-42"
    from_body = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 2, "request_id": "mine"})
    assert from_body.json()["id"] == "chatcmpl-mine"
    assert len(from_body.headers["x-request-id"]) == 32  # none sent: a new one

    async def twice():
        async with httpx.AsyncClient(base_url=server.url, headers={**AUTH, "X-Request-Id": "same"},
                                     timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={**body, "max_tokens": 8})
                                          for _ in range(2)))

    assert [r.status_code for r in asyncio.run(twice())] == [200, 200]
    # 401s carry the header too
    assert httpx.get(server.url + "/v1/models", headers={"X-Request-Id": "r"}).headers["x-request-id"] == "r"
    wait_until_idle(server)


def test_usage_details_and_forced_stream_usage(server, tiny_model):
    body = {"prompt": "A shared prefix for the cache " * 3, "max_tokens": 3, "ignore_eos": True}
    _post(server, "/v1/completions", body)
    usage = _post(server, "/v1/completions", body).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # --enable-prompt-tokens-details
    chunks = _events(_post(server, "/v1/completions", {**body, "stream": True}))  # no stream_options
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    chat = _events(_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "u"}],
                                                          "max_tokens": 2, "ignore_eos": True, "stream": True}))
    assert chat[-1]["choices"] == [] and chat[-1]["usage"]["completion_tokens"] == 2


def test_default_chat_template_kwargs(server, tiny_model):
    def prompt_tokens(kwargs: dict | None) -> int:
        body = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 1, "chat_template": TEMPLATE}
        if kwargs is not None:
            body["chat_template_kwargs"] = kwargs
        return _post(server, "/v1/chat/completions", body).json()["usage"]["prompt_tokens"]

    def count(text: str) -> int:
        return len(tiny_model.tokenizer.encode(text, add_special_tokens=False))

    assert prompt_tokens(None) == count("hello|abc")  # the server's default
    assert prompt_tokens({"greeting": "good evening"}) == count("good evening|abc")  # the request's wins


def test_tools_left_out_when_tool_choice_is_none(server, tiny_model):
    """--exclude-tools-when-tool-choice-none: the template sees no tools under tool_choice none."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]

    def prompt_tokens(tool_choice: str) -> int:
        body = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 1, "chat_template": TEMPLATE,
                "tools": tools, "tool_choice": tool_choice}
        return _post(server, "/v1/chat/completions", body).json()["usage"]["prompt_tokens"]

    def count(text: str) -> int:
        return len(tiny_model.tokenizer.encode(text, add_special_tokens=False))

    assert prompt_tokens("none") == count("hello|abc")
    assert prompt_tokens("required") == count("hello|TOOLS|abc")


def test_server_load(server):
    """GET /load counts the model requests being answered (from their first byte to their last)."""
    assert httpx.get(server.url + "/load").json() == {"server_load": 0}
    body = json.dumps({"prompt": "load", "max_tokens": 4}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head.encode() + body[:5])  # the request is in, its body is not yet
        deadline = time.time() + 10
        while httpx.get(server.url + "/load").json() != {"server_load": 1}:
            assert time.time() < deadline, "the pending request was never counted"
            time.sleep(0.05)
        sock.sendall(body[5:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    assert httpx.get(server.url + "/load").json() == {"server_load": 0}
    httpx.get(server.url + "/v1/models", headers=AUTH)  # not a model request: not counted
    assert httpx.get(server.url + "/load").json() == {"server_load": 0}


def test_cache_salt_and_priority(server, tiny_model):
    """Prefix-cache hits only within one cache_salt; priority runs with the priority policy."""
    body = {"prompt": "Salted prefixes stay apart " * 8, "max_tokens": 2, "temperature": 0, "ignore_eos": True}

    def run(**fields) -> tuple[int, str]:
        reply = _post(server, "/v1/completions", {**body, **fields}).json()
        return reply["usage"]["prompt_tokens_details"]["cached_tokens"], reply["choices"][0]["text"]

    first = run(cache_salt="tenant-a")
    assert first[0] == 0
    again = run(cache_salt="tenant-a")
    assert again[0] > 0 and again[1] == first[1]
    assert run(cache_salt="tenant-b") == (0, first[1])
    assert run(priority=-5)[0] == 0  # no salt: none of the salted blocks
    assert run(priority=3, cache_salt="tenant-a")[0] > 0
    empty = _post(server, "/v1/completions", {**body, "cache_salt": ""})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "cache_salt"
    wait_until_idle(server)


@pytest.mark.parametrize("root_path", ["/v", "/v1", "/tok", "/proxy"])
def test_root_path_never_unguards_a_route(root_path):
    """--root-path is dropped only as a whole first segment, as Starlette's router drops it: with
    --root-path /v, /v1/models is the route /v1/models (not /v + "1/models"), so the key guards it."""
    from starlette.testclient import TestClient

    from serving.app import build_app

    app = build_app(None, api_keys=["secret"], root_path=root_path)
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/v1/models", "/tokenize", "/proxyv1/models"):  # 404 where no route is left
            response = client.request("GET" if "models" in path else "POST", path)
            assert response.status_code in (401, 404), (path, response.status_code)
        assert client.get(root_path + "/v1/models").status_code == 401
        assert client.post(root_path + "/tokenize").status_code == 401
        assert client.get("/health").status_code != 401


def test_any_of_several_api_keys_opens_the_guarded_routes():
    """vLLM's --api-key K1 K2: any of the keys, as a bearer token (the scheme in any case, as vLLM
    reads it) or as Anthropic's x-api-key header."""
    from starlette.testclient import TestClient

    from serving.app import build_app

    with TestClient(build_app(None, api_keys=["k1", "k2"]), raise_server_exceptions=False) as client:
        for headers in ({"Authorization": "Bearer k1"}, {"Authorization": "bearer k2"}, {"x-api-key": "k2"}):
            assert client.post("/tokenize", headers=headers).status_code != 401, headers  # (no engine: a 500)
        for headers in ({}, {"Authorization": "Bearer k3"}, {"Authorization": "Basic k1"}, {"Authorization": "k1"},
                        {"x-api-key": "Bearer k1"}, {"Authorization": "Bearer"}):
            assert client.post("/tokenize", headers=headers).status_code == 401, headers


def _sleep_state(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {state: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            for state in ("awake", "weights_offloaded", "discard_all")
            if line.startswith("vllm:engine_sleep_state{") and f'sleep_state="{state}"' in line}


def test_sleep_and_wake_up_routes(server, client):
    """vLLM's sleep-mode routes: POST /sleep (level 1 frees the KV pool), GET /is_sleeping, a
    request sent while asleep waits and is answered after POST /wake_up with the same greedy
    tokens; /metrics' engine_sleep_state follows; the key guards the routes; bad values are 400s."""
    kwargs = dict(model=MODEL_NAME, prompt="Sleep test", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    before = client.completions.create(**kwargs).choices[0].text
    assert _sleep_state(server) == {"awake": 1, "weights_offloaded": 0, "discard_all": 0}
    assert httpx.post(server.url + "/sleep").status_code == 401
    response = httpx.post(server.url + "/sleep?level=1", headers=AUTH)
    assert response.status_code == 200 and response.json() == {"status": "sleeping", "level": 1}
    assert httpx.get(server.url + "/is_sleeping", headers=AUTH).json() == {"is_sleeping": True}
    assert _sleep_state(server) == {"awake": 0, "weights_offloaded": 1, "discard_all": 0}
    runner = server.engine.engine.runner
    assert runner.kv_cache is None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: client.completions.create(**kwargs).choices[0].text)
        time.sleep(0.5)
        assert not pending.done()
        response = httpx.post(server.url + "/wake_up?tags=kv_cache", headers=AUTH)
        assert response.json() == {"status": "sleeping", "tags": ["kv_cache"]}
        response = httpx.post(server.url + "/wake_up", headers=AUTH)
        assert response.json() == {"status": "awake", "tags": None}
        assert pending.result(timeout=60) == before
    assert httpx.get(server.url + "/is_sleeping", headers=AUTH).json() == {"is_sleeping": False}
    assert _sleep_state(server) == {"awake": 1, "weights_offloaded": 0, "discard_all": 0}
    for query, param in (("level=3", "level"), ("level=x", "level"), ("mode=later", "mode")):
        response = httpx.post(server.url + f"/sleep?{query}", headers=AUTH)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert httpx.post(server.url + "/wake_up?tags=gpu", headers=AUTH).status_code == 400
    assert httpx.get(server.url + "/is_sleeping", headers=AUTH).json() == {"is_sleeping": False}


def test_reasoning_effort_reaches_the_chat_template(server, tiny_model):
    """OpenAI's reasoning_effort, as vLLM hands it to the template: `reasoning_effort`, and
    `enable_thinking` (effort != "none") unless chat_template_kwargs sets it; /v1/responses'
    reasoning.effort is the same field."""
    template = "{{ reasoning_effort }}|{{ enable_thinking }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def prompt(**fields) -> str:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "chat_template": template,
                "return_token_ids": True, **fields}
        reply = _post(server, "/v1/chat/completions", body).json()
        return tiny_model.tokenizer.decode(reply["prompt_token_ids"])

    assert prompt() == "||hi"  # neither is set: the template sees nothing
    assert prompt(reasoning_effort="low") == "low|True|hi"
    assert prompt(reasoning_effort="none") == "none|False|hi"
    assert prompt(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}) == "none|True|hi"
    assert prompt(reasoning_effort="high", chat_template_kwargs={"reasoning_effort": "x"}) == "high|True|hi"
    request = ResponsesRequest(input="hi", reasoning={"effort": "medium"})
    assert request.to_chat_request([{"role": "user", "content": "hi"}], False).reasoning_effort == "medium"


def test_truncation_side_picks_the_kept_end(server):
    """vLLM's truncation_side: truncate_prompt_tokens keeps the last tokens (left, the default) or
    the first ones (right)."""
    ids = list(range(200, 210))
    body = {"prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": 3, "return_token_ids": True}
    kept = {side: _post(server, "/v1/completions", {**body, **({"truncation_side": side} if side else {})})
            .json()["choices"][0]["prompt_token_ids"] for side in (None, "left", "right")}
    assert kept == {None: ids[-3:], "left": ids[-3:], "right": ids[:3]}


def test_repetition_detection_field(server):
    """vLLM's repetition_detection request field reaches the engine (test_engine.py checks where
    it cuts): a reply that repeats itself ends with finish_reason "repetition" and stop_reason
    "repetition_detected", streamed or not; bad values are 400s naming the field."""
    detect = {"max_pattern_size": 6, "min_count": 2}
    cut = []
    for prompt in ("Loop:", "Again and again", "abc abc", "1 2 1 2"):
        body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        free = _post(server, "/v1/completions", body).json()["choices"][0]["token_ids"]
        expected = first_repetition(free, 6, 2, 1)
        if expected is None:
            continue
        choice = _post(server, "/v1/completions", {**body, "repetition_detection": detect}).json()["choices"][0]
        assert choice["token_ids"] == expected
        assert (choice["finish_reason"], choice["stop_reason"]) == ("repetition", "repetition_detected")
        chunks = _events(_post(server, "/v1/completions", {**body, "repetition_detection": detect, "stream": True}))
        last = [c["choices"][0] for c in chunks if c["choices"]][-1]
        assert (last["finish_reason"], last["stop_reason"]) == ("repetition", "repetition_detected")
        cut.append(prompt)
    assert cut, "some greedy reply of the tiny model should repeat itself within 40 tokens"
    for bad in ({"max_pattern_size": 2, "min_count": 1}, {"max_pattern_size": -1}, {"size": 2}):
        response = _post(server, "/v1/completions", {"prompt": "x", "repetition_detection": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "repetition_detection", bad


def _wait_in_flight(server, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(server.ctx.in_flight) < count:
        assert time.monotonic() < deadline, server.ctx.in_flight
        time.sleep(0.01)


def test_dev_routes_pause_abort_and_reset_prefix_cache(server, client):
    """VLLM_SERVER_DEV_MODE's routes: /pause?mode=keep holds the requests sent meanwhile
    (/is_paused), /abort_requests ends one by its reply id (X-Request-Id) and then all the rest
    with finish_reason "abort", /resume answers what is left with the unpaused greedy text;
    /reset_prefix_cache empties the prefix cache (usage's cached_tokens); the key guards them and
    bad values are 400s; /resume is refused while sleep mode holds the KV pool released."""
    kwargs = dict(model=MODEL_NAME, prompt="Pause test", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    before = client.completions.create(**kwargs).choices[0].text
    assert httpx.post(server.url + "/pause").status_code == 401
    assert httpx.get(server.url + "/is_paused", headers=AUTH).json() == {"is_paused": False}
    response = httpx.post(server.url + "/pause?mode=keep", headers=AUTH)
    assert response.status_code == 200 and response.json() == {"status": "paused"}
    assert httpx.get(server.url + "/is_paused", headers=AUTH).json() == {"is_paused": True}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        held = [pool.submit(lambda i=i: client.completions.create(**kwargs, extra_headers={"X-Request-Id": f"held{i}"}))
                for i in range(3)]
        _wait_in_flight(server, 3)
        response = _post(server, "/abort_requests", {"request_ids": ["cmpl-held0"]})
        assert response.json() == {"status": "aborted", "aborted": 1}
        assert held[0].result(timeout=60).choices[0].finish_reason == "abort"
        kept = pool.submit(lambda: client.completions.create(**kwargs))
        _wait_in_flight(server, 3)
        assert not kept.done() and not held[1].done()
        response = _post(server, "/abort_requests", {"request_ids": [f"cmpl-held{i}" for i in (1, 2)] + ["nobody"]})
        assert response.json() == {"status": "aborted", "aborted": 2}
        assert [f.result(timeout=60).choices[0].finish_reason for f in held[1:]] == ["abort", "abort"]
        response = httpx.post(server.url + "/resume", headers=AUTH)
        assert response.status_code == 200 and response.json() == {"status": "resumed"}
        assert kept.result(timeout=60).choices[0].text == before
    assert _post(server, "/abort_requests", {}).json() == {"status": "aborted", "aborted": 0}
    assert httpx.get(server.url + "/is_paused", headers=AUTH).json() == {"is_paused": False}

    long_prompt = dict(kwargs, prompt="Prefix cache test " * 8, max_tokens=1)
    cached = [client.completions.create(**long_prompt).usage.prompt_tokens_details.cached_tokens for _ in range(2)]
    response = httpx.post(server.url + "/reset_prefix_cache", headers=AUTH)
    assert response.status_code == 200 and response.json() == {"success": True}
    cached.append(client.completions.create(**long_prompt).usage.prompt_tokens_details.cached_tokens)
    assert cached[0] == cached[2] == 0 < cached[1]

    for path, param in (("/pause?mode=later", "mode"), ("/pause?clear_cache=maybe", "clear_cache"),
                        ("/reset_prefix_cache?reset_running_requests=2", "reset_running_requests")):
        response = httpx.post(server.url + path, headers=AUTH)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert _post(server, "/abort_requests", {"request_ids": "cmpl-x"}).status_code in (400, 422)
    assert httpx.post(server.url + "/sleep?level=1", headers=AUTH).status_code == 200
    response = httpx.post(server.url + "/resume", headers=AUTH)
    assert response.status_code == 400 and "scheduling cannot resume" in response.json()["error"]["message"]
    assert httpx.post(server.url + "/wake_up", headers=AUTH).json()["status"] == "awake"
    assert client.completions.create(**kwargs).choices[0].text == before


def test_server_info_shows_the_settings_and_no_secret(server, monkeypatch):
    """VLLM_SERVER_DEV_MODE's GET /server_info: the engine args (json or text) without the hub
    token, the VLLM_* / JPAGED_* variables without keys or tokens, the versions and devices."""
    monkeypatch.setattr(server.engine, "engine_args", dataclasses.replace(server.engine.engine_args,
                                                                          hf_token="hf_secret_value"))
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    monkeypatch.setenv("VLLM_API_KEY", "secret-key-value")
    monkeypatch.setenv("JPAGED_HF_TOKEN", "secret-token-value")
    assert httpx.get(server.url + "/server_info").status_code == 401
    info = httpx.get(server.url + "/server_info?config_format=json", headers=AUTH).json()
    assert info["engine_args"]["max_num_seqs"] == 8 and info["engine_args"]["hf_token"] is None
    assert info["engine_args"]["profiler_config"]["profiler"] == "jax"
    assert info["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert info["system_env"]["jax"] == jax.__version__ and info["system_env"]["devices"]
    text = httpx.get(server.url + "/server_info", headers=AUTH)
    assert "max_num_seqs=8" in text.json()["engine_args"]
    for secret in ("hf_secret_value", "secret-key-value", "secret-token-value"):
        assert secret not in text.text + json.dumps(info)
    response = httpx.get(server.url + "/server_info?config_format=yaml", headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "config_format"


def test_profile_routes_write_a_trace(server, profile_dir):
    """--profiler-config: POST /start_profile (no body, or vLLM's overrides), a request, POST
    /stop_profile: a JAX trace of the steps under the directory (and the prefix); a second start
    while tracing and bad values are 400s; the key guards the routes."""
    assert httpx.post(server.url + "/start_profile").status_code == 401
    response = httpx.post(server.url + "/start_profile", headers=AUTH)
    assert response.status_code == 200 and response.content == b""
    again = httpx.post(server.url + "/start_profile", headers=AUTH)
    assert again.status_code == 400 and "already running" in again.json()["error"]["message"]
    assert _post(server, "/v1/completions", {"prompt": "trace me", "max_tokens": 4}).status_code == 200
    assert httpx.post(server.url + "/stop_profile", headers=AUTH).status_code == 200
    assert len(list(profile_dir.glob("plugins/profile/*/*.xplane.pb"))) == 1
    assert _post(server, "/start_profile", {"profile_prefix": "named", "max_iterations": 1}).status_code == 200
    assert _post(server, "/v1/completions", {"prompt": "trace me", "max_tokens": 4}).status_code == 200
    assert httpx.post(server.url + "/stop_profile", headers=AUTH).status_code == 200
    assert len(list((profile_dir / "named").rglob("*.xplane.pb"))) == 1
    response = _post(server, "/start_profile", {"delay_iterations": -2})
    assert response.status_code == 400 and "delay_iterations" in response.json()["error"]["message"]


def test_speculative_decoding_counters(server):
    """With --speculative-config the server's greedy text is the plain engine's (the engine's
    tests check that) and /metrics carries vLLM's spec_decode counters."""
    phrase = "red green blue " * 6
    response = _post(server, "/v1/completions", {"prompt": phrase, "max_tokens": 32, "temperature": 0,
                                                  "ignore_eos": True})
    assert response.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_"):
            name = line.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    assert values["vllm:spec_decode_num_drafts_total"] > 0
    assert values["vllm:spec_decode_num_draft_tokens_total"] >= values["vllm:spec_decode_num_drafts_total"]
    assert (values["vllm:spec_decode_num_accepted_tokens_per_pos_total"]
            == values["vllm:spec_decode_num_accepted_tokens_total"])


def test_log_outputs_joins_a_streamed_reply(server, caplog, monkeypatch):
    """--enable-log-outputs: a finished request's whole text and finish reason, streamed
    (delta outputs joined) as not; a stream's pieces too as they are sent (--enable-log-deltas,
    on by default as in vLLM), not with --no-enable-log-deltas."""
    caplog.set_level(logging.INFO, logger="jpaged.serve")
    body = {"prompt": "hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    def logged(stream: bool) -> tuple[str, list[str], list[str]]:
        caplog.clear()
        if stream:
            events = _events(_post(server, "/v1/completions", {**body, "stream": True}))
            text = "".join(c["choices"][0]["text"] for c in events if c["choices"])
        else:
            text = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
        lines = [r.getMessage() for r in caplog.records if ": output 0: " in r.getMessage()]
        return text, [line for line in lines if "(streaming delta)" in line], [
            line for line in lines if "(streaming delta)" not in line]

    text, deltas, finals = logged(stream=False)
    assert deltas == [] and finals == [f"{finals[0].split(':')[0]}: output 0: {text!r}, finish_reason: length"]
    streamed, deltas, finals = logged(stream=True)
    assert streamed == text and len(finals) == 1 and finals[0].endswith(f"output 0: {text!r}, finish_reason: length")
    pieces = [ast.literal_eval(line.split("output 0: ", 1)[1].rsplit(", finish_reason: ", 1)[0]) for line in deltas]
    assert len(pieces) > 1 and "".join(pieces) == text and deltas[0].endswith("finish_reason: None")
    monkeypatch.setattr(server.ctx, "log_deltas", False)
    _, deltas, finals = logged(stream=True)
    assert deltas == [] and len(finals) == 1


def _keep_alive_split(raw: str) -> tuple[list[int], str]:
    """(the number of keep-alive comments before each data event and after the last, the
    stream without them)."""
    counts, count, kept = [], 0, []
    for event in raw[:-2].split("\n\n"):
        if event == ": keep-alive":
            count += 1
        else:
            counts.append(count)
            count = 0
            kept.append(event)
    return counts + [count], "\n\n".join(kept) + "\n\n"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Keep alive"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Keep alive"}]}),
])
def test_sse_keep_alive_comments_fill_the_silences(server, monkeypatch, path, body):
    """--sse-keep-alive-interval (0.5 s here): the request waits 2.5 s for its first output and
    1.5 s between outputs (a second of slack for a loaded machine's event loop beyond the comments
    counted); comments fill those silences, the stream starts before the first
    output and carries what it carries without the flag; an error of the first output is an
    error event; a client that leaves while the request waits closes the request."""
    body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True, **body}
    plain = _events(_post(server, path, {**body, "cache_salt": "plain"}))  # salts: no prefix-cache hits
    real, closed = server.ctx.generate, []

    async def slow(*args, **kwargs):
        try:
            await asyncio.sleep(2.5)
            async for output in real(*args, **kwargs):
                yield output
                await asyncio.sleep(1.5)
        finally:
            closed.append(True)

    monkeypatch.setattr(server.ctx, "generate", slow)
    monkeypatch.setattr(server.ctx, "sse_keep_alive_interval", 0.5)
    counts, stream = _keep_alive_split(_post(server, path, {**body, "cache_salt": "kept alive"}).text)
    kept = _events(httpx.Response(200, text=stream))
    strip = lambda chunks: [{k: v for k, v in c.items() if k not in ("id", "created")} for c in chunks]  # noqa: E731
    assert strip(kept) == strip(plain)
    assert counts[0] >= 2 and sum(counts[1:]) >= 1, counts  # before the first output, and between two

    async def failing(*args, **kwargs):
        await asyncio.sleep(2.0)
        raise APIError("The engine failed while running this request: boom.", status_code=500,
                       code="engine_step_failed")
        yield  # never reached: makes this an async generator

    monkeypatch.setattr(server.ctx, "generate", failing)
    response = _post(server, path, body)
    counts, stream = _keep_alive_split(response.text)
    assert response.status_code == 200 and counts[0] >= 1
    assert sse_payloads(stream)[-1] == "[DONE]" and "boom" in json.loads(sse_payloads(stream)[0])["error"]["message"]

    monkeypatch.setattr(server.ctx, "generate", slow)
    closed.clear()
    with httpx.stream("POST", server.url + path, json=body, headers=AUTH, timeout=60) as streamed:
        assert next(streamed.iter_lines()) == ": keep-alive"  # the stream is open before any output
    deadline = time.time() + 10
    while not closed and time.time() < deadline:
        time.sleep(0.05)
    assert closed, "the request should end when its client leaves"
    wait_until_idle(server)
