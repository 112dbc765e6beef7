"""Soak test: a real `python -m jpaged.serve` on 127.0.0.1 under mixed load and client faults.

    python scripts/soak.py                      # 256 clients for 10 minutes, bundled SmolLM2
    python scripts/soak.py --clients 16 --duration 30 --model /path/to/model -- --max-num-seqs 4

Flags after `--` go to the server. The default server flags use a small KV pool
(--num-gpu-blocks-override) and little --max-num-seqs, so bursts queue, preempt and swap.

Each client loops until the deadline, drawing a scenario: plain or streamed completions and
chats (random lengths, n up to 3, seeds, temperatures, now and then bad_words or
allowed_token_ids), plain or streamed /v1/responses, background ones polled to their end (half
cancelled), beam searches on either route, greedy probes, and faults: a disconnect mid-stream,
an abort before the first token, a client that stops reading, a burst past --max-num-seqs, a
malformed request. Checks, after the deadline:
  - every request the client did not cancel finished with a valid finish reason (with ignore_eos,
    exactly "length" and n * max_tokens tokens); malformed ones got a 4xx; none got a 5xx;
  - greedy probes gave the text they give alone (measured before the load);
  - the server goes idle: no request running or waiting and KV usage 0 (read from /metrics);
  - the server's RSS grew less than --max-rss-growth-mib (between the warm-up and the end);
  - /health is 200; then SIGTERM ends it with exit code 0.
With --sigterm-under-load the SIGTERM comes while the clients are still sending: every request
the server accepted must then complete or end with an error, none may hang, and the exit code
must be 0. Prints a summary table; exits 1 if any check failed. Stops by itself.
"""

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

DEFAULT_SERVER_FLAGS = ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                        "--num-gpu-blocks-override", "24", "--swap-space", "0.05", "--disable-log-requests",
                        "--enable-responses-store"]
WORDS = ("paged attention keeps the cache in blocks so many requests share one pool of memory while "
         "the scheduler decides who runs next and who waits for a free block").split()
GREEDY_PROMPTS = ["The cache holds", "A block of sixteen tokens", "Requests wait when", "Paged attention is"]
VALID_FINISH = {"stop", "length"}
# Set by --sigterm-under-load: then a request may also end with finish_reason "abort".
SHUTDOWN = {"expected": False}


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    server_flags = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_flags = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Model to serve (default: the bundled SmolLM2).")
    parser.add_argument("--clients", type=int, default=256, help="Concurrent clients.")
    parser.add_argument("--duration", type=float, default=600.0, help="Seconds of load.")
    parser.add_argument("--max-tokens", type=int, default=48, help="Largest max_tokens a request asks for.")
    parser.add_argument("--max-rss-growth-mib", type=float, default=512.0,
                        help="Fail if the server's RSS grows more than this between warm-up and the end.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenario draws.")
    parser.add_argument("--sigterm-under-load", action="store_true",
                        help="Send SIGTERM while the clients still send, instead of after the load.")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="Seconds to wait for readiness.")
    return parser.parse_args(argv), server_flags or DEFAULT_SERVER_FLAGS


