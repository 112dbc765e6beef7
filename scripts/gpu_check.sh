#!/usr/bin/env bash
# The GPU check, one command, for a machine with an NVIDIA GPU, this checkout and its wheels
# (jax + the CUDA plugin, flax, transformers, torch, pytest; no server packages, no network):
#
#     scripts/gpu_check.sh [OUT_DIR]        # default: gpu_check_out
#
# 1. pytest -m gpu (the compiled Pallas kernels and the engine on the GPU against their oracles);
# 2. the Pallas decode / ragged kernels against a jnp copy of the same bytes (bandwidth fraction),
#    and a sweep of the decode kernel's launch parameters;
# 3. the engine's decode step for Llama-3-8B-shaped bf16 weights at batch 64 x 2048 against the
#    HBM roofline;
# 4. offline throughput, jpaged against HF transformers' generate, on the same card.
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (plus one JSON and one log per step).
# Every step has a time limit and the others still run when one fails; the exit status is 0 only
# when every step ran (the targets' pass/fail are in the table). Without a GPU it stops at once
# with exit status 2. Environment: PYTHON (default python3), GPU_CHECK_PROMPTS (default 128),
# GPU_CHECK_STEPS (default "pytest_gpu kernel sweep step jpaged hf": rerun a subset into the same OUT_DIR),
# GPU_CHECK_DEADLINE (seconds for the whole check, default none: each step gets at most what is
# left, and a step with under 20 s left is skipped, so the report is written inside a time-boxed
# machine lease).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Fail rather than fall back to the CPU when the CUDA backend cannot start.
export JAX_PLATFORMS=cuda

timeout 180 "$PYTHON" -c '
import importlib.metadata, shutil, sys
plugins = sorted({d.metadata["Name"] for d in importlib.metadata.distributions()
                  if "jax" in (d.metadata["Name"] or "") and "cuda" in (d.metadata["Name"] or "")})
try:
    import jax
    device = jax.devices()[0]
    assert device.platform == "gpu", f"the first device is {device}"
except Exception as e:
    smi = shutil.which("nvidia-smi")
    sys.exit(f"gpu_check: no usable NVIDIA GPU: JAX cannot start its CUDA backend ({type(e).__name__}: {e}). "
             f"JAX CUDA plugins installed: {plugins or None}; nvidia-smi: {smi}.")
print(f"gpu_check: {device.device_kind}, jax {jax.__version__}, {plugins}")
' >"$OUT/device.log" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
  if [ "$rc" -eq 124 ]; then
    echo "gpu_check: no usable NVIDIA GPU: JAX did not start within 180 s." >&2
  else
    tail -n 1 "$OUT/device.log" >&2
  fi
  echo "gpu_check: details in $OUT/device.log" >&2
  exit 2
fi
cat "$OUT/device.log"

failed=0
STEPS=" ${GPU_CHECK_STEPS:-pytest_gpu kernel sweep step jpaged hf} "
step() {  # step NAME TIMEOUT_S COMMAND...: runs it with a limit, logs to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  if [[ "$STEPS" != *" $name "* ]]; then
    return 0
  fi
  if [ -n "${GPU_CHECK_DEADLINE:-}" ]; then
    local left=$((GPU_CHECK_DEADLINE - SECONDS - 10))  # 10 s for the report
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
      echo "gpu_check: $name skipped: GPU_CHECK_DEADLINE leaves ${left} s"
      failed=1
      return 1
    fi
  fi
  echo "gpu_check: $name (at most ${limit} s) ..."
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
  if [ "$rc" -ne 0 ]; then
    failed=1
    tail -n 5 "$OUT/$name.log"
  fi
  return "$rc"
}

gpu_tests=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
step pytest_gpu 900 "$PYTHON" -m pytest -m gpu -v --tb=short -p no:cacheprovider $gpu_tests
pytest_rc=$?
if [[ "$STEPS" == *" pytest_gpu "* ]] && [ -f "$OUT/pytest_gpu.log" ]; then
  summary=$(tail -n 1 "$OUT/pytest_gpu.log")
  "$PYTHON" -c 'import json, sys
json.dump({"summary": sys.argv[1], "pass": sys.argv[2] == "0"}, open(sys.argv[3], "w"))' \
    "$summary" "$pytest_rc" "$OUT/pytest_gpu.json"
fi

step kernel 900 "$PYTHON" scripts/gpu_check.py kernel --out "$OUT"
step sweep 900 "$PYTHON" scripts/gpu_check.py sweep --out "$OUT"
step step 900 "$PYTHON" scripts/gpu_check.py step --out "$OUT"
step jpaged 1200 "$PYTHON" scripts/gpu_check.py jpaged --out "$OUT" --num-prompts "${GPU_CHECK_PROMPTS:-128}"
step hf 1800 "$PYTHON" scripts/gpu_check.py hf --out "$OUT" --num-prompts "${GPU_CHECK_PROMPTS:-128}"

"$PYTHON" scripts/gpu_check.py report --out "$OUT"
echo "gpu_check: wrote $OUT/gpu_check.json and $OUT/gpu_check.md"
exit "$failed"
