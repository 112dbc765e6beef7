"""vLLM-shaped results of generation: RequestOutput holding one CompletionOutput per sample."""

import dataclasses


@dataclasses.dataclass
class Logprob:
    """One token's log probability, its 1-based rank in the distribution, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One sample of a request (index i of n)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # None unless logprobs were requested
    logprobs: list[dict[int, Logprob]] | None  # per output token: sampled + top `logprobs` tokens
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """time.time() stamps of a request's life (None until reached)."""

    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass
class RequestOutput:
    """A request's output so far (or its new part, with RequestOutputKind.DELTA)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    # Set (with finish_reason "error") when a step running this request failed; the message says why.
    error: str | None = None


@dataclasses.dataclass
class EngineStats:
    """A snapshot of the engine for /metrics and logs (token and cache counters are cumulative)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1 of the non-null blocks
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
