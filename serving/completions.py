"""POST /v1/completions: text or token-id prompts (one or a batch), streamed or not."""

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingParams
from serving.context import ServingContext
from serving.errors import APIError
from serving.generate_tokens import generate_request
from serving.logprobs import completion_logprobs, prompt_logprobs
from serving.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                              CompletionResponse, UsageInfo)
from serving.streaming import (CLIENT_CLOSED_REQUEST, SSE_DONE, merge_async_iterators, prepend, sse_error,
                               sse_event, start_stream, unless_disconnected)
from serving.structured_outputs import structured_outputs_from_request


def _prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of single prompts (text or token ids)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class _Prompt:
    """One prompt of the batch: its token ids, and its text for echo (decoded only once the ids
    passed the engine's checks: a negative or huge id would crash the tokenizer)."""

    def __init__(self, ctx: ServingContext, prompt: str | list[int], body: CompletionRequest):
        self.given_text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            token_ids = ctx.tokenizer.encode(prompt, add_special_tokens=body.add_special_tokens)
        else:
            token_ids = list(prompt)
            ctx.check_token_ids(token_ids, "prompt")
        self.token_ids = ctx.truncate_prompt(token_ids, body.truncate_prompt_tokens, body.truncation_side)
        self.text = ""

    def decode_for_echo(self, ctx: ServingContext, truncated: bool) -> None:
        if self.given_text is not None and not truncated:
            self.text = self.given_text
        else:
            self.text = ctx.tokenizer.decode(self.token_ids, skip_special_tokens=False)


def _check_request(body: CompletionRequest) -> None:
    body.check_unsupported_extras()
    if body.suffix:
        raise APIError("suffix is not supported.", param="suffix")
    if body.best_of is not None and body.best_of < body.n:
        raise APIError(f"best_of must be greater than or equal to n, got n={body.n} and best_of={body.best_of}.",
                       param="best_of")
    if body.best_of is not None and body.best_of > body.n and body.stream:
        raise APIError("best_of > n cannot be streamed: the best samples are known only at the end. "
                       "Set stream to false or best_of to n.", param="best_of")
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options can only be set when stream is true.", param="stream_options")
    if not body.prompt:
        raise APIError("The prompt is empty.", param="prompt")
    if body.max_tokens == 0 and not body.echo:
        raise APIError("max_tokens must be at least 1, got 0 (0 is for scoring a prompt with echo).",
                       param="max_tokens")
    body.check_prompt_logprobs()
    if body.use_beam_search:
        if body.stream:
            raise APIError("Streaming is not currently supported with beam search.", param="stream")
        if body.echo and body.logprobs is not None:
            raise APIError("`echo` with `logprobs` is not supported with beam search because beam search does "
                           "not compute prompt logprobs.", param="echo")
        if body.best_of is not None and body.best_of > body.n:
            raise APIError("best_of cannot be used with use_beam_search: n is the beam width.", param="best_of")


def _sampling_params(ctx: ServingContext, body: CompletionRequest, output_kind: RequestOutputKind) -> SamplingParams:
    """The request's SamplingParams. With best_of > n the engine samples best_of sequences with
    their logprobs (for the ranking); the response keeps the n most likely."""
    best_of = body.best_of if body.best_of is not None and body.best_of > body.n else None
    logprobs = body.logprobs
    if best_of is not None and logprobs is None:
        logprobs = 0  # the sampled tokens' logprobs: cumulative_logprob ranks the samples
    max_tokens = body.max_tokens
    if "max_tokens" not in body.model_fields_set:  # OpenAI's default of 16, unless generation_config has one
        max_tokens = ctx.generation_defaults.get("max_tokens", max_tokens)
    if max_tokens == 0:
        max_tokens = 1  # echo without generation (vLLM's): one token is sampled, none is returned
    prompt_top = body.prompt_logprobs
    if prompt_top is None and body.echo:
        prompt_top = body.logprobs  # echo's logprobs start with the prompt's (vLLM's rule)
    params = body.to_sampling_params(
        max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_top,
        output_kind=output_kind, defaults=ctx.generation_defaults, n=best_of)
    params.structured_outputs = structured_outputs_from_request(body)
    return params


