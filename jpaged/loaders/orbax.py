"""Saves a loaded model as an Orbax checkpoint folder and restores it (jpaged's own format).

Layout: <folder>/jpaged_config.json (ModelConfig fields), the tokenizer files, <folder>/params/.
"""

import json
import os

import jax
import jax.numpy as jnp

from jpaged.loaders.errors import ModelLoadError
from jpaged.models.config import ModelConfig, resolve_dtype
from jpaged.models.llama import param_shapes
from jpaged.models.quantization import QuantizedWeight

CONFIG_FILE = "jpaged_config.json"


def is_orbax_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_orbax(folder: str, config: ModelConfig, params, tokenizer) -> None:
    """Writes config, tokenizer and params to `folder` (created; must not hold a checkpoint yet).
    Quantized params are refused: save the unquantized model and load it with --quantization."""
    import orbax.checkpoint as ocp

    if any(isinstance(w, QuantizedWeight) for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))):
        raise ValueError("save_orbax saves unquantized params only; load the model without --quantization to save "
                         "it, and pass --quantization when loading the saved folder")

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2)
    tokenizer.hf.save_pretrained(folder)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.path.join(folder, "params")), params)


def read_orbax_config(folder: str, dtype: str) -> ModelConfig:
    """The saved ModelConfig with `dtype` resolved as for any checkpoint ("auto": float32 on CPU,
    else the saved dtype)."""
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            config = ModelConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path} is not a jpaged config: {e}") from e
    try:
        return config.replace(dtype=resolve_dtype(dtype, config.dtype))
    except ValueError as e:
        raise ModelLoadError(str(e)) from e


def restore_orbax_params(folder: str, config: ModelConfig, sharding: jax.sharding.Sharding | None = None):
    """Params restored straight into config.dtype (and `sharding`, default: the first device)."""
    import orbax.checkpoint as ocp

    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, jnp.dtype(config.dtype), sharding=sharding),
        param_shapes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    path = os.path.abspath(os.path.join(folder, "params"))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as e:  # orbax/tensorstore errors for missing or damaged checkpoints
        raise ModelLoadError(f"{path} is not a readable Orbax checkpoint for this config: {e}") from e
