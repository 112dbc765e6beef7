"""Hostile and malformed requests against a real uvicorn on 127.0.0.1 (tiny random model).

Every case must get its 4xx with an OpenAI-shaped error body (no traceback) naming the problem,
and the server must keep serving: after the whole corpus, /health is 200, a greedy request gives
the same text as before it, and every KV block is free again. The property tests draw request
bodies from the schemas: valid ones succeed, ones with one invalid field get a 4xx.
"""

import json
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jpaged.config import EngineArgs
from serving.app import DEFAULT_MAX_HEADER_BYTES
from server_harness import API_KEY, MAX_REQUEST_BYTES, MODEL_NAME, ThreadedServer, health_ok, wait_until_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
VOCAB = 49152  # the tiny model's (SmolLM2's) vocabulary
MAX_MODEL_LEN = 256
# Small limits, so the corpus can cross each one.
LIMITS = dict(max_logprobs=5, max_logit_bias=4, max_stop_sequences=3, max_stop_token_ids=3, max_n=4)
MAX_PROMPTS = 4
MESSAGES = [{"role": "user", "content": "Hi"}]
CMPL, CHAT, RESP = "/v1/completions", "/v1/chat/completions", "/v1/responses"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine_args = EngineArgs(model=str(tiny_model_dir), max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                             max_num_batched_tokens=16, num_gpu_blocks_override=64, compilation_cache_dir="",
                             **LIMITS)
    srv = ThreadedServer(engine_args, max_prompts_per_request=MAX_PROMPTS)
    yield srv
    srv.stop()


def cmpl(**fields) -> dict:
    return {"json": {"prompt": "Hello", "max_tokens": 2, **fields}}


def chat(**fields) -> dict:
    return {"json": {"messages": MESSAGES, "max_tokens": 2, **fields}}


def raw(content: bytes, content_type: str = "application/json") -> dict:
    return {"content": content, "headers": {"Content-Type": content_type}}


