"""AsyncLLM: concurrent streams, deltas, errors before the first yield, abort on disconnect, shutdown."""

import asyncio
import time

import pytest

from jpaged import AsyncLLM, EngineArgs, SamplingParams
from jpaged.admission import Admission, QueueFullError
from jpaged.sampling_params import RequestOutputKind

PROMPTS = [list(range(300, 300 + n)) for n in (5, 23, 40, 11)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return AsyncLLM.from_engine_args(_engine_args(tiny_model_dir))


def _engine_args(model_dir):
    return EngineArgs(model=str(model_dir), max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
                      num_gpu_blocks_override=40, attention_backend="reference", compilation_cache_dir="")


def assert_idle(engine):
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)


async def collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


def test_concurrent_delta_streams_add_up_to_the_final_output(engine):
    delta = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    final = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        streams = await asyncio.gather(*[collect(engine, {"prompt_token_ids": p}, delta, f"d{i}")
                                         for i, p in enumerate(PROMPTS)])
        finals = await asyncio.gather(*[collect(engine, {"prompt_token_ids": p}, final, f"f{i}")
                                        for i, p in enumerate(PROMPTS)])
        tick_task.cancel()
        return streams, finals, ticks

    streams, finals, ticks = asyncio.run(main())
    for stream, (final,) in zip(streams, finals):
        assert len(stream) > 1 and stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert [t for o in stream for t in o.outputs[0].token_ids] == final.outputs[0].token_ids
        assert "".join(o.outputs[0].text for o in stream) == final.outputs[0].text
        assert stream[-1].outputs[0].finish_reason == "length"
    assert ticks > 10, "the event loop must stay responsive while steps run"
    assert engine.get_stats().generation_tokens_total >= 2 * 4 * 12
    assert_idle(engine)


def test_cumulative_n_samples(engine):
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)
    outputs = asyncio.run(collect(engine, "Hello there", params, "n2"))
    last = outputs[-1]
    assert last.finished and [c.index for c in last.outputs] == [0, 1]
    assert all(len(c.token_ids) == 5 for c in last.outputs)
    assert last.prompt == "Hello there" and last.prompt_token_ids == engine.tokenizer.encode("Hello there")


def test_invalid_request_raises_before_the_first_yield(engine):
    async def main():
        gen = engine.generate({"prompt_token_ids": list(range(100, 200))}, SamplingParams(max_tokens=100), "bad")
        with pytest.raises(ValueError, match="maximum context length is 128 tokens"):
            await gen.__anext__()
        # The engine still serves.
        return await collect(engine, "ok", SamplingParams(max_tokens=2), "after-bad")

    assert asyncio.run(main())[-1].finished
    assert_idle(engine)


def test_priority_and_cache_salt_reach_the_engine(engine):
    prompt = {"prompt_token_ids": list(range(400, 440))}  # 2 full blocks of 16 tokens, then 8
    params = SamplingParams(temperature=0, max_tokens=2)

    async def cached_tokens(request_id, cache_salt):
        outputs = [out async for out in engine.generate(prompt, params, request_id, cache_salt=cache_salt)]
        return outputs[-1].num_cached_tokens

    async def main():
        gen = engine.generate(prompt, params, "priority", priority=1)
        with pytest.raises(ValueError, match="Got priority 1 but Priority scheduling is not enabled."):
            await gen.__anext__()
        return [await cached_tokens(request_id, salt) for request_id, salt in [("x1", "x"), ("y", "y"), ("x2", "x")]]

    assert asyncio.run(main()) == [0, 0, 32]
    assert_idle(engine)


def test_consumer_that_stops_iterating_aborts_the_request(engine):
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def main():
        async def consume_two():
            async for out in engine.generate({"prompt_token_ids": PROMPTS[1]}, params, "gone"):
                if len(out.outputs[0].token_ids) and not out.finished:
                    break  # closes the generator: a client disconnect

        task = asyncio.create_task(consume_two())
        await task
        outputs = await collect(engine, {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=2), "next")
        started = asyncio.Event()

        async def slow_client():
            async for _ in engine.generate({"prompt_token_ids": PROMPTS[2]}, params, "cancelled"):
                started.set()
                await asyncio.sleep(60)

        cancelled = asyncio.create_task(slow_client())
        await started.wait()
        cancelled.cancel()  # a cancelled handler task
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await collect(engine, {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=1), "flush")
        return outputs

    assert asyncio.run(main())[-1].finished
    assert_idle(engine)


