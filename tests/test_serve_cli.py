"""`python -m jpaged.serve` as a user runs it: flags, readiness log, API key from the environment,
SIGTERM with a request in flight (exit 0), and the bundled SmolLM2 end to end (slow)."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from jpaged.serve import main

ENGINE_FLAGS = ["--max-model-len", "--block-size", "--gpu-memory-utilization", "--num-gpu-blocks-override",
                "--max-num-seqs", "--max-num-batched-tokens", "--swap-space", "--enable-prefix-caching",
                "--no-enable-prefix-caching", "--quantization", "--kv-cache-dtype", "--dtype", "--seed",
                "--tensor-parallel-size", "--attention-backend", "--disable-log-stats"]
SERVER_FLAGS = ["--host", "--port", "--api-key", "--served-model-name", "--chat-template",
                "--max-request-bytes", "--graceful-shutdown-timeout", "--trust-request-chat-template"]
# Small buckets, so that only two programs compile: one forward shape and one sampler.
SMALL_ENGINE = ["--max-model-len", "64", "--max-num-seqs", "8", "--max-num-batched-tokens", "16",
                "--num-gpu-blocks-override", "32"]


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ENGINE_FLAGS + SERVER_FLAGS:
        assert re.search(rf"\s{re.escape(flag)}\b", out), flag


def test_bad_flag_value_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--block-size", "0"])
    assert exit_info.value.code == 2
    assert "--block-size" in capsys.readouterr().err


class ServeProcess:
    """`python -m jpaged.serve` in a subprocess; its log is read on a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
        self.proc = subprocess.Popen([sys.executable, "-m", "jpaged.serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError("the server did not log readiness:\n" + "".join(self.log)) from None
            match = re.search(r"jpaged is ready: serving (\S+) on (http://127\.0\.0\.1:\d+)", line)
            if match:
                self.model_name, self.url = match.groups()
                return
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError("the server exited:\n" + "".join(self.log))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put("")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def test_sigterm_ends_in_flight_requests_and_exits_0(tiny_model_dir):
    server = ServeProcess(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                           "--graceful-shutdown-timeout", "0.5", *SMALL_ENGINE],
                          env={"JPAGED_API_KEY": "from-env"})
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer from-env"}
        models = httpx.get(server.url + "/v1/models", headers=auth).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert httpx.get(server.url + "/health").status_code == 200
        body = {"prompt": "Keep going", "max_tokens": 56, "stream": True, "ignore_eos": True}
        payloads = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth,
                          timeout=60) as response:
            lines = response.iter_lines()
            for line in lines:
                if line:
                    payloads.append(line)
                    break
            server.proc.send_signal(signal.SIGTERM)
            payloads += [line for line in lines if line]
        assert payloads[-1] == "data: [DONE]"
        assert re.search(r'"finish_reason":"(abort|length)"', payloads[-2]), payloads[-3:]
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


@pytest.mark.slow
def test_bundled_smollm2_end_to_end():
    server = ServeProcess(SMALL_ENGINE)
    try:
        assert server.model_name == "smollm2-135m-instruct"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=24,
                                                temperature=0)
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason in ("stop", "length")
        kwargs = dict(model=server.model_name, messages=messages, max_tokens=16, temperature=0.8, seed=3)
        whole = client.chat.completions.create(**kwargs)
        streamed = "".join(chunk.choices[0].delta.content or ""
                           for chunk in client.chat.completions.create(stream=True, **kwargs) if chunk.choices)
        assert streamed == whole.choices[0].message.content
    finally:
        assert server.stop() == 0