# name: (method, path, request kwargs, status, fragments the error message must hold)
CORPUS = {
    # --- body encoding
    "invalid_json": ("POST", CMPL, raw(b"{not json"), 400, ["JSON"]),
    "invalid_utf8": ("POST", CMPL, raw(b'{"prompt": "\xff\xfe"}'), 400, ["JSON"]),
    "deep_nesting": ("POST", CMPL, raw(b"[" * 30000 + b"]" * 30000), 400, ["JSON"]),
    "huge_int_literal": ("POST", CMPL, raw(b'{"prompt": "hi", "n": 1' + b"0" * 5000 + b"}"), 400, ["JSON"]),
    "nan_literal": ("POST", CMPL, raw(b'{"prompt": "hi", "temperature": NaN}'), 400, ["temperature"]),
    "top_level_array": ("POST", CMPL, raw(b"[]"), 422, []),
    "top_level_null": ("POST", CMPL, raw(b"null"), 422, []),
    "top_level_string": ("POST", CHAT, raw(b'"hello"'), 422, []),
    "empty_body": ("POST", CMPL, raw(b""), 400, ["JSON"]),
    "text_content_type": ("POST", CMPL, raw(b'{"prompt": "hi"}', "text/plain"), 415, ["application/json"]),
    "form_content_type": ("POST", CHAT, raw(b"a=b", "application/x-www-form-urlencoded"), 415, ["Content-Type"]),
    "oversized_body": ("POST", CMPL, {"json": {"prompt": "x" * (MAX_REQUEST_BYTES + 1)}}, 413,
                       ["--max-request-bytes"]),
    # --- completions: prompts and token ids
    "missing_prompt": ("POST", CMPL, {"json": {"max_tokens": 2}}, 422, ["prompt"]),
    "prompt_number": ("POST", CMPL, cmpl(prompt=42), 422, ["prompt"]),
    "prompt_object": ("POST", CMPL, cmpl(prompt={"text": "hi"}), 422, ["prompt"]),
    "prompt_mixed_list": ("POST", CMPL, cmpl(prompt=["a", 1]), 422, ["prompt"]),
    "empty_prompt": ("POST", CMPL, cmpl(prompt=""), 400, ["prompt"]),
    "empty_token_list": ("POST", CMPL, cmpl(prompt=[]), 400, ["prompt"]),
    "empty_prompt_in_batch": ("POST", CMPL, cmpl(prompt=[[5, 6], []]), 400, ["prompt"]),
    "negative_token": ("POST", CMPL, cmpl(prompt=[1, -1]), 400, ["-1", "vocabulary"]),
    "negative_token_echo": ("POST", CMPL, cmpl(prompt=[-5], echo=True), 400, ["-5"]),
    "negative_token_echo_stream": ("POST", CMPL, cmpl(prompt=[-5], echo=True, stream=True), 400, ["-5"]),
    "token_equal_vocab": ("POST", CMPL, cmpl(prompt=[VOCAB]), 400, [str(VOCAB)]),
    "token_huge": ("POST", CMPL, cmpl(prompt=[10**30], echo=True), 400, [str(10**30)]),
    "token_int64_min": ("POST", CMPL, cmpl(prompt=[-(2**63)]), 400, ["vocabulary"]),
    "batch_over_limit": ("POST", CMPL, cmpl(prompt=["a"] * (MAX_PROMPTS + 1)), 400, ["--max-prompts-per-request"]),
    "prompt_over_context": ("POST", CMPL, cmpl(prompt=[5] * MAX_MODEL_LEN), 400, [str(MAX_MODEL_LEN)]),
    "truncate_zero": ("POST", CMPL, cmpl(truncate_prompt_tokens=0), 400, ["truncate_prompt_tokens"]),
    # --- completions: sampling ranges
    "max_tokens_string": ("POST", CMPL, cmpl(max_tokens="many"), 422, ["max_tokens"]),
    "max_tokens_zero": ("POST", CMPL, cmpl(max_tokens=0), 400, ["max_tokens"]),
    "max_tokens_negative": ("POST", CMPL, cmpl(max_tokens=-3), 400, ["max_tokens"]),
    "max_tokens_huge": ("POST", CMPL, cmpl(max_tokens=10**12), 400, ["maximum context length"]),
    "temperature_negative": ("POST", CMPL, cmpl(temperature=-1), 400, ["temperature"]),
    "temperature_string": ("POST", CMPL, cmpl(temperature="hot"), 422, ["temperature"]),
    "top_p_zero": ("POST", CMPL, cmpl(top_p=0), 400, ["top_p"]),
    "top_p_over_one": ("POST", CMPL, cmpl(top_p=1.5), 400, ["top_p"]),
    "top_k_negative": ("POST", CMPL, cmpl(top_k=-5), 400, ["top_k"]),
    "top_k_over_int32": ("POST", CMPL, cmpl(top_k=10**12), 400, ["top_k"]),
    "min_p_over_one": ("POST", CMPL, cmpl(min_p=2), 400, ["min_p"]),
    "presence_penalty_range": ("POST", CMPL, cmpl(presence_penalty=5), 400, ["presence_penalty"]),
    "frequency_penalty_range": ("POST", CMPL, cmpl(frequency_penalty=-5), 400, ["frequency_penalty"]),
    "repetition_penalty_zero": ("POST", CMPL, cmpl(repetition_penalty=0), 400, ["repetition_penalty"]),
    "n_zero": ("POST", CMPL, cmpl(n=0), 400, ["n"]),
    "n_over_limit": ("POST", CMPL, cmpl(n=5), 400, ["n is 5", "--max-n"]),
    "logprobs_over_limit": ("POST", CMPL, cmpl(logprobs=6), 400, ["logprobs is 6", "--max-logprobs"]),
    "logprobs_negative": ("POST", CMPL, cmpl(logprobs=-1), 400, ["logprobs"]),
    "min_tokens_over_max_tokens": ("POST", CMPL, cmpl(min_tokens=3), 400, ["min_tokens"]),
    "min_tokens_over_the_context": ("POST", CHAT, chat(max_tokens=None, min_tokens=10**6), 400,
                                    ["min_tokens must be less than or equal to max_tokens="]),
    "seed_string": ("POST", CMPL, cmpl(seed="abc"), 422, ["seed"]),
    "stream_string": ("POST", CMPL, cmpl(stream="yes please"), 422, ["stream"]),
    # --- stop and logit_bias lists
    "stop_over_limit": ("POST", CMPL, cmpl(stop=["a", "b", "c", "d"]), 400, ["stop is 4", "--max-stop-sequences"]),
    "stop_empty_string": ("POST", CMPL, cmpl(stop=[""]), 400, ["stop"]),
    "stop_number": ("POST", CMPL, cmpl(stop=7), 422, ["stop"]),
    "stop_token_ids_over_limit": ("POST", CMPL, cmpl(stop_token_ids=[1, 2, 3, 4]), 400, ["--max-stop-token-ids"]),
    "stop_token_ids_negative": ("POST", CMPL, cmpl(stop_token_ids=[-2]), 400, ["stop_token_ids"]),
    "stop_token_ids_out_of_vocab": ("POST", CMPL, cmpl(stop_token_ids=[10**9]), 400, ["1000000000"]),
    "logit_bias_over_limit": ("POST", CMPL, cmpl(logit_bias={str(i): 1 for i in range(5)}), 400,
                              ["logit_bias is 5", "--max-logit-bias"]),
    "logit_bias_bad_key": ("POST", CMPL, cmpl(logit_bias={"hello": 1}), 400, ["logit_bias"]),
    "logit_bias_value_range": ("POST", CMPL, cmpl(logit_bias={"5": 500}), 400, ["logit_bias"]),
    "logit_bias_out_of_vocab": ("POST", CMPL, cmpl(logit_bias={str(VOCAB): 1}), 400, [str(VOCAB)]),
    "logit_bias_negative_key": ("POST", CMPL, cmpl(logit_bias={"-3": 1}), 400, ["logit_bias"]),
    "logit_bias_not_object": ("POST", CMPL, cmpl(logit_bias=[1, 2]), 422, ["logit_bias"]),
    # --- completions-only fields and vLLM extras jpaged does not implement
    "best_of_below_n": ("POST", CMPL, cmpl(n=3, best_of=2), 400, ["best_of"]),
    "best_of_streamed": ("POST", CMPL, cmpl(best_of=3, stream=True), 400, ["best_of"]),
    "suffix": ("POST", CMPL, cmpl(suffix="end"), 400, ["suffix"]),
    "unimplemented_vllm_field": ("POST", CMPL, cmpl(watermarking={"seed": 1}), 400, ["watermarking"]),
    "thinking_token_budget_without_markers": ("POST", CMPL, cmpl(thinking_token_budget=10), 400,
                                              ["reasoning_config is not configured", "--reasoning-parser"]),
    "thinking_token_budget_negative": ("POST", CHAT, chat(thinking_token_budget=-2), 400, ["thinking_token_budget"]),
    "thinking_token_budget_float": ("POST", CMPL, cmpl(thinking_token_budget=2.5), 422, ["thinking_token_budget"]),
    "unimplemented_vllm_fields": ("POST", CHAT, chat(logits_processors=["m.P"], return_token_offsets=True), 400,
                                  ["logits_processors", "return_token_offsets"]),
    "logprob_token_ids_without_logprobs": ("POST", CHAT, chat(logprob_token_ids=[1]), 400,
                                           ["`logprobs` must be set to true"]),
    "logprob_token_ids_out_of_vocab": ("POST", CMPL, cmpl(logprobs=1, logprob_token_ids=[VOCAB]), 400,
                                       ["logprob_token_ids", str(VOCAB)]),
    "logprob_token_ids_too_many": ("POST", CMPL, cmpl(logprobs=1, logprob_token_ids=list(range(129))), 400,
                                   ["1 to 128 token ids"]),
    "truncation_side_unknown": ("POST", CMPL, cmpl(truncate_prompt_tokens=2, truncation_side="middle"), 422,
                                ["truncation_side"]),
    "reasoning_effort_unknown": ("POST", CHAT, chat(reasoning_effort="huge"), 422, ["reasoning_effort"]),
    "repetition_detection_bad": ("POST", CMPL, cmpl(repetition_detection={"max_pattern_size": 3}), 400,
                                 ["min_count"]),
    "stream_options_without_stream": ("POST", CMPL, cmpl(stream_options={"include_usage": True}), 400,
                                      ["stream_options"]),
    "beam_search_streamed": ("POST", CMPL, cmpl(use_beam_search=True, stream=True), 400, ["beam search"]),
    "beam_search_with_stop": ("POST", CMPL, cmpl(use_beam_search=True, stop=["x"]), 400, ["stop", "use_beam_search"]),
    "beam_search_over_logprobs": ("POST", CHAT, chat(use_beam_search=True, n=3), 400, ["2 x 3", "--max-logprobs"]),
    "allowed_token_ids_empty": ("POST", CMPL, cmpl(allowed_token_ids=[]), 400, ["allowed_token_ids"]),
    "allowed_token_ids_out_of_vocab": ("POST", CMPL, cmpl(allowed_token_ids=[1, VOCAB]), 400,
                                       ["allowed_token_ids", str(VOCAB)]),
    "bad_words_blank": ("POST", CHAT, chat(bad_words=["  "]), 400, ["bad_words"]),
    "bad_words_streamed_blank": ("POST", CHAT, chat(bad_words=["ok", ""], stream=True), 400, ["bad_words"]),
    "prompt_logprobs_over_limit": ("POST", CMPL, cmpl(prompt_logprobs=6), 400,
                                   ["prompt_logprobs is 6", "--max-logprobs"]),
    "prompt_logprobs_negative": ("POST", CHAT, chat(prompt_logprobs=-1), 400, ["prompt_logprobs"]),
    "prompt_logprobs_streamed": ("POST", CMPL, cmpl(prompt_logprobs=1, stream=True), 400, ["stream=True"]),
    "guided_regex_invalid": ("POST", CHAT, chat(guided_regex="(unclosed"), 400, ["regex"]),
    "guided_json_and_regex": ("POST", CHAT, chat(guided_json={"type": "object"}, guided_regex="a+"), 400, []),
    "unknown_model": ("POST", CMPL, cmpl(model="gpt-5"), 404, ["gpt-5"]),
    # --- chat
    "missing_messages": ("POST", CHAT, {"json": {"model": MODEL_NAME}}, 422, ["messages"]),
    "empty_messages": ("POST", CHAT, chat(messages=[]), 400, ["messages"]),
    "messages_not_list": ("POST", CHAT, chat(messages="hi"), 422, ["messages"]),
    "message_not_object": ("POST", CHAT, chat(messages=["hi"]), 422, ["messages"]),
    "unknown_role": ("POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 422, ["role"]),
    "content_number": ("POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 422, ["content"]),
    "image_part": ("POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, ["'image_url'", "not multimodal"]),
    "audio_part_after_text": ("POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]), 400, ["'input_audio'"]),
    "tokenize_image_part": ("POST", "/tokenize", {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}}, 400, ["'image_url'"]),
    "unknown_part_type": ("POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "hologram"}]}]), 422,
                          ["hologram"]),
    "text_part_without_text": ("POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 422,
                               ["text"]),
    "tools_auto_without_flag": ("POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
                                ["--enable-auto-tool-choice"]),
    "response_format_schema": ("POST", CHAT, chat(response_format={"type": "json_schema"}), 400,
                               ["response_format"]),
    "top_logprobs_without_logprobs": ("POST", CHAT, chat(top_logprobs=2), 400, ["logprobs"]),
    "top_logprobs_over_limit": ("POST", CHAT, chat(logprobs=True, top_logprobs=9), 400, ["--max-logprobs"]),
    "request_chat_template": ("POST", CHAT, chat(chat_template="/etc/passwd"), 400,
                              ["--trust-request-chat-template"]),
    "chat_template_kwargs_type": ("POST", CHAT, chat(chat_template_kwargs=[1]), 422, ["chat_template_kwargs"]),
    "max_completion_tokens_zero": ("POST", CHAT, chat(max_completion_tokens=0), 400, ["max_completion_tokens"]),
    "chat_max_tokens_huge": ("POST", CHAT, chat(max_tokens=10**9), 400, ["maximum context length"]),
    "chat_n_over_limit": ("POST", CHAT, chat(n=50), 400, ["--max-n"]),
    "chat_stream_over_context": ("POST", CHAT, chat(max_tokens=10**9, stream=True), 400, ["maximum context"]),
    # --- tokenize / detokenize
    "tokenize_both": ("POST", "/tokenize", {"json": {"prompt": "a", "messages": MESSAGES}}, 400, ["exactly one"]),
    "tokenize_neither": ("POST", "/tokenize", {"json": {}}, 400, ["exactly one"]),
    "tokenize_prompt_number": ("POST", "/tokenize", {"json": {"prompt": 3}}, 422, ["prompt"]),
    "tokenize_unknown_model": ("POST", "/tokenize", {"json": {"prompt": "a", "model": "x"}}, 404, ["`x`"]),
    "detokenize_negative": ("POST", "/detokenize", {"json": {"tokens": [-1]}}, 400, ["-1"]),
    "detokenize_huge": ("POST", "/detokenize", {"json": {"tokens": [2**64]}}, 400, ["vocabulary"]),
    "detokenize_missing": ("POST", "/detokenize", {"json": {}}, 422, ["tokens"]),
    "detokenize_strings": ("POST", "/detokenize", {"json": {"tokens": ["a"]}}, 422, ["tokens"]),
    # --- routes, methods, headers, keys
    "unknown_route": ("POST", "/v1/edits", {"json": {"input": "x"}}, 404, ["/v1/edits"]),
    "get_on_post_route": ("GET", CMPL, {}, 405, ["GET"]),
    "post_on_get_route": ("POST", "/v1/models", {"json": {}}, 405, ["POST"]),
    "post_on_health": ("POST", "/health", {"json": {}}, 405, ["/health"]),
    "delete_metrics": ("DELETE", "/metrics", {}, 405, ["/metrics"]),
    "put_version": ("PUT", "/version", {"json": {}}, 405, ["/version"]),
    "get_tokenize": ("GET", "/tokenize", {}, 405, ["/tokenize"]),
    "missing_key": ("POST", CMPL, {**cmpl(), "auth": {}}, 401, ["API key"]),
    # --- responses
    "responses_no_input": ("POST", RESP, {"json": {"max_output_tokens": 2}}, 422, ["input"]),
    "responses_image_part": ("POST", RESP, {"json": {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x/y.png"}]}]}}, 400, ["input_image"]),
    "responses_unknown_item": ("POST", RESP, {"json": {"input": [{"type": "computer_call"}]}}, 400,
                               ["computer_call"]),
    "responses_previous_id": ("POST", RESP, {"json": {"input": "x", "previous_response_id": "resp_1"}}, 404,
                              ["resp_1"]),
    "responses_hosted_tool": ("POST", RESP, {"json": {"input": "x", "tools": [{"type": "file_search"}]}}, 400,
                              ["file_search"]),
    "responses_background_without_store": ("POST", RESP, {"json": {"input": "x", "background": True}}, 400,
                                           ["--enable-responses-store"]),
    "responses_over_context": ("POST", RESP, {"json": {"input": "x", "max_output_tokens": 10**6}}, 400,
                               ["maximum context length"]),
    "wrong_key": ("POST", CHAT, {**chat(), "auth": {"Authorization": "Bearer nope"}}, 401, ["API key"]),
    "key_without_bearer": ("GET", "/v1/models", {"auth": {"Authorization": API_KEY}}, 401, ["API key"]),
    "tokenize_without_key": ("POST", "/tokenize", {"json": {"prompt": "a"}, "auth": {}}, 401, ["API key"]),
    "detokenize_wrong_key": ("POST", "/detokenize", {"json": {"tokens": [1]}, "auth": {"Authorization": "x"}},
                             401, ["API key"]),
}


def _send(server, method: str, path: str, kwargs: dict) -> httpx.Response:
    """`kwargs`: httpx's, plus "auth": the Authorization header(s) to send instead of the key."""
    kwargs = dict(kwargs)
    headers = {**kwargs.pop("auth", AUTH), **kwargs.pop("headers", {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and "File \"" not in error["message"]
    return error


def _greedy_text(server) -> str:
    response = httpx.post(server.url + CMPL, headers=AUTH, timeout=60,
                          json={"prompt": "The paged cache", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 60


def test_every_bad_request_gets_its_4xx_and_the_server_keeps_serving(server):
    before = _greedy_text(server)
    failures = []
    for name, (method, path, kwargs, status, fragments) in CORPUS.items():
        response = _send(server, method, path, kwargs)
        try:
            error = _assert_openai_error(response, status)
            for fragment in fragments:
                assert fragment in error["message"], (fragment, error["message"])
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)
    assert health_ok(server)
    assert _greedy_text(server) == before
    wait_until_idle(server)


def _raw_http(server, request: bytes, piece_bytes: int | None = None) -> bytes:
    """Sends bytes no HTTP client would send; returns what the server answered before closing.

    `piece_bytes`: send the request in pieces this large, pausing between them, so that the server
    reads it in several parts as it would from a slow client.

    The server may answer and close before it has read everything (an oversized header), so the
    connection can already be reset when we finish sending: what it answered is still in our
    receive queue, and that is what the test looks at.
    """
    answer = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        piece_bytes = piece_bytes or len(request)
        try:
            for start in range(0, len(request), piece_bytes):
                sock.sendall(request[start:start + piece_bytes])
                time.sleep(0.01 if piece_bytes < len(request) else 0)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


RAW_CASES = {
    "declared_length_over_limit": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: "
                                   + str(10**12).encode() + b"\r\n\r\n{}", b"413"),
    "oversized_header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (DEFAULT_MAX_HEADER_BYTES + 1)
                         + b"\r\n\r\n", b"431"),
    "garbage_request_line": (b"\x00\x01\x02 nonsense\r\n\r\n", b"4"),
    "bad_content_length": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", b"4"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_malformed_http_gets_a_4xx_and_the_server_keeps_serving(server, case):
    request, status_prefix = RAW_CASES[case]
    answer = _raw_http(server, request)
    assert answer.startswith(b"HTTP/1.1 " + status_prefix), answer[:200]
    assert b"Traceback" not in answer
    assert health_ok(server)


def test_a_header_just_under_the_limit_is_served(server):
    """Above h11's own 16 KiB buffer, yet under --max-header-bytes: served, however TCP splits it."""
    big = b"a" * (DEFAULT_MAX_HEADER_BYTES - 100)
    for _ in range(5):
        answer = _raw_http(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + big + b"\r\n\r\n",
                           piece_bytes=4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_key_and_metrics_routes(server):
    """/metrics, /health and /version are open; the key never shows up in what the server returns."""
    for path in ("/metrics", "/health", "/version"):
        assert httpx.get(server.url + path).status_code == 200
    assert API_KEY not in httpx.get(server.url + "/metrics").text
    assert API_KEY not in httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer x"}).text


# --------------------------------------------------------------------------- property tests

_valid_sampling = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "seed": st.integers(-(2**63), 2**63 - 1),
    "n": st.integers(1, LIMITS["max_n"]), "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=4),
    "ignore_eos": st.booleans(), "max_tokens": st.integers(1, 3),
})
_valid_completion = st.tuples(
    _valid_sampling,
    st.one_of(st.text(min_size=1, max_size=10).filter(str.strip),  # <= 40 byte tokens
              st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)),
    st.fixed_dictionaries({}, optional={"echo": st.booleans(), "logprobs": st.integers(0, LIMITS["max_logprobs"])}),
).map(lambda parts: {"max_tokens": 2, **parts[0], "prompt": parts[1], **parts[2]})
_valid_chat = st.tuples(
    _valid_sampling,
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                    "content": st.text(max_size=8)}), min_size=1, max_size=2),
).map(lambda parts: {"max_tokens": 2, **parts[0], "messages": parts[1]})

_text_parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]),
                                              "text": st.text(max_size=6)}), max_size=2)
