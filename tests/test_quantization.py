"""Quantized weights: the formats against their oracles, the loaders, byte counts, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jpaged import LLM, EngineArgs, SamplingParams
from jpaged.generate import greedy_generate
from jpaged.loaders import ModelLoadError, load_model, save_orbax
from jpaged.loaders.gguf import load_gguf_params
from jpaged.loaders.gguf_file import read_gguf
from jpaged.loaders.hf_names import LAYER_NAMES, params_to_hf_state_dict
from jpaged.models import llama
from jpaged.models.attention_metadata import AttentionMetadata
from jpaged.models import quantization as q
from pallas_kernels import cpu as cpu_kernels
from pallas_kernels import reference
from test_loaders import _write_tiny_gguf

gguf = pytest.importorskip("gguf")
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}
E4M3_HALF_ULP = 2.0**-4  # e4m3 keeps 3 mantissa bits: rounding to nearest errs by <= 2^-4 relative
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10  # below 2^-6 the spacing is 2^-9 (times the scale)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _is_quantized(x):
    return isinstance(x, q.QuantizedWeight)


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_per_channel_linear_within_the_rounding_bound(fmt):
    w = _random((96, 160), 0) * np.linspace(0.01, 2.0, 160, dtype=np.float32)  # [in, out], varied channels
    w[:, 7] = 0.0  # an all-zero channel dequantizes to zeros
    x = _random((5, 96), 1)
    weight = q.quantize(w.T, fmt)
    assert weight.data.dtype == (jnp.int8 if fmt == "int8" else jnp.float8_e4m3fn)
    assert weight.data.shape == (160, 96) and weight.scale.dtype == jnp.float32 and weight.scale.shape == (160,)
    assert weight.nbytes == 160 * 96 + 160 * 4
    scale = np.asarray(weight.scale)
    if fmt == "int8":  # round to nearest on the grid of `scale`: |w - w~| <= scale / 2 per element
        element_bound = np.broadcast_to(scale / 2, w.shape)
    else:
        element_bound = np.abs(w) * E4M3_HALF_ULP + scale * E4M3_SUBNORMAL_HALF_STEP
    deq = np.asarray(q.dequantize(weight)).T
    assert (np.abs(deq - w) <= element_bound * (1 + 1e-6)).all()
    y = np.asarray(jax.jit(q.linear)(jnp.asarray(x), weight))
    bound = np.abs(x) @ element_bound + 1e-5 * (np.abs(x) @ np.abs(w))  # + f32 accumulation
    assert (np.abs(y - x @ w) <= bound).all()
    assert np.abs(y[:, 7]).max() == 0.0


def test_cpu_programs_fuse_the_conversion_into_the_dot():
    """With quantization.compiler_options, XLA:CPU never materialises a converted f32 weight
    (its default writes one f32[out, in] copy per weight before the dot); results are unchanged."""
    weight = q.quantize(_random((192, 64), 5), "int8")
    x = jnp.asarray(_random((8, 64), 6))
    options = q.compiler_options({"w": weight}, "cpu")
    assert q.compiler_options({"w": jnp.zeros(3)}, "cpu") == {} and q.compiler_options({"w": weight}, "gpu") == {}

    def top_level_f32_weight_copies(compiled):
        entry = compiled.as_text().split("ENTRY")[1]
        return [line for line in entry.splitlines() if "= f32[192,64]" in line]

    fused = jax.jit(q.linear, compiler_options=options).lower(x, weight).compile()
    default = jax.jit(q.linear).lower(x, weight).compile()
    assert top_level_f32_weight_copies(default) and not top_level_f32_weight_copies(fused)
    np.testing.assert_array_equal(np.asarray(fused(x, weight)), np.asarray(default(x, weight)))


@pytest.mark.parametrize("fmt", q.GGUF_FORMATS)
def test_gguf_blocks_dequantize_exactly_like_the_gguf_package(fmt):
    out, cols = 2304, 512  # 16 blocks per row; linear takes it in two chunks of 1152 rows
    w = _random((out, cols), 2) * 0.05
    raw = gguf.quants.quantize(w, QTYPES[fmt])  # u8[out, bytes per row]
    weight = q.from_gguf_blocks(raw, fmt)
    expect = gguf.quants.dequantize(raw, QTYPES[fmt])
    np.testing.assert_array_equal(np.asarray(jax.jit(q.dequantize)(weight)), expect)
    data_bytes = out * cols if fmt == "q8_0" else out * cols // 2
    assert weight.nbytes == raw.nbytes == data_bytes + out * 16 * (4 if fmt == "q4_1" else 2)
    assert weight.scale.dtype == jnp.float16 and weight.shape == (out, cols)
    # linear and the embedding gather see the same weights
    x = _random((2, 3, cols), 3)
    np.testing.assert_allclose(np.asarray(jax.jit(q.linear)(jnp.asarray(x), weight)), x @ expect.T, rtol=1e-5, atol=1e-5)
    ids = jnp.asarray([[5, 0], [2303, 5]])
    np.testing.assert_array_equal(np.asarray(q.embed(weight, ids, jnp.float32)), expect[np.asarray(ids)])


def test_embed_and_tied_logits_with_a_quantized_table(tiny):
    config = tiny.config
    table = q.quantize(np.asarray(tiny.params["embed"]), "int8")  # rows: vocabulary entries
    params = {**tiny.params, "embed": table}
    hidden = jnp.asarray(_random((4, config.hidden_size), 4))
    deq = np.asarray(q.dequantize(table))
    np.testing.assert_allclose(np.asarray(llama.compute_logits(params, config, hidden)), np.asarray(hidden) @ deq.T,
                               rtol=1e-5, atol=1e-5)
    ids = jnp.asarray([3, 49151, 3])
    np.testing.assert_array_equal(np.asarray(q.embed(table, ids, jnp.float32)), deq[np.asarray(ids)])


# ---- loaders -------------------------------------------------------------------------------------


def test_int8_params_are_int8_in_memory(tiny_model_dir, tiny):
    loaded = load_model(str(tiny_model_dir), quantization="int8")
    layer, plain = loaded.params["layers"][0], tiny.params["layers"][0]
    for key in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        w = np.asarray(plain[key])  # [in, out]
        assert layer[key].format == "int8" and layer[key].data.dtype == jnp.int8
        assert layer[key].data.shape == w.shape[::-1] and layer[key].nbytes == w.size + w.shape[1] * 4
        assert np.abs(np.asarray(q.dequantize(layer[key])).T - w).max() <= np.asarray(layer[key].scale).max() / 2
    assert loaded.params["embed"].dtype == jnp.float32  # kept in the model dtype (see quantize_params)
    linear_floats = sum(w.size for w in jax.tree.leaves(tiny.params["layers"]) if w.ndim == 2)
    saved = q.param_bytes(tiny.params) - q.param_bytes(loaded.params)
    assert saved == linear_floats * 3 - sum(w.shape[1] * 4 for w in jax.tree.leaves(tiny.params["layers"]) if w.ndim == 2)


def test_kept_gguf_equals_the_dequantized_load(tiny, smollm2_path, tmp_path):
    """Q4_0, Q4_1 and Q8_0 tensors (Q/K permuted by llama.cpp), kept as blocks: dequantized, they are
    exactly the weights the dequantize-at-load path holds."""
    qtypes = {"embed": QTYPES["q8_0"], "q_proj": QTYPES["q4_1"], "k_proj": QTYPES["q4_0"], "v_proj": QTYPES["q8_0"],
              "o_proj": QTYPES["q4_1"], "gate_proj": QTYPES["q4_0"], "up_proj": QTYPES["q4_1"],
              "down_proj": QTYPES["q8_0"]}
    path = tmp_path / "tiny_q.gguf"
    _write_tiny_gguf(path, tiny, smollm2_path, qtypes)
    gguf_file = read_gguf(str(path))  # the loader itself: load_model would also build the tokenizer
    plain = load_gguf_params(gguf_file, tiny.config)
    kept = load_gguf_params(gguf_file, tiny.config, q.GGUF_FORMATS, keep_embedding=True)
    pairs = zip(jax.tree.leaves_with_path(plain), jax.tree.leaves(kept, is_leaf=_is_quantized))
    num_kept = 0
    for (key_path, a), b in pairs:
        key = key_path[-1].key
        if key in qtypes:
            num_kept += 1
            assert b.format == qtypes[key].name.lower()
            deq = np.asarray(q.dequantize(b))
            np.testing.assert_array_equal(deq if key == "embed" else deq.T, np.asarray(a))
        else:
            assert not _is_quantized(b)
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert num_kept == 1 + 7 * tiny.config.num_layers
    # int8 keeps the Q8_0 linears as they are and quantizes the rest per channel
    int8 = load_model(str(path), quantization="int8")
    layer = int8.params["layers"][0]
    assert layer["v_proj"].format == "q8_0" and layer["q_proj"].format == "int8"
    assert not _is_quantized(int8.params["embed"])
    with pytest.raises(ValueError, match="save_orbax saves unquantized params only"):
        save_orbax(int8, str(tmp_path / "orbax"))


@pytest.mark.skipif(not cpu_kernels.is_available(), reason=f"no CPU kernel: {cpu_kernels.load_error()}")
def test_packed_gguf_blocks_compute_exactly_what_the_dequantized_weights_do(tiny, smollm2_path, tmp_path):
    """pack_linears turns kept Q4_0 / Q4_1 / Q8_0 blocks (Q/K permuted by llama.cpp) into q4 / q8
    panels, in a float32 step only; the model's logits over them are bit for bit those over the
    float32 panels of the dequantize-at-load weights."""
    qtypes = {"embed": QTYPES["q8_0"], "q_proj": QTYPES["q4_1"], "k_proj": QTYPES["q4_0"], "v_proj": QTYPES["q8_0"],
              "o_proj": QTYPES["q4_1"], "gate_proj": QTYPES["q4_0"], "up_proj": QTYPES["q4_1"],
              "down_proj": QTYPES["q4_1"]}
    path = tmp_path / "tiny_q.gguf"
    _write_tiny_gguf(path, tiny, smollm2_path, qtypes)
    gguf_file = read_gguf(str(path))
    plain = q.pack_linears(load_gguf_params(gguf_file, tiny.config))
    kept = load_gguf_params(gguf_file, tiny.config, q.GGUF_FORMATS, keep_embedding=True)
    assert _kinds(q.pack_linears(kept, dtype="bfloat16")) == {"q4_0", "q4_1", "q8_0"}  # x would not be f32
    packed = q.pack_linears(kept)
    assert _kinds(packed) == {"packed uint8", "packed int8", "q8_0"}  # q8_0: the embedding, gathered
    assert packed["lm_head"].shape == (tiny.config.hidden_size, tiny.config.vocab_size)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, tiny.config.vocab_size, (3, 40)), jnp.int32)
    forward = jax.jit(llama.forward_dense, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(forward(packed, tiny.config, tokens)),
                                  np.asarray(forward(plain, tiny.config, tokens)))


@pytest.mark.skipif(not cpu_kernels.is_available(), reason=f"no CPU kernel: {cpu_kernels.load_error()}")
def test_decode_rows_take_the_vector_path_and_prompt_rows_the_tiles(tiny, smollm2_path, tmp_path):
    """The model hands AttentionMetadata.num_decode_tokens to every q4 linear: a step's first
    num_decode_tokens rows come out bit for bit as with every row on the vector path (None),
    the rest as with every row on the path prompt rows take (0: AMX tiles where the CPU has
    them, else the vector path too). The step: two one-token sequences, then a 10-token prompt."""
    layers = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    path = tmp_path / "tiny_q4.gguf"
    _write_tiny_gguf(path, tiny, smollm2_path, {key: QTYPES["q4_1"] for key in layers})
    config = tiny.config
    params = q.pack_linears(load_gguf_params(read_gguf(str(path)), config, q.GGUF_FORMATS, keep_embedding=True))
    assert "packed uint8" in _kinds(params)
    block_size, q_lens = 16, [1, 1, 10]
    positions = np.concatenate([np.arange(n) for n in q_lens]).astype(np.int32)
    slots = np.concatenate([(i + 1) * block_size + np.arange(n) for i, n in enumerate(q_lens)]).astype(np.int32)
    tokens = jnp.asarray(np.random.default_rng(3).integers(100, 40000, len(positions)), jnp.int32)
    shape = reference.get_kv_cache_shape(len(q_lens) + 1, block_size, config.num_kv_heads, config.head_dim)

    def hidden(num_decode_tokens):
        meta = AttentionMetadata(slot_mapping=jnp.asarray(slots), block_tables=jnp.arange(1, 4, dtype=jnp.int32)[:, None],
                                 kv_lens=jnp.asarray(q_lens, jnp.int32), cu_q_lens=jnp.asarray([0, 1, 2, 12], jnp.int32),
                                 num_decode_tokens=num_decode_tokens)
        cache = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(config.num_layers)]
        out, _ = llama.forward(params, config, tokens, jnp.asarray(positions), cache, meta,
                               reference.ragged_paged_attention, reference.write_kv)
        return np.asarray(out)

    vector, tiles, split = hidden(None), hidden(jnp.int32(0)), hidden(jnp.int32(2))
    np.testing.assert_array_equal(split[:2], vector[:2])
    np.testing.assert_array_equal(split[2:], tiles[2:])
    np.testing.assert_allclose(tiles, vector, rtol=1e-4, atol=1e-5)
    # Whether this CPU has the tile path, asked of the kernel itself: their sums round differently.
    probe = params["layers"][0]["q_proj"]
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, config.hidden_size)), jnp.float32)
    kernel_tiles = [np.asarray(cpu_kernels.packed_matmul(x, probe.panels, probe.out_features, scale=probe.scale,
                                                         offset=probe.offset, vector_rows=rows)) for rows in (None, 0)]
    assert (tiles != vector).any() == (kernel_tiles[0] != kernel_tiles[1]).any()


def _write_compressed_tensors_checkpoint(folder, tiny, tiny_model_dir, strategy="channel"):
    """An HF folder as llm-compressor saves a W8A16 int8 model: int8 `weight` [out, in] plus
    `weight_scale` ([out, 1] per channel or [1] per tensor) for every projection; the rest f32."""
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "naive-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "group_size": None,
            "dynamic": False}}},
        "ignore": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    state = params_to_hf_state_dict(tiny.params)
    expected = {}
    for name in [n for n in state if n.endswith("_proj.weight")]:
        w = state[name]  # [out, in]
        scale = np.abs(w).max(axis=1, keepdims=True) / 127 if strategy == "channel" else np.abs(w).max(keepdims=True)[0] / 127
        state[name] = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        state[name + "_scale"] = scale.astype(np.float16)
        state[name.removesuffix("weight") + "weight_zero_point"] = np.zeros(scale.shape, np.int8)
        expected[name] = (state[name], np.broadcast_to(scale.astype(np.float16).astype(np.float32).reshape(-1), (w.shape[0],)))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(folder / "model.safetensors"))
    return expected


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_int8_checkpoint_stays_int8(tiny, tiny_model_dir, tmp_path, strategy):
    folder = tmp_path / "w8a16"
    expected = _write_compressed_tensors_checkpoint(folder, tiny, tiny_model_dir, strategy)
    loaded = load_model(str(folder))
    assert load_model(str(folder), quantization="int8").params["layers"][1]["up_proj"].format == "int8"
    for i, layer in enumerate(loaded.params["layers"]):
        for key in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            data, scale = expected[f"model.layers.{i}.{LAYER_NAMES[key]}"]
            assert layer[key].format == "int8"
            np.testing.assert_array_equal(np.asarray(layer[key].data), data)
            np.testing.assert_array_equal(np.asarray(layer[key].scale), scale)
    np.testing.assert_array_equal(np.asarray(loaded.params["embed"]), np.asarray(tiny.params["embed"]))


# ---- errors --------------------------------------------------------------------------------------


def test_unsupported_methods_and_combinations_fail_with_what_works(tiny, tiny_model_dir, tmp_path):
    for name in ("awq", "gptq", "bitsandbytes"):
        with pytest.raises(ValueError, match=f"quantization='{name}' is not supported by jpaged; use int8"):
            EngineArgs(quantization=name)
    assert EngineArgs(quantization="none").quantization is None
    with pytest.raises(ModelLoadError, match="'fp8' needs a GPU.*use --quantization int8"):
        load_model(str(tiny_model_dir), quantization="fp8")
    with pytest.raises(ModelLoadError, match="--quantization gguf keeps a GGUF file's quantized blocks.*int8"):
        load_model(str(tiny_model_dir), quantization="gguf")

    folder = tmp_path / "awq"
    _write_compressed_tensors_checkpoint(folder, tiny, tiny_model_dir)
    with pytest.raises(ModelLoadError, match="--quantization gguf keeps a GGUF file's quantized blocks"):
        load_model(str(folder), quantization="gguf")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quant_method 'awq' is not supported; jpaged loads compressed-tensors int8"):
        load_model(str(folder))
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="format 'pack-quantized' is not supported"):
        load_model(str(folder))
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="strategy='group'; jpaged loads"):
        load_model(str(folder))


# ---- the bundled model ---------------------------------------------------------------------------


def _kinds(params):
    """The formats of a params tree's weights: QuantizedWeight formats and PackedWeight panel dtypes."""
    is_leaf = lambda x: isinstance(x, (q.QuantizedWeight, q.PackedWeight))  # noqa: E731
    return {w.format if _is_quantized(w) else f"packed {w.panels.dtype}"
            for w in jax.tree.leaves(params, is_leaf=is_leaf) if is_leaf(w)}


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "gguf", None])
def test_smollm2_quantized_answers_paris(quantization):
    """The engine's greedy chat answer equals the dense oracle's over the same quantized params.
    On CPU in float32, the default keeps the GGUF's blocks as "gguf" does, for the C++ kernel."""
    llm = LLM(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks_override=12,
              compilation_cache_dir="", dtype="float32", quantization=quantization, enforce_eager=True)
    engine = llm.llm_engine
    # the default GGUF: Q4_1 linears (q4 panels), a Q8_0 embedding (gathered as it is; the tied
    # lm_head as q8 panels); int8 keeps the embedding in float32 (a float32 packed lm_head)
    expected = ({"int8", "packed float32"} if quantization == "int8" else {"q8_0", "packed uint8", "packed int8"})
    assert _kinds(engine.runner.params) == expected
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert "Paris" in output.outputs[0].text
    loaded = load_model(dtype="float32", quantization=quantization or "gguf")
    expect = greedy_generate(loaded, output.prompt_token_ids, 12)
    assert list(output.outputs[0].token_ids) == expect


@pytest.mark.slow
def test_smollm2_kept_gguf_is_the_file_s_bytes_and_the_dequantized_weights(smollm2_path):
    gguf_file = read_gguf(smollm2_path)
    plain = load_model(smollm2_path, dtype="float32")
    kept = load_gguf_params(gguf_file, plain.config, q.GGUF_FORMATS, keep_embedding=True)
    # Q4_1 linears, a Q8_0 embedding, F32 norms: in memory exactly as many bytes as in the file
    assert q.param_bytes(kept) == sum(t.data.nbytes for t in gguf_file.tensors.values())
    dequantize = jax.jit(q.dequantize)
    for (key_path, a), b in zip(jax.tree.leaves_with_path(plain.params), jax.tree.leaves(kept, is_leaf=_is_quantized)):
        if _is_quantized(b):
            deq = np.asarray(dequantize(b))
            np.testing.assert_array_equal(deq if key_path[-1].key == "embed" else deq.T, np.asarray(a))
