"""Offline throughput of HF transformers' `generate` on the workload of benchmark_throughput.py:
the baseline a user starts from (the seed paper's comparison), same prompt ids, same JSON keys.

    python scripts/benchmark_throughput_hf.py --model ~/.cache/jpaged/compare_vllm/smollm2-hf \\
        --num-prompts 64 --input-len-range 32 512 --output-len 128 --dataset-path corpus.txt \\
        --output-json /tmp/offline_hf.json

All prompts go in batches of --batch-size (default: all at once), left-padded to the batch's
longest prompt, greedy, with the KV cache of `generate`; torch on the CPU in --dtype (fp32).
EOS is ignored by forcing min_new_tokens = max_new_tokens, as the other engines' ignore_eos.
"""

import argparse
import time

from bench_prompts import PeakRss, add_offline_args, offline_workload, report_offline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    engine = parser.add_argument_group("HF transformers")
    engine.add_argument("--model", required=True, help="an HF model folder")
    engine.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    engine.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default: all)")
    add_offline_args(parser)
    return parser.parse_args(argv)


def generate_all(model, prompts: list[list[int]], args, pad_id: int) -> list[list[int]]:
    """Greedy completions of every prompt, --batch-size prompts per left-padded `generate` call."""
    import torch

    batch = args.batch_size or len(prompts)
    outputs = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len if args.ignore_eos else None, pad_token_id=pad_id)
        outputs += [row[width:].tolist() for row in out]
    return outputs


def main() -> None:
    args = parse_args()
    if args.temperature != 0.0:
        raise SystemExit("benchmark_throughput_hf.py measures greedy generation only (--temperature 0).")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rss = PeakRss().start()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    startup_s = time.perf_counter() - start
    prompts = offline_workload(args, lambda text: tokenizer.encode(text, add_special_tokens=False), len(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for _ in range(args.warmup_passes):
        generate_all(model, prompts, args, pad_id)

    start = time.perf_counter()
    outputs = generate_all(model, prompts, args, pad_id)
    elapsed = time.perf_counter() - start
    report_offline(args, prompts, outputs, elapsed=elapsed, startup_s=startup_s, peak_rss_gib=rss.stop(),
                   engine_args={"model": args.model, "dtype": args.dtype, "batch_size": args.batch_size,
                                "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
