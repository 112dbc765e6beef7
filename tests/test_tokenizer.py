"""Tokenizer: the GGUF-built tokenizer against transformers' own GGUF tokenizer, chat templates
against plain jinja2, and the small API the engine relies on."""

import functools
import json
import os

import jinja2
import pytest

from jpaged.loaders.gguf import load_gguf_tokenizer
from jpaged.loaders.gguf_file import read_gguf
from jpaged.chat_content import detect_content_format
from jpaged.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Numbers 1234567 and 3.14159, symbols #$%^&*",
    "Unicode: naïve café, 東京, emoji 🙂🚀",
    "code:\n\tdef f(x):\n\t\treturn x ** 2\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def gguf_file(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def tokenizer(gguf_file):
    return load_gguf_tokenizer(gguf_file, eos_token_ids=(), chat_template=None)


def test_matches_transformers_gguf_tokenizer(tokenizer, smollm2_path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path)
    )
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    assert tokenizer.all_special_ids == set(reference.all_special_ids)
    assert tokenizer.apply_chat_template(MESSAGES) == reference.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_vocabulary_and_special_tokens_follow_the_gguf_metadata(tokenizer, gguf_file):
    meta = gguf_file.metadata
    tokens = meta["tokenizer.ggml.tokens"]
    ids = tokenizer.encode(TEXTS[3] + TEXTS[4])
    assert tokenizer.convert_ids_to_tokens(ids) == [tokens[i] for i in ids]
    assert tokenizer.vocab_size == len(tokens) == 49152
    assert tokenizer.bos_token_id == meta["tokenizer.ggml.bos_token_id"] == 1
    assert tokenizer.eos_token_ids == (meta["tokenizer.ggml.eos_token_id"],) == (2,)
    assert {0, 1, 2} <= tokenizer.all_special_ids
    for text in TEXTS[:5]:
        assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level BPE round-trips
    special = tokenizer.encode(TEXTS[5])
    assert special[0] == 1 and special[-1] == 2  # inline special tokens are single ids
    assert tokenizer.decode(special) == "user\nspecial tokens inline"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_plain_jinja2(tokenizer, gguf_file, add_generation_prompt):
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        gguf_file.metadata["tokenizer.chat_template"]
    )
    expected = template.render(messages=MESSAGES, add_generation_prompt=add_generation_prompt)
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert rendered.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_override_file_or_text(tokenizer, tmp_path):
    text = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    expected = "[system] You are terse.\n[user] What is 2+2?\n[assistant] 4\n[user] And 3+3?\n>"
    assert tokenizer.apply_chat_template(MESSAGES, chat_template=text) == expected
    path = tmp_path / "template.jinja"
    path.write_text(text)
    assert tokenizer.apply_chat_template(MESSAGES, chat_template=str(path)) == expected
    with pytest.raises(ValueError, match="chat template file .*missing.jinja.* does not exist"):
        tokenizer.apply_chat_template(MESSAGES, chat_template=str(tmp_path / "missing.jinja"))


def test_missing_chat_template_and_extra_eos(tiny_model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())  # no chat_template.jinja
    tokenizer = Tokenizer.from_pretrained(str(tmp_path), eos_token_ids=(2, 0))
    assert tokenizer.eos_token_ids == (2, 0)  # its own EOS first, no duplicates
    with pytest.raises(ValueError, match="has no chat template; pass one with --chat-template"):
        tokenizer.apply_chat_template(MESSAGES)


def test_developer_role_becomes_system_unless_the_template_names_it(tokenizer):
    """vLLM's rule: SmolLM2's template has no developer role, so developer messages render as
    system ones, merged into one system message first; a template naming the role keeps it."""
    user = {"role": "user", "content": "Hi"}
    assert (tokenizer.apply_chat_template([{"role": "developer", "content": "Be brief."}, user])
            == tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, user]))
    mixed = [{"role": "system", "content": "A."}, user, {"role": "developer", "content": "B."}, user]
    assert (tokenizer.apply_chat_template(mixed)
            == tokenizer.apply_chat_template([{"role": "system", "content": "A.\n\nB."}, user, user]))
    naming = "{% for m in messages %}{% if m.role == 'developer' %}D:{% endif %}{{ m.content }};{% endfor %}"
    assert tokenizer.apply_chat_template(mixed, chat_template=naming) == "A.;Hi;D:B.;Hi;"


# A template that shows how content reached it: "S:" a string, "P:" per text part.
PARTS_TEMPLATE = ("{% for m in messages %}{{ m.role }}|{% if m.content is string %}S:{{ m.content }}"
                  "{% else %}{% for p in m.content %}P:{{ p.text }};{% endfor %}{% endif %}/{% endfor %}")


