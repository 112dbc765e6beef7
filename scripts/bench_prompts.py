"""The benchmark prompts every engine gets: the same token ids from the same seed (and the flags,
the peak-RSS measure and the result keys that the offline benchmarks share).

Shared by benchmark_throughput.py (jpaged), benchmark_throughput_vllm.py,
benchmark_throughput_hf.py and benchmark_serving.py; imports neither jpaged nor vLLM, so it runs
in either venv.
Prompt lengths are uniform in [low, high]; a prompt is a window of the tokenized corpus at a
random start, or random ids in [100, vocab_size - 100) without a corpus.
"""

import argparse
import bisect
import json
import os
import re
import resource
import threading
from collections.abc import Callable, Sequence

import numpy as np

# The corpus is tokenized in pieces of about this many characters (a server's /tokenize takes
# one piece per request); a piece ends between a letter and " " + letter ("word| word"), where a
# byte-level BPE pre-tokenizer splits anyway, so the ids equal those of the whole text.
CORPUS_PIECE_CHARS = 65536
_CUT = re.compile(r"(?<=[^\W\d_]) (?=[^\W\d_])")  # the space of letter + " " + letter


def split_corpus(text: str, piece_chars: int = CORPUS_PIECE_CHARS) -> list[str]:
    """`text` cut into pieces that join back to `text`: each as long as possible up to
    piece_chars, or up to the first cut point after that when there is none before."""
    pieces, start = [], 0
    cuts = [m.start() for m in _CUT.finditer(text)]
    while len(text) - start > piece_chars:
        last = bisect.bisect_right(cuts, start + piece_chars) - 1  # the last cut within reach
        first = bisect.bisect_right(cuts, start)  # the first cut after start
        if first == len(cuts):
            break
        cut = cuts[last] if last >= first else cuts[first]
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_corpus(encode: Callable[[str], list[int]], text: str) -> list[int]:
    """Token ids of `text`; `encode(piece)` must tokenize without special tokens."""
    ids: list[int] = []
    for piece in split_corpus(text):
        ids.extend(encode(piece))
    return ids


def read_corpus(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def corpus_text(path: str | None) -> str:
    """The corpus at `path`, or (None) make_corpus.py's, rendered here."""
    if path is None:
        from make_corpus import render_corpus

        return render_corpus()
    return read_corpus(path)


def make_prompts(num_prompts: int, low: int, high: int, seed: int, *,
                 corpus_ids: Sequence[int] | None = None, vocab_size: int | None = None) -> list[list[int]]:
    """num_prompts token-id lists with lengths uniform in [low, high], from numpy's default_rng(seed).

    corpus_ids: windows of these ids at random starts; else random ids in [100, vocab_size - 100).
    Raises ValueError when the corpus is shorter than `high` tokens.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, size=num_prompts)
    if corpus_ids is None:
        if vocab_size is None:
            raise ValueError("make_prompts needs corpus_ids or vocab_size")
        return [rng.integers(100, vocab_size - 100, size=int(n)).tolist() for n in lengths]
    if len(corpus_ids) <= high:
        raise ValueError(f"the corpus has {len(corpus_ids)} tokens; prompts need up to {high}")
    starts = rng.integers(0, len(corpus_ids) - high, size=num_prompts)
    return [list(corpus_ids[s:s + int(n)]) for s, n in zip(starts, lengths)]


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    """The offline benchmarks' workload flags (the same in every engine's script)."""
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--input-len", type=int, default=256, help="prompt length (when no --input-len-range)")
    bench.add_argument("--input-len-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                       help="prompt lengths uniform in [MIN, MAX]")
    bench.add_argument("--output-len", type=int, default=128)
    bench.add_argument("--dataset-path", help="a text file to cut prompt windows from (default: random ids)")
    bench.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0")
    bench.add_argument("--top-k", type=int, default=0, help="with --temperature > 0 (0: off)")
    bench.add_argument("--benchmark-seed", type=int, default=0, help="seed of the prompt generator")
    bench.add_argument("--warmup-passes", type=int, default=0,
                       help="run the same workload this many times, untimed, before the timed pass")
    bench.add_argument("--output-json", help="write the results here")


def report_offline(args, prompts: list[list[int]], output_token_ids: list[list[int]], *, elapsed: float,
                   startup_s: float, peak_rss_gib: float, engine_args: dict, weight_bytes: int | None = None) -> dict:
    """The offline benchmarks' result keys: printed, written to --output-json, returned.
    weight_bytes: the engine's params in memory (jpaged; None where unknown)."""
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(ids) for ids in output_token_ids)
    results = {
        "num_requests": len(prompts), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "elapsed_time": elapsed, "startup_time": startup_s,
        "requests_per_second": len(prompts) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "warmup_passes": args.warmup_passes, "peak_rss_gib": peak_rss_gib, "weight_bytes": weight_bytes,
        "output_token_ids": [list(ids) for ids in output_token_ids],
        "engine_args": engine_args,
    }
    weights = "" if weight_bytes is None else f"; weights {weight_bytes / 2**20:.1f} MiB"
    print(f"Startup (load + compile): {startup_s:.1f} s; peak RSS {peak_rss_gib:.2f} GiB{weights}")
    print(f"Throughput: {results['requests_per_second']:.2f} requests/s, {results['tokens_per_second']:.2f} "
          f"total tokens/s, {results['output_tokens_per_second']:.2f} output tokens/s "
          f"({len(prompts)} requests, {prompt_tokens} prompt + {output_tokens} output tokens in {elapsed:.1f} s)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def offline_workload(args, encode: Callable[[str], list[int]], vocab_size: int) -> list[list[int]]:
    """The prompts of the offline benchmarks' flags (--num-prompts, --input-len[-range],
    --dataset-path, --benchmark-seed); `encode(text)` tokenizes without special tokens."""
    low, high = args.input_len_range or (args.input_len, args.input_len)
    if args.dataset_path is None:
        return make_prompts(args.num_prompts, low, high, args.benchmark_seed, vocab_size=vocab_size)
    corpus = encode_corpus(encode, read_corpus(args.dataset_path))
    return make_prompts(args.num_prompts, low, high, args.benchmark_seed, corpus_ids=corpus)


class PeakRss:
    """The peak resident memory of this process and all its descendants (vLLM runs its engine in
    child processes), in GiB: the larger of this process's own peak (getrusage) and the peak of
    the tree's summed RSS, sampled from /proc every `interval` s on a thread between start() and
    stop()."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_bytes = interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> "PeakRss":
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stops sampling; returns the peak in GiB."""
        self._done.set()
        self._thread.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return max(own, self.peak_bytes) / 2**30

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(os.getpid()))
            if self._done.wait(self.interval):
                return


def tree_rss_bytes(root: int) -> int:
    """Summed RSS of `root` and its descendants (0 where /proc cannot be read)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        tree.add(pid)
        frontier.extend(children.get(pid, ()))
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total
