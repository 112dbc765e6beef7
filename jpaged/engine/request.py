"""One request's host-side state: its tokens, status, finish reason and timing metrics."""

import enum
import time

from jpaged.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # never scheduled yet
    RUNNING = enum.auto()  # owns device blocks; scheduled every step it fits
    PREEMPTED = enum.auto()  # blocks dropped; waits to recompute its tokens
    SWAPPED = enum.auto()  # blocks copied to host slots; waits to be swapped back in
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id or a stop string
    FINISHED_LENGTH_CAPPED = enum.auto()  # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()  # aborted by the caller
    FINISHED_REPETITION = enum.auto()  # the output repeats itself (SamplingParams.repetition_detection)

    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_REPETITION: "repetition",
}


class Request:
    """A prompt being completed. Tokens only grow: prompt_token_ids, then output_token_ids.

    `num_computed_tokens` counts the tokens whose KV is in the pool; the scheduler lets it catch
    up with `num_tokens` (there are no prefill/decode phases). The last token is never computed
    before it is sampled from, so a running request has `num_computed_tokens < num_tokens`.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        lora_request=None,
        block_hash_seed: bytes | None = None,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.lora_request = lora_request  # jpaged.lora.LoRARequest or None
        # The first block's hash starts from this (block_pool.block_hash_seed: a LoRA adapter's digest
        # and the cache_salt): KV computed under other weights, or another salt, is never reused.
        self.block_hash_seed = block_hash_seed
        self.priority = priority  # the priority scheduling policy's: lower values are scheduled first
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self._all_token_ids = list(self.prompt_token_ids)  # prompt + outputs, kept in step
        self.num_computed_tokens = 0
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        # Output tokens allowed: sampling_params.max_tokens, or what max_model_len leaves
        # (set by Scheduler.add_request).
        self.max_tokens: int | None = sampling_params.max_tokens
        # Chained hashes of the full blocks of all_token_ids (filled by the KV cache manager).
        self.block_hashes: list[bytes] = []
        # Metrics (time.time() seconds).
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first scheduling

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output tokens. A live list: read it, never mutate it."""
        return self._all_token_ids

    @property
    def lora_int_id(self) -> int:
        """The adapter's id, 0 without one."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def is_finished(self) -> bool:
        return self.status.is_finished()

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length", "abort", "repetition", or None while unfinished."""
        return _FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (
            f"Request(request_id={self.request_id!r}, status={self.status.name}, "
            f"num_prompt_tokens={self.num_prompt_tokens}, num_output_tokens={self.num_output_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens})"
        )
