"""POST /v1/responses end to end on the tiny random model, and its input conversion without one.

Oracles: a dense no-cache greedy loop over the prompt the expected chat messages render to (text
and token counts), the `openai` package's own pydantic types validating the raw JSON (strict,
not the SDK's lenient parsing), the SDK's stream accumulator (which checks that events, item ids
and the final response agree), the chat route for logprobs, JSON schemas for constrained output,
and the engine's stats for freed KV blocks.
"""

import asyncio
import json
import time

import httpx
import jsonschema
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from test_server import AUTH, client, dense_greedy, tiny_model  # noqa: F401 (client, tiny_model: fixtures)
from test_structured_output_server import SCHEMA, SCHEMAS, TOOLS, TOOLS_TEMPLATE

from jpaged.config import EngineArgs
from serving.errors import APIError
from serving.response_store import ResponseStore
from serving.responses import ResponsesRequest, input_messages
from server_harness import MODEL_NAME, ThreadedServer, named_sse_events, wait_until_idle

RESPONSES_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = EngineArgs(model=str(tiny_model_dir), max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                      num_gpu_blocks_override=96, compilation_cache_dir="", chat_template=TOOLS_TEMPLATE)
    srv = ThreadedServer(args, enable_auto_tool_choice=True, tool_call_parser="hermes", enable_responses_store=True)
    yield srv
    srv.stop()


def _post(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json={"model": MODEL_NAME, **body}, headers=AUTH, timeout=120)


def _events(server, **body) -> list[dict]:
    """A streamed response's events, each checked: SSE name = type, numbered 0, 1, ..., and valid
    as the openai package's ResponseStreamEvent."""
    events = named_sse_events(_post(server, stream=True, **body).text)
    for number, event in enumerate(events):
        assert event["sequence_number"] == number
        STREAM_EVENT.validate_python(event)
    return events


# --------------------------------------------------------------------------- input conversion


def test_input_items_become_chat_messages():
    call = {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": '{"zone": "UTC"}'}
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Time?"},
                                                             {"type": "input_text", "text": "In UTC."}]},
             {"type": "reasoning", "summary": []},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
             call, {**call, "call_id": "c2"},
             {"type": "function_call_output", "call_id": "c1", "output": "12:00"}]
    messages, continue_final = input_messages(items)
    tool_call = {"type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    assert messages == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Time?"}, {"type": "text", "text": "In UTC."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}],
         "tool_calls": [{"id": "c1", **tool_call}, {"id": "c2", **tool_call}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    assert not continue_final
    assert input_messages("Hi") == ([{"role": "user", "content": "Hi"}], False)
    partial = {"role": "assistant", "content": "Once upon", "status": "incomplete"}
    assert input_messages([{"role": "user", "content": "A story"}, partial])[1]


@pytest.mark.parametrize("items, fragment", [
    ([], "empty list"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}], "'input_image'"),
    ([{"type": "item_reference", "id": "msg_1"}], "'item_reference'"),
    ([{"role": "tool", "content": "x"}], "role must be one of"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "'call_id'"),
])
def test_input_items_that_cannot_be_served_are_400(items, fragment):
    with pytest.raises(APIError, match=fragment) as info:
        input_messages(items)
    assert info.value.param == "input" and info.value.status_code == 400


def test_request_fields_map_to_the_chat_request():
    body = ResponsesRequest(input="Hi", max_output_tokens=7, include=["message.output_text.logprobs"], top_logprobs=3,
                            text={"format": {"type": "json_schema", "name": "p", "schema": SCHEMA, "strict": True}},
                            tools=RESPONSES_TOOLS, tool_choice={"type": "function", "name": "get_time"},
                            truncation="auto", temperature=0.5, seed=3, stop=["\n"])
    chat = body.to_chat_request(*input_messages(body.input))
    assert chat.max_completion_tokens == 7 and chat.logprobs and chat.top_logprobs == 3
    json_schema = {"name": "p", "schema": SCHEMA, "strict": True}
    assert chat.response_format == {"type": "json_schema", "json_schema": json_schema}
    assert chat.tools == TOOLS and chat.tool_choice == {"type": "function", "function": {"name": "get_time"}}
    assert chat.truncate_prompt_tokens == -1 and chat.temperature == 0.5 and chat.seed == 3 and chat.stop == ["\n"]
    plain = ResponsesRequest(input="Hi", instructions="Be kind.", top_logprobs=2).to_chat_request([], False)
    assert [m.role for m in plain.messages] == ["system"] and plain.add_generation_prompt
    assert not plain.logprobs and plain.top_logprobs is None and plain.tool_choice == "none"


