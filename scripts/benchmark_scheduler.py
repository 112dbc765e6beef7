"""Host overhead of the scheduler: time schedule() + update_from_output() per step, no model.

    python scripts/benchmark_scheduler.py --num-prompts 64 --input-len 32 512 --output-len 128

Runs the 64-request W1 shape (prompt lengths uniform in the range, ignore_eos) with a fake
sampled token per step and reports milliseconds per step, overall and for full decode steps.
"""

import argparse
import random
import time

from jpaged.engine import Request, Scheduler
from jpaged.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--no-enable-prefix-caching", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    scheduler = Scheduler(
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_enable_prefix_caching,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_prompts):
        prompt = [rng.randrange(50000) for _ in range(rng.randint(*args.input_len))]
        scheduler.add_request(Request(f"r{i}", prompt, params))

    step_times, decode_times = [], []
    while scheduler.has_unfinished_requests():
        start = time.perf_counter()
        out = scheduler.schedule()
        scheduler.update_from_output(out, {s.request_id: 7 for s in out.scheduled if s.sample})
        elapsed = time.perf_counter() - start
        step_times.append(elapsed)
        if out.total_num_scheduled_tokens == len(out.scheduled) == args.max_num_seqs:
            decode_times.append(elapsed)
    print(f"{len(step_times)} steps, {1e3 * sum(step_times) / len(step_times):.3f} ms/step (schedule + update)")
    if decode_times:
        print(f"{len(decode_times)} decode steps of {args.max_num_seqs} requests: "
              f"{1e3 * sum(decode_times) / len(decode_times):.3f} ms/step")


if __name__ == "__main__":
    main()
