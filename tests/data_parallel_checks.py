"""Data-parallel checks run in a child process with fake CPU devices (tests/test_data_parallel.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/data_parallel_checks.py MODE MODEL CACHE_DIR

MODE "tiny": greedy outputs and beam searches of LLM(data_parallel_size=2) equal one engine's; abort reaches the
owning replica and no replica keeps a block; update_weights reaches every replica on its own
device; a server over 2 replicas answers completions, streams, beam searches and /metrics per engine; a
replica whose engine loop failed gets no more requests; pausing and reset_prefix_cache reach every
replica; enqueue / wait_for_completion run over the replicas. MODE "bundled": greedy equality only. CACHE_DIR: a persistent
compilation cache shared by the engines of the run (an engine on cpu:0 or cpu:1 compiles once).
Exits non-zero (an AssertionError) on the first failed check.
"""

import asyncio
import sys
import time

import httpx
import jax
import openai

from jpaged import LLM, BeamSearchParams, EngineArgs, SamplingParams
from jpaged.admission import QueueFullError
from jpaged.sampling_params import RequestOutputKind

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from server_harness import API_KEY, MODEL_NAME, ThreadedServer  # noqa: E402

# Shared first blocks (affinity), lengths off block boundaries, and one unrelated prompt.
PROMPTS = [list(range(300, 300 + n)) for n in (5, 23, 40, 11, 17, 33)] + [list(range(900, 950))]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def engine_kwargs(model: str, cache_dir: str) -> dict:
    return dict(model=model, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
                num_gpu_blocks_override=48, compilation_cache_dir=cache_dir, disable_log_stats=True)


def check_greedy_equals_one_engine(kwargs: dict) -> LLM:
    """Returns the data-parallel LLM for the next checks."""
    params = [GREEDY] * len(PROMPTS)
    params[2] = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=2)
    single = LLM(**kwargs)
    expected = single.generate(PROMPTS, params, use_tqdm=False)
    beam_params = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True)
    expected_beams = single.beam_search(PROMPTS[:3], beam_params)
    llm = LLM(**kwargs, data_parallel_size=2)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    for e, g in zip(expected, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in e.outputs], (e, g)
        assert [c.text for c in g.outputs] == [c.text for c in e.outputs]
    got_beams = llm.beam_search(PROMPTS[:3], beam_params)  # each step's beams spread over both replicas
    assert [[b.tokens for b in o.sequences] for o in got_beams] == [[b.tokens for b in o.sequences]
                                                                    for o in expected_beams]
    front = llm.data_parallel
    assert [list(r.engine.runner.mesh.devices.flat) for r in front.replicas] == [[d] for d in jax.devices()[:2]]
    served = [s.prompt_tokens_total for s in front.get_stats_per_engine()]
    assert all(served), f"both replicas must have served prompts: {served}"
    assert front.router.loads == [0, 0] and not front._owners
    return llm


def assert_no_blocks_held(front, timeout: float = 10.0) -> None:
    """Every replica: no request left, every block but the null block free."""
    deadline = time.time() + timeout
    while True:
        pools = [r.engine.scheduler.kv_cache_manager.block_pool for r in front.replicas]
        free = [p.get_num_free_blocks() for p in pools]
        total = [r.engine.runner.pool_spec.num_blocks - 1 for r in front.replicas]
        busy = [r.engine.has_unfinished_requests() for r in front.replicas]
        if free == total and not any(busy):
            return
        assert time.time() < deadline, f"blocks still held: free {free} of {total}, unfinished {busy}"
        time.sleep(0.02)


def check_abort_reaches_the_owner(front) -> None:
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    short = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def run():
        started = {f"r{i}": asyncio.Event() for i in range(4)}
        outputs = {request_id: [] for request_id in started}
        owners = {}

        async def consume(request_id, prompt, params):
            async for output in front.generate({"prompt_token_ids": prompt}, params, request_id):
                # Read while the stream is open: a short request may end before the others start.
                owners.setdefault(request_id, front.replica_of(request_id))
                outputs[request_id].append(output)
                started[request_id].set()

        # Under one block each (no affinity): dispatched together, they alternate between the replicas.
        prompts = [list(range(2000 + 100 * i, 2012 + 100 * i)) for i in range(4)]
        tasks = [asyncio.create_task(consume(f"r{i}", prompts[i], long if i < 2 else short)) for i in range(4)]
        await asyncio.gather(*(event.wait() for event in started.values()))
        assert [owners[f"r{i}"] for i in range(4)] == [0, 1, 0, 1], owners
        try:
            await front.generate({"prompt_token_ids": [1, 2]}, short, "r0").__anext__()
            raise AssertionError("a running request id was accepted twice")
        except ValueError as exc:
            assert "already in use" in str(exc)
        # The queue limit counts both replicas' requests: r0 and r1 alone (one on each) fill it.
        front.admission.max_num_queued_reqs = 2
        try:
            await front.generate({"prompt_token_ids": [1, 2]}, short, "over-limit").__anext__()
            raise AssertionError("a request over --max-num-queued-reqs was accepted")
        except QueueFullError as exc:
            assert exc.reason == "max_num_queued_reqs"
        finally:
            front.admission.max_num_queued_reqs = None
        await front.abort("r0")
        await front.abort(["r1", "no-such-request"])  # vLLM's form: several ids, unknown ones ignored
        await asyncio.gather(*tasks)
        return outputs, owners

    outputs, owners = asyncio.run(run())
    for request_id, stream in outputs.items():
        final = stream[-1].outputs[0]
        tokens = sum(len(o.outputs[0].token_ids) for o in stream)
        if request_id in ("r0", "r1"):
            assert final.finish_reason == "abort" and tokens < 60, (request_id, final, tokens)
        else:
            assert final.finish_reason == "length" and tokens == 6, (request_id, final, tokens)
    assert front.router.loads == [0, 0] and not front._owners
    assert all(replica.admission is front.admission for replica in front.replicas)
    assert (front.admission.num_unfinished_seqs, front.admission.num_queued_tokens) == (0, 0)
    assert_no_blocks_held(front)


