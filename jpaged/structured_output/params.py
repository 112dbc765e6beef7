"""StructuredOutputsParams: the constraint a request's output must satisfy (vLLM's class and fields)."""

import dataclasses
import json
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (a
    list of strings), `grammar` (Lark, or EBNF/GBNF as llama.cpp writes it), `json_object=True`
    (any JSON object). ValueError naming the fields when none or several are set.

    `after_token_ids` (jpaged's): the constraint starts once the output contains these tokens
    (a reasoning model's `</think>`); the output up to and including them is free. The server
    sets it with --reasoning-parser, as vLLM constrains only what follows the reasoning."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    after_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        chosen = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError("structured outputs need exactly one constraint of "
                             f"{', '.join(_KINDS)}; got {', '.join(chosen) if chosen else 'none'}.")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"choice must be a non-empty list of strings, got {self.choice!r}.")
            self.choice = list(self.choice)
        if self.after_token_ids is not None:
            if not self.after_token_ids or any(not isinstance(t, int) or t < 0 for t in self.after_token_ids):
                raise ValueError(f"after_token_ids must be a non-empty list of token ids, got {self.after_token_ids!r}.")
            self.after_token_ids = list(self.after_token_ids)

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, text): what the grammar is compiled from and cached by. A schema keeps its
        properties' order, which is the order the output must write them in (as in vLLM)."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "json" and not isinstance(value, str):
            value = json.dumps(value)
        elif kind == "choice":
            value = json.dumps(value)
        elif kind == "json_object":
            value = ""
        return kind, value
