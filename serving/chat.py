"""POST /v1/chat/completions: messages rendered with the model's chat template, streamed or not."""

import time
import uuid
from collections.abc import AsyncIterator

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import RequestOutputKind
from jpaged.tokenizer import message_text
from serving.context import ServingContext
from serving.errors import APIError
from serving.generate_tokens import generate_request
from serving.logprobs import chat_logprobs, prompt_logprobs
from serving.protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionRequest,
                              ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatResponseMessage,
                              ChatStreamChoice, CompletionTokensDetails, DeltaToolCall,
                              UsageInfo)
from serving.reasoning_parsers import (END, ReasoningStream, ThinkReasoningParser, reasoning_parser_for,
                                      reasoning_token_count)
from serving.streaming import (CLIENT_CLOSED_REQUEST, SSE_DONE, prepend, sse_error, sse_event, start_stream,
                               unless_disconnected)
from serving.tool_calls import ToolCallStream, ToolPlan, chat_constraint, plan_tools


def render_chat_prompt(ctx: ServingContext, messages, add_generation_prompt: bool,
                       chat_template: str | None, chat_template_kwargs: dict | None,
                       continue_final_message: bool = False) -> str:
    """The conversation as prompt text; a template that fails to render is a 400.

    `chat_template` from a request is refused unless the server trusts request templates: the
    tokenizer also accepts file paths, which would let a client read the server's files.
    `continue_final_message`: the last message is left open (no end-of-turn) for the model to go on.
    Message content reaches the template as --chat-template-content-format says.
    """
    if chat_template is not None and not ctx.trust_request_chat_template:
        raise APIError("This server does not accept chat templates in requests; start it with "
                       "--trust-request-chat-template, or set one for all requests with "
                       "--chat-template.", param="chat_template")
    if continue_final_message and add_generation_prompt:
        raise APIError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                       param="continue_final_message")
    kwargs = dict(chat_template_kwargs or {})
    if continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        return ctx.tokenizer.apply_chat_template(
            [m.to_template_message() for m in messages], add_generation_prompt=add_generation_prompt,
            chat_template=chat_template, content_format=ctx.chat_template_content_format, **kwargs)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise APIError(f"The chat template could not render these messages: {exc}",
                       param="messages") from None


def shows_tools(ctx: ServingContext, body: ChatCompletionRequest) -> bool:
    """Whether the prompt renders the request's tools: unless there are none, or tool_choice is
    "none" under --exclude-tools-when-tool-choice-none."""
    return bool(body.tools) and not (body.tool_choice == "none" and ctx.exclude_tools_when_tool_choice_none)


def _check_request(body: ChatCompletionRequest) -> None:
    body.check_unsupported_extras()
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
    if body.logprob_token_ids and not body.logprobs:
        raise APIError("when using `logprob_token_ids`, `logprobs` must be set to true.", param="logprob_token_ids")
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options can only be set when stream is true.", param="stream_options")
    body.check_prompt_logprobs()


async def create_chat_completion(request: Request) -> Response:
    arrival_time = time.time()
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, ChatCompletionRequest)
    model_name = ctx.check_model(body.model)
    ctx.check_ready()
    _check_request(body)
    job = ChatJob(ctx, body, model_name, arrival_time,
                  client_request_id=ctx.client_request_id(request, body.request_id))
    return await (job.stream(request) if body.stream else job.complete(request))


async def render_chat_completion(request: Request) -> JSONResponse:
    """POST /v1/chat/completions/render (--enable-scale-out, vLLM's): the GenerateRequest this chat
    request becomes for /inference/v1/generate (the reply's tool calls and reasoning are then the
    client's to parse)."""
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, ChatCompletionRequest)
    ctx.check_model(body.model)
    _check_request(body)
    reply_id = chat_reply_id(ctx.client_request_id(request, body.request_id))
    return JSONResponse(render_generate_request(ctx, body, reply_id))


def chat_reply_id(client_request_id: str | None) -> str:
    """A chat completion's id: `chatcmpl-` and the id the client named, or a new one."""
    return f"chatcmpl-{client_request_id or uuid.uuid4().hex}"


