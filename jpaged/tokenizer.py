"""Tokenizer: a thin, typed face over a transformers fast tokenizer (no torch needed)."""

import json
import math
import os
from collections.abc import Iterable, Sequence

from jpaged.chat_content import message_parts, message_text, resolve_content_format


class Tokenizer:
    """Encodes, decodes and renders chat templates the way the model's HF tokenizer does.

    `eos_token_ids` joins the tokenizer's EOS with any extra stop ids from the model config
    (e.g. generation_config.json lists several for Llama 3).
    """

    def __init__(self, hf_tokenizer, eos_token_ids: Iterable[int] = (), chat_template: str | None = None):
        self.hf = hf_tokenizer
        if chat_template is not None:
            self.hf.chat_template = _read_chat_template(chat_template)
        own_eos = () if hf_tokenizer.eos_token_id is None else (hf_tokenizer.eos_token_id,)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys((*own_eos, *eos_token_ids)))
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.vocab_size: int = len(hf_tokenizer)  # includes added tokens
        self.all_special_ids: set[int] = set(hf_tokenizer.all_special_ids)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "Tokenizer":
        """Loads tokenizer.json / tokenizer_config.json (and chat_template.jinja) from a folder.

        Folders whose tokenizer_config.json names the generic class skip AutoTokenizer, whose
        imports alone take seconds.
        """
        import transformers

        tokenizer_class = _tokenizer_class(path)
        if tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return cls(transformers.PreTrainedTokenizerFast.from_pretrained(path), **kwargs)
        return cls(transformers.AutoTokenizer.from_pretrained(path), **kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def prompt_and_ids(self, prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt as LLM.generate takes one: a str, token ids, or a
        {"prompt": str} / {"prompt_token_ids": [...]} dict (the ids win when both are given)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.encode(prompt["prompt"])
            raise ValueError(f"a prompt dict needs a 'prompt' or 'prompt_token_ids' key, got {sorted(prompt)}.")
        if isinstance(prompt, str):
            return prompt, self.encode(prompt)
        return None, [int(t) for t in prompt]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(token_ids))

    def info(self) -> dict:
        """vLLM's GET /tokenizer_info: the HF tokenizer's init_kwargs (less the vocab and merges
        file paths) as JSON values, its class name, and the chat template it renders with (the
        model's or --chat-template) when there is one."""
        init_kwargs = getattr(self.hf, "init_kwargs", None) or {}
        info = {key: _json_value(value) for key, value in init_kwargs.items()
                if key not in ("vocab_file", "merges_file")}
        info["tokenizer_class"] = type(self.hf).__name__
        if self.hf.chat_template is not None:
            info["chat_template"] = _json_value(self.hf.chat_template)
        return info

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        content_format: str = "auto",
        **kwargs,
    ) -> str:
        """Renders `messages` with the model's (or the given) jinja2 chat template, as HF does.

        As vLLM does: `content_format` (--chat-template-content-format) says how a message's
        content reaches the template: "string", one string with a text part per line; "openai",
        a list of text parts [{"type": "text", "text": ...}]; "auto", whichever the template
        expects (jpaged/chat_content.py). `developer` messages become `system` ones for a
        template that never names the developer role (SmolLM2's would render an unknown role
        after its own default system prompt), and the system messages are then merged into one
        at the start. Raises ValueError when there is no template (pass --chat-template), or for
        a content part that is not text.
        """
        template = None if chat_template is None else _read_chat_template(chat_template)
        if template is None and self.hf.chat_template is None:
            raise ValueError(
                f"the tokenizer of {self.hf.name_or_path!r} has no chat template; pass one with "
                "--chat-template (a file path or the template text)"
            )
        source = template if template is not None else self.hf.chat_template
        if any(m.get("role") == "developer" for m in messages) and not _names_developer_role(source):
            messages = _developer_as_system(messages)
        as_content = message_parts if resolve_content_format(content_format, source) == "openai" else message_text
        messages = [{**m, "content": as_content(m.get("content"))} for m in messages]
        return self.hf.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=template,
            **kwargs,
        )


def _json_value(value):
    """`value` as JSON can hold it: an AddedToken-like object (one with a string `content`) as
    that string, containers item by item, and anything else JSON has no value for as str()."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_value(item) for item in value]
    content = getattr(value, "content", None)
    return content if isinstance(content, str) else str(value)


def _names_developer_role(template) -> bool:
    """Whether a chat template (text, or HF's dict of named templates) has a case for the
    developer role: vLLM's test, the role's name quoted in it."""
    texts = template.values() if isinstance(template, dict) else [template]
    return any('"developer"' in text or "'developer'" in text for text in texts)


def _developer_as_system(messages: list[dict]) -> list[dict]:
    """Developer messages as system messages, all system contents merged (blank-line
    separated) into one first message when there are several or one is not first."""
    messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    system_at = [i for i, m in enumerate(messages) if m.get("role") == "system"]
    if system_at in ([], [0]):
        return messages
    texts = [message_text(messages[i].get("content")) for i in system_at]
    merged = "\n\n".join(text for text in texts if text)
    return [{"role": "system", "content": merged}] + [m for m in messages if m.get("role") != "system"]


def _read_chat_template(template: str) -> str:
    """A chat template given as a file path or as the template text itself (like vLLM)."""
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    if "{" not in template and os.sep in template:
        raise ValueError(f"chat template file {template!r} does not exist")
    return template


def _tokenizer_class(path: str) -> str | None:
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    with open(config_path, encoding="utf-8") as f:
        return json.load(f).get("tokenizer_class")
