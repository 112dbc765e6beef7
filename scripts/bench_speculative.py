"""Speculative decoding (prompt lookup) against plain decoding, side by side in one process.

Two engines on the same model, one with --speculative-config, run the same greedy chat
workloads in turns (plain, speculative, plain, ...); each workload is timed one request at a
time (single stream) and as one batch. Workloads, on passages of a real-text corpus
(scripts/make_corpus.py, or --dataset-path):
  repeat    "Repeat the following text exactly" (the text is all in the prompt),
  rewrite   "Rewrite the following text in simpler words" (some of it is),
  continue  the passage as a plain prompt, continued (little is: the generic-text case).
Prints output tok/s of each, the ratio, the mean tokens per step of drafted requests
(acceptance length) and whether the greedy tokens were identical.

    python scripts/bench_speculative.py --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_prompts import corpus_text  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

TASKS = {
    "repeat": "Repeat the following text exactly, word for word:\n\n{passage}",
    "rewrite": "Rewrite the following text in simpler words:\n\n{passage}",
}


def passages(text: str, count: int, chars: int, seed: int) -> list[str]:
    """`count` passages of about `chars` characters, whole lines, at spread-out starts."""
    lines = text.splitlines()
    step = max(len(lines) // (count + 1), 1)
    out = []
    for i in range(count):
        start, chunk = (i + 1) * step + seed, []
        while sum(map(len, chunk)) < chars and start < len(lines):
            if lines[start].strip():
                chunk.append(lines[start].strip())
            start += 1
        out.append("\n".join(chunk))
    return out


def run(llm: LLM, task: str, texts: list[str], params: SamplingParams, batch: bool):
    """(seconds, output token lists)."""
    start = time.perf_counter()
    if task == "continue":
        prompts = [[t] for t in texts] if not batch else [texts]
        outputs = [o for p in prompts for o in llm.generate(p, params, use_tqdm=False)]
    else:
        conversations = [[{"role": "user", "content": TASKS[task].format(passage=t)}] for t in texts]
        groups = [[c] for c in conversations] if not batch else [conversations]
        outputs = [o for g in groups for o in llm.chat(g, params, use_tqdm=False)]
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4}')
    parser.add_argument("--tasks", nargs="+", default=["repeat", "rewrite", "continue"],
                        choices=[*TASKS, "continue"])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--passage-chars", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed turns of each engine per measurement")
    parser.add_argument("--modes", nargs="+", default=["single", "batch"], choices=["single", "batch"])
    parser.add_argument("--dataset-path", default=None, help="a text corpus (default: make_corpus.py's)")
    parser.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB per engine")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    texts = passages(corpus_text(args.dataset_path), args.num_prompts, args.passage_chars, seed=0)
    common = dict(kv_cache_memory=args.kv_cache_memory, disable_log_stats=True)
    engines = {"plain": LLM(args.model, **common),
               "spec": LLM(args.model, speculative_config=json.loads(args.speculative_config), **common)}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results = []
    for task in args.tasks:
        for mode in args.modes:
            run(engines["plain"], task, texts[:1], params, True)  # warm the prefix cache alike
            run(engines["spec"], task, texts[:1], params, True)
            seconds = {"plain": [], "spec": []}
            tokens = {}
            stats_before = engines["spec"].llm_engine.get_stats()
            for _ in range(args.repeats):
                for name, llm in engines.items():
                    elapsed, tokens[name] = run(llm, task, texts, params, mode == "batch")
                    seconds[name].append(elapsed)
            stats = engines["spec"].llm_engine.get_stats()
            drafts = stats.spec_num_drafts - stats_before.spec_num_drafts
            kept = stats.spec_num_accepted_tokens - stats_before.spec_num_accepted_tokens
            num_tokens = sum(map(len, tokens["plain"]))
            rates = {name: num_tokens / min(s) for name, s in seconds.items()}  # best turn of each
            row = dict(task=task, mode=mode, output_tokens=num_tokens, plain_tok_s=round(rates["plain"], 1),
                       spec_tok_s=round(rates["spec"], 1), ratio=round(rates["spec"] / rates["plain"], 3),
                       drafted_steps=drafts, mean_acceptance_length=round(1 + kept / drafts, 2) if drafts else None,
                       acceptance_rate=round(kept / (stats.spec_num_draft_tokens - stats_before.spec_num_draft_tokens),
                                             3) if drafts else None,
                       identical=tokens["plain"] == tokens["spec"])
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"speculative_config": json.loads(args.speculative_config), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
