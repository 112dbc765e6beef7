"""The forward blob: what pack_step writes is what StepMetadata.unpack reads inside jit."""

import jax
import numpy as np

from jpaged.engine.scheduler_output import ScheduledRequest
from jpaged.sampling_params import SamplingParams
from jpaged.step_metadata import StepMetadata, pack_step

BLOCK_SIZE = 4


def _request(request_id, prompt, outputs, start, num_new, block_table):
    tokens = prompt + outputs
    return ScheduledRequest(request_id=request_id, token_ids=tokens[start:start + num_new], start_position=start,
                            block_table=block_table, sample=start + num_new == len(tokens),
                            sampling_params=SamplingParams(), prompt_token_ids=prompt, output_token_ids=outputs,
                            eos_token_ids=())


def test_pack_step_round_trips_and_counts_the_leading_decode_tokens():
    """Two decodes (their new token a generated one), a prompt chunk, and a prompt's last token
    alone (one token, sampled, but a prompt token: not a decode). Only the first two rows are
    decode rows; padding follows the real tokens."""
    scheduled = [
        _request("a", [1, 2, 3], [4, 5], 4, 1, [7, 8]),
        _request("b", [6] * 6, [9], 6, 1, [2, 3]),
        _request("c", list(range(10, 20)), [], 4, 5, [4, 5, 6]),
        _request("d", [21, 22, 23], [], 2, 1, [1]),
    ]
    assert [r.is_decode for r in scheduled] == [True, True, False, False]
    t, s, p = 16, 8, 4
    blob = pack_step(scheduled, t, s, p, BLOCK_SIZE, lora_slots=[2, 0, 1, 3])
    assert blob.shape == (StepMetadata.blob_size(t, s, p),)
    meta = jax.jit(StepMetadata.unpack, static_argnums=(1, 2, 3))(blob, t, s, p)
    np.testing.assert_array_equal(meta.token_ids[:8], [5, 9, 14, 15, 16, 17, 18, 23])
    np.testing.assert_array_equal(meta.positions[:8], [4, 6, 4, 5, 6, 7, 8, 2])
    np.testing.assert_array_equal(meta.attn.slot_mapping[:3], [8 * 4 + 0, 3 * 4 + 2, 5 * 4 + 0])
    np.testing.assert_array_equal(meta.attn.cu_q_lens, [0, 1, 2, 7, 8, 8, 8, 8, 8])
    np.testing.assert_array_equal(meta.attn.kv_lens[:4], [5, 7, 9, 3])
    np.testing.assert_array_equal(meta.logits_indices[:4], [0, 1, 6, 7])
    assert int(meta.attn.num_decode_tokens) == 2
    np.testing.assert_array_equal(meta.lora_slots, [2, 0, 1, 1, 1, 1, 1, 3] + [0] * 8)  # each token its request's
    prefill_first = pack_step(scheduled[2:] + scheduled[:2], t, s, p, BLOCK_SIZE)
    assert int(StepMetadata.unpack(prefill_first, t, s, p).attn.num_decode_tokens) == 0
