"""Loaders: HF folders, GGUF (the bundled SmolLM2 and a synthetic one), Orbax, hub ids, errors."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jpaged.generate import greedy_generate, main
from jpaged.loaders import ModelLoadError, load_model, save_orbax
from jpaged.loaders import gguf as gguf_loader
from jpaged.loaders.gguf_file import read_gguf
from jpaged.loaders.hf_names import params_to_hf_state_dict
from jpaged.models import llama

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model(smollm2_path)


def _assert_params_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _torch_model(path, **kwargs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return torch, model.eval()


# ---- HF folder ---------------------------------------------------------------------------------


def test_hf_folder_matches_transformers_logits_and_greedy(tiny, tiny_model_dir):
    assert tiny.config.dtype == "float32" and tiny.config.tie_word_embeddings
    torch, model = _torch_model(str(tiny_model_dir))
    ids = tiny.tokenizer.encode(PROMPTS[2])
    model.generation_config.eos_token_id = None  # compare 6 tokens whatever they are
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits.numpy()
        expected_greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
    logits = np.asarray(llama.forward_dense(tiny.params, tiny.config, jnp.asarray([ids])))
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)
    # The CLI's greedy loop gives transformers' greedy tokens.
    no_eos = dataclasses.replace(tiny, config=tiny.config.replace(eos_token_ids=()))
    assert greedy_generate(no_eos, ids, 6) == expected_greedy.tolist()


def test_sharded_safetensors_index(tiny, tiny_model_dir, tmp_path):
    for name in os.listdir(tiny_model_dir):
        if name != "model.safetensors":
            shutil.copy(tiny_model_dir / name, tmp_path / name)
    state = {k: np.ascontiguousarray(v) for k, v in params_to_hf_state_dict(tiny.params).items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_params_equal(load_model(str(tmp_path)).params, tiny.params)


def test_dtype_and_dummy_format(tiny_model_dir, tiny):
    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(
        np.asarray(bf16.params["embed"]), np.asarray(tiny.params["embed"].astype(jnp.bfloat16))
    )
    dummy = load_model(str(tiny_model_dir), load_format="dummy")
    assert jax.tree.map(lambda x: (x.shape, x.dtype), dummy.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), tiny.params
    )
    assert not np.array_equal(np.asarray(dummy.params["embed"]), np.asarray(tiny.params["embed"]))


# ---- Orbax -------------------------------------------------------------------------------------


def test_orbax_round_trip_is_bit_identical(tiny, tmp_path):
    save_orbax(tiny, str(tmp_path / "ckpt"))
    restored = load_model(str(tmp_path / "ckpt"))
    assert restored.config == tiny.config
    _assert_params_equal(restored.params, tiny.params)
    assert restored.tokenizer.encode(PROMPTS[0]) == tiny.tokenizer.encode(PROMPTS[0])
    assert restored.tokenizer.hf.chat_template == tiny.tokenizer.hf.chat_template
    as_bf16 = load_model(str(tmp_path / "ckpt"), dtype="bfloat16")  # restored straight to bf16
    assert {x.dtype for x in jax.tree.leaves(as_bf16.params)} == {jnp.dtype(jnp.bfloat16)}


# ---- GGUF --------------------------------------------------------------------------------------


def _llama_cpp_permute(weight, num_heads):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (written independently here)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def add_smollm2_tokenizer(writer, smollm2_path):
    """Writes the bundled SmolLM2's tokenizer (BPE vocabulary, merges, chat template) to a
    gguf.GGUFWriter, with BOS 1 and EOS 2."""
    meta = read_gguf(smollm2_path).metadata
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(meta["tokenizer.chat_template"])


def _write_tiny_gguf(path, tiny, smollm2_path, qtypes=None):
    """A GGUF of the tiny model, Q/K permuted as llama.cpp does, with SmolLM2's tokenizer.

    qtypes: {jpaged key ("embed", "q_proj", ...): gguf.GGMLQuantizationType} for tensors to
    quantize (gguf.quants.quantize); the others are F32."""
    gguf = pytest.importorskip("gguf")
    qtypes = qtypes or {}

    def add(name, key, array):
        if key in qtypes:
            writer.add_tensor(name, gguf.quants.quantize(array, qtypes[key]), raw_dtype=qtypes[key])
        else:
            writer.add_tensor(name, array)

    config = tiny.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_q_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    add_smollm2_tokenizer(writer, smollm2_path)
    names = {"input_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
             "o_proj": "attn_output", "post_attention_norm": "ffn_norm", "gate_proj": "ffn_gate",
             "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    add("token_embd.weight", "embed", np.asarray(tiny.params["embed"]))
    writer.add_tensor("output_norm.weight", np.asarray(tiny.params["final_norm"]))
    for i, layer in enumerate(tiny.params["layers"]):
        for key, name in names.items():
            array = np.asarray(layer[key])
            array = array.T if array.ndim == 2 else array  # GGUF rows are output features
            if key in ("q_proj", "k_proj"):
                heads = config.num_q_heads if key == "q_proj" else config.num_kv_heads
                array = _llama_cpp_permute(array, heads)
            add(f"blk.{i}.{name}.weight", key, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_synthetic_gguf_round_trip_undoes_the_qk_permutation(tiny, smollm2_path, tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, tiny, smollm2_path)
    loaded = load_model(str(path))
    assert loaded.config.rms_norm_eps == pytest.approx(1e-5)  # stored as float32 in GGUF
    assert loaded.config == tiny.config.replace(rms_norm_eps=loaded.config.rms_norm_eps)
    _assert_params_equal(loaded.params, tiny.params)

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) - 1000])
    with pytest.raises(ModelLoadError, match="truncated.gguf is truncated: tensor"):
        load_model(str(truncated))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="header.gguf is not a readable GGUF file"):
        load_model(str(header_only))


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loading(smollm2, smollm2_path):
    config = smollm2.config
    assert (config.num_layers, config.hidden_size, config.num_q_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.dtype == "float32"
    torch, model = _torch_model(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
    prompts = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)  # right padding: causal
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    with torch.no_grad():
        expected = model(torch.from_numpy(ids).long()).logits.numpy()
    logits = np.asarray(jax.jit(llama.forward_dense, static_argnums=1)(smollm2.params, config, jnp.asarray(ids)))
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        np.testing.assert_allclose(logits[row, :n], expected[row, :n], atol=2e-3, rtol=1e-4)
        assert (logits[row, :n].argmax(-1) == expected[row, :n].argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_greedy_chat_answer(smollm2, capsys, smollm2_path):
    tokenizer = smollm2.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    output = greedy_generate(smollm2, tokenizer.encode(text, add_special_tokens=False), max_tokens=12)
    assert "Paris" in tokenizer.decode(output)


def test_generate_cli_matches_the_dense_greedy_oracle(tiny, tiny_model_dir, capsys):
    prompt = "Once upon a time"
    expected = tiny.tokenizer.decode(greedy_generate(tiny, tiny.tokenizer.encode(prompt), 8))
    assert main(["--model", str(tiny_model_dir), "--prompt", prompt, "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["--model", str(tiny_model_dir / "nope"), "--prompt", "Hello"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- Hub ids -----------------------------------------------------------------------------------


def test_hub_id_from_local_cache(tiny_model_dir, tiny, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    snapshot = tmp_path / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_model("acme/tiny-llama")
    assert loaded.model_path == str(snapshot)
    _assert_params_equal(loaded.params, tiny.params)


def test_tokenizer_revision_reads_the_hub_models_tokenizer_at_that_revision(tiny_model_dir, tmp_path, monkeypatch):
    """vLLM's --tokenizer-revision: the weights at --revision (main), the tokenizer at its own."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    repo = tmp_path / "models--acme--tiny-llama"
    for commit, ref, template in (("a" * 40, "main", "{{ 'main' }}"), ("b" * 40, "v2", "{{ 'v2' }}")):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
        (repo / "snapshots" / commit / "chat_template.jinja").write_text(template)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for tokenizer_revision, template in ((None, "main"), ("main", "main"), ("v2", "v2")):
        loaded = load_model("acme/tiny-llama", load_format="dummy", tokenizer_revision=tokenizer_revision)
        assert loaded.model_path == str(repo / "snapshots" / ("a" * 40))
        assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == template
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        load_model("acme/tiny-llama", load_format="dummy", tokenizer_revision="v3")


