"""Per-step device inputs: packed on the host into one int32 array each, unpacked inside jit.

A step makes two host->device transfers: the forward blob (token ids, positions, attention
metadata, logits indices; its size depends only on the step's (num_tokens, num_seqs,
pages_per_seq) bucket) and the sampling blob (per-request sampling arrays and logit-adjustment
entries; its size depends only on (num_seqs, num_entries), so the sampler compiles
independently of the forward).
Float fields travel bit-cast to int32.
"""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models.attention_metadata import AttentionMetadata

# An unsampled (padded) row's temperature: greedy.
_GREEDY = 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """The forward's inputs for one step, padded to its bucket (only the bucket sizes are static)."""

    token_ids: jax.Array  # i32[num_tokens]
    positions: jax.Array  # i32[num_tokens]
    attn: AttentionMetadata
    # i32[num_seqs]: the packed rows whose logits are sampled, in increasing order, then padding 0s:
    # each sequence's last token and, before it, its pending token and drafts but the last
    # (ScheduledRequest.num_sample_rows rows per sequence; at most num_seqs in all)
    logits_indices: jax.Array
    lora_slots: jax.Array  # i32[num_tokens]: each token's LoRA adapter slot (0: none; jpaged/lora.py)

    @staticmethod
    def blob_size(num_tokens: int, num_seqs: int, pages_per_seq: int) -> int:
        return 4 * num_tokens + num_seqs * pages_per_seq + 3 * num_seqs + 2

    def num_logits_rows(self) -> jax.Array:
        """i32[]: how many logits_indices are real (they increase; the padding after them is 0)."""
        return 1 + jnp.sum(jnp.diff(self.logits_indices) > 0, dtype=jnp.int32)

    @classmethod
    def unpack(cls, blob, num_tokens: int, num_seqs: int, pages_per_seq: int) -> "StepMetadata":
        """Splits the forward blob (i32[blob_size]) inside jit."""
        t, s, p = num_tokens, num_seqs, pages_per_seq
        sizes = [t, t, t, s * p, s, s + 1, s, 1, t]
        parts = jnp.split(blob, np.cumsum(sizes)[:-1].tolist())
        (token_ids, positions, slot_mapping, tables, kv_lens, cu_q_lens, logits_indices, num_decode_tokens,
         lora_slots) = parts
        attn = AttentionMetadata(slot_mapping=slot_mapping, block_tables=tables.reshape(s, p),
                                 kv_lens=kv_lens, cu_q_lens=cu_q_lens, num_decode_tokens=num_decode_tokens[0])
        return cls(token_ids=token_ids, positions=positions, attn=attn, logits_indices=logits_indices,
                   lora_slots=lora_slots)


