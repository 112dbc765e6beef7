"""Speculative decoding by prompt lookup (vLLM's "ngram" method): its config and its proposer.

A decoding request whose last tokens also appear earlier in its prompt or output gets, as drafts,
the tokens that followed that earlier occurrence. The step then computes the request's pending
token and its drafts together (one chunk of 1 + k tokens) and samples a token after each of them;
the engine keeps the drafts up to the first one that differs from the token sampled in its place,
plus that sampled token (docs/engine.md, "Speculative decoding"). Costs no second model: on text
that quotes its context (summaries, extraction, code edits, structured rewrites) several tokens
come from one forward.
"""

import dataclasses

import numpy as np

# The "method" values jpaged runs; vLLM's others need a draft model or trained heads.
SPECULATIVE_METHODS = ("ngram",)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """--speculative-config, vLLM's keys: method "ngram" (or model "ngram"), num_speculative_tokens
    (drafts per step, > 0), prompt_lookup_max / prompt_lookup_min (the longest and shortest suffix
    looked up; one alone sets both; neither: 5 and 5, vLLM's defaults) and
    num_speculative_tokens_per_batch_size ([[first, last, k], ...]: k drafts while the running
    batch's size is in [first, last]; sizes past a range keep its k; ranges start at 1)."""

    num_speculative_tokens: int
    prompt_lookup_min: int = 5
    prompt_lookup_max: int = 5
    num_speculative_tokens_per_batch_size: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def from_dict(cls, config: dict) -> "SpeculativeConfig":
        """Parses vLLM's --speculative-config JSON object; ValueError naming what is wrong."""
        config = dict(config)
        method, model = config.pop("method", None), config.pop("model", None)
        if method is None and model in ("ngram", "[ngram]"):
            method = "ngram"
        if method == "[ngram]":
            method = "ngram"
        if method not in SPECULATIVE_METHODS:
            what = f"method {method!r}" if method is not None else f"draft model {model!r}"
            raise ValueError(f"speculative_config: {what} is not supported; jpaged runs method 'ngram' "
                             "(prompt lookup), e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'.")
        num = config.pop("num_speculative_tokens", None)
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer > 0, got {num!r}.")
        lookup_max, lookup_min = config.pop("prompt_lookup_max", None), config.pop("prompt_lookup_min", None)
        for name, value in (("prompt_lookup_max", lookup_max), ("prompt_lookup_min", lookup_min)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {value!r}.")
        if lookup_max is None and lookup_min is None:
            lookup_max = lookup_min = 5
        lookup_max = lookup_min if lookup_max is None else lookup_max
        lookup_min = lookup_max if lookup_min is None else lookup_min
        if lookup_min > lookup_max:
            raise ValueError(f"speculative_config: prompt_lookup_min={lookup_min} must be <= "
                             f"prompt_lookup_max={lookup_max}.")
        schedule = _batch_size_schedule(config.pop("num_speculative_tokens_per_batch_size", None))
        if config:
            raise ValueError(f"speculative_config: unsupported keys {sorted(config)} for method 'ngram' (jpaged "
                             "reads method, model, num_speculative_tokens, prompt_lookup_max, prompt_lookup_min, "
                             "num_speculative_tokens_per_batch_size).")
        return cls(num, lookup_min, lookup_max, schedule)

    def num_drafts(self, batch_size: int) -> int:
        """The most drafts a request gets in a step that runs `batch_size` requests."""
        num = self.num_speculative_tokens
        for first, _, k in self.num_speculative_tokens_per_batch_size:
            if batch_size < first:
                break
            num = min(k, self.num_speculative_tokens)
        return num

    def propose(self, token_ids, max_drafts: int) -> list[int]:
        """Drafts for a request whose tokens so far are `token_ids`: up to max_drafts tokens that
        followed the latest earlier occurrence of its longest suffix of prompt_lookup_min to
        prompt_lookup_max tokens (vLLM's choice); [] when none occurs."""
        return propose_ngram(token_ids, self.prompt_lookup_min, self.prompt_lookup_max, max_drafts)


def propose_ngram(token_ids, min_n: int, max_n: int, max_drafts: int) -> list[int]:
    """See SpeculativeConfig.propose. token_ids: a sequence of ints (the request's live list)."""
    if max_drafts < 1 or len(token_ids) <= min_n:
        return []
    tokens = np.asarray(token_ids, np.int64)
    last = len(tokens) - 1
    ends = np.flatnonzero(tokens[:last] == tokens[last])  # where an earlier copy of the suffix may end
    if ends.size == 0:
        return []
    lengths = np.ones(ends.size, np.int64)  # matched suffix length at each end (capped at max_n)
    extending = np.ones(ends.size, bool)
    for back in range(1, min(max_n, last)):
        earlier = ends - back
        extending &= (earlier >= 0) & (tokens[np.maximum(earlier, 0)] == tokens[last - back])
        if not extending.any():
            break
        lengths += extending
    longest = lengths.max()
    if longest < min_n:
        return []
    end = ends[np.flatnonzero(lengths == longest)[-1]]
    return tokens[end + 1:end + 1 + max_drafts].tolist()


def _batch_size_schedule(entries) -> tuple[tuple[int, int, int], ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list | tuple) or not entries:
        raise ValueError("speculative_config: num_speculative_tokens_per_batch_size must be a non-empty list of "
                         "[first, last, num_speculative_tokens] entries.")
    schedule = []
    for entry in entries:
        if (not isinstance(entry, list | tuple) or len(entry) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in entry)):
            raise ValueError(f"speculative_config: num_speculative_tokens_per_batch_size entries are "
                             f"[first, last, num_speculative_tokens] integers, got {entry!r}.")
        first, last, k = entry
        if not 1 <= first <= last or k < 0:
            raise ValueError(f"speculative_config: batch-size range {entry!r} needs 1 <= first <= last and "
                             "num_speculative_tokens >= 0.")
        schedule.append((first, last, k))
    schedule.sort()
    if schedule[0][0] != 1:
        raise ValueError("speculative_config: the first batch-size range must start at 1.")
    for (_, last, _), (first, _, _) in zip(schedule, schedule[1:]):
        if first <= last:
            raise ValueError("speculative_config: batch-size ranges must not overlap.")
    return tuple(schedule)
