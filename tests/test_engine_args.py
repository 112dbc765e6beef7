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
                  "--logprobs-mode", "processed_logits", "--scheduling-policy", "priority",
                  "--long-prefill-token-threshold", "128", "--long-prefill-token-threshold-adaptive"])
    assert (args.long_prefill_token_threshold, args.long_prefill_token_threshold_adaptive) == (128, True)
    assert (EngineArgs().long_prefill_token_threshold, EngineArgs().long_prefill_token_threshold_adaptive) == (0, False)
    assert (args.max_model_len, args.enable_prefix_caching, args.num_gpu_blocks_override) == (512, False, 40)
    assert args.logprobs_mode == "processed_logits" and EngineArgs().logprobs_mode == "raw_logprobs"
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.scheduler_delay_factor) == (8, 64, 0.5)
    assert args.scheduling_policy == "priority" and EngineArgs().scheduling_policy == "fcfs"
    with pytest.raises(SystemExit):  # argparse's choices
        parse(["--scheduling-policy", "lifo"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=0), "--max-num-seqs"),
    (dict(max_num_active_seqs=0), "--max-num-active-seqs"),
    (dict(max_num_seqs=8, max_num_active_seqs=9), "max_num_active_seqs \\(9\\) cannot be greater than max_num_s"),
    (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
    (dict(swap_space=-1.0), "--swap-space"),
    (dict(tensor_parallel_size=0), "--tensor-parallel-size"),
    (dict(scheduler_delay_factor=-0.5), "--scheduler-delay-factor"),
    (dict(scheduler_delay_factor=float("nan")), "--scheduler-delay-factor"),
    (dict(logprobs_mode="logprobs"), "logprobs_mode='logprobs' is not one of"),
    (dict(scheduling_policy="lifo"), "scheduling_policy='lifo' is not one of"),
    (dict(stream_interval=0), "--stream-interval"),
    (dict(tokenizer_mode="mistral"), "tokenizer_mode='mistral' is not one of"),
    (dict(kv_cache_memory_bytes=0), "--kv-cache-memory-bytes"),
    (dict(kv_cache_memory_bytes=2**30, kv_cache_memory=1.0), "--kv-cache-memory \\(GiB\\) or --kv-cache-memory-bytes"),
    (dict(hf_overrides="rope_theta=1"), "hf_overrides must be a dict"),
    (dict(max_num_queued_reqs=-1), "--max-num-queued-reqs"),
    (dict(long_prefill_token_threshold=-1), "--long-prefill-token-threshold"),
    (dict(max_num_queued_tokens=-1), "--max-num-queued-tokens"),
    (dict(spec_tokens=2, speculative_config={"method": "ngram", "num_speculative_tokens": 3}),
     "--spec-tokens and --speculative-config\\['num_speculative_tokens'\\] are mutually exclusive"),
    (dict(spec_model="some/draft-model", spec_tokens=2), "draft model 'some/draft-model' is not supported"),
])
def test_bad_values_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)


def test_vllm_flags_with_their_value_formats():
    """--kv-cache-memory-bytes takes vLLM's human-readable sizes (K/M/G/T binary, k/m/g/t decimal)
    and becomes the pool's GiB; --hf-overrides is a JSON object; --stream-interval, --tokenizer-mode,
    --tokenizer-revision and --disable-sliding-window keep their values."""
    for text, size in (("4G", 4 * 2**30), ("1.5g", 1_500_000_000), ("512M", 512 * 2**20), ("123456", 123456)):
        args = parse(["--kv-cache-memory-bytes", text])
        assert (args.kv_cache_memory, args.kv_cache_memory_bytes) == (size / 2**30, None)
    assert EngineArgs().kv_cache_memory is None
    for bad in ("1.5G", "lots", "-"):
        with pytest.raises(SystemExit):
            parse(["--kv-cache-memory-bytes", bad])
    args = parse(["--hf-overrides", '{"max_position_embeddings": 64, "rope_theta": 5e5}', "--stream-interval", "8",
                  "--tokenizer-mode", "hf", "--tokenizer-revision", "v2", "--disable-sliding-window"])
    assert args.hf_overrides == {"max_position_embeddings": 64, "rope_theta": 5e5}
    assert (args.stream_interval, args.tokenizer_mode, args.tokenizer_revision) == (8, "hf", "v2")
    assert args.disable_sliding_window and not EngineArgs().disable_sliding_window
    for argv in (["--hf-overrides", "[1]"], ["--hf-overrides", "{bad"], ["--tokenizer-mode", "mistral"]):
        with pytest.raises(SystemExit):
            parse(argv)


def test_queue_limit_and_speculative_shorthand_flags():
    """vLLM's --max-num-queued-reqs / --max-num-queued-tokens (default: no limit) and its
    --spec-method / --spec-tokens, merged into speculative_config (the caller's dict untouched)."""
    args = parse(["--max-num-queued-reqs", "100", "--max-num-queued-tokens", "8192"])
    assert (args.max_num_queued_reqs, args.max_num_queued_tokens) == (100, 8192)
    assert (EngineArgs().max_num_queued_reqs, EngineArgs().max_num_queued_tokens) == (None, None)
    args = parse(["--spec-method", "ngram", "--spec-tokens", "3"])
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    assert (args.spec_method, args.spec_tokens) == (None, None)
    given = {"method": "ngram", "prompt_lookup_max": 4}
    args = EngineArgs(speculative_config=given, spec_tokens=2)
    assert args.speculative_config == {**given, "num_speculative_tokens": 2} and "num_speculative_tokens" not in given
    assert EngineArgs().speculative_config is None
