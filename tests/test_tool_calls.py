"""Tool-call parsing and request planning, without a model: hermes and llama3 JSON parsers on
whole and streamed text, the deltas a stream sends, tool_choice validation and constraints, and
the request fields that become a StructuredOutputsParams."""

import json

import jsonschema
import pytest

from serving.errors import APIError
from serving.protocol import ChatCompletionRequest, CompletionRequest
from serving.structured_outputs import structured_outputs_from_request
from serving.tool_calls import ToolCallStream, chat_constraint, plan_tools
from serving.tool_parsers import (HermesToolParser, Llama3JsonToolParser, MistralToolParser, ParsedOutput,
                                  PythonicToolParser, json_value_end)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]

HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\"", '
               '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
               '</tool_call>')
LLAMA3_TEXT = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo}"}}; '
               '{"name": "get_time", "parameters": {"zone": "UTC"}}')
EXPECTED = [("get_weather", {"city": 'Paris, "FR"', "days": 2}), ("get_time", {"zone": "CET"})]


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MESSAGES, **fields)


def _plan(auto=True, **fields):
    return plan_tools(_chat(**fields), enable_auto_tool_choice=auto, tool_call_parser="hermes" if auto else None)


def _streamed(plan, text: str, piece: int):
    """Feeds `text` in pieces of `piece` characters; returns (content, [(name, arguments)], ids)."""
    stream = ToolCallStream(plan)
    content, calls = "", {}
    for start in range(0, len(text), piece):
        chunk = text[start:start + piece]
        delta_content, deltas = stream.feed(chunk, final=start + piece >= len(text))
        content += delta_content or ""
        for d in deltas or []:
            if d.id is not None:
                assert d.index == len(calls) and d.type == "function" and d.function.arguments == ""
                calls[d.index] = [d.function.name, "", d.id]
            else:
                assert d.function.name is None
                calls[d.index][1] += d.function.arguments
    return content, [(name, args) for name, args, _ in calls.values()], [i for *_, i in calls.values()]


def test_hermes_parser_whole_and_streamed():
    plan = _plan(tools=[WEATHER, TIME])
    content, calls, finish = plan.message(HERMES_TEXT, "stop")
    assert content == "Let me check." and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == EXPECTED
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("chatcmpl-tool-") for c in calls)
    for piece in (1, 3, 7, 50):
        streamed_content, streamed_calls, ids = _streamed(plan, HERMES_TEXT, piece)
        assert streamed_content.strip() == "Let me check."
        assert [(n, json.loads(a)) for n, a in streamed_calls] == EXPECTED
        assert len(set(ids)) == 2


def test_hermes_parser_plain_text_and_broken_call():
    parser = HermesToolParser()
    assert parser.parse("no tools here", final=True).calls == []
    assert parser.parse("a <tool_ca", final=False).content == "a "  # held back: maybe a tag
    assert parser.parse("a <tool_ca", final=True).content == "a <tool_ca"
    broken = 'x <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert parser.parse(broken, final=True).content == broken  # unparsable: all content, as vLLM
    content, calls, finish = _plan(tools=[WEATHER]).message("It is sunny.", "stop")
    assert (content, calls, finish) == ("It is sunny.", [], "stop")


def test_llama3_json_parser():
    parsed = Llama3JsonToolParser().parse(LLAMA3_TEXT, final=True)
    assert parsed.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Oslo}"}), ("get_time", {"zone": "UTC"})]
    assert Llama3JsonToolParser().parse("Hello there", final=True).calls == []
    assert Llama3JsonToolParser().parse("<|python", final=False).content == ""
    plan = plan_tools(_chat(tools=[WEATHER, TIME]), enable_auto_tool_choice=True, tool_call_parser="llama3_json")
    for piece in (1, 5):
        _, calls, _ = _streamed(plan, LLAMA3_TEXT, piece)
        assert [n for n, _ in calls] == ["get_weather", "get_time"]
        assert json.loads(calls[0][1]) == {"city": "Oslo}"}


PYTHONIC_TEXT = "[get_weather(city='Paris, \\'FR\\'', days=2), get_time(zone=\"CET\")]"