def _best(outputs: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The n samples of highest cumulative logprob (ties: lowest index), re-indexed 0..n-1."""
    ranked = sorted(outputs, key=lambda c: (-(c.cumulative_logprob or 0.0), c.index))[:n]
    return [dataclasses.replace(c, index=i) for i, c in enumerate(ranked)]


class _Choice:
    """Formats one (prompt, sample) pair's output pieces into OpenAI choices."""

    def __init__(self, ctx: ServingContext, body: CompletionRequest, prompt: _Prompt, index: int):
        self.ctx, self.body, self.prompt, self.index = ctx, body, prompt, index
        self.chars_sent = 0  # text_offset of the next piece
        self.num_tokens = 0  # tokens streamed so far
        self.echo_pending = body.echo
        self.echo_only = body.echo and body.max_tokens == 0  # score the prompt, return no token
        self.prompt_ids_pending = body.return_token_ids  # the prompt's ids go with the first piece
        self.as_token_ids = (ctx.return_tokens_as_token_ids if body.return_tokens_as_token_ids is None
                             else body.return_tokens_as_token_ids)

    def piece(self, output: RequestOutput, completion: CompletionOutput) -> CompletionChoice:
        """The choice for `completion`'s text (all of it, or the new part when streaming)."""
        if self.echo_only:
            completion = dataclasses.replace(completion, text="", token_ids=[], logprobs=[])
        text, logprobs = completion.text, None
        if self.echo_pending:
            self.echo_pending = False
            text = self.prompt.text + text
            if self.body.logprobs is not None:
                logprobs = completion_logprobs(self.prompt.token_ids, output.prompt_logprobs,
                                               self.body.logprobs, self.ctx.tokenizer, 0, self.as_token_ids)
        if self.body.logprobs is not None:
            offset = self.chars_sent + (len(self.prompt.text) if logprobs is not None else 0)
            num_top = None if self.body.logprob_token_ids else self.body.logprobs  # vLLM's: all the listed ones
            generated = completion_logprobs(completion.token_ids, completion.logprobs,
                                            num_top, self.ctx.tokenizer, offset, self.as_token_ids)
            logprobs = _concat(logprobs, generated)
        self.chars_sent += len(text)
        prompt_token_ids = self.prompt.token_ids if self.prompt_ids_pending else None
        self.prompt_ids_pending = False
        return CompletionChoice(index=self.index, text=text, logprobs=logprobs,
                                finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason, prompt_token_ids=prompt_token_ids,
                                token_ids=list(completion.token_ids) if self.body.return_token_ids else None)


def _concat(first: CompletionLogprobs | None, second: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return second
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


def _usage(ctx: ServingContext, prompts: list[_Prompt], completion_tokens: int, cached_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=ctx.prompt_tokens_details(cached_tokens))


async def create_completion(request: Request) -> Response:
    arrival_time = time.time()
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, CompletionRequest)
    model_name = ctx.check_model(body.model)
    ctx.check_ready()
    _check_request(body)
    job = _CompletionJob(ctx, body, model_name, arrival_time, ctx.client_request_id(request, body.request_id))
    return await (job.stream(request) if body.stream else job.complete(request))


async def render_completion(request: Request) -> JSONResponse:
    """POST /v1/completions/render (--enable-scale-out, vLLM's): one GenerateRequest per prompt
    for /inference/v1/generate (ids cmpl-<id>, or cmpl-<id>-<i> for several prompts)."""
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, CompletionRequest)
    ctx.check_model(body.model)
    _check_request(body)
    for name, used in (("use_beam_search", body.use_beam_search), ("echo", body.echo),
                       ("best_of", body.best_of is not None and body.best_of > body.n)):
        if used:
            raise APIError(f"{name} is not supported by the render endpoint.", param=name)
    params = _sampling_params(ctx, body, RequestOutputKind.FINAL_ONLY)
    ctx.check_limits(params)
    prompts = _prompt_list(body.prompt)
    ctx.check_num_prompts(len(prompts))
    rendered = [_Prompt(ctx, p, body) for p in prompts]
    for prompt in rendered:
        ctx.validate(prompt.token_ids, params, "prompt")
    base = f"cmpl-{ctx.client_request_id(request, body.request_id) or uuid.uuid4().hex}"
    return JSONResponse([generate_request(ctx, base if len(rendered) == 1 else f"{base}-{i}", prompt.token_ids,
                                          params, body) for i, prompt in enumerate(rendered)])


