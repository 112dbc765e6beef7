"""Structured outputs and tool calls through the server with the official `openai` client: the
tiny random model for validity (temperature 1, many seeds), the bundled SmolLM2 for a real model
(slow). Every constrained reply must validate against its schema; tool calls must parse."""

import json
import re

import httpx
import jsonschema
import openai
import pytest
from test_server import API_KEY, AUTH, MODEL_NAME, ThreadedServer

from jpaged.config import EngineArgs

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog"]}}, "required": ["name", "age", "pet"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris? Answer with a tool call."}]
# A chat template that shows the tools to the model (SmolLM2's own template ignores them).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou can call these functions:\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _server(model: str, **kwargs) -> ThreadedServer:
    args = EngineArgs(model=model, max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks_override=96,
                      compilation_cache_dir="", chat_template=TOOLS_TEMPLATE, **kwargs)
    server = ThreadedServer(args)
    server.ctx.enable_auto_tool_choice, server.ctx.tool_call_parser = True, "hermes"
    return server


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    server = _server(str(tiny_model_dir), max_model_len=512)
    yield server
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def _streamed_message(stream):
    """(content, [(name, arguments)], finish_reason) assembled from chat chunks."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                if call.id is not None:
                    calls[call.index] = [call.function.name, call.function.arguments or ""]
                else:
                    calls[call.index][1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [tuple(c) for c in calls.values()], finish


def _tool_message(reply, stream: bool):
    """(content, [(name, arguments)], finish_reason) of a streamed or whole chat reply; a whole
    reply's tool calls must carry vLLM's id prefix and type."""
    if stream:
        return _streamed_message(reply)
    message = reply.choices[0].message
    calls = message.tool_calls or []
    assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function" for c in calls)
    return message.content, [(c.function.name, c.function.arguments) for c in calls], reply.choices[0].finish_reason


def test_response_format_json_schema_over_seeds(tiny_server):
    client = _client(tiny_server)
    for seed in range(6):
        reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=RESPONSE_FORMAT,
                                               temperature=1.0, seed=seed, max_tokens=120, n=2)
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    completion = client.completions.create(model=MODEL_NAME, prompt="A person:", temperature=1.0, seed=1,
                                           max_tokens=120, extra_body={"response_format": RESPONSE_FORMAT})
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=RESPONSE_FORMAT,
                                            temperature=1.0, seed=2, max_tokens=120, stream=True)
    content, calls, finish = _streamed_message(stream)
    assert calls == [] and finish == "stop"
    jsonschema.validate(json.loads(content), SCHEMA)


def test_extra_fields_regex_choice_grammar(tiny_server):
    client = _client(tiny_server)
    cases = [({"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}}, lambda t: re.fullmatch("[0-9]{2}:[0-9]{2}", t)),
             ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
             ({"guided_regex": "(yes|no)!"}, lambda t: t in ("yes!", "no!")),
             ({"guided_grammar": 'root ::= "(" [a-z] ")"'}, lambda t: re.fullmatch(r"\([a-z]\)", t)),
             ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
             # vLLM's options that match what the compiler always does are accepted
             ({"structured_outputs": {"choice": ["up", "down"], "disable_any_whitespace": True,
                                      "disable_additional_properties": False, "disable_fallback": True}},
              lambda t: t in ("up", "down"))]
    for extra, check in cases:
        for seed in range(3):
            text = client.completions.create(model=MODEL_NAME, prompt="Answer:", temperature=1.0, seed=seed,
                                             max_tokens=100, extra_body=extra).choices[0].text
            assert check(text), (extra, text)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named(tiny_server, stream):
    client = _client(tiny_server)
    for seed in range(4):
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                                   temperature=1.0, seed=seed, max_tokens=150, stream=stream)
            content, calls, finish = _tool_message(reply, stream)
            assert not content and calls
            assert finish == ("tool_calls" if choice == "required" else "stop")
            for name, arguments in calls:
                assert choice == "required" or name == "get_time"
                jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes_calls(tiny_server, stream):
    """The model's reply is forced into hermes format with a regex, so auto parsing has calls to find."""
    client = _client(tiny_server)
    regex = r'Sure\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,6}", ' \
            r'"unit": "celsius"\}\}\n</tool_call>'
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=3,
                                           max_tokens=150, stream=stream, extra_body={"guided_regex": regex})
    content, calls, finish = _tool_message(reply, stream)
    assert content.strip() == "Sure." and finish == "tool_calls"
    assert len(calls) == 1 and calls[0][0] == "get_weather"
    arguments = json.loads(calls[0][1])
    assert arguments["unit"] == "celsius" and re.fullmatch("[A-Z][a-z]{2,6}", arguments["city"])


@pytest.mark.parametrize("body, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "Invalid JSON schema for structured outputs: Invalid type: objekt"),
    ({"structured_outputs": {"regex": "a(b"}}, "Invalid regex for structured outputs"),
    ({"guided_grammar": "start: foo"}, 'unknown name: "foo"'),
    ({"structured_outputs": {"choice": ["a"], "whitespace_pattern": " "}}, "['whitespace_pattern'] are not supported"),
    ({"structured_outputs": {"choice": ["a"], "disable_any_whitespace": "yes"}}, "must be a boolean"),
    ({"tools": TOOLS}, '"auto" tool choice requires --enable-auto-tool-choice'),
])
def test_invalid_constraints_are_400_and_queue_nothing(tiny_server, body, fragment):
    enabled = tiny_server.ctx.enable_auto_tool_choice
    tiny_server.ctx.enable_auto_tool_choice = False
    try:
        for stream in (False, True):
            response = httpx.post(tiny_server.url + "/v1/chat/completions", headers=AUTH,
                                  json={"messages": MESSAGES, "stream": stream, **body})
            assert response.status_code == 400, response.text
            assert fragment in response.json()["error"]["message"]
    finally:
        tiny_server.ctx.enable_auto_tool_choice = enabled
    stats = tiny_server.engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.slow
def test_smollm2_json_schema_and_tools(smollm2_path):
    server = _server(smollm2_path, max_model_len=1024)
    try:
        client = _client(server)
        for stream in (False, True):
            kwargs = dict(model=MODEL_NAME, temperature=0.7, seed=0, max_tokens=200, stream=stream)
            reply = client.chat.completions.create(
                messages=[{"role": "user", "content": "Describe a person called Ann who is 31 and owns a dog."}],
                response_format=RESPONSE_FORMAT, **kwargs)
            content = _streamed_message(reply)[0] if stream else reply.choices[0].message.content
            jsonschema.validate(json.loads(content), SCHEMA)
            for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
                reply = client.chat.completions.create(messages=MESSAGES, tools=TOOLS, tool_choice=choice, **kwargs)
                _, calls, finish = _tool_message(reply, stream)
                assert calls and finish == ("tool_calls" if choice == "required" else "stop")
                for name, arguments in calls:
                    jsonschema.validate(json.loads(arguments), SCHEMAS[name])
                if choice != "required":
                    assert [name for name, _ in calls] == ["get_weather"]
    finally:
        server.stop()
