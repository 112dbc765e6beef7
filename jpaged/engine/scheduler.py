"""Continuous batching: which requests run each step, under one token budget.

Each step, `schedule()` lets every request's num_computed_tokens catch up with its num_tokens:
1. running requests in admission order, each chunked to the budget (`chunk_length`: never a
   prompt token alone in a chunk); when the pool is out of blocks, the newest running request
   is preempted (recompute, or swap to host slots when `num_swap_blocks` > 0 and they have room);
2. then waiting requests in FCFS order (preempted ones at the front), each after its
   prefix-cache hits, until the budget, `max_num_seqs` or the pool runs out. The queue is
   strictly FCFS: a request that does not fit blocks the ones behind it (so after a preemption,
   whose victim heads the queue and cannot fit, nobody is admitted that step). With max_loras,
   the running requests hold at most that many distinct LoRA adapters: a request with another
   adapter is passed over (deferred, keeping its place at the head of the queue) until one of
   them is no longer running, and the requests behind it are admitted meanwhile (vLLM's rule).

With scheduling_policy "priority" (vLLM V1's), the waiting queue is kept in (priority, arrival_time)
order (lower first; a preempted request goes back to its place in it), and the request preempted
is the running one with the largest (priority, arrival_time), even one scheduled earlier in the
step (it is taken out of the step again). A waiting request never preempts a running one, but
one ahead of a victim in the queue may be admitted in the step that preempted it.

The engine calls schedule(), runs the step, then update_from_output() with the sampled tokens.
With num_scheduler_steps = k > 1, a decode-only batch that needs nothing from the host between
tokens becomes a round of k steps (SchedulerOutput.num_steps): blocks for all k tokens are
allocated, and the engine calls update_from_output() once per step of the round.
With scheduler_delay_factor = f > 0 (vLLM V0's --scheduler-delay-factor), while requests run,
waiting requests are admitted only once the oldest has waited f x the latency of the last step
that ran prompt tokens, so that arrivals gather into fewer prefill steps (each one stalls every
running decode); rounds may run meanwhile.
With scheduler_finish_first (the default), while every running request is decoding, waiting
requests are held if the running requests closest to their max_tokens reach it sooner than a
prompt step takes and the waiting requests' summed wait costs less than one prompt step's stall
of those finishers: a request about to end ends instead of sitting through its replacement's
prefill step, and the replacements then prefill together.
With a speculative_config (jpaged/engine/speculative.py), a decoding request without a grammar
or bad_words (whose masks the host builds one token at a time) gets prompt-lookup drafts: its
chunk is its pending token plus the drafts (KV blocks allocated for all of them, one token of the
budget each, at most max_num_seqs sampled rows per step), and the engine calls
update_from_output() once per token it keeps. A step with drafts is never a multi-step round.
Not thread-safe: abort/finish calls must not run concurrently with schedule/update.
"""

import bisect
import collections
import dataclasses
import time
from collections.abc import Callable

from jpaged.config import SCHEDULING_POLICIES
from jpaged.engine.block_manager import KVCacheManager, cdiv
from jpaged.engine.request import Request, RequestStatus
from jpaged.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from jpaged.engine.speculative import SpeculativeConfig
from jpaged.request_validation import InvalidRequestError, check_context_length


def chunk_length(num_remaining: int, budget: int, full_budget: int) -> int:
    """Tokens of a request's next chunk: all `num_remaining` when they fit in `budget`. A partial
    chunk never leaves exactly one token behind and is never one token of several (0: wait for
    the next step), unless even a full budget (`full_budget` = max_num_batched_tokens) could not
    do better. The C++ attention gives a chunk's lone query token decode arithmetic and longer
    chunks prefill arithmetic, so with this rule a prompt token gets the same bits in any batch."""
    if num_remaining <= budget:
        return num_remaining
    num_tokens = budget - 1 if num_remaining - budget == 1 else budget
    if num_tokens >= 2:
        return num_tokens
    return budget if budget == full_budget else 0


def _priority_key(request: Request) -> tuple[int, float]:
    """The priority policy's order: lower priority values first, then earlier arrivals."""
    return request.priority, request.arrival_time


