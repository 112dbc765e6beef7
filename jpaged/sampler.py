"""Vectorized on-device sampling: one row per sequence, per-row parameters as arrays.

Order (vLLM's): logit_bias and min_tokens masks, then presence/frequency/repetition penalties;
greedy rows take the argmax of that. Sampled rows are divided by their temperature, masked by
min_p, then top_k and top_p, and drawn at a uniform keyed only on (request seed, output index),
so a seeded request samples the same tokens in any batch (`pallas_kernels.reference.sample_tokens`,
or the C++ kernel of the same contract on CPU).

Logprobs follow vLLM's --logprobs-mode (`jpaged.config.LOGPROBS_MODES`): by default
(raw_logprobs) the log_softmax of the model's logits before logit_bias, min_tokens, penalties,
temperature and the masks (a structured-output token mask is applied first, as vLLM's runner
does; allowed_token_ids and bad_words, which share the token bitmask, are not: vLLM's sampler
applies them after taking the raw logprobs); the processed_* modes use what the row is drawn
from (greedy rows: after penalties, temperature 1, no masks); the *_logits modes return those
logits unnormalized.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jpaged.config import LOGPROBS_MODES
from jpaged.step_metadata import SamplingMetadata
from pallas_kernels import reference

# vLLM's default --max-logprobs: the most top logprobs a request may ask for.
MAX_LOGPROBS = 20


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # i32[num_seqs]
    logprobs: jax.Array  # f32[num_seqs]: the sampled token's logprob (0 when no row asked)
    ranks: jax.Array  # i32[num_seqs]: its 1-based rank
    top_logprobs: jax.Array  # f32[num_seqs, min(max_logprobs, vocab_size)]
    top_token_ids: jax.Array  # i32[num_seqs, min(max_logprobs, vocab_size)]
    # f32[num_entries]: each sampler entry's token scored as the logprobs are (logprob_token_ids'
    # entries; 0 for rows without logprobs)
    entry_logprobs: jax.Array


class SamplingKernels(NamedTuple):
    """The sampler's vocabulary-wide work, as `pallas_kernels.reference` defines it: the draw of
    the sampled rows (`sample_tokens`), the top_k / top_p mask of their processed logprobs
    (`apply_top_k_top_p`) and the logprobs' top list and ranks (`logprob_outputs`); the defaults
    are the references, `pallas_kernels.cpu` has all three."""

    sample_tokens: Callable = reference.sample_tokens
    apply_top_k_top_p: Callable = reference.apply_top_k_top_p
    logprob_outputs: Callable = reference.logprob_outputs


def apply_token_bitmask(logits, token_bitmask):
    """Sets the logits of tokens whose bit is clear to -inf. logits: f32[S, V]; token_bitmask:
    i32[S, cdiv(V, 32)], bit t % 32 of word t // 32 set = token t allowed (all ones: no mask)."""
    vocab = logits.shape[1]
    bits = (token_bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # i32[S, W, 32]
    allowed = bits.reshape(token_bitmask.shape[0], -1)[:, :vocab] != 0
    return jnp.where(allowed, logits, -jnp.inf)


def apply_adjustments(logits, meta: SamplingMetadata):
    """logit_bias and min_tokens masks, then presence/frequency/repetition penalties. f32[S, V].

    Sparse over the entries: a scatter-add of the biases, then each penalty entry's logit is
    gathered, penalised and scattered back (entries that are not penalty entries are dropped
    from that scatter), so the cost follows the number of entries, not S x V.
    """
    if meta.entry_rows.shape[0] == 0:
        return logits
    rows, tokens = meta.entry_rows, meta.entry_token_ids
    logits = logits.at[rows, tokens].add(meta.entry_bias)
    x = logits[rows, tokens]
    rep = meta.repetition_penalty[rows]
    counts = meta.entry_output_counts
    x = jnp.where(x > 0, x / rep, x * rep)
    x = x - meta.frequency_penalty[rows] * counts - meta.presence_penalty[rows] * (counts > 0)
    # Penalty entries are distinct per row; the others (bias, padding) go out of bounds: dropped.
    targets = jnp.where(meta.entry_seen > 0, tokens, logits.shape[1])
    return logits.at[rows, targets].set(x, mode="drop")


def argmax(logits, chunk: int = 128):
    """jnp.argmax(logits, axis=-1) as i32[S] for f32[S, V]: the first index on ties (a row with
    NaN gets some index below V: XLA:CPU's max reduction may skip NaN).

    Two levels: the largest value of each `chunk`-wide slice, the first slice holding the row's
    largest, then the argmax within that slice. XLA:CPU lowers a vocabulary-wide argmax to a
    scalar (value, index) reduction: 7.8 ms for 64 x 49152, against 0.27 ms this way.
    """
    num_rows, vocab = logits.shape
    pad = -vocab % chunk
    if pad:
        logits = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    slices = logits.reshape(num_rows, -1, chunk)
    best_slice = jnp.argmax(jnp.max(slices, axis=-1), axis=-1)
    within = jnp.take_along_axis(slices, best_slice[:, None, None], axis=1)[:, 0]
    return (best_slice * chunk + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def sample(logits, meta: SamplingMetadata, token_bitmask=None, max_logprobs: int = MAX_LOGPROBS,
           kernels: SamplingKernels = SamplingKernels(), logprobs_mode: str = LOGPROBS_MODES[0]) -> SamplerOutput:
    """Samples one token per row. logits: f32[num_seqs, vocab_size].

    token_bitmask: None, or i32[num_seqs, cdiv(vocab_size, 32)] of allowed tokens (structured
    outputs, allowed_token_ids, bad_words), applied before everything else (to the raw logprobs
    only in rows with meta.mask_raw). max_logprobs (static): the width of the
    top-logprobs outputs (capped at the vocabulary). kernels: the sampler's vocabulary-wide work
    (`SamplingKernels`). logprobs_mode (static): one of `LOGPROBS_MODES` (module docstring).
    The branches only return per-row values, so an all-greedy batch without logprobs costs one
    argmax (vocabulary-sized arrays never pass through a cond).
    """
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    num_seqs, vocab = logits.shape
    raw = logits.astype(jnp.float32)
    masked = raw
    if token_bitmask is not None:
        masked = apply_token_bitmask(raw, token_bitmask)
        raw = jnp.where(meta.mask_raw[:, None] != 0, masked, raw)  # a grammar's mask: the logprobs see it
    logits = apply_adjustments(masked, meta)
    greedy = meta.temperature <= 0.0
    greedy_ids = argmax(logits)

    def sampled_ids(logits):
        drawn = kernels.sample_tokens(logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p, meta.seeds,
                                      meta.output_index)
        return jnp.where(greedy, greedy_ids, drawn)

    token_ids = jax.lax.cond(jnp.all(greedy), lambda _: greedy_ids, sampled_ids, logits)
    top = min(max_logprobs, vocab)
    wanted = meta.num_logprobs >= 0

    def with_logprobs(raw, logits, token_ids):
        scores = raw
        if logprobs_mode.startswith("processed"):
            scores = reference.processed_logits(logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p,
                                                kernels.apply_top_k_top_p)
        normalize = logprobs_mode.endswith("logprobs")
        chosen, ranks, top_logprobs, top_ids = kernels.logprob_outputs(scores, token_ids, wanted, top,
                                                                       normalize=normalize)
        entries = scores[meta.entry_rows, meta.entry_token_ids]
        if normalize:  # a row's log-normalizer, from its sampled token: score - logprob
            log_norm = scores[jnp.arange(num_seqs), token_ids] - chosen
            entries = entries - log_norm[meta.entry_rows]
        return chosen, ranks, top_logprobs, top_ids, entries

    def no_logprobs(raw, logits, token_ids):
        return (jnp.zeros(num_seqs, jnp.float32), jnp.zeros(num_seqs, jnp.int32),
                jnp.zeros((num_seqs, top), jnp.float32), jnp.zeros((num_seqs, top), jnp.int32),
                jnp.zeros(meta.entry_rows.shape, jnp.float32))

    chosen, ranks, top_logprobs, top_ids, entry_logprobs = jax.lax.cond(
        jnp.any(wanted), with_logprobs, no_logprobs, raw, logits, token_ids)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen, ranks=ranks, top_logprobs=top_logprobs,
                         top_token_ids=top_ids, entry_logprobs=entry_logprobs)
