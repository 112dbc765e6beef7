"""Per-token cost of structured outputs: host mask build, device mask apply, and end to end.

Example (the numbers in docs/structured_output.md):
    python scripts/bench_structured_output.py --num-prompts 16 --output-len 32

1. Host: `fill_bitmask` for B constrained rows (JSON-schema matchers part-way through a document).
2. Device: the precompiled sampler with and without the token bitmask, per num_seqs bucket.
3. End to end: LLM.generate of the same prompts with and without a JSON schema whose string
   field cannot end within --output-len tokens, so both runs produce exactly the same number of
   tokens; the difference per generated token is the overhead (medians of --repeats
   interleaved runs).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpaged import LLM, EngineArgs, SamplingParams, StructuredOutputsParams
from jpaged.step_metadata import pack_sampling
from jpaged.structured_output import bitmask_width

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "minLength": 2000},
                                           "year": {"type": "integer"}}, "required": ["title", "year"]}
DOCUMENT = '{"title": "A long title that goes on and on'


def _median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def host_mask_cost(llm, rows: int) -> float:
    engine = llm.llm_engine
    params = StructuredOutputsParams(json=SCHEMA)
    tokens = engine.tokenizer.encode(DOCUMENT, add_special_tokens=False)
    matchers = []
    for _ in range(rows):
        matcher = engine.structured_output.new_matcher(params)
        assert matcher.consume_tokens(tokens)
        matchers.append(matcher)
    work = [(i, m, []) for i, m in enumerate(matchers)]
    return _median_us(lambda: engine.structured_output.fill_bitmask(work, rows), 50)


def device_apply_cost(llm, num_seqs: int) -> tuple[float, float]:
    runner = llm.llm_engine.runner
    vocab = runner.model_config.vocab_size
    logits = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(num_seqs, vocab)), jnp.float32))
    blob = jax.device_put(pack_sampling([], [], num_seqs, 0, []))
    bitmask = jax.device_put(np.full((num_seqs, bitmask_width(vocab)), 0x55555555, np.int32))
    plain = runner._sample[(num_seqs, 0, False)]
    masked = runner._sample[(num_seqs, 0, True)]
    return (_median_us(lambda: plain(logits, blob, None).token_ids.block_until_ready(), 30),
            _median_us(lambda: masked(logits, blob, bitmask).token_ids.block_until_ready(), 30))


def end_to_end(llm, prompts, output_len: int, constrained: bool) -> float:
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=output_len, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA) if constrained else None)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    if constrained:
        assert all(o.outputs[0].text.startswith('{"title": "') for o in outputs)
    return elapsed / (len(prompts) * output_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    EngineArgs.add_cli_args(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--num-prompts", type=int, default=16)
    bench.add_argument("--input-len", type=int, default=64)
    bench.add_argument("--output-len", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=3, help="end-to-end runs of each kind")
    bench.add_argument("--output-json", help="write the results here")
    args = parser.parse_args()
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    results = {"host_fill_bitmask_us": {}, "device_sampler_us": {}}
    llm.llm_engine.structured_output.compile(StructuredOutputsParams(json=SCHEMA))
    for rows in (1, 8, 32):
        results["host_fill_bitmask_us"][rows] = round(host_mask_cost(llm, rows), 1)
    for num_seqs in llm.llm_engine.runner.buckets.num_seqs:
        plain, masked = device_apply_cost(llm, num_seqs)
        results["device_sampler_us"][num_seqs] = {"plain": round(plain, 1), "masked": round(masked, 1)}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, size=args.input_len).tolist() for _ in range(args.num_prompts)]
    end_to_end(llm, prompts, 4, False)  # warm up both paths
    end_to_end(llm, prompts, 4, True)
    runs = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved, medians: the machine may be shared
        for constrained in (False, True):
            runs[constrained].append(end_to_end(llm, prompts, args.output_len, constrained))
    plain, constrained = float(np.median(runs[False])), float(np.median(runs[True]))
    results["end_to_end_ms_per_token"] = {"plain": round(plain * 1e3, 3), "json_schema": round(constrained * 1e3, 3),
                                          "overhead_pct": round(100 * (constrained / plain - 1), 1)}
    print(json.dumps(results, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
