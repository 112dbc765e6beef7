"""The benchmark tooling in scripts/: the serving benchmark's arithmetic on hand-made request
records, the shared prompt maker (one workload for jpaged and vLLM), and benchmark_serving.py
end to end against `python -m jpaged.serve` on a tiny model."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

SCRIPTS = os.path.join(os.path.dirname(__file__), os.pardir, "scripts")
sys.path.insert(0, SCRIPTS)

import bench_prompts  # noqa: E402
import benchmark_serving  # noqa: E402
import benchmark_throughput  # noqa: E402
import benchmark_throughput_vllm  # noqa: E402
import compare_summary  # noqa: E402
import quant_agreement  # noqa: E402
from benchmark_serving import RequestRecord, compute_metrics  # noqa: E402
from test_serve_cli import ServeProcess  # noqa: E402

from jpaged.loaders import default_model_path  # noqa: E402
from jpaged.loaders.gguf import load_gguf_tokenizer  # noqa: E402
from jpaged.loaders.gguf_file import read_gguf  # noqa: E402


def test_quant_agreement_metrics():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    other = [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9]]
    assert quant_agreement.agreement(reference, other) == {"identical_fraction": 1 / 3,
                                                           "mean_matching_prefix": (4 + 2 + 0) / 3}


def test_compute_metrics_exact():
    records = [
        # TPOT (1.0 - 0.2) / 4 = 0.2; gaps 0.1, 0.2, 0.3, 0.2
        RequestRecord(True, input_tokens=10, output_tokens=5, ttft=0.2, e2el=1.0, itl=[0.1, 0.2, 0.3, 0.2]),
        # TPOT (0.7 - 0.4) / 1 = 0.3
        RequestRecord(True, input_tokens=20, output_tokens=2, ttft=0.4, e2el=0.7, itl=[0.3]),
        # one token: no TPOT, no ITL
        RequestRecord(True, input_tokens=30, output_tokens=1, ttft=0.6, e2el=0.6),
        RequestRecord(False, input_tokens=40, error="HTTP 500: boom"),
    ]
    m = compute_metrics(records, duration=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 8)
    assert m["duration"] == 2.0
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(34.0)
    assert m["mean_ttft_ms"] == pytest.approx(400.0)
    assert m["median_ttft_ms"] == pytest.approx(400.0)
    assert m["std_ttft_ms"] == pytest.approx(np.std([200.0, 400.0, 600.0]))
    assert m["p99_ttft_ms"] == pytest.approx(596.0)  # linear interpolation: 400 + 0.98 * 200
    assert m["mean_tpot_ms"] == pytest.approx(250.0)
    assert m["median_tpot_ms"] == pytest.approx(250.0)
    assert m["std_tpot_ms"] == pytest.approx(50.0)
    assert m["p99_tpot_ms"] == pytest.approx(299.0)
    assert m["mean_itl_ms"] == pytest.approx(220.0)
    assert m["median_itl_ms"] == pytest.approx(200.0)
    assert m["p99_itl_ms"] == pytest.approx(300.0)
    assert m["mean_e2el_ms"] == pytest.approx(2300.0 / 3)
    assert m["median_e2el_ms"] == pytest.approx(700.0)


def test_compute_metrics_all_failed_is_zero_not_nan():
    m = compute_metrics([RequestRecord(False, input_tokens=5, error="x")], duration=1.0)
    assert (m["completed"], m["failed"], m["output_throughput"]) == (0, 1, 0.0)
    assert m["mean_ttft_ms"] == m["p99_tpot_ms"] == 0.0


def test_arrival_delays():
    assert benchmark_serving.arrival_delays(3, math.inf, 0) == [0.0, 0.0, 0.0]
    delays = benchmark_serving.arrival_delays(2000, 50.0, 7)
    assert delays == benchmark_serving.arrival_delays(2000, 50.0, 7)
    assert delays[0] == 0.0 and all(b >= a for a, b in zip(delays, delays[1:]))
    assert np.mean(np.diff(delays)) == pytest.approx(1 / 50.0, rel=0.1)


def make_corpus(path) -> str:
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "make_corpus.py"), str(path)], check=True)
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_peak_rss_counts_child_processes():
    rss = bench_prompts.PeakRss(interval=0.05).start()
    child = "import time; import numpy as np; a = np.ones(2**26); time.sleep(1)"  # 0.5 GiB
    subprocess.run([sys.executable, "-c", child], check=True)
    own = bench_prompts.tree_rss_bytes(os.getpid()) / 2**30
    assert rss.stop() > own + 0.4


def test_compare_summary_ratios(tmp_path):
    (tmp_path / "offline_jpaged.json").write_text(json.dumps({"output_tokens_per_second": 300.0, "peak_rss_gib": 2.0}))
    (tmp_path / "offline_vllm.json").write_text(json.dumps({"output_tokens_per_second": 400.0, "peak_rss_gib": 8.0}))
    (tmp_path / "serving_jpaged.json").write_text(json.dumps({"mean_ttft_ms": 900.0}))
    (tmp_path / "startup_vllm.txt").write_text("61.5\n")
    rows = {r["measure"].split(" (")[0]: r for r in compare_summary.summary_rows(str(tmp_path))}
    assert rows["offline output tok/s, fp32"]["ratio"] == pytest.approx(0.75)
    assert rows["offline peak RSS GiB, fp32"]["ratio"] == pytest.approx(0.25)
    assert rows["serving TTFT mean ms"] == {"measure": "serving TTFT mean ms (lower is better)", "jpaged": 900.0,
                                            "vllm": None, "ratio": None}
    assert rows["server start-up to ready s"]["vllm"] == 61.5
    assert "offline output tok/s, jpaged bfloat16 vs vLLM fp32" not in rows
    assert compare_summary.greedy_agreement([[1, 2, 3], [4, 5, 6], [7]], [[1, 2, 3], [4, 9, 6], [8]]) == {
        "requests": 1, "tokens": 4}
    cpu = compare_summary.cpu_info()
    markdown = compare_summary.render_markdown("2026-12-01", cpu, list(rows.values()), [])
    assert "| offline output tok/s, fp32 (higher is better) | 300 | 400 | 0.75× |" in markdown
    assert "avx512f" in markdown


def test_compare_summary_takes_the_median_of_offline_rounds(tmp_path):
    def write(name, tok_s):
        (tmp_path / name).write_text(json.dumps({"output_tokens_per_second": tok_s, "num_requests": 64,
                                                 "prompt_tokens": 1, "output_tokens": 1, "elapsed_time": 1.0}))

    for suffix, ours, bf16, theirs in (("", 110.0, 120.0, 100.0), (".round2", 90.0, None, 100.0),
                                       (".round3", 150.0, 100.0, 120.0), (".round5", 1.0, 1.0, 1.0)):
        write(f"offline_jpaged{suffix}.json", ours)
        write(f"offline_vllm{suffix}.json", theirs)
        if bf16 is not None:
            write(f"offline_jpaged_bf16{suffix}.json", bf16)
    write("offline_jpaged.round4.json", 1.0)  # round 4 has no vLLM file: rounds end at 3
    rows = {r["measure"].split(" (")[0]: r for r in compare_summary.summary_rows(str(tmp_path))}
    fp32 = rows["offline output tok/s, fp32, median of 3 rounds"]
    assert (fp32["jpaged"], fp32["vllm"], fp32["ratio"]) == (110.0, 100.0, pytest.approx(1.1))
    assert "0.90-1.25×" in fp32["measure"]
    bf16 = rows["offline output tok/s, jpaged bfloat16 vs vLLM fp32, median of 2 rounds"]
    assert bf16["ratio"] == pytest.approx((1.2 + 100 / 120) / 2)
    assert rows["offline output tok/s, fp32"]["ratio"] == pytest.approx(1.1)  # round 1 alone, as before
    lines = compare_summary.workloads(str(tmp_path))
    assert "offline round 2: jpaged fp32 90.0, vLLM 100.0 output tok/s (0.90×)" in lines
    assert "offline round 3: jpaged fp32 150.0, jpaged bfloat16 100.0, vLLM 120.0 output tok/s (1.25×)" in lines
    (tmp_path / "offline_vllm.round2.json").unlink()
    assert not any("median" in r["measure"] for r in compare_summary.summary_rows(str(tmp_path)))


def test_compare_summary_takes_the_median_of_serving_rounds(tmp_path):
    def write(name, ttft, tpot, tok_s):
        (tmp_path / name).write_text(json.dumps({
            "mean_ttft_ms": ttft, "mean_tpot_ms": tpot, "output_throughput": tok_s, "num_prompts": 64, "completed": 64,
            "max_concurrency": 16, "request_rate": "inf", "total_input_tokens": 1, "total_output_tokens": 1,
            "duration": 1.0}))

    for suffix, ours, theirs in (("", (800.0, 40.0, 250.0), (1000.0, 50.0, 200.0)),
                                 (".round2", (900.0, 60.0, 150.0), (1000.0, 50.0, 200.0)),
                                 (".round3", (700.0, 45.0, 210.0), (1000.0, 60.0, 150.0))):
        write(f"serving_jpaged{suffix}.json", *ours)
        write(f"serving_vllm{suffix}.json", *theirs)
    write("serving_jpaged.round4.json", 1.0, 1.0, 1.0)  # no vLLM file: rounds end at 3
    rows = {r["measure"].split(" (")[0]: r for r in compare_summary.summary_rows(str(tmp_path))}
    ttft = rows["serving TTFT mean ms, median of 3 rounds"]
    assert (ttft["jpaged"], ttft["vllm"], ttft["ratio"]) == (800.0, 1000.0, pytest.approx(0.8))
    assert "0.70-0.90×; lower is better" in ttft["measure"]
    tpot = rows["serving TPOT mean ms, median of 3 rounds"]
    assert tpot["ratio"] == pytest.approx(0.8) and "0.75-1.20×" in tpot["measure"]  # ratios 0.8, 1.2, 0.75
    assert rows["serving output tok/s, median of 3 rounds"]["ratio"] == pytest.approx(1.25)
    assert rows["serving TTFT mean ms"]["ratio"] == pytest.approx(0.8)  # round 1 alone, as before
    lines = compare_summary.workloads(str(tmp_path))
    assert ("serving round 2: TTFT mean 900 vs 1,000 ms (0.90×), TPOT mean 60.0 vs 50.0 ms (1.20×), "
            "output 150 vs 200 tok/s (jpaged vs vLLM)") in lines


@pytest.fixture(scope="module")
def corpus_text(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def gguf_tokenizer():
    return load_gguf_tokenizer(read_gguf(default_model_path()), eos_token_ids=(), chat_template=None)


def test_corpus_is_deterministic_english(corpus_text, tmp_path):
    assert 1_200_000 < len(corpus_text.encode()) < 1_700_000
    assert corpus_text == make_corpus(tmp_path / "again.txt")  # another process, other addresses
    assert " at 0x" not in corpus_text and "\nFILE\n" not in corpus_text
    assert "ArgumentParser" in corpus_text and "subprocess" in corpus_text


def test_corpus_pieces_tokenize_like_the_whole_text(corpus_text, gguf_tokenizer):
    text = corpus_text[:60_000]
    pieces = bench_prompts.split_corpus(text, piece_chars=2000)
    assert "".join(pieces) == text and len(pieces) > 25
    encode = lambda t: gguf_tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    assert [i for p in pieces for i in encode(p)] == encode(text)


def test_make_prompts_deterministic():
    corpus = list(range(1000, 3000))
    a = bench_prompts.make_prompts(8, 32, 512, seed=3, corpus_ids=corpus)
    assert a == bench_prompts.make_prompts(8, 32, 512, seed=3, corpus_ids=corpus)
    assert a != bench_prompts.make_prompts(8, 32, 512, seed=4, corpus_ids=corpus)
    assert all(32 <= len(p) <= 512 for p in a)
    assert all(p == list(range(p[0], p[0] + len(p))) for p in a)  # contiguous windows
    with pytest.raises(ValueError, match="prompts need up to 4000"):
        bench_prompts.make_prompts(2, 8, 4000, seed=0, corpus_ids=corpus)


def test_both_offline_scripts_make_the_same_workload(tmp_path, tiny_model_dir, corpus_text, gguf_tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:200_000], encoding="utf-8")
    flags = ["--num-prompts", "12", "--input-len-range", "32", "512", "--benchmark-seed", "5"]
    jpaged_args = benchmark_throughput.parse_args([*flags, "--dataset-path", str(corpus)])
    vllm_args = benchmark_throughput_vllm.parse_args(["--model", str(tiny_model_dir), *flags,
                                                      "--dataset-path", str(corpus)])
    # jpaged's own tokenizer on one side, the HF folder's (what vLLM loads) on the other.
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    jpaged_prompts = bench_prompts.offline_workload(
        jpaged_args, lambda t: gguf_tokenizer.encode(t, add_special_tokens=False), gguf_tokenizer.vocab_size)
    vllm_prompts = bench_prompts.offline_workload(
        vllm_args, lambda t: hf.encode(t, add_special_tokens=False), len(hf))
    assert jpaged_prompts == vllm_prompts
    assert [len(p) for p in jpaged_prompts] == [len(p) for p in bench_prompts.make_prompts(
        12, 32, 512, 5, vocab_size=1000)]
    random_j = bench_prompts.offline_workload(benchmark_throughput.parse_args(flags), None, len(hf))
    random_v = bench_prompts.offline_workload(
        benchmark_throughput_vllm.parse_args(["--model", "x", *flags]), None, len(hf))
    assert random_j == random_v


def test_serving_benchmark_against_jpaged_serve(tmp_path, tiny_model_dir, corpus_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:100_000], encoding="utf-8")
    server = ServeProcess(["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--max-model-len", "64",
                           "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--num-gpu-blocks-override", "32"])
    try:
        common = ["--base-url", server.url, "--dataset-name", "text", "--dataset-path", str(corpus),
                  "--input-len-range", "8", "40", "--output-len", "6", "--ignore-eos", "--num-prompts", "6"]
        result_file, plot = tmp_path / "serving.json", tmp_path / "latency.png"
        benchmark_serving.main([*common, "--max-concurrency", "4", "--warmup-requests", "2",
                                "--request-rate", "20", "--result-file", str(result_file), "--plot", str(plot)])
        result = json.loads(result_file.read_text())
        assert result["completed"] == 6 and result["failed"] == 0, result["errors"]
        assert result["total_output_tokens"] == 36 and result["output_lens"] == [6] * 6
        for name in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "std", "p99"):
                assert result[f"{stat}_{name}_ms"] >= 0
        assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0
        for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput",
                    "total_input_tokens", "max_concurrency", "request_rate"):
            assert key in result
        # The server's /tokenize gave the ids that the HF tokenizer of the folder gives.
        hf = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
        ids = bench_prompts.encode_corpus(lambda t: hf.encode(t, add_special_tokens=False), corpus.read_text())
        expected = bench_prompts.make_prompts(6, 8, 40, 0, corpus_ids=ids)
        assert result["input_lens"] == [len(p) for p in expected]
        assert plot.stat().st_size > 10_000

        sweep_file, sweep_plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
        benchmark_serving.main([*common, "--concurrency-sweep", "1,3", "--result-file", str(sweep_file),
                                "--plot", str(sweep_plot)])
        runs = json.loads(sweep_file.read_text())["runs"]
        assert [(r["max_concurrency"], r["completed"]) for r in runs] == [(1, 6), (3, 6)]
        assert sweep_plot.stat().st_size > 10_000
    finally:
        assert server.stop() == 0


def test_bench_speculative_compares_the_two_engines(tiny_model_dir, tmp_path, monkeypatch):
    """bench_speculative.py end to end on the tiny model (its arithmetic, not its speed): the
    continuation workload in both modes, a result row per mode with the same tokens from both
    engines, and the drafts it counted."""
    import bench_speculative

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i % 7} of the text repeats itself, line {i % 7}" for i in range(400)))
    out = tmp_path / "spec.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_speculative.py", "--model", str(tiny_model_dir), "--tasks", "continue", "--num-prompts", "2",
        "--max-tokens", "8", "--repeats", "1", "--kv-cache-memory", "0.05", "--dataset-path", str(corpus),
        "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}',
        "--output-json", str(out)])
    bench_speculative.main()
    result = json.loads(out.read_text())
    assert result["speculative_config"]["num_speculative_tokens"] == 2
    rows = result["results"]
    assert [(r["task"], r["mode"]) for r in rows] == [("continue", "single"), ("continue", "batch")]
    for row in rows:
        assert row["output_tokens"] == 2 * 8  # the tiny model has no EOS
        assert row["identical"] is True
        assert row["ratio"] == pytest.approx(row["spec_tok_s"] / row["plain_tok_s"], rel=0.01)
        if row["drafted_steps"]:
            assert 1 <= row["mean_acceptance_length"] <= 3 and 0 <= row["acceptance_rate"] <= 1


def test_benchmark_embeddings_reports_and_compares(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """benchmark_embeddings.py end to end on the tiny model with jpaged (its bookkeeping, not its
    speed): the workload's tokens, unit vectors saved in prompt order, and --compare on them."""
    import benchmark_embeddings

    vectors, out = tmp_path / "vectors.npy", tmp_path / "embeddings.json"
    monkeypatch.setattr(sys, "argv", [
        "benchmark_embeddings.py", "--model", str(tiny_model_dir), "--num-prompts", "3", "--input-len-range", "8",
        "20", "--max-model-len", "64", "--warmup-passes", "0", "--vectors-out", str(vectors),
        "--output-json", str(out)])
    benchmark_embeddings.main()
    result = json.loads(out.read_text())
    prompts = bench_prompts.make_prompts(3, 8, 20, 0, vocab_size=49152)
    assert result["prompt_tokens"] == sum(map(len, prompts)) and result["num_prompts"] == 3
    assert result["prompt_tokens_per_s"] == pytest.approx(result["prompt_tokens"] / result["elapsed_s"], rel=0.01)
    saved = np.load(vectors)
    assert saved.shape == (3, 64) and np.allclose(np.linalg.norm(saved, axis=1), 1.0, atol=1e-5)
    monkeypatch.setattr(sys, "argv", ["benchmark_embeddings.py", "--compare", str(vectors), str(vectors)])
    capsys.readouterr()
    benchmark_embeddings.main()
    assert "cosine similarity min 1.0000000" in capsys.readouterr().out


def test_bench_long_prefill_times_both_engines(tiny_model_dir, tmp_path, monkeypatch):
    """bench_long_prefill.py end to end on the tiny model (its bookkeeping, not its speed): a row
    per engine and turn, the threshold-off engine first, every time measured."""
    import bench_long_prefill

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} says something else about item {i * 7 % 13}" for i in range(400)))
    out = tmp_path / "long_prefill.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_long_prefill.py", "--model", str(tiny_model_dir), "--thresholds", "4", "--long-len", "60",
        "--short-len", "5", "--num-short", "2", "--output-len", "3", "--max-num-batched-tokens", "16",
        "--max-num-seqs", "4", "--delay", "0", "--repeats", "1", "--kv-cache-memory", "0.05", "--dataset-path", str(corpus),
        "--output-json", str(out)])
    bench_long_prefill.main()
    rows = json.loads(out.read_text())["results"]
    assert [(r["threshold"], r["turn"]) for r in rows] == [(0, 0), (4, 0)]
    for row in rows:
        assert 0 < row["long_ttft_s"] <= row["long_e2e_s"]
        assert 0 < row["short_ttft_mean_s"] <= row["short_ttft_max_s"]
        assert row["short_ttft_mean_s"] <= row["short_e2e_mean_s"]