def _samples_ahead(request: Request) -> bool:
    """Whether the request's next tokens can be sampled without the host in between: the
    sampler needs neither entries (penalties, logit_bias, min_tokens masks) nor logprobs, and no
    token bitmask (a grammar, allowed_token_ids, bad_words, a thinking_token_budget) limits the
    tokens."""
    params = request.sampling_params
    return (params.num_logprobs is None and not params.logit_bias and params.structured_outputs is None
            and not params.restricts_tokens and request.num_output_tokens >= params.min_tokens
            and params.thinking_token_budget is None
            and not params.has_penalties)


def _verifies_drafts(request: Request) -> bool:
    """Whether the request can take drafts: each draft's row must sample what a plain decode
    would there. Sampler entries (penalties, logit_bias, min_tokens) are computed per row with
    the drafts before it counted (step_metadata.row_entries), and allowed_token_ids is the same
    mask in every row; a grammar's or bad_words' mask depends on the tokens before it, which the
    host builds one token at a time, as is a thinking_token_budget's forced end marker; the
    runner reads logprob_token_ids' logprobs for one row per request."""
    params = request.sampling_params
    return (params.structured_outputs is None and not params.bad_words and params.thinking_token_budget is None
            and params.logprob_token_ids is None)


@dataclasses.dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int  # includes preempted and swapped requests
    num_waiting_deferred: int  # of num_waiting: held by the LoRA budget (max_loras adapters already run)
    kv_cache_usage: float  # fraction of non-null blocks held by requests, 0..1
    prefix_cache_queries: int  # tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int  # tokens found there, cumulative
    num_preemptions: int  # cumulative
    # Prompt tokens of requests scheduled for the first time, cumulative: found in the prefix cache / computed.
    prompt_tokens_cached: int
    prompt_tokens_computed: int
    kv_waste_slots: int  # allocated slots of running requests not holding a computed token
    running_lora_adapters: tuple[str, ...]  # the LoRA adapters' names, in first-seen order
    waiting_lora_adapters: tuple[str, ...]


