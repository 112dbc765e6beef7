"""Loads an HF model folder: config.json, model.safetensors (or a sharded index), tokenizer.

Checkpoints quantized in compressed-tensors' int8 format (llm-compressor's W8A16 / W8A8 schemes:
int8 `weight` [out, in] plus `weight_scale` [out, 1] per channel, or [1] per tensor) load as
int8 QuantizedWeight leaves; their activations are not quantized (jpaged is weight-only).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jpaged.loaders.errors import ModelLoadError
from jpaged.loaders.hf_names import LAYER_NAMES, TOP_NAMES, hf_name, text_model_name
from jpaged.models import quantization
from jpaged.models.config import ModelConfig
from jpaged.models.llama import param_shapes


def read_hf_config(folder: str, dtype: str, hf_overrides: dict | None = None) -> ModelConfig:
    """ModelConfig from folder/config.json, with extra EOS ids from generation_config.json, then
    `hf_overrides`' fields in place of the file's."""
    hf_config = read_json(os.path.join(folder, "config.json"))
    generation_path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(generation_path):
        generation_eos = read_json(generation_path).get("eos_token_id")
        if generation_eos is not None:
            config_eos = hf_config.get("eos_token_id")
            as_list = lambda x: [] if x is None else x if isinstance(x, list) else [x]
            hf_config["eos_token_id"] = list(dict.fromkeys(as_list(config_eos) + as_list(generation_eos)))
    hf_config.update(hf_overrides or {})
    try:
        return ModelConfig.from_hf_config(hf_config, dtype)
    except (KeyError, ValueError, TypeError) as e:
        missing = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ModelLoadError(f"{os.path.join(folder, 'config.json')}: {missing}") from e


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def checkpoint_quantization(folder: str) -> str | None:
    """"int8" for a compressed-tensors int8 checkpoint, None for an unquantized one; ModelLoadError
    naming what is supported for any other config.json `quantization_config`."""
    config_path = os.path.join(folder, "config.json")
    qconfig = read_json(config_path).get("quantization_config")
    if not qconfig:
        return None
    supported = ("jpaged loads compressed-tensors int8 checkpoints (formats naive-quantized / int-quantized, "
                 "symmetric, per-channel or per-tensor weight scales), or quantizes an unquantized checkpoint "
                 "itself with --quantization int8")
    method, fmt = qconfig.get("quant_method"), qconfig.get("format")
    if method != "compressed-tensors":
        raise ModelLoadError(f"{config_path}: quantization_config.quant_method {method!r} is not supported; {supported}")
    if fmt not in ("naive-quantized", "int-quantized"):
        raise ModelLoadError(f"{config_path}: compressed-tensors format {fmt!r} is not supported; {supported}")
    for name, group in (qconfig.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        scheme = (weights.get("num_bits"), weights.get("type"), weights.get("symmetric", True), weights.get("strategy"))
        if scheme[:3] != (8, "int", True) or scheme[3] not in ("channel", "tensor"):
            raise ModelLoadError(
                f"{config_path}: config group {name!r} has weights num_bits={scheme[0]}, type={scheme[1]!r}, "
                f"symmetric={scheme[2]}, strategy={scheme[3]!r}; {supported}")
    return "int8"


def load_safetensors_params(folder: str, config: ModelConfig) -> dict:
    """Params pytree from model.safetensors or model.safetensors.index.json.

    Each tensor is read as numpy, transposed to [in, out] and cast once to config.dtype; an int8
    projection of a compressed-tensors checkpoint stays int8 ([out, in]) with its weight_scale.
    """
    quantized = checkpoint_quantization(folder) is not None
    scales = {}  # compressed-tensors "<name>.weight_scale" -> f32 array
    files = _safetensors_files(folder)
    shapes = param_shapes(config)
    wanted = {TOP_NAMES[k]: (k, None) for k in shapes if k != "layers"}
    for i, layer in enumerate(shapes["layers"]):
        wanted.update({f"model.layers.{i}.{LAYER_NAMES[k]}": (k, i) for k in layer})
    params = {"layers": [{} for _ in shapes["layers"]]}
    dtype = jnp.dtype(config.dtype)
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                for stored_name in f.keys():
                    name = text_model_name(stored_name)
                    if quantized and name.endswith(".weight_scale"):
                        scales[name.removesuffix("_scale")] = f.get_tensor(stored_name).astype(np.float32)
                    if name not in wanted:
                        continue  # e.g. rotary inv_freq buffers, lm_head when tied, zero points, a vision tower
                    key, layer = wanted.pop(name)
                    expected = shapes[key] if layer is None else shapes["layers"][layer][key]
                    tensor = f.get_tensor(stored_name)
                    if tensor.shape != _hf_shape(key, expected):
                        raise ModelLoadError(
                            f"{path}: tensor {stored_name} has shape {tensor.shape}, but config.json "
                            f"implies {_hf_shape(key, expected)}"
                        )
                    target = params if layer is None else params["layers"][layer]
                    if tensor.dtype == np.int8:
                        target[key] = tensor  # [out, in]; becomes a QuantizedWeight with its scale below
                        continue
                    array = tensor.T if tensor.ndim == 2 and key != "embed" else tensor
                    target[key] = jnp.asarray(np.ascontiguousarray(array, dtype=dtype))
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated headers/data
            raise ModelLoadError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from e
    if wanted:
        names = sorted(wanted)
        raise ModelLoadError(
            f"{folder}: {len(names)} tensors missing from the safetensors files, e.g. {', '.join(names[:3])}"
        )
    for target, layer in [(params, None), *((t, i) for i, t in enumerate(params["layers"]))]:
        for key, value in target.items():
            if isinstance(value, np.ndarray):
                target[key] = _int8_weight(folder, hf_name(key, layer), value, scales)
    return params


def _int8_weight(folder: str, name: str, data: np.ndarray, scales: dict) -> quantization.QuantizedWeight:
    """QuantizedWeight("int8") from an int8 [out, in] tensor and its weight_scale ([out, 1] or [1])."""
    if name not in scales:
        raise ModelLoadError(f"{folder}: int8 tensor {name} has no {name}_scale")
    scale = scales[name].reshape(-1)
    if scale.size not in (1, data.shape[0]):
        raise ModelLoadError(f"{folder}: {name}_scale has {scale.size} values; expected 1 or {data.shape[0]} "
                             "(group-wise scales are not supported)")
    scale = np.broadcast_to(scale, (data.shape[0],))
    return quantization.QuantizedWeight(data=jnp.asarray(data), scale=jnp.asarray(scale), offset=None, format="int8")


def _hf_shape(key: str, shape: tuple) -> tuple:
    """HF stores projections [out, in]; jpaged [in, out]."""
    return shape[::-1] if len(shape) == 2 and key != "embed" else shape


def _safetensors_files(folder: str) -> list[str]:
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index_path} has no 'weight_map'")
        files = [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
        for path in files:
            if not os.path.isfile(path):
                raise ModelLoadError(f"{path} (listed in {index_path}) does not exist")
        return files
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise ModelLoadError(
            f"{folder} has neither model.safetensors nor model.safetensors.index.json "
            "(use --load-format dummy for random weights)"
        )
    return [single]
