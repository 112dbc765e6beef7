"""POST /v1/responses: OpenAI's Responses API, served over the chat path.

`instructions` and the `input` items become chat messages, function `tools` and `text.format` the
chat request's tools and response_format; rendering, the tool plan, validation and the engine
stream are ChatJob's. The reply is a `response` object whose `output` holds a `message` item
(the text, with logprobs when `include` asks for them) and one `function_call` item per parsed
tool call; `status` is "incomplete" when max_output_tokens cut it short. Streamed, the reply is
the Responses event sequence (`response.created`, `response.in_progress`, per item
`output_item.added` ... `output_item.done`, then `response.completed`), each SSE event named by
its type and numbered by `sequence_number`, without a `[DONE]` line.

By default, as in vLLM without VLLM_ENABLE_RESPONSES_API_STORE, nothing is stored: `store` is
accepted and ignored, `previous_response_id` and GET /v1/responses/{id} answer 404, and the
client sends the whole conversation in `input`. With --enable-responses-store the server keeps its
last replies (serving/response_store.py): `previous_response_id` continues one's conversation (its
input and output, not its instructions), GET returns it and DELETE forgets it; `background: true`
stores the response "queued" and returns it at once, the request runs on, GET polls it
("in_progress", then its end) and cancel ends it "cancelled" (not streamed: a 400).
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, Literal

from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.outputs import RequestOutput
from serving.chat import ChatJob, render_generate_request
from serving.context import ServingContext
from serving.errors import APIError, validation_error
from serving.protocol import ChatCompletionRequest, SamplingFields
from serving.response_store import ResponseStore, StoredResponse
from serving.streaming import CLIENT_CLOSED_REQUEST, prepend, start_stream, unless_disconnected

logger = logging.getLogger("jpaged.serve")

OUTPUT_LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for logprobs
_TEXT_PART_TYPES = ("input_text", "output_text", "text")
_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
# Chat request fields named in ChatJob's errors, by their name in a Responses request.
_RESPONSES_PARAM = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                    "max_tokens": "max_output_tokens", "response_format": "text", "logprobs": "include"}
# SamplingFields that a Responses request does not have, with the value that means "not set".
_NOT_RESPONSES_FIELDS = {"n": 1, "stream_options": None, "prompt_logprobs": None, "return_token_ids": False}


class ResponsesRequest(SamplingFields):
    """POST /v1/responses: OpenAI's fields, plus vLLM's sampling extras (SamplingFields)."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0)  # with include OUTPUT_LOGPROBS; at most --max-logprobs
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    truncation: Literal["auto", "disabled"] = "disabled"  # auto: drop the oldest tokens to fit
    metadata: dict[str, str] | None = None
    reasoning: dict[str, Any] | None = None  # echoed; its `effort` reaches the chat template as chat's reasoning_effort
    service_tier: str = "auto"
    max_tool_calls: int | None = None
    store: bool = True  # kept for previous_response_id, with --enable-responses-store
    background: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None  # a stored prompt template
    # vLLM extras
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # with --reasoning-parser: false leaves the reasoning item out

    def check_supported(self, store: ResponseStore | None) -> None:
        """400 for what this server does not do or is not a Responses field; as vLLM words it where
        vLLM refuses the same. `store`: the server's (background mode keeps its replies there)."""
        self.check_unsupported_extras()
        for name, unset in _NOT_RESPONSES_FIELDS.items():
            if getattr(self, name) != unset:
                raise APIError(f"{name} is not a field of the Responses API; use /v1/chat/completions "
                               "or /v1/completions for it.", param=name)
        if self.prompt is not None:
            raise APIError("prompt template is not supported", param="prompt")
        if self.background and store is None:
            raise APIError("This server does not store responses and therefore does not support the "
                           "background mode; start it with --enable-responses-store.", param="background")
        if self.background and not self.store:
            raise APIError("The background mode needs store: true (its reply is fetched later).", param="background")
        if self.background and self.stream:
            raise APIError("This server does not stream background responses; send stream false and poll "
                           "GET /v1/responses/{id}.", param="stream")
        if self.conversation is not None:
            raise APIError("This server keeps no conversations; send the whole conversation in `input`, "
                           "or continue a stored response with previous_response_id.", param="conversation")

    def wants_logprobs(self) -> bool:
        return OUTPUT_LOGPROBS in (self.include or [])

    def effective_tool_choice(self) -> str | dict[str, Any]:
        """vLLM's rule: "auto" without tools is "none"."""
        return "none" if not self.tools and self.tool_choice == "auto" else self.tool_choice

    def to_chat_request(self, conversation: list[dict[str, Any]], continue_final: bool) -> ChatCompletionRequest:
        """The chat request for `conversation` (chat messages: the history, then the input) after
        this request's instructions; 400 APIError naming the Responses field."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += conversation
        fields = self.model_dump(include=set(SamplingFields.model_fields) - set(_NOT_RESPONSES_FIELDS),
                                 exclude_unset=True)
        fields.update(messages=messages, max_completion_tokens=self.max_output_tokens,
                      tools=_chat_tools(self.tools), tool_choice=_chat_tool_choice(self.effective_tool_choice()),
                      parallel_tool_calls=self.parallel_tool_calls, response_format=_response_format(self.text),
                      logprobs=self.wants_logprobs(), chat_template_kwargs=self.chat_template_kwargs,
                      include_reasoning=self.include_reasoning, reasoning_effort=(self.reasoning or {}).get("effort"),
                      continue_final_message=continue_final, add_generation_prompt=not continue_final)
        if self.wants_logprobs():
            fields["top_logprobs"] = self.top_logprobs or 0
        if self.truncation == "auto" and self.truncate_prompt_tokens is None:
            fields["truncate_prompt_tokens"] = -1
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as exc:
            raise validation_error(exc) from None


def response_not_found(response_id: str, store: ResponseStore | None, param: str) -> APIError:
    hint = (f"This server keeps its last {store.capacity} responses." if store is not None else
            "This server does not store responses (see --enable-responses-store); send the whole "
            "conversation in `input`.")
    return APIError(f"Response with id '{response_id}' not found. {hint}", status_code=HTTPStatus.NOT_FOUND,
                    param=param)


def _text_content(content: Any, where: str) -> str | list[dict[str, str]]:
    """The content at `where` as chat content: a string, or text parts (joined one per line when
    rendered, as chat's are)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where} must be a string or a list of text parts.", param="input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise APIError(f"{where}[{j}] of type {kind!r} is not supported: the served model reads "
                           f"text parts ({', '.join(_TEXT_PART_TYPES)}) only.", param="input")
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _required_str(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(f"{where} needs a string '{key}'.", param="input")
    return value


def input_messages(items: str | list[dict[str, Any]]) -> tuple[list[dict], bool]:
    """(chat messages, continue_final_message) of a request's `input` (or a response's `output`).

    A string is one user message. Items: `message` (user, system, developer or assistant; text
    content), `function_call` (joined to the assistant turn before it, as that turn's
    tool_calls), `function_call_output` (a tool message) and `reasoning` (left out: the served
    models read no reasoning back). A last assistant message whose status is "in_progress" or
    "incomplete" is continued rather than answered (vLLM's rule).
    """
    messages: list[dict[str, Any]] = []
    if isinstance(items, str):
        return [{"role": "user", "content": items}], False
    if not items:
        raise APIError("input is an empty list: send at least one item.", param="input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(f"{where} must be an object.", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise APIError(f"{where}.role must be one of {', '.join(_MESSAGE_ROLES)}; got {role!r}.",
                               param="input")
            messages.append({"role": role, "content": _text_content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _required_str(item, "call_id", where), "type": "function",
                    "function": {"name": _required_str(item, "name", where),
                                 "arguments": _required_str(item, "arguments", where)}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _required_str(item, "call_id", where),
                             "content": _text_content(item.get("output"), f"{where}.output")})
        elif kind != "reasoning":
            raise APIError(f"{where} of type {kind!r} is not supported; send message, function_call and "
                           "function_call_output items.", param="input")
    last = items[-1]
    continue_final = (last.get("type", "message") == "message" and last.get("role") == "assistant"
                      and last.get("status") in ("in_progress", "incomplete"))
    return messages, continue_final


def _chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Responses function tools ({"type": "function", "name", "parameters", ...}) in chat's shape."""
    chat_tools = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise APIError(f"tools[{i}] of type {kind!r} is not supported: this server calls function tools "
                           "only.", param="tools")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise APIError(f"tools[{i}] needs a 'name'.", param="tools")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                    if tool.get(key) is not None}
        chat_tools.append({"type": "function", "function": function})
    return chat_tools or None


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}.",
                   param="tool_choice")


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's response_format (whose rules then apply)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise APIError("text.format must be an object with a 'type'.", param="text")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), (dict, bool)):
            raise APIError("text.format of type 'json_schema' needs a 'schema' (a JSON schema object).",
                           param="text")
        return {"type": "json_schema", "json_schema": {key: fmt.get(key) for key in ("name", "schema", "strict")}}
    return {"type": fmt.get("type")}


