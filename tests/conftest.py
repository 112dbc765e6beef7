"""Shared fixtures: a tiny random Llama in an HF folder, and the bundled SmolLM2 GGUF."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jpaged.loaders import default_model_path
from jpaged.loaders.gguf import load_gguf_tokenizer
from jpaged.loaders.gguf_file import read_gguf
from jpaged.loaders.hf_names import params_to_hf_state_dict
from jpaged.models import llama
from jpaged.models.config import ModelConfig

# A SmolLM2-shaped Llama (tied embeddings, GQA) shrunk to 2 layers, with SmolLM2's vocabulary.
TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache in a fresh folder per test process. JAX fixes the folder
    for the process at its first compile, so without this the first engine to enable the cache
    would pick it: often ~/.cache/jpaged/jax_cache, holding programs from earlier runs."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF."""
    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path):
    """An HF model folder: config.json, random model.safetensors, SmolLM2's tokenizer files
    (tokenizer.json, tokenizer_config.json, chat_template.jinja). Load it with
    `load_model(str(tiny_model_dir))`."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG, indent=2))
    config = ModelConfig.from_hf_config(TINY_HF_CONFIG, dtype="float32")
    params = llama.init_params(config, jax.random.key(1))
    state = {name: np.ascontiguousarray(array) for name, array in params_to_hf_state_dict(params).items()}
    save_file(state, str(folder / "model.safetensors"))
    tokenizer = load_gguf_tokenizer(read_gguf(smollm2_path), eos_token_ids=(), chat_template=None)
    tokenizer.hf.save_pretrained(str(folder))
    return folder
