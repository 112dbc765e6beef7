"""The engine with --attention-backend cpu: greedy outputs equal the reference backend's."""

import jax
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from pallas_kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"no CPU kernel: {cpu.load_error()}")

ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
                     num_gpu_blocks_override=40, compilation_cache_dir="", seed=0)


def greedy_tokens(llm, prompts):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_cpu_backend_equals_reference(tiny_model_dir):
    """Chunked prefills (prompts longer than the 32-token step) mixed with decodes."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in (3, 17, 45, 70, 9)]
    tokens = {}
    for backend in ("cpu", "reference"):
        llm = LLM(str(tiny_model_dir), attention_backend=backend, **ENGINE_KWARGS)
        # Sharper weights: logits vary more, so greedy paths are not decided by float noise.
        params = llm.llm_engine.runner.params
        llm.update_weights(jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params))
        tokens[backend] = greedy_tokens(llm, prompts)
    assert tokens["cpu"] == tokens["reference"]
    assert all(len(t) == 12 for t in tokens["cpu"])
