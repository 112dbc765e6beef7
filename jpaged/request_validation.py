"""The one place a request is checked against the engine: vocabulary, context length, limits.

`SamplingParams` checks what a field means on its own (top_p in (0, 1], ...). What depends on
the loaded model and the engine's flags is checked here, once, by `RequestValidator.validate`:
`LLMEngine.add_request` calls it for every entry point (LLM, AsyncLLM, the server), and the
server calls it again before any other work (decoding a prompt for echo, queueing) so that a
bad request costs nothing. Every failure is an `InvalidRequestError` (a ValueError) naming the
field, the value and, for a configured limit, the flag; serving/ maps it to HTTP 400.
"""

import dataclasses

from jpaged.sampling_params import SamplingParams
from jpaged.token_restrictions import MAX_BAD_WORDS_TOKEN_IDS


class InvalidRequestError(ValueError):
    """A request the engine will not run. `param`: the offending request field, for clients."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class RequestLimitError(InvalidRequestError):
    """A request over one of the engine's request-size flags (--max-logprobs, ...)."""


class ContextLengthError(InvalidRequestError):
    """A prompt (plus max_tokens) longer than --max-model-len allows."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="context_length_exceeded")


@dataclasses.dataclass(frozen=True)
class RequestValidator:
    """The model's vocabulary and context length plus the request limits (EngineArgs' flags)."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int = 20
    max_logit_bias: int = 300
    max_stop_sequences: int = 64
    max_stop_token_ids: int = 64
    max_n: int = 128

    @classmethod
    def from_engine_args(cls, args, vocab_size: int, max_model_len: int) -> "RequestValidator":
        return cls(vocab_size=vocab_size, max_model_len=max_model_len, max_logprobs=args.max_logprobs,
                   max_logit_bias=args.max_logit_bias, max_stop_sequences=args.max_stop_sequences,
                   max_stop_token_ids=args.max_stop_token_ids, max_n=args.max_n)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, prompt_param: str = "prompt") -> None:
        """Raises InvalidRequestError for the first problem found; `prompt_param` names the prompt
        field in messages (e.g. "messages" for a chat request)."""
        self.check_limits(params)
        self.check_token_ids(prompt_token_ids, prompt_param)
        self.check_context_length(len(prompt_token_ids), params.max_tokens, prompt_param)
        room = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens is None and params.min_tokens > room:  # vLLM's check of the resolved max_tokens
            raise InvalidRequestError(f"min_tokens must be less than or equal to max_tokens={room}, got "
                                      f"{params.min_tokens}.", param="min_tokens")
        self._check_vocab("stop_token_ids", params.stop_token_ids)
        self._check_vocab("logit_bias", list(params.logit_bias or ()))
        self._check_vocab("allowed_token_ids", params.allowed_token_ids or [])
        self._check_vocab("logprob_token_ids", params.logprob_token_ids or [])
        if params.structured_outputs is not None:
            self._check_vocab("structured_outputs", params.structured_outputs.after_token_ids or [])

    def validate_beam_search(self, prompt_token_ids: list[int], beam_width: int, max_tokens: int,
                             prompt_param: str = "prompt", width_param: str = "beam_width") -> None:
        """A beam search (jpaged/beam_search.py): its steps' requests must pass `validate`, so
        beam_width is under --max-n and its 2 * beam_width top logprobs under --max-logprobs;
        `width_param` names the field that set the width (the server's `n`)."""
        self._check_limit(width_param, beam_width, self.max_n, "--max-n")
        if 2 * beam_width > self.max_logprobs:
            raise RequestLimitError(
                f"{width_param} is {beam_width}: beam search reads the top 2 x {beam_width} = {2 * beam_width} "
                f"logprobs of every beam, over this server's limit of {self.max_logprobs} (--max-logprobs).",
                param=width_param, code="request_limit_exceeded")
        self.check_token_ids(prompt_token_ids, prompt_param)
        self.check_context_length(len(prompt_token_ids), max_tokens, prompt_param)

    def check_limits(self, params: SamplingParams, logprobs_param: str = "logprobs") -> None:
        """The request-size flags: cheap counts, checked before anything is tokenized or decoded.
        `logprobs_param`: the request field that set params.logprobs (chat's `top_logprobs`)."""
        self._check_limit("n", params.n, self.max_n, "--max-n")
        self._check_limit(logprobs_param, params.logprobs, self.max_logprobs, "--max-logprobs")
        self._check_limit("prompt_logprobs", params.prompt_logprobs, self.max_logprobs, "--max-logprobs")
        self._check_limit("stop", len(params.stop), self.max_stop_sequences, "--max-stop-sequences", "strings")
        self._check_limit("stop_token_ids", len(params.stop_token_ids), self.max_stop_token_ids,
                          "--max-stop-token-ids", "entries")
        self._check_limit("logit_bias", len(params.logit_bias or ()), self.max_logit_bias, "--max-logit-bias",
                          "entries")
        if len(params.bad_words) > MAX_BAD_WORDS_TOKEN_IDS:
            raise RequestLimitError(f"bad_words has {len(params.bad_words)} words, over the limit of "
                                    f"{MAX_BAD_WORDS_TOKEN_IDS}.", param="bad_words", code="request_limit_exceeded")

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        """A non-empty list of ids in [0, vocab_size) (a negative or huge id would crash the tokenizer)."""
        if not token_ids:
            raise InvalidRequestError(f"The {param} is empty: a request needs at least one prompt token.",
                                      param=param)
        self._check_vocab(param, token_ids)

    def check_context_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str = "prompt") -> None:
        check_context_length(num_prompt_tokens, max_tokens, self.max_model_len, param)

    def _check_vocab(self, param: str, token_ids) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{param} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}.", param=param)

    @staticmethod
    def _check_limit(param: str, value: int | None, limit: int, flag: str, unit: str = "") -> None:
        if value is not None and value > limit:
            what = f"{value} {unit}".strip()
            raise RequestLimitError(
                f"{param} is {what}, over this server's limit of {limit} ({flag}).", param=param,
                code="request_limit_exceeded")


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                         param: str = "prompt") -> None:
    """A prompt must be non-empty and leave room for one output token, and prompt + max_tokens
    must fit in max_model_len (the Scheduler also calls this: it must never hold such a request)."""
    if num_prompt_tokens == 0:
        raise InvalidRequestError(f"The {param} is empty: a request needs at least one prompt token.", param=param)
    if num_prompt_tokens >= max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens, which leaves no room for an output token. Please reduce "
            f"the length of the {param}, or raise --max-model-len.", param=param)
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} in "
            f"the completion). Please reduce the length of the {param} or completion, or raise "
            f"--max-model-len.", param="max_tokens")