_valid_responses = st.tuples(
    _valid_sampling,
    st.one_of(st.text(max_size=8), st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "developer"]),
         "content": st.one_of(st.text(max_size=8), _text_parts)}, optional={"type": st.just("message")}),
        min_size=1, max_size=2)),
    st.fixed_dictionaries({}, optional={"instructions": st.text(max_size=8), "stream": st.booleans()}),
).map(lambda parts: {**{k: v for k, v in parts[0].items() if k not in ("n", "max_tokens")},
                     "max_output_tokens": parts[0].get("max_tokens", 2), "input": parts[1], **parts[2]})
# Input items of each type with any of the item fields, holding anything: some happen to be valid.
_any_value = st.one_of(st.sampled_from(["user", "assistant", "tool", "incomplete"]), st.text(max_size=5),
                       st.integers(), st.none(), _text_parts)
_any_items = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "input_image"])},
    optional={key: _any_value for key in ("role", "content", "call_id", "name", "arguments", "output", "status")}),
    min_size=1, max_size=3)

# Text pydantic cannot coerce to a number or a bool.
_word = st.text(alphabet="qwxz", min_size=1, max_size=4)
# One field set to a value the schema, SamplingParams or the engine's limits refuse.
_invalid_field = st.one_of(
    st.tuples(st.just("temperature"), st.one_of(st.floats(max_value=-0.01), _word)),
    st.tuples(st.just("top_p"), st.one_of(st.floats(max_value=0), st.floats(min_value=1.01))),
    st.tuples(st.just("n"), st.one_of(st.integers(max_value=0), st.integers(min_value=LIMITS["max_n"] + 1))),
    st.tuples(st.just("max_tokens"), st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_MODEL_LEN))),
    st.tuples(st.just("stop_token_ids"), st.lists(st.integers(min_value=VOCAB), min_size=1, max_size=2)),
    st.tuples(st.just("stop_token_ids"), st.lists(st.integers(0, 10), min_size=LIMITS["max_stop_token_ids"] + 1)),
    st.tuples(st.just("logit_bias"), st.dictionaries(st.integers(0, 10**6).map(str), st.floats(-1, 1),
                                                     min_size=LIMITS["max_logit_bias"] + 1)),
    st.tuples(st.just("logit_bias"), st.dictionaries(st.integers(0, 9).map(str), st.floats(min_value=100.5),
                                                     min_size=1, max_size=1)),
    st.tuples(st.just("stop"), st.lists(st.text(min_size=1), min_size=LIMITS["max_stop_sequences"] + 1)),
    st.tuples(st.just("presence_penalty"), st.floats(min_value=2.01, allow_infinity=False)),
    st.tuples(st.just("min_p"), st.floats(min_value=1.01, allow_infinity=False)),
    st.tuples(st.just("seed"), _word),
    st.tuples(st.just("ignore_eos"), _word),
)
_invalid_prompt = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=4).filter(lambda ids: any(not 0 <= t < VOCAB for t in ids)),
    st.just([]), st.just(""), st.integers(), st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

_PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_PROPERTY_SETTINGS
@given(body=_valid_completion)
def test_valid_completion_bodies_succeed(server, body):
    response = httpx.post(server.url + CMPL, json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, (body, response.text)
    assert len(response.json()["choices"]) == body.get("n", 1)


@_PROPERTY_SETTINGS
@given(body=_valid_chat)
def test_valid_chat_bodies_succeed(server, body):
    response = httpx.post(server.url + CHAT, json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, (body, response.text)
    assert len(response.json()["choices"]) == body.get("n", 1)


@_PROPERTY_SETTINGS
@given(body=_valid_responses)
def test_valid_responses_bodies_succeed(server, body):
    response = httpx.post(server.url + RESP, json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, (body, response.text)
    if not body.get("stream"):
        assert response.json()["output"][0]["type"] == "message"


@_PROPERTY_SETTINGS
@given(items=_any_items, stream=st.booleans())
def test_any_input_items_get_a_reply_or_a_4xx(server, items, stream):
    response = httpx.post(server.url + RESP, json={"input": items, "max_output_tokens": 2, "stream": stream},
                          headers=AUTH, timeout=120)
    assert response.status_code in (200, 400, 422), (items, response.text[:300])
    if response.status_code != 200:
        _assert_openai_error(response, response.status_code)


@_PROPERTY_SETTINGS
@given(body=_valid_completion, field=_invalid_field, path=st.sampled_from([CMPL, CHAT, RESP]), stream=st.booleans())
def test_one_invalid_field_gets_a_4xx(server, body, field, path, stream):
    name, value = field
    if path == CHAT:
        body = {k: v for k, v in body.items() if k not in ("prompt", "echo", "logprobs")} | {"messages": MESSAGES}
    if path == RESP:
        not_responses = ("prompt", "echo", "logprobs", "max_tokens")
        body = {k: v for k, v in body.items() if k not in not_responses} | {"input": "Hi"}
        name = "max_output_tokens" if name == "max_tokens" else name
    body = {**body, name: value, "stream": stream}
    response = httpx.post(server.url + path, content=json.dumps(body).encode(), headers={
        **AUTH, "Content-Type": "application/json"}, timeout=120)
    assert response.status_code in (400, 422), (body, response.text[:300])
    _assert_openai_error(response, response.status_code)


@_PROPERTY_SETTINGS
@given(body=_valid_completion, prompt=_invalid_prompt, stream=st.booleans())
def test_invalid_prompts_get_a_4xx(server, body, prompt, stream):
    response = httpx.post(server.url + CMPL, json={**body, "prompt": prompt, "stream": stream}, headers=AUTH,
                          timeout=120)
    assert response.status_code in (400, 422), (prompt, response.text[:300])
    _assert_openai_error(response, response.status_code)


def test_after_the_properties_the_pool_is_free_and_the_server_healthy(server):
    wait_until_idle(server)
    assert health_ok(server)
