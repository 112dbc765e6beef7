"""`python -m jpaged.serve` as a user runs it: flags, readiness log, API key from the environment,
SIGTERM with a request in flight (exit 0), and the bundled SmolLM2 end to end (slow)."""

import logging
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from jpaged.serve import main, parse_args, resolve_api_keys

ENGINE_FLAGS = ["--max-model-len", "--block-size", "--gpu-memory-utilization", "--num-gpu-blocks-override",
                "--max-num-seqs", "--max-num-active-seqs", "--max-num-batched-tokens", "--swap-space",
                "--enable-prefix-caching", "--no-enable-prefix-caching", "--quantization", "--kv-cache-dtype", "--dtype", "--seed",
                "--tensor-parallel-size", "--data-parallel-size", "--attention-backend", "--disable-log-stats", "--enforce-eager",
                "--download-dir", "--generation-config", "--trust-remote-code", "--max-logprobs", "--max-logit-bias",
                "--max-stop-sequences", "--max-stop-token-ids", "--max-n", "--logprobs-mode", "--stream-interval",
                "--kv-cache-memory-bytes", "--hf-overrides", "--disable-sliding-window", "--tokenizer-revision",
                "--tokenizer-mode", "--enable-sleep-mode", "--hf-token",
                "--override-generation-config", "--profiler-config", "--reasoning-parser",
                "--reasoning-config"]
SERVER_FLAGS = ["--host", "--port", "--api-key", "--served-model-name", "--chat-template",
                "--max-request-bytes", "--graceful-shutdown-timeout", "--trust-request-chat-template",
                "--max-header-bytes", "--max-prompts-per-request", "--allowed-origins", "--allow-credentials",
                "--allowed-methods", "--allowed-headers", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs",
                "--disable-log-requests", "--enable-update-weights-route", "--enable-log-requests", "--max-log-len",
                "--disable-uvicorn-access-log", "--root-path", "--response-role", "--return-tokens-as-token-ids",
                "--enable-prompt-tokens-details", "--enable-force-include-usage", "--enable-request-id-headers",
                "--enable-server-load-tracking", "--default-chat-template-kwargs",
                "--exclude-tools-when-tool-choice-none", "--shutdown-timeout", "--uds",
                "--enable-tokenizer-info-endpoint", "--chat-template-content-format", "--config", "--ssl-cert-reqs",
                "--ssl-ciphers", "--disable-access-log-for-endpoints", "--enable-log-outputs", "--log-level",
                "--sse-keep-alive-interval", "--enable-log-deltas", "--enable-scale-out"]
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


def test_config_file_flags_under_the_command_line(tmp_path):
    """vLLM's --config: YAML keys are flag names (- or _), true / false / lists / mappings become
    flags, and the command line wins; a missing or non-YAML file exits 2 naming --config."""
    config = tmp_path / "serve.yml"
    config.write_text("port: 8001\nmax_model_len: 512\nenable-prefix-caching: false\nenforce-eager: true\n"
                      "served-model-name: [a, b]\ndefault-chat-template-kwargs: {enable_thinking: false}\n"
                      "ssl-ciphers: ECDHE+AESGCM\nswap-space: null\n")
    args, engine_args = parse_args(["m", "--config", str(config), "--port", "9"])
    assert (args.port, args.ssl_ciphers, args.default_chat_template_kwargs) == (9, "ECDHE+AESGCM",
                                                                                {"enable_thinking": False})
    assert (engine_args.model, engine_args.max_model_len, engine_args.served_model_name) == ("m", 512, ["a", "b"])
    assert not engine_args.enable_prefix_caching and engine_args.enforce_eager and engine_args.swap_space == 0
    assert parse_args([f"--config={config}"])[0].port == 8001


def test_access_log_filter_drops_the_given_paths():
    from jpaged.serve import _AccessLogFilter

    def record(path):
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", "GET", path, "1.1", 200), None)

    keep = _AccessLogFilter(["/health", "/metrics"])
    assert [keep.filter(record(p)) for p in ("/health", "/metrics?x=1", "/v1/models", "/healthz")] == [
        False, False, True, True]


