"""POST /v1/messages (Anthropic's Messages API) end to end on the tiny random model, and its
request conversion without one.

Oracles: a dense no-cache greedy loop over the prompt the expected chat messages render to (text
and token counts), the `anthropic` package's own pydantic types validating the raw JSON, its SDK
(x-api-key auth, error classes, the stream accumulator, which checks that events and blocks
agree), JSON schemas for tool inputs, and the engine's stats for freed KV blocks.
"""

import json

import anthropic
import httpx
import jsonschema
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from test_server import dense_greedy, tiny_model  # noqa: F401 (tiny_model: a fixture)
from test_structured_output_server import SCHEMA, SCHEMAS, TOOLS, TOOLS_TEMPLATE

from jpaged.admission import Admission
from jpaged.config import EngineArgs
from serving.errors import APIError
from serving.messages import MessagesRequest, chat_messages
from server_harness import API_KEY, MODEL_NAME, ThreadedServer, named_sse_events, wait_until_idle

ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
GREEDY = {"temperature": 0, "ignore_eos": True}  # ignore_eos: vLLM's extra, through the chat request


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = EngineArgs(model=str(tiny_model_dir), max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                      num_gpu_blocks_override=96, compilation_cache_dir="", chat_template=TOOLS_TEMPLATE)
    srv = ThreadedServer(args, enable_auto_tool_choice=True, tool_call_parser="hermes")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sdk(server):
    """The anthropic client: it sends the key as `x-api-key`."""
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)


def _post(server, path: str = "/v1/messages", **body) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL_NAME, "max_tokens": 8, **body},
                      headers={"x-api-key": API_KEY}, timeout=120)


def _events(server, **body) -> list[dict]:
    """A streamed message's events, each checked: SSE name = type, valid as the anthropic
    package's RawMessageStreamEvent."""
    events = named_sse_events(_post(server, stream=True, **body).text)
    for event in events:
        STREAM_EVENT.validate_python(event)
    return events


def _oracle(server, tiny_model, messages: list[dict], num_tokens: int, continue_final: bool = False):
    """(greedy token ids, prompt tokens) of chat `messages` by the dense forward."""
    tokenizer = server.ctx.tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=not continue_final,
                                           continue_final_message=continue_final)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    return dense_greedy(tiny_model, prompt_ids, num_tokens, padded_len=128), len(prompt_ids)


# --------------------------------------------------------------------------- request conversion


def test_messages_become_chat_messages():
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "system": [
        {"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Time?"}, {"type": "text", "text": "In UTC."}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "They want the time.", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"zone": "UTC"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "12:00"}]},
                {"type": "text", "text": "And in CET?"}]},
            {"role": "assistant", "content": "It is"}]})
    messages, continue_final = chat_messages(body.system, body.messages)
    assert messages == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Time?\nIn UTC."},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "12:00"},
        {"role": "user", "content": "And in CET?"},
        {"role": "assistant", "content": "It is"}]
    assert continue_final  # Anthropic's prefill: the last assistant turn is continued
    chat = body.to_chat_request()
    assert chat.continue_final_message and not chat.add_generation_prompt and chat.max_tokens == 5


