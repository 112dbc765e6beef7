"""POST /inference/v1/generate: vLLM's token-in / token-out API (with --enable-scale-out, as in
vLLM; without it the route answers 403). A prompt as token ids and vLLM's SamplingParams fields
in; the sampled token ids out (with `output_mode: "text"` their text too), whole or streamed as
server-sent events. For RL rollouts and front ends that render prompts and read tokens
themselves: no chat template, no generation_config defaults but max_tokens', and logprobs keyed
by token id. POST /inference/v1/abort_requests ends requests by the ids the replies carry; the
/v1/*/render routes (serving/chat.py, completions.py, messages.py) build requests for it.

Multimodal `features` / `content_parts`, disaggregated `kv_transfer_params` /
`ec_transfer_params` and the sampling fields jpaged lacks (`logprob_token_ids`, ...) are 400s
naming them.
"""

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingParams
from jpaged.structured_output import StructuredOutputsParams
from serving.context import ServingContext
from serving.errors import APIError
from serving.logprobs import MIN_LOGPROB, chat_logprobs, prompt_logprobs
from serving.protocol import INT32_MAX, ChatLogprobs, PromptLogprobs, StreamOptions, UsageInfo
from serving.streaming import CLIENT_CLOSED_REQUEST, SSE_DONE, prepend, sse_error, start_stream, unless_disconnected

SCALE_OUT_DISABLED = ("Scale-out endpoints are disabled. Restart python -m jpaged.serve with --enable-scale-out "
                      "to enable them.")

# GenerateRequest fields jpaged does not serve, with the values that mean "not used".
_UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "features": (None,), "content_parts": (None, []), "kv_transfer_params": (None,), "ec_transfer_params": (None,),
    "reasoning_ended": (None, True), "reasoning_parser_kwargs": (None,),
}
# vLLM SamplingParams fields jpaged lacks, with the values that mean "not used"; None: any value
# (output_kind is the server's to set, skip_clone an in-process hint).
_UNSUPPORTED_SAMPLING_FIELDS: dict[str, tuple | None] = {
    "watermarking": (None,), "prompt_logprob_token_ids": (None,), "prompt_logprob_start": (None, 0),
    "flat_logprobs": (False,), "extra_args": (None, {}),
"routed_experts_prompt_start": (0,),
    "trace_decode_token_ids": (None,), "output_text_buffer_length": (0,), "output_kind": None, "skip_clone": None,
}


class GenerateSamplingParams(BaseModel):
    """SamplingParams' fields as JSON types (the checks of their values are SamplingParams'); the
    extra fields are vLLM's, refused unless off (_UNSUPPORTED_SAMPLING_FIELDS), or unknown."""

    model_config = ConfigDict(extra="allow")

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = Field(0, le=INT32_MAX)  # the engine packs it as int32
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    stream_interval: int | None = None
    structured_outputs: dict[str, Any] | None = None
    repetition_detection: dict[str, Any] | None = None
    thinking_token_budget: StrictInt | None = None
    skip_reading_prefix_cache: bool | None = None
    logprob_token_ids: list[int] | None = None


class GenerateRequest(BaseModel):
    """vLLM's GenerateRequest; unknown fields are ignored, as vLLM ignores them."""

    request_id: str | None = None  # the reply's id is generate-tokens-<X-Request-Id header, else this>
    token_ids: list[NonNegativeInt] = Field(min_length=1)
    sampling_params: GenerateSamplingParams  # vLLM's SamplingParams field names
    model: str | None = None
    return_token_ids: bool | None = None  # the reply carries the prompt's ids (streamed: the first chunk)
    output_mode: Literal["tokens", "text"] = "tokens"
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    priority: int = 0
    features: dict[str, Any] | None = None
    content_parts: list[dict[str, Any]] | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    reasoning_ended: bool | None = None
    reasoning_parser_kwargs: dict[str, Any] | None = None
    token_offsets: list[tuple[int, int]] | None = None  # character offsets of the prompt: not used


