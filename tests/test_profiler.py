"""--profiler-config (jpaged/profiler.py): LLM.start_profile / stop_profile write a JAX trace of the
engine's steps; delay_iterations and max_iterations count steps; the config is checked.

Oracle: the trace files JAX writes (their names and the jitted step programs recorded in them).
The server's /start_profile and /stop_profile are in test_server_flags.py.
"""

from pathlib import Path

import jax
import pytest

from jpaged import LLM, EngineArgs, SamplingParams

ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=16, num_gpu_blocks_override=64,
                     compilation_cache_dir="", disable_log_stats=True)
PROMPTS = [{"prompt_token_ids": list(range(100, 100 + n))} for n in (3, 20)]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def traces(directory: Path) -> list[bytes]:
    """The XPlane protobufs JAX's profiler wrote under `directory`."""
    return [path.read_bytes() for path in sorted(directory.rglob("*.xplane.pb"))]


@pytest.mark.parametrize("config, words", [
    ({"profiler": "torch", "jax_profiler_dir": "/tmp/x"}, "profiler must be 'jax'"),
    ({"profiler": "jax"}, "jax_profiler_dir must be an absolute path"),
    ({"profiler": "jax", "jax_profiler_dir": "relative/dir"}, "absolute path"),
    ({"profiler": "jax", "jax_profiler_dir": "/tmp/x", "max_iterations": -1}, "max_iterations must be"),
    ({"profiler": "jax", "jax_profiler_dir": "/tmp/x", "torch_profiler_dir": "/tmp/x"}, "unknown keys"),
    ("jax", "profiler_config must be a dict"),
])
def test_bad_profiler_configs_are_refused(tiny_model_dir, config, words):
    with pytest.raises(ValueError, match=words):
        EngineArgs(model=str(tiny_model_dir), profiler_config=config)


def test_start_and_stop_profile_write_a_trace_of_the_steps(tiny_model_dir, tmp_path):
    llm = LLM(str(tiny_model_dir), profiler_config={"profiler": "jax", "jax_profiler_dir": str(tmp_path)},
              **ENGINE_KWARGS)
    profiler = llm.llm_engine.profiler
    expected = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert traces(tmp_path) == []

    llm.start_profile("run1")
    with pytest.raises(ValueError, match="already running"):
        llm.start_profile()
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    llm.stop_profile()
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    (trace,) = traces(tmp_path / "run1")
    assert b"jit__forward_step" in trace and b"jit__sample_step" in trace

    llm.start_profile("bounded", max_iterations=2)  # ends by itself after two steps
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert not profiler.tracing and len(traces(tmp_path / "bounded")) == 1

    llm.start_profile("delayed", delay_iterations=1000)  # never reaches its first step
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert not profiler.tracing
    llm.stop_profile()
    assert traces(tmp_path / "delayed") == []

    # A trace JAX cannot start (another one runs in the process, or the folder cannot be made)
    # is a ValueError from start_profile, or logged and dropped when a delayed start hits it; the
    # engine serves on either way.
    jax.profiler.start_trace(str(tmp_path / "someone_else"))
    try:
        with pytest.raises(ValueError, match="could not start a trace"):
            llm.start_profile("clash")
        llm.start_profile("clash_later", delay_iterations=1)
        outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert not profiler.tracing and profiler._armed is None
    finally:
        jax.profiler.stop_trace()
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="could not start a trace"):
        llm.start_profile("a_file/below")
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in expected]

    llm.llm_engine.profiler = None
    with pytest.raises(ValueError, match="profiling is off"):
        llm.start_profile()
