"""Online serving benchmark: streams completions from a running `python -m jpaged.serve` (or any
OpenAI-compatible server) and reports throughput, TTFT, TPOT and ITL, like vLLM's
`benchmark_serving.py` with its random dataset.

    python -m jpaged.serve --max-num-seqs 16 &
    python scripts/benchmark_serving.py --num-prompts 16 --random-input-len 160 \
        --random-range-ratio 0.6 --random-output-len 64 --ignore-eos

Prompts are random token ids (lengths uniform in input_len * [1 - ratio, 1 + ratio]), sent as
`prompt: [ids]` so every server sees the same tokens. Output token counts come from the usage
of the last streamed chunk (`stream_options.include_usage`).
"""

import argparse
import asyncio
import json
import time

import httpx
import numpy as np


def make_prompts(args) -> list[list[int]]:
    rng = np.random.default_rng(args.seed)
    low = max(1, int(args.random_input_len * (1 - args.random_range_ratio)))
    high = int(args.random_input_len * (1 + args.random_range_ratio))
    lengths = rng.integers(low, high + 1, size=args.num_prompts)
    return [rng.integers(args.token_id_low, args.token_id_high, size=n).tolist() for n in lengths]


async def one_request(client: httpx.AsyncClient, args, model: str, prompt: list[int]) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": args.random_output_len, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    start = time.perf_counter()
    chunk_times, output_tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                output_tokens = chunk["usage"]["completion_tokens"]
            elif any(c.get("text") for c in chunk["choices"]):
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    ttft = chunk_times[0] - start
    return {"input_tokens": len(prompt), "output_tokens": output_tokens, "ttft": ttft, "e2e": end - start,
            "tpot": (end - start - ttft) / (output_tokens - 1) if output_tokens > 1 else None,
            "itl": np.diff(chunk_times).tolist()}


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = make_prompts(args)
        limit = asyncio.Semaphore(args.max_concurrency or len(prompts))

        async def limited(prompt):
            async with limit:
                return await one_request(client, args, model, prompt)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        duration = time.perf_counter() - start

    def ms(values):
        values = np.asarray([v for v in values if v is not None]) * 1000
        return {"mean": float(values.mean()), "median": float(np.median(values)),
                "p99": float(np.percentile(values, 99))}

    input_tokens = sum(r["input_tokens"] for r in results)
    output_tokens = sum(r["output_tokens"] for r in results)
    return {
        "model": model, "num_prompts": len(results), "max_concurrency": args.max_concurrency or len(prompts),
        "duration_s": duration, "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(results) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": ms(r["ttft"] for r in results), "tpot_ms": ms(r["tpot"] for r in results),
        "itl_ms": ms(x for r in results for x in r["itl"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="The server's URL.")
    parser.add_argument("--model", default=None, help="Model name (default: the first of /v1/models).")
    parser.add_argument("--api-key", default=None, help="Bearer key, if the server has --api-key.")
    parser.add_argument("--num-prompts", type=int, default=16, help="Requests to send.")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="Most requests in flight at once (default: all of them).")
    parser.add_argument("--random-input-len", type=int, default=160, help="Mean prompt length in tokens.")
    parser.add_argument("--random-range-ratio", type=float, default=0.6,
                        help="Prompt lengths are uniform in input_len * [1 - ratio, 1 + ratio].")
    parser.add_argument("--random-output-len", type=int, default=64, help="max_tokens of each request.")
    parser.add_argument("--token-id-low", type=int, default=1000, help="Smallest random prompt token id.")
    parser.add_argument("--token-id-high", type=int, default=20000, help="Largest random prompt token id + 1.")
    parser.add_argument("--ignore-eos", action="store_true", help="Generate exactly --random-output-len tokens.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompt generator.")
    parser.add_argument("--output-json", default=None, help="Also write the results to this file.")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