class GenerateLogProb(BaseModel):
    token_id: int
    logprob: float
    rank: int | None = None


class GenerateLogProbsContent(GenerateLogProb):
    top_logprobs: list[GenerateLogProb] = Field(default_factory=list)


class GenerateLogProbs(BaseModel):
    content: list[GenerateLogProbsContent] | None = None


class GenerateChoice(BaseModel):
    """One sample; `text` only with output_mode "text" (logprobs then in chat's shape)."""

    index: int
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    logprobs: GenerateLogProbs | ChatLogprobs | None = None
    routed_experts: None = None  # vLLM's MoE routing record: no MoE model here
    sampling_mask: None = None
    weight_versions: None = None


class GenerateResponse(BaseModel):
    request_id: str
    model: str | None = None
    created: int | None = None
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_id_logprobs: None = None
    prompt_token_ids: list[int] | None = None
    mm_placeholders: None = None
    metrics: None = None
    kv_transfer_params: None = None
    ec_transfer_params: None = None
    output_mode: Literal["tokens", "text"] = "tokens"
    choices: list[GenerateChoice]


class GenerateStreamChunk(BaseModel):
    request_id: str
    usage: UsageInfo | None = None  # with continuous_usage_stats; the last chunk's with include_usage
    prompt_token_ids: list[int] | None = None  # return_token_ids: in the first chunk
    output_mode: Literal["tokens", "text"] = "tokens"
    choices: list[GenerateChoice]


def _check_off(values: dict[str, Any], unsupported: dict[str, tuple | None], prefix: str) -> None:
    used = [name for name, off in unsupported.items() if name in values and off is not None
            and values[name] not in off]
    if used:
        raise APIError(f"{', '.join(prefix + name for name in used)} {'is' if len(used) == 1 else 'are'} not "
                       "supported by jpaged.", param=prefix + used[0])


def _sampling_params(ctx: ServingContext, body: GenerateRequest) -> SamplingParams:
    """body.sampling_params as SamplingParams: max_tokens, when not given, generation_config's or
    up to the context (vLLM's server default, not SamplingParams' 16); 400 naming a bad field."""
    extra = body.sampling_params.model_extra or {}
    unknown = sorted(set(extra) - set(_UNSUPPORTED_SAMPLING_FIELDS))
    if unknown:
        raise APIError(f"sampling_params has unknown fields {unknown}.", param="sampling_params")
    _check_off(extra, _UNSUPPORTED_SAMPLING_FIELDS, "sampling_params.")
    fields = body.sampling_params.model_dump(exclude_unset=True, exclude=set(extra))
    if "max_tokens" not in fields:
        fields["max_tokens"] = ctx.generation_defaults.get("max_tokens")
    try:
        if isinstance(fields.get("structured_outputs"), dict):
            fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
        params = SamplingParams(**fields, output_kind=RequestOutputKind.DELTA if body.stream
                                else RequestOutputKind.FINAL_ONLY)
    except (TypeError, ValueError) as exc:
        raise APIError(f"sampling_params: {exc}", param="sampling_params") from None
    if body.output_mode == "text" and not params.detokenize:
        raise APIError("output_mode='text' requires sampling_params.detokenize to be true", param="output_mode")
    return params


def _token_logprobs(token_ids: list[int], steps: list[dict[int, Logprob]], num_top: int | None) -> GenerateLogProbs:
    """vLLM's generate logprobs: per token its id, logprob and rank, and the first max(num_top, 1)
    entries of the engine's dict (the sampled token first, then the best); num_top None: all of
    them (logprob_token_ids' tokens after the sampled one)."""
    def clamp(value: float) -> float:
        return max(value, MIN_LOGPROB)

    content = []
    for token_id, step in zip(token_ids, steps, strict=True):
        chosen = step.get(token_id)
        if chosen is None:
            content.append(GenerateLogProbsContent(token_id=token_id, logprob=MIN_LOGPROB))
            continue
        top = [GenerateLogProb(token_id=tid, logprob=clamp(lp.logprob), rank=lp.rank or None)
               for tid, lp in list(step.items())[:None if num_top is None else max(num_top, 1)]]
        content.append(GenerateLogProbsContent(token_id=token_id, logprob=clamp(chosen.logprob),
                                               rank=chosen.rank or None, top_logprobs=top))
    return GenerateLogProbs(content=content)


