"""Reasoning markers (vLLM's `reasoning_parser` / `reasoning_config`) and the thinking-token
budget (SamplingParams.thinking_token_budget).

A reasoning model writes its reasoning between a start marker (`<think>`) and an end marker
(`</think>`); the chat template may open the reasoning in the prompt already. With a budget of B,
once a sample has written B reasoning tokens after the latest start marker (those the prompt
holds count too), its next tokens are forced to `reasoning_end_str`'s tokens one at a time, and
then it writes its answer; a later start marker starts a new budget. A reasoning that ends by
itself first (the parser's end marker) is left alone. The engine forces a token through the
step's token bitmask (a one-token row), so no new program shape is needed.
"""

import dataclasses

import numpy as np

# --reasoning-parser names -> (start marker, end marker); serving/reasoning_parsers.py splits
# replies by the same markers.
REASONING_MARKERS = {"deepseek_r1": ("<think>", "</think>"), "qwen3": ("<think>", "</think>")}
REASONING_CONFIG_KEYS = ("reasoning_start_str", "reasoning_end_str")  # --reasoning-config's (vLLM's)


def check_reasoning_config(config) -> None:
    """ValueError unless `config` is a dict of REASONING_CONFIG_KEYS with string values."""
    if not isinstance(config, dict):
        raise ValueError(f"reasoning_config must be a dict, got {config!r}.")
    unknown = sorted(set(config) - set(REASONING_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"reasoning_config has unknown keys {unknown}; its keys are "
                         f"{', '.join(REASONING_CONFIG_KEYS)}.")
    for key, value in config.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"reasoning_config's {key} must be a non-empty string, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ReasoningTokens:
    """The markers as token ids."""

    start: tuple[int, ...]  # opens a reasoning (reasoning_start_str)
    end: tuple[int, ...]  # forced when a budget runs out (reasoning_end_str)
    natural_end: tuple[int, ...]  # the parser's end marker: the model ends its reasoning itself


def reasoning_tokens(reasoning_parser: str | None, reasoning_config: dict | None, tokenizer) -> ReasoningTokens | None:
    """The engine's markers: reasoning_config's strings, else the parser's (vLLM's rule); None
    when neither names both a start and an end (thinking_token_budget is then refused).
    ValueError for a marker that makes no token."""
    start, end = REASONING_MARKERS.get(reasoning_parser, ("", ""))
    natural_end = end
    config = reasoning_config or {}
    start = config.get("reasoning_start_str", start)
    end = config.get("reasoning_end_str", end)
    natural_end = natural_end or end
    if not start or not end:
        return None
    ids = [tuple(tokenizer.encode(text, add_special_tokens=False)) for text in (start, end, natural_end)]
    if not all(ids):
        raise ValueError(f"reasoning markers must make tokens: reasoning_start_str={start!r}, "
                         f"reasoning_end_str={end!r} (--reasoning-config).")
    return ReasoningTokens(*ids)


def _ends_with(token_ids: list[int], marker: tuple[int, ...]) -> bool:
    return len(token_ids) >= len(marker) and tuple(token_ids[len(token_ids) - len(marker):]) == marker


def _last_index(token_ids: list[int], marker: tuple[int, ...]) -> int:
    """Where the last occurrence of `marker` starts in token_ids; -1 when it does not occur."""
    candidates = np.flatnonzero(np.asarray(token_ids[:len(token_ids) - len(marker) + 1]) == marker[0])
    for i in candidates[::-1].tolist():
        if tuple(token_ids[i:i + len(marker)]) == marker:
            return i
    return -1


class ThinkingBudget:
    """One sample's reasoning-token count against its budget: feed it every output token
    (`append`); `forced_token` is the token its next step must sample, or None."""

    def __init__(self, markers: ReasoningTokens, budget: int, prompt_token_ids: list[int]):
        self.markers = markers
        self.budget = budget
        self.thinking: int | None = None  # reasoning tokens since the latest start marker; None outside one
        self.num_forced: int | None = None  # end-marker tokens forced so far; None while not forcing
        self._window = max(len(markers.start), len(markers.natural_end))
        start = _last_index(prompt_token_ids, markers.start)
        if start >= 0 and _last_index(prompt_token_ids[start:], markers.natural_end) < 0:
            self.thinking = len(prompt_token_ids) - start - len(markers.start)
        self._tail = list(prompt_token_ids[-self._window:])
        self._check_budget()

    def forced_token(self) -> int | None:
        return None if self.num_forced is None else self.markers.end[self.num_forced]

    def append(self, token_id: int) -> None:
        self._tail = (self._tail + [token_id])[-self._window:]
        if self.num_forced is not None:  # token_id was the forced one
            self.num_forced += 1
            if self.num_forced == len(self.markers.end):
                self.num_forced = self.thinking = None
            return
        if self.thinking is None:
            if _ends_with(self._tail, self.markers.start):
                self.thinking = 0
        else:
            self.thinking += 1
            if _ends_with(self._tail, self.markers.natural_end):
                self.thinking = None
        self._check_budget()

    def _check_budget(self) -> None:
        if self.thinking is not None and self.thinking >= self.budget:
            self.num_forced = 0
