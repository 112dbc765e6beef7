"""Loads an HF model folder: config.json, model.safetensors (or a sharded index), tokenizer."""

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jpaged.loaders.errors import ModelLoadError
from jpaged.loaders.hf_names import LAYER_NAMES, TOP_NAMES
from jpaged.models.config import ModelConfig
from jpaged.models.llama import param_shapes


def read_hf_config(folder: str, dtype: str) -> ModelConfig:
    """ModelConfig from folder/config.json, with extra EOS ids from generation_config.json."""
    hf_config = read_json(os.path.join(folder, "config.json"))
    generation_path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(generation_path):
        generation_eos = read_json(generation_path).get("eos_token_id")
        if generation_eos is not None:
            config_eos = hf_config.get("eos_token_id")
            as_list = lambda x: [] if x is None else x if isinstance(x, list) else [x]
            hf_config["eos_token_id"] = list(dict.fromkeys(as_list(config_eos) + as_list(generation_eos)))
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


def load_safetensors_params(folder: str, config: ModelConfig) -> dict:
    """Params pytree in config.dtype from model.safetensors or model.safetensors.index.json.

    Each tensor is read as numpy, transposed to [in, out] and cast once.
    """
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
                for name in f.keys():
                    if name not in wanted:
                        continue  # e.g. rotary inv_freq buffers, or lm_head when tied
                    key, layer = wanted.pop(name)
                    expected = shapes[key] if layer is None else shapes["layers"][layer][key]
                    tensor = f.get_tensor(name)
                    if tensor.shape != _hf_shape(key, expected):
                        raise ModelLoadError(
                            f"{path}: tensor {name} has shape {tensor.shape}, but config.json "
                            f"implies {_hf_shape(key, expected)}"
                        )
                    array = tensor.T if tensor.ndim == 2 and key != "embed" else tensor
                    target = params if layer is None else params["layers"][layer]
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
    return params


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