def render_generate_request(ctx: ServingContext, body: ChatCompletionRequest, request_id: str,
                            prompt_param: str = "messages") -> dict:
    """The GenerateRequest JSON of a chat request, under `request_id` (its checks run as when it
    is served; `prompt_param`: the field a prompt over the context is blamed on)."""
    if body.use_beam_search:
        raise APIError("Beam search is not supported by the render endpoint.", param="use_beam_search")
    rendered = ChatPrompt(ctx, body)
    ctx.validate(rendered.prompt_ids, rendered.params, prompt_param)
    return generate_request(ctx, request_id, rendered.prompt_ids, rendered.params, body)


class ChatPrompt:
    """A chat request rendered for the engine: its prompt's token ids and SamplingParams, and the
    tool plan and reasoning parser its reply is read with (what ChatJob runs, and what
    /v1/chat/completions/render returns)."""

    def __init__(self, ctx: ServingContext, body: ChatCompletionRequest):
        self.tool_plan = plan_tools(body, enable_auto_tool_choice=ctx.enable_auto_tool_choice,
                                    tool_call_parser=ctx.tool_call_parser)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = ctx.generation_defaults.get("max_tokens")
        self.num_top = (body.top_logprobs or 0) if body.logprobs else None
        self.params = params = body.to_sampling_params(
            max_tokens=max_tokens, logprobs=self.num_top, prompt_logprobs=body.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY,
            defaults=ctx.generation_defaults)
        params.structured_outputs = chat_constraint(body, self.tool_plan)
        if self.tool_plan is not None and self.tool_plan.keeps_special_tokens:
            params.skip_special_tokens = False  # the parser's call marker is a special token (vLLM's)
        template_kwargs = body.template_kwargs(ctx.default_chat_template_kwargs)
        self.reasoning_parser = reasoning_parser_for(ctx.reasoning_parser, template_kwargs)
        if params.structured_outputs is not None and self.reasoning_parser is not None:
            # vLLM's order: the model thinks freely, the constraint applies after `</think>`
            params.structured_outputs.after_token_ids = ctx.tokenizer.encode(END, add_special_tokens=False)
        ctx.check_limits(params, logprobs_param="top_logprobs")  # before the template renders
        if shows_tools(ctx, body):
            template_kwargs["tools"] = self.tool_plan.tools
        prompt = render_chat_prompt(ctx, body.messages, body.add_generation_prompt, body.chat_template,
                                    template_kwargs, body.continue_final_message)
        prompt_ids = ctx.tokenizer.encode(prompt, add_special_tokens=body.add_special_tokens)
        self.prompt_ids = ctx.truncate_prompt(prompt_ids, body.truncate_prompt_tokens, body.truncation_side)


