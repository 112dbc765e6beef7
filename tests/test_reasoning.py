"""jpaged/reasoning.py: the reasoning markers an engine resolves (vLLM's rule: reasoning_config's
strings over the parser's) and ThinkingBudget's count, token by token, against a replay that
recounts from the whole token list (the oracle). The engine's forcing is in test_engine.py."""

import numpy as np
import pytest

from jpaged import EngineArgs
from jpaged.reasoning import REASONING_MARKERS, ReasoningTokens, ThinkingBudget, reasoning_tokens
from serving.reasoning_parsers import END, REASONING_PARSERS, START


class CharTokenizer:
    """One token per character."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_markers_from_the_parser_or_the_config():
    tokenizer = CharTokenizer()
    assert reasoning_tokens(None, None, tokenizer) is None
    assert reasoning_tokens(None, {"reasoning_start_str": "<a>"}, tokenizer) is None  # no end to force
    qwen3 = reasoning_tokens("qwen3", None, tokenizer)
    assert qwen3.start == tuple(map(ord, "<think>")) and qwen3.end == qwen3.natural_end == tuple(map(ord, "</think>"))
    forced = reasoning_tokens("deepseek_r1", {"reasoning_end_str": "Done.</think>"}, tokenizer)
    assert forced.end == tuple(map(ord, "Done.</think>")) and forced.natural_end == qwen3.natural_end
    custom = reasoning_tokens(None, {"reasoning_start_str": "<a>", "reasoning_end_str": "</a>"}, tokenizer)
    assert custom.natural_end == custom.end == tuple(map(ord, "</a>"))
    with pytest.raises(ValueError, match="must make tokens"):
        reasoning_tokens("qwen3", None, type("Empty", (), {"encode": lambda self, text, **_: []})())


def test_engine_args_check_the_reasoning_flags():
    with pytest.raises(ValueError, match="reasoning_parser='r1' is not one of"):
        EngineArgs(model="m", reasoning_parser="r1")
    with pytest.raises(ValueError, match="unknown keys"):
        EngineArgs(model="m", reasoning_config={"think_start": "<a>"})
    with pytest.raises(ValueError, match="reasoning_end_str must be a non-empty string"):
        EngineArgs(model="m", reasoning_config={"reasoning_end_str": ""})
    # the server splits replies by the markers the engine counts between
    assert set(REASONING_PARSERS) == set(REASONING_MARKERS)
    assert all((START, END) == markers for markers in REASONING_MARKERS.values())


MARKERS = ReasoningTokens(start=(1, 2), end=(7, 8, 9), natural_end=(3, 4))


def replay(tokens: list[int], prompt_len: int, forced: set[int], budget: int) -> int | None:
    """The token to force after `tokens` (prompt, then output; `forced`: the output positions that
    were forced), recounted from scratch. The prompt's reasoning opens after its last start marker
    unless a natural end follows it; in the output one opens after a start marker written outside a
    reasoning and closes at a natural end or a completed forced end. A reasoning `budget` tokens
    long forces the end marker's first token; a forced end under way, its next."""
    open_at, run = None, 0
    for end in range(2, prompt_len + 1):
        if tuple(tokens[end - 2:end]) == MARKERS.start:
            open_at = end
    closes = [i for i in range(prompt_len - 1) if tuple(tokens[i:i + 2]) == MARKERS.natural_end]
    if open_at is not None and closes and closes[-1] >= open_at - 2:
        open_at = None
    for p in range(prompt_len, len(tokens)):
        last_two = tuple(tokens[max(p - 1, 0):p + 1])
        if p in forced:
            run += 1
            if run == len(MARKERS.end):
                open_at, run = None, 0
        elif open_at is None and last_two == MARKERS.start:
            open_at = p + 1
        elif open_at is not None and last_two == MARKERS.natural_end:
            open_at = None
    if run:
        return MARKERS.end[run]
    return MARKERS.end[0] if open_at is not None and len(tokens) - open_at >= budget else None


@pytest.mark.parametrize("seed", range(40))
def test_thinking_budget_matches_a_replay(seed):
    """Random token streams over the markers' ids: the forced token after every output token is
    the replay's; forced tokens are fed back as the engine would sample them."""
    rng = np.random.default_rng(seed)
    budget = int(rng.integers(0, 6))
    prompt = rng.choice([1, 2, 3, 4, 5, 6], size=int(rng.integers(0, 8))).tolist()
    state = ThinkingBudget(MARKERS, budget, prompt)
    tokens, forced = list(prompt), set()
    for _ in range(40):
        assert state.forced_token() == replay(tokens, len(prompt), forced, budget), (tokens, budget, len(prompt))
        if state.forced_token() is not None:
            forced.add(len(tokens))
        token = state.forced_token() or int(rng.choice([1, 2, 3, 4, 5, 6]))
        state.append(token)
        tokens.append(token)


def test_thinking_budget_by_hand():
    state = ThinkingBudget(MARKERS, 2, [5, 1, 2, 6])  # the prompt opened it: 1 reasoning token so far
    assert state.thinking == 1 and state.forced_token() is None
    state.append(6)
    assert [state.forced_token()] == [7]
    for token in (7, 8, 9):
        assert state.forced_token() == token
        state.append(token)
    assert state.forced_token() is None and state.thinking is None
    for token in (1, 2, 3, 4, 5, 5):  # a new reasoning, closed by the model within its budget (its end counts)
        state.append(token)
        assert state.forced_token() is None
    assert ThinkingBudget(MARKERS, 0, [1, 2]).forced_token() == 7
    assert ThinkingBudget(MARKERS, 0, [1, 2, 3, 4]).forced_token() is None
