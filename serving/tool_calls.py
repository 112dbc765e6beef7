"""OpenAI `tools` and `tool_choice` on chat completions.

`plan_tools` validates the request's tools and choice and returns a ToolPlan:
- "none": tools are rendered into the prompt (as vLLM does), the reply is plain content;
- "auto": the reply is parsed with the server's `--tool-call-parser` (needs
  `--enable-auto-tool-choice`); text outside tool calls stays content;
- "required": the output is constrained to a JSON array of `{"name", "parameters"}` objects, one
  per call, each naming a given tool and matching its parameters schema;
- a named function: the output is constrained to that function's parameters schema.
A ToolCallStream turns the growing text of one choice into content and `tool_calls` deltas.
"""

import dataclasses
import uuid
from typing import Any

from jpaged.structured_output import StructuredOutputsParams
from serving.errors import APIError
from serving.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from serving.tool_parsers import TOOL_PARSERS, ParsedOutput, parse_named, parse_required

_ANY_OBJECT = {"type": "object"}


def _tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _check_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{name: parameters schema} of the request's tools; 400 for a malformed one."""
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                           f"'parameters': {{...}}}}}}.", param="tools")
        parameters = function.get("parameters", _ANY_OBJECT)
        if not isinstance(parameters, dict):
            raise APIError(f"tools[{i}].function.parameters must be a JSON schema object.", param="tools")
        functions[function["name"]] = parameters or _ANY_OBJECT
    return functions


@dataclasses.dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]]  # as the request sent them: the chat template's `tools`
    functions: dict[str, dict[str, Any]]  # name -> parameters schema
    parser_name: str | None = None  # --tool-call-parser: reads "auto" replies; its call ids in every mode
    function_name: str | None = None  # named
    parallel: bool = True  # parallel_tool_calls: False allows "required" one call only

    def constraint(self) -> StructuredOutputsParams | None:
        """The JSON-schema constraint that enforces "required" and named choices."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self.functions[self.function_name])
        if self.mode != "required":
            return None
        one_call = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                     "required": ["name", "parameters"], "additionalProperties": False}
                    for name, schema in self.functions.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_call}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def new_call_id(self) -> str:
        """A tool call id of the parser's kind (Mistral's templates take 9 alphanumerics only)."""
        return getattr(TOOL_PARSERS.get(self.parser_name), "call_id", _tool_call_id)()

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether replies keep special tokens in their text: the parser's call marker is one."""
        return self.mode != "none" and getattr(TOOL_PARSERS.get(self.parser_name), "keeps_special_tokens", False)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        if self.mode == "named":
            return parse_named(self.function_name, text)
        if self.mode == "required":
            return parse_required(text, final)
        if self.mode == "auto":
            return TOOL_PARSERS[self.parser_name]().parse(text, final)
        return ParsedOutput(text, [])

    def message(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall], str | None]:
        """(content, tool_calls, finish_reason) of a finished choice; "tool_calls" replaces "stop"
        when auto or required produced calls (a named choice keeps "stop", as OpenAI does)."""
        parsed = self.parse(text, final=True)
        calls = [ToolCall(id=self.new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in parsed.calls if c.name is not None]
        if not calls:
            return text, [], finish_reason
        if finish_reason == "stop" and self.mode in ("auto", "required"):
            finish_reason = "tool_calls"
        return parsed.content.strip() or None, calls, finish_reason


def plan_tools(body, *, enable_auto_tool_choice: bool, tool_call_parser: str | None) -> ToolPlan | None:
    """The request's tool plan (None without tools and tool_choice); 400 APIError as vLLM words it."""
    tools, choice = body.tools, body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        return None
    functions = _check_tools(tools)
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolPlan("none", tools, functions, parser_name=tool_call_parser)
    if choice == "auto":
        if not enable_auto_tool_choice or tool_call_parser is None:
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                           "to be set", param="tool_choice")
        return ToolPlan("auto", tools, functions, parser_name=tool_call_parser)
    if choice == "required":
        return ToolPlan("required", tools, functions, parser_name=tool_call_parser,
                        parallel=body.parallel_tool_calls is not False)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise APIError(f"Tool '{name}' has not been passed in `tools`.", param="tool_choice")
        return ToolPlan("named", tools, functions, parser_name=tool_call_parser, function_name=name)
    raise APIError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}}.", param="tool_choice")


class ToolCallStream:
    """One streamed choice: feed it the text so far, get the content and tool_calls deltas."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent_content = 0
        self.sent_calls: list[tuple[str, int]] = []  # per call: (id, arguments chars sent)

    @property
    def called(self) -> bool:
        return bool(self.sent_calls)

    def feed(self, new_text: str, final: bool) -> tuple[str | None, list[DeltaToolCall] | None]:
        """(content delta, tool_calls deltas) after `new_text`; `final` on the choice's last piece
        releases held-back text. Once calls were sent, a broken last call is not turned back
        into content (it was streamed already)."""
        self.text += new_text
        parsed = self.plan.parse(self.text, final and not self.sent_calls)
        content = parsed.content[self.sent_content:] if len(parsed.content) > self.sent_content else ""
        self.sent_content = max(self.sent_content, len(parsed.content))
        deltas = []
        for index, call in enumerate(parsed.calls):
            if index == len(self.sent_calls):
                if call.name is None:
                    break
                call_id = self.plan.new_call_id()
                self.sent_calls.append((call_id, 0))
                deltas.append(DeltaToolCall(index=index, id=call_id, type="function",
                                            function=DeltaFunctionCall(name=call.name, arguments="")))
            call_id, sent = self.sent_calls[index]
            if len(call.arguments) > sent:
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=call.arguments[sent:])))
                self.sent_calls[index] = (call_id, len(call.arguments))
        return content or None, deltas or None


def chat_constraint(body, plan: ToolPlan | None) -> StructuredOutputsParams | None:
    """The one constraint of a chat request: its response_format / structured outputs fields, or
    the one its tool_choice implies; 400 when both are set."""
    from serving.structured_outputs import structured_outputs_from_request

    requested = structured_outputs_from_request(body)
    implied = None if plan is None else plan.constraint()
    if requested is not None and implied is not None:
        raise APIError(f"tool_choice {plan.mode!r} constrains the reply to tool calls; it cannot be combined "
                       "with response_format or structured outputs.", param="tool_choice")
    return requested or implied