def _status(finish_reason: str | None) -> str:
    """The response's status: max_output_tokens (or the context) cut it short, or the server
    aborted it (shutdown), or it ended."""
    return {"length": "incomplete", "abort": "cancelled"}.get(finish_reason, "completed")


def _item_status(status: str) -> str:
    """An output item's status in a response with `status`: items are never "cancelled"."""
    return "completed" if status == "completed" else "incomplete"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(text: str, logprobs: list[dict]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _message_item(item_id: str, status: str, parts: list[dict]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": parts}


def _reasoning_item(item_id: str, status: str, parts: list[dict]) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": parts, "status": status}


def _reasoning_part(text: str) -> dict[str, str]:
    return {"type": "reasoning_text", "text": text}


def _function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


async def create_response(request: Request) -> Response:
    arrival_time = time.time()
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, ResponsesRequest)
    model_name = ctx.check_model(body.model)
    ctx.check_ready()
    body.check_supported(ctx.responses_store)
    job = _ResponseJob(ctx, body, model_name, arrival_time)
    if body.background:
        return job.start_in_background()
    return await (job.stream(request) if body.stream else job.complete(request))


async def render_response(request: Request) -> Response:
    """POST /v1/responses/render (--enable-scale-out, vLLM's): the /inference/v1/generate request a
    Responses request becomes, under its response id; stateless, so previous_response_id is a 400
    (vLLM's message)."""
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, ResponsesRequest)
    ctx.check_model(body.model)
    body.check_supported(ctx.responses_store)
    if body.previous_response_id is not None:
        raise APIError("previous_response_id is not supported by the stateless render endpoint.",
                       param="previous_response_id")
    try:
        messages, continue_final = input_messages(body.input)
        return JSONResponse(render_generate_request(ctx, body.to_chat_request(messages, continue_final),
                                                    body.request_id or _new_id("resp"), prompt_param="input"))
    except APIError as exc:
        exc.param = _RESPONSES_PARAM.get(exc.param, exc.param)
        raise


