"""What every route shares: the engine, the served names, request-body parsing and validation."""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from jpaged.admission import QueueFullError
from jpaged.async_llm import AsyncLLM, EngineDeadError
from jpaged.beam_search import BeamSearch, BeamSearchParams, run_beam_search
from jpaged.lora import LoRARequest
from jpaged.outputs import CompletionOutput, PoolingRequestOutput, RequestMetrics, RequestOutput
from jpaged.pooling import PoolingParams
from jpaged.request_validation import InvalidRequestError, RequestValidator
from jpaged.sampling_params import RequestOutputKind, SamplingParams
from serving.errors import APIError, not_found_model, validation_error
from serving.metrics import ServerMetrics
from serving.protocol import PromptTokensDetails
from serving.response_store import ResponseStore

ModelT = TypeVar("ModelT", bound=BaseModel)

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PROMPTS_PER_REQUEST = 256

logger = logging.getLogger("jpaged.serve")


class ServingContext:
    """The engine plus the server's settings; routes reach AsyncLLM only through this."""

    def __init__(self, engine: AsyncLLM, *, served_model_name: str | list[str],
                 trust_request_chat_template: bool = False, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 generation_defaults: dict | None = None, log_requests: bool = False, log_outputs: bool = False,
                 log_deltas: bool = True,
                 max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST,
                 enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
                 enable_responses_store: bool = False, reasoning_parser: str | None = None,
                 response_role: str = "assistant", return_tokens_as_token_ids: bool = False,
                 enable_prompt_tokens_details: bool = False, enable_force_include_usage: bool = False,
                 max_log_len: int | None = None, default_chat_template_kwargs: dict | None = None,
                 exclude_tools_when_tool_choice_none: bool = False, chat_template_content_format: str = "auto",
                 sse_keep_alive_interval: float = 0):
        """The keywords are the server's flags of the same names (`python -m jpaged.serve --help`)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        self.served_model_names = names
        self.served_model_name = names[0]  # the name responses report unless the request named another
        self.trust_request_chat_template = trust_request_chat_template
        self.max_request_bytes = max_request_bytes
        self.enable_auto_tool_choice = enable_auto_tool_choice  # tool_choice "auto" (serving/tool_calls.py)
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser  # --reasoning-parser (serving/reasoning_parsers.py)
        self.max_model_len = engine.max_model_len
        self.validator: RequestValidator = engine.validator
        # Sampling defaults from generation_config.json (--generation-config); request fields win.
        self.generation_defaults = dict(generation_defaults or {})
        self.log_requests = log_requests
        self.log_outputs = log_outputs  # with log_requests: each finished request's outputs too
        self.log_deltas = log_deltas  # with log_outputs: each streamed piece as well
        self.max_log_len = max_log_len  # with log_requests: log this much of each prompt (None: none of it)
        self.response_role = response_role  # a chat reply's role when a generation prompt is added
        self.return_tokens_as_token_ids = return_tokens_as_token_ids  # default of the request field
        self.enable_prompt_tokens_details = enable_prompt_tokens_details  # usage.prompt_tokens_details
        self.enable_force_include_usage = enable_force_include_usage  # every stream ends with usage
        self.default_chat_template_kwargs = dict(default_chat_template_kwargs or {})  # under the request's
        # tool_choice "none": render the prompt without the request's tools
        self.exclude_tools_when_tool_choice_none = exclude_tools_when_tool_choice_none
        # how message content reaches the chat template: "string", "openai" parts, or "auto" (jpaged/chat_content.py)
        self.chat_template_content_format = chat_template_content_format
        self.max_prompts_per_request = max_prompts_per_request
        # seconds of silence after which a chat or completions stream sends an SSE comment (0: never)
        self.sse_keep_alive_interval = sse_keep_alive_interval
        self.metrics = ServerMetrics(engine, self.served_model_name)
        # /v1/responses replies kept for previous_response_id (--enable-responses-store)
        self.responses_store = ResponseStore() if enable_responses_store else None
        # LoRA adapters served as models of their own (--lora-modules, /v1/load_lora_adapter): name -> request
        self.lora_requests: dict[str, LoRARequest] = {}
        self._next_lora_id = 1
        # Engine request id -> the id of the reply it is part of, while the engine runs it.
        self.in_flight: dict[str, str] = {}

    @staticmethod
    def client_request_id(request: Request, body_request_id: str | None) -> str | None:
        """The id a client named for its request (vLLM's rule: the X-Request-Id header, else the
        body's `request_id`); None when it named none."""
        return request.headers.get("x-request-id") or body_request_id or None

    @staticmethod
    def engine_request_id(reply_id: str, client_request_id: str | None) -> str:
        """The engine's id for a reply's request: the reply's id, with a random suffix when the
        client named it (a client's id may repeat; the engine's must not)."""
        return reply_id if client_request_id is None else f"{reply_id}-{uuid.uuid4().hex[:8]}"

    def prompt_tokens_details(self, cached_tokens: int) -> PromptTokensDetails | None:
        """usage.prompt_tokens_details: only with --enable-prompt-tokens-details (vLLM's default)."""
        return PromptTokensDetails(cached_tokens=cached_tokens) if self.enable_prompt_tokens_details else None

    def include_usage(self, stream_options) -> bool:
        """Whether a stream ends with a usage chunk: the request's stream_options.include_usage,
        or always with --enable-force-include-usage."""
        return self.enable_force_include_usage or (stream_options is not None and stream_options.include_usage)

    def check_model(self, model: str | None) -> str:
        """The name to report for a request naming `model`; 404 for a name this server does not serve."""
        if model is None:
            return self.served_model_name
        if model not in self.served_model_names and model not in self.lora_requests:
            raise not_found_model(model, self.served_model_names + list(self.lora_requests))
        return model

    def lora_request(self, model_name: str) -> LoRARequest | None:
        """The adapter a request naming `model_name` (as check_model returned it) runs with."""
        return self.lora_requests.get(model_name)

    async def load_lora_adapter(self, name: str, path: str, base_model_name: str | None = None,
                                load_inplace: bool = False) -> None:
        """Serves the LoRA adapter at `path` as model `name` (vLLM's rules and messages): 400 for
        a missing field, a base model's name, a name already served (unless load_inplace, which
        reads the adapter again) or an adapter the engine cannot serve."""
        if not name or not path:
            raise APIError("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.served_model_names:
            raise APIError(f"The lora adapter '{name}' conflicts with a served base model.", param="lora_name")
        previous = self.lora_requests.get(name)
        if previous is not None and not load_inplace:
            raise APIError(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                           "place, set 'load_inplace' to True.", param="lora_name")
        if previous is None:
            lora_id, self._next_lora_id = self._next_lora_id, self._next_lora_id + 1
        else:
            lora_id = previous.lora_int_id
            await self.engine.remove_lora(lora_id)  # read again, even from the same path
        if base_model_name is not None and base_model_name not in self.served_model_names:
            base_model_name = None
        request = LoRARequest(name, lora_id, path, base_model_name)
        try:
            await self.engine.add_lora(request)
        except ValueError as exc:
            raise APIError(str(exc), param="lora_path") from None
        self.lora_requests[name] = request
        logger.info("Loaded LoRA adapter: name '%s', path '%s'", name, path)

    def unload_lora_adapter(self, name: str) -> None:
        """Stops serving the adapter `name` (404 when it is not served); requests running with it finish."""
        if not name:
            raise APIError("'lora_name' needs to be provided to unload a LoRA adapter.")
        if self.lora_requests.pop(name, None) is None:
            raise APIError(f"The lora adapter '{name}' cannot be found.", status_code=HTTPStatus.NOT_FOUND,
                           param="lora_name", code="model_not_found")
        logger.info("Removed LoRA adapter: name '%s'", name)

    def check_ready(self) -> None:
        if self.engine.errored:
            raise APIError("The engine stopped after an internal error (its device state was lost); "
                           "restart the server.", status_code=HTTPStatus.SERVICE_UNAVAILABLE,
                           type="service_unavailable")
        if not self.engine.is_ready:
            raise APIError("The engine is not ready (starting up or shutting down).",
                           status_code=HTTPStatus.SERVICE_UNAVAILABLE, type="service_unavailable")

    async def read_body(self, request: Request, model_cls: type[ModelT]) -> ModelT:
        """Reads and validates a JSON body: 415 for a non-JSON content type, 413 over
        --max-request-bytes, 400 for bad JSON, 400/422 for values/schema."""
        data = parse_json(await self.read_bytes(request))
        try:
            return model_cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        except RecursionError:  # nesting pydantic cannot walk
            raise APIError("The request body is nested too deeply.") from None

    async def read_bytes(self, request: Request) -> bytes:
        """A JSON request's body: 415 for a non-JSON content type, 413 over --max-request-bytes."""
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            raise APIError(f"The request body must be JSON: send 'Content-Type: application/json', not "
                           f"{content_type!r}.", status_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           code="unsupported_media_type")
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(len(body), limit)
        return bytes(body)

    def check_limits(self, params: SamplingParams, logprobs_param: str = "logprobs") -> None:
        """400 when the request is over a request-size flag (before any tokenizing)."""
        with invalid_request_as_api_error():
            self.validator.check_limits(params, logprobs_param)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        """400 for an empty list or ids outside the vocabulary (before anything decodes them)."""
        with invalid_request_as_api_error():
            self.validator.check_token_ids(token_ids, param)

    def check_num_prompts(self, num_prompts: int) -> None:
        if num_prompts > self.max_prompts_per_request:
            raise APIError(f"prompt is a batch of {num_prompts} prompts, over this server's limit of "
                           f"{self.max_prompts_per_request} (--max-prompts-per-request).", param="prompt",
                           code="request_limit_exceeded")

    def truncate_prompt(self, token_ids: list[int], truncate_prompt_tokens: int | None,
                        truncation_side: str | None = None) -> list[int]:
        """vLLM's `truncate_prompt_tokens`: keep the last k tokens (-1: max_model_len - 1 of them),
        or the first k with truncation_side "right"."""
        if truncate_prompt_tokens is None:
            return token_ids
        if truncate_prompt_tokens == 0:
            raise APIError("truncate_prompt_tokens must be -1 or at least 1, got 0.", param="truncate_prompt_tokens")
        keep = self.max_model_len - 1 if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        return token_ids[:keep] if truncation_side == "right" else token_ids[-keep:]

    def validate(self, prompt_token_ids: list[int], params: SamplingParams | BeamSearchParams, param: str) -> None:
        """The engine's own check of a whole request (jpaged/request_validation.py), as a 400;
        a beam search's width is the request's `n`."""
        with invalid_request_as_api_error():
            if isinstance(params, BeamSearchParams):
                self.validator.validate_beam_search(prompt_token_ids, params.beam_width, params.max_tokens,
                                                    param, width_param="n")
            else:
                self.validator.validate(prompt_token_ids, params, param)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                       priority: int = 0, cache_salt: str | None = None,
                       reply_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """AsyncLLM.generate (with the LoRA adapter `lora_request`, the priority and the
        cache_salt), plus metrics when the request finishes. `reply_id`: the id of the reply it
        is part of (default: request_id), which abort_requests also finds it by.

        The engine's ValueError for an invalid request (raised before the first output) becomes
        a 400, a stopped engine or a full queue (--max-num-queued-reqs / -tokens) a 503, a failed
        engine step (output.error) a 500 naming the fault. Closing this stream closes the engine's,
        which aborts the request if it is still running. `arrival_time`: when the HTTP request arrived (time.time()).
        """
        delta = params.output_kind == RequestOutputKind.DELTA
        tokens_per_output: dict[int, int] = {}
        self._log_request(request_id, prompt_token_ids, params)
        logged: dict[int, tuple] = {}  # --enable-log-outputs: index -> (text, token ids, finish reason)
        outputs = self._engine_outputs(prompt_token_ids, params, request_id, arrival_time, lora_request, priority,
                                       cache_salt, reply_id)
        last_output_time = None
        try:
            async for output in outputs:
                now = time.time()
                for completion in output.outputs:
                    if self.log_requests and self.log_outputs:
                        if delta and self.log_deltas and completion.text:
                            self._log_delta(request_id, completion)
                        text, ids, _ = logged.get(completion.index, ("", [], None)) if delta else ("", [], None)
                        logged[completion.index] = (text + completion.text, ids + list(completion.token_ids),
                                                    completion.finish_reason)
                    count = len(completion.token_ids)
                    tokens_per_output[completion.index] = (
                        tokens_per_output.get(completion.index, 0) + count if delta else count)
                    if delta and last_output_time is not None and count:
                        self.metrics.observe_token_gap(now - last_output_time, count)
                last_output_time = now
                if output.finished:
                    self._observe_finished(output, tokens_per_output, delta, params.n, params.max_tokens)
                    self._log_outputs(request_id, logged)
                _raise_if_failed(output)
                yield output
        finally:
            await outputs.aclose()

    async def encode(self, prompt_token_ids: list[int], params: PoolingParams, request_id: str, arrival_time: float,
                     lora_request: LoRARequest | None = None, priority: int = 0,
                     reply_id: str | None = None) -> AsyncIterator[PoolingRequestOutput]:
        """AsyncLLM.encode (a pooling engine's one final output); errors and metrics as in
        `generate` (no generation tokens; finish reason "stop", or "abort" / "error" without a vector)."""
        self._log_request(request_id, prompt_token_ids, params)
        outputs = self._engine_outputs(prompt_token_ids, params, request_id, arrival_time, lora_request, priority,
                                       None, reply_id)
        try:
            async for output in outputs:
                reason = "error" if output.error is not None else "stop" if output.outputs is not None else "abort"
                self.metrics.observe_finished(output, 0, 0, reason, False, 1, None)
                _raise_if_failed(output)
                yield output
        finally:
            await outputs.aclose()

    async def beam_search(self, prompt_token_ids: list[int], params: BeamSearchParams, request_id: str,
                          arrival_time: float, lora_request: LoRARequest | None = None, priority: int = 0,
                          cache_salt: str | None = None, reply_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """A beam search (jpaged/beam_search.py) as `generate` would stream it: one final
        RequestOutput, a CompletionOutput per returned beam (best first, index 0..), each without
        the prompt and, unless include_stop_str_in_output, without its EOS. Every step's requests
        run with `priority` and `cache_salt`. Metrics count it as one request; errors map as in
        `generate`; abort_requests(request_id or reply_id) ends it (its beams as "abort")."""
        self._log_request(request_id, prompt_token_ids, params)
        search = BeamSearch(prompt_token_ids, params, self.tokenizer.eos_token_ids)
        step_params = params.step_params()
        metrics = RequestMetrics(arrival_time=arrival_time)

        async def run_step(tokens: list[int], step_id: str) -> RequestOutput:
            # The search's arrival: each step queues where the search would (fcfs by arrival).
            outputs = self._engine_outputs(tokens, step_params, f"{request_id}-{step_id}", arrival_time,
                                           lora_request, priority, cache_salt, reply_id or request_id,
                                           count_aborted=False)
            try:
                async for output in outputs:
                    _raise_if_failed(output)
            finally:
                await outputs.aclose()
            if metrics.first_token_time is None:
                metrics.first_scheduled_time = output.metrics.first_scheduled_time
                metrics.first_token_time = time.time()
            return output

        try:
            beams = await run_beam_search(search, run_step)
        except asyncio.CancelledError:
            self.metrics.observe_aborted()
            raise
        completions = []
        for index, beam in enumerate(beams):
            token_ids = beam.tokens[search.prompt_len:]
            if beam.finish_reason == "stop" and not params.include_stop_str_in_output:
                token_ids = token_ids[:-1]
            text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
            completions.append(CompletionOutput(index, text, token_ids, beam.cum_logprob,
                                                beam.logprobs[:len(token_ids)], beam.finish_reason, beam.stop_reason))
        metrics.last_token_time = metrics.finished_time = time.time()
        output = RequestOutput(request_id, None, prompt_token_ids, None, completions, True, metrics)
        self._observe_finished(output, {c.index: len(c.token_ids) for c in completions}, False,
                               params.beam_width, params.max_tokens)
        self._log_outputs(request_id, {c.index: (c.text, c.token_ids, c.finish_reason) for c in completions})
        yield output

    def _log_request(self, request_id: str, prompt_token_ids: list[int], params) -> None:
        """--enable-log-requests: the request's id, prompt length and parameters; with
        --max-log-len N also the prompt's first N characters and token ids."""
        if not self.log_requests:
            return
        if self.max_log_len is None:
            logger.info("request %s: %d prompt tokens, %s", request_id, len(prompt_token_ids), params)
            return
        head = prompt_token_ids[:self.max_log_len]
        prompt = self.tokenizer.decode(head, skip_special_tokens=False)[:self.max_log_len]
        logger.info("request %s: %d prompt tokens, prompt: %r, prompt_token_ids: %s, %s", request_id,
                    len(prompt_token_ids), prompt, head, params)

    @staticmethod
    def _log_delta(request_id: str, completion: CompletionOutput) -> None:
        """--enable-log-deltas (on unless --no-enable-log-deltas), with --enable-log-outputs: each
        piece of a streamed reply as it is sent, vLLM's way; its token ids at DEBUG."""
        logger.info("request %s (streaming delta): output %d: %r, finish_reason: %s", request_id,
                    completion.index, completion.text, completion.finish_reason)
        logger.debug("request %s (streaming delta): output %d token ids: %s", request_id, completion.index,
                     list(completion.token_ids))

    def _log_outputs(self, request_id: str, completions: dict[int, tuple]) -> None:
        """--enable-log-outputs (with --enable-log-requests): a finished request's outputs
        (index -> (text, token ids, finish reason)), vLLM's split: each output's text and finish
        reason at INFO, its token ids at DEBUG."""
        if not (self.log_requests and self.log_outputs):
            return
        for index, (text, token_ids, finish_reason) in sorted(completions.items()):
            logger.info("request %s: output %d: %r, finish_reason: %s", request_id, index, text, finish_reason)
            logger.debug("request %s: output %d token ids: %s", request_id, index, token_ids)

    async def _engine_outputs(self, prompt_token_ids: list[int], params: SamplingParams | PoolingParams,
                              request_id: str, arrival_time: float | None = None,
                              lora_request: LoRARequest | None = None, priority: int = 0,
                              cache_salt: str | None = None, reply_id: str | None = None,
                              count_aborted: bool = True) -> AsyncIterator:
        """AsyncLLM.generate (AsyncLLM.encode for PoolingParams) with its exceptions as APIErrors:
        an invalid request 400, a stopped engine or a full queue 503. In `in_flight` (under
        reply_id, default request_id) while it runs. Closed or cancelled before its final output
        (the client went away: the engine aborts it), it counts an aborted request unless
        `count_aborted` is False (a beam search's steps: the search counts itself)."""
        pooling = isinstance(params, PoolingParams)
        if not pooling and self.engine.pooler_config is not None:
            raise APIError("This server computes embeddings (--runner pooling): it serves /v1/embeddings, not text "
                           "generation.")
        stream = self.engine.encode if pooling else self.engine.generate
        outputs = stream({"prompt_token_ids": prompt_token_ids}, params, request_id, arrival_time, lora_request,
                         priority, cache_salt)
        self.in_flight[request_id] = reply_id or request_id
        finished = False
        try:
            async for output in outputs:
                finished = output.finished
                yield output
        except (GeneratorExit, asyncio.CancelledError):
            if count_aborted and not finished:
                self.metrics.observe_aborted()
            raise
        except InvalidRequestError as exc:
            raise _api_error(exc) from None
        except ValueError as exc:
            raise APIError(str(exc)) from None
        except EngineDeadError as exc:
            raise APIError(f"{exc}; restart the server.", status_code=HTTPStatus.SERVICE_UNAVAILABLE,
                           type="service_unavailable") from None
        except QueueFullError as exc:
            self.metrics.observe_rejected(exc.reason)
            raise APIError(str(exc), status_code=HTTPStatus.SERVICE_UNAVAILABLE, type="service_unavailable",
                           code=exc.reason) from None
        finally:
            self.in_flight.pop(request_id, None)
            await outputs.aclose()

    async def abort_requests(self, request_ids: list[str] | None = None) -> int:
        """vLLM's /abort_requests: ends the requests in flight named by `request_ids`, each a
        reply's id (`chatcmpl-...`, `cmpl-...`, `msg_...`, `resp_...`) or an engine request id; all
        of them when it is empty or None. They finish with finish_reason "abort" (a beam search:
        its beams so far). Returns how many engine requests it ended."""
        names = set(request_ids or ())
        ended = [engine_id for engine_id, reply_id in self.in_flight.items()
                 if not names or engine_id in names or reply_id in names]
        for engine_id in ended:
            await self.engine.abort(engine_id)
        return len(ended)

    def _observe_finished(self, output: RequestOutput, tokens_per_output: dict[int, int], streamed: bool,
                          n: int, max_tokens: int | None) -> None:
        reasons = {c.finish_reason for c in output.outputs if c.finish_reason}
        reason = next((r for r in ("error", "abort", "length") if r in reasons), "stop")
        self.metrics.observe_finished(output, sum(tokens_per_output.values()),
                                      max(tokens_per_output.values(), default=0), reason, streamed, n, max_tokens)


def parse_json(body: bytes) -> Any:
    """A request body's JSON; 400 when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, >4300-digit ints, deep nesting
        raise APIError(f"The request body is not valid JSON: {exc}.") from None


def _raise_if_failed(output: RequestOutput | PoolingRequestOutput) -> None:
    """A 500 naming the fault when a step running this request failed (output.error)."""
    if output.error is not None:
        raise APIError(f"The engine failed while running this request: {output.error}. "
                       "Other requests are unaffected; retrying may succeed.",
                       status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
                       type="internal_server_error", code="engine_step_failed")


def _too_large(size: int, limit: int) -> APIError:
    return APIError(f"The request body is {size} bytes, over the server's limit of {limit} bytes "
                    f"(--max-request-bytes).", status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    code="request_too_large")


def _api_error(exc: InvalidRequestError) -> APIError:
    return APIError(str(exc), param=exc.param, code=exc.code)


@contextlib.contextmanager
def invalid_request_as_api_error():
    """Turns the engine's InvalidRequestError into the 400 the client gets."""
    try:
        yield
    except InvalidRequestError as exc:
        raise _api_error(exc) from None
