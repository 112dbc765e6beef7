"""Short requests arriving while a long prompt prefills, without and with --long-prefill-token-threshold.

Two AsyncLLMs on the same model (the same flags but the threshold: 0, then each --thresholds
value), in turns. Each turn sends one long prompt, then, --delay seconds later, --num-short
short ones together, all greedy with --output-len tokens; it reports the long request's TTFT and
the short ones' mean and worst TTFT and mean end-to-end time, per engine and turn. Prompts are
token slices of a real-text corpus (scripts/make_corpus.py, or --dataset-path); prefix caching
is off so every turn prefills everything.

    python scripts/bench_long_prefill.py --thresholds 128 --long-len 3000
"""

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_prompts import corpus_text  # noqa: E402

from jpaged import AsyncLLM, EngineArgs, SamplingParams  # noqa: E402
from jpaged.sampling_params import RequestOutputKind  # noqa: E402


async def timed(engine: AsyncLLM, token_ids: list[int], request_id: str, output_len: int) -> tuple[float, float]:
    """(TTFT, end-to-end) seconds of one greedy request."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    start, first = time.perf_counter(), None
    async for output in engine.generate({"prompt_token_ids": token_ids}, params, request_id):
        if first is None and output.outputs[0].token_ids:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def turn(engine: AsyncLLM, long_ids: list[int], short_ids: list[list[int]], args, tag: str) -> dict:
    long_task = asyncio.create_task(timed(engine, long_ids, f"long-{tag}", args.output_len))
    await asyncio.sleep(args.delay)
    shorts = await asyncio.gather(*(timed(engine, ids, f"short-{tag}-{i}", args.output_len)
                                    for i, ids in enumerate(short_ids)))
    long_ttft, long_e2e = await long_task
    return dict(long_ttft_s=round(long_ttft, 3), long_e2e_s=round(long_e2e, 3),
                short_ttft_mean_s=round(sum(s[0] for s in shorts) / len(shorts), 3),
                short_ttft_max_s=round(max(s[0] for s in shorts), 3),
                short_e2e_mean_s=round(sum(s[1] for s in shorts) / len(shorts), 3))


async def run(args) -> list[dict]:
    common = dict(model=args.model, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                  enable_prefix_caching=False, kv_cache_memory=args.kv_cache_memory, disable_log_stats=True)
    engines = {t: AsyncLLM.from_engine_args(EngineArgs(**common, long_prefill_token_threshold=t))
               for t in [0, *args.thresholds]}
    tokenizer = next(iter(engines.values())).tokenizer
    text = corpus_text(args.dataset_path)
    long_ids = tokenizer.encode(text[:args.long_len * 16])[:args.long_len]
    offset = len(text) // 2
    short_ids = [tokenizer.encode(text[offset + 997 * i:offset + 997 * i + args.short_len * 16])[:args.short_len]
                 for i in range(args.num_short)]
    if len(long_ids) < args.long_len:
        raise SystemExit(f"the corpus gives only {len(long_ids)} tokens for --long-len {args.long_len}")
    for engine in engines.values():  # warm-up: every program compiled before timing
        await turn(engine, long_ids[:args.max_num_batched_tokens * 2], short_ids, args, "warm")
    rows = []
    for repeat in range(args.repeats):
        for threshold, engine in engines.items():
            row = dict(threshold=threshold, turn=repeat, **await turn(engine, long_ids, short_ids, args, str(repeat)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for engine in engines.values():
        await engine.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--thresholds", type=int, nargs="+", default=[128],
                        help="--long-prefill-token-threshold values to compare with 0 (off)")
    parser.add_argument("--long-len", type=int, default=3000, help="tokens of the long prompt")
    parser.add_argument("--short-len", type=int, default=60, help="tokens of each short prompt")
    parser.add_argument("--num-short", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.3, help="seconds between the long and the short requests")
    parser.add_argument("--max-num-batched-tokens", type=int, default=384, help="the server's CPU default")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dataset-path", default=None, help="a text corpus (default: make_corpus.py's)")
    parser.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB per engine")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
