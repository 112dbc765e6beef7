"""The docs/models.md contract: a user's own Flax model of the Llama family, with its own module
structure and params layout, served by LLM(flax_model=..., params=...). Its greedy tokens match
the built-in model's on the same weights, and its logical axes drive the param shardings."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jpaged import LLM, SamplingParams
from jpaged.models import llama
from jpaged.models.config import ModelConfig, rope_inv_freq
from jpaged.sharding import logical_specs


def _dense(features, axes, name):
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    return nn.Dense(features, use_bias=False, kernel_init=init, name=name)


def _rope(x, positions, inv_freq):
    angles = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, head_dim // 2]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * jnp.cos(angles) - x2 * jnp.sin(angles),
                            x2 * jnp.cos(angles) + x1 * jnp.sin(angles)], axis=-1)


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, pages, attn_meta, attention_fn, write_kv_fn):
        c = self.config
        norm = lambda name: nn.RMSNorm(epsilon=c.rms_norm_eps, name=name,  # noqa: E731
                                       scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))
        h = norm("attn_norm")(x)
        inv_freq = jnp.asarray(rope_inv_freq(c), jnp.float32)
        q = _rope(_dense(c.num_q_heads * c.head_dim, ("embed", "heads"), "wq")(h).reshape(len(x), -1, c.head_dim),
                  positions, inv_freq)
        k = _rope(_dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "wk")(h).reshape(len(x), -1, c.head_dim),
                  positions, inv_freq)
        v = _dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "wv")(h).reshape(len(x), -1, c.head_dim)
        k_pages, v_pages = write_kv_fn(*pages, k, v, attn_meta.slot_mapping)
        attn = attention_fn(q, k_pages, v_pages, attn_meta.kv_lens, attn_meta.block_tables, attn_meta.cu_q_lens,
                            sm_scale=c.head_dim**-0.5, sliding_window=None, soft_cap=None)
        x = x + _dense(c.hidden_size, ("heads", "embed"), "wo")(attn.reshape(len(x), -1))
        h = norm("mlp_norm")(x)
        gate = _dense(c.intermediate_size, ("embed", "mlp"), "w_gate")(h)
        up = _dense(c.intermediate_size, ("embed", "mlp"), "w_up")(h)
        return x + _dense(c.hidden_size, ("mlp", "embed"), "w_down")(nn.silu(gate) * up), (k_pages, v_pages)


class UserLlama(nn.Module):
    """A tied-embedding Llama written the usual Flax way (nn.Embed, nn.Dense, nn.RMSNorm)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedder = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")))
        self.blocks = [Block(c) for _ in range(c.num_layers)]
        self.final_norm = nn.RMSNorm(epsilon=c.rms_norm_eps)

    def __call__(self, token_ids, positions, kv_cache, attn_meta, attention_fn, write_kv_fn):
        x = self.embedder(token_ids)
        new_cache = []
        for block, pages in zip(self.blocks, kv_cache):
            x, pages = block(x, positions, pages, attn_meta, attention_fn, write_kv_fn)
            new_cache.append(pages)
        return self.final_norm(x), new_cache

    def compute_logits(self, hidden):
        return self.embedder.attend(hidden).astype(jnp.float32)


def to_user_params(params):
    """jpaged's params layout -> UserLlama's."""
    names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w_gate": "gate_proj",
             "w_up": "up_proj", "w_down": "down_proj"}
    blocks = {f"blocks_{i}": {"attn_norm": {"scale": layer["input_norm"]},
                              "mlp_norm": {"scale": layer["post_attention_norm"]},
                              **{ours: {"kernel": layer[theirs]} for ours, theirs in names.items()}}
              for i, layer in enumerate(params["layers"])}
    return {"embedder": {"embedding": params["embed"]}, "final_norm": {"scale": params["final_norm"]}, **blocks}


@pytest.mark.slow
def test_user_flax_model_matches_the_builtin_model(tiny_model_dir):
    config = ModelConfig.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()), dtype="float32")
    params = jax.tree.map_with_path(lambda p, x: x if "norm" in jax.tree_util.keystr(p) else x * 4,
                                    llama.init_params(config, jax.random.key(0)))  # sharp: far from ties
    user = UserLlama(config)
    specs = logical_specs(user)
    assert specs["blocks_0"]["wq"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
    assert specs["embedder"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")

    prompts = [[1, 5, 9, 200, 17, 4000, 31, 8], [1, 42, 43, 44, 45]]
    sampling = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine_args = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=16,
                       enforce_eager=True, compilation_cache_dir="")
    theirs = LLM(str(tiny_model_dir), flax_model=user, params=to_user_params(params), **engine_args)
    ours = LLM(str(tiny_model_dir), flax_model=llama.LlamaForCausalLM(config), params=params, **engine_args)
    got = [o.outputs[0].token_ids for o in theirs.generate(prompts, sampling, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in ours.generate(prompts, sampling, use_tqdm=False)]
    assert got == want and len({t for tokens in want for t in tokens}) > 3


def test_flax_model_needs_its_params(tiny_model_dir):
    with pytest.raises(ValueError, match="flax_model and params together"):
        LLM(str(tiny_model_dir), flax_model=UserLlama(ModelConfig.from_hf_config(
            json.loads((tiny_model_dir / "config.json").read_text()), dtype="float32")))