class Scheduler:
    """Owns every unfinished request and the KV cache manager."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        num_swap_blocks: int = 0,
        num_scheduler_steps: int = 1,
        scheduler_delay_factor: float = 0.0,
        scheduler_finish_first: bool = True,
        max_loras: int = 0,
        scheduling_policy: str = "fcfs",
        speculative_config: SpeculativeConfig | None = None,
        long_prefill_token_threshold: int = 0,
        long_prefill_token_threshold_adaptive: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in [
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
            ("num_scheduler_steps", num_scheduler_steps),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be greater than or equal to "
                f"max_num_seqs ({max_num_seqs}), or some running requests could not decode every step. "
                "Raise --max-num-batched-tokens or lower --max-num-seqs."
            )
        if not scheduler_delay_factor >= 0:  # NaN too
            raise ValueError(f"scheduler_delay_factor must be non-negative, got {scheduler_delay_factor}.")
        if num_swap_blocks < 0:
            raise ValueError(f"num_swap_blocks must be non-negative, got {num_swap_blocks}.")
        if long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be non-negative, got {long_prefill_token_threshold}.")
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {scheduling_policy!r}.")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than max_model_len "
                f"({max_model_len}) with chunked prefill disabled, so longer prompts could never run. "
                "Raise --max-num-batched-tokens, lower --max-model-len, or enable chunked prefill."
            )
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.num_scheduler_steps = num_scheduler_steps
        self.scheduler_delay_factor = scheduler_delay_factor
        self.scheduler_finish_first = scheduler_finish_first
        self.max_loras = max_loras  # 0: LoRA off
        self.scheduling_policy = scheduling_policy
        self.speculative_config = speculative_config
        # A request's chunk is at most this many tokens while other requests run or wait (0: off);
        # adaptive: never below the budget's fair share, max_num_batched_tokens / those requests.
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.long_prefill_token_threshold_adaptive = long_prefill_token_threshold_adaptive
        # Wall-clock seconds (time.time()): step latencies steer admission, stamps go on requests.
        # Tests that replay schedules pass a deterministic one.
        self._clock = clock
        self.kv_cache_manager = KVCacheManager(
            num_blocks=num_blocks,
            block_size=block_size,
            enable_caching=enable_prefix_caching,
            num_swap_blocks=num_swap_blocks,
        )
        self.requests: dict[str, Request] = {}  # every unfinished request
        # fcfs: in arrival order, preempted requests at the front; priority: in _priority_key order.
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order: with fcfs the last is preempted first
        self._finished_request_ids: set[str] = set()
        self.admission_paused = False  # True: waiting requests stay waiting (the engine is going to sleep)
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prompt_tokens_cached = 0
        self.prompt_tokens_computed = 0
        # For admission: when schedule() last ran, whether that step ran prompt tokens and how
        # many decode steps it ran otherwise, and the latest latencies (schedule() to the next
        # schedule()) of a step that ran prompt tokens and of one decode step (0: none yet).
        self._last_schedule_time = 0.0
        self._last_step_ran_prompt = False
        self._last_num_decode_steps = 0
        self._last_prompt_latency = 0.0
        self._last_decode_latency = 0.0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, request: Request) -> None:
        """Queue a request; resolves its max_tokens. ValueError (with the numbers and the flag
        to change) for a request that could never finish: its length is checked by the same
        function the engine validates requests with (jpaged/request_validation.py).
        InvalidRequestError for a priority that is not an int, or not 0 with the fcfs policy
        (vLLM's message)."""
        if request.request_id in self.requests:
            raise ValueError(f"Request id {request.request_id!r} is already in use.")
        if not isinstance(request.priority, int):
            raise InvalidRequestError(f"priority must be an int, got {request.priority!r}.", param="priority")
        if request.priority != 0 and self.scheduling_policy != "priority":
            raise InvalidRequestError(f"Got priority {request.priority} but Priority scheduling is not enabled.",
                                      param="priority")
        num_prompt = request.num_prompt_tokens
        check_context_length(num_prompt, request.sampling_params.max_tokens, self.max_model_len)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - num_prompt
        # The last sampled token is never stored, so a request stores at most this many tokens.
        num_blocks_needed = cdiv(num_prompt + max_tokens - 1, self.block_size)
        num_usable = self.kv_cache_manager.num_usable_blocks
        if num_blocks_needed > num_usable:
            raise ValueError(
                f"Request {request.request_id!r} may need {num_blocks_needed} KV blocks of {self.block_size} tokens "
                f"({num_prompt} prompt + {max_tokens} max_tokens) but the KV pool has only {num_usable} blocks "
                f"({num_usable * self.block_size} tokens). Raise --num-gpu-blocks-override or "
                "--gpu-memory-utilization, or lower max_tokens."
            )
        request.max_tokens = max_tokens
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._enqueue(request, front=False)

    def _enqueue(self, request: Request, front: bool) -> None:
        """Put a request into the waiting queue: with fcfs after every request that arrived no
        later (its back, unless it arrived before them: a beam search's next step keeps the
        search's arrival time, so a long search is not sent to the back of a busy queue at every
        token), or at its front (`front`: a preempted request); with priority in (priority,
        arrival_time) order, after equal keys."""
        if self.scheduling_policy == "priority":
            bisect.insort(self.waiting, request, key=_priority_key)
        elif front:
            self.waiting.appendleft(request)
        else:
            position = len(self.waiting)
            while position and self.waiting[position - 1].arrival_time > request.arrival_time:
                position -= 1
            self.waiting.insert(position, request)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts; allocate, preempt, swap as needed. The
        output's block tables are copies and its token lists slices: safe to read while the
        step runs."""
        budget = self.max_num_batched_tokens
        chunk_cap = self._chunk_cap()
        num_preemptions_before = self.num_preemptions
        scheduled: dict[str, int] = {}  # request id -> num_scheduled_tokens, in scheduling order
        blocks_to_swap_out: list[tuple[int, int]] = []
        blocks_to_swap_in: list[tuple[int, int]] = []
        admission_due = self._admission_due(self._clock())
        num_steps = self._num_steps_ahead(admission_due)
        drafts = self._propose_drafts()  # request id -> its drafts this step (kept: those that fit)
        if drafts:
            num_steps = 1

        # Admission order. Without a chunk cap only the newest running request can be mid-prefill
        # (a prefill chunk that does not finish its tokens takes the whole budget, so nothing is
        # admitted after it), hence no decode ever waits behind a prefill chunk. With one
        # (long_prefill_token_threshold) several can, each chunk at most the cap.
        index = 0
        while index < len(self.running) and budget > 0:  # fcfs victims leave from the end
            request = self.running[index]
            num_remaining = request.num_tokens - request.num_computed_tokens
            num_new_tokens, capped = self._chunk(num_remaining, budget, chunk_cap)
            if num_new_tokens == 0:  # it waits for a fuller budget, and nobody is admitted before it
                budget = 0
                break
            if request.request_id in drafts:  # a decode: its drafts take the budget it leaves
                drafts[request.request_id] = drafts[request.request_id][:budget - num_new_tokens]
                num_remaining += len(drafts[request.request_id])
                num_new_tokens = num_remaining
            # A multi-step decode writes the KV of its later steps' tokens too.
            fits, refund = self._allocate_or_preempt(request, num_new_tokens + num_steps - 1, scheduled,
                                                     blocks_to_swap_out)
            budget += refund
            if fits:
                scheduled[request.request_id] = num_new_tokens
                # A partial chunk takes the whole budget, even when it leaves a token of it unused
                # (unless the chunk cap, not the budget, cut it).
                budget = budget - num_new_tokens if num_new_tokens == num_remaining or capped else 0
            index = len(scheduled)  # running[:index] are the scheduled ones, whoever was preempted

        # With fcfs nobody is admitted after a preemption: the head of the queue is the oldest
        # victim, which (without a chunk cap) needs more blocks than are free anyway; a capped
        # first chunk could fit, and recomputing it at once would only preempt again. Either way
        # every swap-out comes before this step's swap-ins (as the runner copies them), so host
        # slots freed by a swap-in are never reused by a swap-out of the same step.
        drafts = {request_id: d for request_id, d in drafts.items() if d and request_id in scheduled}
        preempted = self.num_preemptions > num_preemptions_before
        if admission_due and not self.admission_paused and not (preempted and self.scheduling_policy == "fcfs"):
            num_draft_rows = sum(map(len, drafts.values()))
            budget = self._schedule_waiting(budget, scheduled, blocks_to_swap_in, num_draft_rows, chunk_cap)
        self._last_step_ran_prompt = any(
            self.requests[request_id].num_computed_tokens < self.requests[request_id].num_prompt_tokens
            for request_id in scheduled)
        self._last_num_decode_steps = num_steps if scheduled and not self._last_step_ran_prompt else 0

        finished_request_ids, self._finished_request_ids = self._finished_request_ids, set()
        return SchedulerOutput(
            scheduled=self._make_scheduled_requests(scheduled, drafts),
            total_num_scheduled_tokens=sum(scheduled.values()),
            finished_request_ids=finished_request_ids,
            blocks_to_swap_out=blocks_to_swap_out,
            blocks_to_swap_in=blocks_to_swap_in,
            num_steps=num_steps,
        )

    def _admission_due(self, now: float) -> bool:
        """Whether waiting requests may be admitted this step: always when nothing runs or
        nothing waits; not while the running requests finish first (_running_finish_first);
        then at once with no delay factor, else once the oldest waiting request has waited
        scheduler_delay_factor x the last prompt step's latency (vLLM V0's rule)."""
        if self._last_step_ran_prompt:
            self._last_prompt_latency = now - self._last_schedule_time
        elif self._last_num_decode_steps:
            self._last_decode_latency = (now - self._last_schedule_time) / self._last_num_decode_steps
        self._last_schedule_time = now
        if not self.running or not self.waiting:
            return True
        if self.scheduler_finish_first and self._running_finish_first():
            return False
        if self.scheduler_delay_factor == 0:
            return True
        return now - self.waiting[0].arrival_time > self.scheduler_delay_factor * self._last_prompt_latency

    def _running_finish_first(self) -> bool:
        """Whether to hold the waiting requests until the soonest running ones end: every running
        request is decoding, and for some j the j requests closest to their max_tokens all reach
        it within less than the latest prompt step's latency (at the latest decode step's
        latency), with that wait summed over the waiting requests less than one prompt step's
        stall summed over those j (they end before the next prefill instead of sitting through
        it). max_tokens bounds the remaining tokens from above (a stop may come sooner), so a
        wrong guess only shortens the hold. No hold before both latencies are measured."""
        if not (self._last_prompt_latency and self._last_decode_latency):
            return False
        remaining = []
        for request in self.running:
            if request.num_tokens - request.num_computed_tokens != 1:  # prefilling or recomputing
                return False
            remaining.append(request.max_tokens - request.num_output_tokens)
        for ending, tokens_left in enumerate(sorted(remaining), start=1):
            wait = tokens_left * self._last_decode_latency
            if wait >= self._last_prompt_latency:
                return False
            if len(self.waiting) * wait < ending * self._last_prompt_latency:
                return True
        return False

    def _num_steps_ahead(self, admission_due: bool) -> int:
        """num_scheduler_steps when this step can be a multi-step decode, else 1. It can when no
        request waits to be admitted this step (see _admission_due), every running request has
        exactly its last sampled token to compute (a decode, never a prompt's last token: the
        round's linears take every row as a decode) and samples nothing that needs the host
        between tokens (logprobs, penalties, logit_bias, min_tokens still pending, structured
        outputs) and has all the steps' tokens left before max_tokens and max_model_len (a
        request that would reach its cap inside the steps would waste the rest, and hold back
        the next request until they end), and the free blocks hold every lookahead token (so
        nobody is preempted). Stop tokens and strings are found afterwards: the engine records
        the steps' tokens one step at a time."""
        steps = self.num_scheduler_steps
        if steps == 1 or (self.waiting and admission_due) or not self.running:
            return 1
        new_blocks = 0
        for request in self.running:
            if (request.num_tokens - request.num_computed_tokens != 1 or not _samples_ahead(request)
                    or request.num_computed_tokens < request.num_prompt_tokens  # a prompt's last token
                    or request.num_computed_tokens + steps > self.max_model_len
                    or request.num_output_tokens + steps > request.max_tokens):
                return 1
            held = len(self.kv_cache_manager.req_to_blocks.get(request.request_id, ()))
            new_blocks += max(cdiv(request.num_computed_tokens + steps, self.block_size) - held, 0)
        if new_blocks > self.kv_cache_manager.block_pool.get_num_free_blocks():
            return 1
        return steps

    def _propose_drafts(self) -> dict[str, list[int]]:
        """Prompt-lookup drafts (speculative_config) of the running requests that decode their
        one pending token and can verify drafts (_verifies_drafts): request id -> drafts,
        each list cut so the request's tokens stay within max_tokens and max_model_len and the
        step's sampled rows (one per request and draft) within max_num_seqs."""
        config = self.speculative_config
        if config is None or not self.running:
            return {}
        most = config.num_drafts(len(self.running))
        rows_left = self.max_num_seqs - len(self.running)
        drafts = {}
        for request in self.running:
            if rows_left <= 0 or most <= 0:
                break
            if (request.num_tokens - request.num_computed_tokens != 1
                    or request.num_computed_tokens < request.num_prompt_tokens or not _verifies_drafts(request)):
                continue
            # Each draft kept brings one more output token, whose KV position must exist.
            num = min(most, rows_left, request.max_tokens - request.num_output_tokens - 1,
                      self.max_model_len - request.num_tokens)
            proposed = config.propose(request.all_token_ids, num)
            if proposed:
                drafts[request.request_id] = proposed
                rows_left -= len(proposed)
        return drafts

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, scheduled: dict[str, int],
                             blocks_to_swap_out: list) -> tuple[bool, int]:
        """Allocate room for a running request's new tokens, preempting until it fits. With fcfs
        the victim is the newest running request (never one scheduled already this step: those
        are older); with priority the one with the largest (priority, arrival_time), the newest
        among equals, which may be in `scheduled` (request id -> tokens): it leaves it. Returns
        whether `request` got its room (False: it was preempted itself) and the tokens that
        victims scheduled earlier give back to the budget."""
        refund = 0
        while self.kv_cache_manager.allocate_slots(request, num_new_tokens) is None:
            victim = (max(reversed(self.running), key=_priority_key) if self.scheduling_policy == "priority"
                      else self.running[-1])
            if victim.request_id in scheduled:
                refund += scheduled.pop(victim.request_id)
                self.kv_cache_manager.trim_to_computed(victim)  # blocks it took for this step
            self._preempt(victim, blocks_to_swap_out)
            if victim is request:
                return False, refund
        return True, refund

    def preempt_all(self) -> None:
        """Every running request back to the front of the queue (newest first, so the queue keeps
        their order), its blocks freed: it recomputes its prompt and output when scheduled again.
        For an engine that releases its KV cache with requests kept."""
        while self.running:
            request = self.running.pop()
            self.kv_cache_manager.free(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            self._enqueue(request, front=True)

    def _preempt(self, request: Request, blocks_to_swap_out: list[tuple[int, int]]) -> None:
        self.running.remove(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        mapping = self.kv_cache_manager.swap_out(request) if self.kv_cache_manager.num_swap_blocks else None
        if mapping is None:
            self.kv_cache_manager.free(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
        else:
            blocks_to_swap_out.extend(mapping)
            request.status = RequestStatus.SWAPPED
        self._enqueue(request, front=True)

    def _chunk_cap(self) -> int:
        """This step's long_prefill_token_threshold: off (0) unless another request runs or
        waits (one alone starves nobody), then at least the fair share with the adaptive rule."""
        num_requests = len(self.running) + len(self.waiting)
        if not self.long_prefill_token_threshold or num_requests < 2 or not self.enable_chunked_prefill:
            return 0
        # Under 3 tokens a capped chunk would leave or be a lone token (see chunk_length).
        cap = max(self.long_prefill_token_threshold, 3)
        if self.long_prefill_token_threshold_adaptive:
            return max(cap, self.max_num_batched_tokens // num_requests)
        return cap

    def _chunk(self, num_remaining: int, budget: int, chunk_cap: int) -> tuple[int, bool]:
        """(tokens of a request's next chunk, whether chunk_cap rather than the budget limits it):
        chunk_length within min(budget, chunk_cap); a cap under the budget is that chunk's full budget."""
        if 0 < chunk_cap < min(budget, num_remaining):
            return chunk_length(num_remaining, chunk_cap, chunk_cap), True
        return chunk_length(num_remaining, budget, self.max_num_batched_tokens), False

    def _schedule_waiting(self, budget: int, scheduled: dict[str, int], blocks_to_swap_in: list,
                          num_draft_rows: int = 0, chunk_cap: int = 0) -> int:
        """Admit waiting requests in queue order while they fit; returns the budget left. A request
        whose LoRA adapter does not fit max_loras is passed over and keeps its place. The step's
        sampled rows (one per request, plus num_draft_rows) stay within max_num_seqs."""
        now = self._clock()
        running_loras = {r.lora_int_id for r in self.running} - {0}
        deferred = []
        while self.waiting and budget > 0 and len(self.running) + num_draft_rows < self.max_num_seqs:
            request = self.waiting[0]
            if request.lora_int_id and request.lora_int_id not in running_loras:
                if len(running_loras) >= self.max_loras:
                    deferred.append(self.waiting.popleft())
                    continue
                running_loras.add(request.lora_int_id)
            computed_blocks, num_cached_tokens = [], request.num_computed_tokens
            if request.status != RequestStatus.SWAPPED:
                computed_blocks, num_cached_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_remaining = request.num_tokens - num_cached_tokens
            if num_remaining > budget and not self.enable_chunked_prefill:
                break
            num_new_tokens, capped = self._chunk(num_remaining, budget, chunk_cap)
            if num_new_tokens == 0:
                break
            if request.status == RequestStatus.SWAPPED:
                mapping = self.kv_cache_manager.swap_in(request, num_new_tokens)
                if mapping is None:
                    break
                blocks_to_swap_in.extend(mapping)
            else:
                if self.kv_cache_manager.allocate_slots(request, num_new_tokens, computed_blocks) is None:
                    break
                request.num_computed_tokens = num_cached_tokens
                if self.kv_cache_manager.enable_caching:
                    self.prefix_cache_queries += request.num_tokens
                    self.prefix_cache_hits += num_cached_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                request.num_cached_tokens = num_cached_tokens
                num_prompt_cached = min(num_cached_tokens, request.num_prompt_tokens)
                self.prompt_tokens_cached += num_prompt_cached
                self.prompt_tokens_computed += request.num_prompt_tokens - num_prompt_cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = num_new_tokens
            budget = budget - num_new_tokens if num_new_tokens == num_remaining or capped else 0
        self.waiting.extendleft(reversed(deferred))
        return budget

    def _make_scheduled_requests(self, scheduled: dict[str, int],
                                 drafts: dict[str, list[int]]) -> list[ScheduledRequest]:
        out = []
        for request_id, num_new_tokens in scheduled.items():
            request = self.requests[request_id]
            start = request.num_computed_tokens
            request_drafts = drafts.get(request_id, [])
            end = start + num_new_tokens - len(request_drafts)  # past the request's known tokens it computes
            out.append(
                ScheduledRequest(
                    request_id=request_id,
                    token_ids=request.all_token_ids[start:end] + request_drafts,
                    start_position=start,
                    block_table=self.kv_cache_manager.get_block_ids(request_id),
                    sample=end == request.num_tokens,
                    sampling_params=request.sampling_params,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=request.output_token_ids,
                    eos_token_ids=request.eos_token_ids,
                    num_draft_tokens=len(request_drafts),
                )
            )
        # Decodes (chunks of generated tokens only) first, then chunks with prompt tokens (a
        # stable sort keeps admission order within each): the runner tells the model how many
        # rows are decodes (AttentionMetadata.num_decode_tokens).
        out.sort(key=lambda s: not s.is_decode)
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, int],
                           token_index: int = 0) -> list[Request]:
        """Record a finished step: advance num_computed_tokens, append each sampled token, stop
        requests that hit a length cap or a token stop (freeing their blocks). Returns the
        requests that got a new token, finished or not, in batch order.

        A step that gives a request several tokens (a multi-step round, or drafts kept) is
        recorded once per token, token_index 0, 1, ...: call k > 0 holds the requests that got a
        k-th token (whose previous token's KV the step computed: a round's later step, or a kept
        draft), so a request that stops drops the tokens after the stop."""
        now = self._clock()
        updated = []
        for scheduled_request in scheduler_output.scheduled:
            request = self.requests.get(scheduled_request.request_id)
            if request is None:  # aborted while the step ran
                continue
            if token_index == 0:
                num_known = scheduled_request.num_scheduled_tokens - scheduled_request.num_draft_tokens
                request.num_computed_tokens += num_known
            elif request.request_id in sampled_token_ids:
                request.num_computed_tokens += 1
            else:
                continue
            if not scheduled_request.sample:
                continue
            if request.request_id not in sampled_token_ids:
                raise ValueError(f"No sampled token for request {request.request_id!r}, which sampled this step.")
            request.append_output_token(sampled_token_ids[request.request_id], now)
            updated.append(request)
            status, stop_reason = self._check_stop(request)
            if status is not None:
                self._finish(request, status, stop_reason, now)
        return updated

    def _check_stop(self, request: Request) -> tuple[RequestStatus | None, int | str | None]:
        """vLLM v1's order (0.32's check_stop): once min_tokens are out, eos (unless ignore_eos)
        and stop_token_ids, so a stop token that is also the last allowed token ends as "stop";
        then the length caps (max_tokens, max_model_len), which min_tokens never holds back; then,
        once min_tokens are out, repetition_detection."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            last_token_id = request.output_token_ids[-1]
            if not params.ignore_eos and last_token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if last_token_id in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, last_token_id
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED, None
        detection = params.repetition_detection
        if (detection is not None and request.num_output_tokens >= params.min_tokens
                and detection.ends_in_repetition(request.output_token_ids)):
            return RequestStatus.FINISHED_REPETITION, "repetition_detected"
        return None, None

    def finish_requests(
        self, request_ids: str | list[str], status: RequestStatus, stop_reason: int | str | None = None
    ) -> None:
        """End requests in any state (the engine found a stop string, or an abort) and free all
        their blocks. Unknown or already finished ids are ignored."""
        if not status.is_finished():
            raise ValueError(f"finish_requests needs a FINISHED_* status, got {status.name}.")
        now = self._clock()
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, status, stop_reason, now)

    def abort_requests(self, request_ids: str | list[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None, now: float) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.stop_reason = stop_reason
        request.finished_time = now
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._finished_request_ids.add(request.request_id)

    def get_stats(self) -> SchedulerStats:
        """Counters and gauges; kv_waste_slots is exact between steps (after update_from_output)."""
        waste = sum(
            len(self.kv_cache_manager.req_to_blocks.get(r.request_id, ())) * self.block_size - r.num_computed_tokens
            for r in self.running
        )
        # The engine takes these stats after every step: with LoRA off, skip the walk over the queue.
        running_loras = {r.lora_int_id: r.lora_request.lora_name for r in self.running if r.lora_int_id}
        waiting_loras = {}
        if self.max_loras:
            waiting_loras = {r.lora_int_id: r.lora_request.lora_name for r in self.waiting if r.lora_int_id}
        lora_budget_full = len(running_loras) >= self.max_loras
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_waiting_deferred=sum(lora_budget_full and r.lora_int_id not in running_loras
                                     for r in self.waiting if r.lora_int_id) if waiting_loras else 0,
            kv_cache_usage=self.kv_cache_manager.block_pool.get_usage(),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            prompt_tokens_cached=self.prompt_tokens_cached,
            prompt_tokens_computed=self.prompt_tokens_computed,
            kv_waste_slots=waste,
            running_lora_adapters=tuple(running_loras.values()),
            waiting_lora_adapters=tuple(waiting_loras.values()),
        )