def test_request_fields_map_to_the_chat_request():
    body = MessagesRequest(model="m", max_tokens=9, messages=[{"role": "user", "content": "Hi"}],
                           stop_sequences=["\n"], temperature=0.5, top_p=0.9, top_k=4, tools=ANTHROPIC_TOOLS,
                           tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
                           thinking={"type": "disabled"}, output_config={"format": {"type": "json_schema",
                                                                                    "schema": SCHEMA}})
    chat = body.to_chat_request()
    assert (chat.max_tokens, chat.stop, chat.temperature, chat.top_p, chat.top_k) == (9, ["\n"], 0.5, 0.9, 4)
    assert chat.tools == TOOLS and chat.tool_choice == {"type": "function", "function": {"name": "get_time"}}
    assert chat.parallel_tool_calls is False and chat.chat_template_kwargs == {"enable_thinking": False}
    assert chat.response_format == {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    for choice, expected in (("auto", "auto"), ("any", "required"), ("none", "none")):
        assert MessagesRequest(model="m", max_tokens=1, messages=[{"role": "user", "content": "Hi"}],
                               tool_choice={"type": choice}).to_chat_request().tool_choice == expected
    thinking = MessagesRequest(model="m", max_tokens=2000, messages=[{"role": "user", "content": "Hi"}],
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert thinking.to_chat_request().chat_template_kwargs is None
    assert thinking.to_chat_request().thinking_token_budget == 1024  # vLLM's: the budget is enforced


@pytest.mark.parametrize("content, fragment", [
    ([{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}], "'image' is not supported in a user"),
    ([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "'tool_use' is not supported in a user"),
    ([{"type": "tool_result", "content": "x"}], "'tool_use_id'"),
    ([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}], "reads text blocks only"),
    ([{"type": "text"}], "needs a string 'text'"),
])
def test_blocks_that_cannot_be_served_are_400(content, fragment):
    body = MessagesRequest(model="m", max_tokens=1, messages=[{"role": "user", "content": content}])
    with pytest.raises(APIError, match=fragment) as info:
        body.to_chat_request()
    assert info.value.status_code == 400


# --------------------------------------------------------------------------- the route


def test_greedy_text_and_usage_match_the_dense_oracle(server, sdk, tiny_model):
    raw = _post(server, system="Be brief.", max_tokens=12, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}], **GREEDY).json()
    Message.model_validate(raw)  # every field the anthropic package requires, with its type
    expected, prompt_tokens = _oracle(server, tiny_model, [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "Hello\nthere"}], 12)
    assert raw["id"].startswith("msg_") and raw["type"] == "message" and raw["role"] == "assistant"
    assert raw["model"] == MODEL_NAME and raw["stop_reason"] == "max_tokens" and raw["stop_sequence"] is None
    assert raw["content"] == [{"type": "text", "text": server.ctx.tokenizer.decode(expected)}]
    assert raw["usage"] == {"input_tokens": prompt_tokens, "output_tokens": 12}
    message = sdk.messages.create(model=MODEL_NAME, system="Be brief.", max_tokens=12,
                                  messages=[{"role": "user", "content": "Hello\nthere"}],
                                  extra_body=GREEDY)
    assert message.content[0].text == raw["content"][0]["text"]
    count = sdk.messages.count_tokens(model=MODEL_NAME, system="Be brief.",
                                      messages=[{"role": "user", "content": "Hello\nthere"}])
    assert count.input_tokens == prompt_tokens


def test_a_final_assistant_turn_is_continued(server, tiny_model):
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon"}]
    raw = _post(server, messages=messages, max_tokens=6, **GREEDY).json()
    expected, prompt_tokens = _oracle(server, tiny_model, messages, 6, continue_final=True)
    assert raw["content"][0]["text"] == server.ctx.tokenizer.decode(expected)  # the continuation only
    assert raw["usage"]["input_tokens"] == prompt_tokens


def test_stream_events_add_up_to_the_whole_message(server, sdk):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 16, **GREEDY}
    whole = _post(server, **body).json()
    events = _events(server, **body)
    types = [e["type"] for e in events]
    assert types[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": whole["usage"]["input_tokens"], "output_tokens": 0}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert {e["index"] for e in events if "index" in e} == {0}
    assert text == whole["content"][0]["text"]
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2]["usage"] == whole["usage"]
    with sdk.messages.stream(model=MODEL_NAME, max_tokens=16, messages=body["messages"],
                             extra_body=GREEDY) as stream:
        assert "".join(stream.text_stream) == text
        final = stream.get_final_message()
    assert final.content[0].text == text and final.stop_reason == "max_tokens" and final.usage.output_tokens == 16


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_ends_the_message_and_is_named(server, stream):
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 12, **GREEDY}
    text = _post(server, **body).json()["content"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]  # two characters the greedy reply holds
    assert len(stop) == 2, text
    body["stop_sequences"] = [stop]
    if stream:
        events = _events(server, **body)
        got = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        reason = events[-2]["delta"]
    else:
        raw = _post(server, **body).json()
        got, reason = raw["content"][0]["text"], {k: raw[k] for k in ("stop_reason", "stop_sequence")}
    assert got == text[:text.index(stop)]
    assert reason == {"stop_reason": "stop_sequence", "stop_sequence": stop}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_tool_use_blocks(server, sdk, stream):
    for seed in range(3):
        for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
            body = {"messages": [{"role": "user", "content": "What time is it?"}], "tools": ANTHROPIC_TOOLS,
                    "tool_choice": choice, "temperature": 1.0, "seed": seed, "max_tokens": 150}
            if stream:
                events = _events(server, **body)
                blocks = [e["content_block"] for e in events if e["type"] == "content_block_start"]
                for block in blocks:  # each block's input is its input_json_deltas, joined
                    index = next(e["index"] for e in events if e.get("content_block") is block)
                    block["input"] = json.loads("".join(e["delta"]["partial_json"] for e in events
                                                        if e["type"] == "content_block_delta" and e["index"] == index))
                stop_reason = events[-2]["delta"]["stop_reason"]
            else:
                raw = _post(server, **body).json()
                Message.model_validate(raw)
                blocks, stop_reason = raw["content"], raw["stop_reason"]
            assert blocks and stop_reason == "tool_use"
            for block in blocks:
                assert block["type"] == "tool_use" and block["id"]
                assert choice["type"] == "any" or block["name"] == "get_time"
                jsonschema.validate(block["input"], SCHEMAS[block["name"]])
    with sdk.messages.stream(model=MODEL_NAME, max_tokens=150, tools=ANTHROPIC_TOOLS,
                             tool_choice={"type": "tool", "name": "get_time"},
                             messages=[{"role": "user", "content": "Time?"}]) as sdk_stream:
        (call,) = sdk_stream.get_final_message().content
    assert call.type == "tool_use" and call.name == "get_time" and call.input["zone"] in ("UTC", "CET", "PST")


