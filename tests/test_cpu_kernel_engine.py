"""The engine with --attention-backend cpu: greedy outputs equal the reference backend's."""

import jax
import numpy as np
import pytest

from jpaged import LLM, SamplingParams, cpu_features
from jpaged.models.quantization import PackedWeight
from pallas_kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"no CPU kernel: {cpu.load_error()}")

ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
                     num_gpu_blocks_override=40, compilation_cache_dir="", seed=0)


def greedy_tokens(llm, prompts):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def packed_weights(runner):
    leaves = jax.tree.leaves(runner.params, is_leaf=lambda x: isinstance(x, PackedWeight))
    return [w for w in leaves if isinstance(w, PackedWeight)]


def test_greedy_cpu_backend_equals_reference(tiny_model_dir):
    """Chunked prefills (prompts longer than the 32-token step) mixed with decodes. The cpu
    backend also runs every linear and the tied lm_head through the packed matmul kernel; the
    reference backend keeps XLA's dots over the loaded [in, out] weights."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in (3, 17, 45, 70, 9)]
    reference = LLM(str(tiny_model_dir), attention_backend="reference", **ENGINE_KWARGS)
    assert packed_weights(reference.llm_engine.runner) == []
    # Sharper weights: logits vary more, so greedy paths are not decided by float noise. Both
    # engines take the same loaded-layout tree; the cpu one packs it.
    sharp = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, reference.llm_engine.runner.params)
    reference.update_weights(sharp)
    llm = LLM(str(tiny_model_dir), attention_backend="cpu", **ENGINE_KWARGS)
    llm.update_weights(sharp)
    runner = llm.llm_engine.runner
    config = runner.model_config
    assert len(packed_weights(runner)) == 7 * config.num_layers + 1  # + the tied lm_head's copy
    assert "lm_head" not in sharp and runner.params["lm_head"].shape == (config.hidden_size, config.vocab_size)
    tokens = greedy_tokens(llm, prompts)
    assert tokens == greedy_tokens(reference, prompts)
    assert all(len(t) == 12 for t in tokens)
    # A transformed copy of the packed params is accepted too, and leaves nothing unpacked.
    llm.update_weights(jax.tree.map(lambda x: x * 1.0, runner.params))
    assert len(packed_weights(llm.llm_engine.runner)) == 7 * config.num_layers + 1
    assert greedy_tokens(llm, prompts) == tokens


def test_bfloat16_linears_packed_and_close_to_reference(tiny_model_dir, monkeypatch):
    """--dtype bfloat16: the cpu backend packs the bf16 linears (pairs of rows for AVX512-BF16)
    and the tied lm_head. Both backends accumulate in float32 and round each linear's output to
    bfloat16; only the order of the float32 additions differs, so each prompt's first-step logits
    agree to bf16 rounding and the greedy paths agree where the logits are decided. The engine
    is told the CPU has AVX512-BF16, so it keeps bf16 on any CPU (it would fall back to float32
    without; the kernel then widens the pairs in registers)."""
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in (5, 40, 66)]
    kwargs = dict(ENGINE_KWARGS, dtype="bfloat16")
    reference = LLM(str(tiny_model_dir), attention_backend="reference", **kwargs)
    sharp = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, reference.llm_engine.runner.params)
    reference.update_weights(sharp)
    llm = LLM(str(tiny_model_dir), attention_backend="cpu", **kwargs)
    llm.update_weights(sharp)
    runner = llm.llm_engine.runner
    packed = packed_weights(runner)
    assert len(packed) == 7 * runner.model_config.num_layers + 1
    assert {str(w.panels.dtype) for w in packed} == {"bfloat16"}
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    [got, want] = [[o.outputs[0] for o in engine.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]
                   for engine in (llm, reference)]
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        top_got, top_want = g.logprobs[0], w.logprobs[0]
        for token in set(top_got) & set(top_want):
            assert abs(top_got[token].logprob - top_want[token].logprob) < 0.1



@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_a_requests_logits_do_not_depend_on_its_batch(smollm2_path, enable_prefix_caching):
    """Batch invariance, on the bundled model: each request's raw logits are bit-identical alone
    and in batches (two orders), where its prompt is chunked at other places, its decodes share
    steps with other prompts, and a context passes the attention kernel's 512-token split of
    decode keys. Alone, the 65-token prompt would end in a 1-token chunk without the scheduler's
    rule (`chunk_length`), and the 600-token one decodes in a batch of one, where a split chosen
    by the batch size would differ. With prefix caching the batches find every prompt's full
    blocks cached by the runs alone: the 17- and 65-token prompts would then compute their last
    token alone without the block manager's rule. (XLA's own fusions keep a row's bits across
    buckets for this model's hidden size, not for every size: the tiny test model's RMSNorm over
    64 does not.)"""
    llm = LLM(smollm2_path, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=64,
              enable_prefix_caching=enable_prefix_caching, logprobs_mode="raw_logits",
              compilation_cache_dir="", seed=0)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, 40000, size=n).tolist() for n in (1, 3, 17, 65, 130, 600)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)

    def logits(batch):
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        return [[(t, lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                for o in outputs]

    alone = [logits([p])[0] for p in prompts]
    assert logits(prompts) == alone
    assert logits(prompts[::-1]) == alone[::-1]
