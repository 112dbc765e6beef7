"""Online serving benchmark with `vllm bench serve`'s flags and result-JSON field names: streams
completions from any OpenAI-compatible server (`python -m jpaged.serve`, vLLM's api_server) and
reports throughput and TTFT / TPOT / ITL / E2EL statistics.

    python -m jpaged.serve --max-num-seqs 16 &
    python scripts/make_corpus.py /tmp/corpus.txt
    python scripts/benchmark_serving.py --dataset-name text --dataset-path /tmp/corpus.txt \\
        --input-len-range 74 213 --output-len 64 --num-prompts 64 --max-concurrency 16 \\
        --ignore-eos --warmup-requests 16 --result-file /tmp/serving.json --plot /tmp/latency.png
    python scripts/benchmark_serving.py ... --concurrency-sweep 1,4,16 --plot /tmp/sweep.png

Prompts are token-id lists (`prompt: [ids]`), so every server sees the same tokens: windows of a
text corpus (`--dataset-name text`, tokenized through the server's /tokenize route, else with the
HF tokenizer of --tokenizer; scripts/bench_prompts.py cuts the windows) or random ids
(`--dataset-name random`). Requests arrive as a Poisson process of --request-rate per second
(all at once when inf), at most --max-concurrency in flight. TTFT is the time to the first
streamed chunk, ITL the gaps between chunks, E2EL the whole request, and
TPOT = (E2EL - TTFT) / (output tokens - 1), with output tokens from the usage of the last chunk
(`stream_options.include_usage`; the count of chunks when a server sends no usage). Requests
are greedy unless --temperature (with --top-p, --top-k: vLLM's sampling flags of `bench serve`).
"""

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from datetime import datetime

import httpx
import numpy as np

from bench_prompts import encode_corpus, make_prompts, read_corpus, split_corpus


@dataclasses.dataclass
class RequestRecord:
    """One request's measurements (seconds)."""

    success: bool
    input_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0  # request sent -> first chunk
    e2el: float = 0.0  # request sent -> stream ended
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between consecutive chunks
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than 2 output tokens."""
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def latency_stats(name: str, seconds: list[float], percentiles=(99,)) -> dict[str, float]:
    """mean/median/std/pNN of `seconds` in ms, named like vLLM's (mean_ttft_ms, ...); 0 when empty."""
    values = np.asarray(seconds, dtype=np.float64) * 1000
    if values.size == 0:
        values = np.zeros(1)
    stats = {f"mean_{name}_ms": float(values.mean()), f"median_{name}_ms": float(np.median(values)),
             f"std_{name}_ms": float(values.std())}
    stats.update({f"p{p}_{name}_ms": float(np.percentile(values, p)) for p in percentiles})
    return stats


