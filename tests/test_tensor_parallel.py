"""Tensor parallel on 8 fake CPU devices (in a subprocess: the device count is fixed when jax
starts): greedy tokens at TP 1, 2 and 4 (and data parallel 2 x TP 2) identical, params and KV pool
sharded by the rules."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import TINY_HF_CONFIG
from jpaged.models.config import ModelConfig
from jpaged.models.llama import param_specs
from jpaged.sharding import TP_AXIS, logical_rules

CHECKS = os.path.join(os.path.dirname(__file__), "tensor_parallel_checks.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# KV heads 2: split at TP 2, replicated at TP 4 (the tiny Llama, tied embeddings).
# KV heads 4: split at TP 2 and 4 (Qwen2: q/k/v biases, untied lm_head).
QWEN2 = dict(TINY_HF_CONFIG, architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_attention_heads=8,
             num_key_value_heads=4, hidden_size=128, tie_word_embeddings=False)


def _model_dir(tmp_path, tiny_model_dir, name, hf_config):
    folder = tmp_path / name
    folder.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / file, folder / file)
    (folder / "config.json").write_text(json.dumps(hf_config))
    return str(folder)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("tp")
    models = {"llama": (_model_dir(tmp, tiny_model_dir, "llama", TINY_HF_CONFIG), "cpu"),
              "qwen2": (_model_dir(tmp, tiny_model_dir, "qwen2", QWEN2), "reference")}
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    # 94 s alone on a 2-core Zen 1 VM, 282 s there beside a second test run: room for a slow CI machine.
    done = subprocess.run([sys.executable, CHECKS] + [f"{d}:{b}" for d, b in models.values()], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {(name, r.get("dp"), r["tp"]): r for name, (d, _) in models.items() for r in lines if r["model"] == d}


@pytest.mark.slow
@pytest.mark.parametrize("name, hf_config", [("llama", TINY_HF_CONFIG), ("qwen2", QWEN2)])
def test_greedy_tokens_and_shardings_at_tp_1_2_4(tp_results, name, hf_config):
    config = ModelConfig.from_hf_config(hf_config, dtype="float32")
    single = tp_results[(name, None, 1)]["tokens"]
    assert len({tuple(t) for t in single}) == 3 and len(set(single[0])) > 6  # varied output, not a degenerate loop
    for tp in (2, 4):
        result = tp_results[(name, None, tp)]
        assert result["tokens"] == single, (name, tp)
        assert result["devices"] == list(range(tp))
        rules = logical_rules(config, tp)
        layer_specs = param_specs(config)["layers"][0]
        expected = {n: [rules.get(axis) for axis in s.axes] for n, s in layer_specs.items()}
        expected.update({n: [rules.get(axis) for axis in param_specs(config)[n].axes]
                         for n in ("embed", "final_norm", "lm_head") if n in param_specs(config)})
        assert result["shardings"] == expected
        split = config.num_kv_heads % tp == 0
        assert result["kv_pool"] == ([None, TP_AXIS] if split else [])
        assert result["kv_shard_shape"][1] == (config.num_kv_heads // tp if split else config.num_kv_heads)
        assert expected["q_proj"] == [None, TP_AXIS if split else None]
        assert expected["gate_proj"] == [None, TP_AXIS] and expected["down_proj"] == [TP_AXIS, None]
        assert expected["embed"] == [TP_AXIS, None]


@pytest.mark.slow
def test_tp_memory_script_splits_weights_and_kv():
    """scripts/tp_memory.py (docs/distributed.md's table) on the Llama-3-8B shape, TP 1 and 2."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "tp_memory.py"), "--models", "8b",
                           "--tp", "1", "2", "--json"], env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert 14.9 < one["weights_gib"] < 15.0  # Llama-3-8B in bf16: 8.03e9 params
    assert abs(two["weights_gib"] - one["weights_gib"] / 2) < 0.01
    assert two["kv_kib_per_token"] == one["kv_kib_per_token"] / 2 == 64
    assert 0 < two["step_gib"] < 1


@pytest.mark.slow
def test_data_parallel_replicas_of_tensor_parallel(tp_results):
    """2 replicas of TP 2 (devices 0-1 and 2-3) give the single-device tokens."""
    result = tp_results[("llama", 2, 2)]
    assert result["devices"] == [[0, 1], [2, 3]]
    assert result["tokens"] == tp_results[("llama", 1, 1)]["tokens"]


@pytest.mark.slow
def test_swapping_blocks_of_a_split_pool(tp_results):
    """TP 2 with 4 usable blocks and --swap-space: preempted requests' blocks go to the host and
    back (gathered from and scattered to both devices), and the tokens do not change."""
    result = tp_results[("llama", "swap", 2)]
    assert result["preemptions"] > 0 and result["kv_pool"] == [None, TP_AXIS]
    assert result["tokens"] == tp_results[("llama", None, 1)]["tokens"]


@pytest.mark.slow
def test_int8_weights_split_like_plain_weights(tp_results):
    """--quantization int8 at TP 2: the [out, in] int8 data and f32[out] scales split along the plain
    weight's rows/columns (q_proj by output heads, o_proj and down_proj by input); tokens as at TP 1."""
    one, two = tp_results[("llama", "int8-weights", 1)], tp_results[("llama", "int8-weights", 2)]
    assert two["tokens"] == one["tokens"]
    q, o, down = (two["shardings"][name] for name in ("q_proj", "o_proj", "down_proj"))
    assert q["data"] == [TP_AXIS, None] and q["scale"] == [TP_AXIS]
    assert o["data"] == [None, TP_AXIS] and o["scale"] == [None]
    assert down["data"] == [None, TP_AXIS] and down["scale"] == [None]


@pytest.mark.slow
def test_int8_kv_cache_scales_split_with_the_heads(tp_results):
    """--kv-cache-dtype int8 at TP 2: each device holds its KV heads' scales; tokens as on one device."""
    one, two = tp_results[("llama", "int8", 1)], tp_results[("llama", "int8", 2)]
    assert two["kv_scale"] == [TP_AXIS] and two["kv_pool"] == [None, TP_AXIS]
    assert two["tokens"] == one["tokens"]