class _CompletionJob:
    """One validated completions request: its prompts' engine streams, merged."""

    def __init__(self, ctx: ServingContext, body: CompletionRequest, model_name: str, arrival_time: float,
                 client_request_id: str | None):
        self.ctx, self.body, self.model_name = ctx, body, model_name
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        params = _sampling_params(ctx, body, kind)
        ctx.check_limits(params)  # before any prompt is tokenized
        prompts = _prompt_list(body.prompt)
        ctx.check_num_prompts(len(prompts))
        self.prompts = [_Prompt(ctx, p, body) for p in prompts]
        if body.use_beam_search:
            params = body.to_beam_search_params(max_tokens=params.max_tokens, defaults=ctx.generation_defaults)
        for prompt in self.prompts:
            ctx.validate(prompt.token_ids, params, "prompt")
        if body.echo:
            for prompt in self.prompts:
                prompt.decode_for_echo(ctx, body.truncate_prompt_tokens is not None)
        self.request_id = f"cmpl-{client_request_id or uuid.uuid4().hex}"
        engine_id = ctx.engine_request_id(self.request_id, client_request_id)
        self.created = int(time.time())
        self.choices = [[_Choice(ctx, body, p, i * body.n + j) for j in range(body.n)]
                        for i, p in enumerate(self.prompts)]
        run = ctx.beam_search if body.use_beam_search else ctx.generate
        lora_request = ctx.lora_request(model_name)
        self.outputs = merge_async_iterators([run(p.token_ids, params, f"{engine_id}-{i}", arrival_time,
                                                  lora_request, body.priority, body.cache_salt,
                                                  reply_id=self.request_id)
                                              for i, p in enumerate(self.prompts)])

    def _response(self, choices: list[CompletionChoice], usage: UsageInfo | None = None):
        return CompletionResponse(id=self.request_id, created=self.created,
                                  model=self.model_name, choices=choices, usage=usage)

    async def complete(self, request: Request) -> Response:
        async def collect() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(self.prompts)
            async for i, output in self.outputs:
                finals[i] = output
            return finals

        completed, finals = await unless_disconnected(request, collect())
        if not completed:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices, completion_tokens = [], 0
        for i, final in enumerate(finals):
            completion_tokens += sum(len(c.token_ids) for c in final.outputs)  # best_of: all samples count
            kept = _best(final.outputs, self.body.n) if len(final.outputs) > self.body.n else final.outputs
            entries = prompt_logprobs(final.prompt_logprobs)  # the prompt's, shared by its choices
            for c in kept:
                choice = self.choices[i][c.index].piece(final, c)
                choice.prompt_logprobs = entries
                choices.append(choice)
        choices.sort(key=lambda choice: choice.index)
        usage = _usage(self.ctx, self.prompts, completion_tokens, sum(f.num_cached_tokens for f in finals))
        return JSONResponse(self._response(choices, usage).model_dump(mode="json"))

    async def stream(self, request: Request) -> Response:
        return await start_stream(request, self.outputs, self._events, self.ctx.sse_keep_alive_interval,
                                  lambda exc: [sse_error(exc), SSE_DONE])

    async def _events(self, first) -> AsyncIterator[str]:
        options = self.body.stream_options
        include_usage = self.ctx.include_usage(options)
        continuous_usage = include_usage and options is not None and options.continuous_usage_stats
        cached = [0] * len(self.prompts)
        try:
            async for i, output in prepend(first, self.outputs):
                cached[i] = output.num_cached_tokens
                for c in output.outputs:
                    if c.text or c.token_ids or c.finish_reason:
                        choice = self.choices[i][c.index]
                        choice.num_tokens += len(c.token_ids)
                        # continuous_usage_stats: this choice's prompt and its tokens so far (vLLM's)
                        usage = (_usage(self.ctx, [self.prompts[i]], choice.num_tokens, cached[i])
                                 if continuous_usage else None)
                        yield sse_event(self._response([choice.piece(output, c)], usage))
            if include_usage:
                completion_tokens = sum(choice.num_tokens for row in self.choices for choice in row)
                yield sse_event(self._response([], _usage(self.ctx, self.prompts, completion_tokens, sum(cached))))
        except APIError as exc:
            yield sse_error(exc)
        finally:
            await self.outputs.aclose()
        yield SSE_DONE