def test_tool_results_are_rendered_as_tool_messages(server, tiny_model):
    messages = [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time",
                                                   "input": {"zone": "UTC"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}]}]
    raw = _post(server, messages=messages, tools=ANTHROPIC_TOOLS, tool_choice={"type": "none"}, max_tokens=4,
                **GREEDY).json()
    call = {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    chat = [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "12:00"}]
    tokenizer = server.ctx.tokenizer
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tools=TOOLS)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert raw["usage"]["input_tokens"] == len(prompt_ids)
    assert raw["content"][0]["text"] == tokenizer.decode(dense_greedy(tiny_model, prompt_ids, 4, padded_len=128))
    count = _post(server, "/v1/messages/count_tokens", messages=messages, tools=ANTHROPIC_TOOLS,
                  tool_choice={"type": "none"}).json()
    assert count == {"input_tokens": len(prompt_ids)}


@pytest.mark.parametrize("body, status, error_type, fragment", [
    ({"model": "other"}, 404, "not_found_error", "does not exist"),
    ({"max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 510}, 400, "invalid_request_error", "maximum context length"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "invalid_request_error",
     "maximum context length"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error",
     "client tools"),
    ({"tool_choice": {"type": "any"}}, 400, "invalid_request_error", "`tools` must be set"),
    ({"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error",
     "'nope'"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, 400, "invalid_request_error", "less than max_tokens"),
    ({"output_config": {"format": {"type": "yaml"}}}, 400, "invalid_request_error", "output_config.format"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_anthropic_errors_and_queue_nothing(server, body, status, error_type, fragment, stream):
    response = _post(server, **{"messages": [{"role": "user", "content": "Hi"}], "stream": stream, **body})
    assert response.status_code == status and response.json()["type"] == "error", response.text
    error = response.json()["error"]
    assert error["type"] == error_type and fragment in error["message"], error
    assert wait_until_idle(server).num_running == 0


def test_sdk_errors_and_auth(server, sdk):
    with pytest.raises(anthropic.NotFoundError) as info:
        sdk.messages.create(model="other", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["error"]["type"] == "not_found_error"
    wrong_key = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong_key.messages.create(model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=API_KEY, max_retries=0)  # Authorization: Bearer
    assert bearer.messages.create(model=MODEL_NAME, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]).id
    assert wait_until_idle(server).num_running == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_an_overloaded_error(server, stream):
    """--max-num-queued-reqs at 0: every request is refused with 503 before any event."""
    saved = server.engine.admission
    server.engine.admission = Admission(max_num_queued_reqs=0)
    try:
        response = _post(server, messages=[{"role": "user", "content": "Hi"}], stream=stream)
    finally:
        server.engine.admission = saved
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "overloaded_error" and "try again later" in error["message"]
    assert _post(server, messages=[{"role": "user", "content": "Hi"}], max_tokens=2).status_code == 200
