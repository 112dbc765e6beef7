"""The executable cache (jpaged/executable_cache.py): a warm start loads every step program
without tracing, lowering or compiling, and they give the same tokens and logprobs as freshly
compiled ones; its key follows what the programs are built from; a broken entry is rebuilt; a
program JAX's persistent cache supplied is not stored (it would serialize incomplete).

Each test uses its own engine shape: JAX's persistent cache folder is one per test process
(tests/conftest.py), so programs compiled in one test may be found there by another."""

import dataclasses
import functools
import gc
import logging
import os

import jax
import pytest

from jpaged import LLM, SamplingParams, executable_cache
from jpaged.executable_cache import Unfingerprintable, describe, fingerprint
from test_engine import COMPILE_EVENT, count_compiles

TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                COMPILE_EVENT)
# The C++ CPU backend (FFI kernels, packed linears) where it is built, multi-step decode, swap copies.
ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=24,
                     swap_space=0.001, seed=0, disable_log_stats=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
            32, 33, 34, 35, 36, 37], [40, 41, 42], [50, 51, 52, 53, 54, 55, 56, 57, 58]]


def run(llm):
    """Greedy completions, and seeded sampled ones with logprobs and prompt logprobs."""
    greedy = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                          SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    sampled = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]],
                           SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8, seed=7, logprobs=2,
                                          prompt_logprobs=1, ignore_eos=True), use_tqdm=False)
    return ([o.outputs[0].token_ids for o in greedy + sampled],
            [o.outputs[0].logprobs for o in sampled], [o.prompt_logprobs for o in sampled])


def loaded_log(caplog) -> str:
    return [r.getMessage() for r in caplog.records
            if r.name == "jpaged.llm_engine" and "compiled" in r.getMessage()][-1]


def make_llm(model_dir, cache_dir, **overrides):
    return LLM(model=str(model_dir), compilation_cache_dir=str(cache_dir), **{**ENGINE_KWARGS, **overrides})


def programs(llm) -> list[tuple[str, object]]:
    """The (name, key) of every program the engine's runner compiled."""
    runner = llm.llm_engine.runner
    tables = dict(forward=runner._forward, decode_steps=runner._decode_steps, sample=runner._sample,
                  prompt_logprobs=runner._prompt_logprobs, swap=runner._swap)
    return [(name, key) for name, table in tables.items() for key in table]


def stored(llm) -> list[tuple[str, object]]:
    """Those of them the executable cache holds (all but what JAX's own cache supplied: programs
    of the same shapes compiled by an earlier test)."""
    return [program for program in programs(llm) if llm.llm_engine.runner._executables.contains(*program)]


