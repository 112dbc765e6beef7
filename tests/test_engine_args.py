"""EngineArgs as the source of CLI flags: names, value-less --model, and clear errors."""

import argparse

import pytest

from jpaged.config import EngineArgs


def parse(argv):
    return EngineArgs.from_cli_args(EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(argv))


def test_model_flag_without_a_value_means_the_default_model():
    assert parse(["--model"]).model is None
    assert parse([]).model is None
    assert parse(["--model", "some/model.gguf"]).model == "some/model.gguf"


def test_vllm_flag_names_and_booleans():
    args = parse(["--max-model-len", "512", "--no-enable-prefix-caching", "--num-gpu-blocks-override", "40",
                  "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--scheduler-delay-factor", "0.5",
                  "--logprobs-mode", "processed_logits", "--scheduling-policy", "priority"])
    assert (args.max_model_len, args.enable_prefix_caching, args.num_gpu_blocks_override) == (512, False, 40)
    assert args.logprobs_mode == "processed_logits" and EngineArgs().logprobs_mode == "raw_logprobs"
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.scheduler_delay_factor) == (8, 64, 0.5)
    assert args.scheduling_policy == "priority" and EngineArgs().scheduling_policy == "fcfs"
    with pytest.raises(SystemExit):  # argparse's choices
        parse(["--scheduling-policy", "lifo"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=0), "--max-num-seqs"),
    (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
    (dict(swap_space=-1.0), "--swap-space"),
    (dict(tensor_parallel_size=0), "--tensor-parallel-size"),
    (dict(scheduler_delay_factor=-0.5), "--scheduler-delay-factor"),
    (dict(scheduler_delay_factor=float("nan")), "--scheduler-delay-factor"),
    (dict(logprobs_mode="logprobs"), "logprobs_mode='logprobs' is not one of"),
    (dict(scheduling_policy="lifo"), "scheduling_policy='lifo' is not one of"),
])
def test_bad_values_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)