def check_pause_and_reset_prefix_cache(llm: LLM) -> None:
    """pause_generation, is_paused, resume_generation and reset_prefix_cache reach every replica."""
    front = llm.data_parallel

    async def pause_and_resume():
        await front.pause_generation(mode="keep")
        paused = [replica.engine.is_paused() for replica in front.replicas]
        assert await front.is_paused()
        await front.resume_generation()
        return paused, await front.is_paused()

    assert asyncio.run(pause_and_resume()) == ([True, True], False)
    pools = [replica.engine.scheduler.kv_cache_manager.block_pool for replica in front.replicas]
    assert all(pool.cached_block_hash_to_block for pool in pools)  # the greedy check's prompts
    assert llm.reset_prefix_cache() is True
    assert not any(pool.cached_block_hash_to_block for pool in pools)


def check_enqueue(llm: LLM) -> None:
    """enqueue / wait_for_completion over the replicas give generate's tokens, in enqueue order."""
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    ids = llm.enqueue(PROMPTS[:3], GREEDY) + llm.enqueue(PROMPTS[3:], GREEDY)
    outputs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outputs] == ids
    assert [o.outputs[0].token_ids for o in outputs] == expected


def check_update_weights(llm: LLM) -> None:
    """LLM.update_weights swaps a copy (made on device 0) into every replica, on its own device."""
    front = llm.data_parallel
    copy = jax.tree.map(lambda leaf: leaf + 0, front.replicas[0].engine.runner.params)
    llm.update_weights(copy)
    for replica in front.replicas:
        runner = replica.engine.runner
        assert all(leaf.devices() == set(runner.mesh.devices.flat) for leaf in jax.tree.leaves(runner.params))


def check_failed_replica_is_skipped(front) -> None:
    """A replica whose engine loop failed fails its own requests and gets no more; the front serves on."""

    def broken_step():
        raise RuntimeError("injected device fault")

    front.replicas[1].engine.step = broken_step
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def final(request_id):
        outputs = [o async for o in front.generate({"prompt_token_ids": [7, 8, 9]}, params, request_id)]
        return outputs[-1]

    async def run():
        first = await asyncio.gather(final("ok"), final("on-broken"), return_exceptions=True)
        return first, [await final(f"after{i}") for i in range(3)]

    (ok, failed), after = asyncio.run(run())
    assert ok.outputs[0].finish_reason == "length", ok
    assert type(failed).__name__ == "EngineDeadError", failed
    assert front.replicas[1].errored and not front.errored and front.is_ready
    assert all(o.outputs[0].finish_reason == "length" for o in after)
    assert front.router.loads == [0, 0] and not front._owners


def check_server(kwargs: dict, expected_texts: list[str]) -> None:
    server = ThreadedServer(EngineArgs(**kwargs, data_parallel_size=2))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        batch = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:4], max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == expected_texts[:4]
        stream = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[4], max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = [chunk.choices[0].text for chunk in stream if chunk.choices]
        assert len(chunks) > 1 and "".join(chunks) == expected_texts[4], chunks
        two = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[5], max_tokens=8, temperature=0, n=2,
                                        extra_body={"ignore_eos": True})
        assert [c.text for c in two.choices] == [expected_texts[5]] * 2
        beams = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[5], max_tokens=4, n=2,
                                          extra_body={"ignore_eos": True, "use_beam_search": True})
        assert [c.index for c in beams.choices] == [0, 1] and beams.usage.completion_tokens == 8
        assert httpx.get(server.url + "/health").status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        steps = 0
        for engine in ("0", "1"):
            for family in ("prompt_tokens_total", "iteration_tokens_total_count"):
                lines = [line for line in metrics.splitlines()
                         if line.startswith(f"jpaged:{family}{{") and f'engine="{engine}"' in line]
                assert len(lines) == 1 and float(lines[0].rsplit(" ", 1)[1]) > 0, (engine, lines)
            steps += float(lines[0].rsplit(" ", 1)[1])
        assert sum(server.engine.get_stats().iteration_tokens_counts) == steps  # the replicas' buckets summed
        assert_no_blocks_held(server.engine)
    finally:
        server.stop()


def main() -> None:
    mode, model, cache_dir = sys.argv[1:4]
    assert len(jax.devices()) == 8, jax.devices()
    kwargs = engine_kwargs(model, cache_dir)
    start = time.perf_counter()
    llm = check_greedy_equals_one_engine(kwargs)
    print(f"greedy DP 2 == one engine ({mode}): {time.perf_counter() - start:.1f} s", flush=True)
    if mode == "bundled":
        return
    start = time.perf_counter()
    check_abort_reaches_the_owner(llm.data_parallel)
    print(f"abort routed, no blocks held: {time.perf_counter() - start:.1f} s", flush=True)
    check_pause_and_reset_prefix_cache(llm)
    check_enqueue(llm)
    check_update_weights(llm)
    start = time.perf_counter()
    # After the weight swap: the server's fresh replicas must agree with these.
    texts = [output.outputs[0].text for output in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    check_server(kwargs, texts)
    print(f"server over 2 replicas: {time.perf_counter() - start:.1f} s", flush=True)
    check_failed_replica_is_skipped(llm.data_parallel)
    print("a failed replica is skipped", flush=True)


if __name__ == "__main__":
    main()
