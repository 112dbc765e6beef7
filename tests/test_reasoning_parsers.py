"""--reasoning-parser: the split of a reply into reasoning and content, whole and streamed in
pieces of every size (the streamed deltas must add up to the whole split), and through the
server's chat and Responses routes with the engine's text scripted (a random model never writes
</think>), checked against the openai package's types and its stream accumulator. Also the
mistral tool parser's request (special tokens kept), with the same scripting."""

import json

import httpx
import pytest
from openai.types.responses import Response
from test_responses import RESPONSES_TOOLS, _events, _post, server  # noqa: F401 (server: the fixture)

from jpaged.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jpaged.reasoning import reasoning_tokens
from jpaged.sampling_params import RequestOutputKind
from serving.reasoning_parsers import (END, REASONING_PARSERS, START, ReasoningStream, reasoning_parser_for,
                                      reasoning_token_count)
from server_harness import MODEL_NAME
from test_server import AUTH

DEEPSEEK, QWEN3 = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["qwen3"]
CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'

CASES = [  # parser, reply, (reasoning, content)
    (DEEPSEEK, "<think>Let me see.</think>\n\nParis.", ("Let me see.", "\n\nParis.")),
    (DEEPSEEK, "\n<think>\nx < y </thinking? no</think>done", ("\nx < y </thinking? no", "done")),
    (DEEPSEEK, "The template opened it.</think>Yes", ("The template opened it.", "Yes")),
    (DEEPSEEK, "Still thinking when it stopped", ("Still thinking when it stopped", None)),
    (DEEPSEEK, "<think>a</think>", ("a", "")),
    (DEEPSEEK, "<think>plan " + CALL, ("plan " + CALL, None)),
    (QWEN3, "<think>plan " + CALL, ("plan ", CALL)),
    (QWEN3, "<think>a</think>b</think>", ("a", "b</think>")),
    (QWEN3, "", ("", None)),
]


@pytest.mark.parametrize("parser, reply, expected", CASES)
def test_split_whole_and_streamed_in_pieces_of_every_size(parser, reply, expected):
    assert parser.split(reply, final=True) == expected
    for size in range(1, 12):
        stream, reasoning, content = ReasoningStream(parser), "", None
        for start in range(0, max(len(reply), 1), size):
            piece = reply[start:start + size]
            reasoning_delta, content_delta = stream.feed(piece, final=start + size >= len(reply))
            reasoning += reasoning_delta or ""
            if content_delta is not None:
                content = (content or "") + content_delta
        assert (reasoning, content) == expected, size


def test_qwen3_thinking_off_means_no_parser():
    assert reasoning_parser_for("qwen3", {"enable_thinking": False}) is None
    assert reasoning_parser_for("qwen3", {"enable_thinking": True}) is QWEN3
    assert reasoning_parser_for("deepseek_r1", {"enable_thinking": False}) is DEEPSEEK
    assert reasoning_parser_for(None, None) is None


# --------------------------------------------------------------------------- through the server

PIECES = ["<th", "ink>Let me", " think.</th", "ink>\n\nParis", " is it."]
REASONING, CONTENT = "Let me think.", "\n\nParis is it."


def _scripted(pieces: list[str], tokenizer, requests: list):
    """ServingContext.generate replaced: the reply is `pieces` (each as its tokens), then "stop";
    each request's SamplingParams go to `requests`."""
    ids = [tokenizer.encode(piece, add_special_tokens=False) for piece in pieces]

    async def generate(prompt_token_ids, params, request_id, arrival_time=None, lora_request=None, priority=0,
                       cache_salt=None, reply_id=None):
        requests.append(params)
        delta = params.output_kind == RequestOutputKind.DELTA
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if not (delta or last):
                continue
            completion = CompletionOutput(index=0, text=piece if delta else "".join(pieces),
                                          token_ids=ids[i] if delta else sum(ids, []), cumulative_logprob=None,
                                          logprobs=None, finish_reason="stop" if last else None)
            yield RequestOutput(request_id, None, prompt_token_ids, None, [completion], last, RequestMetrics())
    return generate


