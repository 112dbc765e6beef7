"""Vectorized on-device sampling: one row per sequence, per-row parameters as arrays.

Order (vLLM's): logit_bias and min_tokens masks, then presence/frequency/repetition penalties;
greedy rows take the argmax of that. Sampled rows are divided by their temperature, masked by
min_p, then top_k and top_p, and drawn at a uniform keyed only on (request seed, output index),
so a seeded request samples the same tokens in any batch (`pallas_kernels.reference.sample_tokens`,
or the C++ kernel of the same contract on CPU). Logprobs are log_softmax of these processed
logits (greedy rows: temperature 1, no masks).
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

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


class SamplingKernels(NamedTuple):
    """The sampler's vocabulary-wide work, as `pallas_kernels.reference` defines it: the draw of
    the sampled rows (`sample_tokens`) and the top_k / top_p mask of their logprobs
    (`apply_top_k_top_p`); the defaults are the references, `pallas_kernels.cpu` has both."""

    sample_tokens: Callable = reference.sample_tokens
    apply_top_k_top_p: Callable = reference.apply_top_k_top_p


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


def logprob_outputs(logits, token_ids, num_top: int):
    """log_softmax of f32[S, V] logits: the given tokens' logprobs f32[S] and 1-based ranks i32[S],
    and the top `num_top` logprobs f32[S, num_top] with their ids i32[S, num_top]."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(axis=-1).astype(jnp.int32) + 1
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    return chosen, ranks, top_logprobs, top_ids.astype(jnp.int32)


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
           kernels: SamplingKernels = SamplingKernels()) -> SamplerOutput:
    """Samples one token per row. logits: f32[num_seqs, vocab_size].

    token_bitmask: None, or i32[num_seqs, cdiv(vocab_size, 32)] of allowed tokens (structured
    outputs), applied before everything else. max_logprobs (static): the width of the
    top-logprobs outputs (capped at the vocabulary). kernels: the draw and the top_k / top_p mask
    (`SamplingKernels`). The branches only return per-row values, so an all-greedy batch without
    logprobs costs one argmax (vocabulary-sized arrays never pass through a cond).
    """
    num_seqs, vocab = logits.shape
    logits = logits.astype(jnp.float32)
    if token_bitmask is not None:
        logits = apply_token_bitmask(logits, token_bitmask)
    logits = apply_adjustments(logits, meta)
    greedy = meta.temperature <= 0.0
    greedy_ids = argmax(logits)

    def sampled_ids(logits):
        drawn = kernels.sample_tokens(logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p, meta.seeds,
                                      meta.output_index)
        return jnp.where(greedy, greedy_ids, drawn)

    token_ids = jax.lax.cond(jnp.all(greedy), lambda _: greedy_ids, sampled_ids, logits)
    top = min(max_logprobs, vocab)

    def with_logprobs(logits, token_ids):
        processed = reference.processed_logits(logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p,
                                               kernels.apply_top_k_top_p)
        return logprob_outputs(processed, token_ids, top)

    def no_logprobs(logits, token_ids):
        return (jnp.zeros(num_seqs, jnp.float32), jnp.zeros(num_seqs, jnp.int32),
                jnp.zeros((num_seqs, top), jnp.float32), jnp.zeros((num_seqs, top), jnp.int32))

    chosen, ranks, top_logprobs, top_ids = jax.lax.cond(
        jnp.any(meta.num_logprobs >= 0), with_logprobs, no_logprobs, logits, token_ids)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen, ranks=ranks,
                         top_logprobs=top_logprobs, top_token_ids=top_ids)
