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

START, END = "<think>", "</think>"


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