@pytest.fixture
def scripted(server, monkeypatch):  # noqa: F811 (the imported fixture)
    def script(parser: str, pieces: list[str] = PIECES) -> list:
        """Scripts the replies; returns the list the requests' SamplingParams will go to."""
        requests = []
        monkeypatch.setattr(server.ctx, "reasoning_parser", parser)
        monkeypatch.setattr(server.ctx, "generate", _scripted(pieces, server.ctx.tokenizer, requests))
        return requests
    return script


def _chat(server, stream: bool, **body):  # noqa: F811
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Capital of France?"}], **body}
    response = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": stream}, headers=AUTH,
                          timeout=60)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["choices"][0]
    reasoning, content, calls, finish = "", "", [], None
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                reasoning += choice["delta"].get("reasoning") or ""
                content += choice["delta"].get("content") or ""
                calls += [c["function"]["name"] for c in choice["delta"].get("tool_calls", []) if c.get("id")]
                finish = choice["finish_reason"] or finish
    return {"message": {"reasoning": reasoning or None, "content": content or None, "tool_calls": calls},
            "finish_reason": finish}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_reply_has_reasoning_and_content(server, scripted, stream):  # noqa: F811
    scripted("deepseek_r1")
    message = _chat(server, stream)["message"]
    assert (message["reasoning"], message["content"]) == (REASONING, CONTENT)
    hidden = _chat(server, stream, include_reasoning=False)["message"]
    assert hidden.get("reasoning") is None and hidden["content"] == CONTENT
    scripted("deepseek_r1", ["<think>Hmm, ", "</th"])  # cut off inside a marker-like tail: kept at the end
    cut = _chat(server, stream)["message"]
    assert (cut["reasoning"], cut["content"]) == ("Hmm, </th", None)
    scripted("qwen3")  # thinking turned off: the raw reply is the content
    off = _chat(server, stream, chat_template_kwargs={"enable_thinking": False})["message"]
    assert off.get("reasoning") is None and off["content"] == "".join(PIECES)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_call_after_reasoning(server, scripted, stream):  # noqa: F811
    scripted("qwen3", ["<think>I need", " the time.", CALL[:20], CALL[20:]])
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in RESPONSES_TOOLS]
    choice = _chat(server, stream, tools=tools)
    message = choice["message"]
    names = message["tool_calls"] if stream else [c["function"]["name"] for c in message["tool_calls"]]
    assert message["reasoning"] == "I need the time." and not message["content"] and names == ["get_time"]
    assert choice["finish_reason"] == "tool_calls"


def test_responses_reasoning_item_whole_and_streamed(server, scripted):  # noqa: F811
    scripted("deepseek_r1")
    whole = _post(server, input="Capital of France?").json()
    Response.model_validate(whole)
    reasoning, message = whole["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_") and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": REASONING}]
    assert message["type"] == "message" and message["content"][0]["text"] == CONTENT
    events = _events(server, input="Capital of France?")
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    streamed = events[-1]["response"]["output"]
    assert [item["content"] for item in streamed] == [item["content"] for item in whole["output"]]
    hidden = _post(server, input="Capital of France?", include_reasoning=False).json()
    assert [item["type"] for item in hidden["output"]] == ["message"]


def test_reasoning_token_count(server):  # noqa: F811
    tokenizer = server.ctx.tokenizer

    def encode(*texts):
        return [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False)]

    thought = encode("Let me think about it.")
    assert reasoning_token_count(DEEPSEEK, tokenizer, encode("<think>", "Let me think about it.", "</think>", "Yes.")) \
        == len(thought)
    assert reasoning_token_count(DEEPSEEK, tokenizer, encode("Let me think about it.", "</think>", "Yes.")) \
        == len(thought)
    assert reasoning_token_count(DEEPSEEK, tokenizer, encode("<think>", "Let me think about it.")) == len(thought)
    assert reasoning_token_count(QWEN3, tokenizer, encode("<think>", "Let me think about it.", CALL)) == len(thought)
    assert reasoning_token_count(DEEPSEEK, tokenizer, encode("<think>", "</think>", "Yes.")) == 0


