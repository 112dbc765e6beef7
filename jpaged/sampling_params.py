"""Sampling parameters for one request, with vLLM's names, defaults and validation."""

import copy
import dataclasses
import enum

from jpaged.structured_output.params import StructuredOutputsParams

# Temperatures below this are greedy: dividing logits by them would overflow float32.
_SAMPLING_EPS = 1e-5
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound on logprob_token_ids


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries all the text and tokens so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclasses.dataclass
class RepetitionDetectionParams:
    """vLLM's: end a request (finish_reason "repetition", stop_reason "repetition_detected") once
    its output ends in a pattern of min_pattern_size..max_pattern_size tokens repeated min_count
    times in a row (e.g. "abcabcabc": size 3, count 3), such as a small model looping. Checked
    after each token, once min_tokens are out. max_pattern_size 0: off."""

    max_pattern_size: int = 0
    min_pattern_size: int = 0  # 0: 1
    min_count: int = 0

    def __post_init__(self) -> None:
        for name in ("max_pattern_size", "min_pattern_size", "min_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"repetition_detection needs an integer {name}, got {value!r}.")
        if self.max_pattern_size < 0 or self.min_pattern_size < 0 or self.min_pattern_size > self.max_pattern_size:
            raise ValueError("repetition_detection needs max_pattern_size and min_pattern_size >= 0, with "
                             f"min_pattern_size <= max_pattern_size (got {self.min_pattern_size} and "
                             f"{self.max_pattern_size}); both 0 turn detection off.")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise ValueError(f"repetition_detection needs min_count >= 2 to detect a repetition, got "
                             f"{self.min_count} (max_pattern_size 0 turns detection off).")

    def ends_in_repetition(self, token_ids: list[int]) -> bool:
        """Whether token_ids ends with a pattern of an allowed size repeated min_count times."""
        for size in range(max(self.min_pattern_size, 1), self.max_pattern_size + 1):
            span = size * self.min_count
            if span > len(token_ids):
                return False
            tail = token_ids[-size:]
            start = len(token_ids) - span
            if all(token_ids[start + k * size:start + (k + 1) * size] == tail for k in range(self.min_count - 1)):
                return True
        return False


@dataclasses.dataclass
class SamplingParams:
    """How to sample the completion of one prompt (vLLM's fields and defaults).

    `__post_init__` validates every field (ValueError naming the field and its value) and
    normalises: `stop` -> list[str], `stop_token_ids` -> list[int], `top_k` -1/None -> 0 (off),
    `logit_bias` keys -> int, `bad_words` None -> [] (duplicates dropped); a temperature below
    1e-5 becomes exactly 0.0 (greedy), and greedy turns top_p/top_k/min_p off. `max_tokens=None`
    means "up to the model's context length" (the scheduler resolves it per request).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0, -1 or None: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per sampled token (plus the sampled one)
    prompt_logprobs: int | None = None  # top logprobs per prompt token
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # only these may be sampled (jpaged/token_restrictions.py)
    bad_words: list[str] | None = None  # words never generated (their last token is banned after the rest)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Streamed outputs (CUMULATIVE, DELTA) once this many new tokens are ready, the first token and the
    # finish at once; None or below the engine's --stream-interval: the engine's.
    stream_interval: int | None = None
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (jpaged.structured_output)
    # End the request when its output starts repeating itself (a dict of the fields is accepted too).
    repetition_detection: RepetitionDetectionParams | None = None
    # Most reasoning tokens before the end marker is forced (jpaged/reasoning.py); -1 or None: no limit.
    # Needs the engine's reasoning_parser or reasoning_config.
    thinking_token_budget: int | None = None
    # True: this request finds no prefix in the cache (its blocks are still cached for later
    # ones); None: True exactly when prompt_logprobs is set (they need every prompt token computed).
    skip_reading_prefix_cache: bool | None = None
    # Token ids whose logprobs each sampled token reports in place of the top ones (e.g. a
    # classifier's label tokens; vLLM's), at most MAX_LOGPROB_TOKEN_IDS; with logprobs unset,
    # they alone turn logprobs on.
    logprob_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if type(self.thinking_token_budget) is int and self.thinking_token_budget == -1:
            self.thinking_token_budget = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else [int(t) for t in self.stop_token_ids]
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
        self.bad_words = [] if self.bad_words is None else list(dict.fromkeys(self.bad_words))
        if self.logprob_token_ids is not None:
            self.logprob_token_ids = [int(t) for t in self.logprob_token_ids]
        self._verify_args()
        if self.skip_reading_prefix_cache is None:
            self.skip_reading_prefix_cache = self.prompt_logprobs is not None
        if self.temperature < _SAMPLING_EPS:
            self.temperature = 0.0
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0

    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}.")
        if "" in self.stop:
            raise ValueError("stop cannot contain an empty string.")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids}.")
        if self.logit_bias is not None and any(t < 0 for t in self.logit_bias):
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {sorted(self.logit_bias)}.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty: leave it unset to allow every token.")
        if self.allowed_token_ids is not None and any(t < 0 for t in self.allowed_token_ids):
            raise ValueError(f"allowed_token_ids must be non-negative token ids, got {self.allowed_token_ids[:8]}.")
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise ValueError(f"bad_words must be non-blank strings, got {self.bad_words[:8]!r}.")
        if self.stream_interval is not None and (not isinstance(self.stream_interval, int) or self.stream_interval < 1):
            raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval!r}.")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}.")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}.")
        if self.logprob_token_ids is not None and not 0 < len(self.logprob_token_ids) <= MAX_LOGPROB_TOKEN_IDS:
            raise ValueError(f"logprob_token_ids must list 1 to {MAX_LOGPROB_TOKEN_IDS} token ids, got "
                             f"{len(self.logprob_token_ids)}.")
        if self.logprob_token_ids is not None and any(t < 0 for t in self.logprob_token_ids):
            raise ValueError(f"logprob_token_ids must be non-negative token ids, got {self.logprob_token_ids[:8]}.")
        if self.skip_reading_prefix_cache is False and self.prompt_logprobs is not None:
            raise ValueError("skip_reading_prefix_cache cannot be False with prompt_logprobs: they need every "
                             "prompt token computed.")
        budget = self.thinking_token_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError("thinking_token_budget must be a non-negative integer or -1 for unlimited, "
                             f"got {budget!r}.")
        if isinstance(self.repetition_detection, dict):
            unknown = sorted(set(self.repetition_detection) - {f.name for f in dataclasses.fields(
                RepetitionDetectionParams)})
            if unknown:
                raise ValueError(f"repetition_detection has unknown fields {unknown}; its fields are "
                                 "max_pattern_size, min_pattern_size and min_count.")
            self.repetition_detection = RepetitionDetectionParams(**self.repetition_detection)
        if self.repetition_detection is not None and not isinstance(self.repetition_detection,
                                                                    RepetitionDetectionParams):
            raise ValueError(f"repetition_detection must be a RepetitionDetectionParams, got "
                             f"{self.repetition_detection!r}.")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature == 0.0:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def restricts_tokens(self) -> bool:
        """Whether allowed_token_ids or bad_words limit what may be sampled (a token bitmask row)."""
        return self.allowed_token_ids is not None or bool(self.bad_words)

    @property
    def num_logprobs(self) -> int | None:
        """Logprob entries per sampled token besides its own (vLLM's): logprobs, else as many as
        logprob_token_ids lists; None when neither asks for logprobs."""
        if self.logprobs is not None:
            return self.logprobs
        return None if self.logprob_token_ids is None else len(self.logprob_token_ids)

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler adjusts logits by the tokens seen (presence, frequency, repetition)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self) -> "SamplingParams":
        """A deep copy (the engine gives each of n child requests its own)."""
        return copy.deepcopy(self)
