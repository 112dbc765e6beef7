"""Incremental detokenization and stop-string matching, safe for streaming.

Each step decodes only a short window of tokens: the text of ids[prefix_offset:] minus the text of
ids[prefix_offset:read_offset]. The window starts a few tokens back so tokenizers that drop a
leading space (SentencePiece) or merge bytes render the new token as they would in context; a
window ending in U+FFFD (an incomplete multi-byte character) emits nothing until it completes.
"""

# Tokens of context kept before the first new token (vLLM uses 5 as well).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text of one request's output tokens, grown token by token.

    `text` is the output so far (truncated at a matched stop string); `stop_matched` is the stop
    string that ended it, if any. As in vLLM, stop strings are searched for only once more than
    `min_tokens` tokens exist, and a match must end in the text of a token after the first
    `min_tokens` (one may begin before it).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], sampling_params):
        self._tokenizer = tokenizer
        self._skip_special = sampling_params.skip_special_tokens
        self._stop = [s for s in (sampling_params.stop or []) if s]
        self._include_stop = sampling_params.include_stop_str_in_output
        self._min_tokens = sampling_params.min_tokens
        self._num_output_tokens = 0
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        self.stop_matched: str | None = None
        # While running, hold back what could be the start of a stop string.
        self._holdback = 0 if self._include_stop else max((len(s) for s in self._stop), default=1) - 1

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def append(self, token_id: int) -> str | None:
        """Adds one output token; returns the stop string it completed, if any."""
        self._ids.append(token_id)
        self._num_output_tokens += 1
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return None
        new_text = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        searched_text_end = len(self.text)  # a match must end after it
        self.text += new_text
        if self._num_output_tokens <= self._min_tokens:
            return None
        return self._match_stop(searched_text_end)

    def _match_stop(self, searched_text_end: int) -> str | None:
        best = None
        for stop in self._stop:
            at = self.text.find(stop, max(0, searched_text_end - len(stop) + 1))
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        self.text = self.text[:at + len(stop)] if self._include_stop else self.text[:at]
        self.stop_matched = stop
        return stop

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: while running, a possible partial stop string is held back."""
        if finished or self._holdback == 0:
            return self.text
        return self.text[:max(0, len(self.text) - self._holdback)]