def test_reasoning_tokens_in_usage(server, scripted):  # noqa: F811
    thought = len(server.ctx.tokenizer.encode(REASONING, add_special_tokens=False))
    scripted("deepseek_r1", ["<think>", REASONING[:6], REASONING[6:], "</think>", CONTENT])
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Capital of France?"}]}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": thought}
    streamed = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}})
    last = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")][-1]
    assert last["usage"] == {k: v for k, v in whole["usage"].items() if v is not None}  # chunks leave nulls out
    for response in (_post(server, input="Capital?").json(), _events(server, input="Capital?")[-1]["response"]):
        assert response["usage"]["output_tokens_details"] == {"reasoning_tokens": thought}
    scripted(None)  # no --reasoning-parser: no details, as vLLM
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
    assert plain["usage"].get("completion_tokens_details") is None


@pytest.mark.parametrize("stream", [False, True])
def test_a_constrained_reply_may_think_first(server, scripted, stream):  # noqa: F811
    """With a reasoning parser the constraint starts after </think> (the engine's after_token_ids,
    tests/test_structured_output.py), and the reply splits as any other."""
    requests = scripted("qwen3", ["<think>", "Which format?", "</think>", '{"a": 1}'])
    choice = _chat(server, stream, response_format={"type": "json_object"})
    assert (choice["message"]["reasoning"], choice["message"]["content"]) == ("Which format?", '{"a": 1}')
    constraint = requests[-1].structured_outputs
    assert constraint.json_object and constraint.after_token_ids == server.ctx.tokenizer.encode(
        "</think>", add_special_tokens=False)
    requests = scripted(None, ['{"a": 1}'])
    _chat(server, stream, response_format={"type": "json_object"})
    assert requests[-1].structured_outputs.after_token_ids is None


def test_mistral_tool_calls_keep_special_tokens(server, scripted, monkeypatch):  # noqa: F811
    """--tool-call-parser mistral (no reasoning parser): the request keeps special tokens, so the
    [TOOL_CALLS] marker reaches the parser; ids are Mistral's 9 alphanumerics."""
    monkeypatch.setattr(server.ctx, "tool_call_parser", "mistral")
    requests = scripted(None, ["Checking.", "[TOOL_CALLS]", 'get_time{"zone": ', '"UTC"}'])
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in RESPONSES_TOOLS]
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Time?"}], "tools": tools}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
    message = reply["choices"][0]["message"]
    assert message["content"] == "Checking." and reply["choices"][0]["finish_reason"] == "tool_calls"
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert len(call["id"]) == 9 and call["id"].isalnum()
    assert requests[-1].skip_special_tokens is False
    _chat(server, False, tools=tools, tool_choice="none")
    assert requests[-1].skip_special_tokens is True


def test_thinking_token_budget_over_http(server, monkeypatch):  # noqa: F811
    """thinking_token_budget through /v1/completions: a 400 naming the flags while the engine has
    no reasoning markers; with deepseek_r1's, a prompt that opened `<think>` gets the free run's
    first `budget` tokens, then `</think>`'s tokens, in the ids and in the text."""
    tokenizer = server.ctx.tokenizer
    start = tokenizer.encode(START, add_special_tokens=False)
    body = {"model": MODEL_NAME, "prompt": tokenizer.encode("Is it so?", add_special_tokens=False) + start,
            "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    def complete(**fields):
        return httpx.post(server.url + "/v1/completions", json={**body, **fields}, headers=AUTH, timeout=60)

    refused = complete(thinking_token_budget=3)
    assert refused.status_code == 400, refused.text
    assert "--reasoning-parser" in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "thinking_token_budget"
    markers = reasoning_tokens("deepseek_r1", None, tokenizer)
    monkeypatch.setattr(server.engine.engine, "reasoning_tokens", markers)
    free = complete().json()["choices"][0]
    limited = complete(thinking_token_budget=3).json()["choices"][0]
    end = list(markers.end)
    assert limited["token_ids"][:3 + len(end)] == free["token_ids"][:3] + end
    assert limited["text"].startswith(tokenizer.decode(free["token_ids"][:3]) + END)