def generate_request(ctx: ServingContext, request_id: str, token_ids: list[int], params: SamplingParams,
                     body) -> dict:
    """The GenerateRequest JSON a rendered chat, messages or completions request (`body`) becomes
    (vLLM's /v1/*/render): the prompt's ids and its SamplingParams, max_tokens resolved (unset:
    up to the context), ready for /inference/v1/generate."""
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams) if f.name != "output_kind"}
    for name in ("structured_outputs", "repetition_detection"):
        if fields[name] is not None:
            fields[name] = dataclasses.asdict(fields[name])
    if fields["max_tokens"] is None:
        fields["max_tokens"] = ctx.max_model_len - len(token_ids)
    request = GenerateRequest(request_id=request_id, token_ids=token_ids,
                              sampling_params=GenerateSamplingParams(**fields), model=body.model, stream=body.stream,
                              stream_options=body.stream_options if body.stream else None,
                              cache_salt=body.cache_salt, priority=body.priority)
    return request.model_dump(mode="json")


async def create_generate(request: Request) -> Response:
    arrival_time = time.time()
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, GenerateRequest)
    model_name = ctx.check_model(body.model)
    ctx.check_ready()
    _check_off(body.model_dump(include=set(_UNSUPPORTED_FIELDS)), _UNSUPPORTED_FIELDS, "")
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options can only be set when stream is true.", param="stream_options")
    job = _GenerateJob(ctx, body, model_name, arrival_time, ctx.client_request_id(request, body.request_id))
    return await (job.stream(request) if body.stream else job.complete(request))