def test_hf_token_reaches_the_hub_download(tiny_model_dir, tmp_path, monkeypatch):
    """--hf-token: a gated repo's download gets the token (here the download is a stand-in)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: calls.append((repo_id, kwargs["token"])) or str(tiny_model_dir))
    loaded = load_model("acme/gated-llama", load_format="dummy", hf_token="hf_secret")
    assert calls == [("acme/gated-llama", "hf_secret")] and loaded.model_path == str(tiny_model_dir)


def test_hf_overrides_replace_config_fields_of_folders_and_gguf_files(tiny_model_dir, smollm2_path, tmp_path):
    overrides = {"architectures": ["MistralForCausalLM"], "sliding_window": 48, "rope_theta": 1234.0}
    config = load_model(str(tiny_model_dir), load_format="dummy", hf_overrides=overrides).config
    assert (config.architecture, config.sliding_window, config.rope_theta) == ("MistralForCausalLM", 48, 1234.0)
    assert load_model(str(tiny_model_dir), load_format="dummy").config.rope_theta != 1234.0
    gguf = gguf_loader.read_gguf_config(read_gguf(smollm2_path), "float32", {"max_position_embeddings": 512})
    assert gguf.max_position_embeddings == 512
    assert gguf_loader.read_gguf_config(read_gguf(smollm2_path), "float32").max_position_embeddings == 8192
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(str(tiny_model_dir), load_format="dummy", hf_overrides={"architectures": ["GPT2LMHeadModel"]})


def test_hub_id_offline_gives_clear_error(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"'acme/not-cached'.*not in the Hugging Face cache.*offline"):
        load_model("acme/not-cached")


# ---- Errors ------------------------------------------------------------------------------------


def _copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_wrong_path_and_format(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing-model"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="--load-format gguf needs a .gguf file"):
        load_model(str(tiny_model_dir), load_format="gguf")
    with pytest.raises(ModelLoadError, match="--load-format 'pt'"):
        load_model(str(tiny_model_dir), load_format="pt")
    with pytest.raises(ModelLoadError, match="--dtype 'float64' is not one of auto, float32"):
        load_model(str(tiny_model_dir), dtype="float64")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelLoadError, match=r"garbage.gguf is not a GGUF file .*b'PK"):
        load_model(str(garbage))


def test_error_unsupported_architecture(tiny_model_dir, tmp_path):
    folder = _copy_folder(tiny_model_dir, tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match=r"config.json.*unsupported architecture.*GPT2LMHeadModel"):
        load_model(str(folder))


def test_error_truncated_safetensors_and_wrong_shape(tiny_model_dir, tmp_path):
    folder = _copy_folder(tiny_model_dir, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file"):
        load_model(str(folder))

    folder = _copy_folder(tiny_model_dir, tmp_path / "wrong_shape")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.\d\.mlp\.\w+\.weight has shape .*config.json implies \((96, 64|64, 96)\)"):
        load_model(str(folder))

    folder = _copy_folder(tiny_model_dir, tmp_path / "no_weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="neither model.safetensors nor .*--load-format dummy"):
        load_model(str(folder))
    assert load_model(str(folder), load_format="dummy").config.num_layers == 2


def test_tokenizer_and_chat_template_overrides(tiny_model_dir, smollm2_path, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}|{% endfor %}")
    loaded = load_model(str(tiny_model_dir), tokenizer=smollm2_path, chat_template=str(template))
    assert loaded.tokenizer.hf.name_or_path == smollm2_path  # built from the GGUF's metadata
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a|b|"
