"""Tensor parallelism: the device mesh, logical-axis rules for params and the KV pool, and the
paged-attention kernels run per shard.

One mesh axis, "tp", over the engine's devices. A model's params carry logical axis names
(`jpaged.models.llama.param_specs`, or `nn.with_logical_partitioning` in a user's Flax model);
`logical_rules` maps them to the mesh: attention heads, MLP columns/rows and the vocabulary are
split over "tp", everything else is replicated. XLA's SPMD partitioner inserts the all-reduces
(after o_proj and down_proj) and the embedding gather. The KV pool
`[num_blocks, num_kv_heads, block_size, head_dim]` is split by KV heads, so every device holds
every block for its heads, and the attention kernels (custom calls XLA cannot partition) run
per shard under `shard_map`.

When tp does not divide num_kv_heads, the attention side (q/k/v/o projections, the pool and the
kernels) is replicated and only the MLP and the vocabulary are split: every device then computes
attention for all heads. (vLLM instead gives each device one replicated KV head; that needs the
K/V projections rearranged per device, which a single NamedSharding of the checkpoint's layout
cannot express.)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpaged.models.attention_metadata import AttentionMetadata
from jpaged.models.quantization import QuantizedWeight
from pallas_kernels.reference import ragged_paged_attention, write_kv

TP_AXIS = "tp"


def make_mesh(devices) -> Mesh:
    """A one-axis ("tp") mesh over `devices` (a sequence of jax devices)."""
    return Mesh(np.asarray(devices, dtype=object), (TP_AXIS,))


def kv_heads_sharded(config, tp: int) -> bool:
    """Whether the KV pool (and attention) is split over tp devices: tp divides num_kv_heads."""
    return config.num_kv_heads % tp == 0


def logical_rules(config, tp: int) -> dict[str, str | None]:
    """Logical axis name -> mesh axis (None: replicated) for a model config on tp devices.

    Names not listed (`embed`, `head_dim`, `norm`, a user's own) are replicated.
    """
    heads = TP_AXIS if kv_heads_sharded(config, tp) else None
    return {
        "vocab": TP_AXIS if config.vocab_size % tp == 0 else None,
        "heads": heads,
        "kv_heads": heads,
        "mlp": TP_AXIS if config.intermediate_size % tp == 0 else None,
    }


def example_inputs(config, num_tokens: int = 16, num_seqs: int = 8, block_size: int = 16):
    """Abstract (ShapeDtypeStruct) arguments of a model's __call__ after the params: token_ids,
    positions, a one-block-per-sequence kv_cache and AttentionMetadata."""
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    page = jax.ShapeDtypeStruct((num_seqs + 1, config.num_kv_heads, block_size, config.head_dim),
                                jnp.dtype(config.dtype))
    meta = AttentionMetadata(i32(num_tokens), i32(num_seqs, 1), i32(num_seqs), i32(num_seqs + 1))
    return i32(num_tokens), i32(num_tokens), [(page, page)] * config.num_layers, meta


def logical_specs(model) -> dict:
    """The params pytree of a Flax `model` (with a `config` attribute and the engine's __call__
    signature) with a PartitionSpec of logical axis names per leaf (P() where unannotated), read
    from `model.init` traced abstractly (nothing is computed or allocated)."""
    args = example_inputs(model.config)
    abstract = jax.eval_shape(
        lambda *a: model.init(jax.random.key(0), *a, ragged_paged_attention, write_kv), *args)["params"]
    return nn.get_partition_spec(abstract)


def param_shardings(model, params, mesh: Mesh) -> dict:
    """NamedShardings for `params` (arrays or ShapeDtypeStructs) from `model`'s logical axes.

    A quantized weight (`quantization.QuantizedWeight`: data, scale and offset all [out, ...])
    is the declared [in, out] weight transposed (the embedding's rows stay its vocabulary), so
    its arrays take the declared axes reversed. An array whose rank differs from its axes, or
    whose split does not divide its dimension, is replicated. On one device every array is, and
    the model's axes are not read (tracing its init abstractly takes seconds for a 30-layer model).
    LoRA slots (params["lora"], jpaged/lora.py) are replicated.
    """
    tp = mesh.shape[TP_AXIS]
    if "lora" in params and tp > 1:
        base = param_shardings(model, {k: v for k, v in params.items() if k != "lora"}, mesh)
        return {**base, "lora": jax.tree.map(lambda _: NamedSharding(mesh, P()), params["lora"])}
    if tp == 1:
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    rules = logical_rules(model.config, tp)

    def place(names, array):
        axes = tuple(rules.get(name) if name else None for name in names)[:array.ndim]
        axes += (None,) * (array.ndim - len(axes))
        if any(a is not None and d % tp for a, d in zip(axes, array.shape)):
            axes = ()
        return NamedSharding(mesh, P(*axes))

    def shard(path, logical, leaf):
        if isinstance(leaf, QuantizedWeight):
            is_embedding = getattr(path[-1], "key", None) == "embed"
            names = tuple(logical) if is_embedding else tuple(logical)[::-1]
            return jax.tree.map(lambda array: place(names, array), leaf)
        return place(logical, leaf) if len(logical) == leaf.ndim else NamedSharding(mesh, P())

    return jax.tree.map_with_path(shard, logical_specs(model), params, is_leaf=lambda x: isinstance(x, P))


def describe(config, tp: int) -> str:
    """One line for the start log: what is split over the tp devices."""
    rules = logical_rules(config, tp)
    split = [name for name in ("heads", "mlp", "vocab") if rules[name]]
    kv = (f"KV pool split by KV heads ({config.num_kv_heads // tp} per device)" if kv_heads_sharded(config, tp) else
          f"KV pool and attention replicated ({tp} does not divide {config.num_kv_heads} KV heads)")
    return f"{', '.join(split) or 'nothing'} split; {kv}"


def kv_spec(config, tp: int) -> P:
    """PartitionSpec of a KV page array [num_blocks, num_kv_heads, block_size, head_dim] (and of
    q/k/v [tokens, heads, head_dim]): split by heads, or replicated."""
    return P(None, TP_AXIS) if kv_heads_sharded(config, tp) else P()


def kv_scale_spec(config, tp: int) -> P:
    """PartitionSpec of a layer's KV scale f32[num_kv_heads] (int8 / fp8 pages): split like the heads."""
    return P(TP_AXIS) if kv_heads_sharded(config, tp) else P()


def kv_shards(config, tp: int) -> int:
    """Into how many parts each KV block is split across the devices."""
    return tp if kv_heads_sharded(config, tp) else 1


def shard_attention(attention_fn, write_kv_fn, mesh: Mesh, config):
    """(attention_fn, write_kv_fn) that run the given kernels once per device under shard_map,
    each on its devices' heads (or on all heads where the pool is replicated). Array keyword
    arguments (the per-KV-head k_scale / v_scale of int8 / fp8 pages) are split like the heads;
    the others (sm_scale, sliding_window, soft_cap) are static."""
    tp = mesh.shape[TP_AXIS]
    heads, per_head = kv_spec(config, tp), kv_scale_spec(config, tp)

    def split_kwargs(kwargs):
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
        return arrays, {k: v for k, v in kwargs.items() if k not in arrays}

    def attention(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, **kwargs):
        arrays, static = split_kwargs(kwargs)

        def body(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, arrays):
            return attention_fn(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, **static, **arrays)

        return jax.shard_map(body, mesh=mesh, in_specs=(heads, heads, heads, P(), P(), P(),
                                                        {k: per_head for k in arrays}),
                             out_specs=heads, check_vma=False)(q, k_pages, v_pages, kv_lens, block_tables,
                                                               cu_q_lens, arrays)

    def write(k_pages, v_pages, k, v, slot_mapping, **kwargs):
        arrays, static = split_kwargs(kwargs)

        def body(k_pages, v_pages, k, v, slot_mapping, arrays):
            return write_kv_fn(k_pages, v_pages, k, v, slot_mapping, **static, **arrays)

        return jax.shard_map(body, mesh=mesh, in_specs=(heads, heads, heads, heads, P(),
                                                        {k: per_head for k in arrays}),
                             out_specs=(heads, heads), check_vma=False)(k_pages, v_pages, k, v, slot_mapping, arrays)

    return attention, write
