"""Default sampling parameters from a model's generation_config.json (--generation-config).

As vLLM does: "auto" reads the model folder's file, a folder path reads that folder's, "vllm"
reads nothing; --override-generation-config's keys replace or add to what was read. Only the
sampling fields are taken; a request's own values always win.
"""

import json
import logging
import os

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field.
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_generation_defaults(setting: str, model_path: str, overrides: dict | None = None) -> dict:
    """{SamplingParams field: default} for `setting` ("auto" | "vllm" | a folder), then
    `overrides` ({generation_config.json key: value}, e.g. {"temperature": 0.5}).

    A .gguf model (a file) has no generation_config.json: "auto" gives {}. Raises ValueError
    when a named folder has no generation_config.json or the file is not a JSON object. Other
    keys than the sampling fields are ignored, as vLLM does, with a warning."""
    unknown = sorted(set(overrides or {}) - set(_FIELDS))
    if unknown:
        logger.warning("--override-generation-config: ignoring %s (only %s set sampling defaults)",
                       ", ".join(unknown), ", ".join(_FIELDS))
    config, source = _read_generation_config(setting, model_path)
    config.update(overrides or {})
    defaults = {field: config[key] for key, field in _FIELDS.items() if config.get(key) is not None}
    if defaults:
        source = source if not overrides else f"{source} and --override-generation-config"
        logger.info("default sampling parameters from %s: %s (requests may override them)", source, defaults)
    return defaults


def _read_generation_config(setting: str, model_path: str) -> tuple[dict, str]:
    """(the generation_config.json that `setting` names, or {}; its path)."""
    if setting == "vllm":
        return {}, "vllm"
    if setting == "auto":
        if not os.path.isdir(model_path):
            return {}, "auto"
        folder, required = model_path, False
    else:
        folder, required = os.path.expanduser(setting), True
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if required:
            raise ValueError(f"--generation-config {setting!r}: {path} does not exist (use 'auto', 'vllm' "
                             "or a folder holding generation_config.json).")
        return {}, path
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object.")
    return config, path