def test_abort_ends_the_stream_with_abort(engine, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    step = engine.engine.step

    def slow_step():  # steps as long as a real model's, so the abort lands before the 80th token
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine.engine, "step", slow_step)

    async def main():
        gen = engine.generate({"prompt_token_ids": PROMPTS[3]}, params, "to-abort")
        first = await gen.__anext__()
        await engine.abort("to-abort")
        rest = [out async for out in gen]
        # vLLM's form: several ids at once (unknown ones ignored)
        gens = [engine.generate({"prompt_token_ids": p}, params, f"many-{i}") for i, p in enumerate(PROMPTS[:2])]
        firsts = [await g.__anext__() for g in gens]
        await engine.abort(["many-0", "many-1", "nobody"])
        ends = [[out async for out in g][-1] for g in gens]
        return first, rest, firsts, ends

    first, rest, firsts, ends = asyncio.run(main())
    assert not first.finished and not any(o.finished for o in firsts)
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert len(rest[-1].outputs[0].token_ids) < 80
    assert [(o.finished, o.outputs[0].finish_reason) for o in ends] == [(True, "abort")] * 2
    assert_idle(engine)


def test_shutdown_aborts_in_flight_requests(tiny_model_dir):
    # An engine of its own: a second front on the module's engine raced that front's thread,
    # which could step the shared engine at the same time (a donated KV cache, then a dead engine).
    own = AsyncLLM.from_engine_args(_engine_args(tiny_model_dir))

    async def main():
        gen = own.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=80, ignore_eos=True), "s")
        await gen.__anext__()
        await own.shutdown()
        rest = [out async for out in gen]
        with pytest.raises(RuntimeError, match="not running"):
            await own.generate("x", None, "late").__anext__()
        return rest

    rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert not own.is_ready
    assert not own.engine.has_unfinished_requests()


def test_sleep_wait_lets_running_requests_finish_and_holds_new_ones(engine):
    """sleep(mode="wait"): the running request finishes all its tokens, a request added meanwhile
    waits in the queue through the sleep and runs after wake_up; level 1 frees the KV pool."""
    import dataclasses

    llm_engine = engine.engine
    engine_args = llm_engine.engine_args
    llm_engine.engine_args = dataclasses.replace(engine_args, enable_sleep_mode=True)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def main():
        first = asyncio.create_task(collect(engine, {"prompt_token_ids": PROMPTS[0]}, params, "first"))
        while not llm_engine.scheduler.num_running:
            await asyncio.sleep(0.001)
        sleeping = asyncio.create_task(engine.sleep(level=1, mode="wait"))
        await asyncio.sleep(0)
        second = asyncio.create_task(collect(engine, {"prompt_token_ids": PROMPTS[1]}, params, "second"))
        await sleeping
        first_outputs = await first
        assert await engine.is_sleeping() and llm_engine.runner.kv_cache is None
        await asyncio.sleep(0.2)
        assert not second.done() and llm_engine.scheduler.num_waiting == 1
        assert await engine.wake_up() is True
        return first_outputs, await second

    try:
        first, second = (outputs[-1] for outputs in asyncio.run(main()))
    finally:
        llm_engine.engine_args = engine_args
    assert [o.finish_reason for o in (first.outputs[0], second.outputs[0])] == ["length", "length"]
    assert len(first.outputs[0].token_ids) == len(second.outputs[0].token_ids) == 10
    assert_idle(engine)


