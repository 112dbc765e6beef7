"""--data-parallel-size: flags and device checks here; the replicas themselves in a child process
with 8 fake CPU devices (tests/data_parallel_checks.py: greedy equality with one engine, abort
routing with no leaked blocks, a server over two replicas); `python -m jpaged.serve` with two."""

import os
import subprocess
import sys

import httpx
import jax
import pytest
from test_serve_cli import SMALL_ENGINE, ServeProcess

from jpaged.async_llm import AsyncLLM
from jpaged.config import EngineArgs
from jpaged.data_parallel import replica_devices
from jpaged.serve import parse_args

CHECKS = os.path.join(os.path.dirname(__file__), "data_parallel_checks.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_too_few_devices_says_how_many_and_how_to_get_them_on_cpu():
    one = jax.devices()[:1]
    with pytest.raises(ValueError) as info:
        replica_devices(2, 1, devices=one)
    message = str(info.value)
    assert "--data-parallel-size 2 x --tensor-parallel-size 1 needs 2 devices, but jax found 1" in message
    if one[0].platform == "cpu":
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in message


def test_replica_device_slices():
    devices = list(range(8))  # stand-ins: only slicing is under test
    assert replica_devices(4, 2, devices=devices) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert replica_devices(3, 1, devices=devices) == [[0], [1], [2]]


def test_flag():
    _, engine_args = parse_args(["--data-parallel-size", "2"])
    assert engine_args.data_parallel_size == 2
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1"):
        EngineArgs(data_parallel_size=0)
    # One AsyncLLM is one engine: it refuses (before loading anything) rather than ignore the flag.
    with pytest.raises(ValueError, match="DataParallelAsyncLLM"):
        AsyncLLM.from_engine_args(engine_args)


def run_checks(mode: str, model: str, cache_dir: str, timeout: float) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    done = subprocess.run([sys.executable, CHECKS, mode, model, cache_dir], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-8000:]}"


def test_replicas_on_a_tiny_model(tiny_model_dir, tmp_path):
    run_checks("tiny", str(tiny_model_dir), str(tmp_path / "jax_cache"), timeout=300)


@pytest.mark.slow
def test_replicas_on_the_bundled_model(smollm2_path, tmp_path):
    run_checks("bundled", smollm2_path, str(tmp_path / "jax_cache"), timeout=600)


@pytest.mark.slow  # a cold start of two replicas; the fast test covers the same front through the harness
def test_serve_cli_with_two_replicas(tiny_model_dir, tmp_path):
    """`python -m jpaged.serve --data-parallel-size 2` on 2 fake CPU devices: serves, streams, exits 0 on SIGTERM."""
    server = ServeProcess(["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--data-parallel-size", "2",
                           "--compilation-cache-dir", str(tmp_path / "jax_cache"), "--disable-log-requests",
                           *SMALL_ENGINE],
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JPAGED_API_KEY": ""})
    try:
        log = "".join(server.log)
        assert "building replica 1 of 2 on cpu:1" in log, log
        body = {"model": "tiny", "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        result = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        assert [c["finish_reason"] for c in result["choices"]] == ["length", "length"], result
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "prompt": "Hi", "stream": True},
                          timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2, lines
        assert server.stop() == 0
    finally:
        server.stop()
