"""How a chat message's `content` reaches the jinja chat template (vLLM's
--chat-template-content-format): one string ("string"), or a list of OpenAI text parts
("openai"); "auto" reads the template to see which it expects."""

import functools
import logging

import jinja2
import jinja2.ext
from jinja2 import nodes

logger = logging.getLogger(__name__)

CONTENT_FORMATS = ("auto", "string", "openai")


def message_text(content) -> str:
    """A chat message's content as one string: text parts joined one per line (vLLM's rule for
    templates that read content as a string); None as ""."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(_part_texts(content))


def message_parts(content) -> list[dict]:
    """A chat message's content as OpenAI text parts, [{"type": "text", "text": ...}]: a string is
    one part, None none."""
    if content is None:
        return []
    texts = [content] if isinstance(content, str) else _part_texts(content)
    return [{"type": "text", "text": text} for text in texts]


def _part_texts(parts) -> list[str]:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":  # the part itself is left out: an image's data URL can be megabytes
            raise ValueError(f"a content part of type {kind!r} is not supported: the model is not multimodal "
                             "and reads only text content parts ({'type': 'text', 'text': ...})")
        if not isinstance(part.get("text"), str):
            raise ValueError("a text content part needs its 'text' as a string")
        texts.append(part["text"])
    return texts


def resolve_content_format(content_format: str, template) -> str:
    """"string" or "openai": `content_format` itself, or for "auto" what `template` (the text that
    renders, or HF's dict of named templates) expects."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}, "
                         f"got {content_format!r}")
    if content_format != "auto":
        return content_format
    texts = template.values() if isinstance(template, dict) else [template]
    return "openai" if any(detect_content_format(text) == "openai" for text in texts) else "string"


@functools.lru_cache(maxsize=64)
def detect_content_format(template: str | None) -> str:
    """"openai" when the template loops over a message's content (so it expects a list of
    parts), else "string"; also "string" for a template jinja2 cannot parse."""
    if not template:
        return "string"
    try:
        ast = jinja2.Environment(extensions=[jinja2.ext.loopcontrols, _GenerationTag]).parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    detected = "openai" if _loops_over_content(ast) else "string"
    logger.info("Detected the chat template content format to be '%s' (set --chat-template-content-format "
                "to override it).", detected)
    return detected


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` block (it marks assistant text), so
    templates using it parse; its body is kept as is."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Names:
    """The template's variables that hold the message list, one message, or a message's content."""

    def __init__(self):
        self.messages = {"messages"}
        self.message: set[str] = set()
        self.content: set[str] = set()

    def kind(self, node) -> str | None:
        """"messages", "message" or "content" for an expression holding one, else None."""
        if isinstance(node, nodes.Name):
            for kind in ("messages", "message", "content"):
                if node.name in getattr(self, kind):
                    return kind
            return None
        if isinstance(node, nodes.Filter):  # messages | selectattr(...), message.content | list
            return self.kind(node.node)
        if isinstance(node, nodes.Getitem):  # messages[1:], messages[0], message['content']
            inner = self.kind(node.node)
            if inner == "messages":
                return "messages" if isinstance(node.arg, nodes.Slice) else "message"
            if inner == "message" and isinstance(node.arg, nodes.Const) and node.arg.value == "content":
                return "content"
            return None
        if isinstance(node, nodes.Getattr):  # message.content
            return "content" if node.attr == "content" and self.kind(node.node) == "message" else None
        return None

    def bind(self, target, kind: str | None) -> bool:
        """Records that the name `target` holds a `kind` value; True when that is new."""
        if kind is None or not isinstance(target, nodes.Name) or target.name in getattr(self, kind):
            return False
        getattr(self, kind).add(target.name)
        return True


def _loops_over_content(ast: nodes.Template) -> bool:
    """Whether a `for` loop iterates over a message's content, following `set` and `for`
    bindings from `messages` (to a fixed point, so the order they appear in does not matter)."""
    names = _Names()
    bindings = [(n.target, n.node) for n in ast.find_all(nodes.Assign)]
    loops = list(ast.find_all(nodes.For))
    changed = True
    while changed:
        changed = False
        for target, value in bindings:
            changed |= names.bind(target, names.kind(value))
        for loop in loops:
            if names.kind(loop.iter) == "messages":  # each item is a message
                changed |= names.bind(loop.target, "message")
    return any(names.kind(loop.iter) == "content" for loop in loops)
