"""Loads a GGUF file (llama.cpp's format): config and tokenizer from metadata, tensors dequantized
or kept in their Q8_0/Q4_0/Q4_1 blocks (jpaged.models.quantization)."""

import jax.numpy as jnp
import numpy as np

from jpaged.loaders.errors import ModelLoadError
from jpaged.loaders.gguf_file import GgufFile
from jpaged.models import quantization
from jpaged.models.config import ModelConfig
from jpaged.models.llama import param_shapes
from jpaged.tokenizer import Tokenizer

# general.architecture -> HF architecture.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# Gemma's layer count of its 27B model, where llama.cpp scales the scores by (hidden / heads) ** -0.5
# rather than head_dim ** -0.5 (the HF configs' query_pre_attn_scalar; GGUF does not store it).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# GGUF per-layer tensor name (after "blk.{i}.") -> jpaged layer key.
LAYER_NAMES = {
    "attn_norm.weight": "input_norm",
    "attn_q.weight": "q_proj",
    "attn_k.weight": "k_proj",
    "attn_v.weight": "v_proj",
    "attn_output.weight": "o_proj",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
    "attn_q_norm.weight": "q_norm",
    "attn_k_norm.weight": "k_norm",
    "ffn_norm.weight": "post_attention_norm",
    "ffn_gate.weight": "gate_proj",
    "ffn_up.weight": "up_proj",
    "ffn_down.weight": "down_proj",
}
# Gemma 2/3's sandwich norms: llama.cpp's ffn_norm is their MLP's input norm there.
SANDWICH_NORM_NAMES = {
    "post_attention_norm.weight": "attn_output_norm",
    "ffn_norm.weight": "mlp_input_norm",
    "post_ffw_norm.weight": "mlp_output_norm",
}
TOP_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
# GGUF tokenizer metadata -> the names transformers' GGUF tokenizer converter takes.
_TOKENIZER_FIELDS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.precompiled_charsmap": "precompiled_charsmap",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}
_TOKENIZER_CONFIG_FIELDS = {
    "tokenizer.chat_template": "chat_template",
    "tokenizer.ggml.add_bos_token": "add_bos_token",
    "tokenizer.ggml.add_eos_token": "add_eos_token",
}
_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def read_gguf_config(gguf_file: GgufFile, dtype: str, hf_overrides: dict | None = None) -> ModelConfig:
    """ModelConfig from GGUF metadata ("{arch}.block_count", ...), read as config.json fields, then
    `hf_overrides`' fields in their place. dtype "auto" -> float32 on CPU, bfloat16 on
    accelerators (the weights are dequantized, so there is no native dtype)."""
    path, meta = gguf_file.path, gguf_file.metadata
    arch = _field(gguf_file, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r}; jpaged loads {', '.join(ARCHITECTURES)}"
        )
    rope_scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_scaling_type not in ("none", "linear") or "rope_freqs.weight" in gguf_file.tensors:
        raise ModelLoadError(f"{path}: GGUF RoPE scaling other than linear is not supported; "
                             "load the HF folder instead")
    num_q_heads = _field(gguf_file, f"{arch}.attention.head_count")
    hidden_size = _field(gguf_file, f"{arch}.embedding_length")
    head_dim = _field(gguf_file, f"{arch}.attention.key_length", hidden_size // num_q_heads)
    rope_dim = _field(gguf_file, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(f"{path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
    num_tokens = len(meta.get("tokenizer.ggml.tokens", ()))
    eos = _field(gguf_file, "tokenizer.ggml.eos_token_id", None)
    hf_config = {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": _field(gguf_file, f"{arch}.vocab_size", num_tokens),
        "hidden_size": hidden_size,
        "intermediate_size": _field(gguf_file, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(gguf_file, f"{arch}.block_count"),
        "num_attention_heads": num_q_heads,
        "num_key_value_heads": _field(gguf_file, f"{arch}.attention.head_count_kv", num_q_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _field(gguf_file, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(gguf_file, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _field(gguf_file, f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in gguf_file.tensors,
        "bos_token_id": _field(gguf_file, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": eos,
        "dtype": "bfloat16",
    }
    if rope_scaling_type == "linear":
        hf_config["rope_scaling"] = {"rope_type": "linear", "factor": _field(gguf_file, f"{arch}.rope.scaling.factor")}
    if arch in _GEMMA_27B_LAYERS:
        hf_config.update(_gemma_fields(gguf_file, arch, hf_config))
    hf_config.update(hf_overrides or {})
    try:
        return ModelConfig.from_hf_config(hf_config, dtype)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e


def _gemma_fields(gguf_file: GgufFile, arch: str, hf_config: dict) -> dict:
    """Gemma 2/3's config.json fields that llama.cpp reads from its metadata or fixes in code: the
    window, the soft caps, the score scale and Gemma 3's windowed layers where the file lists
    them (else llama.cpp's five in six at RoPE base 10,000, which are transformers' defaults too:
    `config.GEMMA3_TEXT_DEFAULTS`)."""
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    is_27b = hf_config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
    fields = {
        "sliding_window": _field(gguf_file, f"{arch}.attention.sliding_window"),
        "query_pre_attn_scalar": hidden // heads if is_27b else hf_config["head_dim"],
    }
    fields["final_logit_softcapping"] = _field(gguf_file, f"{arch}.final_logit_softcapping", None)
    if arch == "gemma2":
        fields["attn_logit_softcapping"] = _field(gguf_file, "gemma2.attn_logit_softcapping", None)
    else:
        pattern = _field(gguf_file, "gemma3.attention.sliding_window_pattern", None)  # or one bool per layer
        if isinstance(pattern, int):
            fields["sliding_window_pattern"] = pattern
        elif pattern is not None:
            fields["layer_types"] = ["sliding_attention" if windowed else "full_attention" for windowed in pattern]
    return fields


def load_gguf_params(gguf_file: GgufFile, config: ModelConfig, kept_formats: tuple[str, ...] = (),
                     keep_embedding: bool = False) -> dict:
    """Params in config.dtype, with llama.cpp's Q/K row permutation undone (llama) and the 1 it adds
    to Gemma's norm weights taken off.

    Tensors whose GGUF type is in kept_formats (of quantization.GGUF_FORMATS: "q8_0", "q4_0",
    "q4_1") stay quantized as QuantizedWeight leaves: every linear, plus the embedding and lm_head
    when keep_embedding. Everything else is dequantized (gguf.quants.dequantize, f32) and cast.
    """
    from gguf.quants import dequantize  # only GGUF users need the gguf package

    path = gguf_file.path
    shapes = param_shapes(config)
    params = {"layers": [{} for _ in shapes["layers"]]}
    dtype = jnp.dtype(config.dtype)
    permuted = config.architecture == "LlamaForCausalLM"  # llama.cpp permutes only llama's Q/K
    for tensor in gguf_file.tensors.values():
        key, layer = _jpaged_key(tensor.name, config.sandwich_norms)
        if key is None:
            continue
        expected = shapes[key] if layer is None else shapes["layers"][layer][key]
        fmt = tensor.qtype.name.lower()
        keep = fmt in kept_formats and len(expected) == 2 and (keep_embedding or key not in ("embed", "lm_head"))
        if keep:
            raw = tensor.data  # u8[out, bytes per row]: whole rows of blocks, so rows permute as bytes
            if permuted and key in ("q_proj", "k_proj"):
                raw = _unpermute_rows(raw, config.num_q_heads if key == "q_proj" else config.num_kv_heads)
            array = quantization.from_gguf_blocks(raw, fmt)
        else:
            try:
                array = dequantize(tensor.data, tensor.qtype)  # f32, HF layout [out, in]
            except NotImplementedError as e:
                raise ModelLoadError(
                    f"{path}: tensor {tensor.name} has GGUF type {tensor.qtype.name}, which the "
                    f"gguf package cannot dequantize: {e}"
                ) from e
        if not keep and permuted and key in ("q_proj", "k_proj"):
            heads = config.num_q_heads if key == "q_proj" else config.num_kv_heads
            array = _unpermute_rows(array, heads)
        hf_shape = expected[::-1] if len(expected) == 2 and key != "embed" else expected  # [out, in]
        if tuple(array.shape) != hf_shape:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has shape {tuple(array.shape)}, expected {hf_shape}")
        if not keep and array.ndim == 2 and key != "embed":
            array = array.T
        if config.norm_unit_offset and not keep and key.endswith("norm"):
            array = array - np.float32(1.0)  # llama.cpp stores Gemma's norms as 1 + weight
        target = params if layer is None else params["layers"][layer]
        target[key] = array if keep else jnp.asarray(np.ascontiguousarray(array, dtype=dtype))
    missing = [k for k in shapes if k != "layers" and k not in params]
    for i, (layer, loaded) in enumerate(zip(shapes["layers"], params["layers"])):
        missing += [f"layer {i} {k}" for k in layer if k not in loaded]
    if missing:
        raise ModelLoadError(f"{path}: tensors missing: {', '.join(missing[:4])}")
    return params


def load_gguf_tokenizer(gguf_file: GgufFile, eos_token_ids, chat_template: str | None) -> Tokenizer:
    """The HF fast tokenizer (vocab, merges, special tokens, chat template) from GGUF metadata,
    built by transformers' GGUF tokenizer converter (no torch needed)."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers < 5.2 kept it here
        from transformers.integrations.ggml import convert_gguf_tokenizer

    meta = gguf_file.metadata
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError(f"{gguf_file.path} has no tokenizer in its metadata; pass --tokenizer")
    tokens = meta["tokenizer.ggml.tokens"]
    tokenizer_dict = {name: meta[key] for key, name in _TOKENIZER_FIELDS.items() if key in meta}
    config = {name: meta[key] for key, name in _TOKENIZER_CONFIG_FIELDS.items() if key in meta}
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(key)
        config[name] = None if token_id is None else tokens[token_id]
    try:
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise ModelLoadError(
            f"{gguf_file.path}: transformers cannot build this GGUF tokenizer ({e}); pass --tokenizer"
        ) from e
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=gguf_file.path, **config, **extra)
    return Tokenizer(hf, eos_token_ids=eos_token_ids, chat_template=chat_template)


def _jpaged_key(name: str, sandwich_norms: bool) -> tuple[str | None, int | None]:
    if name in TOP_NAMES:
        return TOP_NAMES[name], None
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        if sandwich_norms and rest in SANDWICH_NORM_NAMES:
            return SANDWICH_NORM_NAMES[rest], int(index)
        return LAYER_NAMES.get(rest), int(index)
    return None, None


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute: per head, rows (pairs, 2) -> (2, pairs).

    llama.cpp interleaves the two RoPE halves of each head's rows; HF keeps them as halves.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


_MISSING = object()


def _field(gguf_file: GgufFile, key: str, default=_MISSING):
    """A GGUF metadata value; ModelLoadError naming the key when it is required and absent."""
    if key in gguf_file.metadata:
        return gguf_file.metadata[key]
    if default is _MISSING:
        raise ModelLoadError(f"{gguf_file.path}: GGUF metadata has no {key!r}")
    return default
