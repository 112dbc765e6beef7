"""vLLM's `allowed_token_ids` and `bad_words`: per-request limits on the tokens that may be sampled.

Both become bits of the step's token bitmask (the one structured outputs use, so no new
program shape): `allowed_token_ids` a fixed row built once per request, `bad_words` the tokens
it bans after the request's latest output tokens, worked out again for each step. As in vLLM,
the sampler takes them after the raw logprobs (`step_metadata.pack_sampling`'s mask_raw column),
so logprobs stay those of the model.
"""

import numpy as np

from jpaged.structured_output.manager import bitmask_width

MAX_BAD_WORDS_TOKEN_IDS = 128  # vLLM's VLLM_MAX_NUM_BAD_WORDS: token sequences after tokenizing


def bad_words_token_ids(tokenizer, bad_words: list[str]) -> list[list[int]]:
    """The token sequences `bad_words` ban (vLLM's rule): each word as written (leading spaces
    dropped) and, when it makes other tokens of the same count, with one leading space (the word
    in the middle of text). ValueError naming bad_words for a word that makes no token or for
    more than MAX_BAD_WORDS_TOKEN_IDS sequences."""
    sequences: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise ValueError(f"bad_words entries must tokenize to at least one token, got {word!r}.")
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    if len(sequences) > MAX_BAD_WORDS_TOKEN_IDS:
        raise ValueError(f"bad_words make {len(sequences)} token sequences, over the limit of "
                         f"{MAX_BAD_WORDS_TOKEN_IDS}.")
    return sequences


def banned_tokens(sequences: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """The last token of every sequence whose other tokens the output ends with (a one-token
    sequence is always banned); only output tokens count, not the prompt's."""
    banned = []
    for sequence in sequences:
        prefix = sequence[:-1]
        if len(prefix) <= len(output_token_ids) and output_token_ids[len(output_token_ids) - len(prefix):] == prefix:
            banned.append(sequence[-1])
    return banned


def allowed_bitmask(token_ids: list[int], vocab_size: int) -> np.ndarray:
    """i32[cdiv(vocab_size, 32)] with the bits of `token_ids` set."""
    row = np.zeros(bitmask_width(vocab_size), np.uint32)
    ids = np.asarray(token_ids, np.int64)
    np.bitwise_or.at(row, ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)))
    return row.view(np.int32)


def clear_bits(row: np.ndarray, token_ids: list[int]) -> None:
    """Clears the bits of `token_ids` in one i32 bitmask row, in place."""
    ids = np.asarray(token_ids, np.int64)
    np.bitwise_and.at(row.view(np.uint32), ids // 32, ~(np.uint32(1) << (ids % 32).astype(np.uint32)))