def test_positional_model_and_vllm_list_flags():
    args, engine_args = parse_args(["some/model", "--served-model-name", "a", "b", "--allowed-origins",
                                    '["https://x.example", "https://y.example"]', "--enforce-eager"])
    assert engine_args.model == "some/model" and engine_args.served_model_name == ["a", "b"]
    assert engine_args.enforce_eager and args.allowed_origins == [["https://x.example", "https://y.example"]]
    assert parse_args(["--model", "m"])[1].model == "m"
    # Unset, the token budget is the server's chunk for the device (LLMEngine sets it).
    assert parse_args([])[1].max_num_batched_tokens is None
    assert parse_args(["--max-num-batched-tokens", "64"])[1].max_num_batched_tokens == 64


def test_api_keys_from_the_flag_or_the_environment():
    """vLLM's --api-key K1 K2, else $JPAGED_API_KEY, else vLLM's $VLLM_API_KEY; an empty key is none."""
    assert resolve_api_keys(parse_args(["--api-key", "k1", "k2"])[0].api_key, {"JPAGED_API_KEY": "env"}) == ["k1", "k2"]
    assert resolve_api_keys(None, {"JPAGED_API_KEY": "j", "VLLM_API_KEY": "v"}) == ["j"]
    assert resolve_api_keys(None, {"VLLM_API_KEY": "v"}) == ["v"]
    assert resolve_api_keys(None, {"JPAGED_API_KEY": ""}) == resolve_api_keys(None, {}) == []


@pytest.mark.parametrize("argv, fragment", [
    (["m1", "--model", "m2"], "positional MODEL"),
    (["--ssl-keyfile", "k.pem"], "--ssl-certfile"),
    (["--max-logprobs", "-1"], "--max-logprobs"),
    (["--max-n", "0"], "--max-n"),
    (["--max-log-len", "-1"], "--max-log-len"),
    (["--enable-log-outputs"], "--enable-log-outputs requires --enable-log-requests"),
    (["--default-chat-template-kwargs", "[1]"], "--default-chat-template-kwargs"),
    (["--chat-template-content-format", "parts"], "--chat-template-content-format"),
    (["--uds", "/" + "s" * 120], "--uds"),
    (["--uds", "/no/such/folder/jpaged.sock"], "--uds"),
    (["--config", "/no/such/serve.yaml"], "--config"),
    (["--config", "serve.json"], "--config"),
    (["--log-level", "loud"], "--log-level"),
    (["--sse-keep-alive-interval", "-1"], "--sse-keep-alive-interval"),
])
def test_conflicting_or_bad_flags_exit_2_naming_them(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


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
            match = re.search(r"jpaged is ready: serving (\S+) on (?:(https?://127\.0\.0\.1:\d+)|"
                              r"unix socket (\S+) \((https?);)", line)
            if match:
                self.model_name, self.url, self.uds, scheme = match.groups()
                if self.uds is not None:  # the socket's URL, for a client with an HTTPTransport(uds=...)
                    self.url = f"{scheme}://127.0.0.1"
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


def test_sigterm_ends_in_flight_requests_and_exits_0(tiny_model_dir, tmp_path):
    """Also: the flags come from vLLM's --config YAML (the command line's --port 0 wins over its port), and
    --disable-access-log-for-endpoints leaves /health out of the access log."""
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {tiny_model_dir}\nserved-model-name: [tiny]\ngraceful_shutdown_timeout: 0.5\n"
                      f"disable-log-requests: true\nport: 1\ndisable-access-log-for-endpoints: /health,/ping\n"
                      f"max-model-len: 64\nmax-num-seqs: 8\nmax-num-batched-tokens: 16\n"
                      f"num-gpu-blocks-override: 32\n")
    server = ServeProcess(["--config", str(config)], env={"JPAGED_API_KEY": "from-env"})
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
    log = "".join(server.log)
    assert "request cmpl-" not in log  # --disable-log-requests
    assert '"GET /v1/models HTTP/1.1" 200' in log and '"GET /health HTTP/1.1"' not in log


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


