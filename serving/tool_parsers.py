"""Tool-call parsers: split a model's text (complete, or the prefix streamed so far) into content
and function calls, for `tool_choice` "auto" (`--tool-call-parser`) and for the JSON that
`required` and named-function constraints produce.

Every parser works on the whole text so far and is monotonic: as the text grows, the content and
each call's raw arguments text only grow, so a stream can send the differences as deltas. While
a call is incomplete its `arguments` is the JSON text of the arguments so far.
"""

import ast
import dataclasses
import json
import random
import re
import string

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


@dataclasses.dataclass
class ParsedCall:
    name: str | None  # None until the name string is complete
    arguments: str  # JSON text of the arguments (a prefix while streaming)
    complete: bool  # the call's JSON object is closed


@dataclasses.dataclass
class ParsedOutput:
    content: str  # text for message.content (may be "")
    calls: list[ParsedCall]


def json_value_end(text: str, start: int) -> int | None:
    """The index just past the JSON object/array/string/scalar starting at text[start], or None if
    the text ends first. Strings (with escapes) are skipped when matching brackets."""
    depth, i, in_string = 0, start, False
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and ch in ",}] \n\t\r":
            return i
        i += 1
    return None


def scan_call(text: str) -> ParsedCall:
    """A call object `{"name": ..., "arguments" | "parameters": {...}}`, complete or not."""
    name = None
    match = _NAME.search(text)
    if match is not None:
        name = json.loads(f'"{match.group(1)}"')
    arguments = ""
    match = _ARGUMENTS.search(text)
    if match is not None:
        end = json_value_end(text, match.end())
        arguments = text[match.end():end] if end is not None else text[match.end():]
    return ParsedCall(name, arguments, json_value_end(text, 0) is not None)


def scan_objects(text: str, start: int = 0, separators: str = ", \n\t\r;") -> list[ParsedCall]:
    """Consecutive call objects from text[start:], separated by `separators`."""
    calls, i = [], start
    while i < len(text):
        if text[i] in separators:
            i += 1
            continue
        if text[i] != "{":
            break
        end = json_value_end(text, i)
        calls.append(scan_call(text[i:end]))
        if end is None:
            break
        i = end
    return calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _valid_call(call: ParsedCall) -> bool:
    if not call.complete or call.name is None:
        return False
    try:
        return isinstance(json.loads(call.arguments or "{}"), dict)
    except ValueError:
        return False


class HermesToolParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3)."""

    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = text.find(self.START)
        if start < 0:
            keep = len(text) if final else len(text) - _partial_suffix(text, self.START)
            return ParsedOutput(text[:keep], [])
        calls = []
        while start >= 0:
            body_start = start + len(self.START)
            end = text.find(self.END, body_start)
            body = text[body_start:] if end < 0 else text[body_start:end]
            brace = body.find("{")
            if brace >= 0:
                calls.append(scan_call(body[brace:]))
            start = -1 if end < 0 else text.find(self.START, end)
        content = text[:text.find(self.START)]
        if final and not all(_valid_call(c) for c in calls):
            return ParsedOutput(text, [])
        return ParsedOutput(content, calls)


class Llama3JsonToolParser:
    """Llama 3.x JSON tool calls: the reply is `{"name": ..., "parameters": {...}}` (optionally after
    `<|python_tag|>`, several separated by ";"); any other reply is content."""

    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        body = text.lstrip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].lstrip()
        if not body:
            return ParsedOutput("" if not final else text, [])
        if not body.startswith("{"):
            if not final and self.TAG.startswith(body):
                return ParsedOutput("", [])
            return ParsedOutput(text, [])
        calls = scan_objects(body)
        if final and not (calls and all(_valid_call(c) for c in calls)):
            return ParsedOutput(text, [])
        return ParsedOutput("", calls)


def _python_call_end(text: str, start: int) -> int | None:
    """The index just past the `)` that closes the call whose `(` is at text[start], or None if
    the text ends first; Python string literals (either quote, with escapes) are skipped."""
    depth, i, quote = 0, start, None
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _python_call(source: str) -> ParsedCall:
    """`name(key=literal, ...)` as a complete call with JSON arguments; name None when it is not
    one (positional arguments, a value that is not a Python literal, a dotted name, ...)."""
    try:
        node = ast.parse(source, mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
                and all(k.arg is not None for k in node.keywords)):
            raise ValueError(source)
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return ParsedCall(node.func.id, json.dumps(arguments, ensure_ascii=False), True)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return ParsedCall(None, "", True)


class PythonicToolParser:
    """A reply that is a Python list of calls, `[get_weather(city='Paris'), get_time(zone="UTC")]`
    (Llama 3.2 and 4 with a pythonic tool template, ToolACE, ...); keyword values are Python
    literals, turned into JSON arguments. Any other reply is content. A call is reported once its
    `)` closes it (its arguments whole), so a stream sends each call's arguments in one delta."""

    _NAME = re.compile(r"\s*([A-Za-z_]\w*)\s*\(")

    def parse(self, text: str, final: bool) -> ParsedOutput:
        body = text.lstrip()
        if not body.startswith("["):
            return ParsedOutput("" if not body and not final else text, [])
        calls, i, closed = [], 1, False
        while i < len(body):
            if body[i] in ", \n\t\r":
                i += 1
                continue
            if body[i] == "]":
                closed = True
                break
            match = self._NAME.match(body, i)
            if match is None:
                break
            end = _python_call_end(body, match.end() - 1)
            if end is None:
                calls.append(ParsedCall(match.group(1), "", False))
                break
            calls.append(_python_call(body[match.start(1):end]))
            i = end
        if final and not (closed and calls and body[i + 1:].strip() == "" and all(_valid_call(c) for c in calls)):
            return ParsedOutput(text, [])
        return ParsedOutput("", calls)


