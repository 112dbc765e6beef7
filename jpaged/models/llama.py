"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 1/2/3) as a functional Flax module.

`LlamaForCausalLM(config)` is a flax.linen Module applied functionally over a plain params
pytree (weights stored [in, out]):

    {"embed": [vocab_size, hidden_size],
     "layers": [  # a LIST, one dict per layer (never a stacked [num_layers, ...] array)
        {"input_norm": [hidden], "q_proj": [hidden, q_heads*head_dim],
         "k_proj"/"v_proj": [hidden, kv_heads*head_dim], "o_proj": [q_heads*head_dim, hidden],
         "q_bias"/"k_bias"/"v_bias": [out]   (config.attention_bias),
         "o_bias": [hidden]                  (config.o_proj_bias),
         "q_norm"/"k_norm": [head_dim]        (config.qk_norm),
         "post_attention_norm": [hidden]       (the MLP's input norm; "mlp_input_norm" when
                                               config.sandwich_norms, with "attn_output_norm" and
                                               "mlp_output_norm" on the two blocks' outputs),
         "gate_proj"/"up_proj": [hidden, intermediate], "down_proj": [intermediate, hidden]}, ...],
     "final_norm": [hidden_size],
     "lm_head": [hidden_size, vocab_size],   (absent when config.tie_word_embeddings, unless
                                               quantization.pack_linears added a packed copy)
     "lora": [...]}  (only in an engine with --enable-lora: per layer, the LoRA adapters' slots,
                      jpaged/lora.py; __call__ then takes each token's slot in lora_slots, see lora_delta)

`param_specs` is the one description of that tree: each leaf's shape, logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`) and initializer. The module
declares its params from it (boxed with their logical axes when initialised), and from it come
the loaders' target shapes (`param_shapes`), the dummy weights (`init_params`) and the sharding
rules (jpaged/sharding.py). Applying reads the params as given, unchecked and unboxed, so a
weight may be a quantized pytree instead of an array.

All weights are in config.dtype, except that a projection, the embedding or the lm_head may be a
`quantization.QuantizedWeight` ([out, in] rows), and that on CPU the runner turns float32 and
bfloat16 projections and the lm_head (and, in a float32 step, GGUF-block ones) into
`quantization.PackedWeight` panels for the C++ matmul kernel.
Matmuls go through `quantization.linear`: they take config.dtype inputs and accumulate in
float32; RMSNorm, RoPE, the MLP's activation and softmax run in float32.

Gemma's differences are config fields (jpaged/models/config.py): norms scaling by (1 + weight),
scaled embeddings, the GELU gate, sandwich norms, the query_pre_attn_scalar scale, soft-capped
scores and logits, windowed layers among full ones, and a second RoPE base for the windowed ones.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models.config import ModelConfig, rope_inv_freq
from jpaged.models.quantization import QuantizedWeight, embed, greedy_token_ids
from jpaged.models.quantization import linear as _linear
from jpaged.sampler import argmax
from pallas_kernels.reference import write_kv


PACKED_LM_HEAD_MAX_ROWS = 128


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One param: its shape, a logical axis name per dimension, and how dummy weights draw it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    mean: float = 0.0  # dummy weights draw N(mean, std): norms N(1, 0.1) (N(0, 0.1) where they
    std: float = 0.02  # scale by 1 + weight), everything else N(0, 0.02)

    def initializer(self, dtype):
        """A flax initializer (key, shape, dtype) -> array, boxed with the logical axes."""
        normal = jax.nn.initializers.normal(self.std)

        def init(key, shape, dtype):
            return (self.mean + normal(key, shape, jnp.float32)).astype(dtype)

        return nn.with_logical_partitioning(init, self.axes)


def param_specs(config: ModelConfig) -> dict:
    """The params pytree (module docstring) with a ParamSpec per leaf."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_size = config.num_q_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    norm_mean = 0.0 if config.norm_unit_offset else 1.0
    norm = ParamSpec((hidden,), ("norm",), mean=norm_mean, std=0.1)
    layer = {
        "input_norm": norm,
        "q_proj": ParamSpec((hidden, q_size), ("embed", "heads")),
        "k_proj": ParamSpec((hidden, kv_size), ("embed", "kv_heads")),
        "v_proj": ParamSpec((hidden, kv_size), ("embed", "kv_heads")),
        "o_proj": ParamSpec((q_size, hidden), ("heads", "embed")),
        "gate_proj": ParamSpec((hidden, inter), ("embed", "mlp")),
        "up_proj": ParamSpec((hidden, inter), ("embed", "mlp")),
        "down_proj": ParamSpec((inter, hidden), ("mlp", "embed")),
    }
    if config.sandwich_norms:
        layer.update(attn_output_norm=norm, mlp_input_norm=norm, mlp_output_norm=norm)
    else:
        layer["post_attention_norm"] = norm
    if config.attention_bias:
        layer.update(q_bias=ParamSpec((q_size,), ("heads",)), k_bias=ParamSpec((kv_size,), ("kv_heads",)),
                     v_bias=ParamSpec((kv_size,), ("kv_heads",)))
    if config.o_proj_bias:
        layer["o_bias"] = ParamSpec((hidden,), ("embed",))
    if config.qk_norm:
        head_norm = ParamSpec((config.head_dim,), ("head_dim",), mean=norm_mean, std=0.1)
        layer.update(q_norm=head_norm, k_norm=head_norm)
    specs = {
        "embed": ParamSpec((config.vocab_size, hidden), ("vocab", "embed")),
        "layers": [dict(layer) for _ in range(config.num_layers)],
        "final_norm": norm,
    }
    if not config.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((hidden, config.vocab_size), ("embed", "vocab"))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_shapes(config: ModelConfig) -> dict:
    """The params pytree with shape tuples as leaves (what loaders must produce)."""
    return jax.tree.map(lambda spec: spec.shape, param_specs(config), is_leaf=_is_spec)


class LlamaForCausalLM(nn.Module):
    """A Llama-family decoder over the paged KV pool; see the module docstring for its params.

    Methods (all applied with `module.apply({"params": params}, ..., method=...)`):
      __call__(token_ids, positions, kv_cache, attn_meta, attention_fn, write_kv_fn) -> (hidden, kv_cache)
      compute_logits(hidden, num_rows=None) -> f32[n, vocab_size]
      compute_greedy_ids(hidden, num_rows=None) -> i32[n]
      forward_dense(token_ids) -> f32[batch, seq, vocab_size]
    """

    config: ModelConfig

    @nn.compact
    def weights(self) -> dict:
        """The params pytree. Initialising draws it from `param_specs` (boxed with logical axes);
        applying returns the given pytree as is (no shape check: weights may be quantized pytrees)."""
        if not self.is_initializing():
            return self.variables["params"]
        dtype = jnp.dtype(self.config.dtype)
        specs = param_specs(self.config)

        def declare(name, spec):
            if _is_spec(spec):
                return self.param(name, spec.initializer(dtype), spec.shape, dtype)
            return self.param(name, lambda key: [  # one fold of the key per layer, per param
                {n: s.initializer(dtype)(jax.random.fold_in(jax.random.fold_in(key, i), j), s.shape, dtype)
                 for j, (n, s) in enumerate(sorted(layer.items()))} for i, layer in enumerate(spec)])

        return {name: declare(name, spec) for name, spec in specs.items()}

    def __call__(self, token_ids, positions, kv_cache, attn_meta, attention_fn, write_kv_fn=write_kv,
                 kv_scales=None, lora_slots=None):
        """One paged step over packed tokens.

        Args:
          token_ids, positions: i32[num_tokens], packed over sequences and padded.
          kv_cache: list (one per layer) of (k_pages, v_pages), each
            [num_blocks, num_kv_heads, block_size, head_dim]; donate it.
          attn_meta: AttentionMetadata (slot_mapping, block_tables, kv_lens, cu_q_lens).
          attention_fn: a function with `pallas_kernels.reference.ragged_paged_attention`'s signature.
          write_kv_fn: a function with `pallas_kernels.reference.write_kv`'s signature.
          kv_scales: None, or per layer (k_scale, v_scale) f32[num_kv_heads] for int8 / fp8 pages,
            passed to write_kv_fn and attention_fn.
          lora_slots: i32[num_tokens], each token's LoRA adapter slot (0: none), with params["lora"].
        Returns:
          (hidden [num_tokens, hidden_size] in config.dtype with the final norm applied, new kv_cache).
        """
        config, params = self.config, self.weights()
        ropes = _rope_tables_per_kind(config, positions)
        x = _embed(params["embed"], token_ids, config)  # [T, hidden]
        # The real tokens (the linears skip the padding after them), decode tokens first.
        rows = dict(num_rows=attn_meta.cu_q_lens[-1], num_decode_rows=attn_meta.num_decode_tokens)
        # A batch with no adapter token skips every LoRA delta (a branch, not a second program).
        any_adapter = None if lora_slots is None else jnp.any(lora_slots > 0)
        new_cache = []
        for i, (layer, (k_pages, v_pages)) in enumerate(zip(params["layers"], kv_cache)):
            scales = {} if kv_scales is None else dict(zip(("k_scale", "v_scale"), kv_scales[i]))
            lora = None if lora_slots is None else (params["lora"][i], lora_slots, any_adapter)
            rope = ropes[config.layer_uses_local_rope(i)]
            q, k, v = _attention_inputs(layer, config, x, rope, lora, **rows)  # [T, heads, head_dim]
            k_pages, v_pages = write_kv_fn(k_pages, v_pages, k, v, attn_meta.slot_mapping, **scales)
            attn = attention_fn(
                q,
                k_pages,
                v_pages,
                attn_meta.kv_lens,
                attn_meta.block_tables,
                attn_meta.cu_q_lens,
                sm_scale=config.sm_scale,
                sliding_window=config.layer_sliding_window(i),
                soft_cap=config.attn_logit_softcap,
                **scales,
            )
            x = _attention_output_and_mlp(layer, config, x, attn, lora, **rows)
            new_cache.append((k_pages, v_pages))
        return _rms_norm(x, params["final_norm"], config), new_cache

    def compute_logits(self, hidden, num_rows=None):
        """f32[n, vocab_size] from hidden [n, hidden_size] (tied to the embedding when configured).

        num_rows: None, or an i32 scalar: only hidden's first num_rows rows are real, and the
        logits of the rows after them are unspecified (the C++ kernel skips them)."""
        params = self.weights()
        # A tied float embedding's packed copy (quantization.pack_linears) is the faster operand up
        # to PACKED_LM_HEAD_MAX_ROWS rows; XLA's dot over the embedding is beyond (docs/kernels_cpu.md).
        # A GGUF-block embedding's packed copy is faster than dequantizing it in XLA at any size.
        past_packed_copy = (self.config.tie_word_embeddings and not isinstance(params["embed"], QuantizedWeight)
                            and hidden.shape[0] > PACKED_LM_HEAD_MAX_ROWS)
        if "lm_head" in params and not past_packed_copy:
            logits = _linear(hidden, params["lm_head"], out_dtype=jnp.float32, num_rows=num_rows)
        elif not isinstance(params["embed"], QuantizedWeight):
            logits = jnp.einsum("nh,vh->nv", hidden, params["embed"], preferred_element_type=jnp.float32)
        else:
            logits = _linear(hidden, params["embed"], out_dtype=jnp.float32, num_rows=num_rows)  # [out=vocab, in]
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def compute_greedy_ids(self, hidden, num_rows=None):
        """i32[n]: each row's argmax of compute_logits(hidden, num_rows) (the first index on ties).
        Where the lm_head has its C++ kernel operands ("lm_head_greedy", `quantization.pack_linears`)
        and compute_logits reads the packed lm_head, the same ids come from
        `quantization.greedy_token_ids`, which skips the logits that cannot win; otherwise (and
        under a final soft cap, whose rounding may tie logits) from the logits."""
        params = self.weights()
        greedy = None if self.config.final_logit_softcap is not None else params.get("lm_head_greedy")
        # A tied float embedding's packed copy, the kernel's order of sums, serves up to its row limit.
        if greedy is not None and (greedy.row_scale is not None or hidden.shape[0] <= PACKED_LM_HEAD_MAX_ROWS):
            return greedy_token_ids(hidden, greedy, num_rows)
        return argmax(self.compute_logits(hidden, num_rows))

    def forward_dense(self, token_ids):
        """Causal forward without a cache, the oracle for `__call__`.

        token_ids: i32[batch, seq]; every row starts at position 0. Returns f32[batch, seq, vocab_size].
        """
        config, params = self.config, self.weights()
        batch, seq = token_ids.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        ropes = _rope_tables_per_kind(config, positions)
        x = _embed(params["embed"], token_ids, config)  # [B, S, hidden]
        for i, layer in enumerate(params["layers"]):
            q, k, v = _attention_inputs(layer, config, x, ropes[config.layer_uses_local_rope(i)])  # [B, S, heads, D]
            attn = _dense_causal_attention(q, k, v, config, config.layer_sliding_window(i))
            x = _attention_output_and_mlp(layer, config, x, attn)
        hidden = _rms_norm(x, params["final_norm"], config)
        logits = self.compute_logits(hidden.reshape(batch * seq, -1))
        return logits.reshape(batch, seq, -1)


def init_params(config: ModelConfig, key: jax.Array) -> dict:
    """Dummy params in config.dtype with `param_specs`' distributions (N(0, 0.02), norms N(1, 0.1)).

    On a CPU backend drawn with numpy from a generator seeded by `key` (a jax.random key):
    jax.random would compile one program per distinct shape, which costs seconds on a CPU.
    Elsewhere drawn on the default device with jax.random, one program per distinct shape (a
    Llama has about ten): numpy would draw a Llama-3-8B's 8e9 values on one host core (about
    two minutes on an H200's host), and one program for the whole tree compiles a kernel per
    leaf (~20 s for 32 layers on a CPU backend). The two paths give different values.
    """
    dtype = jnp.dtype(config.dtype)
    specs = param_specs(config)
    if jax.default_backend() != "cpu":
        leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [_draw_on_device(k, spec.shape, spec.mean, spec.std, dtype)
                                            for k, spec in zip(keys, leaves)])
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(key_data, np.uint32))

    def draw(spec):
        noise = rng.standard_normal(spec.shape, dtype=np.float32)
        return jnp.asarray((spec.mean + spec.std * noise).astype(dtype))

    return jax.tree.map(draw, specs, is_leaf=_is_spec)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw_on_device(key, shape, mean, std, dtype):
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def forward(params, config: ModelConfig, token_ids, positions, kv_cache, attn_meta, attention_fn,
            write_kv_fn=write_kv, kv_scales=None):
    """`LlamaForCausalLM(config)` applied to `params`: (hidden, new kv_cache); see its __call__."""
    return LlamaForCausalLM(config).apply({"params": params}, token_ids, positions, kv_cache, attn_meta,
                                          attention_fn, write_kv_fn, kv_scales)


def compute_logits(params, config: ModelConfig, hidden, num_rows=None):
    """f32[n, vocab_size] from hidden [n, hidden_size]; see LlamaForCausalLM.compute_logits."""
    model = LlamaForCausalLM(config)
    return model.apply({"params": params}, hidden, num_rows, method=model.compute_logits)


def forward_dense(params, config: ModelConfig, token_ids):
    """The dense oracle, f32[batch, seq, vocab_size]; see LlamaForCausalLM.forward_dense."""
    model = LlamaForCausalLM(config)
    return model.apply({"params": params}, token_ids, method=model.forward_dense)


def _project(x, layer, name: str, lora, bias=None, **rows):
    """x @ layer[name] (+ bias), plus each row's LoRA update when `lora` is (the layer's entry of
    params["lora"], i32 token slots, a bool scalar: whether any token has an adapter); rows as for
    `_attention_inputs`."""
    y = _linear(x, layer[name], bias, **rows)
    if lora is None:
        return y
    weights, token_slots, any_adapter = lora
    return jax.lax.cond(
        any_adapter,
        lambda y: (y.astype(jnp.float32) + lora_delta(x, weights[name], token_slots)).astype(y.dtype),
        lambda y: y,
        y,
    )


def lora_delta(x, weights: dict, token_slots):
    """f32[num_tokens, out]: each row's adapter update x @ a[s - 1] @ b[s - 1] for its slot s
    (0: none, a zero row).

    x: [num_tokens, in] in the compute dtype; weights: {"a": [L, in, R], "b": [L, R, out]};
    token_slots: i32[num_tokens]."""
    xa = jnp.einsum("ti,lir->tlr", x, weights["a"], preferred_element_type=jnp.float32)
    own_slot = jnp.arange(1, xa.shape[1] + 1, dtype=jnp.int32) == token_slots[:, None]  # [T, L]
    xa = jnp.where(own_slot[:, :, None], xa, 0.0).astype(x.dtype)
    return jnp.einsum("tlr,lro->to", xa, weights["b"], preferred_element_type=jnp.float32)


def _attention_inputs(layer, config, x, rope, lora=None, **rows):
    """q [..., num_q_heads, head_dim], k and v [..., num_kv_heads, head_dim] with RoPE applied.

    rope: `rope_tables(config, positions)`. lora: None, or (the layer's LoRA slots, token slots)
    for x of [num_tokens, hidden]. rows: `quantization.linear`'s num_rows (the real rows of x,
    flattened; the linears may skip the padding after them) and num_decode_rows."""
    h = _rms_norm(x, layer["input_norm"], config)
    lead = h.shape[:-1]
    q = _project(h, layer, "q_proj", lora, layer.get("q_bias"), **rows).reshape(*lead, config.num_q_heads, -1)
    k = _project(h, layer, "k_proj", lora, layer.get("k_bias"), **rows).reshape(*lead, config.num_kv_heads, -1)
    v = _project(h, layer, "v_proj", lora, layer.get("v_bias"), **rows).reshape(*lead, config.num_kv_heads, -1)
    if config.qk_norm:
        q = _rms_norm(q, layer["q_norm"], config)
        k = _rms_norm(k, layer["k_norm"], config)
    return _rope(q, *rope), _rope(k, *rope), v


def _attention_output_and_mlp(layer, config, x, attn, lora=None, **rows):
    """The residual stream after o_proj and the gated MLP (SwiGLU, or Gemma's GELU), with Gemma
    2/3's norms on both blocks' outputs. attn: [..., num_q_heads, head_dim]; lora and rows as for
    `_attention_inputs`."""
    attn = attn.reshape(*attn.shape[:-2], -1).astype(x.dtype)
    out = _project(attn, layer, "o_proj", lora, layer.get("o_bias"), **rows)
    if config.sandwich_norms:
        out = _rms_norm(out, layer["attn_output_norm"], config)
    x = x + out
    h = _rms_norm(x, layer["mlp_input_norm" if config.sandwich_norms else "post_attention_norm"], config)
    gate = _project(h, layer, "gate_proj", lora, **rows).astype(jnp.float32)
    up = _project(h, layer, "up_proj", lora, **rows).astype(jnp.float32)
    out = _project((_activation(gate, config.hidden_act) * up).astype(x.dtype), layer, "down_proj", lora, **rows)
    if config.sandwich_norms:
        out = _rms_norm(out, layer["mlp_output_norm"], config)
    return x + out


def _activation(gate, hidden_act: str):
    """The MLP gate's activation in float32 (HF's silu, or gelu_pytorch_tanh: GELU's tanh form)."""
    return jax.nn.silu(gate) if hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)


def _embed(embedding, token_ids, config: ModelConfig):
    """The token rows of the embedding in config.dtype; Gemma's times sqrt(hidden_size), the
    factor rounded to config.dtype first (as HF multiplies them)."""
    x = embed(embedding, token_ids, config.dtype)
    if config.embed_scale is None:
        return x
    return x * jnp.asarray(config.embed_scale, x.dtype)


def _rms_norm(x, weight, config: ModelConfig):
    """RMSNorm over the last axis in float32, scaled by weight (Gemma: by 1 + weight)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + config.rms_norm_eps)
    scale = weight.astype(jnp.float32)
    if config.norm_unit_offset:
        scale = 1.0 + scale
    return (normed * scale).astype(x.dtype)


def _rope_tables_per_kind(config: ModelConfig, positions) -> dict:
    """{False: the global RoPE tables, True: Gemma 3's windowed layers' (or None)}, keyed by
    `config.layer_uses_local_rope(layer)`."""
    local = None if config.local_rope_theta is None else rope_tables(config, positions, local=True)
    return {False: rope_tables(config, positions), True: local}


def rope_tables(config: ModelConfig, positions, local: bool = False):
    """(cos, signed_sin), each f32[..., 1, head_dim], for `_rope` at i32 positions [...].

    Computed once per step and shared by every layer: left to XLA:CPU, the cos/sin were fused
    into each layer's q and k rotation and evaluated again per head (8x slower at 512 tokens).
    The optimization barrier keeps them one materialized pair. `local`: Gemma 3's windowed layers'.
    """
    inv_freq = jnp.asarray(rope_inv_freq(config, local), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., head_dim // 2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    tables = (jnp.concatenate([cos, cos], axis=-1)[..., None, :], jnp.concatenate([-sin, sin], axis=-1)[..., None, :])
    return jax.lax.optimization_barrier(tables)


def _rope(x, cos, signed_sin):
    """Rotates halves (HF's rotate_half layout): x * cos + [x2, x1] * [-sin, sin], which equals
    [x1 cos - x2 sin, x2 cos + x1 sin] bit for bit. x [..., heads, head_dim]."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return (x32 * cos + jnp.concatenate([x2, x1], axis=-1) * signed_sin).astype(x.dtype)


def _dense_causal_attention(q, k, v, config: ModelConfig, sliding_window):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D]; softmax in float32."""
    batch, seq, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, seq, num_kv_heads, -1, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)) * config.sm_scale
    if config.attn_logit_softcap is not None:
        scores = config.attn_logit_softcap * jnp.tanh(scores / config.attn_logit_softcap)
    pos = jnp.arange(seq)
    visible = pos[None, :] <= pos[:, None]  # [q, s]
    if sliding_window is not None:
        visible = visible & (pos[None, :] > pos[:, None] - sliding_window)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(jnp.float32))
    return out.reshape(batch, seq, num_q_heads, head_dim).astype(q.dtype)
