"""Scheduler tests against a fake paged runner and an unpaged oracle.

The fake runner keeps a paged "KV pool" that stores, per slot, the token whose KV would live
there. Each step it performs the swap copies, writes every scheduled token through the block
table, then reads back every scheduled request's whole context through its block table and
checks it against the request's true tokens, as real attention would read it. Its "model"
samples a token that depends on the whole context, so any block-table, prefix-cache, preemption
or swap bug changes the outputs, which are compared with an unpaged oracle.
"""

import collections
import itertools
import random
import sys

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jpaged.engine.block_manager import cdiv
from jpaged.engine.request import Request, RequestStatus
from jpaged.engine import scheduler as scheduler_module
from jpaged.engine.scheduler import Scheduler
from jpaged.engine.scheduler_output import SchedulerOutput
from jpaged.engine.speculative import SpeculativeConfig
from jpaged.lora import LoRARequest
from jpaged.sampling_params import SamplingParams
from jpaged.structured_output import StructuredOutputsParams

VOCAB = 50
EOS = 0


def next_token(context: list[int]) -> int:
    """The fake model: a token that depends on every context token and its position."""
    return (sum((i + 1) * (t + 1) for i, t in enumerate(context)) * 2654435761 >> 7) % VOCAB


def oracle_output(prompt: list[int], params: SamplingParams, max_tokens: int, max_model_len: int) -> list[int]:
    """Unpaged generation with vLLM v1's stop order."""
    tokens, out = list(prompt), []
    while True:
        token = next_token(tokens)
        out.append(token)
        tokens.append(token)
        if len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out
        if len(out) >= params.min_tokens and (
            (not params.ignore_eos and token == EOS) or token in params.stop_token_ids
        ):
            return out


