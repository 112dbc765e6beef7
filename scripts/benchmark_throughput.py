"""Offline throughput of LLM.generate (vLLM's `benchmark_throughput`, in spirit and flag names).

Example (the 64-request workload of docs/performance.md):
    python scripts/make_corpus.py /tmp/corpus.txt
    python scripts/benchmark_throughput.py --num-prompts 64 --input-len-range 32 512 \\
        --output-len 128 --dtype float32 --dataset-path /tmp/corpus.txt --warmup-passes 1 \\
        --output-json /tmp/throughput.json

Prompts are random token ids (default) or windows of a text file (--dataset-path, e.g. from
scripts/make_corpus.py), with lengths uniform in --input-len-range (or exactly --input-len); they
come from scripts/bench_prompts.py, like those of benchmark_throughput_vllm.py. Greedy unless
--temperature (with --top-p, --top-k); EOS ignored unless --no-ignore-eos. Weight modes are the engine flags (--dtype, --quantization int8|gguf).
Engine start (load + compile) is timed separately from generation; the
--warmup-passes untimed passes run the same workload first.
"""

import argparse
import time

from bench_prompts import PeakRss, add_offline_args, offline_workload, report_offline
from jpaged import LLM, EngineArgs, SamplingParams
from jpaged.models.quantization import param_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    EngineArgs.add_cli_args(parser)
    add_offline_args(parser)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    engine_args = EngineArgs.from_cli_args(args)

    rss = PeakRss().start()
    start = time.perf_counter()
    llm = LLM(**vars(engine_args))
    startup_s = time.perf_counter() - start
    tokenizer = llm.get_tokenizer()
    prompts = offline_workload(args, lambda text: tokenizer.encode(text, add_special_tokens=False),
                               tokenizer.vocab_size)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.output_len, ignore_eos=args.ignore_eos)
    requests = [{"prompt_token_ids": p} for p in prompts]
    for _ in range(args.warmup_passes):
        llm.generate(requests, params, use_tqdm=False)

    start = time.perf_counter()
    outputs = llm.generate(requests, params)
    elapsed = time.perf_counter() - start

    report_offline(args, prompts, [c.token_ids for o in outputs for c in o.outputs], elapsed=elapsed,
                   startup_s=startup_s, peak_rss_gib=rss.stop(), engine_args=vars(engine_args),
                   weight_bytes=param_bytes(llm.llm_engine.runner.params))


if __name__ == "__main__":
    main()
