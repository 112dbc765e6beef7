"""POST /v1/chat/completions: messages rendered with the model's chat template, streamed or not."""

import time
import uuid
from collections.abc import AsyncIterator

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jpaged.sampling_params import RequestOutputKind
from serving.context import ServingContext
from serving.errors import APIError
from serving.logprobs import chat_logprobs
from serving.protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionRequest,
                              ChatCompletionResponse, ChatDelta, ChatResponseMessage,
                              ChatStreamChoice, PromptTokensDetails, UsageInfo)
from serving.streaming import SSE_DONE, prepend, sse_error, sse_event, unless_disconnected


def render_chat_prompt(ctx: ServingContext, messages, add_generation_prompt: bool,
                       chat_template: str | None, chat_template_kwargs: dict | None) -> str:
    """The conversation as prompt text; a template that fails to render is a 400.

    `chat_template` from a request is refused unless the server trusts request templates: the
    tokenizer also accepts file paths, which would let a client read the server's files.
    """
    if chat_template is not None and not ctx.trust_request_chat_template:
        raise APIError("This server does not accept chat templates in requests; start it with "
                       "--trust-request-chat-template, or set one for all requests with "
                       "--chat-template.", param="chat_template")
    try:
        return ctx.tokenizer.apply_chat_template(
            [m.to_template_message() for m in messages], add_generation_prompt=add_generation_prompt,
            chat_template=chat_template, **(chat_template_kwargs or {}))
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise APIError(f"The chat template could not render these messages: {exc}",
                       param="messages") from None


def _check_request(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise APIError("tools are not supported by this server.", param="tools")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise APIError("response_format other than {'type': 'text'} is not supported.",
                       param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options can only be set when stream is true.", param="stream_options")


def _usage(num_prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=num_prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


async def create_chat_completion(request: Request) -> Response:
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, ChatCompletionRequest)
    ctx.check_model(body.model)
    ctx.check_ready()
    _check_request(body)
    prompt = render_chat_prompt(ctx, body.messages, body.add_generation_prompt, body.chat_template,
                                body.chat_template_kwargs)
    prompt_ids = ctx.tokenizer.encode(prompt, add_special_tokens=body.add_special_tokens)
    ctx.check_prompt_tokens(prompt_ids, "messages")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = ctx.resolve_max_tokens(len(prompt_ids), requested, "messages")
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
    params = body.to_sampling_params(max_tokens=max_tokens, logprobs=num_top, prompt_logprobs=None,
                                     vocab_size=ctx.tokenizer.vocab_size, output_kind=kind)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = ctx.served_model_name
    outputs = ctx.generate(prompt_ids, params, request_id)

    def logprobs_of(completion):
        if num_top is None:
            return None
        return chat_logprobs(completion.token_ids, completion.logprobs, num_top, ctx.tokenizer)

    if not body.stream:
        async def last(stream):
            final = None
            async for final in stream:
                pass
            return final

        completed, final = await unless_disconnected(request, last(outputs))
        if not completed:
            return Response(status_code=499)
        choices = [ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                        logprobs=logprobs_of(c), finish_reason=c.finish_reason,
                                        stop_reason=c.stop_reason)
                   for c in sorted(final.outputs, key=lambda c: c.index)]
        usage = _usage(len(prompt_ids), sum(len(c.token_ids) for c in final.outputs),
                       final.num_cached_tokens)
        response = ChatCompletionResponse(id=request_id, created=created, model=model,
                                          choices=choices, usage=usage)
        return JSONResponse(response.model_dump(mode="json"))

    # Streaming: wait for the first output so an invalid request still gets a 400.
    completed, first = await unless_disconnected(request, anext(outputs))
    if not completed:
        await outputs.aclose()
        return Response(status_code=499)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(choices, usage=None) -> str:
        return sse_event(ChatCompletionChunk(id=request_id, created=created, model=model,
                                             choices=choices, usage=usage))

    async def events() -> AsyncIterator[str]:
        completion_tokens = cached = 0
        try:
            for i in range(body.n):
                yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            async for output in prepend(first, outputs):
                cached = output.num_cached_tokens
                for c in output.outputs:
                    if not (c.text or c.token_ids or c.finish_reason):
                        continue
                    completion_tokens += len(c.token_ids)
                    yield chunk([ChatStreamChoice(index=c.index, delta=ChatDelta(content=c.text),
                                                  logprobs=logprobs_of(c), finish_reason=c.finish_reason,
                                                  stop_reason=c.stop_reason)])
            if include_usage:
                yield chunk([], _usage(len(prompt_ids), completion_tokens, cached))
        except APIError as exc:
            yield sse_error(exc)
        finally:
            await outputs.aclose()
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")