def test_pythonic_parser_whole_and_streamed():
    plan = plan_tools(_chat(tools=[WEATHER, TIME]), enable_auto_tool_choice=True, tool_call_parser="pythonic")
    content, calls, finish = plan.message(PYTHONIC_TEXT, "stop")
    assert content is None and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris, 'FR'", "days": 2}), ("get_time", {"zone": "CET"})]
    for piece in (1, 4, 9, 100):
        streamed_content, streamed_calls, ids = _streamed(plan, PYTHONIC_TEXT, piece)
        assert streamed_content == "" and len(set(ids)) == 2
        assert [(n, json.loads(a)) for n, a in streamed_calls] == [(c.function.name, json.loads(c.function.arguments))
                                                                   for c in calls]
    nested = PythonicToolParser().parse("[f(a={'k': [1, None, True]}, b=-2.5)]", final=True).calls
    assert [(c.name, json.loads(c.arguments)) for c in nested] == [("f", {"a": {"k": [1, None, True]}, "b": -2.5})]


@pytest.mark.parametrize("text", [
    "[1] is a citation", "[f(x)]", "[f(a=__import__('os').getcwd())]", "[os.system(a=1)]", "[f(a=1)] and more",
    "[f(a=1)", "[f(a=[1, 2)]", "Paris.",
])
def test_pythonic_parser_leaves_anything_else_as_content(text):
    assert PythonicToolParser().parse(text, final=True) == ParsedOutput(text, [])


MISTRAL_TEXTS = {  # tokenizers before v11, then v11 and later (with and without [ARGS])
    "pre_v11": 'Checking.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\"", "days": 2}}, '
               '{"name": "get_time", "arguments": {"zone": "CET"}}] trailing',
    "v11": 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris, \\"FR\\"", "days": 2}'
           '[TOOL_CALLS]get_time{"zone": "CET"} trailing',
}


@pytest.mark.parametrize("kind", sorted(MISTRAL_TEXTS))
def test_mistral_parser_whole_and_streamed(kind):
    text = MISTRAL_TEXTS[kind]
    plan = plan_tools(_chat(tools=[WEATHER, TIME]), enable_auto_tool_choice=True, tool_call_parser="mistral")
    assert plan.keeps_special_tokens  # [TOOL_CALLS] is a special token
    content, calls, finish = plan.message(text, "stop")
    assert content == "Checking." and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == EXPECTED
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # what Mistral's templates accept
    for piece in (1, 3, 7, 100):
        streamed_content, streamed_calls, ids = _streamed(plan, text, piece)
        assert streamed_content == "Checking." and all(len(i) == 9 and i.isalnum() for i in ids)
        assert [(n, json.loads(a)) for n, a in streamed_calls] == EXPECTED


@pytest.mark.parametrize("text", [
    "No tools needed.", "A list: [TOOL", "[TOOL_CALLS] not json", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}',
    "[TOOL_CALLS]get_time", '[TOOL_CALLS] [{"arguments": {}}]',
])
def test_mistral_parser_leaves_anything_else_as_content(text):
    assert MistralToolParser().parse(text, final=True) == ParsedOutput(text, [])


def test_mistral_ids_and_special_tokens_in_every_mode():
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice in ("required", named):
        plan = plan_tools(_chat(tools=[WEATHER, TIME], tool_choice=choice), enable_auto_tool_choice=False,
                          tool_call_parser="mistral")
        assert plan.keeps_special_tokens and len(plan.new_call_id()) == 9
    off = plan_tools(_chat(tools=[TIME], tool_choice="none"), enable_auto_tool_choice=True, tool_call_parser="mistral")
    assert not off.keeps_special_tokens
    hermes = _plan(tools=[TIME])
    assert hermes.new_call_id().startswith("chatcmpl-tool-") and not hermes.keeps_special_tokens


def test_json_value_end():
    text = '{"a": "}\\"", "b": [1, {"c": 2}]} tail'
    assert json_value_end(text, 0) == text.index(" tail")
    assert json_value_end('{"a": [1, 2', 0) is None
    assert json_value_end('"x\\"y" rest', 0) == 6
    assert json_value_end("123, 4", 0) == 3


