"""POST /v1/completions: text or token-id prompts (one or a batch), streamed or not."""

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jpaged.outputs import RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingParams
from serving.context import ServingContext
from serving.errors import APIError
from serving.logprobs import completion_logprobs
from serving.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                              CompletionResponse, PromptTokensDetails, UsageInfo)
from serving.streaming import (SSE_DONE, merge_async_iterators, prepend, sse_error, sse_event,
                               unless_disconnected)


def _prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of single prompts (text or token ids)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class _Prompt:
    """One prompt of the batch: its text (for echo) and token ids."""

    def __init__(self, ctx: ServingContext, prompt: str | list[int], add_special_tokens: bool):
        if isinstance(prompt, str):
            self.token_ids = ctx.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            self.text = prompt
        else:
            self.token_ids = list(prompt)
            self.text = ctx.tokenizer.decode(self.token_ids, skip_special_tokens=False)
        ctx.check_prompt_tokens(self.token_ids, "prompt")


def _check_request(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError("suffix is not supported.", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(f"best_of={body.best_of} is not supported; leave it unset or equal to n "
                       f"({body.n}).", param="best_of")
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options can only be set when stream is true.", param="stream_options")
    if not body.prompt:
        raise APIError("The prompt is empty.", param="prompt")


def _sampling_params(ctx: ServingContext, body: CompletionRequest, prompt: _Prompt,
                     output_kind: RequestOutputKind) -> SamplingParams:
    max_tokens = ctx.resolve_max_tokens(len(prompt.token_ids), body.max_tokens, "prompt")
    return body.to_sampling_params(
        max_tokens=max_tokens, logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
        vocab_size=ctx.tokenizer.vocab_size, output_kind=output_kind)


class _Choice:
    """Formats one (prompt, sample) pair's output pieces into OpenAI choices."""

    def __init__(self, ctx: ServingContext, body: CompletionRequest, prompt: _Prompt, index: int):
        self.ctx, self.body, self.prompt, self.index = ctx, body, prompt, index
        self.chars_sent = 0  # text_offset of the next piece
        self.echo_pending = body.echo

    def piece(self, output: RequestOutput, text: str, token_ids: list[int], steps,
              finish_reason, stop_reason) -> CompletionChoice:
        logprobs = None
        if self.echo_pending:
            self.echo_pending = False
            text = self.prompt.text + text
            if self.body.logprobs is not None:
                logprobs = completion_logprobs(self.prompt.token_ids, output.prompt_logprobs,
                                               self.body.logprobs, self.ctx.tokenizer, 0)
        if self.body.logprobs is not None:
            offset = self.chars_sent + (len(self.prompt.text) if logprobs is not None else 0)
            generated = completion_logprobs(token_ids, steps, self.body.logprobs,
                                            self.ctx.tokenizer, offset)
            logprobs = _concat(logprobs, generated)
        self.chars_sent += len(text)
        return CompletionChoice(index=self.index, text=text, logprobs=logprobs,
                                finish_reason=finish_reason, stop_reason=stop_reason)


def _concat(first: CompletionLogprobs | None, second: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return second
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


def _usage(prompts: list[_Prompt], completion_tokens: int, cached_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


async def create_completion(request: Request) -> Response:
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, CompletionRequest)
    ctx.check_model(body.model)
    ctx.check_ready()
    _check_request(body)
    prompts = [_Prompt(ctx, p, body.add_special_tokens) for p in _prompt_list(body.prompt)]
    kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
    params = [_sampling_params(ctx, body, p, kind) for p in prompts]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = ctx.served_model_name
    choices = [[_Choice(ctx, body, p, i * body.n + j) for j in range(body.n)]
               for i, p in enumerate(prompts)]
    streams = merge_async_iterators([
        ctx.generate(p.token_ids, sp, f"{request_id}-{i}")
        for i, (p, sp) in enumerate(zip(prompts, params))])

    if not body.stream:
        async def collect() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(prompts)
            async for i, output in streams:
                finals[i] = output
            return finals

        completed, finals = await unless_disconnected(request, collect())
        if not completed:
            return Response(status_code=499)
        out_choices, completion_tokens = [], 0
        for i, final in enumerate(finals):
            for c in final.outputs:
                out_choices.append(choices[i][c.index].piece(
                    final, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason))
                completion_tokens += len(c.token_ids)
        out_choices.sort(key=lambda choice: choice.index)
        cached = sum(f.num_cached_tokens for f in finals)
        response = CompletionResponse(id=request_id, created=created, model=model,
                                      choices=out_choices,
                                      usage=_usage(prompts, completion_tokens, cached))
        return JSONResponse(response.model_dump(mode="json"))

    # Streaming: wait for the first output so an invalid request still gets a 400.
    completed, first = await unless_disconnected(request, anext(streams))
    if not completed:
        await streams.aclose()
        return Response(status_code=499)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        completion_tokens = 0
        cached = [0] * len(prompts)
        try:
            async for i, output in prepend(first, streams):
                cached[i] = output.num_cached_tokens
                for c in output.outputs:
                    if not (c.text or c.token_ids or c.finish_reason):
                        continue
                    completion_tokens += len(c.token_ids)
                    piece = choices[i][c.index].piece(output, c.text, c.token_ids, c.logprobs,
                                                      c.finish_reason, c.stop_reason)
                    yield sse_event(CompletionResponse(id=request_id, created=created, model=model,
                                                       choices=[piece]))
            if include_usage:
                usage = _usage(prompts, completion_tokens, sum(cached))
                yield sse_event(CompletionResponse(id=request_id, created=created, model=model,
                                                   choices=[], usage=usage))
        except APIError as exc:
            yield sse_error(exc)
        finally:
            await streams.aclose()
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")
