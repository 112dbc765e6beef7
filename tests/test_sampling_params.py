"""SamplingParams: vLLM's defaults, normalisation, greedy detection and validation messages."""

import pytest

from jpaged.sampling_params import RequestOutputKind, SamplingParams, SamplingType


def test_defaults_match_vllm():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (params.max_tokens, params.min_tokens, params.seed, params.ignore_eos) == (16, 0, None, False)
    assert (params.stop, params.stop_token_ids, params.logprobs, params.prompt_logprobs) == ([], [], None, None)
    assert params.skip_special_tokens and params.spaces_between_special_tokens and params.detokenize
    assert not params.include_stop_str_in_output
    assert params.logit_bias is None
    assert params.output_kind is RequestOutputKind.CUMULATIVE
    assert params.sampling_type is SamplingType.RANDOM


def test_normalisation():
    params = SamplingParams(stop="###", stop_token_ids=(5, 6), top_k=-1, logit_bias={"12": 3, 7: -1.5})
    assert params.stop == ["###"]
    assert params.stop_token_ids == [5, 6]
    assert params.top_k == 0
    assert params.logit_bias == {12: 3.0, 7: -1.5}
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=None).top_k == 0


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_low_temperature_is_greedy_and_turns_truncation_off(temperature):
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=5, min_p=0.2, seed=3)
    assert params.is_greedy and params.sampling_type is SamplingType.GREEDY
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.0, 1.0, 0, 0.0)


def test_sampling_type():
    assert SamplingParams(temperature=0.7).sampling_type is SamplingType.RANDOM
    assert SamplingParams(temperature=0.7, seed=0).sampling_type is SamplingType.RANDOM_SEED
    assert not SamplingParams(temperature=1e-5).is_greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logit_bias": {-4: 1.0}}, "logit_bias"),
        ({"output_kind": "delta"}, "output_kind"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_invalid_message_shows_the_value():
    with pytest.raises(ValueError, match=r"got 1\.5"):
        SamplingParams(top_p=1.5)


def test_max_tokens_none_is_allowed_and_min_tokens_unbounded():
    params = SamplingParams(max_tokens=None, min_tokens=50)
    assert params.max_tokens is None and params.min_tokens == 50


def test_clone_is_deep():
    params = SamplingParams(stop=["x"], logit_bias={1: 2.0}, seed=9)
    clone = params.clone()
    clone.stop.append("y")
    clone.logit_bias[3] = 1.0
    assert params.stop == ["x"] and params.logit_bias == {1: 2.0}
    assert clone.seed == 9 and clone == SamplingParams(stop=["x", "y"], logit_bias={1: 2.0, 3: 1.0}, seed=9)
