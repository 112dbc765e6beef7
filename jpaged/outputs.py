"""vLLM-shaped results: RequestOutput holding one CompletionOutput per sample (generation), and
PoolingRequestOutput / EmbeddingRequestOutput holding a prompt's pooled vector (--runner pooling)."""

import dataclasses

import numpy as np


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
    num_preemptions: int = 0  # times the request (all its n samples) was preempted


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
class PoolingOutput:
    data: np.ndarray  # f32[dimensions]: the prompt's pooled (and maybe normalized) hidden state


@dataclasses.dataclass
class PoolingRequestOutput:
    """A pooling request's result (jpaged/pooling.py); outputs is None when it was aborted or failed."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: PoolingOutput | None
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None  # why a failed step ended it


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclasses.dataclass
class EmbeddingRequestOutput:
    """What LLM.embed returns per prompt (vLLM's shape: `output.outputs.embedding`)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool

    @classmethod
    def from_base(cls, output: PoolingRequestOutput) -> "EmbeddingRequestOutput":
        return cls(output.request_id, EmbeddingOutput(output.outputs.data.tolist()), output.prompt_token_ids,
                   output.finished)


# Upper bounds of the engine-step size histogram (tokens run in one step), vLLM's.
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclasses.dataclass
class EngineStats:
    """A snapshot of the engine for /metrics and logs (token and cache counters are cumulative)."""

    num_running: int
    num_waiting: int
    num_waiting_deferred: int  # of num_waiting: held back by the LoRA budget (--max-loras)
    kv_cache_usage: float  # 0..1 of the non-null blocks
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    # Prompt tokens of requests scheduled for the first time: found in the prefix cache / computed.
    prompt_tokens_cached: int
    prompt_tokens_computed: int
    # Steps by the tokens they ran (prompt + sampled): a count per ITERATION_TOKENS_BUCKETS bound
    # (a step counts under the first bound it does not exceed), then the steps above the last one.
    iteration_tokens_counts: tuple[int, ...]
    iteration_tokens_sum: int
    running_lora_adapters: tuple[str, ...]  # names of the LoRA adapters running / waiting
    waiting_lora_adapters: tuple[str, ...]
    num_kv_blocks: int  # the KV pool's blocks, the null block included (vLLM's num_gpu_blocks)
    num_swap_blocks: int  # host blocks for swapped-out KV (--swap-space)
    sleep_level: int | None = None  # sleep mode: None awake, else the level slept at (0: scheduling paused only)
    # Speculative decoding (--speculative-config), cumulative: requests' steps with drafts, their
    # drafts, the drafts kept, and per draft position the drafts kept there (empty when off).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_tokens_per_pos: tuple[int, ...] = ()
