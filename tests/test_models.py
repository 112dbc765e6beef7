"""The functional decoder against transformers' torch implementation, and paged vs dense."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.loaders.hf_names import params_to_hf_state_dict
from jpaged.models import llama
from jpaged.models.attention_metadata import AttentionMetadata
from jpaged.models.config import ModelConfig
from pallas_kernels.reference import get_kv_cache_shape, ragged_paged_attention

VOCAB = 96
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
# model_type -> extra HF config fields: each exercises one architecture feature.
ARCHITECTURES = {
    "llama3_rope_scaling": (
        "llama",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "smollm2_tied": ("llama", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral_sliding_window": ("mistral", "MistralForCausalLM", dict(sliding_window=7)),
    "qwen2_qkv_bias": ("qwen2", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    "qwen3_qk_norm": ("qwen3", "Qwen3ForCausalLM", dict(head_dim=32, num_key_value_heads=4)),
    # Gemma: (1 + w) norms, scaled embeddings, the tanh GELU, tied lm_head by default.
    "gemma": ("gemma", "GemmaForCausalLM", dict(hidden_act="gelu", tie_word_embeddings=None)),
    # Gemma 2: sandwich norms, query_pre_attn_scalar, soft-capped scores and logits, every other
    # layer windowed (3 layers: windowed, full, windowed).
    "gemma2_softcap_alternating_window": ("gemma2", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=6)),
    # Gemma 3: q/k norms, five windowed layers in six with their own RoPE base, linear scaling on the
    # full layers (layer_types given, transformers 4's rope fields).
    "gemma3_local_rope": ("gemma3_text", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=5, rope_theta=1000.0, rope_local_base_freq=20.0,
        rope_scaling=dict(rope_type="linear", factor=4.0), query_pre_attn_scalar=16)),
}
SEQ_LENS = (29, 11, 18)  # off block boundaries
BLOCK_SIZE = 4


def _hf_config(name):
    """(model_type, config.json fields); an extra field set to None is left out of the file."""
    model_type, architecture, extra = ARCHITECTURES[name]
    fields = {k: v for k, v in {**TINY, **extra}.items() if v is not None}
    return model_type, {**fields, "architectures": [architecture]}


def _random_params(config, seed):
    """Random params with larger weights than init_params so logits are O(1) and errors show."""
    params = llama.init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    scale = lambda path, x: x if "norm" in str(path[-1]) else x * 6.0 + rng.normal(0, 0.01, x.shape)
    if config.norm_unit_offset:  # Gemma's norms scale by 1 + w: spread w too
        scale = lambda path, x: x * 3.0 if "norm" in str(path[-1]) else x * 6.0 + rng.normal(0, 0.01, x.shape)
    return jax.tree.map_with_path(lambda p, x: jnp.asarray(scale(p, np.asarray(x)), jnp.float32), params)


def _hf_logits(model_type, hf_config, params, token_ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in hf_config.items() if k != "architectures"}
    hf_cfg = transformers.AutoConfig.for_model(model_type, **fields)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in params_to_hf_state_dict(params).items()}
    if hf_cfg.tie_word_embeddings:  # the module has the (tied) parameter under both names
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(token_ids))).logits.numpy()


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(4,))
def _paged_step(params, config, token_ids, positions, kv_cache, attn_meta):
    hidden, kv_cache = llama.forward(
        params, config, token_ids, positions, kv_cache, attn_meta, ragged_paged_attention
    )
    return llama.compute_logits(params, config, hidden), kv_cache


def _paged_logits(params, config, sequences, steps, seed):
    """Runs `steps` (per step, new-token counts per sequence) through the paged forward.

    The pool starts NaN-filled, block tables are a random permutation of the blocks, and each step
    is padded to 32 tokens and len(sequences) + 1 sequences. Returns per-sequence f32[len, vocab].
    """
    rng = np.random.default_rng(seed)
    pages_per_seq = max(-(-len(s) // BLOCK_SIZE) for s in sequences) + 1
    num_blocks = 1 + pages_per_seq * len(sequences)
    free = iter(rng.permutation(np.arange(1, num_blocks)))
    tables = np.zeros((len(sequences) + 1, pages_per_seq), np.int32)
    for s, seq in enumerate(sequences):
        tables[s, : -(-len(seq) // BLOCK_SIZE)] = [next(free) for _ in range(-(-len(seq) // BLOCK_SIZE))]
    shape = get_kv_cache_shape(num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    kv_cache = [(jnp.full(shape, jnp.nan), jnp.full(shape, jnp.nan)) for _ in range(config.num_layers)]
    computed = [0] * len(sequences)
    rows = [[] for _ in sequences]
    num_tokens = 32
    for step in steps:
        token_ids = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slots = np.zeros(num_tokens, np.int32)  # padding writes the null block 0
        cu_q_lens = np.zeros(len(sequences) + 2, np.int32)
        kv_lens = np.zeros(len(sequences) + 1, np.int32)
        start = 0
        for s, n_new in enumerate(step):
            pos = np.arange(computed[s], computed[s] + n_new)
            token_ids[start : start + n_new] = sequences[s][pos]
            positions[start : start + n_new] = pos
            slots[start : start + n_new] = tables[s, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            computed[s] += n_new
            kv_lens[s] = computed[s]
            cu_q_lens[s + 1] = start + n_new
            start += n_new
        cu_q_lens[len(step) + 1 :] = start
        meta = AttentionMetadata(
            slot_mapping=jnp.asarray(slots),
            block_tables=jnp.asarray(tables),
            kv_lens=jnp.asarray(kv_lens),
            cu_q_lens=jnp.asarray(cu_q_lens),
        )
        logits, kv_cache = _paged_step(
            params, config, jnp.asarray(token_ids), jnp.asarray(positions), kv_cache, meta
        )
        logits = np.asarray(logits)
        for s, n_new in enumerate(step):
            rows[s].append(logits[cu_q_lens[s] : cu_q_lens[s + 1]])
    assert computed == [len(s) for s in sequences]
    return [np.concatenate(r) for r in rows]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_match_transformers_dense_and_paged(name):
    model_type, hf_config = _hf_config(name)
    config = ModelConfig.from_hf_config(hf_config, dtype="float32")
    params = _random_params(config, seed=len(name))
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, VOCAB, n).astype(np.int32) for n in SEQ_LENS]
    padded = np.zeros((len(sequences), max(SEQ_LENS)), np.int32)
    for s, seq in enumerate(sequences):
        padded[s, : len(seq)] = seq  # right padding cannot change earlier causal positions

    expected = _hf_logits(model_type, hf_config, params, padded)
    assert np.abs(expected).max() > 1.0  # the weights are large enough for errors to show
    dense = np.asarray(jax.jit(llama.forward_dense, static_argnums=1)(params, config, jnp.asarray(padded)))
    np.testing.assert_allclose(dense, expected, atol=1e-4, rtol=0)

    # Chunked prefill, a mixed step, then decode steps (7 + 9 + 9 + 1 + 1 + 1 + 1 = 29 tokens).
    steps = [(7, 11, 0), (9, 0, 10), (9, 0, 8), (1, 0, 0), (1, 0, 0), (1, 0, 0), (1, 0, 0)]
    paged = _paged_logits(params, config, sequences, steps, seed=1)
    for s, seq in enumerate(sequences):
        np.testing.assert_allclose(paged[s], expected[s, : len(seq)], atol=1e-4, rtol=0)


def test_sliding_window_changes_logits():
    """The Mistral case above only proves something if the window is actually in effect."""
    _, hf_config = _hf_config("mistral_sliding_window")
    windowed = ModelConfig.from_hf_config(hf_config, dtype="float32")
    full = windowed.replace(sliding_window=None)
    params = _random_params(windowed, seed=3)
    ids = jnp.asarray(np.arange(20, dtype=np.int32)[None] % VOCAB)
    dense = jax.jit(llama.forward_dense, static_argnums=1)
    a = np.asarray(dense(params, windowed, ids))
    b = np.asarray(dense(params, full, ids))
    np.testing.assert_array_equal(a[:, :7], b[:, :7])  # inside the window: identical
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


def test_bfloat16_params_and_forward_dtypes():
    _, hf_config = _hf_config("smollm2_tied")
    config = ModelConfig.from_hf_config(hf_config, dtype="bfloat16")
    params = llama.init_params(config, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ids = jnp.asarray(np.arange(8, dtype=np.int32)[None])
    dense = jax.jit(llama.forward_dense, static_argnums=1)
    logits = dense(params, config, ids)
    assert logits.dtype == jnp.float32 and logits.shape == (1, 8, VOCAB)
    f32 = dense(jax.tree.map(lambda x: x.astype(jnp.float32), params), config.replace(dtype="float32"), ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(f32), atol=0.05)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_scaling type 'yarn'"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(architectures=["LlavaForConditionalGeneration"]), "unsupported architecture"),
        (dict(architectures=["Gemma3ForCausalLM"], use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(architectures=["Gemma2ForCausalLM"], hidden_activation="relu"), "hidden_act 'relu'"),
        (dict(architectures=["Gemma2ForCausalLM"], layer_types=["chunked_attention"] * 2), "layer_types"),
    ],
)
def test_from_hf_config_rejects_unsupported(change, message):
    _, hf_config = _hf_config("smollm2_tied")
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**hf_config, **change})


def test_from_hf_config_fields():
    _, hf_config = _hf_config("qwen2_qkv_bias")
    config = ModelConfig.from_hf_config({**hf_config, "sliding_window": 4096, "eos_token_id": [2, 5]})
    assert config.attention_bias and not config.o_proj_bias and not config.qk_norm
    assert config.sliding_window is None  # Qwen2 ignores it unless use_sliding_window
    assert config.eos_token_ids == (2, 5) and config.dtype == "float32"
    assert hash(config) == hash(ModelConfig.from_dict(config.to_dict()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dummy_params_drawn_on_an_accelerator_match_the_host_draw(monkeypatch, dtype):
    """Off the CPU backend init_params draws on the device (jax.random, one program): the same
    tree, shapes, dtype and distributions as the numpy draw, other values."""
    _, hf_config = _hf_config("qwen2_qkv_bias")
    config = ModelConfig.from_hf_config({**hf_config, "hidden_size": 256, "intermediate_size": 512}, dtype=dtype)
    host = llama.init_params(config, jax.random.key(0))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    device = llama.init_params(config, jax.random.key(0))
    assert jax.tree.structure(device) == jax.tree.structure(host)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(device)[0], jax.tree.leaves(device),
                          jax.tree.leaves(host)):
        name = jax.tree_util.keystr(path[0])
        assert a.shape == b.shape and a.dtype == b.dtype == jnp.dtype(dtype), name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert not np.array_equal(a, b), name
        mean, std = (1.0, 0.1) if "norm" in name else (0.0, 0.02)
        # Six standard errors of the sample mean and of the sample standard deviation.
        assert abs(a.mean() - mean) < 6 * std / np.sqrt(a.size), (name, a.mean())
        assert abs(a.std() - std) < 6 * std / np.sqrt(2 * a.size), (name, a.std())