@pytest.fixture
def jax_cache_keeps(request):
    """Sets which compiles JAX's persistent cache keeps (by compile time, s) for one test."""
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    yield lambda seconds: jax.config.update("jax_persistent_cache_min_compile_time_secs", seconds)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def test_a_warm_start_loads_every_program_and_runs_the_same(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jpaged.llm_engine")
    cold = make_llm(tiny_model_dir, tmp_path)
    assert loaded_log(caplog).endswith("(0 loaded from the executable cache)")
    num_programs, num_stored = len(programs(cold)), len(stored(cold))
    assert {name for name, _ in stored(cold)} >= {"forward", "decode_steps", "prompt_logprobs"}
    assert len(os.listdir(tmp_path / "executables")) == num_stored
    expected = run(cold)
    del cold
    gc.collect()

    warm = make_llm(tiny_model_dir, tmp_path)
    assert loaded_log(caplog).endswith(f"({num_stored} loaded from the executable cache)")
    assert run(warm) == expected
    with count_compiles(TRACE_EVENTS) as events:
        assert warm.llm_engine.runner.warmup(show_progress=False) == (num_programs, num_stored)
    if num_stored == num_programs:
        assert events == []


def test_a_different_engine_setting_misses_and_a_broken_entry_is_rebuilt(tiny_model_dir, tmp_path, caplog,
                                                                        jax_cache_keeps):
    jax_cache_keeps(1e9)  # none: the rebuilt program is compiled for real, and stored
    caplog.set_level(logging.INFO, logger="jpaged.llm_engine")
    llm = make_llm(tiny_model_dir, tmp_path, max_num_seqs=2)
    expected = run(llm)
    num_stored = len(stored(llm))
    forward = os.path.basename(llm.llm_engine.runner._executables.path("forward", (32, 2, 8, False)))
    del llm
    gc.collect()
    # Same buckets, but the sampler and prompt-logprobs programs compute something else.
    make_llm(tiny_model_dir, tmp_path, max_num_seqs=2, logprobs_mode="processed_logprobs")
    assert loaded_log(caplog).endswith("(0 loaded from the executable cache)")
    gc.collect()

    folder = tmp_path / "executables"
    with open(folder / forward, "r+b") as f:
        f.truncate(os.path.getsize(folder / forward) // 2)
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="jpaged.executable_cache")
    llm = make_llm(tiny_model_dir, tmp_path, max_num_seqs=2)
    assert any("cannot load" in r.getMessage() and forward in r.getMessage() for r in caplog.records)
    assert run(llm) == expected
    assert llm.llm_engine.runner.warmup(show_progress=False)[1] == num_stored  # the broken one replaced


def test_programs_from_jax_cache_are_not_stored(tiny_model_dir, tmp_path, caplog, jax_cache_keeps):
    jax_cache_keeps(0)  # every compile
    llm = make_llm(tiny_model_dir, tmp_path, max_num_seqs=3)
    num_programs = len(programs(llm))
    expected = run(llm)
    del llm
    gc.collect()
    for name in os.listdir(tmp_path / "executables"):
        os.remove(tmp_path / "executables" / name)
    caplog.set_level(logging.INFO, logger="jpaged.executable_cache")
    llm = make_llm(tiny_model_dir, tmp_path, max_num_seqs=3)  # JAX's cache has (most of) them, ours none
    from_jax = [r.getMessage() for r in caplog.records if "came from JAX's compilation cache" in r.getMessage()]
    assert any("forward (16, 3, 8, False)" in message for message in from_jax)
    assert len(from_jax) + len(stored(llm)) == num_programs
    assert run(llm) == expected
    assert llm.llm_engine.runner.warmup(show_progress=False) == (num_programs, num_programs - len(from_jax))


@dataclasses.dataclass(frozen=True)
class Settings:
    width: int
    name: str = "a"


def _scaled(x, *, scale):
    return x * scale


def _make_closure(value):
    def inner(x):
        return x + value
    return inner


def test_describe_follows_values_not_identities():
    assert describe(Settings(3))[0] == describe(Settings(3))[0] != describe(Settings(4))[0]
    assert describe(functools.partial(_scaled, scale=2))[0] == describe(functools.partial(_scaled, scale=2))[0]
    assert describe(functools.partial(_scaled, scale=2))[0] != describe(functools.partial(_scaled, scale=3))[0]
    assert describe(_make_closure(1))[0] == describe(_make_closure(1))[0] != describe(_make_closure(2))[0]
    assert describe({"b": 1, "a": (2.0, None)})[0] == describe({"a": (2.0, None), "b": 1})[0]
    assert describe([1])[0] != describe((1,))[0]
    assert describe(jax.numpy.arange(3))[0] != describe(jax.numpy.arange(1, 4))[0]
    assert describe(jax.jit(_scaled))[0] == describe(jax.jit(_scaled))[0] != describe(jax.jit(_make_closure))[0]
    # The modules whose sources the key covers.
    assert describe(functools.partial(_scaled, scale=Settings(1)))[1] == {_scaled.__module__.split(".")[0], "builtins"}
    cycle = []
    cycle.append(cycle)
    assert "<cycle>" in describe(cycle)[0]


def test_describe_refuses_what_it_cannot_pin_down():
    with pytest.raises(Unfingerprintable):
        describe(functools.partial(_scaled, scale=object()))
    with pytest.raises(Unfingerprintable):
        describe(jax.numpy.zeros(1 << 19))  # 2 MiB captured in a closure: not hashed on every start


def test_the_least_recently_used_files_go_above_the_size_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(executable_cache, "MAX_CACHE_BYTES", 1000)
    for age, name in enumerate(["d", "c", "b", "a"]):  # "a" is the oldest
        (tmp_path / f"{name}.jexe").write_bytes(b"x" * 300)
        os.utime(tmp_path / f"{name}.jexe", (1e9 - age * 100, 1e9 - age * 100))
    (tmp_path / "other.txt").write_bytes(b"x" * 300)
    executable_cache.ExecutableCache(str(tmp_path), "f")
    assert sorted(os.listdir(tmp_path)) == ["d.jexe", "other.txt"]  # 1,200 bytes of programs -> at most 500


def test_the_fingerprint_follows_the_environment(monkeypatch):
    devices = jax.devices()[:1]
    base = fingerprint(Settings(1), devices)
    assert fingerprint(Settings(1), devices) == base
    assert fingerprint(Settings(2), devices) != base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert fingerprint(Settings(1), devices) != base