def pack_step(scheduled, num_tokens: int, num_seqs: int, pages_per_seq: int, block_size: int,
              lora_slots: list[int] | None = None) -> np.ndarray:
    """Packs the scheduled requests (jpaged.engine ScheduledRequest list) into the forward blob.
    lora_slots: None, or each scheduled request's LoRA slot (0: none)."""
    t, s, p = num_tokens, num_seqs, pages_per_seq
    blob = np.zeros(StepMetadata.blob_size(t, s, p), np.int32)
    token_ids = blob[0:t]
    positions = blob[t:2 * t]
    slot_mapping = blob[2 * t:3 * t]  # padding: slot 0 of the null block
    tables = blob[3 * t:3 * t + s * p].reshape(s, p)
    off = 3 * t + s * p
    kv_lens = blob[off:off + s]
    cu_q_lens = blob[off + s:off + 2 * s + 1]
    logits_indices = blob[off + 2 * s + 1:off + 3 * s + 1]
    num_decode_tokens = blob[off + 3 * s + 1:off + 3 * s + 2]
    token_lora_slots = blob[off + 3 * s + 2:]
    start = 0
    row = 0
    decodes_so_far = True
    for i, req in enumerate(scheduled):
        n = len(req.token_ids)
        end = start + n
        pos = np.arange(req.start_position, req.start_position + n, dtype=np.int32)
        table = np.asarray(req.block_table, np.int32)
        token_ids[start:end] = req.token_ids
        positions[start:end] = pos
        slot_mapping[start:end] = table[pos // block_size] * block_size + pos % block_size
        used = min(len(table), p)
        tables[i, :used] = table[:used]
        kv_lens[i] = req.start_position + n
        cu_q_lens[i + 1] = end
        logits_indices[row:row + req.num_sample_rows] = np.arange(end - req.num_sample_rows, end)
        row += req.num_sample_rows
        if lora_slots is not None:
            token_lora_slots[start:end] = lora_slots[i]
        decodes_so_far = decodes_so_far and req.is_decode
        if decodes_so_far:
            num_decode_tokens[0] = end
        start = end
    cu_q_lens[len(scheduled) + 1:] = start  # padded sequences: q_len 0
    return blob


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Per-row sampling parameters for one step (rows = the step's sequences, padded).

    Penalties and additive biases travel as one flat list of (row, token) entries whose length
    comes from a small bucket set, so every sampler program exists before the first request.
    """

    temperature: jax.Array  # f32[num_seqs]: 0 = greedy
    top_k: jax.Array  # i32[num_seqs]: 0 = off
    top_p: jax.Array  # f32[num_seqs]
    min_p: jax.Array  # f32[num_seqs]
    presence_penalty: jax.Array  # f32[num_seqs]
    frequency_penalty: jax.Array  # f32[num_seqs]
    repetition_penalty: jax.Array  # f32[num_seqs]
    seeds: jax.Array  # i32[num_seqs]: the request's seed (bits of a uint32)
    output_index: jax.Array  # i32[num_seqs]: index of the token being sampled among the outputs
    num_logprobs: jax.Array  # i32[num_seqs]: top logprobs wanted (-1: none)
    # i32[num_seqs]: 1 = the token bitmask also masks the raw logits the logprobs come from (a
    # grammar); 0 = it masks only what is sampled (allowed_token_ids, bad_words), as in vLLM
    mask_raw: jax.Array
    # Logit adjustments (num_entries 0: none); padding entries are (row 0, token 0, all zero):
    entry_rows: jax.Array  # i32[num_entries]
    entry_token_ids: jax.Array  # i32[num_entries]
    entry_bias: jax.Array  # f32[num_entries]: added to the logit (logit_bias; -inf for min_tokens masks)
    entry_output_counts: jax.Array  # f32[num_entries]: occurrences among the row's outputs (penalties)
    entry_seen: jax.Array  # i32[num_entries]: 1 if in the row's prompt or outputs (repetition penalty)

    @staticmethod
    def blob_size(num_seqs: int, num_entries: int) -> int:
        return 11 * num_seqs + 5 * num_entries

    @classmethod
    def unpack(cls, blob, num_seqs: int, num_entries: int) -> "SamplingMetadata":
        s, e = num_seqs, num_entries
        parts = jnp.split(blob, np.cumsum([s] * 11 + [e] * 4).tolist())
        as_f32 = lambda x: jax.lax.bitcast_convert_type(x, jnp.float32)  # noqa: E731
        return cls(
            temperature=as_f32(parts[0]), top_k=parts[1], top_p=as_f32(parts[2]), min_p=as_f32(parts[3]),
            presence_penalty=as_f32(parts[4]), frequency_penalty=as_f32(parts[5]),
            repetition_penalty=as_f32(parts[6]), seeds=parts[7], output_index=parts[8],
            num_logprobs=parts[9], mask_raw=parts[10], entry_rows=parts[11], entry_token_ids=parts[12],
            entry_bias=as_f32(parts[13]), entry_output_counts=as_f32(parts[14]), entry_seen=parts[15])


def bias_entries(req, num_outputs: int | None = None) -> list[tuple[int, float]]:
    """(token id, additive value) pairs for a request's logit_bias and min_tokens masks, for the
    token sampled after num_outputs outputs (default: its outputs so far)."""
    params = req.sampling_params
    entries = list((params.logit_bias or {}).items())
    if (len(req.output_token_ids) if num_outputs is None else num_outputs) < params.min_tokens:
        banned = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            banned.update(req.eos_token_ids)
        entries.extend((tok, float("-inf")) for tok in sorted(banned))
    return entries


def logit_entries(req, drafts=()) -> list[tuple[int, float, int, int]]:
    """A request's sampler entries, (token id, bias, output count, seen): its logit_bias and
    min_tokens masks (bias only), then, with penalties, one per distinct prompt or output token
    (prompt-only tokens count 0: seen for the repetition penalty, not for the others), then one
    per logprob_token_ids token (all zero: the sampler only reads its logprob there, the last
    len(logprob_token_ids) entries of the row). drafts: outputs to count after the request's
    own (a draft's row samples as if they were kept)."""
    entries = [(tok, value, 0, 0) for tok, value in bias_entries(req, len(req.output_token_ids) + len(drafts))]
    if req.sampling_params.has_penalties:
        counts = collections.Counter(req.output_token_ids)
        counts.update(drafts)
        for tok in set(req.prompt_token_ids).difference(counts):
            counts[tok] = 0
        entries += [(tok, 0.0, n, 1) for tok, n in counts.items()]
    entries += [(tok, 0.0, 0, 0) for tok in req.sampling_params.logprob_token_ids or ()]
    return entries


def row_entries(req) -> list[list[tuple[int, float, int, int]]]:
    """`logit_entries` for each of a scheduled request's sampled rows: after its pending token,
    then after each draft (counting the drafts before it as outputs)."""
    drafts = req.draft_token_ids
    return [logit_entries(req, drafts[:j]) for j in range(req.num_sample_rows)]


def pack_sampling(scheduled, seeds: list[int], num_seqs: int, num_entries: int, entries) -> np.ndarray:
    """Packs the sampling blob, one row per sampled row (ScheduledRequest.num_sample_rows per
    request: a draft's row samples the output index after the previous row's). `seeds[i]` is
    the resolved seed of scheduled[i]; `entries[row]` the `logit_entries` of each sampled row in
    order (`row_entries` per request; one row each without drafts), their total at most num_entries."""
    s, e = num_seqs, num_entries
    blob = np.zeros(SamplingMetadata.blob_size(s, e), np.int32)
    cols = blob[:11 * s].reshape(11, s)
    floats = cols.view(np.float32)
    floats[0] = _GREEDY
    floats[2] = 1.0  # top_p
    floats[6] = 1.0  # repetition_penalty
    cols[9] = -1  # num_logprobs
    packed = blob[11 * s:].reshape(5, e)
    packed_floats = packed.view(np.float32)
    k = 0
    row = 0
    for i, req in enumerate(scheduled):
        params = req.sampling_params
        rows = slice(row, row + req.num_sample_rows)
        floats[0, rows] = params.temperature if params.temperature >= 1e-5 else _GREEDY
        cols[1, rows] = min(max(params.top_k, 0), np.iinfo(np.int32).max)  # any k >= vocab means off
        floats[2, rows] = params.top_p
        floats[3, rows] = params.min_p
        floats[4, rows] = params.presence_penalty
        floats[5, rows] = params.frequency_penalty
        floats[6, rows] = params.repetition_penalty
        cols[7, rows] = np.uint32(seeds[i] & 0xFFFFFFFF).view(np.int32)
        cols[8, rows] = np.arange(len(req.output_token_ids), len(req.output_token_ids) + req.num_sample_rows)
        cols[9, rows] = -1 if params.num_logprobs is None else params.logprobs or 0  # the top-k count
        cols[10, rows] = params.structured_outputs is not None
        for _ in range(req.num_sample_rows):
            if entries[row]:
                tokens, bias, counts, seen = zip(*entries[row])
                end = k + len(tokens)
                packed[0, k:end] = row
                packed[1, k:end] = tokens
                packed_floats[2, k:end] = bias
                packed_floats[3, k:end] = counts
                packed[4, k:end] = seen
                k = end
            row += 1
    return blob
