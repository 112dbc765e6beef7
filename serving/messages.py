"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, served over the chat path.

The request becomes a chat request (as vLLM serves it): `system` is a system message; a user
turn's `tool_result` blocks become tool messages and an assistant turn's `tool_use` blocks its
tool_calls; `thinking` blocks sent back are left out (the served models read no reasoning back).
A conversation that ends with an assistant turn is continued, not answered: Anthropic's prefill,
the reply holding only the continuation. Client tools (`input_schema`) become chat functions,
`tool_choice` auto / any / tool / none chat's auto / required / named / none (the chat route's
rules and flags then apply), `output_config.format` a JSON-schema response_format, and
`thinking: {"type": "disabled"}` the chat template's `enable_thinking: false`, and `{"type":
"enabled", "budget_tokens": B}` a thinking_token_budget of B (vLLM's; the server needs
--reasoning-parser or --reasoning-config for it).

The reply is a `message`: a `thinking` block (with --reasoning-parser), a `text` block and one
`tool_use` block per parsed call; `stop_reason` is end_turn, max_tokens, stop_sequence (with the
string) or tool_use. Streamed, it is Anthropic's event sequence: `message_start`, per block
`content_block_start`, its deltas (`text_delta`, `thinking_delta`, `input_json_delta`) and
`content_block_stop`, then `message_delta` (stop reason, usage) and `message_stop`. Errors,
before or during a stream, are Anthropic's `{"type": "error", "error": {"type", "message"}}`.
"""

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.outputs import RequestOutput
from serving.chat import ChatJob, chat_reply_id, render_chat_prompt, render_generate_request, shows_tools
from serving.context import ServingContext
from serving.errors import APIError, validation_error
from serving.protocol import ChatCompletionRequest, DeltaToolCall, SamplingFields
from serving.streaming import CLIENT_CLOSED_REQUEST, prepend, start_stream, unless_disconnected

logger = logging.getLogger("jpaged.serve")

# Anthropic's error type for each status this server answers with.
_ERROR_TYPES = {HTTPStatus.BAD_REQUEST: "invalid_request_error", HTTPStatus.UNAUTHORIZED: "authentication_error",
                HTTPStatus.FORBIDDEN: "permission_error", HTTPStatus.NOT_FOUND: "not_found_error",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "request_too_large",
                HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error", HTTPStatus.SERVICE_UNAVAILABLE: "overloaded_error"}
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # and {"type": "tool", "name": ...}
# SamplingFields that a Messages request does not have, with the value that means "not set".
_NOT_MESSAGES_FIELDS = {"n": 1, "stop": None, "stream_options": None, "prompt_logprobs": None,
                        "return_token_ids": False}
_NOT_MESSAGES_FIELDS_HINTS = {"stop": "; send stop_sequences", "n": "; send one request per reply"}


class Message(BaseModel):
    """One turn of `messages`: text, or content blocks (checked by chat_messages)."""

    role: Literal["user", "assistant", "system"]  # "system" in messages: vLLM's extension
    content: str | list[dict[str, Any]]


class MessagesRequest(SamplingFields):
    """POST /v1/messages: Anthropic's fields (model, temperature, top_p, top_k, stream are
    SamplingFields'), plus vLLM's sampling extras and `chat_template_kwargs`. Anthropic's other
    fields (metadata, service_tier, cache_control, ...) are ignored, with a warning naming them."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    # vLLM extras
    chat_template_kwargs: dict[str, Any] | None = None

    def to_chat_request(self) -> ChatCompletionRequest:
        """The chat request this one is served as; 400 APIError for what cannot be served."""
        self.check_unsupported_extras()
        for name, unset in _NOT_MESSAGES_FIELDS.items():
            if getattr(self, name) != unset:
                hint = _NOT_MESSAGES_FIELDS_HINTS.get(name, "")
                raise APIError(f"{name} is not a field of the Messages API{hint}.", param=name)
        messages, continue_final = chat_messages(self.system, self.messages)
        template_kwargs = dict(self.chat_template_kwargs or {})
        thinking = _thinking_type(self.thinking, self.max_tokens)
        if thinking == "disabled":
            template_kwargs.setdefault("enable_thinking", False)
        fields = self.model_dump(include=set(SamplingFields.model_fields) - set(_NOT_MESSAGES_FIELDS),
                                 exclude_unset=True)
        fields.update(messages=messages, max_tokens=self.max_tokens, stop=self.stop_sequences,
                      tools=_chat_tools(self.tools), response_format=_response_format(self.output_config),
                      chat_template_kwargs=template_kwargs or None, continue_final_message=continue_final,
                      add_generation_prompt=not continue_final)
        if self.tool_choice is not None:
            fields["tool_choice"], fields["parallel_tool_calls"] = _chat_tool_choice(self.tool_choice)
        if thinking == "enabled":  # vLLM's: enforced as thinking_token_budget (needs --reasoning-parser)
            fields["thinking_token_budget"] = self.thinking["budget_tokens"]
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as exc:
            raise validation_error(exc) from None


class CountTokensRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: a Messages request without max_tokens."""

    max_tokens: int | None = None


def _thinking_type(thinking: dict[str, Any] | None, max_tokens: int | None) -> str | None:
    """The thinking setting's type; 400 for a malformed one (Anthropic's budget rules)."""
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise APIError("thinking.type must be 'enabled', 'disabled' or 'adaptive'.", param="thinking")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            raise APIError("thinking.budget_tokens must be an integer of at least 1024.", param="thinking")
        if max_tokens is not None and budget >= max_tokens:
            raise APIError("thinking.budget_tokens must be less than max_tokens", param="thinking")
    return kind


def _text(block: dict[str, Any], where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise APIError(f"{where} needs a string 'text'.", param="messages")
    return block["text"]


def _blocks_text(content: Any, where: str) -> str:
    """`system` or a tool_result's content (a string or text blocks) as one string."""
    if isinstance(content, str) or content is None:
        return content or ""
    if not isinstance(content, list):
        raise APIError(f"{where} must be a string or a list of text blocks.", param="messages")
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise APIError(f"{where}[{j}] of type {kind!r} is not supported: the served model reads text blocks "
                           "only.", param="messages")
        texts.append(_text(block, f"{where}[{j}]"))
    return "\n".join(texts)


def chat_messages(system: str | list[dict[str, Any]] | None, messages: list[Message]) -> tuple[list[dict], bool]:
    """(chat messages, continue_final_message) of a request's `system` and `messages`."""
    chat: list[dict[str, Any]] = []
    if system:
        chat.append({"role": "system", "content": _blocks_text(system, "system")})
    for i, message in enumerate(messages):
        where = f"messages[{i}].content"
        if isinstance(message.content, str):
            chat.append({"role": message.role, "content": message.content})
            continue
        texts, calls = [], []
        for j, block in enumerate(message.content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(_text(block, f"{where}[{j}]"))
            elif kind == "tool_use" and message.role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                        or not isinstance(block.get("input"), dict):
                    raise APIError(f"{where}[{j}] needs a string 'id' and 'name' and an object 'input'.",
                                   param="messages")
                calls.append({"id": block["id"], "type": "function",
                              "function": {"name": block["name"], "arguments": json.dumps(block["input"])}})
            elif kind == "tool_result" and message.role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise APIError(f"{where}[{j}] needs a string 'tool_use_id'.", param="messages")
                chat.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                             "content": _blocks_text(block.get("content"), f"{where}[{j}].content")})
            elif kind not in ("thinking", "redacted_thinking") or message.role != "assistant":
                raise APIError(f"{where}[{j}] of type {kind!r} is not supported in a {message.role} message: the "
                               "served model reads text, tool_use (assistant) and tool_result (user) blocks.",
                               param="messages")
        if texts or calls:
            turn: dict[str, Any] = {"role": message.role, "content": "\n".join(texts) if texts else None}
            if calls:
                turn["tool_calls"] = calls
            chat.append(turn)
    continue_final = messages[-1].role == "assistant" and bool(chat) and chat[-1]["role"] == "assistant"
    return chat, continue_final


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Client tools ({"name", "description", "input_schema"}) in chat's function shape."""
    chat_tools = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise APIError(f"tools[{i}] of type {kind!r} is not supported: this server calls client tools "
                           "(with an input_schema) only.", param="tools")
        if not isinstance(tool.get("name"), str) or not tool["name"] or not isinstance(tool.get("input_schema"), dict):
            raise APIError(f"tools[{i}] needs a 'name' and an 'input_schema' object.", param="tools")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        chat_tools.append({"type": "function", "function": function})
    return chat_tools or None


def _chat_tool_choice(choice: dict[str, Any]) -> tuple[str | dict[str, Any], bool]:
    """(chat tool_choice, parallel_tool_calls) of an Anthropic tool_choice."""
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind in _TOOL_CHOICES:
        return _TOOL_CHOICES[kind], parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise APIError("tool_choice must be {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}.",
                   param="tool_choice")


def _response_format(output_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """`output_config.format` ({"type": "json_schema", "schema"}) as chat's response_format."""
    fmt = (output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise APIError("output_config.format must be {'type': 'json_schema', 'schema': {...}}.", param="output_config")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(_error_body(exc), status_code=exc.status_code)


def _error_body(exc: APIError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(exc.status_code, "api_error" if exc.status_code >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def _sse(event_type: str, **fields) -> str:
    return f"event: {event_type}\ndata: {json.dumps({'type': event_type, **fields})}\n\n"


def _tool_input(arguments: str, request_id: str) -> dict[str, Any]:
    """A parsed call's arguments as tool_use `input`, which must be an object."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        logger.warning("request %s: a tool call's arguments are not a JSON object; its input is {}", request_id)
        return {}
    return value


async def create_message(request: Request) -> Response:
    arrival_time = time.time()
    ctx: ServingContext = request.app.state.ctx
    try:
        body = await ctx.read_body(request, MessagesRequest)
        model_name = ctx.check_model(body.model)
        ctx.check_ready()
        client_request_id = ctx.client_request_id(request, body.request_id)
        job = _MessageJob(ctx, body, model_name, arrival_time, f"msg_{client_request_id or uuid.uuid4().hex}",
                          client_request_id)
        return await (job.stream(request) if body.stream else job.complete(request))
    except APIError as exc:
        return _error_response(exc)


async def render_message(request: Request) -> JSONResponse:
    """POST /v1/messages/render (--enable-scale-out, vLLM's): the GenerateRequest a Messages
    request becomes, through the chat request it is served as (errors in OpenAI's shape, as
    vLLM's render routes answer)."""
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, MessagesRequest)
    ctx.check_model(body.model)
    return JSONResponse(render_generate_request(ctx, body.to_chat_request(),
                                                chat_reply_id(ctx.client_request_id(request, body.request_id))))


async def count_message_tokens(request: Request) -> Response:
    """The prompt tokens a Messages request would take: `{"input_tokens": n}`."""
    ctx: ServingContext = request.app.state.ctx
    try:
        body = await ctx.read_body(request, CountTokensRequest)
        ctx.check_model(body.model)
        chat = body.to_chat_request()
        template_kwargs = chat.template_kwargs(ctx.default_chat_template_kwargs)
        if shows_tools(ctx, chat):
            template_kwargs["tools"] = chat.tools
        prompt = render_chat_prompt(ctx, chat.messages, chat.add_generation_prompt, None, template_kwargs,
                                    chat.continue_final_message)
    except APIError as exc:
        return _error_response(exc)
    return JSONResponse({"input_tokens": len(ctx.tokenizer.encode(prompt, add_special_tokens=False))})


class _MessageJob:
    """One Messages request: its chat job, and the reply in Anthropic's shapes."""

    def __init__(self, ctx: ServingContext, body: MessagesRequest, model_name: str, arrival_time: float,
                 message_id: str, client_request_id: str | None):
        self.ctx, self.model_name, self.id = ctx, model_name, message_id
        self.chat = ChatJob(ctx, body.to_chat_request(), model_name, arrival_time, request_id=message_id,
                            client_request_id=client_request_id)

    def _usage(self, output_tokens: int, cached_tokens: int) -> dict[str, int]:
        """Anthropic's usage: input_tokens leaves out the prompt-cache hits, which
        cache_read_input_tokens counts (shown with --enable-prompt-tokens-details, as vLLM's)."""
        input_tokens = len(self.chat.prompt_ids)
        if self.ctx.prompt_tokens_details(cached_tokens) is None:
            return {"input_tokens": input_tokens, "output_tokens": output_tokens}
        return {"input_tokens": input_tokens - cached_tokens, "cache_read_input_tokens": cached_tokens,
                "output_tokens": output_tokens}

    @staticmethod
    def _stop(finish_reason: str | None, stop_reason: int | str | None, called: bool) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence); None for a request the server aborted (shutdown). A
        request's max_tokens fits the context (else it is a 400), so "length" is max_tokens."""
        if finish_reason == "length":
            return "max_tokens", None
        if finish_reason == "abort":
            return None, None
        if finish_reason == "repetition":  # repetition_detection ended a looping reply
            return "end_turn", None
        if called:
            return "tool_use", None
        if isinstance(stop_reason, str):
            return "stop_sequence", stop_reason
        return "end_turn", None

    def _message(self, content: list[dict], stop: tuple[str | None, str | None], usage: dict) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_name, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    async def complete(self, request: Request) -> Response:
        completed, final = await unless_disconnected(request, self.chat.final_output())
        if not completed:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        completion = final.outputs[0]
        reasoning, text = self.chat.split_reasoning(completion.text)
        calls = []
        if self.chat.tool_plan is not None:
            text, calls, _ = self.chat.tool_plan.message(text, completion.finish_reason)
        content = []
        if reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if text:
            content.append({"type": "text", "text": text})
        content += [{"type": "tool_use", "id": call.id, "name": call.function.name,
                     "input": _tool_input(call.function.arguments, self.id)} for call in calls]
        stop = self._stop(completion.finish_reason, completion.stop_reason, bool(calls))
        usage = self._usage(len(completion.token_ids), final.num_cached_tokens)
        return JSONResponse(self._message(content or [{"type": "text", "text": ""}], stop, usage))

    async def stream(self, request: Request) -> Response:
        return await start_stream(request, self.chat.outputs, self._events)

    async def _events(self, first: RequestOutput) -> AsyncIterator[str]:
        yield _sse("message_start", message=self._message([], (None, None), self._usage(0, first.num_cached_tokens)))
        blocks = _ContentBlocks()
        stream = self.chat.reply_stream()
        output_tokens, cached, finish_reason, stop_reason = 0, first.num_cached_tokens, None, None
        try:
            async for output in prepend(first, self.chat.outputs):
                completion = output.outputs[0]
                cached, output_tokens = output.num_cached_tokens, output_tokens + len(completion.token_ids)
                finish_reason, stop_reason = completion.finish_reason, completion.stop_reason
                reasoning, text, calls = stream.feed(completion.text, final=finish_reason is not None)
                for event in blocks.thinking(reasoning) + blocks.text(text) + blocks.tool_calls(calls):
                    yield event
            for event in blocks.finish():
                yield event
            stop = self._stop(finish_reason, stop_reason, stream.called)
            yield _sse("message_delta", delta={"stop_reason": stop[0], "stop_sequence": stop[1]},
                       usage=self._usage(output_tokens, cached))
            yield _sse("message_stop")
        except APIError as exc:
            yield _sse("error", error=_error_body(exc)["error"])
        finally:
            await self.chat.outputs.aclose()


class _ContentBlocks:
    """A streamed message's content blocks and the events that announce them: the open block (a
    thinking, text or tool_use block) is closed when another starts and at the end."""

    def __init__(self):
        self.index = -1
        self.open: str | None = None  # the open block's type

    def _start(self, block: dict[str, Any]) -> list[str]:
        events = self._stop()
        self.index += 1
        self.open = block["type"]
        return events + [_sse("content_block_start", index=self.index, content_block=block)]

    def _stop(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_sse("content_block_stop", index=self.index)]

    def _delta(self, **delta) -> str:
        return _sse("content_block_delta", index=self.index, delta=delta)

    def thinking(self, delta: str | None) -> list[str]:
        if not delta:
            return []
        events = [] if self.open == "thinking" else self._start({"type": "thinking", "thinking": "", "signature": ""})
        return events + [self._delta(type="thinking_delta", thinking=delta)]

    def text(self, delta: str | None) -> list[str]:
        if not delta:
            return []
        events = [] if self.open == "text" else self._start({"type": "text", "text": ""})
        return events + [self._delta(type="text_delta", text=delta)]

    def tool_calls(self, calls: list[DeltaToolCall] | None) -> list[str]:
        events = []
        for call in calls or []:
            if call.id is not None:  # a new call: its block starts with an empty input
                events += self._start({"type": "tool_use", "id": call.id, "name": call.function.name, "input": {}})
            if call.function.arguments:
                events.append(self._delta(type="input_json_delta", partial_json=call.function.arguments))
        return events

    def finish(self) -> list[str]:
        """Closes the last block; a reply without any gets one empty text block, as a whole one does."""
        if self.index < 0:
            return self._start({"type": "text", "text": ""}) + self._stop()
        return self._stop()
