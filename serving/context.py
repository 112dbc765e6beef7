"""What every route shares: the engine, the served names, request-body parsing and validation."""

import json
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from jpaged.async_llm import AsyncLLM, EngineDeadError
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingParams
from serving.errors import APIError, not_found_model, validation_error
from serving.metrics import ServerMetrics

ModelT = TypeVar("ModelT", bound=BaseModel)

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


class ServingContext:
    """The engine plus the server's settings; routes reach AsyncLLM only through this."""

    def __init__(self, engine: AsyncLLM, *, served_model_name: str, trust_request_chat_template: bool = False,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, enable_auto_tool_choice: bool = False,
                 tool_call_parser: str | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.served_model_name = served_model_name
        self.trust_request_chat_template = trust_request_chat_template
        self.max_request_bytes = max_request_bytes
        self.enable_auto_tool_choice = enable_auto_tool_choice  # tool_choice "auto" (serving/tool_calls.py)
        self.tool_call_parser = tool_call_parser
        self.max_model_len = engine.max_model_len
        self.metrics = ServerMetrics(engine, served_model_name)

    def check_model(self, model: str | None) -> None:
        """404 for a model name this server does not serve (None means the served one)."""
        if model is not None and model != self.served_model_name:
            raise not_found_model(model, self.served_model_name)

    def check_ready(self) -> None:
        if self.engine.errored:
            raise APIError("The engine stopped after an internal error; restart the server.",
                           status_code=HTTPStatus.SERVICE_UNAVAILABLE, type="service_unavailable")
        if not self.engine.is_ready:
            raise APIError("The engine is not ready (starting up or shutting down).",
                           status_code=HTTPStatus.SERVICE_UNAVAILABLE, type="service_unavailable")

    async def read_body(self, request: Request, model_cls: type[ModelT]) -> ModelT:
        """Reads and validates a JSON body: 413 over --max-request-bytes, 400 for bad JSON/schema."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(len(body), limit)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, >4300-digit ints, deep nesting
            raise APIError(f"The request body is not valid JSON: {exc}.") from None
        try:
            return model_cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def check_prompt_tokens(self, token_ids: list[int], param: str) -> None:
        """400 for an empty prompt or token ids outside the vocabulary."""
        if not token_ids:
            raise APIError(f"The {param} is empty: send at least one token.", param=param)
        vocab_size = self.tokenizer.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(f"Token ids {bad[:8]} in the {param} are outside the vocabulary "
                           f"[0, {vocab_size}).", param=param)

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """`max_tokens` (None: the rest of the context); 400 with the numbers when it cannot fit."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {num_prompt_tokens} input tokens. Please reduce the length of the input "
                f"{param}.", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return limit - num_prompt_tokens
        if num_prompt_tokens + max_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, "
                f"{max_tokens} in the completion). Please reduce the length of the {param} or "
                f"completion.", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """AsyncLLM.generate, plus metrics when the request finishes.

        The engine's ValueError for an invalid request (raised before the first output) becomes
        a 400, a stopped engine a 503. Closing this stream closes the engine's, which aborts the
        request if it is still running.
        """
        delta = params.output_kind == RequestOutputKind.DELTA
        tokens_per_output: dict[int, int] = {}
        outputs = self.engine.generate({"prompt_token_ids": prompt_token_ids}, params, request_id)
        try:
            async for output in outputs:
                for completion in output.outputs:
                    count = len(completion.token_ids)
                    tokens_per_output[completion.index] = (
                        tokens_per_output.get(completion.index, 0) + count if delta else count)
                if output.finished:
                    self._observe_finished(output, tokens_per_output)
                yield output
        except ValueError as exc:
            raise APIError(str(exc)) from None
        except EngineDeadError as exc:
            raise APIError(f"{exc}; restart the server.", status_code=HTTPStatus.SERVICE_UNAVAILABLE,
                           type="service_unavailable") from None
        finally:
            await outputs.aclose()

    def _observe_finished(self, output: RequestOutput, tokens_per_output: dict[int, int]) -> None:
        reasons = {c.finish_reason for c in output.outputs if c.finish_reason}
        reason = "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
        self.metrics.observe_finished(output, sum(tokens_per_output.values()),
                                      max(tokens_per_output.values(), default=0), reason)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(f"The request body is {size} bytes, over the server's limit of {limit} bytes "
                    f"(--max-request-bytes).", status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    code="request_too_large")
