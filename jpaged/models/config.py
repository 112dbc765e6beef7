"""ModelConfig: the static description of a Llama-family decoder (Gemma's included), built from
an HF config.json."""

import dataclasses
import math

import jax
import numpy as np

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
GEMMA_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Checkpoints of a model that also reads images, whose text model jpaged serves alone: their
# architecture -> the text model's (its fields are config.json's text_config).
TEXT_MODEL_OF = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
# Checkpoints of the bare decoder (transformers' AutoModel: no lm_head; embedding models such as
# e5-mistral and gte-Qwen2): their architecture -> the causal LM's, loaded tied (no lm_head to read).
BARE_MODEL_OF = {"LlamaModel": "LlamaForCausalLM", "MistralModel": "MistralForCausalLM",
                 "Qwen2Model": "Qwen2ForCausalLM", "Qwen3Model": "Qwen3ForCausalLM", "GemmaModel": "GemmaForCausalLM",
                 "Gemma2Model": "Gemma2ForCausalLM", "Gemma3TextModel": "Gemma3ForCausalLM"}
# transformers' Gemma3TextConfig defaults, for the fields a config.json leaves out (the 4B-27B
# checkpoints' text_config lists only where they differ).
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1,
    "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
}
# HF activation names -> what the MLP's gate goes through. Gemma's legacy "gelu" means the tanh form.
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ROPE_TYPES = ("llama3", "linear")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable (a static jit argument). Field names follow jpaged's glossary, not HF's."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None  # sorted (key, value) items of HF's rope_scaling, without rope_theta
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # biases on q/k/v (Qwen2 always; Llama/Qwen3 also on o_proj)
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None  # Mistral, Gemma 2/3: a query at p sees keys at positions > p - sliding_window
    dtype: str  # "float32" | "bfloat16" | "float16": params and matmul inputs
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Gemma's differences (the defaults are Llama's; old saved configs lack these fields):
    hidden_act: str = "silu"  # one of HIDDEN_ACTS, on the MLP's gate
    norm_unit_offset: bool = False  # Gemma: every RMSNorm scales by (1 + weight)
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size), rounded to dtype
    sandwich_norms: bool = False  # Gemma 2/3: RMSNorms on the attention's and the MLP's outputs too
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: scores scaled by its -1/2 power, not head_dim's
    attn_logit_softcap: float | None = None  # Gemma 2: attention scores become c * tanh(scores / c)
    final_logit_softcap: float | None = None  # Gemma 2: logits become c * tanh(logits / c)
    sliding_window_layers: tuple[bool, ...] | None = None  # Gemma 2/3: which layers use the window (None: all)
    local_rope_theta: float | None = None  # Gemma 3: the windowed layers' RoPE base (unscaled RoPE)

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; jpaged supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES} (set --dtype)")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {HIDDEN_ACTS}")
        if self.sliding_window_layers is not None and len(self.sliding_window_layers) != self.num_layers:
            raise ValueError(f"{len(self.sliding_window_layers)} layer types for {self.num_layers} layers")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_q_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )

    @property
    def o_proj_bias(self) -> bool:
        """Qwen2 has q/k/v biases only; Llama-style attention_bias also biases o_proj."""
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @property
    def sm_scale(self) -> float:
        """The attention scores' scale: query_pre_attn_scalar ** -0.5 where set, else head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_sliding_window(self, layer: int) -> int | None:
        """The window of layer `layer`'s attention (None: it sees the whole context)."""
        if self.sliding_window_layers is not None and not self.sliding_window_layers[layer]:
            return None
        return self.sliding_window

    def layer_uses_local_rope(self, layer: int) -> bool:
        """Gemma 3's windowed layers rotate with local_rope_theta (with --disable-sliding-window too)."""
        if self.local_rope_theta is None:
            return False
        return self.sliding_window_layers is None or self.sliding_window_layers[layer]

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples become lists); `from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelConfig":
        fields = dict(fields)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = tuple(tuple(item) for item in fields["rope_scaling"])
        fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        if fields.get("sliding_window_layers") is not None:
            fields["sliding_window_layers"] = tuple(fields["sliding_window_layers"])
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, hf_config: dict, dtype: str = "auto") -> "ModelConfig":
        """Builds a config from the fields of an HF config.json.

        dtype "auto" is float32 when JAX's default backend is the CPU, else the checkpoint's
        dtype (`dtype` or `torch_dtype`; float32 when absent).
        Raises ValueError naming the field for anything jpaged does not implement.
        """
        architectures = hf_config.get("architectures") or []
        if len(architectures) == 1 and architectures[0] in TEXT_MODEL_OF:
            hf_config = _text_model_fields(hf_config, TEXT_MODEL_OF[architectures[0]])
            architectures = hf_config["architectures"]
        if len(architectures) == 1 and architectures[0] in BARE_MODEL_OF:
            hf_config = {**hf_config, "architectures": [BARE_MODEL_OF[architectures[0]]], "tie_word_embeddings": True}
            architectures = hf_config["architectures"]
        if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
            supported = SUPPORTED_ARCHITECTURES + tuple(TEXT_MODEL_OF) + tuple(BARE_MODEL_OF)
            raise ValueError(
                f"unsupported architecture {architectures or hf_config.get('model_type')!r} in "
                f"config.json; jpaged supports {', '.join(supported)}"
            )
        architecture = architectures[0]
        if architecture == "Gemma3ForCausalLM":
            hf_config = {**GEMMA3_TEXT_DEFAULTS, **hf_config}
            if hf_config.get("use_bidirectional_attention"):
                raise ValueError("unsupported use_bidirectional_attention=true (an embedding model) in config.json")
        gemma = architecture in GEMMA_ARCHITECTURES
        hidden_act = _hidden_act(hf_config, architecture)
        if hf_config.get("mlp_bias"):
            raise ValueError("unsupported mlp_bias=true in config.json")

        num_q_heads = hf_config["num_attention_heads"]
        head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // num_q_heads
        if architecture == "Gemma3ForCausalLM":
            rope_theta, rope_scaling, local_rope_theta = _gemma3_rope_fields(hf_config)
        else:
            (rope_theta, rope_scaling), local_rope_theta = _rope_fields(hf_config), None

        if architecture == "Qwen2ForCausalLM":
            attention_bias = True
        else:
            attention_bias = bool(hf_config.get("attention_bias", False))
        sliding_window = hf_config.get("sliding_window")
        sliding_window_layers = None
        if architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
            sliding_window_layers = _gemma_sliding_window_layers(hf_config)
        elif architecture != "MistralForCausalLM":
            if hf_config.get("use_sliding_window", False):
                raise ValueError(f"unsupported use_sliding_window=true for {architecture} in config.json")
            sliding_window = None  # Qwen configs carry a window they do not use
        sandwich = architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")

        eos = hf_config.get("eos_token_id")
        eos_token_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            architecture=architecture,
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_q_heads=num_q_heads,
            num_kv_heads=hf_config.get("num_key_value_heads") or num_q_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", gemma)),  # Gemma ties by default
            attention_bias=attention_bias,
            qk_norm=architecture in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            sliding_window=sliding_window,
            dtype=resolve_dtype(dtype, hf_config.get("dtype") or hf_config.get("torch_dtype")),
            bos_token_id=hf_config.get("bos_token_id"),
            eos_token_ids=eos_token_ids,
            hidden_act=hidden_act,
            norm_unit_offset=gemma,
            embed_scale=hf_config["hidden_size"] ** 0.5 if gemma else None,
            sandwich_norms=sandwich,
            query_pre_attn_scalar=float(hf_config.get("query_pre_attn_scalar", 256)) if sandwich else None,
            attn_logit_softcap=_optional_float(hf_config.get("attn_logit_softcapping")) if sandwich else None,
            final_logit_softcap=_optional_float(hf_config.get("final_logit_softcapping")) if sandwich else None,
            sliding_window_layers=sliding_window_layers,
            local_rope_theta=local_rope_theta,
        )


def resolve_dtype(dtype: str, checkpoint_dtype: str | None) -> str:
    """The params dtype for `--dtype`: "auto" is float32 on CPU, else the checkpoint's dtype."""
    if dtype == "auto":
        if jax.default_backend() == "cpu" or checkpoint_dtype not in DTYPES:
            return "float32"
        return checkpoint_dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def _text_model_fields(hf_config: dict, text_architecture: str) -> dict:
    """The text model's config.json fields of a checkpoint that also reads images: its text_config,
    with the top level's token ids and dtype (generation_config.json's EOS ids are merged there)."""
    fields = dict(hf_config.get("text_config") or {})
    for key in ("eos_token_id", "bos_token_id", "dtype", "torch_dtype"):
        if hf_config.get(key) is not None:
            fields[key] = hf_config[key]
    fields["architectures"] = [text_architecture]
    return fields


def _hidden_act(hf_config: dict, architecture: str) -> str:
    """The MLP's activation: HF's `hidden_activation` (Gemma 2/3) or `hidden_act`."""
    if architecture in GEMMA_ARCHITECTURES:
        name = hf_config.get("hidden_activation") or hf_config.get("hidden_act") or "gelu_pytorch_tanh"
        name = "gelu_pytorch_tanh" if name in ("gelu", "gelu_tanh") else name  # Gemma's legacy names, as HF reads them
    else:
        name = hf_config.get("hidden_act", "silu")
    if name not in HIDDEN_ACTS:
        raise ValueError(f"unsupported hidden_act {name!r} in config.json for {architecture} "
                         f"(jpaged implements {', '.join(HIDDEN_ACTS)})")
    return name


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _gemma_sliding_window_layers(hf_config: dict) -> tuple[bool, ...]:
    """Which layers attend through the window: HF's `layer_types`, else its default pattern (Gemma 2
    alternates from a windowed first layer; Gemma 3 windows five layers of every six)."""
    num_layers = hf_config["num_hidden_layers"]
    layer_types = hf_config.get("layer_types")
    if layer_types is None:
        pattern = hf_config.get("sliding_window_pattern") or 2  # Gemma 3's is in GEMMA3_TEXT_DEFAULTS
        return tuple(bool((i + 1) % pattern) for i in range(num_layers))
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown or len(layer_types) != num_layers:
        raise ValueError(f"unsupported layer_types {layer_types!r} in config.json (one of 'sliding_attention', "
                         f"'full_attention' per layer)")
    return tuple(t == "sliding_attention" for t in layer_types)


def _gemma3_rope_fields(hf_config: dict) -> tuple[float, tuple | None, float]:
    """(rope_theta, rope_scaling, local_rope_theta) of Gemma 3: the full-attention layers' RoPE
    (scaled as rope_scaling says) and the windowed layers' base, from transformers 4's
    rope_theta / rope_scaling / rope_local_base_freq or transformers 5's per-layer-type
    rope_parameters (GEMMA3_TEXT_DEFAULTS filled in)."""
    params = hf_config.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {local['rope_type']!r} for sliding_attention in config.json")
        full.setdefault("rope_theta", hf_config["rope_theta"])
        rope_theta, rope_scaling = _rope_fields({"rope_parameters": full})
        return rope_theta, rope_scaling, float(local.get("rope_theta", hf_config["rope_local_base_freq"]))
    rope_theta, rope_scaling = _rope_fields(hf_config)
    return rope_theta, rope_scaling, float(hf_config["rope_local_base_freq"])


def _rope_fields(hf_config: dict) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling items) from either rope_scaling (transformers 4) or
    rope_parameters (transformers 5)."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_theta = float(params.pop("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None)
    params.pop("type", None)
    if rope_type in (None, "default"):
        return rope_theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r} in config.json; jpaged supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    params["rope_type"] = rope_type
    return rope_theta, tuple(sorted(params.items()))


def rope_inv_freq(config: ModelConfig, local: bool = False):
    """float64 numpy [head_dim // 2] inverse frequencies, with llama3/linear scaling applied;
    `local`: Gemma 3's windowed layers' (base local_rope_theta, unscaled)."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inv_freq = 1.0 / ((config.local_rope_theta if local else config.rope_theta) ** exponents)
    scaling = config.rope_scaling_dict
    if scaling is None or local:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled)
