"""StructuredOutputManager: per-request grammar matchers and each step's packed token bitmask.

The engine gives every constrained child request its own matcher (`new_matcher`), advances it
with each token the request accepts (`accept`; preemption and recompute keep the output tokens,
so a matcher is never fed twice), and drops it when the request ends. Each step `fill_bitmask`
writes the allowed-token bits of the sampled constrained rows into one int32 array; the sampler
masks the other tokens to -inf. A step without constrained rows builds no bitmask at all.
"""

import threading

import numpy as np

from jpaged.structured_output.params import StructuredOutputsParams


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row: cdiv(vocab_size, 32)."""
    return (vocab_size + 31) // 32


class StructuredOutputManager:
    """Owns the grammar compiler (built on first use: llguidance's tokenizer takes ~0.2 s)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._compiler = None
        self._executor = None
        self._lock = threading.Lock()

    @property
    def compiler(self):
        with self._lock:
            if self._compiler is None:
                import llguidance

                from jpaged.structured_output.compiler import GrammarCompiler
                self._compiler = GrammarCompiler(self._hf_tokenizer, self.vocab_size, self.eos_token_ids)
                self._executor = llguidance.LLExecutor()
            return self._compiler

    def compile(self, params: StructuredOutputsParams) -> None:
        """Compiles (or finds cached) `params`' grammar; ValueError naming the problem if invalid."""
        self.compiler.compile(params)

    def new_matcher(self, params: StructuredOutputsParams):
        """A fresh llguidance matcher for one request."""
        return self.compiler.new_matcher(params)

    def fill_bitmask(self, rows: list[tuple[int, object, list[int]]], num_seqs: int) -> np.ndarray:
        """i32[num_seqs, cdiv(vocab, 32)]: bit t of row r set = token t may be sampled there.

        rows: (row, matcher, stop_token_ids) for each constrained row sampled this step; other
        rows allow every token. Once a matcher's grammar is complete, the request's
        stop_token_ids are allowed as well as EOS.
        """
        from llguidance.numpy import fill_next_token_bitmask_par

        bitmask = np.full((num_seqs, bitmask_width(self.vocab_size)), -1, np.int32)
        fill_next_token_bitmask_par(self._executor, [(matcher, row) for row, matcher, _ in rows], bitmask)
        for row, matcher, stop_token_ids in rows:
            if stop_token_ids and matcher.is_accepting():
                ids = np.asarray(stop_token_ids)
                np.bitwise_or.at(bitmask[row].view(np.uint32), ids // 32, np.uint32(1) << (ids % 32).astype(np.uint32))
        return bitmask
