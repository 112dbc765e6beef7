"""Greedy agreement of quantized KV caches with the float32 one, on a fixed set of chat prompts.

    python scripts/kv_dtype_agreement.py [--kv-cache-dtypes float32 bfloat16 int8 fp8 fp8_e5m2]
        [--output-len 64] [--kv-cache-memory 0.1] [--unit-fp8-scales] [--output-json out.json]

Greedy, stopping at EOS. The first dtype is the reference (float32 by default). For every other
dtype it prints how many requests generate the very same tokens, the share of tokens before each request's first
difference, and whether the first token agrees; plus, for every dtype, the KV blocks the engine
sizes from the same --kv-cache-memory and the output tok/s of the timed greedy pass (a first,
untimed pass compiles the shapes; engines run with enforce_eager). --unit-fp8-scales also runs
each fp8 dtype with every scale 1.0 (vLLM's default for fp8) instead of calibrated scales.
"""

import argparse
import contextlib
import json
import time
from unittest import mock

import jax.numpy as jnp
import numpy as np

from jpaged import LLM, SamplingParams, kv_quantization
from jpaged.config import KV_CACHE_DTYPES

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 50.",
    "How do I reverse a list in Python?",
    "Who wrote Pride and Prejudice?",
    "What is 17 times 23?",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Translate 'thank you very much' into Spanish and German.",
    "What are the main differences between TCP and UDP?",
    "Summarise the story of Romeo and Juliet in one paragraph.",
    "Name the planets of the solar system in order.",
    "What does a compiler do?",
    "Suggest a name for a black cat.",
    "How many minutes are there in a week? Show the calculation.",
]


def generate(kv_cache_dtype: str, args, unit_scales: bool = False) -> dict:
    """Token ids per question, the pool's block count and the timed pass's output tok/s."""
    engine_args = dict(kv_cache_dtype=kv_cache_dtype, kv_cache_memory=args.kv_cache_memory,
                       max_num_seqs=len(QUESTIONS), enforce_eager=True, attention_backend=args.attention_backend,
                       dtype="float32", compilation_cache_dir="")

    def ones(config, dtype, *rest):
        scale = jnp.ones((config.num_kv_heads,), jnp.float32)
        return [(scale, scale)] * config.num_layers, None

    with mock.patch.object(kv_quantization, "kv_cache_scales", ones) if unit_scales else contextlib.nullcontext():
        llm = LLM(**engine_args)
    params = SamplingParams(temperature=0, max_tokens=args.output_len)
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    llm.chat(messages, params, use_tqdm=False)  # compiles
    start = time.perf_counter()
    outputs = llm.chat(messages, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    return {"kv_cache_dtype": kv_cache_dtype + (" (scales 1.0)" if unit_scales else ""),
            "num_blocks": llm.llm_engine.runner.pool_spec.num_blocks,
            "output_tok_s": sum(map(len, ids)) / elapsed, "token_ids": ids,
            "first_answer": outputs[0].outputs[0].text}


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Identical requests, the share of tokens before the first difference, first tokens equal."""
    prefix = []
    for a, b in zip(reference, other):
        n = min(len(a), len(b))  # a shorter output (an earlier EOS) differs where it stops
        diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
        prefix.append(int(diff[0]) if diff.size else n)
    total = sum(map(len, reference))
    return {"identical": sum(a == b for a, b in zip(reference, other)), "requests": len(reference),
            "prefix_share": sum(prefix) / total, "first_token": sum(a[0] == b[0] for a, b in zip(reference, other))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=["float32", "bfloat16", "int8", "fp8", "fp8_e5m2"],
                        choices=KV_CACHE_DTYPES)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kv-cache-memory", type=float, default=0.1, help="GiB for every engine's KV pool")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--unit-fp8-scales", action="store_true", help="also run fp8 dtypes with scales 1.0")
    parser.add_argument("--output-json")
    args = parser.parse_args()

    runs = []
    for dtype in args.kv_cache_dtypes:
        runs.append(generate(dtype, args))
        if args.unit_fp8_scales and dtype.startswith("fp8"):
            runs.append(generate(dtype, args, unit_scales=True))
    reference = runs[0]["token_ids"]
    print(f"{len(QUESTIONS)} chat prompts x {args.output_len} greedy tokens; reference: {runs[0]['kv_cache_dtype']} "
          f"KV; every pool from {args.kv_cache_memory:g} GiB\n")
    print("| KV cache dtype | KV blocks | output tok/s | requests identical | tokens before first difference "
          "| first token equal |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        run.update(agreement(reference, run["token_ids"]))
        print(f"| {run['kv_cache_dtype']} | {run['num_blocks']} | {run['output_tok_s']:.0f} | "
              f"{run['identical']} / {run['requests']} | {100 * run['prefix_share']:.1f} % | "
              f"{run['first_token']} / {run['requests']} |")
    for run in runs:
        print(f"{run['kv_cache_dtype']}: {run['first_answer']!r}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
