"""Reasoning parsers (--reasoning-parser): a reasoning model's reply split into its reasoning (the
text between `<think>` and `</think>`) and its content, as vLLM reports them in `reasoning`.

Both parsers read the reply as starting inside the reasoning: the chat template opened `<think>`,
or the model writes it first, and then it is dropped. The reasoning ends at `</think>` (dropped);
the rest is content, which the tool-call parser then reads.
- `deepseek_r1` (DeepSeek-R1 and its Llama and Qwen distills): a reply without `</think>` is all
  reasoning.
- `qwen3`: likewise, and a `<tool_call>` also ends the reasoning (the call stays in the content);
  with `chat_template_kwargs: {"enable_thinking": false}` the template has the model skip its
  thinking, so the whole reply is content.

Splits are monotonic in the text so far (a marker that may still be forming is held back until
the text decides it), so a stream sends the differences.
"""

import dataclasses
from typing import Any

from jpaged.reasoning import REASONING_MARKERS

START, END = REASONING_MARKERS["deepseek_r1"]  # qwen3's are the same


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclasses.dataclass(frozen=True)
class ThinkReasoningParser:
    kept_ends: tuple[str, ...] = ()  # markers besides END that end the reasoning and stay in the content

    def split(self, text: str, final: bool) -> tuple[str, str | None]:
        """(reasoning, content) of the reply so far; content None until the reasoning has ended."""
        stripped = text.lstrip()
        if stripped.startswith(START):
            text = stripped[len(START):]
        elif not final and START.startswith(stripped):
            return "", None  # maybe the start of <think>
        ends = [(text.find(marker), marker) for marker in (END, *self.kept_ends) if marker in text]
        if ends:
            index, marker = min(ends)
            return text[:index], text[index + (len(END) if marker == END else 0):]
        if final:
            return text, None
        held = max(_partial_suffix(text, marker) for marker in (END, *self.kept_ends))
        return text[:len(text) - held], None


def reasoning_token_count(parser: ThinkReasoningParser, tokenizer, token_ids: list[int]) -> int:
    """How many of a reply's tokens are its reasoning (vLLM's usage `reasoning_tokens`): the
    tokens before the marker that ends it, without `<think>`'s and the marker's own tokens; all
    of them (but `<think>`'s) when nothing ends it. The end is found by bisection over decoded
    prefixes, so it agrees with `split` whatever the markers tokenize to."""
    def ended(k: int) -> bool:
        return parser.split(tokenizer.decode(token_ids[:k]), final=False)[1] is not None

    text = tokenizer.decode(token_ids)
    start_tokens = len(tokenizer.encode(START, add_special_tokens=False)) if text.lstrip().startswith(START) else 0
    if not ended(len(token_ids)):
        return max(len(token_ids) - start_tokens, 0)
    low, high = 0, len(token_ids)  # ended(high), not ended(low)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if ended(middle) else (middle, high)
    reasoning, _ = parser.split(text, final=True)
    rest = (text.lstrip()[len(START):] if start_tokens else text)[len(reasoning):]
    marker = next(m for m in (END, *parser.kept_ends) if rest.startswith(m))
    return max(high - len(tokenizer.encode(marker, add_special_tokens=False)) - start_tokens, 0)


REASONING_PARSERS = {"deepseek_r1": ThinkReasoningParser(), "qwen3": ThinkReasoningParser(kept_ends=("<tool_call>",))}


def reasoning_parser_for(name: str | None, chat_template_kwargs: dict[str, Any] | None) -> ThinkReasoningParser | None:
    """The server's parser for one request; None when there is none or the request turned
    thinking off (qwen3's `enable_thinking: false`)."""
    if name is None:
        return None
    if name == "qwen3" and (chat_template_kwargs or {}).get("enable_thinking", True) is False:
        return None
    return REASONING_PARSERS[name]


class ReasoningStream:
    """One streamed choice: feed it each new piece of text, get (reasoning delta, content delta)."""

    def __init__(self, parser: ThinkReasoningParser):
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, new_text: str, final: bool) -> tuple[str | None, str | None]:
        self.text += new_text
        reasoning, content = self.parser.split(self.text, final)
        reasoning_delta = reasoning[self.sent_reasoning:]
        self.sent_reasoning = len(reasoning)
        content_delta = None
        if content is not None:
            content_delta = content[self.sent_content:]
            self.sent_content = len(content)
        return reasoning_delta or None, content_delta