def test_pause_keep_freezes_requests_and_resume_gives_the_same_tokens(engine):
    """pause_generation(mode="keep") (no sleep mode needed): the running request makes no progress
    and a request added meanwhile waits; after resume_generation both finish with the tokens of an
    unpaused run. mode "abort" ends the request in flight; is_paused follows."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    llm_engine = engine.engine

    async def reference():
        return [await collect(engine, {"prompt_token_ids": p}, params, f"ref{i}") for i, p in enumerate(PROMPTS[:2])]

    async def paused_run():
        first = asyncio.create_task(collect(engine, {"prompt_token_ids": PROMPTS[0]}, params, "kept"))
        while not llm_engine.scheduler.num_running:
            await asyncio.sleep(0.001)
        await engine.pause_generation(mode="keep")
        assert await engine.is_paused()
        computed = [r.num_computed_tokens for r in llm_engine.scheduler.running]
        second = asyncio.create_task(collect(engine, {"prompt_token_ids": PROMPTS[1]}, params, "added"))
        await asyncio.sleep(0.3)
        assert [r.num_computed_tokens for r in llm_engine.scheduler.running] == computed
        assert not first.done() and not second.done() and llm_engine.scheduler.num_waiting == 1
        await engine.resume_generation()
        assert not await engine.is_paused()
        return [await first, await second]

    async def aborted_run():
        running = asyncio.create_task(collect(engine, {"prompt_token_ids": PROMPTS[2]}, params, "ended"))
        while not llm_engine.scheduler.num_running:
            await asyncio.sleep(0.001)
        await engine.pause_generation(mode="abort")
        outputs = await running  # delivered by the time pause_generation returns
        assert await engine.is_paused()
        await engine.resume_generation()
        return outputs

    expected = asyncio.run(reference())
    got = asyncio.run(paused_run())
    for want, have in zip(expected, got):
        assert [t for o in have for t in o.outputs[0].token_ids] == [t for o in want for t in o.outputs[0].token_ids]
        assert have[-1].outputs[0].finish_reason == "length"
    ended = asyncio.run(aborted_run())
    assert ended[-1].finished and ended[-1].outputs[0].finish_reason == "abort"
    assert sum(len(o.outputs[0].token_ids) for o in ended) < params.max_tokens
    assert_idle(engine)


def test_reset_prefix_cache(engine):
    """After reset_prefix_cache a repeated prompt finds no cached block, and is cached again."""
    prompt = {"prompt_token_ids": list(range(500, 540))}  # two full blocks of 16 and a partial one
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def cached_tokens(request_id):
        return (await collect(engine, prompt, params, request_id))[-1].num_cached_tokens

    async def main():
        counts = [await cached_tokens("p0"), await cached_tokens("p1")]
        assert await engine.reset_prefix_cache() is True
        return counts + [await cached_tokens("p2"), await cached_tokens("p3")]

    assert asyncio.run(main()) == [0, 32, 0, 32]
    assert_idle(engine)


@pytest.fixture
def admission(engine):
    """Installs queue limits on the module's engine for one test: admission(max_reqs, max_tokens)."""
    saved = engine.admission

    def install(max_num_queued_reqs=None, max_num_queued_tokens=None):
        engine.admission = Admission(max_num_queued_reqs, max_num_queued_tokens)
        return engine.admission

    yield install
    engine.admission = saved


def test_max_num_queued_reqs_counts_sequences_and_refuses_without_counting(engine, admission):
    limits = admission(max_num_queued_reqs=3)
    long = SamplingParams(n=2, temperature=0, max_tokens=60, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def main():
        running = asyncio.create_task(collect(engine, {"prompt_token_ids": PROMPTS[0]}, long, "long"))
        await asyncio.sleep(0)  # the task runs to its first await: admitted, n = 2 counting 2
        assert limits.num_unfinished_seqs == 2
        refused = []
        for n in (2, 1):  # 2 + 2 > 3 is refused; 2 + 1 fits
            gen = engine.generate({"prompt_token_ids": PROMPTS[2]}, SamplingParams(n=n, max_tokens=2), f"n{n}")
            try:
                outputs = [out async for out in gen]
            except QueueFullError as exc:
                refused.append((n, exc.reason, limits.num_unfinished_seqs))
            else:
                assert outputs[-1].finished
        return refused, await running

    refused, long_outputs = asyncio.run(main())
    assert refused == [(2, "max_num_queued_reqs", 2)]
    assert long_outputs[-1].finished
    assert (limits.num_unfinished_seqs, limits.num_queued_tokens) == (0, 0)
    assert_idle(engine)


def test_max_num_queued_tokens_counts_prompts_until_their_first_token(engine, admission):
    """The backlog is the prompts of requests without a token yet: a non-streamed request (no
    output before its last) leaves it when its first token is sampled, not when it finishes."""
    limits = admission(max_num_queued_tokens=50)
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    prompt = {"prompt_token_ids": PROMPTS[2]}  # 40 tokens

    async def main():
        first = [asyncio.create_task(collect(engine, prompt, params, f"q{i}")) for i in range(2)]
        await asyncio.sleep(0)
        backlog = limits.num_queued_tokens  # 40 < 50 admitted the second, now 80 >= 50
        with pytest.raises(QueueFullError) as info:
            await engine.generate("refused", SamplingParams(max_tokens=1), "refused").__anext__()
        while limits.num_queued_tokens and not all(task.done() for task in first):
            await asyncio.sleep(0.001)
        drained_while_running = not any(task.done() for task in first)
        after = await collect(engine, {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=2), "after")
        return backlog, info.value.reason, drained_while_running, after, await asyncio.gather(*first)

    backlog, reason, drained_while_running, after, finals = asyncio.run(main())
    assert (backlog, reason) == (80, "max_num_queued_tokens")
    assert drained_while_running, "the prompts stayed in the backlog until their requests finished"
    assert after[-1].finished and all(len(f[-1].outputs[0].token_ids) == 80 for f in finals)
    assert (limits.num_unfinished_seqs, limits.num_queued_tokens) == (0, 0)
    assert not engine._prefilling
    assert_idle(engine)