def compute_metrics(records: list[RequestRecord], duration: float) -> dict:
    """The result fields of `vllm bench serve` from per-request records and the run's wall time.

    Token totals and latencies cover the completed requests; TPOT skips requests with fewer than
    two output tokens.
    """
    done = [r for r in records if r.success]
    input_tokens = sum(r.input_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    metrics = {
        "duration": duration, "completed": len(done), "failed": len(records) - len(done),
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    metrics.update(latency_stats("ttft", [r.ttft for r in done]))
    metrics.update(latency_stats("tpot", [r.tpot for r in done if r.tpot is not None]))
    metrics.update(latency_stats("itl", [gap for r in done for gap in r.itl]))
    metrics.update(latency_stats("e2el", [r.e2el for r in done]))
    return metrics


def arrival_delays(num: int, rate: float, seed: int) -> list[float]:
    """Send times (s after the start) of a Poisson process of `rate` requests/s; all 0 when inf."""
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist() if num else []


async def send_request(client: httpx.AsyncClient, body: dict) -> RequestRecord:
    """Streams one completion and times its chunks; HTTP and stream errors become failed records."""
    record = RequestRecord(success=False, input_tokens=len(body["prompt"]))
    start = time.perf_counter()
    chunk_times, usage_tokens = [], None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("choices"):
                    chunk_times.append(time.perf_counter())
                elif chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                elif "error" in chunk:
                    record.error = json.dumps(chunk["error"])
                    return record
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    if not chunk_times:
        record.error = "the stream had no choices"
        return record
    record.success = True
    record.e2el = time.perf_counter() - start
    record.ttft = chunk_times[0] - start
    record.itl = np.diff(chunk_times).tolist()
    record.output_tokens = len(chunk_times) if usage_tokens is None else usage_tokens
    return record


async def run_requests(client: httpx.AsyncClient, bodies: list[dict], request_rate: float,
                       max_concurrency: int | None, seed: int) -> tuple[list[RequestRecord], float]:
    """Sends `bodies` at Poisson arrival times, at most max_concurrency in flight; returns the
    records (in `bodies` order) and the wall time from the first send to the last answer."""
    limit = asyncio.Semaphore(max_concurrency or len(bodies) or 1)
    delays = arrival_delays(len(bodies), request_rate, seed)
    start = time.perf_counter()

    async def one(body: dict, delay: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
        async with limit:
            return await send_request(client, body)

    records = await asyncio.gather(*(one(b, d) for b, d in zip(bodies, delays)))
    return list(records), time.perf_counter() - start


async def tokenize_corpus(client: httpx.AsyncClient, model: str, text: str, tokenizer: str | None) -> list[int]:
    """The corpus's ids (no special tokens) by the server's /tokenize, piece by piece
    (bench_prompts.split_corpus), else by the HF tokenizer of the folder `tokenizer`."""
    probe = await client.post("/tokenize", json={"model": model, "prompt": "a", "add_special_tokens": False})
    if probe.status_code == 200:
        ids = []
        for piece in split_corpus(text):
            response = await client.post("/tokenize", json={"model": model, "prompt": piece,
                                                            "add_special_tokens": False})
            response.raise_for_status()
            ids.extend(response.json()["tokens"])
        return ids
    if tokenizer is None:
        raise SystemExit(f"the server has no /tokenize (HTTP {probe.status_code}); pass --tokenizer FOLDER")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer)
    return encode_corpus(lambda piece: hf.encode(piece, add_special_tokens=False), text)


def make_dataset(args, corpus_ids: list[int] | None, num: int, seed: int) -> list[list[int]]:
    """`num` prompts of --dataset-name from `seed` (text: windows of `corpus_ids`)."""
    if args.dataset_name == "random":
        low = max(1, int(args.random_input_len * (1 - args.random_range_ratio)))
        high = int(args.random_input_len * (1 + args.random_range_ratio))
        rng = np.random.default_rng(seed)
        lengths = rng.integers(low, high + 1, size=num)
        return [rng.integers(args.token_id_low, args.token_id_high, size=n).tolist() for n in lengths]
    low, high = args.input_len_range
    return make_prompts(num, low, high, seed, corpus_ids=corpus_ids)


def request_body(args, model: str, prompt: list[int]) -> dict:
    max_tokens = args.random_output_len if args.dataset_name == "random" else args.output_len
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    body.update({name: value for name, value in (("top_p", args.top_p), ("top_k", args.top_k)) if value is not None})
    return body


async def benchmark(args) -> tuple[list[dict], list[list[RequestRecord]]]:
    """One result per concurrency (--concurrency-sweep, else --max-concurrency) and their records."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        corpus_ids = None
        if args.dataset_name == "text":
            corpus_ids = await tokenize_corpus(client, model, read_corpus(args.dataset_path), args.tokenizer)
        prompts = make_dataset(args, corpus_ids, args.num_prompts, args.seed)
        concurrencies = args.concurrency_sweep or [args.max_concurrency]
        if args.warmup_requests:
            warmup = make_dataset(args, corpus_ids, args.warmup_requests, args.seed + 1)
            records, _ = await run_requests(client, [request_body(args, model, p) for p in warmup],
                                            math.inf, concurrencies[0], args.seed)
            failed = [r.error for r in records if not r.success]
            if failed:
                raise SystemExit(f"{len(failed)} warm-up requests failed, the first: {failed[0]}")
        results, all_records = [], []
        for concurrency in concurrencies:
            bodies = [request_body(args, model, p) for p in prompts]
            records, duration = await run_requests(client, bodies, args.request_rate, concurrency, args.seed)
            result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai", "model_id": model,
                      "base_url": args.base_url, "dataset_name": args.dataset_name,
                      "num_prompts": len(prompts), "request_rate": args.request_rate,
                      "max_concurrency": concurrency, "warmup_requests": args.warmup_requests,
                      **compute_metrics(records, duration),
                      "input_lens": [r.input_tokens for r in records],
                      "output_lens": [r.output_tokens for r in records],
                      "ttfts": [r.ttft for r in records], "itls": [r.itl for r in records],
                      "errors": [r.error for r in records]}
            results.append(result)
            all_records.append(records)
            print_result(result)
    return results, all_records


def print_result(result: dict) -> None:
    concurrency = result["max_concurrency"]
    print(f"============ Serving Benchmark Result (max concurrency {concurrency or 'unlimited'}) ============")
    for key in ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput"):
        value = result[key]
        print(f"{key:<40} {value:.2f}" if isinstance(value, float) else f"{key:<40} {value}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        stats = (f"{stat}_{name}_ms {result[f'{stat}_{name}_ms']:.2f}" for stat in ("mean", "median", "std", "p99"))
        print(" ".join(stats))
    for error in dict.fromkeys(e for e in result["errors"] if e):
        print(f"error: {error[:300]}", file=sys.stderr)


def plot_latencies(records: list[RequestRecord], path: str, title: str) -> None:
    """Histograms of TTFT, TPOT, ITL and E2EL (ms) of the completed requests."""
    plt = _pyplot()
    done = [r for r in records if r.success]
    series = {"TTFT": [r.ttft for r in done], "TPOT": [r.tpot for r in done if r.tpot is not None],
              "ITL": [gap for r in done for gap in r.itl], "E2E latency": [r.e2el for r in done]}
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for axis, (name, values) in zip(axes, series.items()):
        values = np.asarray(values) * 1000
        axis.hist(values, bins=40, color="tab:blue")
        if values.size:
            axis.axvline(values.mean(), color="tab:red", label=f"mean {values.mean():.1f}")
            axis.axvline(np.percentile(values, 99), color="tab:orange", label=f"p99 {np.percentile(values, 99):.1f}")
            axis.legend(fontsize=8)
        axis.set_title(f"{name} (ms)")
        axis.set_xlabel("ms")
    axes[0].set_ylabel("count")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_sweep(results: list[dict], path: str, title: str) -> None:
    """Output throughput, and mean TTFT / TPOT, against the concurrency."""
    plt = _pyplot()
    concurrency = [r["max_concurrency"] for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(concurrency, [r["output_throughput"] for r in results], "o-", label="output tok/s")
    left.plot(concurrency, [r["total_token_throughput"] for r in results], "s--", label="total tok/s")
    left.set_xlabel("max concurrency")
    left.set_ylabel("tokens/s")
    left.set_xscale("log", base=2)
    left.legend()
    right.plot(concurrency, [r["mean_ttft_ms"] for r in results], "o-", label="mean TTFT")
    right.plot(concurrency, [r["mean_tpot_ms"] for r in results], "s-", label="mean TPOT")
    right.plot(concurrency, [r["p99_tpot_ms"] for r in results], "s:", label="p99 TPOT")
    right.set_xlabel("max concurrency")
    right.set_ylabel("ms")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.legend()
    for axis in (left, right):
        axis.set_xticks(concurrency, [str(c) for c in concurrency])
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="The server's URL.")
    parser.add_argument("--model", default=None, help="Model name (default: the first of /v1/models).")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer folder for the text dataset when the server has no /tokenize.")
    parser.add_argument("--api-key", default=None,
                        help="Bearer key, if the server has --api-key (else $OPENAI_API_KEY, if set).")
    parser.add_argument("--num-prompts", type=int, default=16, help="Requests to send.")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Requests per second, Poisson arrivals; inf sends them all at once.")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="Most requests in flight at once (default: no limit).")
    parser.add_argument("--concurrency-sweep", type=lambda s: [int(c) for c in s.split(",")], default=None,
                        metavar="C1,C2,...", help="Run once per max concurrency (overrides --max-concurrency).")
    parser.add_argument("--dataset-name", choices=("random", "text"), default="random",
                        help="random token ids, or windows of --dataset-path.")
    parser.add_argument("--dataset-path", default=None, help="Text corpus of --dataset-name text.")
    parser.add_argument("--input-len-range", type=int, nargs=2, metavar=("MIN", "MAX"), default=(74, 213),
                        help="Text dataset: prompt lengths uniform in [MIN, MAX] tokens.")
    parser.add_argument("--output-len", type=int, default=64, help="Text dataset: max_tokens of each request.")
    parser.add_argument("--random-input-len", type=int, default=160, help="Random dataset: mean prompt length.")
    parser.add_argument("--random-range-ratio", type=float, default=0.6,
                        help="Random dataset: prompt lengths uniform in input_len * [1 - ratio, 1 + ratio].")
    parser.add_argument("--random-output-len", type=int, default=64, help="Random dataset: max_tokens.")
    parser.add_argument("--token-id-low", type=int, default=1000, help="Random dataset: smallest token id.")
    parser.add_argument("--token-id-high", type=int, default=20000, help="Random dataset: largest token id + 1.")
    parser.add_argument("--ignore-eos", action="store_true", help="Generate exactly max_tokens tokens.")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (0: greedy).")
    parser.add_argument("--top-p", type=float, default=None, help="top_p of every request (default: not sent).")
    parser.add_argument("--top-k", type=int, default=None, help="top_k of every request (default: not sent).")
    parser.add_argument("--warmup-requests", type=int, default=0,
                        help="Untimed requests first (prompts of the same dataset from seed + 1).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompts and of the arrival times.")
    parser.add_argument("--result-file", "--output-json", default=None,
                        help="Write the result JSON here (with --concurrency-sweep: {'runs': [...]}).")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="Latency histograms (TTFT/TPOT/ITL/E2EL); with --concurrency-sweep, throughput "
                             "and latency vs concurrency.")
    args = parser.parse_args(argv)
    if args.dataset_name == "text" and not args.dataset_path:
        parser.error("--dataset-name text needs --dataset-path")
    if args.dataset_path and args.dataset_name == "random":
        parser.error("--dataset-path is the corpus of --dataset-name text")
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results, records = asyncio.run(benchmark(args))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"runs": results} if args.concurrency_sweep else results[0], f, indent=2)
    if args.plot:
        title = f"{results[0]['model_id']} at {args.base_url}, {args.num_prompts} requests"
        if args.concurrency_sweep:
            plot_sweep(results, args.plot, title)
        else:
            plot_latencies(records[0], args.plot, f"{title}, max concurrency {args.max_concurrency or 'unlimited'}")


if __name__ == "__main__":
    main()
