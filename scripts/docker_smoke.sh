#!/usr/bin/env bash
# Builds the image, starts it, probes it with the official `openai` client, and checks that the
# server runs the C++ CPU kernel (not the reference fallback) as uid 1000.
#
#   scripts/docker_smoke.sh [TAG]        # default TAG: jpaged:smoke
#
# Uses `docker` when a daemon answers; otherwise podman as ../shared/CONTAINERS.md describes for
# machines with no daemon and no registry (needs root, and a local python:3.11-slim stand-in
# image made as that page shows): `podman build --isolation=chroot`, then the image's file system
# run under chroot as uid 1000. PYTHON (default python3) must have the `openai` package.
# Environment: PORT (8123), STARTUP_TIMEOUT seconds (900), KEEP=1 keeps the image afterwards.
set -euo pipefail

TAG=${1:-jpaged:smoke}
PORT=${PORT:-8123}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-900}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG=$(mktemp /tmp/jpaged-smoke-log.XXXXXX)
SERVER_FLAGS=(--max-model-len 512 --max-num-seqs 8 --max-num-batched-tokens 64)
CLEANUP=()

cleanup() {
    local status=$?
    for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" || true; done
    if [[ $status -ne 0 ]]; then
        echo "--- server log (last 40 lines) ---"
        tail -n 40 "$LOG" || true
    fi
    exit "$status"
}
trap cleanup EXIT

fail() { echo "docker_smoke: FAIL: $*" >&2; exit 1; }

if docker info >/dev/null 2>&1; then
    ENGINE=docker
elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
else
    fail "neither a Docker daemon nor podman is available (see ../shared/CONTAINERS.md)"
fi
echo "docker_smoke: building $TAG with $ENGINE"

start=$(date +%s)
if [[ $ENGINE == docker ]]; then
    docker build -t "$TAG" "$ROOT"
    docker volume create jpaged-smoke-cache >/dev/null
    docker run -d --rm --name jpaged-smoke -p "127.0.0.1:$PORT:8000" \
        -v jpaged-smoke-cache:/home/jpaged/.cache/jpaged "$TAG" "${SERVER_FLAGS[@]}" >/dev/null
    CLEANUP+=("docker stop jpaged-smoke >/dev/null")
    docker logs -f jpaged-smoke >"$LOG" 2>&1 &
    CLEANUP+=("kill $! 2>/dev/null")
else
    [[ $(id -u) -eq 0 ]] || fail "the podman recipe mounts and chroots into the image: run as root"
    podman build --isolation=chroot --network host -t "$TAG" "$ROOT"
    [[ ${KEEP:-0} == 1 ]] || CLEANUP+=("podman rmi -f $TAG >/dev/null")
    mnt=$(podman image mount "$TAG")
    CLEANUP+=("podman image unmount $TAG >/dev/null")
    cache=$(mktemp -d /tmp/jpaged-smoke-cache.XXXXXX)
    chown 1000:1000 "$cache"
    CLEANUP+=("rm -rf $cache")
    for dir in proc dev; do
        mount --bind "/$dir" "$mnt/$dir"
        CLEANUP+=("umount $mnt/$dir")
    done
    mount --bind "$cache" "$mnt/home/jpaged/.cache/jpaged"  # the image mount is read-only
    CLEANUP+=("umount $mnt/home/jpaged/.cache/jpaged")
    chroot --userspec=1000:1000 "$mnt" env HOME=/home/jpaged PATH=/usr/local/bin:/usr/bin:/bin PYTHONUNBUFFERED=1 \
        sh -c "cd /opt/jpaged && exec python -m jpaged.serve --host 127.0.0.1 --port $PORT ${SERVER_FLAGS[*]}" \
        >"$LOG" 2>&1 &
    server_pid=$!
    CLEANUP+=("kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null")
fi
echo "docker_smoke: built in $(($(date +%s) - start)) s; waiting for the server"

deadline=$(($(date +%s) + STARTUP_TIMEOUT))
until grep -q "jpaged is ready" "$LOG"; do
    [[ $(date +%s) -lt $deadline ]] || fail "the server was not ready after $STARTUP_TIMEOUT s"
    sleep 2
done
echo "docker_smoke: ready after $(($(date +%s) - start)) s"

if ! grep -q "attention backend: cpu" "$LOG"; then
    backend=$(grep -m1 'attention backend' "$LOG" || echo 'no backend line')
    fail "the server does not run the C++ CPU kernel: $backend"
fi
if grep -q "C++ CPU attention kernel is unavailable" "$LOG"; then
    fail "the kernel fell back: $(grep -m1 'C++ CPU attention kernel is unavailable' "$LOG")"
fi

"$PYTHON" - "$PORT" <<'EOF'
import sys

import openai

client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="EMPTY", max_retries=2)
model = client.models.list().data[0].id
answer = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
                                        messages=[{"role": "user", "content": "What is the capital of France?"}])
text = answer.choices[0].message.content
assert "Paris" in text, text
streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if chunk.choices)
assert streamed.strip(), "empty stream"
print(f"docker_smoke: {model} answered {text!r}; streamed {streamed!r}")
EOF
echo "docker_smoke: PASS ($ENGINE, C++ CPU kernel, openai client)"
