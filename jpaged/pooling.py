"""Embeddings (`--runner pooling`): PoolingParams, the model's pooler settings, and the pooling itself.

A pooling engine runs each prompt through the model once (chunked like any prefill, in the same
paged batches) and pools the final-norm hidden states of its tokens into one vector: the last
token's (LAST, what decoder embedding models such as Qwen3-Embedding and e5-mistral use), the
mean over the prompt's tokens (MEAN) or the first token's (CLS). No token is sampled and no
lm_head runs. The vector is then cut to `dimensions` (Matryoshka models only) and L2-normalized
when `normalize` says so. Settings come, first to last: the request, `--pooler-config`, the
folder's sentence-transformers files (modules.json and its Pooling module's config.json), vLLM's
defaults for a decoder model (LAST, normalized).
"""

import dataclasses
import os

import numpy as np

POOLING_TYPES = ("LAST", "MEAN", "CLS")
# --runner values (vLLM's): auto picks pooling for a checkpoint of a bare model (architectures
# "LlamaModel", "Qwen3Model", ...: no lm_head), generate otherwise.
RUNNERS = ("auto", "generate", "pooling")
# sentence-transformers' Pooling config keys, in the order vLLM reads them.
_SENTENCE_TRANSFORMERS_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN",
                                "pooling_mode_lasttoken": "LAST"}


@dataclasses.dataclass
class PoolingParams:
    """vLLM's per-request pooling settings. dimensions: keep the first `dimensions` values of the
    embedding (Matryoshka models only; before normalizing). normalize: L2-normalize the vector
    (None: the model's pooler setting)."""

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)):
            raise ValueError(f"dimensions must be an integer, got {self.dimensions!r}.")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a boolean, got {self.normalize!r}.")

    def clone(self) -> "PoolingParams":
        return dataclasses.replace(self)


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
    """The model's pooling: how hidden states become one vector, and which output sizes it allows."""

    pooling_type: str = "LAST"
    normalize: bool = True
    is_matryoshka: bool = False  # config.json's is_matryoshka, or matryoshka_dimensions given
    matryoshka_dimensions: tuple[int, ...] | None = None  # the only sizes `dimensions` may take (None: any)

    @property
    def skips_prefix_cache(self) -> bool:
        """MEAN and CLS read every prompt token's hidden state, which prefix-cache hits skip."""
        return self.pooling_type != "LAST"

    def check(self, params: PoolingParams, model_name: str, hidden_size: int) -> None:
        """ValueError (vLLM's wording) for a `dimensions` this model cannot give."""
        dims = params.dimensions
        if dims is None:
            return
        if not self.is_matryoshka:
            raise ValueError(f'Model "{model_name}" does not support matryoshka representation, changing output '
                             "dimensions will lead to poor results.")
        if dims < 1:
            raise ValueError("Dimensions must be greater than 0")
        if self.matryoshka_dimensions is not None and dims not in self.matryoshka_dimensions:
            raise ValueError(f'Model "{model_name}" only supports {list(self.matryoshka_dimensions)} matryoshka '
                             "dimensions, use other output dimensions will lead to poor results.")
        if dims > hidden_size:
            raise ValueError(f"Dimensions must be at most the model's hidden size ({hidden_size}), got {dims}.")

    def finish(self, vector: np.ndarray, params: PoolingParams) -> np.ndarray:
        """The pooled f32 vector cut to params.dimensions and normalized as params (or the model) says."""
        if params.dimensions is not None:
            vector = vector[:params.dimensions]
        normalize = self.normalize if params.normalize is None else params.normalize
        if normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector.astype(np.float32)


