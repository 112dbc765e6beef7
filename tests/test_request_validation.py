"""RequestValidator: the one engine-side check of a request (vocabulary, context, limits).

Oracle: a plain restatement of each rule, checked over drawn requests (hypothesis), plus the
exact messages clients see (field, value, limit and flag)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpaged.config import EngineArgs
from jpaged.request_validation import (ContextLengthError, InvalidRequestError, RequestLimitError,
                                       RequestValidator, check_context_length)
from jpaged.sampling_params import SamplingParams

VALIDATOR = RequestValidator(vocab_size=100, max_model_len=32, max_logprobs=5, max_logit_bias=3,
                             max_stop_sequences=2, max_stop_token_ids=2, max_n=4)


@pytest.mark.parametrize("prompt, params, error, match", [
    ([], SamplingParams(), InvalidRequestError, r"The prompt is empty"),
    ([1, -1], SamplingParams(), InvalidRequestError, r"prompt has token ids outside the vocabulary \[0, 100\): \[-1\]"),
    ([100], SamplingParams(), InvalidRequestError, r"\[100\]"),
    ([10**30], SamplingParams(), InvalidRequestError, str(10**30)),
    ([1] * 32, SamplingParams(), ContextLengthError, r"maximum context length is 32 tokens.*32 input tokens"),
    ([1] * 20, SamplingParams(max_tokens=13), ContextLengthError, r"requested 33 tokens \(20 in the prompt, 13"),
    ([1], SamplingParams(n=5), RequestLimitError, r"n is 5, over this server's limit of 4 \(--max-n\)"),
    ([1], SamplingParams(logprobs=6), RequestLimitError, r"logprobs is 6, .* 5 \(--max-logprobs\)"),
    ([1], SamplingParams(prompt_logprobs=6), RequestLimitError, r"prompt_logprobs is 6.*--max-logprobs"),
    ([1], SamplingParams(stop=["a", "b", "c"]), RequestLimitError, r"stop is 3 strings.*--max-stop-sequences"),
    ([1], SamplingParams(stop_token_ids=[1, 2, 3]), RequestLimitError,
     r"stop_token_ids is 3 entries.*--max-stop-token-ids"),
    ([1], SamplingParams(logit_bias={1: 1, 2: 1, 3: 1, 4: 1}), RequestLimitError,
     r"logit_bias is 4 entries.*--max-logit-bias"),
    ([1], SamplingParams(stop_token_ids=[100]), InvalidRequestError, r"stop_token_ids has token ids outside"),
    ([1], SamplingParams(logit_bias={250: 1.0}), InvalidRequestError, r"logit_bias has token ids outside.*\[250\]"),
])
def test_each_rule_names_the_field_value_and_flag(prompt, params, error, match):
    with pytest.raises(error, match=match) as info:
        VALIDATOR.validate(prompt, params)
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working
    assert info.value.param is not None


def test_limits_come_from_engine_args_with_vllm_defaults():
    args = EngineArgs()
    limits = (args.max_logprobs, args.max_logit_bias, args.max_stop_sequences, args.max_stop_token_ids)
    assert limits == (20, 300, 64, 64)
    validator = RequestValidator.from_engine_args(EngineArgs(max_logprobs=7), vocab_size=10, max_model_len=8)
    assert validator.max_logprobs == 7 and validator.vocab_size == 10 and validator.max_model_len == 8
    with pytest.raises(ValueError, match="--max-logit-bias"):
        EngineArgs(max_logit_bias=-1)


def test_context_errors_carry_openai_code():
    with pytest.raises(ContextLengthError) as info:
        check_context_length(40, None, 32)
    assert info.value.code == "context_length_exceeded"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(prompt=st.lists(st.integers(-5, 105), max_size=40), max_tokens=st.none() | st.integers(1, 40),
       n=st.integers(1, 6), logprobs=st.none() | st.integers(0, 7),
       stop_ids=st.lists(st.integers(0, 110), max_size=3),
       bias=st.dictionaries(st.integers(0, 110), st.floats(-100, 100), max_size=4))
def test_accepts_exactly_what_the_rules_allow(prompt, max_tokens, n, logprobs, stop_ids, bias):
    params = SamplingParams(max_tokens=max_tokens, n=n, logprobs=logprobs, stop_token_ids=stop_ids,
                            logit_bias=bias)
    in_vocab = lambda ids: all(0 <= t < 100 for t in ids)  # noqa: E731
    allowed = (n <= 4 and (logprobs is None or logprobs <= 5) and len(stop_ids) <= 2 and len(bias) <= 3
               and len(prompt) > 0 and in_vocab(prompt) and len(prompt) < 32
               and (max_tokens is None or len(prompt) + max_tokens <= 32) and in_vocab(stop_ids) and in_vocab(bias))
    try:
        VALIDATOR.validate(prompt, params)
        accepted = True
    except InvalidRequestError:
        accepted = False
    assert accepted == allowed
