"""Writes an HF model folder (config.json, fp32 model.safetensors, tokenizer files,
generation_config.json) from a GGUF file, by default the bundled SmolLM2-135M-Instruct, so that
vLLM and HF transformers run the very weights jpaged runs (the GGUF dequantized to fp32).

    python scripts/gguf_to_hf.py ~/.cache/jpaged/compare_vllm/smollm2-hf

Uses jpaged's own GGUF loader (dequantization, Q/K row order) and its HF tensor names.
"""

import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file

from jpaged.loaders import default_model_path, load_model
from jpaged.loaders.hf_names import params_to_hf_state_dict
from jpaged.models.config import ModelConfig


def hf_config(config: ModelConfig) -> dict:
    """config.json fields of a Llama-family model (the inverse of ModelConfig.from_hf_config)."""
    if config.architecture != "LlamaForCausalLM" or config.rope_scaling or config.attention_bias:
        raise ValueError(f"only plain Llama GGUFs are converted, not {config.architecture}")
    eos = list(config.eos_token_ids)
    return {
        "architectures": [config.architecture],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_q_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": "float32",
    }


def convert(gguf_path: str, out_dir: str) -> None:
    loaded = load_model(gguf_path, dtype="float32")
    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(loaded.config)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    state = params_to_hf_state_dict(loaded.params)
    if loaded.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({name: np.ascontiguousarray(array, dtype=np.float32) for name, array in state.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    loaded.tokenizer.hf.save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="the folder to write (created if missing)")
    parser.add_argument("--gguf", default=None, help="the GGUF file (default: the bundled SmolLM2)")
    args = parser.parse_args()
    convert(args.gguf or default_model_path(), args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
