"""scripts/soak.py, CI-sized: a few seconds of mixed load and client faults against a real
`python -m jpaged.serve` on the tiny model, then SIGTERM (after the load, and under load)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


@pytest.mark.parametrize("extra", [[], ["--sigterm-under-load"]], ids=["then_idle", "sigterm_under_load"])
def test_short_soak_passes_every_check(tiny_model_dir, extra):
    result = subprocess.run(
        [sys.executable, str(SOAK), "--model", str(tiny_model_dir), "--clients", "12", "--duration", "6",
         "--max-tokens", "12", *extra],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(SOAK.parents[1])})
    summary = result.stdout
    assert result.returncode == 0, summary + result.stderr[-3000:]
    assert "[PASS] every request checked out: 0 failed" in summary
    assert "[PASS] SIGTERM exit code 0" in summary
    if not extra:
        assert "[PASS] pool all free" in summary and "[PASS] /health after the load" in summary
    total = next(line for line in summary.splitlines() if line.startswith("total")).split()
    assert int(total[1]) >= 10  # requests that completed and checked out
