"""Incremental detokenization against whole-sequence decoding, and stop strings."""

import numpy as np
import pytest

from jpaged.detokenizer import IncrementalDetokenizer
from jpaged.loaders import load_model
from jpaged.sampling_params import SamplingParams

TEXTS = [
    "Hello world, this is a test.",
    "Ünïcödé: naïve café, 你好世界, emoji 🙂🚀 and math ∑∫.",
    "  leading spaces\nand\ttabs   and a new line\n",
    "日本語のテキストと English mixed 한국어",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_model(str(tiny_model_dir)).tokenizer


def stream(tokenizer, prompt_ids, output_ids, params):
    det = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    texts = []
    for token_id in output_ids:
        stop = det.append(token_id)
        texts.append(det.text)
        if stop is not None:
            break
    return det, texts


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    prompt_ids = tokenizer.encode("Say:")
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    det, texts = stream(tokenizer, prompt_ids, output_ids, SamplingParams())
    assert det.text == tokenizer.decode(output_ids)
    for shorter, longer in zip(texts, texts[1:]):
        assert longer.startswith(shorter)
    assert not any("\ufffd" in t for t in texts)


def test_random_byte_tokens_never_emit_replacement_chars_midway(tokenizer):
    """Single-byte tokens of multi-byte characters: text appears once the character completes."""
    rng = np.random.default_rng(0)
    ids = tokenizer.encode("é🙂你", add_special_tokens=False)
    noise = rng.integers(1000, 20000, size=20).tolist()
    output_ids = noise[:10] + ids + noise[10:]
    det, texts = stream(tokenizer, [1, 2, 3], output_ids, SamplingParams())
    assert det.text == tokenizer.decode(output_ids)


def test_stop_string_truncates_and_holds_back_partial_matches(tokenizer):
    output_ids = tokenizer.encode("Hello world. Stop here please", add_special_tokens=False)
    det, texts = stream(tokenizer, [1], output_ids, SamplingParams(stop=["Stop", "never"]))
    assert det.stop_matched == "Stop" and det.text == "Hello world. "
    assert det.visible_text(finished=True) == "Hello world. "
    running = IncrementalDetokenizer(tokenizer, [1], SamplingParams(stop=["Stop here"]))
    for token_id in tokenizer.encode("Hello world. Sto", add_special_tokens=False):
        running.append(token_id)
    # "Stop here" is 9 characters: the last 8 are held back while running.
    assert running.visible_text(finished=False) == "Hello world. Sto"[:-8]


def test_include_stop_str_in_output(tokenizer):
    output_ids = tokenizer.encode("one two three four", add_special_tokens=False)
    det, _ = stream(tokenizer, [1], output_ids, SamplingParams(stop="three", include_stop_str_in_output=True))
    assert det.text == "one two three" and det.visible_text(finished=False) == "one two three"


def test_skip_special_tokens(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    output_ids = tokenizer.encode("hi", add_special_tokens=False) + [eos]
    det, _ = stream(tokenizer, [1], output_ids, SamplingParams(skip_special_tokens=True))
    kept, _ = stream(tokenizer, [1], output_ids, SamplingParams(skip_special_tokens=False))
    assert det.text == "hi" and kept.text == "hi" + tokenizer.decode([eos], skip_special_tokens=False)


def test_min_tokens_defers_stop_strings(tokenizer):
    """vLLM's rule: no stop string ends the output within its first min_tokens tokens; a match
    may start in their text but must end after it."""
    text = "Hello world. Hello again. Hello there."
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    # The fewest tokens whose text holds "world. Hello" whole: a stop string inside them is skipped.
    n = next(i for i in range(1, len(output_ids) + 1) if "world. Hello" in tokenizer.decode(output_ids[:i]))
    det, _ = stream(tokenizer, [1], output_ids, SamplingParams(stop=["Hello"], min_tokens=n))
    assert det.stop_matched == "Hello" and det.text == "Hello world. Hello again. "
    det, _ = stream(tokenizer, [1], output_ids, SamplingParams(stop=["Hello"], min_tokens=0))
    assert det.text == ""
    # "d. H" straddles the end of the first min_tokens tokens' text: it ends after it, so it stops.
    m = next(i for i in range(1, len(output_ids) + 1) if "world." in tokenizer.decode(output_ids[:i]))
    assert "d. H" not in tokenizer.decode(output_ids[:m])
    det, _ = stream(tokenizer, [1], output_ids, SamplingParams(stop=["d. H"], min_tokens=m))
    assert det.stop_matched == "d. H" and det.text == "Hello worl"
    # Entirely inside the first min_tokens tokens' text: ignored, and the output runs on.
    det, _ = stream(tokenizer, [1], output_ids, SamplingParams(stop=["world"], min_tokens=m))
    assert det.stop_matched is None and det.text == text