class FakeRunner:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.device: dict[tuple[int, int], int] = {}  # (block id, offset) -> token id
        self.host: dict[int, dict[int, int]] = {}  # host slot -> offset -> token id

    def execute(self, scheduler_output) -> list[dict[str, int]]:
        """The new tokens of each sampling request, one dict per token index: a multi-step
        round's steps, or a request's drafts kept and the token after them (as the engine keeps them)."""
        if scheduler_output.num_steps > 1:
            return self.execute_decode_steps(scheduler_output)
        contexts = self.write_and_read(scheduler_output)
        steps = [{}]
        for scheduled in scheduler_output.scheduled:
            if not scheduled.sample:
                continue
            context, num_drafts = contexts[scheduled.request_id], scheduled.num_draft_tokens
            known = len(context) - num_drafts
            for index in range(num_drafts + 1):
                token = next_token(context[:known + index])
                if index == len(steps):
                    steps.append({})
                steps[index][scheduled.request_id] = token
                if index == num_drafts or context[known + index] != token:
                    break
        return steps

    def execute_decode_steps(self, scheduler_output) -> list[dict[str, int]]:
        """A multi-step decode: each step writes the token the previous one sampled."""
        bs, steps = self.block_size, []
        pending = {s.request_id: s.token_ids for s in scheduler_output.scheduled}
        for step in range(scheduler_output.num_steps):
            sampled = {}
            for scheduled in scheduler_output.scheduled:
                assert scheduled.sample and scheduled.num_scheduled_tokens == 1
                assert scheduled.start_position >= len(scheduled.prompt_token_ids), "a round runs decodes only"
                position = scheduled.start_position + step
                self.device[(scheduled.block_table[position // bs], position % bs)] = pending[scheduled.request_id][0]
                context = [self.device[(scheduled.block_table[p // bs], p % bs)] for p in range(position + 1)]
                sampled[scheduled.request_id] = next_token(context)
                pending[scheduled.request_id] = [sampled[scheduled.request_id]]
            steps.append(sampled)
        return steps

    def execute_step(self, scheduler_output) -> dict[str, int]:
        """A step without drafts: each sampling request's next token."""
        contexts = self.write_and_read(scheduler_output)
        return {s.request_id: next_token(contexts[s.request_id]) for s in scheduler_output.scheduled if s.sample}

    def write_and_read(self, scheduler_output) -> dict[str, list[int]]:
        """Runs the block copies, writes every scheduled token (drafts too) through the block
        tables, then reads each request's context back (its known tokens checked against the
        truth): request id -> the tokens at positions 0 .. its last scheduled one."""
        bs = self.block_size
        for block_id, slot in scheduler_output.blocks_to_swap_out:
            self.host[slot] = {o: self.device[(block_id, o)] for o in range(bs) if (block_id, o) in self.device}
        for slot, block_id in scheduler_output.blocks_to_swap_in:
            for offset in range(bs):
                self.device.pop((block_id, offset), None)
            self.device.update({(block_id, o): t for o, t in self.host.pop(slot).items()})
        writer_of_block: dict[int, str] = {}
        for scheduled in scheduler_output.scheduled:
            assert 0 not in scheduled.block_table, "the null block is handed out"
            for i, token in enumerate(scheduled.token_ids):
                position = scheduled.start_position + i
                block_id = scheduled.block_table[position // bs]
                assert writer_of_block.setdefault(block_id, scheduled.request_id) == scheduled.request_id, (
                    f"block {block_id} has two writers in one step"
                )
                self.device[(block_id, position % bs)] = token
        contexts = {}
        for scheduled in scheduler_output.scheduled:
            end = scheduled.start_position + scheduled.num_scheduled_tokens
            known_end = end - scheduled.num_draft_tokens
            truth = scheduled.prompt_token_ids + scheduled.output_token_ids
            start = scheduled.start_position
            assert scheduled.token_ids[:known_end - start] == truth[start:known_end]
            assert scheduled.sample == (known_end == len(truth))
            context = [self.device.get((scheduled.block_table[p // bs], p % bs)) for p in range(end)]
            assert context[:known_end] == truth[:known_end], (
                f"request {scheduled.request_id} reads a corrupted KV context")
            contexts[scheduled.request_id] = context
        return contexts


def check_step(scheduler: Scheduler, scheduler_output) -> None:
    scheduled = scheduler_output.scheduled
    assert scheduler_output.total_num_scheduled_tokens == sum(s.num_scheduled_tokens for s in scheduled)
    assert scheduler_output.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduled) <= scheduler.max_num_seqs
    assert sum(s.num_sample_rows for s in scheduled) <= scheduler.max_num_seqs
    assert len({s.request_id for s in scheduled}) == len(scheduled)
    # The engine may skip a step with nothing scheduled, so block copies never come alone.
    assert scheduled or not (scheduler_output.blocks_to_swap_out or scheduler_output.blocks_to_swap_in)
    is_decode = [s.start_position >= len(s.prompt_token_ids) for s in scheduled]  # generated tokens only
    assert is_decode == sorted(is_decode, reverse=True), "decodes must come first in the batch"
    if not scheduler.enable_chunked_prefill:
        assert all(s.sample for s in scheduled), "a prompt was chunked with chunked prefill off"
    for s in scheduled:
        assert s.num_scheduled_tokens >= 1
        num_left = len(s.prompt_token_ids) + len(s.output_token_ids) - s.start_position - s.num_scheduled_tokens
        if num_left > 0 and scheduler.max_num_batched_tokens >= 3:  # a partial chunk: see chunk_length
            assert s.num_scheduled_tokens >= 2 and num_left >= 2, "a token was left alone in a chunk"
        assert len(s.block_table) * scheduler.block_size >= s.start_position + s.num_scheduled_tokens
        assert s.block_table == scheduler.kv_cache_manager.get_block_ids(s.request_id)


def check_invariants(scheduler: Scheduler) -> None:
    """Block accounting and request-state invariants that hold between steps."""
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    bs = scheduler.block_size
    holders = collections.Counter()
    assert manager.req_to_block_ids.keys() == manager.req_to_blocks.keys()
    for request_id, blocks in manager.req_to_blocks.items():
        assert scheduler.requests[request_id].status == RequestStatus.RUNNING
        block_ids = [b.block_id for b in blocks]
        assert manager.req_to_block_ids[request_id] == block_ids
        assert 0 not in block_ids and len(set(block_ids)) == len(block_ids)
        holders.update(block_ids)
    for block in pool.blocks:
        assert block.ref_cnt == holders[block.block_id] >= 0
    free = {b.block_id for b in pool.free_block_queue.get_all_free_blocks()}
    assert free == {b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0}
    assert pool.free_block_queue.num_free_blocks == len(free)
    for block_hash, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == block_hash
    assert all(pool.cached_block_hash_to_block[b.block_hash] is b for b in pool.blocks if b.block_hash is not None)
    assert pool.null_block.block_hash is None and pool.null_block.ref_cnt == 0

    # Blocks taken for drafts that were not kept stay with their request (its next drafts use them).
    lookahead = 0 if scheduler.speculative_config is None else scheduler.speculative_config.num_speculative_tokens
    running_ids = [r.request_id for r in scheduler.running]
    waiting_ids = [r.request_id for r in scheduler.waiting]
    assert len(running_ids) <= scheduler.max_num_seqs
    assert sorted(running_ids + waiting_ids) == sorted(scheduler.requests)
    mid_prefill = [r for r in scheduler.running if r.num_tokens - r.num_computed_tokens > 1]
    if not scheduler.long_prefill_token_threshold:  # with a chunk cap several prompts share the steps
        assert mid_prefill in ([], scheduler.running[-1:]), "only the newest running request may be mid-prefill"
    for request in scheduler.running:
        assert request.status == RequestStatus.RUNNING
        assert 0 < request.num_computed_tokens < request.num_tokens
        num_blocks = len(manager.req_to_blocks[request.request_id])
        assert cdiv(request.num_computed_tokens, bs) <= num_blocks <= cdiv(request.num_computed_tokens + lookahead, bs)
        assert num_blocks * bs - request.num_computed_tokens < bs + lookahead, "KV waste of a block or more"
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.SWAPPED)
        assert request.request_id not in manager.req_to_blocks
        if request.status == RequestStatus.SWAPPED:
            slots = manager.req_to_host_slots[request.request_id]
            assert len(slots) == cdiv(request.num_computed_tokens, bs)
        else:
            assert request.num_computed_tokens == 0
    held_slots = [s for slots in manager.req_to_host_slots.values() for s in slots]
    all_slots = held_slots + manager._free_host_slots
    assert sorted(all_slots) == list(range(manager.num_swap_blocks))
    stats = scheduler.get_stats()
    assert stats.kv_waste_slots < (bs + lookahead) * max(1, len(scheduler.running))
    assert 0.0 <= stats.kv_cache_usage <= 1.0


def check_all_free(scheduler: Scheduler) -> None:
    """With no requests left every block but the null block is free and cached ones reusable."""
    pool = scheduler.kv_cache_manager.block_pool
    assert not scheduler.has_unfinished_requests()
    assert pool.get_num_free_blocks() == pool.num_blocks - 1
    assert scheduler.get_stats().kv_cache_usage == 0.0
    free = set(pool.free_block_queue.get_all_free_blocks())
    assert all(block in free for block in pool.cached_block_hash_to_block.values())
    assert scheduler.kv_cache_manager.num_free_host_slots == scheduler.kv_cache_manager.num_swap_blocks


class Harness:
    """A scheduler, the fake runner and the oracle's expected outputs."""

    def __init__(self, **scheduler_kwargs) -> None:
        # By default a clock that ticks per call: the finish-first hold reads step latencies, which
        # the wall clock makes depend on the machine's load (the tests then held requests at random).
        ticks = itertools.count()
        scheduler_kwargs.setdefault("clock", lambda: next(ticks) * 0.01)
        self.scheduler = Scheduler(**scheduler_kwargs)
        self.runner = FakeRunner(self.scheduler.block_size)
        self.expected: dict[str, list[int]] = {}
        self.finished: dict[str, Request] = {}
        self.batches: list = []
        self.drafts_kept = 0  # of the drafts scheduled (ScheduledRequest.num_draft_tokens)

    def add(self, request_id: str, prompt: list[int], lora_request=None, priority: int = 0, **params) -> Request:
        request = Request(request_id, prompt, SamplingParams(**params), eos_token_ids=(EOS,), lora_request=lora_request,
                          priority=priority)
        self.scheduler.add_request(request)
        self.expected[request_id] = oracle_output(
            prompt, request.sampling_params, request.max_tokens, self.scheduler.max_model_len
        )
        return request

    def step(self) -> list[Request]:
        running_before = {r.request_id for r in self.scheduler.running}
        num_preemptions_before = self.scheduler.num_preemptions
        out = self.scheduler.schedule()
        check_step(self.scheduler, out)
        # fcfs: the victim heads the queue and blocks it. With priority a request ahead of it may fit.
        if self.scheduler.num_preemptions > num_preemptions_before and self.scheduler.scheduling_policy == "fcfs":
            assert {s.request_id for s in out.scheduled} <= running_before, "admitted in a step that preempted"
        self.batches.append(out)
        updated = []
        # As the engine does: each decode step's tokens in turn, for the requests still running.
        for step, sampled in enumerate(self.runner.execute(out)):
            if out.num_steps == 1:
                self.drafts_kept += len(sampled) if step else 0
            sampled = {rid: token for rid, token in sampled.items() if rid in self.scheduler.requests}
            if step and not sampled:
                break
            updated += self.scheduler.update_from_output(out, sampled, step)
        for request in updated:
            expected = self.expected[request.request_id]
            assert request.output_token_ids == expected[: request.num_output_tokens]
            if request.is_finished():
                assert request.output_token_ids == expected
                self.finished[request.request_id] = request
        check_invariants(self.scheduler)
        return updated

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError(f"requests left after {max_steps} steps: {self.scheduler.requests}")


def random_prompts(rng: random.Random, num: int, max_len: int) -> list[list[int]]:
    bases = [[rng.randrange(1, VOCAB) for _ in range(max_len)] for _ in range(3)]
    prompts = []
    for _ in range(num):
        length = rng.randint(1, max_len)
        shared = rng.randint(0, length)
        prompts.append(rng.choice(bases)[:shared] + [rng.randrange(1, VOCAB) for _ in range(length - shared)])
    return prompts


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("chunked_prefill, long_prefill_token_threshold", [(True, 0), (False, 0), (True, 5)])
@pytest.mark.parametrize("num_swap_blocks", [0, 6, 64])
def test_tiny_pool_preempts_and_every_request_matches_the_oracle(prefix_caching, chunked_prefill,
                                                                 long_prefill_token_threshold, num_swap_blocks):
    harness = Harness(
        num_blocks=14,
        block_size=4,
        max_num_seqs=6,
        max_num_batched_tokens=48 if chunked_prefill else 64,
        max_model_len=48,
        enable_prefix_caching=prefix_caching,
        enable_chunked_prefill=chunked_prefill,
        num_swap_blocks=num_swap_blocks,
        long_prefill_token_threshold=long_prefill_token_threshold,
    )
    rng = random.Random(0)
    for i, prompt in enumerate(random_prompts(rng, 24, 30)):
        harness.add(f"r{i}", prompt, max_tokens=rng.randint(1, 48 - len(prompt)), ignore_eos=rng.random() < 0.5)
    harness.run()
    assert sorted(harness.finished) == sorted(harness.expected)
    stats = harness.scheduler.get_stats()
    assert stats.num_preemptions > 0, "the pool is meant to be too small for the batch"
    assert sum(r.num_preemptions for r in harness.finished.values()) == stats.num_preemptions
    swapped = sum(len(out.blocks_to_swap_out) for out in harness.batches)
    assert (swapped > 0) == (num_swap_blocks > 0)
    assert sum(len(out.blocks_to_swap_in) for out in harness.batches) == swapped
    if prefix_caching:
        assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
    else:
        assert stats.prefix_cache_queries == stats.prefix_cache_hits == 0
    check_all_free(harness.scheduler)


def test_swap_falls_back_to_recompute_when_host_slots_are_full():
    harness = Harness(
        num_blocks=9, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, num_swap_blocks=3
    )
    rng = random.Random(1)
    # 4 x 2 blocks fill the pool; when all four need a third block the first victim swaps its
    # 2 blocks into the 3 host slots and the second victim no longer fits there.
    for i in range(4):
        harness.add(f"r{i}", [rng.randrange(1, VOCAB) for _ in range(5)], max_tokens=20, ignore_eos=True)
    statuses = set()
    while harness.scheduler.has_unfinished_requests():
        harness.step()
        statuses.update(r.status for r in harness.scheduler.waiting)
    assert {RequestStatus.SWAPPED, RequestStatus.PREEMPTED} <= statuses
    check_all_free(harness.scheduler)


def test_token_budget_and_max_num_seqs_hold_and_long_prompts_are_chunked():
    harness = Harness(num_blocks=200, block_size=4, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=128)
    harness.add("long", list(range(1, 101)), max_tokens=4, ignore_eos=True)
    for i in range(5):
        harness.add(f"r{i}", [i + 1] * 5, max_tokens=6, ignore_eos=True)
    harness.run()
    sizes = [out.total_num_scheduled_tokens for out in harness.batches]
    assert max(sizes) == 16
    assert max(len(out.scheduled) for out in harness.batches) == 3
    long_chunks = [s.num_scheduled_tokens for out in harness.batches for s in out.scheduled if s.request_id == "long"]
    assert long_chunks[:6] == [16] * 6 and sum(long_chunks) == 100 + 3


def test_decodes_are_never_starved_by_a_long_prefill():
    harness = Harness(num_blocks=200, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=256)
    harness.add("a", [3, 4, 5], max_tokens=40, ignore_eos=True)
    harness.add("b", [6, 7], max_tokens=40, ignore_eos=True)
    harness.step()
    harness.add("long", list(range(1, 200)), max_tokens=2, ignore_eos=True)
    while "long" not in harness.finished:
        out = harness.scheduler.schedule()
        check_step(harness.scheduler, out)
        assert [s.request_id for s in out.scheduled[:2]] == ["a", "b"]
        assert all(s.num_scheduled_tokens == 1 for s in out.scheduled[:2])
        harness.batches.append(out)
        for request in harness.scheduler.update_from_output(out, harness.runner.execute_step(out)):
            if request.is_finished():
                harness.finished[request.request_id] = request
    assert harness.finished["long"].output_token_ids == harness.expected["long"]


@pytest.mark.parametrize("adaptive", [False, True])
def test_long_prefill_token_threshold_caps_chunks_while_other_requests_run_or_wait(adaptive):
    """vLLM's --long-prefill-token-threshold: a long prompt alone takes the whole budget; while
    another request waits or runs its chunks are capped (adaptive: at least 16 // 2 requests = 8),
    the rest of the budget admits the other at once, and the outputs are unchanged."""
    harness = Harness(num_blocks=200, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128,
                      long_prefill_token_threshold=3 if adaptive else 6,
                      long_prefill_token_threshold_adaptive=adaptive)
    harness.add("long", list(range(1, 61)), max_tokens=2, ignore_eos=True)
    harness.step()
    harness.add("short", [7, 8, 9, 10, 11], max_tokens=3, ignore_eos=True)
    harness.run()
    chunks = {request_id: [s.num_scheduled_tokens for out in harness.batches for s in out.scheduled
                           if s.request_id == request_id] for request_id in ("long", "short")}
    cap = 8 if adaptive else 6
    assert chunks["long"][:5] == [16, cap, cap, cap, 16]  # short runs in steps 2-4, then long is alone again
    assert chunks["short"] == [5, 1, 1]
    assert sorted(harness.finished) == ["long", "short"]
    check_all_free(harness.scheduler)


def test_waiting_requests_are_admitted_first_come_first_served():
    harness = Harness(num_blocks=40, block_size=4, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64)
    for i in range(6):
        harness.add(f"r{i}", [i + 1] * (3 + 2 * i), max_tokens=3, ignore_eos=True)
    harness.run()
    first_seen = []
    for out in harness.batches:
        first_seen += [s.request_id for s in out.scheduled if s.request_id not in first_seen]
    assert first_seen == [f"r{i}" for i in range(6)]
    times = [harness.finished[f"r{i}"].first_scheduled_time for i in range(6)]
    assert times == sorted(times)


def first_scheduled_order(harness: Harness) -> list[str]:
    first_seen = []
    for out in harness.batches:
        first_seen += [s.request_id for s in out.scheduled if s.request_id not in first_seen]
    return first_seen


def test_fcfs_queues_by_arrival_so_an_earlier_arrival_overtakes_later_ones():
    """A request that arrived before others in the queue (a beam search's next step carries the
    search's arrival time) is admitted before them; equal times keep the order they were added in."""
    harness = Harness(num_blocks=40, block_size=4, max_num_seqs=1, max_num_batched_tokens=8, max_model_len=64)
    for i, arrival in enumerate([10.0, 20.0, 20.0, 30.0]):
        request = Request(f"r{i}", [i + 1] * 3, SamplingParams(max_tokens=2, ignore_eos=True), eos_token_ids=(EOS,),
                          arrival_time=arrival)
        harness.scheduler.add_request(request)
    harness.scheduler.add_request(Request("step", [7] * 3, SamplingParams(max_tokens=1, ignore_eos=True),
                                          eos_token_ids=(EOS,), arrival_time=15.0))
    assert [r.request_id for r in harness.scheduler.waiting] == ["r0", "step", "r1", "r2", "r3"]
    while harness.scheduler.has_unfinished_requests():
        out = harness.scheduler.schedule()
        harness.scheduler.update_from_output(out, {r.request_id: 5 for r in out.scheduled if r.sample})
        harness.batches.append(out)
    assert first_scheduled_order(harness) == ["r0", "step", "r1", "r2", "r3"]
    check_all_free(harness.scheduler)


def test_priority_policy_admits_by_priority_then_arrival_and_never_preempts_for_a_waiting_request():
    harness = Harness(num_blocks=40, block_size=4, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64,
                      scheduling_policy="priority")
    priorities = [2, 0, 1, 0, 2, 1]
    for i, priority in enumerate(priorities):
        harness.add(f"r{i}", [i + 1] * (3 + 2 * i), priority=priority, max_tokens=3, ignore_eos=True)
    harness.step()
    harness.step()
    assert [r.request_id for r in harness.scheduler.running] == ["r1", "r3"]
    harness.add("urgent", [9] * 4, priority=-1, max_tokens=3, ignore_eos=True)  # overtakes the queue, not r1 or r3
    harness.run()
    assert first_scheduled_order(harness) == ["r1", "r3", "urgent", "r2", "r5", "r0", "r4"]
    assert harness.scheduler.num_preemptions == 0
    check_all_free(harness.scheduler)


@pytest.mark.parametrize("policy, victim", [("fcfs", "high"), ("priority", "low")])
@pytest.mark.parametrize("num_blocks", [8, 9])
def test_priority_policy_preempts_the_lowest_priority_running_request_not_the_newest(policy, victim, num_blocks):
    """Blocks of 4 tokens: "low" (admitted first) and "high" grow until the pool is full. With 7
    usable blocks "high" finds no block for its 25th token, "low" being scheduled in that step
    already; with 8 "low" finds none for its 33rd. fcfs preempts the newest request, "high";
    priority preempts "low", taking it out of the step or preempting it before "high" runs."""
    harness = Harness(num_blocks=num_blocks, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                      max_model_len=32, scheduling_policy=policy)
    low = harness.add("low", list(range(1, 9)), priority=1 if policy == "priority" else 0, max_tokens=20,
                      ignore_eos=True)
    harness.step()
    high = harness.add("high", list(range(11, 17)), max_tokens=20, ignore_eos=True)
    while not harness.scheduler.num_preemptions:
        harness.step()
    survivor = "low" if victim == "high" else "high"
    assert [s.request_id for s in harness.batches[-1].scheduled] == [survivor]
    assert [r.request_id for r in harness.scheduler.waiting] == [victim]
    harness.run()
    assert (low.num_preemptions, high.num_preemptions) == ((0, 1) if victim == "high" else (1, 0))
    check_all_free(harness.scheduler)


def test_a_request_that_does_not_fit_yet_blocks_the_queue_behind_it():
    harness = Harness(num_blocks=9, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    harness.add("a", [1] * 16, max_tokens=8, ignore_eos=True)  # 4 blocks, grows to 6
    harness.step()
    harness.add("big", [2] * 20, max_tokens=1)  # 5 blocks: does not fit while "a" runs
    harness.add("small", [3], max_tokens=1)  # would fit, but must not overtake "big"
    harness.step()
    assert [s.request_id for s in harness.batches[-1].scheduled] == ["a"]
    harness.run()
    first_step = {}
    for step, out in enumerate(harness.batches):
        for s in out.scheduled:
            first_step.setdefault(s.request_id, step)
    assert first_step["a"] < first_step["big"] <= first_step["small"]


def test_running_requests_hold_at_most_max_loras_adapters():
    """max_loras 2: a request with a third adapter is deferred at the head of the queue until a
    running adapter's requests have all ended; the requests behind it, without an adapter or with
    a running one, are admitted meanwhile (vLLM's rule), and the stats name the adapters."""
    harness = Harness(num_blocks=80, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                      max_loras=2)
    adapters = [1, None, 2, 1, 3, None, 2]
    max_tokens = [3, 9, 9, 4, 2, 2, 2]
    for i, (lora_id, tokens) in enumerate(zip(adapters, max_tokens)):
        lora = None if lora_id is None else LoRARequest(f"a{lora_id}", lora_id, "/adapters")
        harness.add(f"r{i}", [i + 1] * 6, lora_request=lora, max_tokens=tokens, ignore_eos=True)
    running_adapters = []
    harness.step()
    stats = harness.scheduler.get_stats()
    assert [r.request_id for r in harness.scheduler.waiting] == ["r4"]
    assert (stats.num_waiting, stats.num_waiting_deferred) == (1, 1)
    assert (stats.running_lora_adapters, stats.waiting_lora_adapters) == (("a1", "a2"), ("a3",))
    while harness.scheduler.has_unfinished_requests():
        harness.step()
        running_adapters.append({r.lora_int_id for r in harness.scheduler.running} - {0})
    assert max(len(a) for a in running_adapters) == 2
    first_step = {}
    for step, out in enumerate(harness.batches):
        for s in out.scheduled:
            first_step.setdefault(s.request_id, step)
    last_step_of_a1 = max(i for i, out in enumerate(harness.batches)
                          if {"r0", "r3"} & {s.request_id for s in out.scheduled})
    assert {first_step[f"r{i}"] for i in (0, 1, 2, 3, 5, 6)} == {0}
    assert first_step["r4"] == last_step_of_a1 + 1  # waits for adapter 1's end
    assert harness.scheduler.get_stats().num_waiting_deferred == 0
    assert len(harness.finished) == 7
    check_all_free(harness.scheduler)


def test_second_request_with_the_same_prefix_reuses_its_blocks_and_reports_hits():
    harness = Harness(num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    prefix = list(range(10, 22))  # 3 full blocks
    harness.add("a", prefix + [1, 2], max_tokens=2, ignore_eos=True)
    harness.run()
    free_before = harness.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    second = harness.add("b", prefix + [7, 8, 9], max_tokens=2, ignore_eos=True)
    harness.step()
    (scheduled,) = harness.batches[-1].scheduled
    assert scheduled.start_position == 12 and scheduled.token_ids == [7, 8, 9]
    first_blocks = [s.block_table for out in harness.batches[:1] for s in out.scheduled][0]
    assert scheduled.block_table[:3] == first_blocks[:3]
    # Only one new block was taken out of the pool (the 3 hits were free but cached).
    assert harness.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_before - 4
    assert second.num_cached_tokens == 12
    stats = harness.scheduler.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (14 + 15, 12)
    harness.run()
    check_all_free(harness.scheduler)


def test_n_siblings_scheduled_together_share_the_prompt_blocks():
    harness = Harness(num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    prompt = list(range(1, 11))
    for i in range(3):
        harness.add(f"{i}_req", prompt, max_tokens=5, ignore_eos=True, temperature=0.0)
    harness.step()
    tables = [s.block_table for s in harness.batches[0].scheduled]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3  # each writes its own partial last block
    assert [s.num_scheduled_tokens for s in harness.batches[0].scheduled] == [10, 2, 2]
    harness.run()
    check_all_free(harness.scheduler)


def test_stop_conditions_follow_vllm_v1s_order():
    """Once min_tokens are out, eos and stop ids first (also on the last allowed token, as vLLM
    0.32's check_stop), then the length caps (min_tokens never holds a request past them)."""
    scheduler = Scheduler(num_blocks=48, block_size=4, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=20)
    specs = {
        "eos": (SamplingParams(max_tokens=10), [5, EOS], RequestStatus.FINISHED_STOPPED, None),
        "min_tokens": (SamplingParams(max_tokens=10, min_tokens=3), [EOS, EOS, EOS], RequestStatus.FINISHED_STOPPED, None),
        "ignore_eos": (SamplingParams(max_tokens=3, ignore_eos=True), [EOS, EOS, EOS], RequestStatus.FINISHED_LENGTH_CAPPED, None),
        "stop_id": (SamplingParams(max_tokens=10, stop_token_ids=[7]), [5, 7], RequestStatus.FINISHED_STOPPED, 7),
        "length": (SamplingParams(max_tokens=2), [5, 6], RequestStatus.FINISHED_LENGTH_CAPPED, None),
        "model_len": (SamplingParams(max_tokens=None), [5] * 16, RequestStatus.FINISHED_LENGTH_CAPPED, None),
        "eos_at_length": (SamplingParams(max_tokens=2), [5, EOS], RequestStatus.FINISHED_STOPPED, None),
        "stop_id_at_model_len": (SamplingParams(max_tokens=None, stop_token_ids=[7]), [5] * 15 + [7],
                                 RequestStatus.FINISHED_STOPPED, 7),
        "min_over_len": (SamplingParams(max_tokens=None, min_tokens=99), [EOS] * 16, RequestStatus.FINISHED_LENGTH_CAPPED, None),
    }
    requests = {}
    for name, (params, _, _, _) in specs.items():
        requests[name] = Request(name, [1, 2, 3, 4], params, eos_token_ids=(EOS,))
        scheduler.add_request(requests[name])
    assert requests["model_len"].max_tokens == 16
    reported = set()
    for step in range(16):
        out = scheduler.schedule()
        reported |= out.finished_request_ids
        tokens = {s.request_id: specs[s.request_id][1][step] for s in out.scheduled}
        scheduler.update_from_output(out, tokens)
    assert not scheduler.has_unfinished_requests()
    for name, (_, tokens, status, stop_reason) in specs.items():
        request = requests[name]
        assert (request.output_token_ids, request.status, request.stop_reason) == (tokens, status, stop_reason), name
        assert request.finish_reason == {RequestStatus.FINISHED_STOPPED: "stop"}.get(status, "length")
        assert request.arrival_time <= request.first_scheduled_time <= request.first_token_time
        assert request.first_token_time <= request.last_token_time <= request.finished_time
    assert reported | scheduler.schedule().finished_request_ids == set(specs)


def test_finish_requests_records_the_stop_string_and_frees_blocks():
    harness = Harness(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    request = harness.add("a", [1, 2, 3, 4, 5], max_tokens=20, ignore_eos=True)
    harness.step()
    harness.scheduler.finish_requests("a", RequestStatus.FINISHED_STOPPED, stop_reason="\n\n")
    assert (request.status, request.stop_reason, request.finish_reason) == (RequestStatus.FINISHED_STOPPED, "\n\n", "stop")
    assert harness.scheduler.schedule().finished_request_ids == {"a"}
    check_all_free(harness.scheduler)
    with pytest.raises(ValueError, match="FINISHED_\\* status, got RUNNING"):
        harness.scheduler.finish_requests("a", RequestStatus.RUNNING)


@pytest.mark.parametrize("state", ["waiting", "running", "preempted", "swapped"])
def test_abort_in_any_state_frees_every_block(state):
    harness = Harness(
        num_blocks=7,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        max_model_len=32,
        num_swap_blocks=8 if state == "swapped" else 0,
    )
    harness.add("old", [1] * 8, max_tokens=12, ignore_eos=True)
    victim = harness.add("victim", [2] * 8, max_tokens=12, ignore_eos=True)
    if state != "waiting":
        harness.step()
    expected_status = {
        "waiting": RequestStatus.WAITING,
        "running": RequestStatus.RUNNING,
        "preempted": RequestStatus.PREEMPTED,
        "swapped": RequestStatus.SWAPPED,
    }[state]
    while victim.status != expected_status:
        harness.step()
    harness.scheduler.abort_requests(["victim", "unknown-id"])
    assert victim.status == RequestStatus.FINISHED_ABORTED and victim.finish_reason == "abort"
    harness.step()
    assert harness.batches[-1].finished_request_ids == {"victim"}
    harness.scheduler.abort_requests("old")
    check_all_free(harness.scheduler)


def test_requests_aborted_while_the_step_runs_are_skipped():
    harness = Harness(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    harness.add("a", [1, 2, 3], max_tokens=5)
    harness.add("b", [4, 5, 6], max_tokens=5)
    out = harness.scheduler.schedule()
    sampled = harness.runner.execute_step(out)
    harness.scheduler.abort_requests("a")
    updated = harness.scheduler.update_from_output(out, sampled)
    assert [r.request_id for r in updated] == ["b"]
    with pytest.raises(ValueError, match="No sampled token for request 'b'"):
        harness.scheduler.update_from_output(harness.scheduler.schedule(), {})


@pytest.mark.parametrize(
    "prompt_len, max_tokens, match",
    [
        (0, 4, "The prompt is empty"),
        (64, None, r"maximum context length is 64 tokens. However, your request has 64 input tokens.*--max-model-len"),
        (70, 4, r"your request has 70 input tokens"),
        (
            60,
            10,
            r"maximum context length is 64 tokens. However, you requested 70 tokens \(60 in the prompt, "
            r"10 in the completion\).*--max-model-len",
        ),
        (40, 20, r"may need 15 KV blocks of 4 tokens \(40 prompt \+ 20 max_tokens\) but the KV pool has only 12 "
         r"blocks \(48 tokens\).*--num-gpu-blocks-override.*--gpu-memory-utilization"),
    ],
)
def test_requests_that_could_never_finish_are_rejected_with_the_numbers(prompt_len, max_tokens, match):
    scheduler = Scheduler(num_blocks=13, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    with pytest.raises(ValueError, match=match):
        scheduler.add_request(Request("x", [1] * prompt_len, SamplingParams(max_tokens=max_tokens)))
    assert not scheduler.has_unfinished_requests()


def test_duplicate_ids_and_bad_flags_are_rejected():
    scheduler = Scheduler(num_blocks=13, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    scheduler.add_request(Request("x", [1], SamplingParams()))
    with pytest.raises(ValueError, match="Request id 'x' is already in use"):
        scheduler.add_request(Request("x", [1], SamplingParams()))
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(32\) is smaller than max_model_len \(64\).*--max-num-batched-tokens"):
        Scheduler(num_blocks=13, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                  enable_chunked_prefill=False)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be greater than or equal to max_num_seqs \(16\)"):
        Scheduler(num_blocks=13, block_size=4, max_num_seqs=16, max_num_batched_tokens=8, max_model_len=64)
    with pytest.raises(ValueError, match="max_num_seqs must be at least 1, got 0"):
        Scheduler(num_blocks=13, block_size=4, max_num_seqs=0, max_num_batched_tokens=32, max_model_len=64)
    with pytest.raises(ValueError, match="scheduler_delay_factor must be non-negative, got -1"):
        Scheduler(num_blocks=13, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                  scheduler_delay_factor=-1.0)


def test_priority_needs_the_priority_policy_and_the_policy_must_be_known():
    scheduler = Scheduler(num_blocks=13, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    with pytest.raises(ValueError, match="^Got priority 1 but Priority scheduling is not enabled.$"):
        scheduler.add_request(Request("x", [1], SamplingParams(), priority=1))
    assert not scheduler.has_unfinished_requests()
    scheduler = Scheduler(num_blocks=13, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                          scheduling_policy="priority")
    with pytest.raises(ValueError, match="priority must be an int, got 'high'"):
        scheduler.add_request(Request("x", [1], SamplingParams(), priority="high"))
    scheduler.add_request(Request("x", [1], SamplingParams(), priority=-3))
    with pytest.raises(ValueError, match="scheduling_policy must be one of"):
        Scheduler(num_blocks=13, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                  scheduling_policy="lifo")


def test_empty_scheduler_output():
    out = SchedulerOutput.make_empty()
    assert (out.scheduled, out.total_num_scheduled_tokens, out.finished_request_ids) == ([], 0, set())
    assert out.blocks_to_swap_out == out.blocks_to_swap_in == []


def test_scheduler_output_repr_hides_tokens():
    harness = Harness(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    harness.add("a", [41, 42, 43], max_tokens=2)
    text = repr(harness.scheduler.schedule())
    assert "num_scheduled_tokens=3" in text and "41" not in text


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / finish / abort sequences on tiny pools (preemption happens often)."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(6, 24),
        max_num_seqs=st.integers(1, 5),
        budget=st.sampled_from([5, 8, 32]),
        prefix_caching=st.booleans(),
        chunked_prefill=st.booleans(),
        num_swap_blocks=st.sampled_from([0, 4, 32]),
        scheduling_policy=st.sampled_from(["fcfs", "priority"]),
        long_prefill_token_threshold=st.sampled_from([0, 0, 1, 3]),
    )
    def setup(self, block_size, num_blocks, max_num_seqs, budget, prefix_caching, chunked_prefill, num_swap_blocks,
              scheduling_policy, long_prefill_token_threshold):
        self.harness = Harness(  # its ticking clock: hypothesis replays each example the same
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget if chunked_prefill else 24,
            max_model_len=24,
            enable_prefix_caching=prefix_caching,
            enable_chunked_prefill=chunked_prefill,
            num_swap_blocks=num_swap_blocks,
            scheduling_policy=scheduling_policy,
            long_prefill_token_threshold=long_prefill_token_threshold,
        )
        self.next_id = 0

    @rule(
        base=st.sampled_from([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [9] * 10]),
        shared=st.integers(0, 10),
        tail=st.lists(st.integers(1, VOCAB - 1), max_size=6),
        max_tokens=st.integers(1, 10),
        ignore_eos=st.booleans(),
        prompt_logprobs=st.booleans(),
        priority=st.integers(-1, 1),
    )
    def add(self, base, shared, tail, max_tokens, ignore_eos, prompt_logprobs, priority):
        prompt = base[:shared] + tail
        scheduler = self.harness.scheduler
        request_id = f"r{self.next_id}"
        self.next_id += 1
        needed = cdiv(len(prompt) + max_tokens - 1, scheduler.block_size)
        params = dict(max_tokens=max_tokens, ignore_eos=ignore_eos, prompt_logprobs=1 if prompt_logprobs else None,
                      priority=priority if scheduler.scheduling_policy == "priority" else 0)
        if not prompt or len(prompt) + max_tokens > scheduler.max_model_len or needed > scheduler.kv_cache_manager.num_usable_blocks:
            with pytest.raises(ValueError):
                self.harness.add(request_id, prompt, **params)
        else:
            self.harness.add(request_id, prompt, **params)

    @rule()
    def step(self):
        self.harness.step()

    @precondition(lambda self: self.harness.scheduler.has_unfinished_requests())
    @rule(data=st.data(), abort=st.booleans())
    def finish_or_abort(self, data, abort):
        scheduler = self.harness.scheduler
        request_id = data.draw(st.sampled_from(sorted(scheduler.requests)))
        request = scheduler.requests[request_id]
        if abort:
            scheduler.abort_requests([request_id])
        else:
            scheduler.finish_requests([request_id], RequestStatus.FINISHED_STOPPED, stop_reason="stop")
        assert request.is_finished() and request_id not in scheduler.requests
        assert request.output_token_ids == self.harness.expected[request_id][: request.num_output_tokens]

    @invariant()
    def blocks_are_accounted_for(self):
        check_invariants(self.harness.scheduler)

    def teardown(self):
        self.harness.run(max_steps=1000)
        check_all_free(self.harness.scheduler)


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
test_scheduler_state_machine = SchedulerMachine.TestCase


@pytest.mark.parametrize("prefix_caching, delay_factor", [(True, 0.0), (False, 0.0), (True, 1.0)])
def test_multi_step_decodes_match_the_oracle_and_stop_inside_a_round(prefix_caching, delay_factor):
    """Rounds of 4 decode steps (num_scheduler_steps): tokens after a stop inside a round are
    dropped, the blocks written ahead are freed, and no round preempts anybody."""
    harness = Harness(num_blocks=120, block_size=4, max_num_seqs=16, max_num_batched_tokens=32, max_model_len=64,
                      enable_prefix_caching=prefix_caching, num_scheduler_steps=4,
                      scheduler_delay_factor=delay_factor)
    rng = random.Random(3)
    for i, prompt in enumerate(random_prompts(rng, 16, 20)):
        stop_ids = [rng.randrange(1, VOCAB) for _ in range(3)] if i % 3 == 0 else None
        harness.add(f"r{i}", prompt, max_tokens=rng.randint(1, 40), ignore_eos=i % 2 == 0, stop_token_ids=stop_ids)
    preemptions = []
    for _ in range(2000):
        if not harness.scheduler.has_unfinished_requests():
            break
        before = harness.scheduler.num_preemptions
        harness.step()
        if harness.batches[-1].num_steps > 1:
            preemptions.append(harness.scheduler.num_preemptions - before)
    assert sorted(harness.finished) == sorted(harness.expected)
    assert len(preemptions) >= 5 and not any(preemptions), "rounds must run, and never preempt"
    assert all(out.num_steps in (1, 4) for out in harness.batches)
    stopped = [r for r in harness.finished.values() if r.finish_reason == "stop"]
    assert stopped, "some requests must stop on a token"
    check_all_free(harness.scheduler)


def test_a_round_needs_every_request_decoding_with_room_and_nothing_waiting():
    def scheduler_with(*requests, num_blocks=40):
        scheduler = Scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                              max_model_len=64, num_scheduler_steps=4)
        for request in requests:
            scheduler.add_request(request)
        out = scheduler.schedule()  # the prefills
        scheduler.update_from_output(out, {s.request_id: 7 for s in out.scheduled})
        return scheduler

    def plain(request_id, **params):
        params = {"max_tokens": 20, **params}
        return Request(request_id, [1, 2, 3], SamplingParams(**params), eos_token_ids=(EOS,))

    scheduler = scheduler_with(plain("a"), plain("b"))
    out = scheduler.schedule()
    assert out.num_steps == 4
    for s in out.scheduled:  # blocks for every position the round writes: 3 .. 6
        assert len(s.block_table) * 4 >= s.start_position + 4
    for feature in (dict(logprobs=2), dict(presence_penalty=0.5), dict(repetition_penalty=1.1),
                    dict(logit_bias={3: 1.0}), dict(min_tokens=3), dict(max_tokens=3)):
        assert scheduler_with(plain("a"), plain("b", **feature)).schedule().num_steps == 1, feature
    scheduler = scheduler_with(plain("a"))
    scheduler.add_request(plain("late"))
    assert scheduler.schedule().num_steps == 1  # a waiting request is admitted first
    # 3 usable blocks: the two requests hold one each and a round of 4 needs a second each.
    small = scheduler_with(plain("a", max_tokens=8), plain("b", max_tokens=8), num_blocks=4)
    assert small.schedule().num_steps == 1
    # a's decode and b's 32 prompt tokens overfill the 32-token step by one; b takes 30, not 31,
    # so that its last prompt token is never alone in a chunk (`chunk_length`). Its last two
    # are not decodes, so the step after is a single one; rounds resume after it.
    scheduler = scheduler_with(plain("a"))
    scheduler.add_request(Request("b", list(range(1, 33)), SamplingParams(max_tokens=20), eos_token_ids=(EOS,)))
    steps = []
    for _ in range(3):
        out = scheduler.schedule()
        steps.append((out.num_steps, [(s.request_id, s.num_scheduled_tokens) for s in out.scheduled]))
        scheduler.update_from_output(out, {s.request_id: 7 for s in out.scheduled if s.sample})
    assert steps == [(1, [("a", 1), ("b", 30)]), (1, [("a", 1), ("b", 2)]), (4, [("a", 1), ("b", 1)])]


@pytest.mark.parametrize("num_remaining,budget,full_budget,expected", [
    (5, 10, 10, 5), (10, 10, 10, 10),  # fits
    (12, 10, 10, 10), (11, 10, 10, 9),  # never leaves exactly one token
    (10, 3, 10, 3), (4, 3, 10, 2), (3, 2, 10, 0), (5, 1, 10, 0),  # never one token of several: wait
    (3, 2, 2, 2), (9, 1, 1, 1),  # a budget of 1-2 tokens must still make progress
])
def test_chunk_length_never_leaves_a_token_alone(num_remaining, budget, full_budget, expected):
    assert scheduler_module.chunk_length(num_remaining, budget, full_budget) == expected


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_the_delay_factor_holds_arrivals_for_the_last_prompt_steps_latency():
    """vLLM V0's rule: while requests run, a waiting request is admitted once it has waited
    scheduler_delay_factor x the latency of the last step that ran prompt tokens; decode rounds
    run while it is held."""
    clock = FakeClock(100.0)
    scheduler = Scheduler(num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                          max_model_len=64, num_scheduler_steps=4, scheduler_delay_factor=2.0, clock=clock.time)

    def arrive(request_id):
        scheduler.add_request(Request(request_id, [1, 2, 3], SamplingParams(max_tokens=40), arrival_time=clock.now))

    def step(seconds):
        out = scheduler.schedule()
        clock.now += seconds
        for _ in range(out.num_steps):
            scheduler.update_from_output(out, {s.request_id: 7 for s in out.scheduled if s.sample})
        return [s.request_id for s in out.scheduled], out.num_steps

    arrive("a")
    assert step(0.25) == (["a"], 1)  # nothing runs: admitted at once; the prompt step took 0.25 s
    arrive("b")
    assert step(0.2) == (["a"], 4)  # b has waited 0 s of 2 x 0.25: held, and a decodes a round
    assert step(0.2) == (["a"], 4)  # 0.2 s
    assert step(0.2) == (["a"], 4)  # 0.4 s
    assert step(0.5) == (["a", "b"], 1)  # 0.6 s > 0.5 s: admitted; this prompt step takes 0.5 s
    arrive("c")
    assert step(0.9)[0] == ["a", "b"]  # 0 s of 2 x 0.5 s
    assert step(0.2)[0] == ["a", "b"]  # 0.9 s
    assert step(0.2)[0] == ["a", "b", "c"]  # 1.1 s

    idle = Scheduler(num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                     scheduler_delay_factor=0.0, clock=clock.time)
    idle.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=40), arrival_time=clock.now))
    out = idle.schedule()
    idle.update_from_output(out, {"a": 7})
    idle.add_request(Request("b", [1, 2, 3], SamplingParams(max_tokens=40), arrival_time=clock.now))
    assert [s.request_id for s in idle.schedule().scheduled] == ["a", "b"]  # factor 0: at once


def test_finish_first_holds_arrivals_while_the_running_requests_end():
    """scheduler_finish_first: while every running request decodes and, for some j, the j
    closest to their max_tokens end (at the latest decode step's latency) sooner than the latest
    prompt step took, with the waiting requests' summed wait less than that prompt step's stall
    summed over those j, waiting requests are held; otherwise they are admitted at once."""
    clock = FakeClock(100.0)

    def scheduler(finish_first=True):
        return Scheduler(num_blocks=80, block_size=4, max_num_seqs=16, max_num_batched_tokens=32,
                         max_model_len=64, scheduler_finish_first=finish_first, clock=clock.time)

    def arrive(s, request_id, max_tokens=5, prompt_len=3):
        s.add_request(Request(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                              arrival_time=clock.now))

    def step(s, seconds):
        out = s.schedule()
        clock.now += seconds
        s.update_from_output(out, {r.request_id: 7 for r in out.scheduled if r.sample})
        return [r.request_id for r in out.scheduled]

    def two_running(finish_first=True, max_tokens=5):
        s = scheduler(finish_first)
        arrive(s, "a", max_tokens)
        arrive(s, "b", max_tokens)
        assert step(s, 0.25) == ["a", "b"]  # nothing runs: admitted; a prompt step of 0.25 s
        assert step(s, 0.02) == ["a", "b"]  # a decode step of 0.02 s; 2 tokens each now
        return s

    s = two_running()
    arrive(s, "c")
    # The last running request ends in 3 steps (0.06 s < 0.25 s; 1 x 0.06 < 2 x 0.25): held.
    assert [step(s, 0.02) for _ in range(3)] == [["a", "b"]] * 3
    assert not s.running and step(s, 0.25) == ["c"]

    s = two_running(finish_first=False)
    arrive(s, "c")
    assert step(s, 0.02) == ["a", "b", "c"]

    s = scheduler()  # a ends in 3 steps, b in 18: held until a ends (1 x 0.06 < 1 x 0.25), not for b
    arrive(s, "a", max_tokens=5)
    arrive(s, "b", max_tokens=20)
    assert step(s, 0.25) == ["a", "b"] and step(s, 0.02) == ["a", "b"]
    arrive(s, "c")
    assert [step(s, 0.02) for _ in range(3)] == [["a", "b"]] * 3
    assert "a" not in s.requests and step(s, 0.25) == ["b", "c"]  # a has ended

    s = two_running(max_tokens=20)  # 18 steps left: 0.36 s > 0.25 s
    arrive(s, "c")
    assert step(s, 0.02) == ["a", "b", "c"]

    s = two_running()
    for i in range(9):  # 9 x 0.06 s > 2 x 0.25 s
        arrive(s, f"w{i}", prompt_len=1)
    assert step(s, 0.02) == ["a", "b"] + [f"w{i}" for i in range(9)]

    s = scheduler()  # no latency measured yet: no hold
    arrive(s, "a")
    assert step(s, 0.25) == ["a"]
    arrive(s, "b")
    assert step(s, 0.02) == ["a", "b"]

    s = two_running()
    arrive(s, "long", prompt_len=40)  # held until a and b end, then prefilled in two chunks
    assert [step(s, 0.02) for _ in range(3)] == [["a", "b"]] * 3
    assert step(s, 0.25) == ["long"]
    arrive(s, "c")
    assert step(s, 0.1) == ["long", "c"]  # a running request still prefills: no hold


def test_blocks_a_last_round_fills_stay_in_the_prefix_cache():
    """A round allocates blocks for tokens not sampled yet, so they are indexed at the next
    allocation; a request that finishes in its round has them indexed when it is freed."""
    scheduler = Scheduler(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                          max_model_len=64, num_scheduler_steps=4)
    request = Request("a", [1, 2, 3, 4], SamplingParams(max_tokens=9, ignore_eos=True))
    scheduler.add_request(request)
    token = 10
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        for _ in range(out.num_steps):
            token += 1
            scheduler.update_from_output(out, {"a": token})
    assert request.num_output_tokens == 9 and request.num_computed_tokens == 12  # 3 full blocks of KV
    follow_up = Request("b", request.all_token_ids + [5], SamplingParams())
    blocks, num_cached = scheduler.kv_cache_manager.get_computed_blocks(follow_up)
    assert num_cached == 12
    check_all_free(scheduler)


def markov_token(context: list[int]) -> int:
    """A fake model whose text soon repeats itself: the next token follows from the last one."""
    return context[-1] % 5 + 1


@pytest.mark.parametrize("num_swap_blocks", [0, 8])
def test_speculative_drafts_keep_every_output_and_the_blocks_consistent(monkeypatch, num_swap_blocks):
    """Prompt-lookup drafts through a tiny pool (preemption, swapping, prefix caching): every
    request's tokens equal the oracle's, drafts were kept and rejected, every block comes back;
    requests with bad_words or a grammar (masks built one token at a time) never get drafts."""
    monkeypatch.setattr(sys.modules[__name__], "next_token", markov_token)
    config = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    harness = Harness(num_blocks=16, block_size=4, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=48,
                      num_swap_blocks=num_swap_blocks, speculative_config=config)
    rng = random.Random(3)
    host_bound = set()
    for i, prompt in enumerate(random_prompts(rng, 24, 20)):
        extra = [{}, {"presence_penalty": 0.5}, {"bad_words": ["x"]}, {"logit_bias": {3: 1.0}},
                 {"structured_outputs": StructuredOutputsParams(regex="[0-9]+")}][i % 5]
        if "bad_words" in extra or "structured_outputs" in extra:
            host_bound.add(f"r{i}")
        harness.add(f"r{i}", prompt, max_tokens=rng.randint(6, 48 - len(prompt)), ignore_eos=rng.random() < 0.5,
                    **extra)
    harness.run()
    assert sorted(harness.finished) == sorted(harness.expected)
    drafted = [s for out in harness.batches for s in out.scheduled if s.num_draft_tokens]
    num_drafts = sum(s.num_draft_tokens for s in drafted)
    assert 0 < harness.drafts_kept < num_drafts, "drafts should be both kept and rejected"
    assert all(s.num_draft_tokens <= 3 for s in drafted)
    assert not {s.request_id for s in drafted} & host_bound
    assert {s.request_id for s in drafted if s.sampling_params.has_penalties or s.sampling_params.logit_bias}
    assert harness.scheduler.get_stats().num_preemptions > 0
    check_all_free(harness.scheduler)


def test_speculative_drafts_follow_the_batch_size_schedule(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "next_token", markov_token)
    config = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=2,
                               num_speculative_tokens_per_batch_size=((1, 1, 4), (2, 2, 1), (3, 8, 0)))
    harness = Harness(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                      speculative_config=config)
    for i in range(3):
        harness.add(f"r{i}", [5, 9, 5, 9, 5, 9], max_tokens=12 + 8 * i, ignore_eos=True)
    harness.run()
    for out in harness.batches:
        most = max((s.num_draft_tokens for s in out.scheduled), default=0)
        running = len(out.scheduled)
        assert most <= {1: 4, 2: 1}.get(running, 0)
    assert {max(s.num_draft_tokens for s in out.scheduled) for out in harness.batches} >= {1, 4}
    check_all_free(harness.scheduler)