def _stored(request: Request) -> tuple[ResponseStore, StoredResponse]:
    """The server's store and the response the path names; 404 when it is not stored."""
    store = request.app.state.ctx.responses_store
    response_id = request.path_params["response_id"]
    stored = None if store is None else store.get(response_id)
    if stored is None:
        raise response_not_found(response_id, store, param="response_id")
    return store, stored


async def retrieve_response(request: Request) -> Response:
    """GET /v1/responses/{response_id}: the stored response object; 404 when not stored."""
    _, stored = _stored(request)
    return JSONResponse(stored.response)


async def delete_response(request: Request) -> Response:
    """DELETE /v1/responses/{response_id}: forgets a stored response (OpenAI's reply shape); a
    background one still running is cancelled first."""
    store, stored = _stored(request)
    response_id = stored.response["id"]
    store.delete(response_id)
    await _cancel(store, response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(request: Request) -> Response:
    """POST /v1/responses/{response_id}/cancel: a background response still queued or running ends
    "cancelled" (returned as stored then); any other stored one is a 400 (vLLM's answer), an
    unknown id a 404."""
    store, stored = _stored(request)
    response_id = stored.response["id"]
    if not await _cancel(store, response_id):
        raise APIError("Cannot cancel a synchronous response.", param="response_id")
    return JSONResponse(store.get(response_id).response)


async def _cancel(store: ResponseStore, response_id: str) -> bool:
    """Cancels the background run of `response_id` and waits for it to end; False when none runs."""
    task = store.running.get(response_id)
    if task is None:
        return False
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return True


def _previous_conversation(store: ResponseStore | None, response_id: str | None) -> list[dict[str, Any]]:
    """The chat messages a stored response answered, then its output as the assistant's turn."""
    if response_id is None:
        return []
    stored = None if store is None else store.get(response_id)
    if stored is None:
        raise response_not_found(response_id, store, param="previous_response_id")
    output = [item for item in stored.response["output"] if item["type"] != "message" or item["content"]]
    return [*stored.messages, *(input_messages(output)[0] if output else [])]


class _ResponseJob:
    """One validated Responses request: its chat job and the response object around it."""

    def __init__(self, ctx: ServingContext, body: ResponsesRequest, model_name: str, arrival_time: float):
        self.body, self.model_name = body, model_name
        self.id = body.request_id or _new_id("resp")  # vLLM's: the client's request_id is the response's id
        self.created_at = int(time.time())
        self.store = ctx.responses_store if body.store else None
        if body.request_id is not None and ctx.responses_store is not None and (
                ctx.responses_store.get(body.request_id) is not None or body.request_id in ctx.responses_store.running):
            raise APIError(f"A response with id {body.request_id!r} is already stored; pick another request_id.",
                           param="request_id")
        try:
            new_messages, continue_final = input_messages(body.input)
            self.conversation = _previous_conversation(ctx.responses_store, body.previous_response_id) + new_messages
            self.chat = ChatJob(ctx, body.to_chat_request(self.conversation, continue_final), model_name,
                                arrival_time, request_id=self.id, prompt_param="input",
                                client_request_id=body.request_id)
        except APIError as exc:
            exc.param = _RESPONSES_PARAM.get(exc.param, exc.param)
            raise
        params = self.chat.params
        self.max_output_tokens = (params.max_tokens if params.max_tokens is not None
                                  else ctx.max_model_len - len(self.chat.prompt_ids))

    def _logprobs(self, completion) -> list[dict]:
        logprobs = self.chat.logprobs(completion)
        return [] if logprobs is None else [entry.model_dump() for entry in logprobs.content]

    def _response(self, status: str, output: list[dict], usage: dict | None) -> dict[str, Any]:
        """The `response` object; its settings as the engine runs them (vLLM's fields)."""
        body, params = self.body, self.chat.params
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": body.max_tool_calls, "model": self.model_name, "output": output,
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning, "service_tier": body.service_tier, "store": self.store is not None,
            "temperature": params.temperature, "top_p": params.top_p,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
            "text": body.text or {"format": {"type": "text"}}, "tool_choice": body.effective_tool_choice(),
            "tools": body.tools, "top_logprobs": self.chat.num_top, "truncation": body.truncation,
            "usage": usage, "user": body.user, "metadata": body.metadata, "background": body.background,
        }

    def _usage(self, output_token_ids: list[int], cached_tokens: int) -> dict[str, Any]:
        input_tokens, output_tokens = len(self.chat.prompt_ids), len(output_token_ids)
        reasoning_tokens = self.chat.reasoning_tokens([output_token_ids]) or 0
        return {"input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
                "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": input_tokens + output_tokens}

    async def complete(self, request: Request) -> Response:
        completed, final = await unless_disconnected(request, self.chat.final_output())
        if not completed:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(self._reply(final))

    def start_in_background(self) -> Response:
        """Background mode: stores the response "queued" and returns it; a task runs the request
        and stores its end: the reply, "cancelled" (cancel, DELETE, shutdown) or "failed"."""
        queued = self._response("queued", [], None)
        self.store.put(queued, self.conversation)
        task = asyncio.create_task(self._run_in_background(), name=f"background {self.id}")
        self.store.running[self.id] = task
        task.add_done_callback(lambda _: self.store.running.pop(self.id, None))
        return JSONResponse(queued)

    async def _run_in_background(self) -> None:
        self._store_if_kept(self._response("in_progress", [], None))
        try:
            self._reply(await self.chat.final_output())
        except asyncio.CancelledError:
            self._store_if_kept(self._response("cancelled", [], None))
            raise
        except Exception as exc:  # the engine's error (an APIError) or a bug: this response failed
            if not isinstance(exc, APIError):
                logger.exception("background response %s failed", self.id)
            failed = self._response("failed", [], None)
            invalid = isinstance(exc, APIError) and exc.status_code < 500  # OpenAI's error codes:
            failed["error"] = {"code": "invalid_prompt" if invalid else "server_error", "message": str(exc)}
            self._store_if_kept(failed)

    def _store_if_kept(self, response: dict[str, Any]) -> None:
        """Replaces the stored response, unless it was deleted (or dropped as the oldest) meanwhile."""
        if self.store.get(self.id) is not None:
            self.store.put(response, self.conversation)

    def _reply(self, final: RequestOutput) -> dict[str, Any]:
        """The finished response object of the engine's last output (stored when it asks to be)."""
        completion = final.outputs[0]
        status = _status(completion.finish_reason)
        reasoning, content = self.chat.split_reasoning(completion.text)
        calls = []
        if self.chat.tool_plan is not None:
            content, calls, _ = self.chat.tool_plan.message(content, completion.finish_reason)
        output = []
        if reasoning and self.body.include_reasoning:
            output.append(_reasoning_item(_new_id("rs"), _item_status(status), [_reasoning_part(reasoning)]))
        if content:
            parts = [_text_part(content, self._logprobs(completion))]
            output.append(_message_item(_new_id("msg"), _item_status(status), parts))
        output += [_function_call_item(_new_id("fc"), call.id, call.function.name, call.function.arguments,
                                       "completed") for call in calls]
        if not output:  # an empty reply is one empty message, as a streamed one is
            output.append(_message_item(_new_id("msg"), _item_status(status), []))
        usage = self._usage(completion.token_ids, final.num_cached_tokens)
        return self._finished(status, output, usage)

    def _finished(self, status: str, output: list[dict], usage: dict) -> dict[str, Any]:
        """The final response object, stored when the request asked for it and the server keeps some."""
        response = self._response(status, output, usage)
        if self.store is not None:
            self.store.put(response, self.conversation)
        return response

    async def stream(self, request: Request) -> Response:
        return await start_stream(request, self.chat.outputs, self._events)

    async def _events(self, first: RequestOutput) -> AsyncIterator[str]:
        events = _OutputEvents()
        yield events.emit("response.created", response=self._response("in_progress", [], None))
        yield events.emit("response.in_progress", response=self._response("in_progress", [], None))
        stream = self.chat.reply_stream()
        output_token_ids, cached, status = [], first.num_cached_tokens, "completed"
        pending_logprobs: list[dict] = []  # of tokens whose text the tool parser holds back
        try:
            async for output in prepend(first, self.chat.outputs):
                cached = output.num_cached_tokens
                completion = output.outputs[0]
                output_token_ids += completion.token_ids
                if completion.finish_reason is not None:
                    status = _status(completion.finish_reason)
                pending_logprobs += self._logprobs(completion)
                reasoning, content, calls = stream.feed(completion.text, final=completion.finish_reason is not None)
                if reasoning and self.body.include_reasoning:
                    for event in events.reasoning(reasoning):
                        yield event
                if content:
                    for event in events.text(content, pending_logprobs):
                        yield event
                    pending_logprobs = []
                for call in calls or []:
                    for event in events.tool_call(call.id, call.function):
                        yield event
            for event in events.finish(_item_status(status)):
                yield event
            usage = self._usage(output_token_ids, cached)
            yield events.emit("response.completed", response=self._finished(status, events.output, usage))
        except APIError as exc:
            yield events.emit("error", code=exc.code, message=exc.message, param=exc.param)
        finally:
            await self.chat.outputs.aclose()


