"""Compile time and per-token mask cost of llguidance vs xgrammar on SmolLM2's tokenizer.

    python scripts/bench_grammar_backends.py llguidance
    python scripts/bench_grammar_backends.py xgrammar   # needs `pip install xgrammar` (pulls torch, triton)

Compiles one JSON schema three times (no cache), then walks a valid 66-token document, timing
the mask fill before each token and checking the token is allowed.
"""

import json
import sys
import time

import numpy as np

from jpaged.loaders import default_model_path
from jpaged.loaders.gguf import load_gguf_tokenizer
from jpaged.loaders.gguf_file import read_gguf

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "format": "email"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city"]},
    "role": {"enum": ["admin", "user", "guest"]}}, "required": ["name", "age", "role", "address"]}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poet", "engine"],
            "address": {"street": "12 St James Sq", "city": "London", "zip": "12345"}, "role": "admin"}


def _report(setup_s, compile_ms, mask_s):
    print(f"tokenizer setup {setup_s:.3f} s; compile + matcher {', '.join(f'{t:.2f}' for t in compile_ms)} ms; "
          f"mask per token mean {np.mean(mask_s) * 1e6:.1f} us, median {np.median(mask_s) * 1e6:.1f}, "
          f"max {np.max(mask_s) * 1e6:.1f}")


def bench_llguidance(hf, vocab, tokens):
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp

    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    setup = time.perf_counter() - start
    compile_ms = []
    for _ in range(3):
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
        compile_ms.append((time.perf_counter() - start) * 1e3)
    mask, times = lnp.allocate_token_bitmask(1, vocab), []
    for t in tokens:
        start = time.perf_counter()
        lnp.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - start)
        assert (mask[0, t // 32] >> (t % 32)) & 1 and matcher.consume_token(t)
    _report(setup, compile_ms, times)


def bench_xgrammar(hf, vocab, tokens):
    import xgrammar

    start = time.perf_counter()
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab),
                                        cache_enabled=False)
    setup = time.perf_counter() - start
    compile_ms = []
    for _ in range(3):
        start = time.perf_counter()
        matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
        compile_ms.append((time.perf_counter() - start) * 1e3)
    mask, times = xgrammar.allocate_token_bitmask(1, vocab), []
    for t in tokens:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - start)
        assert matcher.accept_token(t)
    _report(setup, compile_ms, times)


def main() -> None:
    hf = load_gguf_tokenizer(read_gguf(default_model_path()), eos_token_ids=(), chat_template=None).hf
    tokens = hf.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    print(f"vocab {len(hf)}, document {len(tokens)} tokens")
    {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar}[sys.argv[1]](hf, len(hf), tokens)


if __name__ == "__main__":
    main()
