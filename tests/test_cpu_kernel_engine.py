"""The engine with --attention-backend cpu: greedy outputs equal the reference backend's."""

import jax
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
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