def test_required_constraint_and_parse():
    plan = _plan(tools=[WEATHER, TIME], tool_choice="required")
    schema = plan.constraint().json
    output = [{"name": "get_weather", "parameters": {"city": "Rome"}},
              {"name": "get_time", "parameters": {"zone": "UTC"}}]
    jsonschema.validate(output, schema)
    for bad in ([], [{"name": "get_time", "parameters": {"zone": "PST"}}], [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    text = json.dumps(output)
    content, calls, finish = plan.message(text, "stop")
    assert content is None and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (o["name"], o["parameters"]) for o in output]
    _, streamed, _ = _streamed(plan, text, 4)
    assert [(n, json.loads(a)) for n, a in streamed] == [(o["name"], o["parameters"]) for o in output]
    single = _plan(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False).constraint().json
    jsonschema.validate(output[:1], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(output, single)


def test_stream_keeps_sent_calls_when_the_last_one_breaks():
    plan = _plan(tools=[WEATHER, TIME])
    text = HERMES_TEXT[:HERMES_TEXT.index('"zone"')]  # cut inside the second call
    content, calls, _ = _streamed(plan, text, 5)
    assert content.strip() == "Let me check." and [n for n, _ in calls] == ["get_weather", "get_time"]
    assert plan.message(text, "length") == (text, [], "length")  # non-streamed: all content


def test_named_constraint_and_parse():
    plan = _plan(auto=False, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert plan.constraint().json == TIME["function"]["parameters"]
    content, calls, finish = plan.message('{"zone": "UTC"}', "stop")
    assert content is None and finish == "stop"
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_time", '{"zone": "UTC"}')]
    _, streamed, _ = _streamed(plan, '{"zone": "UTC"}', 2)
    assert streamed == [("get_time", '{"zone": "UTC"}')]


@pytest.mark.parametrize("fields, auto, message", [
    (dict(tools=[WEATHER]), False, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser'),
    (dict(tool_choice="required"), True, "When using `tool_choice`, `tools` must be set."),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), True,
     "Tool 'nope' has not been passed in `tools`."),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), True, "tools[0] must be"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), True,
     "cannot be combined with response_format"),
])
def test_tool_request_errors(fields, auto, message):
    with pytest.raises(APIError) as info:
        body = _chat(**fields)
        plan = plan_tools(body, enable_auto_tool_choice=auto, tool_call_parser="hermes" if auto else None)
        chat_constraint(body, plan)
    assert message in info.value.message and info.value.status_code == 400


def test_tool_choice_none_renders_tools_but_parses_nothing():
    plan = _plan(auto=False, tools=[WEATHER], tool_choice="none")
    assert plan.constraint() is None and plan.tools == [WEATHER]
    assert plan.message(HERMES_TEXT, "stop") == (HERMES_TEXT, [], "stop")


@pytest.mark.parametrize("fields, kind, value", [
    (dict(response_format={"type": "json_object"}), "json_object", True),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}),
     "json", {"type": "integer"}),
    (dict(structured_outputs={"regex": "[ab]+"}), "regex", "[ab]+"),
    (dict(structured_outputs={"choice": ["a", "b"]}), "choice", ["a", "b"]),
    (dict(guided_json='{"type": "string"}'), "json", '{"type": "string"}'),
    (dict(guided_regex="x+"), "regex", "x+"),
    (dict(guided_choice=["x", "y"]), "choice", ["x", "y"]),
    (dict(guided_grammar='start: "a"'), "grammar", 'start: "a"'),
    (dict(response_format={"type": "text"}), None, None),
])
def test_request_fields_to_structured_outputs(fields, kind, value):
    for body in (CompletionRequest(prompt="hi", **fields), _chat(**fields)):
        params = structured_outputs_from_request(body)
        if kind is None:
            assert params is None
        else:
            assert params.kind == kind and getattr(params, kind) == value


@pytest.mark.parametrize("fields, message", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "needs a json_schema object"),
    (dict(response_format={"type": "structural_tag"}), "'structural_tag' is not supported"),
    (dict(structured_outputs={"json": {}, "regex": "a"}), "got json, regex"),
    (dict(structured_outputs={"whitespace_pattern": " "}), "['whitespace_pattern'] are not supported"),
    (dict(guided_regex="a", guided_choice=["b"]), "got guided_regex, guided_choice"),
    (dict(response_format={"type": "json_object"}, guided_json={}), "got response_format, guided_json"),
])
def test_request_field_errors(fields, message):
    with pytest.raises(APIError) as info:
        structured_outputs_from_request(_chat(**fields))
    assert message in info.value.message and info.value.status_code == 400