class MistralToolParser:
    """Mistral's `[TOOL_CALLS]` marker, then the calls: tokenizers before v11 (Mistral 7B v0.3,
    Mixtral 8x22B, Nemo) write a JSON list of `{"name": ..., "arguments": {...}}` objects (or one
    object), v11 and later ones (Mistral Small 3.1, ...) `name{...}` or `name[ARGS]{...}` after a
    marker per call. Text before the first marker is content; text after the calls is dropped
    (vLLM's rules). The marker is a special token, so the server keeps special tokens in these
    replies (`keeps_special_tokens`), and call ids are 9 letters and digits, the only ids Mistral's
    chat templates take back."""

    TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
    keeps_special_tokens = True

    @staticmethod
    def call_id() -> str:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = text.find(self.TAG)
        if start < 0:
            keep = len(text) if final else len(text) - _partial_suffix(text, self.TAG)
            return ParsedOutput(text[:keep], [])
        body = text[start + len(self.TAG):].lstrip()
        while body.startswith(self.TAG):  # repeated markers count as one
            body = body[len(self.TAG):].lstrip()
        if body.startswith(("[", "{")):  # before v11: JSON
            calls = scan_objects(body, 1 if body[0] == "[" else 0)
        else:  # v11+: name{...} after each marker
            calls = [self._named_call(segment) for segment in body.split(self.TAG) if segment.strip()]
        if final and not (calls and all(_valid_call(c) for c in calls)):
            return ParsedOutput(text, [])
        return ParsedOutput(text[:start], calls)

    def _named_call(self, segment: str) -> ParsedCall:
        """`name{...}` or `name[ARGS]{...}`; the name is None until `{` or `[ARGS]` ends it."""
        ends = [i for i in (segment.find(self.ARGS), segment.find("{")) if i >= 0]
        if not ends:
            return ParsedCall(None, "", False)
        name = segment[:min(ends)].strip()
        brace = segment.find("{", min(ends))
        if brace < 0:
            return ParsedCall(name, "", False)
        end = json_value_end(segment, brace)
        return ParsedCall(name, segment[brace:end], end is not None)


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "pythonic": PythonicToolParser,
                "mistral": MistralToolParser}


def parse_required(text: str, final: bool) -> ParsedOutput:
    """The JSON array `[{"name": ..., "parameters": {...}}, ...]` that tool_choice "required" constrains."""
    start = text.find("[")
    return ParsedOutput("", [] if start < 0 else scan_objects(text, start + 1))


def parse_named(name: str, text: str) -> ParsedOutput:
    """tool_choice naming one function: the whole text is its arguments."""
    return ParsedOutput("", [ParsedCall(name, text, json_value_end(text.strip(), 0) is not None)])