def test_vllm_style_invocation_over_https(tiny_model_dir, tmp_path):
    """`python -m jpaged.serve MODEL` with vLLM's flags: TLS on a Unix socket (--uds), two names,
    enforce-eager, a path prefix behind a proxy (the key still guards it), request logs without the
    key, the prompt cut to --max-log-len, the outputs (--enable-log-outputs), no access log, GET /tokenizer_info (the --chat-template
    it renders with) and --chat-template-content-format reaching the template."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    # Shows how content reached it: "S:" a string ("auto" would pick parts, "P:", for this template).
    template = ("{% for m in messages %}{% if m.content is string %}S:{{ m.content }}"
                "{% else %}{% for p in m.content %}P:{{ p.text }}{% endfor %}{% endif %}{% endfor %}")
    (tmp_path / "template.jinja").write_text(template)
    secret, sock = "sk-do-not-log-me", tmp_path / "jpaged.sock"
    server = ServeProcess([str(tiny_model_dir), "--served-model-name", "tiny", "alias", "--enforce-eager",
                           "--api-key", secret, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
                           "--uds", str(sock), "--root-path", "/proxy", "--enable-log-requests", "--max-log-len", "3",
                           "--enable-log-outputs", "--log-level", "debug",
                           "--disable-uvicorn-access-log", "--enable-tokenizer-info-endpoint",
                           "--chat-template", str(tmp_path / "template.jinja"),
                           "--chat-template-content-format", "string", *SMALL_ENGINE])
    try:
        assert server.uds == str(sock) and server.url.startswith("https://") and server.model_name == "tiny"
        verify = ssl.create_default_context(cafile=str(cert))
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock), verify=verify), base_url=server.url)
        auth = {"Authorization": f"Bearer {secret}"}
        assert http.get("/health").status_code == 200
        client = openai.OpenAI(base_url=server.url + "/proxy/v1", api_key=secret, max_retries=0, http_client=http)
        assert [m.id for m in client.models.list().data] == ["tiny", "alias"]
        for path in ("/proxy/v1/models", "/v1/models", "/proxy/tokenizer_info"):  # the key is needed
            assert http.get(path).status_code == 401
        result = client.completions.create(model="alias", prompt="a secret prompt", max_tokens=3)
        assert result.model == "alias" and result.usage.completion_tokens >= 1
        info = http.get("/proxy/tokenizer_info", headers=auth).json()
        assert info["chat_template"] == template and info["eos_token"] == "<|im_end|>"
        assert info["tokenizer_class"] and "vocab_file" not in info
        messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        tokens = http.post("/proxy/tokenize", json={"messages": messages}, headers=auth).json()["tokens"]
        assert http.post("/proxy/detokenize", json={"tokens": tokens}, headers=auth).json()["prompt"] == "S:hi"
    finally:
        assert server.stop() == 0
    log = "".join(server.log)
    assert "enforce_eager: no precompilation" in log and "Compiling step buckets" not in log
    assert re.search(r"request cmpl-\w+-0: \d+ prompt tokens, prompt: 'a s'", log)
    assert re.search(r"request cmpl-\w+-0: output 0: " + re.escape(repr(result.choices[0].text))
                     + f", finish_reason: {result.choices[0].finish_reason}", log)  # --enable-log-outputs
    assert re.search(r"DEBUG jpaged.serve: request cmpl-\w+-0: output 0 token ids: \[\d+", log)  # --log-level debug
    assert secret not in log and "a secret prompt" not in log
    assert not re.search(r'"GET \S*/v1/models HTTP/1.1" 200', log)  # --disable-uvicorn-access-log
