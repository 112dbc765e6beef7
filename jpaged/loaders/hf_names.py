"""The mapping between HF checkpoint tensor names and jpaged's params pytree."""

import numpy as np

# jpaged layer key -> HF name under "model.layers.{i}.". 2-D weights are transposed ([out, in] in HF).
LAYER_NAMES = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "post_attention_norm": "post_attention_layernorm.weight",
    # Gemma 2/3 (sandwich norms): HF's post_attention_layernorm is the attention output's norm there.
    "attn_output_norm": "post_attention_layernorm.weight",
    "mlp_input_norm": "pre_feedforward_layernorm.weight",
    "mlp_output_norm": "post_feedforward_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


# A text model inside a checkpoint that also reads images (Gemma 3 4B+): transformers 4 saved its
# tensors under "language_model.", transformers 5 under "model.language_model.". A bare decoder
# (config.BARE_MODEL_OF, or an embedding model saved from one) has no "model." before its names.
_TEXT_MODEL_PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                        "model.language_model.": "model.", "layers.": "model.layers.",
                        "embed_tokens.": "model.embed_tokens.", "norm.": "model.norm."}


def text_model_name(name: str) -> str:
    """A checkpoint tensor's name as a text-only causal LM names it (other names are unchanged)."""
    for prefix, plain in _TEXT_MODEL_PREFIXES.items():
        if name.startswith(prefix):
            return plain + name[len(prefix):]
    return name


def hf_name(key: str, layer: int | None = None) -> str:
    return TOP_NAMES[key] if layer is None else f"model.layers.{layer}.{LAYER_NAMES[key]}"


def to_hf_layout(key: str, array: np.ndarray) -> np.ndarray:
    """jpaged [in, out] -> HF [out, in] for projection weights; the embedding stays [vocab, hidden]."""
    return array.T if array.ndim == 2 and key != "embed" else array


def params_to_hf_state_dict(params) -> dict[str, np.ndarray]:
    """Flat HF-named numpy arrays from a params pytree (to save or to load into transformers)."""
    state = {hf_name(k): to_hf_layout(k, np.asarray(v)) for k, v in params.items() if k != "layers"}
    for i, layer in enumerate(params["layers"]):
        state.update({hf_name(k, i): to_hf_layout(k, np.asarray(v)) for k, v in layer.items()})
    return state
