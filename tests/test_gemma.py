"""Gemma 2 and Gemma 3 HF folders through the loader and the default CPU engine (C++ attention with
per-layer windows and soft caps, packed matmuls, the tied lm_head), against transformers' greedy
generate on the same weights; and the same weights as llama.cpp writes them to a .gguf. tests/test_models.py
covers the module against transformers' logits."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jpaged import LLM, SamplingParams
from jpaged.loaders import default_model_path, load_model
from jpaged.loaders.hf_names import params_to_hf_state_dict
from jpaged.models import llama
from jpaged.models.config import ModelConfig
from test_engine import assert_pool_free, count_compiles
from test_loaders import add_smollm2_tokenizer

# SmolLM2's vocabulary (the tokenizer of tiny_model_dir), 3 layers: windowed, full, windowed.
BASE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=1,
            eos_token_id=2, torch_dtype="float32", sliding_window=8)
CONFIGS = {
    "gemma2": dict(BASE, architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                   final_logit_softcapping=2.0),
    # Gemma 3 as its 1B checkpoint's config.json reads (no layer_types: the pattern gives them).
    "gemma3": dict(BASE, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window_pattern=2,
                   rope_theta=1_000_000.0, rope_local_base_freq=100.0, rope_scaling=None),
}
PROMPTS = ["The capital of France is", "Once upon a time, in a small village, there lived an old baker who",
           "def fibonacci(n):"]
MAX_TOKENS = 20


@pytest.fixture(scope="module", params=list(CONFIGS))
def gemma_dir(request, tmp_path_factory, tiny_model_dir):
    hf_config = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    config = ModelConfig.from_hf_config(hf_config, dtype="float32")
    params = llama.init_params(config, jax.random.key(7))
    # Weights larger than the dummy draw, so attention patterns (and windows) matter.
    params = jax.tree.map_with_path(lambda p, x: x if "norm" in str(p[-1]) else x * 4.0, params)
    save_file({k: np.ascontiguousarray(v) for k, v in params_to_hf_state_dict(params).items()},
              str(folder / "model.safetensors"))
    for name in tiny_model_dir.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(name, folder / name.name)
    return folder


def test_config_fields_from_the_checkpoints_config_json(gemma_dir):
    config = load_model(str(gemma_dir)).config
    assert config.tie_word_embeddings and config.norm_unit_offset and config.sandwich_norms
    assert config.hidden_act == "gelu_pytorch_tanh" and config.embed_scale == 8.0
    assert config.sliding_window == 8 and config.sliding_window_layers == (True, False, True)
    if config.architecture == "Gemma2ForCausalLM":
        assert (config.attn_logit_softcap, config.final_logit_softcap, config.sm_scale) == (0.5, 2.0, 24**-0.5)
        assert config.local_rope_theta is None and not config.qk_norm
    else:
        assert (config.rope_theta, config.local_rope_theta, config.sm_scale) == (1e6, 100.0, 0.25)
        assert config.qk_norm and config.attn_logit_softcap is None and config.final_logit_softcap is None


def test_engine_greedy_matches_transformers_generate(gemma_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_dir), dtype=torch.float32, attn_implementation="eager").eval()
    llm = LLM(str(gemma_dir), max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              num_gpu_blocks_override=32, compilation_cache_dir="", seed=0)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected, expected_logprobs = [], []
    with torch.no_grad():
        for ids in prompts:
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0, output_logits=True,
                                    return_dict_in_generate=True)
            tokens = out.sequences[0, len(ids):].tolist()
            expected.append(tokens)
            logprobs = [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(out.logits, tokens)]
            expected_logprobs.append(logprobs)  # through the final soft cap, where the model has one
    assert max(map(len, prompts)) + MAX_TOKENS > 2 * 8  # past the window
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    with count_compiles() as compiles:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    for output, logprobs in zip(outputs, expected_logprobs):
        got = [step[t].logprob for step, t in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)]
        np.testing.assert_allclose(got, logprobs, atol=1e-4)
    assert not compiles
    assert_pool_free(llm)


def _write_gguf(path, loaded, arch):
    """The model as llama.cpp's convert_hf_to_gguf.py writes a Gemma: F32 tensors, norms stored as
    1 + weight, sandwich norms named post_attention_norm / ffn_norm / post_ffw_norm, no lm_head
    (tied), SmolLM2's tokenizer."""
    gguf = pytest.importorskip("gguf")
    config, params = loaded.config, loaded.params
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_q_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcap)
        writer.add_final_logit_softcapping(config.final_logit_softcap)
    add_smollm2_tokenizer(writer, default_model_path())
    names = {"input_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
             "o_proj": "attn_output", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
             "attn_output_norm": "post_attention_norm", "mlp_input_norm": "ffn_norm",
             "mlp_output_norm": "post_ffw_norm", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down"}  # fmt: skip
    as_stored = lambda key, x: np.ascontiguousarray(x.T if x.ndim == 2 else x + np.float32(1.0))
    writer.add_tensor("token_embd.weight", np.asarray(params["embed"]))
    writer.add_tensor("output_norm.weight", as_stored("final_norm", np.asarray(params["final_norm"])))
    for i, layer in enumerate(params["layers"]):
        for key, array in layer.items():
            writer.add_tensor(f"blk.{i}.{names[key]}.weight", as_stored(key, np.asarray(array)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_as_llama_cpp_writes_it_loads_the_same_model(gemma_dir, tmp_path):
    """The same params (norms to float32 rounding of (1 + w) - 1) and config, except what llama.cpp
    fixes instead of storing: Gemma 3's windowed layers (five in six) and their RoPE base (10,000),
    and the score scale (head_dim ** -0.5 below the 27B models)."""
    hf = load_model(str(gemma_dir))
    arch = "gemma2" if hf.config.architecture == "Gemma2ForCausalLM" else "gemma3"
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, hf, arch)
    loaded = load_model(str(path))
    fixed = dict(query_pre_attn_scalar=float(hf.config.head_dim), rms_norm_eps=loaded.config.rms_norm_eps)
    if arch == "gemma3":
        fixed.update(sliding_window_layers=(True, True, True), local_rope_theta=10000.0)
    assert loaded.config == hf.config.replace(**fixed)
    assert jax.tree.structure(loaded.params) == jax.tree.structure(hf.params)
    for (path_, got), want in zip(jax.tree_util.tree_flatten_with_path(loaded.params)[0],
                                  jax.tree.leaves(hf.params)):
        tolerance = 1e-6 if "norm" in jax.tree_util.keystr(path_) else 0.0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tolerance, rtol=0)


def test_gemma3_checkpoint_with_a_vision_tower_serves_its_text_model(tiny_model_dir, tmp_path):
    """A Gemma 3 4B+ style folder (Gemma3ForConditionalGeneration; a text_config that lists only
    what differs from transformers' defaults; tensors under transformers 4's "language_model."
    beside a vision tower) loads its text model, which answers as transformers' whole model does
    on text: logits, and the engine's greedy tokens against generate."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text_config = dict(model_type="gemma3_text", vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=2,
                       rope_scaling=dict(rope_type="linear", factor=8.0))
    vision_config = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, image_size=28, patch_size=14)
    hf_config = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", text_config=text_config,
                     vision_config=vision_config, mm_tokens_per_image=4, eos_token_id=[1, 106], torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    for name in tiny_model_dir.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(name, tmp_path / name.name)
    config = ModelConfig.from_hf_config(hf_config, dtype="float32")
    assert (config.architecture, config.rope_theta, config.local_rope_theta, config.rms_norm_eps) == (
        "Gemma3ForCausalLM", 1e6, 1e4, 1e-6)
    assert config.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0} and config.eos_token_ids == (1, 106)
    params = jax.tree.map_with_path(lambda p, x: x if "norm" in str(p[-1]) else x * 4.0,
                                    llama.init_params(config, jax.random.key(3)))
    text_state = {k: np.array(v, order="C") for k, v in params_to_hf_state_dict(params).items()}
    model = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(**{k: v for k, v in hf_config.items() if k != "architectures"})).eval()
    vision_state = {k: v.numpy() for k, v in model.state_dict().items() if "language_model" not in k
                    and k != "lm_head.weight"}
    state = {"model.language_model." + k.removeprefix("model."): torch.from_numpy(v) for k, v in text_state.items()}
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    model.load_state_dict({**state, **{k: torch.from_numpy(v) for k, v in vision_state.items()}}, strict=True)
    # On disk as the hub's checkpoints are: transformers 4's names, the vision tower beside.
    on_disk = {"language_model." + k: v for k, v in text_state.items()}
    on_disk.update({k.removeprefix("model."): np.ascontiguousarray(v) for k, v in vision_state.items()})
    save_file(on_disk, str(tmp_path / "model.safetensors"))

    loaded = load_model(str(tmp_path))
    assert loaded.config.replace(eos_token_ids=config.eos_token_ids) == config  # (the tokenizer adds its EOS)
    ids = loaded.tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits.numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    logits = np.asarray(jax.jit(llama.forward_dense, static_argnums=1)(loaded.params, loaded.config,
                                                                       np.asarray([ids], np.int32)))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    llm = LLM(str(tmp_path), max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32, num_gpu_blocks_override=16,
              compilation_cache_dir="", seed=0)
    output = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert list(output[0].outputs[0].token_ids) == greedy