# --------------------------------------------------------------------------- the route


def test_greedy_text_and_usage_match_the_dense_oracle(server, client, tiny_model):
    parts = [{"type": "input_text", "text": "Hello"}, {"type": "input_text", "text": "there"}]
    items = [{"role": "user", "content": parts}]
    raw = _post(server, input=items, instructions="Be brief.", max_output_tokens=12, temperature=0,
                ignore_eos=True).json()
    Response.model_validate(raw)  # every field the openai package requires, with its type
    tokenizer = server.ctx.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hello\nthere"}], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = dense_greedy(tiny_model, prompt_ids, 12, padded_len=128)
    (message,) = raw["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert message["content"][0]["text"] == tokenizer.decode(expected)
    assert raw["status"] == "incomplete" and raw["incomplete_details"] == {"reason": "max_output_tokens"}
    assert raw["usage"]["input_tokens"] == len(prompt_ids) and raw["usage"]["output_tokens"] == 12
    assert raw["usage"]["total_tokens"] == len(prompt_ids) + 12
    assert raw["id"].startswith("resp_") and raw["instructions"] == "Be brief." and raw["max_output_tokens"] == 12
    sdk = client.responses.create(model=MODEL_NAME, input=items, instructions="Be brief.", max_output_tokens=12,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert sdk.output_text == message["content"][0]["text"]


def test_stream_events_add_up_to_the_whole_response(server, client):
    body = {"input": "Tell me a story.", "max_output_tokens": 16, "temperature": 0, "ignore_eos": True}
    whole = _post(server, **body).json()
    events = _events(server, **body)
    types = [e["type"] for e in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    Response.model_validate(final)
    assert text == whole["output"][0]["content"][0]["text"] == final["output"][0]["content"][0]["text"]
    assert final["status"] == "incomplete" and final["usage"] == whole["usage"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["usage"] is None
    with client.responses.stream(model=MODEL_NAME, input=body["input"], max_output_tokens=16, temperature=0,
                                 extra_body={"ignore_eos": True}) as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output_text == text


def test_logprobs_match_the_chat_route(server, client):
    body = {"input": "Hi", "max_output_tokens": 5, "temperature": 0, "ignore_eos": True,
            "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    part = _post(server, **body).json()["output"][0]["content"][0]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    expected = chat.choices[0].logprobs.content
    assert [lp["token"] for lp in part["logprobs"]] == [lp.token for lp in expected]
    for got, want in zip(part["logprobs"], expected, strict=True):
        assert got["logprob"] == pytest.approx(want.logprob, abs=1e-5) and len(got["top_logprobs"]) == 2
        assert got["bytes"] == want.bytes
    deltas = [e for e in _events(server, **body) if e["type"] == "response.output_text.delta"]
    streamed = [lp for e in deltas for lp in e["logprobs"]]
    assert [lp["token"] for lp in streamed] == [lp["token"] for lp in part["logprobs"]]


def test_text_format_json_schema_is_enforced(server):
    for seed in range(3):
        raw = _post(server, input="A person:", temperature=1.0, seed=seed, max_output_tokens=120,
                    text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}).json()
        assert raw["status"] == "completed" and raw["text"]["format"]["name"] == "person"
        jsonschema.validate(json.loads(raw["output"][0]["content"][0]["text"]), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_are_output_items(server, client, stream):
    for seed in range(3):
        for choice in ("required", {"type": "function", "name": "get_time"}):
            body = {"input": "What time is it?", "tools": RESPONSES_TOOLS, "tool_choice": choice, "temperature": 1.0,
                    "seed": seed, "max_output_tokens": 150}
            if stream:
                events = _events(server, **body)
                output = events[-1]["response"]["output"]
                deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
                done = [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"]
                assert deltas == "".join(done) == "".join(item["arguments"] for item in output)
            else:
                response = _post(server, **body)
                assert response.status_code == 200, response.text
                output = response.json()["output"]
            assert output and all(item["type"] == "function_call" for item in output)
            for item in output:
                assert item["id"].startswith("fc_") and item["call_id"] and item["status"] == "completed"
                assert choice == "required" or item["name"] == "get_time"
                jsonschema.validate(json.loads(item["arguments"]), SCHEMAS[item["name"]])
    with client.responses.stream(model=MODEL_NAME, input="Time?", tools=RESPONSES_TOOLS, max_output_tokens=150,
                                 tool_choice={"type": "function", "name": "get_time"}) as sdk_stream:
        for _ in sdk_stream:
            pass
        (call,) = sdk_stream.get_final_response().output
    assert call.type == "function_call" and call.name == "get_time"


def test_tool_round_trip_input_is_rendered(server, tiny_model):
    """A function_call and its output sent back render as the assistant's tool_calls and a tool
    message (the template shows content only, so both turns appear in the prompt)."""
    items = [{"role": "user", "content": "Time?"},
             {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": '{"zone": "UTC"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "12:00"}]
    raw = _post(server, input=items, max_output_tokens=4, temperature=0, ignore_eos=True).json()
    tokenizer = server.ctx.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Time?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "12:00"}], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert raw["usage"]["input_tokens"] == len(prompt_ids)
    assert raw["output"][0]["content"][0]["text"] == tokenizer.decode(dense_greedy(tiny_model, prompt_ids, 4,
                                                                                   padded_len=128))


@pytest.mark.parametrize("body, status, param, fragment", [
    ({"previous_response_id": "resp_abc"}, 404, "previous_response_id", "not found"),
    ({"background": True, "store": False}, 400, "background", "store: true"),
    ({"background": True, "stream": True}, 400, "stream", "does not stream background"),
    ({"conversation": "conv_1"}, 400, "conversation", "keeps no conversations"),
    ({"prompt": {"id": "pmpt_1"}}, 400, "prompt", "prompt template"),
    ({"n": 2}, 400, "n", "not a field of the Responses API"),
    ({"return_token_ids": True}, 400, "return_token_ids", "not a field of the Responses API"),
    ({"tools": [{"type": "web_search_preview"}]}, 400, "tools", "function tools only"),
    ({"tool_choice": "required"}, 400, "tool_choice", "`tools` must be set"),
    ({"input": "word " * 600}, 400, "input", "maximum context length"),
    ({"max_output_tokens": 510}, 400, "max_output_tokens", "maximum context length"),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 1000}, 400, "top_logprobs", "top_logprobs"),
    ({"text": {"format": {"type": "yaml"}}}, 400, "text", "'yaml'"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text", "text.format of type 'json_schema'"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400, "input", "input_file"),
])
def test_bad_requests_get_openai_errors_and_queue_nothing(server, body, status, param, fragment):
    response = _post(server, **{"input": "Hi", **body})
    error = response.json()["error"]
    assert response.status_code == status and error["param"] == param and fragment in error["message"], error
    assert wait_until_idle(server).num_running == 0


def test_request_id_names_the_response(server):
    """vLLM's: a client's request_id is the response's id (stored under it); an id already
    stored is a 400."""
    response = _post(server, input="Hi", max_output_tokens=2, request_id="resp_client_1").json()
    assert response["id"] == "resp_client_1"
    assert httpx.get(server.url + "/v1/responses/resp_client_1", headers=AUTH).json()["id"] == "resp_client_1"
    again = _post(server, input="Hi", max_output_tokens=2, request_id="resp_client_1")
    assert again.status_code == 400 and again.json()["error"]["param"] == "request_id"


def _oracle_text(server, tiny_model, messages: list[dict], num_tokens: int) -> tuple[str, int]:
    """(greedy text, prompt tokens) of `messages` by the dense forward."""
    tokenizer = server.ctx.tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                  add_special_tokens=False)
    return tokenizer.decode(dense_greedy(tiny_model, prompt_ids, num_tokens, padded_len=128)), len(prompt_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_continues_the_stored_conversation(server, client, tiny_model, stream):
    """The second turn sees the first turn's input and output but not its instructions."""
    greedy = {"max_output_tokens": 5, "temperature": 0, "ignore_eos": True}
    if stream:
        first = _events(server, input="My name is Bob.", instructions="Be kind.", **greedy)[-1]["response"]
    else:
        first = _post(server, input="My name is Bob.", instructions="Be kind.", **greedy).json()
    assert first["store"] is True
    first_text = first["output"][0]["content"][0]["text"]
    assert (first_text, first["usage"]["input_tokens"]) == _oracle_text(server, tiny_model, [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "My name is Bob."}], 5)
    assert httpx.get(server.url + f"/v1/responses/{first['id']}", headers=AUTH).json() == first
    second = client.responses.create(model=MODEL_NAME, input="What is my name?", previous_response_id=first["id"],
                                     max_output_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert second.previous_response_id == first["id"]
    assert (second.output_text, second.usage.input_tokens) == _oracle_text(server, tiny_model, [
        {"role": "user", "content": "My name is Bob."}, {"role": "assistant", "content": first_text},
        {"role": "user", "content": "What is my name?"}], 5)
    cancel = httpx.post(server.url + f"/v1/responses/{first['id']}/cancel", headers=AUTH)
    assert cancel.status_code == 400 and "synchronous" in cancel.json()["error"]["message"]
    deleted = httpx.delete(server.url + f"/v1/responses/{first['id']}", headers=AUTH)
    assert deleted.json() == {"id": first["id"], "object": "response", "deleted": True}
    for method, path in (("GET", f"/v1/responses/{first['id']}"), ("DELETE", f"/v1/responses/{first['id']}"),
                         ("POST", f"/v1/responses/{first['id']}/cancel")):
        response = httpx.request(method, server.url + path, headers=AUTH)
        assert response.status_code == 404 and first["id"] in response.json()["error"]["message"]
    gone = _post(server, input="Again?", previous_response_id=first["id"])
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "previous_response_id"


def test_store_false_and_function_calls_in_the_history(server, tiny_model):
    unstored = _post(server, input="Hi", max_output_tokens=2, store=False).json()
    assert unstored["store"] is False
    assert httpx.get(server.url + f"/v1/responses/{unstored['id']}", headers=AUTH).status_code == 404
    call = _post(server, input="Time?", tools=RESPONSES_TOOLS, max_output_tokens=100,
                 tool_choice={"type": "function", "name": "get_time"}).json()
    (item,) = call["output"]
    answer = _post(server, previous_response_id=call["id"], max_output_tokens=3, temperature=0, ignore_eos=True,
                   input=[{"type": "function_call_output", "call_id": item["call_id"], "output": "12:00"}]).json()
    tool_call = {"id": item["call_id"], "type": "function",
                 "function": {"name": "get_time", "arguments": item["arguments"]}}
    expected = _oracle_text(server, tiny_model, [
        {"role": "user", "content": "Time?"}, {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": item["call_id"], "content": "12:00"}], 3)
    assert (answer["output"][0]["content"][0]["text"], answer["usage"]["input_tokens"]) == expected


def test_the_store_keeps_the_newest_responses():
    store = ResponseStore(capacity=2)
    for i in range(3):
        store.put({"id": f"resp_{i}"}, [{"role": "user", "content": str(i)}])
    assert len(store) == 2 and store.get("resp_0") is None
    assert store.get("resp_2").messages == [{"role": "user", "content": "2"}]
    store.put({"id": "resp_1"}, [])  # put again: newest now, so resp_2 is dropped next
    store.put({"id": "resp_3"}, [])
    assert store.get("resp_2") is None and store.get("resp_1") is not None
    assert store.delete("resp_1") and not store.delete("resp_1") and len(store) == 1


def test_a_client_that_leaves_mid_stream_frees_its_blocks(server):
    body = {"model": MODEL_NAME, "input": "Go on.", "max_output_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, headers=AUTH, timeout=60) as response:
        for line in response.iter_lines():
            if "output_text.delta" in line:
                break
    stats = wait_until_idle(server)
    assert stats.num_running == 0 and stats.kv_cache_usage == 0


def test_truncation_auto_keeps_the_last_tokens_that_fit(server):
    raw = _post(server, input="word " * 600, truncation="auto", temperature=0).json()
    assert raw["usage"]["input_tokens"] == 511 and raw["usage"]["output_tokens"] == 1
    assert raw["status"] == "incomplete" and raw["truncation"] == "auto" and raw["max_output_tokens"] == 1


def test_an_empty_reply_is_one_empty_message_whole_and_streamed(server, client):
    # Token 42 forced and made a stop token: the reply ends at once with no text.
    body = {"input": "Hi", "max_output_tokens": 8, "logit_bias": {"42": 100}, "stop_token_ids": [42]}
    whole = _post(server, **body).json()
    events = _events(server, **body)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.output_item.done", "response.completed"]
    for output in (whole["output"], events[-1]["response"]["output"]):
        (message,) = output
        assert message["type"] == "message" and message["content"] == [] and message["status"] == "completed"
    assert whole["status"] == "completed" and whole["usage"]["output_tokens"] == 1
    with client.responses.stream(model=MODEL_NAME, input="Hi", max_output_tokens=8,
                                 extra_body={"logit_bias": {"42": 100}, "stop_token_ids": [42]}) as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output_text == ""


def _poll(server, response_id: str, until: tuple[str, ...], timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        response = httpx.get(server.url + f"/v1/responses/{response_id}", headers=AUTH).json()
        if response["status"] in until or time.time() > deadline:
            return response
        time.sleep(0.02)


def test_background_responses_are_polled_to_the_same_reply(server, client):
    """background: true answers at once ("queued"); GET then shows "in_progress" and finally the
    reply a synchronous request gets (greedy), with background true."""
    greedy = {"input": "Tell me about blocks.", "max_output_tokens": 6, "temperature": 0, "ignore_eos": True}
    queued = _post(server, background=True, **greedy).json()
    Response.model_validate(queued)
    assert queued["status"] == "queued" and queued["background"] is True and queued["output"] == []
    done = _poll(server, queued["id"], ("completed", "incomplete", "failed", "cancelled"))
    Response.model_validate(done)
    synchronous = _post(server, **greedy).json()
    assert done["status"] == synchronous["status"] == "incomplete"
    assert done["output"][0]["content"] == synchronous["output"][0]["content"]
    assert done["usage"] == synchronous["usage"] and done["background"] is True
    cancel = httpx.post(server.url + f"/v1/responses/{queued['id']}/cancel", headers=AUTH)
    assert cancel.status_code == 400  # it finished: nothing to cancel
    follow_up = client.responses.create(model=MODEL_NAME, input="And then?", previous_response_id=queued["id"],
                                        max_output_tokens=2)
    assert follow_up.status in ("completed", "incomplete")


def test_cancel_and_delete_end_a_running_background_response(server, monkeypatch):
    """The engine stream is replaced by one that never ends (the tiny model would finish first):
    cancel and DELETE must end the run, close that stream (which aborts a real engine request,
    as the disconnect tests check) and leave the stored response cancelled, or gone."""
    started, closed = [], []

    async def endless(prompt_token_ids, params, request_id, arrival_time=None, lora_request=None, priority=0,
                      cache_salt=None, reply_id=None):
        started.append(request_id)
        try:
            await asyncio.Event().wait()
            yield  # never reached: makes this an async generator
        finally:
            closed.append(request_id)

    monkeypatch.setattr(server.ctx, "generate", endless)
    for end in ("cancel", "delete"):
        queued = _post(server, input="Go on.", max_output_tokens=8, background=True).json()
        while queued["id"] not in started:
            time.sleep(0.005)
        assert _poll(server, queued["id"], ("in_progress",))["status"] == "in_progress"
        if end == "cancel":
            cancelled = httpx.post(server.url + f"/v1/responses/{queued['id']}/cancel", headers=AUTH).json()
            assert cancelled["status"] == "cancelled" and cancelled["id"] == queued["id"]
            Response.model_validate(cancelled)
            assert httpx.get(server.url + f"/v1/responses/{queued['id']}", headers=AUTH).json() == cancelled
        else:
            deleted = httpx.delete(server.url + f"/v1/responses/{queued['id']}", headers=AUTH)
            assert deleted.json()["deleted"] is True
            assert httpx.get(server.url + f"/v1/responses/{queued['id']}", headers=AUTH).status_code == 404
        assert closed[-1] == queued["id"]
    assert not server.ctx.responses_store.running


def test_a_failed_background_response_says_why(server, monkeypatch):
    async def failing(prompt_token_ids, params, request_id, arrival_time=None, lora_request=None, priority=0,
                      cache_salt=None, reply_id=None):
        raise APIError("The engine failed while running this request: boom.", status_code=500,
                       code="engine_step_failed")
        yield  # never reached: makes this an async generator

    monkeypatch.setattr(server.ctx, "generate", failing)
    queued = _post(server, input="Hi", max_output_tokens=4, background=True).json()
    failed = _poll(server, queued["id"], ("failed",))
    Response.model_validate(failed)
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "boom" in failed["error"]["message"] and not server.ctx.responses_store.running
