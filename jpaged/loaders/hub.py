"""Resolves a Hugging Face hub id ("org/name") to a local folder: the HF cache, else a download."""

import os

from jpaged.loaders.errors import ModelLoadError

# Only what jpaged reads: never the .bin/.pth/.gguf duplicates a repo may also hold.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]


def resolve_hub_model(repo_id: str, revision: str | None, download_dir: str | None = None,
                      token: str | None = None) -> str:
    """The local snapshot folder of `repo_id`, downloading config/safetensors/tokenizer if needed.

    `download_dir` (--download-dir): the cache folder to look in and download to (default: HF's).
    `token` (--hf-token): for gated or private repos (default: huggingface_hub's own)."""
    import huggingface_hub

    cached_config = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", cache_dir=download_dir,
                                                           revision=revision)
    if isinstance(cached_config, str):
        return os.path.dirname(cached_config)
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                                 allow_patterns=ALLOW_PATTERNS, token=token)
    except Exception as e:  # offline, unknown repo, gated repo, ...: all end the same way for the user
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and is not in the Hugging Face cache "
            f"({download_dir or huggingface_hub.constants.HF_HUB_CACHE}), and downloading it failed "
            f"({type(e).__name__}: {e}). This machine may be offline: pass a local HF model folder "
            "or a .gguf file to --model, or omit --model for the bundled smollm2-135m-instruct."
        ) from e