class ChatJob:
    """One validated chat request: the rendered prompt and its engine stream (also what
    /v1/responses and /v1/messages run; serving/responses.py and serving/messages.py shape their
    replies)."""

    def __init__(self, ctx: ServingContext, body: ChatCompletionRequest, model_name: str, arrival_time: float,
                 request_id: str | None = None, prompt_param: str = "messages", client_request_id: str | None = None):
        """`request_id`: the reply's id (default: `chatcmpl-` and `client_request_id`, the id the
        client named, or a new one); `prompt_param`: the field a prompt over the context is blamed on."""
        self.ctx, self.body, self.model_name = ctx, body, model_name
        rendered = ChatPrompt(ctx, body)
        self.tool_plan, self.reasoning_parser = rendered.tool_plan, rendered.reasoning_parser
        self.num_top, self.prompt_ids = rendered.num_top, rendered.prompt_ids
        self.params = params = rendered.params
        self.role = body.reply_role(ctx.response_role)
        last = body.messages[-1]
        # echo: the reply repeats the last message first when it is the reply's own role (vLLM's rule).
        echoes = body.echo and last.role == self.role
        self.echoed = message_text(last.to_template_message()["content"]) if echoes else ""
        self.request_id = request_id or chat_reply_id(client_request_id)
        engine_id = ctx.engine_request_id(self.request_id, client_request_id)
        self.as_token_ids = (ctx.return_tokens_as_token_ids if body.return_tokens_as_token_ids is None
                             else body.return_tokens_as_token_ids)
        self.created = int(time.time())
        if body.use_beam_search:
            # max_tokens unset: up to the context (a prompt over it is the validator's 400)
            beam_params = body.to_beam_search_params(
                max_tokens=params.max_tokens or max(ctx.max_model_len - len(self.prompt_ids), 1),
                defaults=ctx.generation_defaults)
            if params.structured_outputs is not None:  # what the fields left: tool_choice required/named
                raise APIError(f"tool_choice {body.tool_choice!r} cannot be used with use_beam_search: it "
                               "constrains the reply, and beam search ranks unconstrained beams.",
                               param="tool_choice")
            ctx.validate(self.prompt_ids, beam_params, prompt_param)
            self.outputs = ctx.beam_search(self.prompt_ids, beam_params, engine_id, arrival_time,
                                           ctx.lora_request(model_name), body.priority, body.cache_salt,
                                           reply_id=self.request_id)
        else:
            ctx.validate(self.prompt_ids, params, prompt_param)
            self.outputs = ctx.generate(self.prompt_ids, params, engine_id, arrival_time,
                                        ctx.lora_request(model_name), body.priority, body.cache_salt,
                                        reply_id=self.request_id)

    def logprobs(self, completion: CompletionOutput) -> ChatLogprobs | None:
        if self.num_top is None:
            return None
        num_top = None if self.params.logprob_token_ids else self.num_top
        return chat_logprobs(completion.token_ids, completion.logprobs, num_top, self.ctx.tokenizer,
                             self.as_token_ids)

    def split_reasoning(self, text: str) -> tuple[str | None, str]:
        """(reasoning, the rest) of a finished reply; reasoning None without a reasoning parser."""
        if self.reasoning_parser is None:
            return None, text
        reasoning, content = self.reasoning_parser.split(text, final=True)
        return reasoning, content or ""

    def reply_stream(self) -> "ReplyStream":
        """A new stream of one choice's text through this request's parsers."""
        return ReplyStream(self.reasoning_parser, self.tool_plan)

    def reasoning_tokens(self, replies: list[list[int]]) -> int | None:
        """The replies' (token ids) reasoning tokens, for usage; None when the server has no
        reasoning parser (vLLM then leaves the details out)."""
        if self.ctx.reasoning_parser is None:
            return None
        if self.reasoning_parser is None:
            return 0
        return sum(reasoning_token_count(self.reasoning_parser, self.ctx.tokenizer, ids) for ids in replies)

    def _usage(self, completion_tokens: int, cached_tokens: int, reasoning_tokens: int | None = None) -> UsageInfo:
        prompt_tokens = len(self.prompt_ids)
        details = None if reasoning_tokens is None else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=self.ctx.prompt_tokens_details(cached_tokens),
                         completion_tokens_details=details)

    async def final_output(self) -> RequestOutput:
        """The engine stream's last output (a FINAL_ONLY request's only one)."""
        async for final in self.outputs:
            pass
        return final

    async def complete(self, request: Request) -> Response:
        completed, final = await unless_disconnected(request, self.final_output())
        if not completed:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            reasoning, text = self.split_reasoning(c.text)
            content, tool_calls, finish_reason = text, [], c.finish_reason
            if self.tool_plan is not None:
                content, tool_calls, finish_reason = self.tool_plan.message(text, c.finish_reason)
            if self.echoed:
                content = self.echoed + (content or "")
            if reasoning is not None and not content:
                content = None  # vLLM's: a reply that is all reasoning has null content
            message = ChatResponseMessage(role=self.role, content=content, tool_calls=tool_calls,
                                          reasoning=reasoning if self.body.include_reasoning else None)
            choices.append(ChatCompletionChoice(
                index=c.index, message=message,
                logprobs=self.logprobs(c), finish_reason=finish_reason, stop_reason=c.stop_reason,
                token_ids=list(c.token_ids) if self.body.return_token_ids else None))
        usage = self._usage(sum(len(c.token_ids) for c in final.outputs), final.num_cached_tokens,
                            self.reasoning_tokens([c.token_ids for c in final.outputs]))
        response = ChatCompletionResponse(id=self.request_id, created=self.created,
                                          model=self.model_name, choices=choices, usage=usage,
                                          prompt_logprobs=prompt_logprobs(final.prompt_logprobs),
                                          prompt_token_ids=self.prompt_ids if self.body.return_token_ids else None)
        return JSONResponse(response.model_dump(mode="json"))

    async def stream(self, request: Request) -> Response:
        return await start_stream(request, self.outputs, self._events, self.ctx.sse_keep_alive_interval,
                                  lambda exc: [sse_error(exc), SSE_DONE])

    def _chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None,
               prompt_token_ids: list[int] | None = None) -> str:
        return sse_event(ChatCompletionChunk(id=self.request_id, created=self.created,
                                             model=self.model_name, choices=choices,
                                             usage=usage, prompt_token_ids=prompt_token_ids))

    async def _events(self, first: RequestOutput) -> AsyncIterator[str]:
        options = self.body.stream_options
        include_usage = self.ctx.include_usage(options)
        continuous_usage = include_usage and options is not None and options.continuous_usage_stats
        return_token_ids = self.body.return_token_ids
        cached = first.num_cached_tokens
        tokens_per_choice = [0] * self.body.n
        replies: list[list[int]] = [[] for _ in range(self.body.n)]  # token ids, for the reasoning count

        def usage_so_far(i: int) -> UsageInfo | None:
            return self._usage(tokens_per_choice[i], cached) if continuous_usage else None

        reply_streams = [self.reply_stream() for _ in range(self.body.n)]
        try:
            for i in range(self.body.n):
                yield self._chunk([ChatStreamChoice(index=i, delta=ChatDelta(role=self.role, content=""))],
                                  usage_so_far(i), self.prompt_ids if return_token_ids and i == 0 else None)
            if self.echoed:
                for i in range(self.body.n):
                    yield self._chunk([ChatStreamChoice(index=i, delta=ChatDelta(content=self.echoed))],
                                      usage_so_far(i))
            async for output in prepend(first, self.outputs):
                cached = output.num_cached_tokens
                for c in output.outputs:
                    if c.text or c.token_ids or c.finish_reason:
                        tokens_per_choice[c.index] += len(c.token_ids)
                        replies[c.index] += c.token_ids
                        stream, finish_reason = reply_streams[c.index], c.finish_reason
                        reasoning, content, tool_calls = stream.feed(c.text, final=finish_reason is not None)
                        delta = ChatDelta(content=content, tool_calls=tool_calls,
                                          reasoning=reasoning if self.body.include_reasoning else None)
                        if stream.called and finish_reason == "stop" and self.tool_plan.mode != "named":
                            finish_reason = "tool_calls"
                        held_back = (delta.content is None and delta.reasoning is None and delta.tool_calls is None
                                     and finish_reason is None)
                        if held_back and self.num_top is None and not return_token_ids:
                            continue  # a parser holds this text back: nothing to send yet
                        yield self._chunk([ChatStreamChoice(
                            index=c.index, delta=delta, logprobs=self.logprobs(c),
                            finish_reason=finish_reason, stop_reason=c.stop_reason,
                            token_ids=list(c.token_ids) if return_token_ids else None)], usage_so_far(c.index))
            if include_usage:
                yield self._chunk([], self._usage(sum(tokens_per_choice), cached, self.reasoning_tokens(replies)))
        except APIError as exc:
            yield sse_error(exc)
        finally:
            await self.outputs.aclose()
        yield SSE_DONE


class ReplyStream:
    """One streamed choice through a request's parsers: the reasoning parser splits off the
    thinking, then the tool-call parser reads the rest. Either may be absent."""

    def __init__(self, reasoning_parser: ThinkReasoningParser | None, tool_plan: ToolPlan | None):
        self.reasoning = None if reasoning_parser is None else ReasoningStream(reasoning_parser)
        self.tools = None if tool_plan is None else ToolCallStream(tool_plan)

    @property
    def called(self) -> bool:
        """Tool calls were sent."""
        return self.tools is not None and self.tools.called

    def feed(self, new_text: str, final: bool) -> tuple[str | None, str | None, list[DeltaToolCall] | None]:
        """(reasoning, content, tool_calls) deltas after `new_text`; None where there is nothing
        to send (content is `new_text` itself when no parser holds it)."""
        reasoning, content, calls = None, new_text, None
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(new_text, final)
        if self.tools is not None:
            content, calls = self.tools.feed(content or "", final)
        return reasoning, content, calls