class _OutputEvents:
    """Builds a streamed response's output items from text and tool-call deltas, and the SSE
    events that announce them: the open item (a message or a function call) is closed when the
    other kind starts and at the end."""

    def __init__(self):
        self.sequence_number = 0
        self.output: list[dict] = []  # closed items
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text_so_far = ""
        self.logprobs: list[dict] = []

    def emit(self, event_type: str, **fields) -> str:
        payload = {"type": event_type, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {event_type}\ndata: {json.dumps(payload)}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"output_index": len(self.output), "item_id": self.open["id"]}

    def _open_message(self) -> list[str]:
        self.open = _message_item(_new_id("msg"), "in_progress", [])
        self.text_so_far, self.logprobs = "", []
        return [self.emit("response.output_item.added", output_index=len(self.output), item=self.open),
                self.emit("response.content_part.added", **self._where(), content_index=0,
                          part=_text_part("", []))]

    def reasoning(self, delta: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "reasoning":
            events += self.close()
            self.open, self.text_so_far = _reasoning_item(_new_id("rs"), "in_progress", []), ""
            events += [self.emit("response.output_item.added", output_index=len(self.output), item=self.open),
                       self.emit("response.content_part.added", **self._where(), content_index=0,
                                 part=_reasoning_part(""))]
        self.text_so_far += delta
        events.append(self.emit("response.reasoning_text.delta", **self._where(), content_index=0, delta=delta))
        return events

    def text(self, delta: str, logprobs: list[dict]) -> list[str]:
        events = [] if self.open is not None and self.open["type"] == "message" else self.close() + self._open_message()
        self.text_so_far += delta
        self.logprobs += logprobs
        # Streamed logprobs carry no bytes (OpenAI's delta event shape).
        streamed = [{"token": lp["token"], "logprob": lp["logprob"],
                     "top_logprobs": [{"token": top["token"], "logprob": top["logprob"]} for top in lp["top_logprobs"]]}
                    for lp in logprobs]
        events.append(self.emit("response.output_text.delta", **self._where(), content_index=0, delta=delta,
                                logprobs=streamed))
        return events

    def tool_call(self, call_id: str | None, function) -> list[str]:
        events = []
        if call_id is not None:  # a new call
            events += self.close()
            self.open = _function_call_item(_new_id("fc"), call_id, function.name, "", "in_progress")
            events.append(self.emit("response.output_item.added", output_index=len(self.output), item=self.open))
        if function.arguments:
            self.open["arguments"] += function.arguments
            events.append(self.emit("response.function_call_arguments.delta", **self._where(),
                                    delta=function.arguments))
        return events

    def close(self, status: str = "completed") -> list[str]:
        item, events = self.open, []
        if item is None:
            return events
        if item["type"] == "message":
            part = _text_part(self.text_so_far, self.logprobs)
            events += [self.emit("response.output_text.done", **self._where(), content_index=0,
                                 text=self.text_so_far, logprobs=[]),
                       self.emit("response.content_part.done", **self._where(), content_index=0, part=part)]
            item = _message_item(item["id"], status, [part])
        elif item["type"] == "reasoning":
            part = _reasoning_part(self.text_so_far)
            events += [self.emit("response.reasoning_text.done", **self._where(), content_index=0,
                                 text=self.text_so_far),
                       self.emit("response.content_part.done", **self._where(), content_index=0, part=part)]
            item = _reasoning_item(item["id"], status, [part])
        else:
            events.append(self.emit("response.function_call_arguments.done", **self._where(),
                                    name=item["name"], arguments=item["arguments"]))
            item = {**item, "status": status}
        events.append(self.emit("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        self.open = None
        return events

    def finish(self, status: str) -> list[str]:
        """Closes the last item with `status` (an item status); a reply with no item at all gets an
        empty message, as a whole one does."""
        if self.open is None and not self.output:
            self.open = _message_item(_new_id("msg"), "in_progress", [])
            added = self.emit("response.output_item.added", output_index=0, item=self.open)
            self.output.append(_message_item(self.open["id"], status, []))
            done = self.emit("response.output_item.done", output_index=0, item=self.output[0])
            self.open = None
            return [added, done]
        return self.close(status)
