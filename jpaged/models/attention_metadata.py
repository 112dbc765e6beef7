"""The per-step attention metadata the model's paged attention reads (arrays only, no requests)."""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens live in the KV pool. All int32, padded to the step's buckets.

    num_tokens, num_seqs and pages_per_seq are bucket sizes, not real counts: padded tokens write
    to the null block 0 and padded sequences have q_len 0 and kv_len 0.
    """

    slot_mapping: jax.Array  # i32[num_tokens]: block_id * block_size + offset of each new token
    block_tables: jax.Array  # i32[num_seqs, pages_per_seq]: padded with 0
    kv_lens: jax.Array  # i32[num_seqs]: context length after this step's tokens
    cu_q_lens: jax.Array  # i32[num_seqs + 1]: cumulative new-token counts
    # i32[]: the first num_decode_tokens tokens are decode tokens (sequences whose new tokens are
    # all generated ones, packed first); None: unknown. Linears may choose their kernel's path by
    # it (`quantization.linear`'s num_decode_rows), never their math.
    num_decode_tokens: jax.Array | None = None
