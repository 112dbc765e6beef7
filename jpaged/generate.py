"""`python -m jpaged.generate --prompt "..."`: a greedy completion from the command line.

Runs `LLM.generate` (the paged engine, sized for one short request) and prints the completion.
`greedy_generate` is a dense, cache-free loop over `forward_dense` (the sequence is padded to
one fixed length so it compiles once), kept as an independent oracle for tests.
"""

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.llm import LLM
from jpaged.loaders import DEFAULT_MODEL, LoadedModel, ModelLoadError
from jpaged.models.llama import forward_dense
from jpaged.sampling_params import SamplingParams


def greedy_generate(loaded: LoadedModel, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy (argmax) continuation of `prompt_ids`, stopping at an EOS id or after max_tokens."""
    config = loaded.config
    length = -(-(len(prompt_ids) + max_tokens) // 64) * 64
    if len(prompt_ids) + max_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + --max-tokens {max_tokens} exceeds the model's "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    next_token = jax.jit(functools.partial(_next_token, config=config))
    token_ids = np.zeros((1, length), np.int32)
    token_ids[0, : len(prompt_ids)] = prompt_ids
    output = []
    for n in range(len(prompt_ids), len(prompt_ids) + max_tokens):
        token = int(next_token(loaded.params, jnp.asarray(token_ids), n))
        output.append(token)
        if token in config.eos_token_ids:
            break
        token_ids[0, n] = token
    return output


def _next_token(params, token_ids, num_tokens, config):
    """Argmax of the logits at position num_tokens - 1 (later padding cannot affect it)."""
    logits = forward_dense(params, config, token_ids)  # f32[1, length, vocab]
    return jnp.argmax(logits[0, num_tokens - 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jpaged.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model path or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "orbax", "dummy"])
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--chat-template", default=None)
    parser.add_argument("--max-model-len", type=int, default=256, help="longest prompt + completion, in tokens")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    try:
        llm = LLM(args.model, dtype=args.dtype, load_format=args.load_format, tokenizer=args.tokenizer,
                  chat_template=args.chat_template, max_model_len=args.max_model_len, max_num_seqs=1,
                  max_num_batched_tokens=64)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            outputs = llm.generate(args.prompt, params, use_tqdm=False)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(outputs[0].outputs[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
