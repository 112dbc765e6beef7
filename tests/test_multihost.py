"""Two local processes joined by jax.distributed on 127.0.0.1 (tensor parallel 2, one CPU device
each, gloo collectives) serve a batch: host 0 schedules and broadcasts every step, host 1 runs it.
The tokens, logprobs and prompt logprobs equal one process's over two devices."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import TINY_HF_CONFIG

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, num_hosts, host_id, port, log):
    """The worker as its own process group, its output in the file `log` (a pipe nobody reads
    while we wait on another process could fill and block it)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.dirname(WORKER), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, WORKER, model_dir, str(num_hosts), str(host_id), str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _tokens(stdout: str):
    lines = [line for line in stdout.splitlines() if line.startswith("TOKENS ")]
    assert len(lines) == 1, stdout[-2000:]
    return json.loads(lines[0].removeprefix("TOKENS "))


@pytest.mark.slow
def test_two_hosts_serve_like_one(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / file, model_dir / file)
    (model_dir / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    port = _free_port()
    logs = [tmp_path / f"host{host}.log" for host in (0, 1)] + [tmp_path / "single.log"]
    procs = [_start(str(model_dir), 2, host, port, logs[host]) for host in (0, 1)]
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
        procs.append(_start(str(model_dir), 1, 0, 0, logs[2]))
        procs[2].wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert _tokens(outs[0]) == _tokens(outs[2])
    assert "TOKENS" not in outs[1]  # host 1 only followed