def resolve_pooler_config(model_path: str | None, flag: dict | None, hf_overrides: dict | None) -> PoolerConfig:
    """The PoolerConfig from --pooler-config (`flag`: pooling_type, normalize), else the model
    folder's sentence-transformers files, else LAST and normalized; Matryoshka sizes from the
    folder's config.json with --hf-overrides on top. ValueError for a flag it cannot follow."""
    folder = model_path if model_path is not None and os.path.isdir(model_path) else None
    fields = _sentence_transformers_pooling(folder) if folder is not None else {}
    flag = dict(flag or {})
    unknown = sorted(set(flag) - {"pooling_type", "normalize"})
    if unknown:
        raise ValueError(f"--pooler-config: unsupported keys {unknown}; jpaged reads pooling_type "
                         f"({', '.join(POOLING_TYPES)}) and normalize.")
    if "pooling_type" in flag:
        pooling_type = str(flag["pooling_type"]).upper()
        if pooling_type not in POOLING_TYPES:
            raise ValueError(f"--pooler-config: pooling_type {flag['pooling_type']!r} is not one of "
                             f"{', '.join(POOLING_TYPES)}.")
        fields["pooling_type"] = pooling_type
    if "normalize" in flag:
        if not isinstance(flag["normalize"], bool):
            raise ValueError(f"--pooler-config: normalize must be true or false, got {flag['normalize']!r}.")
        fields["normalize"] = flag["normalize"]
    hf_config = _read_json(os.path.join(folder, "config.json")) if folder is not None else {}
    hf_config.update(hf_overrides or {})
    sizes = hf_config.get("matryoshka_dimensions")
    if sizes is not None:
        fields["matryoshka_dimensions"] = tuple(int(size) for size in sizes)
    fields["is_matryoshka"] = sizes is not None or bool(hf_config.get("is_matryoshka", False))
    return PoolerConfig(**fields)


def resolve_runner(runner: str, model_path: str | None) -> str:
    """--runner for the loaded model: "generate" or "pooling" (auto: pooling for a folder whose
    config.json names a bare model, config.BARE_MODEL_OF). ValueError for generate on a bare model."""
    from jpaged.models.config import BARE_MODEL_OF  # imports JAX, which this module's users need not

    folder = model_path if model_path is not None and os.path.isdir(model_path) else None
    architectures = _read_json(os.path.join(folder, "config.json")).get("architectures") if folder else None
    bare = bool(architectures) and architectures[0] in BARE_MODEL_OF
    if runner == "generate" and bare:
        raise ValueError(f"{model_path} holds a {architectures[0]}, which has no lm_head to generate text with; "
                         "serve it with --runner pooling (embeddings).")
    if runner == "auto":
        return "pooling" if bare else "generate"
    return runner


def _sentence_transformers_pooling(folder: str) -> dict:
    """pooling_type and normalize from a sentence-transformers folder's modules.json (the first
    pooling mode its Pooling module turns on; normalized iff a Normalize module follows), else {}."""
    modules = _read_json(os.path.join(folder, "modules.json"), default=[])
    if not isinstance(modules, list) or not modules:
        return {}
    fields = {"normalize": any(str(m.get("type", "")).endswith("Normalize") for m in modules)}
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            settings = _read_json(os.path.join(folder, module.get("path", ""), "config.json"))
            for key, pooling_type in _SENTENCE_TRANSFORMERS_MODES.items():
                if settings.get(key):
                    fields["pooling_type"] = pooling_type
                    break
    return fields


def _read_json(path: str, default=None):
    """The loaders' read_json (a ModelLoadError naming a file that is not JSON), or `default` ({})
    when the file does not exist."""
    from jpaged.loaders.safetensors import read_json  # imports JAX, which this module's users need not

    if not os.path.isfile(path):
        return {} if default is None else default
    return read_json(path)


class PromptPooler:
    """One prompt's pooling across the chunks that compute it (host side, f32)."""

    def __init__(self, pooling_type: str, num_prompt_tokens: int):
        self.pooling_type = pooling_type
        self.num_prompt_tokens = num_prompt_tokens
        self.vector: np.ndarray | None = None  # LAST / CLS: the row; MEAN: the running sum

    def add_chunk(self, hidden: np.ndarray, start_position: int) -> None:
        """hidden: [chunk tokens, hidden_size], the final-norm states of the prompt's tokens at
        start_position onwards. A chunk at position 0 starts over (a recomputed prompt)."""
        if start_position == 0:
            self.vector = None
        if self.pooling_type == "MEAN":
            chunk_sum = hidden.sum(axis=0, dtype=np.float32)
            self.vector = chunk_sum if self.vector is None else self.vector + chunk_sum
        elif self.pooling_type == "CLS":
            if start_position == 0:
                self.vector = hidden[0].astype(np.float32)
        elif start_position + len(hidden) == self.num_prompt_tokens:
            self.vector = hidden[-1].astype(np.float32)

    def pooled(self) -> np.ndarray:
        """The pooled vector f32[hidden_size], once every prompt token was added."""
        if self.vector is None:
            raise RuntimeError("pooled() before the prompt's tokens were computed")
        return self.vector / self.num_prompt_tokens if self.pooling_type == "MEAN" else self.vector
