"""Greedy agreement of each weights mode with the fp32 model over a fixed prompt set.

    python scripts/quant_agreement.py                       # fp32 vs bf16, int8, gguf
    python scripts/quant_agreement.py --modes int8 --max-tokens 64 --output-json /tmp/agree.json

Each mode runs the same prompts (greedy, EOS ignored, --max-tokens each) through `LLM.generate`
with its engine flags; against the fp32 run it reports the fraction of identical token sequences
and the mean length of the common prefix (in tokens, out of --max-tokens). Quantization changes
logits a little, so greedy paths part where two tokens are nearly tied: the prefix length says
how soon.
"""

import argparse
import gc
import json

from jpaged import LLM, SamplingParams
from jpaged.models.quantization import param_bytes

# mode -> LLM keyword arguments (besides the shared ones); "fp32" is the reference.
MODES = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "gguf": {"dtype": "float32", "quantization": "gguf"},
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n\ndef normalize(x):",
    "The theory of relativity states that",
    "Here is a list of the planets in the solar system:",
    "Q: What is 17 times 3?\nA:",
    "The best way to learn a new language is",
    "SELECT name, age FROM users WHERE",
    "In 1492, Christopher Columbus",
    "Photosynthesis is the process by which",
    "My favourite recipe for pancakes uses",
    "The quick brown fox",
    "Dear hiring manager, I am writing to",
]


def run_mode(mode: str, max_tokens: int, max_model_len: int) -> tuple[list[list[int]], int]:
    """(greedy token ids per prompt, weight bytes) for one mode."""
    llm = LLM(max_model_len=max_model_len, max_num_seqs=16, max_num_batched_tokens=256, compilation_cache_dir="",
              enable_prefix_caching=False, enforce_eager=True, **MODES[mode])
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    weight_bytes = param_bytes(llm.llm_engine.runner.params)
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in outputs], weight_bytes


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Fraction of identical sequences and the mean common-prefix length."""
    prefixes = []
    for a, b in zip(reference, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(n)
    identical = sum(a == b for a, b in zip(reference, other))
    return {"identical_fraction": identical / len(reference), "mean_matching_prefix": sum(prefixes) / len(prefixes)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=[m for m in MODES if m != "fp32"], choices=list(MODES))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=128)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    reference, reference_bytes = run_mode("fp32", args.max_tokens, args.max_model_len)
    results = {"fp32": {"identical_fraction": 1.0, "mean_matching_prefix": float(args.max_tokens),
                        "weight_bytes": reference_bytes}}
    for mode in args.modes:
        tokens, weight_bytes = run_mode(mode, args.max_tokens, args.max_model_len)
        results[mode] = {**agreement(reference, tokens), "weight_bytes": weight_bytes}
    print(f"| mode | weights (MiB) | identical greedy sequences ({len(PROMPTS)} prompts) | "
          f"mean matching prefix (of {args.max_tokens} tokens) |")
    print("|---|---:|---:|---:|")
    for mode, r in results.items():
        print(f"| {mode} | {r['weight_bytes'] / 2**20:.1f} | {r['identical_fraction']:.0%} | "
              f"{r['mean_matching_prefix']:.1f} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"max_tokens": args.max_tokens, "num_prompts": len(PROMPTS), "modes": results}, f, indent=2)


if __name__ == "__main__":
    main()