class Server:
    """`python -m jpaged.serve` on 127.0.0.1 with a free port; its log is kept in memory."""

    def __init__(self, model: str | None, flags: list[str], timeout: float):
        cmd = [sys.executable, "-m", "jpaged.serve", "--host", "127.0.0.1", "--port", "0",
               "--graceful-shutdown-timeout", "5", *(["--model", model] if model else []), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(timeout) or self.url is None:
            self.proc.kill()
            raise SystemExit("the server did not become ready:\n" + "".join(self.log[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            match = re.search(r"jpaged is ready: serving \S+ on (http://127\.0\.0\.1:\d+)", line)
            if match:
                self.url = match.group(1)
                self.ready.set()
        self.ready.set()

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


class Tally:
    """Counts per scenario: ok, cancelled (by the client), failed (with the first reasons)."""

    def __init__(self):
        self.counts = collections.defaultdict(collections.Counter)
        self.failures: list[str] = []

    def ok(self, scenario: str) -> None:
        self.counts[scenario]["ok"] += 1

    def cancelled(self, scenario: str) -> None:
        self.counts[scenario]["cancelled"] += 1

    def fail(self, scenario: str, why: str) -> None:
        self.counts[scenario]["failed"] += 1
        if self.counts[scenario]["failed"] <= 3:  # the first few of each scenario
            self.failures.append(f"{scenario}: {why}")


class NotAnswered(Exception):
    """The connection failed before any response header came back: the server never took the
    request (no connection, or a keep-alive connection it closed while shutting down)."""


async def send(http: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    """POSTs `body` and returns the response with its headers read (stream it or `aread()` it)."""
    try:
        return await http.send(http.build_request("POST", path, json=body), stream=True)
    except httpx.TransportError as exc:
        raise NotAnswered(f"{type(exc).__name__}: {exc}") from exc


async def post(http: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    """POSTs `body` and reads the whole response (a failure after the headers is a TransportError)."""
    response = await send(http, path, body)
    try:
        await response.aread()
    finally:
        await response.aclose()
    return response


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))


def _sampling(rng: random.Random, max_tokens_cap: int) -> dict:
    body = {"max_tokens": rng.randint(1, max_tokens_cap), "n": rng.choice([1, 1, 1, 2, 3]),
            "temperature": rng.choice([0.0, 0.7, 1.0])}
    if rng.random() < 0.5:
        body["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    if rng.random() < 0.1:
        body["bad_words"] = rng.sample(WORDS, 3)
    if rng.random() < 0.1:
        body["allowed_token_ids"] = rng.sample(range(300, 5000), 64)
    return body


def refused(tally: Tally, scenario: str, response: httpx.Response) -> bool:
    """Counts a 503 after SIGTERM (the engine has shut down) as refused; False for any other status."""
    if SHUTDOWN["expected"] and response.status_code == 503:
        tally.counts[scenario]["refused_after_sigterm"] += 1
        return True
    return False


def record(tally: Tally, scenario: str, body: dict, choices: dict[int, str | None],
           completion_tokens: int | None) -> None:
    """Checks one finished request's choices (index -> finish_reason) and counts it."""
    if SHUTDOWN["expected"] and "abort" in choices.values():
        tally.counts[scenario]["aborted_by_shutdown"] += 1
        return
    why = check_choices(body, choices, completion_tokens)
    tally.fail(scenario, why) if why else tally.ok(scenario)


def check_choices(body: dict, choices: dict[int, str | None], completion_tokens: int | None) -> str | None:
    """Why the finished choices are wrong (None when right). choices: index -> finish_reason."""
    n = body.get("n", 1)
    if sorted(choices) != list(range(n)):
        return f"choices {sorted(choices)} for n={n}"
    if any(reason not in VALID_FINISH for reason in choices.values()):
        return f"finish reasons {choices}"
    if body.get("ignore_eos"):
        if set(choices.values()) != {"length"}:
            return f"ignore_eos but finish reasons {choices}"
        if completion_tokens is not None and completion_tokens != n * body["max_tokens"]:
            return f"ignore_eos: {completion_tokens} tokens, expected {n} x {body['max_tokens']}"
    return None


async def plain(http, rng, tally, scenario: str, body: dict, chat: bool) -> None:
    """`body` with a random prompt, not streamed, on the chat or completions route."""
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
    else:
        body["prompt"] = _prompt(rng)
    response = await post(http, "/v1/chat/completions" if chat else "/v1/completions", body)
    if response.status_code != 200:
        return refused(tally, scenario, response) or tally.fail(
            scenario, f"HTTP {response.status_code}: {response.text[:200]}")
    data = response.json()
    record(tally, scenario, body, {c["index"]: c["finish_reason"] for c in data["choices"]},
           data["usage"]["completion_tokens"])


async def streamed(http, rng, tally, cap, chat: bool, stop_after: int | None = None, stall_s: float = 0.0) -> None:
    """A streamed request; `stop_after` chunks then disconnect, or stall `stall_s` without reading."""
    scenario = "disconnect" if stop_after is not None else "slow_reader" if stall_s else (
        "stream_chat" if chat else "stream_completion")
    body = {**_sampling(rng, cap), "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
    else:
        body["prompt"] = _prompt(rng)
    reasons: dict[int, str | None] = {}
    usage, chunks, done = None, 0, False
    response = await send(http, "/v1/chat/completions" if chat else "/v1/completions", body)
    try:
        if response.status_code != 200:
            return refused(tally, scenario, response) or tally.fail(scenario, f"HTTP {response.status_code}")
        if stall_s:
            await asyncio.sleep(stall_s)
            return tally.cancelled(scenario)
        async for line in response.aiter_lines():
            if not line:
                continue
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return tally.cancelled(scenario)
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                return tally.fail(scenario, f"error event {event['error']['message'][:200]}")
            for choice in event["choices"]:
                reasons.setdefault(choice["index"], None)
                if choice.get("finish_reason"):
                    reasons[choice["index"]] = choice["finish_reason"]
            usage = event.get("usage") or usage
    finally:
        await response.aclose()
    if stop_after is not None:
        return tally.ok(scenario)  # it finished before the client meant to leave
    if not done:
        return tally.fail(scenario, "no [DONE]")
    record(tally, scenario, body, reasons, usage["completion_tokens"] if usage else None)


async def responses(http, rng, tally, cap, stream: bool) -> None:
    """A /v1/responses request with ignore_eos: it must end "incomplete" after exactly
    max_output_tokens tokens; streamed, its events must be numbered 0, 1, ... and end with
    response.completed."""
    scenario = "stream_responses" if stream else "responses"
    max_output_tokens = rng.randint(1, cap)
    body = {"input": _prompt(rng), "max_output_tokens": max_output_tokens, "ignore_eos": True,
            "temperature": rng.choice([0.0, 0.7, 1.0]), "stream": stream}
    response = await send(http, "/v1/responses", body)
    try:
        if response.status_code != 200:
            return refused(tally, scenario, response) or tally.fail(scenario, f"HTTP {response.status_code}")
        final = None
        if not stream:
            final = json.loads(await response.aread())
        else:
            numbers = []
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                numbers.append(event.get("sequence_number"))
                if event["type"] == "error":
                    return tally.fail(scenario, f"error event {event['message'][:200]}")
                if event["type"] == "response.completed":
                    final = event["response"]
            if numbers != list(range(len(numbers))) or final is None:
                return tally.fail(scenario, f"{len(numbers)} events, numbered {numbers[:8]}..., "
                                            f"{'with' if final else 'no'} response.completed")
    finally:
        await response.aclose()
    if SHUTDOWN["expected"] and final["status"] == "cancelled":
        tally.counts[scenario]["aborted_by_shutdown"] += 1
        return
    if final["status"] != "incomplete" or final["usage"]["output_tokens"] != max_output_tokens:
        return tally.fail(scenario, f"status {final['status']}, usage {final['usage']} for "
                                    f"max_output_tokens={max_output_tokens} with ignore_eos")
    tally.ok(scenario)


def _beam_search(rng: random.Random, max_tokens_cap: int) -> dict:
    """use_beam_search; with ignore_eos every beam runs to max_tokens."""
    body = {"max_tokens": rng.randint(1, max_tokens_cap), "n": rng.choice([1, 2, 3]), "use_beam_search": True,
            "length_penalty": rng.choice([1.0, 1.0, 0.0, 2.0])}
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    return body


async def background_response(http, rng, tally, cap) -> None:
    """A background /v1/responses request (ignore_eos), polled until it ends; half of them are
    cancelled first. It must end "incomplete" after exactly max_output_tokens tokens, or
    "cancelled" when it was cancelled (a cancel after its end gets a 400 and the normal end)."""
    scenario = "background_responses"
    max_output_tokens = rng.randint(1, cap)
    body = {"input": _prompt(rng), "max_output_tokens": max_output_tokens, "ignore_eos": True, "background": True}
    response = await post(http, "/v1/responses", body)
    if response.status_code != 200:
        return refused(tally, scenario, response) or tally.fail(scenario, f"HTTP {response.status_code}")
    path = f"/v1/responses/{response.json()['id']}"
    cancel = rng.random() < 0.5
    if cancel:
        await asyncio.sleep(rng.uniform(0, 0.5))
        cancelled = await post(http, path + "/cancel", {})
        if cancelled.status_code not in (200, 400):
            return refused(tally, scenario, cancelled) or tally.fail(scenario, f"cancel: HTTP {cancelled.status_code}")
    deadline = time.monotonic() + 300
    while (final := await get(http, path)).get("status") in ("queued", "in_progress"):
        if time.monotonic() > deadline:
            return tally.fail(scenario, f"still {final['status']} after 300 s")
        await asyncio.sleep(0.1)
    if final.get("status") == "cancelled" and cancel:
        return tally.ok(scenario)
    if final.get("status") == "cancelled" and SHUTDOWN["expected"]:
        tally.counts[scenario]["aborted_by_shutdown"] += 1
        return
    if final.get("status") != "incomplete" or final["usage"]["output_tokens"] != max_output_tokens:
        return tally.fail(scenario, f"status {final.get('status')}, usage {final.get('usage')} for "
                                    f"max_output_tokens={max_output_tokens} with ignore_eos")
    tally.ok(scenario)


async def get(http: httpx.AsyncClient, path: str) -> dict:
    """GETs `path` and returns its JSON (NotAnswered when the server is gone)."""
    try:
        return (await http.get(path)).json()
    except httpx.TransportError as exc:
        raise NotAnswered(f"{type(exc).__name__}: {exc}") from exc


async def abort_early(http, rng, tally, cap) -> None:
    body = {**_sampling(rng, cap), "prompt": _prompt(rng)}
    try:
        await asyncio.wait_for(post(http, "/v1/completions", body), timeout=rng.uniform(0.001, 0.05))
        tally.ok("abort_early")
    except asyncio.TimeoutError:
        tally.cancelled("abort_early")


async def greedy(http, rng, tally, references: dict[str, str]) -> None:
    prompt = rng.choice(GREEDY_PROMPTS)
    response = await post(http, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                    "ignore_eos": True})
    if response.status_code != 200:
        return refused(tally, "greedy", response) or tally.fail("greedy", f"HTTP {response.status_code}")
    choice = response.json()["choices"][0]
    if SHUTDOWN["expected"] and choice["finish_reason"] == "abort":
        tally.counts["greedy"]["aborted_by_shutdown"] += 1
        return
    text = choice["text"]
    if text != references[prompt]:
        return tally.fail("greedy", f"{prompt!r} gave {text!r} under load, {references[prompt]!r} alone")
    tally.ok("greedy")


async def burst(http, rng, tally, size: int) -> None:
    bodies = [{"prompt": _prompt(rng), "max_tokens": 4, "ignore_eos": True} for _ in range(size)]
    responses = await asyncio.gather(*(post(http, "/v1/completions", b) for b in bodies))
    for response in responses:
        if response.status_code != 200:
            refused(tally, "burst", response) or tally.fail("burst", f"HTTP {response.status_code}")
        elif SHUTDOWN["expected"] and response.json()["choices"][0]["finish_reason"] == "abort":
            tally.counts["burst"]["aborted_by_shutdown"] += 1
        elif response.json()["usage"]["completion_tokens"] != 4:
            tally.fail("burst", f"{response.json()['usage']} for max_tokens=4 with ignore_eos")
        else:
            tally.ok("burst")


async def malformed(http, rng, tally) -> None:
    body = rng.choice([{"prompt": [-1]}, {"prompt": "x", "max_tokens": -1}, {"messages": []}, {"prompt": ""},
                       {"prompt": "x", "logprobs": 10**6}, {"prompt": [10**12], "echo": True}])
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = await post(http, path, body)
    if 400 <= response.status_code < 500 and "error" in response.json():
        tally.ok("malformed")
    elif not refused(tally, "malformed", response):
        tally.fail("malformed", f"{body} got HTTP {response.status_code}")


async def client_loop(url: str, rng: random.Random, tally: Tally, deadline: float, args, references,
                      burst_size: int) -> None:
    scenarios = [("completion", 20), ("chat", 15), ("stream_completion", 15), ("stream_chat", 10),
                 ("responses", 5), ("stream_responses", 5), ("background_responses", 3), ("beam_search", 4),
                 ("greedy", 8), ("disconnect", 8), ("abort_early", 8),
                 ("slow_reader", 3), ("burst", 2), ("malformed", 5)]
    names, weights = zip(*scenarios)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as http:
        while time.monotonic() < deadline:
            scenario = rng.choices(names, weights)[0]
            try:
                if scenario in ("completion", "chat"):
                    await plain(http, rng, tally, scenario, _sampling(rng, args.max_tokens), scenario == "chat")
                elif scenario in ("responses", "stream_responses"):
                    await responses(http, rng, tally, args.max_tokens, scenario == "stream_responses")
                elif scenario in ("stream_completion", "stream_chat"):
                    await streamed(http, rng, tally, args.max_tokens, scenario == "stream_chat")
                elif scenario == "disconnect":
                    await streamed(http, rng, tally, args.max_tokens, rng.random() < 0.5, stop_after=rng.randint(1, 4))
                elif scenario == "slow_reader":
                    await streamed(http, rng, tally, args.max_tokens, False, stall_s=rng.uniform(1, 5))
                elif scenario == "background_responses":
                    await background_response(http, rng, tally, args.max_tokens)
                elif scenario == "beam_search":
                    await plain(http, rng, tally, scenario, _beam_search(rng, args.max_tokens), rng.random() < 0.5)
                elif scenario == "abort_early":
                    await abort_early(http, rng, tally, args.max_tokens)
                elif scenario == "greedy":
                    await greedy(http, rng, tally, references)
                elif scenario == "burst":
                    await burst(http, rng, tally, burst_size)
                else:
                    await malformed(http, rng, tally)
            except NotAnswered as exc:
                if args.sigterm_under_load:  # expected once SIGTERM is sent: the client stops
                    tally.counts[scenario]["refused_after_sigterm"] += 1
                    return
                tally.fail(scenario, str(exc))
            except (httpx.TransportError, httpx.StreamError) as exc:  # cut off mid-response
                tally.fail(scenario, f"cut off after the headers: {type(exc).__name__}: {exc}")
                if args.sigterm_under_load:
                    return
            except Exception as exc:  # a malformed response (or a bug here): never lost silently
                tally.fail(scenario, f"{type(exc).__name__}: {exc}")


def read_metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    values: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line.startswith("jpaged:"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


def wait_idle(url: str, timeout: float = 120.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = read_metrics(url)
        if (metrics["jpaged:num_requests_running"], metrics["jpaged:num_requests_waiting"],
                metrics["jpaged:kv_cache_usage_perc"]) == (0, 0, 0):
            return metrics
        if time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def max_num_seqs(flags: list[str]) -> int:
    return int(flags[flags.index("--max-num-seqs") + 1]) if "--max-num-seqs" in flags else 64


async def run_load(server: Server, args, references, tally: Tally, flags: list[str]) -> None:
    # Under --sigterm-under-load the clients go on sending after the SIGTERM, until refused.
    deadline = time.monotonic() + args.duration + (120 if args.sigterm_under_load else 0)
    rngs = [random.Random(args.seed * 100_003 + i) for i in range(args.clients)]
    clients = [asyncio.create_task(client_loop(server.url, rng, tally, deadline, args, references,
                                               2 * max_num_seqs(flags))) for rng in rngs]
    if args.sigterm_under_load:
        await asyncio.sleep(args.duration)
        server.proc.send_signal(signal.SIGTERM)
        # Every accepted request must resolve (complete or error) within the grace period + margin.
        done, pending = await asyncio.wait(clients, timeout=60)
        for task in pending:
            task.cancel()
            tally.fail("sigterm", "a request was still unanswered 60 s after SIGTERM")
        return
    await asyncio.gather(*clients)


def main() -> int:
    args, flags = parse_args()
    SHUTDOWN["expected"] = args.sigterm_under_load
    started = time.monotonic()
    server = Server(args.model, flags, args.startup_timeout)
    tally = Tally()
    checks: list[tuple[str, bool, str]] = []
    exit_code = None
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            references = {p: http.post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0,
                                                               "ignore_eos": True}).json()["choices"][0]["text"]
                          for p in GREEDY_PROMPTS}
        rss_start = server.rss_mib()
        asyncio.run(run_load(server, args, references, tally, flags))
        if args.sigterm_under_load:
            exit_code = server.stop()
        else:
            metrics = wait_idle(server.url)
            rss_end = server.rss_mib()
            idle = (metrics["jpaged:num_requests_running"], metrics["jpaged:num_requests_waiting"],
                    metrics["jpaged:kv_cache_usage_perc"]) == (0, 0, 0)
            checks.append(("pool all free, nothing running or waiting (/metrics)", idle,
                           f"running={metrics['jpaged:num_requests_running']:g} "
                           f"waiting={metrics['jpaged:num_requests_waiting']:g} "
                           f"kv_usage={metrics['jpaged:kv_cache_usage_perc']:g}"))
            growth = rss_end - rss_start
            checks.append((f"RSS growth < {args.max_rss_growth_mib:g} MiB", growth < args.max_rss_growth_mib,
                           f"{rss_start:.0f} -> {rss_end:.0f} MiB ({growth:+.0f})"))
            checks.append(("preemptions during the load (informative)", True,
                           f"{metrics['jpaged:num_preemptions_total']:g}"))
            health = httpx.get(server.url + "/health", timeout=30).status_code
            checks.append(("/health after the load", health == 200, f"HTTP {health}"))
            exit_code = server.stop()
        checks.append(("SIGTERM exit code 0", exit_code == 0, f"exit code {exit_code}"))
    finally:
        if server.proc.poll() is None:
            server.stop()
    failed = sum(c["failed"] for c in tally.counts.values())
    checks.insert(0, ("every request checked out", failed == 0, f"{failed} failed"))
    print_summary(args, tally, checks, time.monotonic() - started)
    return 0 if all(ok for _, ok, _ in checks) else 1


def print_summary(args, tally: Tally, checks, elapsed: float) -> None:
    columns = ["ok", "cancelled", "failed"]
    if args.sigterm_under_load:
        columns += ["aborted_by_shutdown", "refused_after_sigterm"]
    print(f"\nsoak: {args.clients} clients, {args.duration:g} s of load"
          f"{' then SIGTERM under load' if args.sigterm_under_load else ''}, {elapsed:.0f} s in all")
    print(f"{'scenario':<20}" + "".join(f"{c:>22}" for c in columns))
    total = collections.Counter()
    for scenario in sorted(tally.counts):
        counts = tally.counts[scenario]
        total.update(counts)
        print(f"{scenario:<20}" + "".join(f"{counts[c]:>22}" for c in columns))
    print(f"{'total':<20}" + "".join(f"{total[c]:>22}" for c in columns))
    print()
    for name, ok, detail in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    for failure in tally.failures:
        print("  failure:", failure)
    sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
