"""A fault inside one engine step fails only that step's requests; a lost KV pool stops the engine.

Faults are injected for requests whose prompt starts with POISON: in the compiled sampler (after
the forward replaced the donated KV pool, so the engine can go on), or by deleting the pool's
buffers before raising (as a forward that died after donation would), which the engine must
treat as fatal. Oracles: each surviving request's greedy tokens equal what it gives alone, the
block pool is all free afterwards, and the server answers /health 200, then 503.
"""

import httpx
import pytest

from jpaged import EngineArgs, SamplingParams
from jpaged.llm_engine import EngineDeadError, LLMEngine
from server_harness import API_KEY, ThreadedServer, health_ok

POISON = [7777, 7777, 7777]
ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=32, num_gpu_blocks_override=40,
                     compilation_cache_dir="", disable_log_stats=True)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


class FaultInjector:
    """Wraps runner.execute: a step that schedules a poisoned request fails in `mode`.

    mode "sampler": the compiled sampler raises (the KV pool survives).
    mode "pool_lost": the KV pool's buffers are deleted, then the step raises.
    """

    def __init__(self, runner, mode: str):
        self.runner, self.mode = runner, mode
        self.num_injected = 0
        self.execute = runner.execute
        runner.execute = self._execute
        self.samplers = runner._sample

    def _poisoned(self, scheduler_output) -> bool:
        return any(r.prompt_token_ids[:len(POISON)] == POISON for r in scheduler_output.scheduled)

    def _execute(self, scheduler_output, seeds, *args):
        if not self._poisoned(scheduler_output):
            return self.execute(scheduler_output, seeds, *args)
        self.num_injected += 1
        if self.mode == "pool_lost":
            for k, v in self.runner.kv_cache:
                k.delete()
                v.delete()
            raise RuntimeError("injected fault: the forward died after the KV pool was donated")
        self.runner._sample = _RaisingSamplers(self.samplers)
        try:
            return self.execute(scheduler_output, seeds, *args)
        finally:
            self.runner._sample = self.samplers

    def remove(self) -> None:
        self.runner.execute = self.execute


class _RaisingSamplers(dict):
    """Looks like the runner's compiled-sampler cache; every program raises when called."""

    def __init__(self, compiled: dict):
        super().__init__(compiled)

    def __getitem__(self, key):
        def fail(*args):
            raise RuntimeError("injected fault in the sampler")
        return fail


def run_to_completion(engine: LLMEngine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


def assert_pool_free(engine: LLMEngine) -> None:
    pool = engine.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == engine.runner.pool_spec.num_blocks - 1
    assert not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineArgs(model=str(tiny_model_dir), **ENGINE_KWARGS), show_progress=False)


def test_a_failed_step_fails_only_its_requests_and_frees_their_blocks(engine):
    prompts = {"b": list(range(300, 317)), "c": list(range(500, 509)), "later": list(range(900, 930))}
    for name, prompt in prompts.items():
        engine.add_request(f"alone-{name}", {"prompt_token_ids": prompt}, GREEDY)
    alone = {rid.removeprefix("alone-"): out.outputs[0].token_ids for rid, out in run_to_completion(engine).items()}

    injector = FaultInjector(engine.runner, "sampler")
    try:
        # max_num_seqs=2: the first step runs "poison" and "a"; "b" and "c" wait for later steps.
        engine.add_request("poison", {"prompt_token_ids": POISON + [5, 6]}, GREEDY)
        engine.add_request("a", {"prompt_token_ids": list(range(100, 120))}, SamplingParams(max_tokens=4, n=2))
        engine.add_request("b", {"prompt_token_ids": prompts["b"]}, GREEDY)
        engine.add_request("c", {"prompt_token_ids": prompts["c"]}, GREEDY)
        finals = run_to_completion(engine)
    finally:
        injector.remove()
    assert injector.num_injected == 1
    for failed in ("poison", "a"):
        assert finals[failed].error is not None and "injected fault in the sampler" in finals[failed].error
        assert {c.finish_reason for c in finals[failed].outputs} == {"error"}
    for survivor in ("b", "c"):
        assert finals[survivor].error is None
        assert finals[survivor].outputs[0].token_ids == alone[survivor]
    assert engine.num_failed_steps == 1
    assert_pool_free(engine)
    # And the engine keeps serving.
    engine.add_request("later", {"prompt_token_ids": prompts["later"]}, GREEDY)
    assert run_to_completion(engine)["later"].outputs[0].token_ids == alone["later"]
    assert_pool_free(engine)


def test_a_lost_kv_pool_marks_the_engine_dead(tiny_model_dir):
    engine = LLMEngine(EngineArgs(model=str(tiny_model_dir), **ENGINE_KWARGS), show_progress=False)
    FaultInjector(engine.runner, "pool_lost")
    engine.add_request("poison", {"prompt_token_ids": POISON}, GREEDY)
    with pytest.raises(EngineDeadError, match="KV cache was lost"):
        engine.step()
    with pytest.raises(EngineDeadError, match="restart"):
        engine.add_request("after", {"prompt_token_ids": [1, 2, 3]}, GREEDY)


def test_the_server_survives_a_step_fault_and_reports_a_lost_pool_as_unhealthy(tiny_model_dir):
    server = ThreadedServer(EngineArgs(model=str(tiny_model_dir), **ENGINE_KWARGS))
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def complete(prompt, **fields):
        return httpx.post(server.url + "/v1/completions", headers=auth, timeout=60,
                          json={"prompt": prompt, "max_tokens": 4, "temperature": 0, **fields})

    try:
        expected = complete([11, 12, 13]).json()["choices"][0]["text"]
        runner = server.engine.engine.runner
        injector = FaultInjector(runner, "sampler")
        for stream in (False, True):
            response = complete(POISON, stream=stream)
            assert response.status_code == 500, response.text
            error = response.json()["error"]
            assert error["code"] == "engine_step_failed" and "injected fault" in error["message"]
            assert health_ok(server)
            assert complete([11, 12, 13]).json()["choices"][0]["text"] == expected
        injector.remove()
        assert server.engine.get_stats().kv_cache_usage == 0

        FaultInjector(runner, "pool_lost")
        assert complete(POISON).status_code == 503
        assert httpx.get(server.url + "/health").status_code == 503
        refused = complete([11, 12, 13])
        assert refused.status_code == 503 and "restart" in refused.json()["error"]["message"]
    finally:
        server.stop()
