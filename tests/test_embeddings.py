"""Embeddings (--runner pooling, jpaged/pooling.py): LLM.embed and POST /v1/embeddings against
transformers' AutoModel hidden states on the same weights (LAST, MEAN and CLS pooling, prompts
chunked across steps, prefix-cache hits), the pooler's settings from sentence-transformers files,
flags and requests, and the errors of each misuse, with the KV pool freed and nothing compiled
after start."""

import base64
import json

import httpx
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import TINY_HF_CONFIG
from jpaged import LLM, PoolingParams, SamplingParams
from jpaged.config import EngineArgs
from jpaged.loaders.errors import ModelLoadError
from jpaged.loaders.hf_names import params_to_hf_state_dict
from jpaged.models import llama
from jpaged.models.config import ModelConfig
from jpaged.pooling import PoolerConfig, resolve_pooler_config
from server_harness import API_KEY, MODEL_NAME, ThreadedServer, wait_until_idle
from test_engine import assert_pool_free, count_compiles

ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=32,
                     compilation_cache_dir="", seed=0)
LENGTHS = (5, 40, 70, 1)  # 40 and 70 take two and three chunks of 32 tokens
MATRYOSHKA = [16, 32]


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory, tiny_model_dir):
    """A bare decoder's checkpoint as transformers' AutoModel saves one (an embedding model's):
    architectures ["LlamaModel"], tensor names without "model.", no lm_head, untied config."""
    folder = tmp_path_factory.mktemp("bare_llama")
    (folder / "config.json").write_text(json.dumps(dict(TINY_HF_CONFIG, architectures=["LlamaModel"],
                                                        tie_word_embeddings=False)))
    config = ModelConfig.from_hf_config(TINY_HF_CONFIG, dtype="float32")
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, llama.init_params(config, jax.random.key(3)))
    save_file({name.removeprefix("model."): np.ascontiguousarray(array)
               for name, array in params_to_hf_state_dict(params).items()}, str(folder / "model.safetensors"))
    for path in tiny_model_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, TINY_HF_CONFIG["vocab_size"], size=n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def hf_hidden(bare_dir, prompts):
    """transformers' final-norm hidden states f32[len, hidden] of each prompt."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(bare_dir), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaModel"
    with torch.no_grad():
        return [model(torch.tensor([p])).last_hidden_state[0].numpy() for p in prompts]


def _pooled(hidden: np.ndarray, pooling_type: str) -> np.ndarray:
    return {"LAST": hidden[-1], "MEAN": hidden.mean(axis=0), "CLS": hidden[0]}[pooling_type]


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


@pytest.fixture(scope="module")
def last_llm(bare_dir):
    """runner auto (a bare checkpoint: pooling), LAST pooling by default, Matryoshka sizes from --hf-overrides."""
    return LLM(str(bare_dir), hf_overrides={"matryoshka_dimensions": MATRYOSHKA}, **ENGINE_KWARGS)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN", "CLS"])
def test_embeddings_match_transformers_hidden_states(bare_dir, prompts, hf_hidden, last_llm, pooling_type):
    llm = last_llm if pooling_type == "LAST" else LLM(str(bare_dir), pooler_config={"pooling_type": pooling_type},
                                                        **ENGINE_KWARGS)
    engine = llm.llm_engine
    assert engine.pooler_config.pooling_type == pooling_type and engine.pooler_config.normalize
    assert "lm_head" not in engine.runner.params and engine.runner.num_scheduler_steps == 1
    with count_compiles() as compiles:
        normalized = llm.embed(prompts, use_tqdm=False)
        raw = llm.embed(prompts, PoolingParams(normalize=False), use_tqdm=False)
    assert not compiles
    for hidden, unit_out, raw_out, prompt in zip(hf_hidden, normalized, raw, prompts):
        expected = _pooled(hidden, pooling_type)
        np.testing.assert_allclose(raw_out.outputs.embedding, expected, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(unit_out.outputs.embedding, _unit(expected), atol=1e-5)
        assert raw_out.prompt_token_ids == prompt and raw_out.finished
    assert_pool_free(llm)


def test_prefix_cache_hits_give_the_same_last_token_embedding(last_llm, prompts, hf_hidden):
    stats = last_llm.llm_engine.get_stats
    hits = stats().prefix_cache_hits
    (again,) = last_llm.embed([prompts[2]], use_tqdm=False)
    assert stats().prefix_cache_hits - hits == 64  # 70 tokens: four full blocks found, the last 6 computed
    np.testing.assert_allclose(again.outputs.embedding, _unit(hf_hidden[2][-1]), atol=1e-5)
    assert_pool_free(last_llm)


def test_mean_pooling_reads_no_prefix_cache(bare_dir, prompts, hf_hidden):
    llm = LLM(str(bare_dir), pooler_config={"pooling_type": "MEAN", "normalize": False}, **ENGINE_KWARGS)
    llm.embed([prompts[2]], use_tqdm=False)
    (again,) = llm.embed([prompts[2]], use_tqdm=False)
    assert llm.llm_engine.get_stats().prefix_cache_hits == 0
    np.testing.assert_allclose(again.outputs.embedding, hf_hidden[2].mean(axis=0), atol=1e-4, rtol=1e-4)


def test_matryoshka_dimensions_cut_then_normalize(last_llm, prompts, hf_hidden):
    out = last_llm.embed(prompts[:2], [PoolingParams(dimensions=16), PoolingParams(dimensions=32, normalize=False)],
                         use_tqdm=False)
    np.testing.assert_allclose(out[0].outputs.embedding, _unit(hf_hidden[0][-1][:16]), atol=1e-5)
    np.testing.assert_allclose(out[1].outputs.embedding, hf_hidden[1][-1][:32], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"only supports \[16, 32\] matryoshka dimensions"):
        last_llm.embed(prompts[:1], PoolingParams(dimensions=20), use_tqdm=False)
    assert_pool_free(last_llm)


def test_a_causal_lm_checkpoint_embeds_with_runner_pooling_and_keeps_no_lm_head(tiny_model_dir, prompts):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llm = LLM(str(tiny_model_dir), runner="pooling", **ENGINE_KWARGS)
    params = llm.llm_engine.runner.params
    assert "lm_head" not in params and "lm_head_greedy" not in params  # no packed copies of the tied embedding
    with pytest.raises(ValueError, match="PoolingParams"):
        llm.generate([prompts[0]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="does not support matryoshka"):
        llm.embed([prompts[0]], PoolingParams(dimensions=8), use_tqdm=False)
    model = transformers.AutoModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([prompts[1]])).last_hidden_state[0, -1].numpy()
    (out,) = llm.embed([prompts[1]], use_tqdm=False)
    np.testing.assert_allclose(out.outputs.embedding, _unit(expected), atol=1e-5)
    assert_pool_free(llm)


def test_runner_mismatches_fail_with_the_flag_to_change(bare_dir, tiny_model_dir, prompts):
    with pytest.raises(ValueError, match="--runner pooling"):
        LLM(str(bare_dir), runner="generate", **ENGINE_KWARGS)
    generator = LLM(str(tiny_model_dir), enforce_eager=True, **ENGINE_KWARGS)
    with pytest.raises(ValueError, match="runner='pooling'"):
        generator.embed([prompts[0]], use_tqdm=False)
    with pytest.raises(ValueError, match="--runner pooling"):
        generator.llm_engine.add_request("r", prompts[0], PoolingParams())
    with pytest.raises(ValueError, match="not one of"):
        EngineArgs(runner="embed")


def test_an_aborted_prompt_frees_its_blocks_and_has_no_vector(last_llm, prompts):
    engine = last_llm.llm_engine
    engine.add_request("long", prompts[2][::-1], PoolingParams())  # not in the prefix cache
    assert engine.step() == []  # its first chunk of 32 tokens
    output = engine.abort_request("long")
    assert output.finished and output.outputs is None
    assert_pool_free(last_llm)


def test_pooler_settings_from_sentence_transformers_files_flags_and_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"is_matryoshka": True}))
    assert resolve_pooler_config(str(tmp_path), None, None) == PoolerConfig("LAST", True, True, None)
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": False}))
    assert resolve_pooler_config(str(tmp_path), None, None) == PoolerConfig("MEAN", False, True, None)
    modules.append({"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    overrides = {"matryoshka_dimensions": [64, 128]}
    assert resolve_pooler_config(str(tmp_path), None, overrides) == PoolerConfig("MEAN", True, True, (64, 128))
    assert resolve_pooler_config(str(tmp_path), {"pooling_type": "cls", "normalize": False}, None) == PoolerConfig(
        "CLS", False, True, None)
    (tmp_path / "modules.json").write_text("[{")
    with pytest.raises(ModelLoadError, match="modules.json is not valid JSON"):
        resolve_pooler_config(str(tmp_path), None, None)
    with pytest.raises(ValueError, match="unsupported keys"):
        resolve_pooler_config(None, {"pooling_type": "LAST", "softmax": True}, None)
    with pytest.raises(ValueError, match="is not one of LAST, MEAN, CLS"):
        EngineArgs(pooler_config={"pooling_type": "MAX"})


@pytest.fixture(scope="module")
def server(bare_dir):
    srv = ThreadedServer(EngineArgs(model=str(bare_dir), hf_overrides={"matryoshka_dimensions": MATRYOSHKA},
                                    **ENGINE_KWARGS))
    yield srv
    srv.stop()


def expected_for(llm, token_ids: list[int]) -> list[float]:
    return llm.embed([token_ids], use_tqdm=False)[0].outputs.embedding


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def test_v1_embeddings_floats_base64_usage_and_order(server, last_llm, prompts):
    expected = [o.outputs.embedding for o in last_llm.embed(prompts, use_tqdm=False)]
    reply = _post(server, "/v1/embeddings", {"model": MODEL_NAME, "input": prompts})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["id"].startswith("embd-") and body["model"] == MODEL_NAME
    assert [d["index"] for d in body["data"]] == list(range(len(prompts)))
    for item, vector in zip(body["data"], expected):
        assert item["object"] == "embedding"
        np.testing.assert_allclose(item["embedding"], vector, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(LENGTHS)
    encoded = _post(server, "/v1/embeddings", {"input": prompts[1], "encoding_format": "base64", "dimensions": 32})
    vector = np.frombuffer(base64.b64decode(encoded.json()["data"][0]["embedding"]), "<f4")
    cut = _post(server, "/v1/embeddings", {"input": [prompts[1]], "dimensions": 32}).json()["data"][0]["embedding"]
    assert vector.shape == (32,) and np.array_equal(vector, np.asarray(cut, np.float32))
    sagemaker = _post(server, "/invocations", {"input": prompts[0]}).json()  # SageMaker's route, as vLLM's
    np.testing.assert_allclose(sagemaker["data"][0]["embedding"], expected[0], atol=1e-6)
    texts = _post(server, "/v1/embeddings", {"input": ["The capital of France is", "Paris"]}).json()
    assert len(texts["data"]) == 2 and texts["usage"]["prompt_tokens"] > 2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = _post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    chat = _post(server, "/v1/embeddings", {"messages": messages}).json()
    assert chat["usage"]["prompt_tokens"] == len(rendered)
    np.testing.assert_allclose(chat["data"][0]["embedding"], expected_for(last_llm, rendered), atol=1e-6)
    wait_until_idle(server)


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_embedding_requests_count_in_the_server_metrics(server, prompts):
    success = 'vllm:request_success_total{finished_reason="stop",model_name="tiny"}'
    before, tokens_before = _metric(server, success), _metric(server, "vllm:request_prompt_tokens_sum")
    assert _post(server, "/v1/embeddings", {"input": prompts[:2]}).status_code == 200
    assert _metric(server, success) - before == 2
    assert _metric(server, "vllm:request_prompt_tokens_sum") - tokens_before == LENGTHS[0] + LENGTHS[1]


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/embeddings", {"input": [1, 2], "dimensions": 20}, 400, "only supports"),
    ("/v1/embeddings", {"input": []}, 400, "input is empty"),
    ("/v1/embeddings", {"input": [[1, 2], []]}, 400, "input is empty"),
    ("/v1/embeddings", {"input": ["x", ""]}, 400, "An input is empty"),
    ("/v1/embeddings", {"input": list(range(3, 131))}, 400, "maximum context length is 128"),
    ("/v1/embeddings", {"input": [10**9]}, 400, "outside the vocabulary"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422, None),
    ("/v1/embeddings", {"input": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "exactly one"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2}, 400, "serves /v1/embeddings"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "serves /v1/embeddings"),
])
def test_bad_embedding_requests_get_openai_errors_and_the_server_keeps_serving(server, path, body, status, message):
    reply = _post(server, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message is None or message in error["message"]
    assert _post(server, "/v1/embeddings", {"input": [1, 2, 3]}).status_code == 200
    wait_until_idle(server)


def test_a_generating_server_answers_embeddings_with_404(tiny_model_dir):
    srv = ThreadedServer(EngineArgs(model=str(tiny_model_dir), enforce_eager=True, **ENGINE_KWARGS))
    try:
        reply = _post(srv, "/v1/embeddings", {"input": "hello"})
        assert reply.status_code == 404 and "does not support Embeddings API" in reply.json()["error"]["message"]
    finally:
        srv.stop()
