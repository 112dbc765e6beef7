"""Offline embedding throughput: jpaged's LLM.embed or vLLM's on the same prompts, one engine per run.

The workload is benchmark_throughput.py's prompts (scripts/bench_prompts.py: --num-prompts
windows of --input-len-range tokens from --dataset-path, same seed), embedded with the model's
default pooling (LAST, normalized, for a decoder) after --warmup-passes untimed passes. Prints
prompt tokens/s and writes the vectors (--vectors-out, .npy) so two runs can be compared:

    python scripts/benchmark_embeddings.py --model ~/.cache/jpaged/compare_vllm/smollm2-hf \\
        --dataset-path corpus.txt --vectors-out /tmp/jpaged.npy
    VLLM_CPU_KVCACHE_SPACE=4 $VLLM_VENV/bin/python scripts/benchmark_embeddings.py --engine vllm \\
        --model ~/.cache/jpaged/compare_vllm/smollm2-hf --dataset-path corpus.txt --vectors-out /tmp/vllm.npy
    python scripts/benchmark_embeddings.py --compare /tmp/jpaged.npy /tmp/vllm.npy

jpaged runs with --runner pooling; vLLM with runner="pooling". Both read the HF folder in float32
with prefix caching off (every pass computes every token).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_prompts import PeakRss, encode_corpus, make_prompts, read_corpus  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["jpaged", "vllm"], default="jpaged")
    parser.add_argument("--model", help="an HF model folder")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the prefill chunk (default: the engine's; jpaged's LLM 512)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--dataset-path", help="a text file to cut prompt windows from (default: random ids)")
    parser.add_argument("--benchmark-seed", type=int, default=0)
    parser.add_argument("--warmup-passes", type=int, default=1)
    parser.add_argument("--vectors-out", help="write the embeddings here (.npy, float32 [num_prompts, dims])")
    parser.add_argument("--output-json", help="write the results here")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="only compare two --vectors-out files: cosine similarity per prompt")
    return parser.parse_args(argv)


def compare(path_a: str, path_b: str) -> None:
    a, b = np.load(path_a), np.load(path_b)
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"{len(a)} prompts: cosine similarity min {cosine.min():.7f}, mean {cosine.mean():.7f}; "
          f"max abs difference {np.abs(a - b).max():.2e}")


def build(args):
    """(engine, its tokenizer's encode without special tokens, vocab size, embed(requests) -> f32 vectors)."""
    common = dict(model=args.model, dtype="float32", max_model_len=args.max_model_len, enable_prefix_caching=False)
    if args.max_num_batched_tokens is not None:
        common["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.engine == "vllm":
        import vllm

        llm = vllm.LLM(runner="pooling", **common)
        tokenizer = llm.get_tokenizer()
        vocab = len(tokenizer)
    else:
        from jpaged import LLM

        llm = LLM(runner="pooling", **common)
        tokenizer = llm.get_tokenizer()
        vocab = llm.llm_engine.model_config.vocab_size

    def embed(prompts):
        outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outputs], np.float32)

    return (lambda text: tokenizer.encode(text, add_special_tokens=False)), vocab, embed


def main() -> None:
    args = parse_args()
    if args.compare:
        compare(*args.compare)
        return
    rss = PeakRss().start()
    start = time.perf_counter()
    encode, vocab, embed = build(args)
    startup_s = time.perf_counter() - start
    low, high = args.input_len_range
    corpus = None if args.dataset_path is None else encode_corpus(encode, read_corpus(args.dataset_path))
    prompts = make_prompts(args.num_prompts, low, high, args.benchmark_seed, vocab_size=vocab, corpus_ids=corpus)
    for _ in range(args.warmup_passes):
        embed(prompts)
    start = time.perf_counter()
    vectors = embed(prompts)
    elapsed = time.perf_counter() - start
    num_tokens = sum(map(len, prompts))
    results = {"engine": args.engine, "num_prompts": len(prompts), "prompt_tokens": num_tokens,
               "elapsed_s": round(elapsed, 6), "prompt_tokens_per_s": round(num_tokens / elapsed, 1),
               "prompts_per_s": round(len(prompts) / elapsed, 2), "startup_s": round(startup_s, 1),
               "peak_rss_gib": round(rss.stop(), 2), "dims": vectors.shape[1]}
    print(json.dumps(results))
    if args.vectors_out:
        np.save(args.vectors_out, vectors)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
