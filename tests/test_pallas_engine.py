"""The whole engine through the Pallas kernels in interpret mode: greedy tokens equal the dense
oracle's with chunked prefill, prefix-cache hits and preemption, and decode-only steps run the
decode kernel's programs. This is the engine's GPU code path (the same jitted steps, buckets and
pool), proved on CPU; only the Pallas lowering differs (interpreter instead of Triton)."""

import functools

import pytest

from jpaged import LLM, SamplingParams
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from test_engine import ENGINE_KWARGS, assert_pool_free, dense_greedy, mixed_prompts, sharpened

MAX_TOKENS = 16  # with this workload, what overfills the 16-block pool


class RecordingDict(dict):
    """The runner's compiled-forward table, recording which keys the steps looked up."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used = []

    def __getitem__(self, key):
        self.used.append(key)
        return super().__getitem__(key)


@pytest.fixture
def pallas_interpret(monkeypatch):
    """Makes the runner pick the pallas backend on CPU, with both kernels in interpret mode."""
    ragged = functools.partial(ragged_paged_attention, interpret=True)
    decode = functools.partial(decode_attention, interpret=True)
    monkeypatch.setattr("jpaged.runner.select_attention", lambda backend, platform: ("pallas", ragged))
    monkeypatch.setattr("jpaged.runner.decode_only_attention",
                        lambda backend: decode if backend == "pallas" else None)


def test_engine_through_pallas_kernels_matches_dense(tiny_model_dir, pallas_interpret):
    llm = LLM(str(tiny_model_dir), **ENGINE_KWARGS)
    engine = llm.llm_engine
    runner = engine.runner
    decode_keys = {key for key in runner._forward if key[3]}
    # One table width (the kernels read real lengths); decode programs for the buckets that can
    # hold max_num_seqs=8 one-token sequences: only the 16-token bucket.
    assert decode_keys == {(16, 8, 8, True)}
    assert {key for key in runner._forward if not key[3]} == {(16, 8, 8, False), (32, 8, 8, False)}
    llm.update_weights(sharpened(runner.params, 3.0))
    runner._forward = RecordingDict(runner._forward)

    prompts = mixed_prompts()
    before = engine.get_stats()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    after = engine.get_stats()
    expect = dense_greedy(runner.params, engine.model_config, prompts, MAX_TOKENS, 128)
    assert [o.outputs[0].token_ids for o in outputs] == expect
    assert after.num_preemptions > before.num_preemptions, "the workload must force preemption"
    assert after.prefix_cache_hits > before.prefix_cache_hits, "the workload must hit the prefix cache"
    assert len({tuple(w) for w in expect}) > 3, "the oracle's outputs should differ between prompts"
    used = set(runner._forward.used)
    assert (16, 8, 8, True) in used, "decode-only steps must run the decode kernel's program"
    assert any(not key[3] for key in used), "mixed steps must run the ragged kernel's program"
    assert_pool_free(llm)
