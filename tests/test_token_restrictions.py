"""allowed_token_ids and bad_words (jpaged/token_restrictions.py), in the engine and over HTTP.

Oracles: llama.forward_dense's logits (greedy restricted to the allowed tokens, raw logprobs over
the whole vocabulary, as vLLM's sampler reports them) and a dense greedy loop that bans a bad
word's last token after its prefix; the tokenizer for vLLM's bad-word sequences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import SamplingParams
from jpaged.models import llama
from jpaged.token_restrictions import (MAX_BAD_WORDS_TOKEN_IDS, allowed_bitmask, bad_words_token_ids, banned_tokens,
                                       clear_bits)
from test_structured_output import llm  # noqa: F401 (fixture: the sharpened tiny model, ENGINE_KWARGS)

PADDED_LEN = 128


def dense_logits(llm, tokens: list[int]) -> np.ndarray:
    engine = llm.llm_engine
    ids = np.zeros((1, PADDED_LEN), np.int32)
    ids[0, :len(tokens)] = tokens
    forward = jax.jit(lambda p, x: llama.forward_dense(p, engine.model_config, x))
    logits = forward(engine.runner.params, jnp.asarray(ids))
    return np.asarray(logits[0, len(tokens) - 1], np.float64)


def dense_greedy(llm, prompt: list[int], num_tokens: int, banned=lambda output: ()) -> list[int]:
    """Greedy over the dense logits, `banned(output so far)` masked at each step."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        logits = dense_logits(llm, tokens)
        logits[list(banned(tokens[len(prompt):]))] = -np.inf
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def test_allowed_token_ids_limit_the_draw_but_not_the_raw_logprobs(llm):  # noqa: F811
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, size=20).tolist()
    free = dense_greedy(llm, prompt, 6)
    allowed = sorted(set(rng.integers(100, 40000, size=30).tolist()) - set(free))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, allowed_token_ids=allowed, logprobs=3)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    tokens = list(prompt)
    for token, logprobs in zip(output.token_ids, output.logprobs):
        logits = dense_logits(llm, tokens)
        assert token == allowed[int(np.argmax(logits[allowed]))]
        raw = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())  # the whole vocabulary's
        assert logprobs[token].logprob == pytest.approx(raw[token], abs=1e-4)
        assert set(logprobs) == {token, *np.argsort(-raw)[:3].tolist()}
        tokens.append(token)
    sampled = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        n=4, temperature=1.5, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed[:3]), use_tqdm=False)[0]
    assert all(set(c.token_ids) <= set(allowed[:3]) for c in sampled.outputs)


def test_bad_words_ban_a_word_after_its_prefix(llm):  # noqa: F811
    tokenizer = llm.get_tokenizer()
    rng = np.random.default_rng(3)
    prompt = rng.integers(100, 40000, size=12).tolist()
    free = dense_greedy(llm, prompt, 10)
    # a two-token word of the free output that the tokenizer gives back as those two tokens
    word, sequences = next((w, seqs) for i in range(1, 9) if (w := tokenizer.decode(free[i:i + 2])).strip()
                           and free[i:i + 2] in (seqs := bad_words_token_ids(tokenizer, [w])))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, bad_words=[word])
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert output == dense_greedy(llm, prompt, 10, lambda out: banned_tokens(sequences, out))
    assert output != free
    for sequence in sequences:
        assert not any(output[i:i + len(sequence)] == sequence for i in range(len(output)))


def test_bad_words_sequences_follow_vllms_rule(llm):  # noqa: F811
    tokenizer = llm.get_tokenizer()

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    assert bad_words_token_ids(tokenizer, ["hello"]) == [encode("hello"), encode(" hello")]
    assert bad_words_token_ids(tokenizer, ["  world"]) == [encode("world"), encode(" world")]
    # a word whose spaced form is a different number of tokens keeps only its plain form
    assert len(encode("jpaged")) != len(encode(" jpaged"))
    assert bad_words_token_ids(tokenizer, ["jpaged"]) == [encode("jpaged")]
    with pytest.raises(ValueError, match="over the limit"):
        bad_words_token_ids(tokenizer, [f"w{i}" for i in range(MAX_BAD_WORDS_TOKEN_IDS)])
    assert banned_tokens([[5], [7, 8], [1, 2, 3]], [9, 7]) == [5, 8]
    assert banned_tokens([[1, 2, 3]], [2]) == []
    assert banned_tokens([[1, 2, 3]], [1, 2]) == [3]


def test_bitmask_rows():
    row = allowed_bitmask([0, 31, 32, 100], 128)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    assert np.flatnonzero(bits).tolist() == [0, 31, 32, 100]
    clear_bits(row, [31, 100])
    assert np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")).tolist() == [0, 32]


def test_bad_requests_fail_before_anything_runs(llm):  # noqa: F811
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate("Hi", SamplingParams(allowed_token_ids=[engine.model_config.vocab_size]), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[" "])
    with pytest.raises(ValueError, match="bad_words"):
        llm.generate("Hi", SamplingParams(bad_words=[f"w{i}" for i in range(200)]), use_tqdm=False)
    assert not engine.has_unfinished_requests()