@pytest.mark.parametrize("template, expected", [
    ("{% for message in messages %}{{ message['content'] | trim }}{% endfor %}", "string"),
    ("{% for message in messages %}{% for p in message['content'] %}{{ p.text }}{% endfor %}{% endfor %}",
     "openai"),
    ("{% for m in messages %}{% for p in m.content | selectattr('type', 'equalto', 'text') %}{{ p.text }}"
     "{% endfor %}{% endfor %}", "openai"),
    ("{% set loop_messages = messages[1:] %}{% for message in loop_messages %}{% set content = message['content'] %}"
     "{% for p in content %}{{ p['text'] }}{% endfor %}{% endfor %}", "openai"),
    ("{% for p in messages[0].content %}{{ p.text }}{% endfor %}", "openai"),
    ("{% for tool in tools %}{% for p in tool.content %}{{ p }}{% endfor %}{% endfor %}", "string"),  # not a message
    ("{% for m in messages %}{% for c in m.content %}{% break %}{% endfor %}{% generation %}x{% endgeneration %}"
     "{% endfor %}", "openai"),  # transformers' extensions parse
    ("{% for message in messages %}{{ message.content }", "string"),  # unparsable
    (None, "string"),
])
def test_content_format_detection(template, expected):
    assert detect_content_format(template) == expected


def test_content_formats_render_parts_or_one_string(tokenizer):
    """"openai" hands the template text parts (a string is one part, None none), "string" one
    string (parts one per line); "auto" picks parts for a template that loops over them and a
    string for SmolLM2's."""
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]},
                {"role": "assistant", "content": None}]
    as_parts = "system|P:Be brief.;/user|P:One.;P:Two.;/assistant|/"
    as_string = "system|S:Be brief./user|S:One.\nTwo./assistant|S:/"
    render = functools.partial(tokenizer.apply_chat_template, messages, chat_template=PARTS_TEMPLATE)
    assert render(content_format="openai") == render(content_format="auto") == render() == as_parts
    assert render(content_format="string") == as_string
    # SmolLM2's template adds content to strings: "auto" keeps handing it one string
    assert tokenizer.apply_chat_template(messages) == tokenizer.apply_chat_template(messages,
                                                                                    content_format="string")
    with pytest.raises(ValueError, match="type 'image_url' is not supported"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image_url"}]}],
                                      chat_template=PARTS_TEMPLATE)
    with pytest.raises(ValueError, match="needs its 'text' as a string"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": 5}]}],
                                      chat_template=PARTS_TEMPLATE)
    with pytest.raises(ValueError, match="chat_template_content_format must be one of"):
        render(content_format="parts")


def test_developer_messages_merge_with_text_parts(tokenizer):
    """Developer and system contents given as parts merge into one system message, which reaches
    a part-reading template as one part."""
    messages = [{"role": "user", "content": "Hi"},
                {"role": "developer", "content": [{"type": "text", "text": "A."}, {"type": "text", "text": "B."}]},
                {"role": "system", "content": "C."}]
    expected = "system|P:A.\nB.\n\nC.;/user|P:Hi;/"
    rendered = tokenizer.apply_chat_template(messages, chat_template=PARTS_TEMPLATE, add_generation_prompt=False)
    assert rendered == expected


class _Token:
    """Stands for transformers' AddedToken: a `content` string."""

    def __init__(self, content):
        self.content = content

    def __str__(self):
        return f"Token({self.content!r})"


def test_info_is_json_with_class_and_serving_chat_template(tokenizer, tiny_model_dir, tmp_path):
    info = tokenizer.info()
    assert json.loads(json.dumps(info, allow_nan=False)) == info
    assert info["tokenizer_class"] == type(tokenizer.hf).__name__
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == tokenizer.hf.chat_template
    # The template the server renders with (--chat-template), not the one the files name.
    template = tmp_path / "template.jinja"
    template.write_text(PARTS_TEMPLATE)
    overridden = Tokenizer.from_pretrained(str(tiny_model_dir), chat_template=str(template))
    overridden.hf.init_kwargs.update(vocab_file="/srv/vocab.json", merges_file="/srv/merges.txt",
                                     extra={"tokens": [_Token("<a>"), _Token(7)], 3: (1.5, float("nan"))},
                                     opaque=object)
    info = overridden.info()
    assert info["chat_template"] == PARTS_TEMPLATE
    assert "vocab_file" not in info and "merges_file" not in info
    assert info["extra"] == {"tokens": ["<a>", "Token(7)"], "3": [1.5, "nan"]}
    assert info["opaque"] == str(object)
    json.dumps(info, allow_nan=False)