class _GenerateJob:
    """One validated request: its SamplingParams and its engine stream."""

    def __init__(self, ctx: ServingContext, body: GenerateRequest, model_name: str, arrival_time: float,
                 client_request_id: str | None):
        self.ctx, self.body, self.model_name = ctx, body, model_name
        self.params = params = _sampling_params(ctx, body)
        ctx.check_limits(params)
        ctx.check_token_ids(body.token_ids, "token_ids")
        ctx.validate(body.token_ids, params, "token_ids")
        self.request_id = f"generate-tokens-{client_request_id or uuid.uuid4().hex}"
        engine_id = ctx.engine_request_id(self.request_id, client_request_id)
        self.text_mode = body.output_mode == "text"
        self.outputs = ctx.generate(body.token_ids, params, engine_id, arrival_time, ctx.lora_request(model_name),
                                    body.priority, body.cache_salt, reply_id=self.request_id)

    def _choice(self, completion: CompletionOutput, finish_reason: str | None) -> GenerateChoice:
        logprobs = None
        params = self.params
        if params.num_logprobs is not None:
            token_ids, steps = list(completion.token_ids), completion.logprobs
            logprobs = (chat_logprobs(token_ids, steps, params.num_logprobs, self.ctx.tokenizer,
                                      self.ctx.return_tokens_as_token_ids) if self.text_mode
                        else _token_logprobs(token_ids, steps,
                                             params.logprobs if params.logprob_token_ids is None else None))
        return GenerateChoice(index=completion.index, text=completion.text if self.text_mode else None,
                              finish_reason=finish_reason, stop_reason=completion.stop_reason,
                              token_ids=list(completion.token_ids), logprobs=logprobs)

    def _usage(self, completion_tokens: int, cached_tokens: int) -> UsageInfo:
        prompt_tokens = len(self.body.token_ids)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=self.ctx.prompt_tokens_details(cached_tokens))

    def _dump(self, response: GenerateResponse | GenerateStreamChunk) -> dict:
        """The JSON vLLM writes: every field, null or not (a streamed chunk without prompt_token_ids
        leaves it out); `text` only in output_mode "text"."""
        data = response.model_dump(mode="json")
        for choice in data["choices"]:
            if not self.text_mode:
                del choice["text"]
        if isinstance(response, GenerateStreamChunk) and data["prompt_token_ids"] is None:
            del data["prompt_token_ids"]
        return data

    async def complete(self, request: Request) -> Response:
        async def last() -> RequestOutput:
            final = None
            async for output in self.outputs:
                final = output
            return final

        completed, final = await unless_disconnected(request, last())
        if not completed:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        # vLLM's: a choice the engine ended without a reason reads "stop"
        choices = [self._choice(c, c.finish_reason or "stop") for c in final.outputs]
        response = GenerateResponse(
            request_id=self.request_id, model=self.model_name, created=int(time.time()),
            output_mode=self.body.output_mode,
            usage=self._usage(sum(len(c.token_ids) for c in final.outputs), final.num_cached_tokens),
            prompt_logprobs=prompt_logprobs(final.prompt_logprobs),
            prompt_token_ids=list(self.body.token_ids) if self.body.return_token_ids else None, choices=choices)
        return JSONResponse(self._dump(response))

    async def stream(self, request: Request) -> Response:
        return await start_stream(request, self.outputs, self._events, self.ctx.sse_keep_alive_interval,
                                  lambda exc: [sse_error(exc), SSE_DONE])

    async def _events(self, first: RequestOutput) -> AsyncIterator[str]:
        """vLLM's chunks: one per choice with new tokens (or its finish), `usage` null unless
        continuous_usage_stats; the prompt's ids in the first with return_token_ids; with
        include_usage a last chunk of no choices and the usage; then [DONE]."""
        options = self.body.stream_options
        include_usage = self.ctx.include_usage(options)
        continuous_usage = include_usage and options is not None and options.continuous_usage_stats
        num_tokens = [0] * self.params.n
        prompt_ids = list(self.body.token_ids) if self.body.return_token_ids else None
        cached = 0
        try:
            async for output in prepend(first, self.outputs):
                cached = output.num_cached_tokens
                for c in output.outputs:
                    num_tokens[c.index] += len(c.token_ids)
                    if not (c.token_ids or c.finish_reason or (self.text_mode and c.text)):
                        continue
                    chunk = GenerateStreamChunk(
                        request_id=self.request_id, output_mode=self.body.output_mode, prompt_token_ids=prompt_ids,
                        choices=[self._choice(c, c.finish_reason)],
                        usage=self._usage(num_tokens[c.index], cached) if continuous_usage else None)
                    prompt_ids = None
                    yield f"data: {json.dumps(self._dump(chunk))}\n\n"
            if include_usage:
                final = GenerateStreamChunk(request_id=self.request_id, output_mode=self.body.output_mode,
                                            usage=self._usage(sum(num_tokens), cached), choices=[])
                yield f"data: {final.model_dump_json(exclude_none=True)}\n\n"
        except APIError as exc:
            yield sse_error(exc)
        finally:
            await self.outputs.aclose()
        yield SSE_DONE


async def abort_generate_requests(request: Request) -> Response:
    """POST /inference/v1/abort_requests {"request_ids": [...]}: ends those requests (the ids the
    replies carry, generate-tokens-...); 200 with no body, as vLLM's."""
    ctx: ServingContext = request.app.state.ctx
    body = await ctx.read_body(request, AbortGenerateRequest)
    if body.request_ids is None:
        raise APIError("Missing 'request_ids' in request body", param="request_ids")
    if body.request_ids:  # ServingContext.abort_requests would end every request for none
        await ctx.abort_requests(body.request_ids)
    return Response(status_code=200)


class AbortGenerateRequest(BaseModel):
    request_ids: list[str] | None = None


async def scale_out_disabled(request: Request) -> Response:
    raise APIError(SCALE_OUT_DISABLED, status_code=403, type="PermissionDeniedError")
