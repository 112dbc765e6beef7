"""What vLLM users type: several served names, best_of, generation_config defaults, CORS,
truncate_prompt_tokens, enforce_eager, update_weights (AsyncLLM and HTTP), --trust-remote-code,
--download-dir. Oracles: the same request without the feature (best_of's winner is the most
likely of the n samples the engine gives for the same seed), greedy equality, the dense model."""

import asyncio
import json
import time

import httpx
import jax
import pytest

from jpaged import LLM, AsyncLLM, EngineArgs, SamplingParams
from jpaged.generation_config import load_generation_defaults
from jpaged.loaders import ModelLoadError, load_model
from jpaged.loaders import hub
from serving.app import CORSSettings
from server_harness import API_KEY, ThreadedServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=16, num_gpu_blocks_override=64,
                     compilation_cache_dir="", disable_log_stats=True)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app_kwargs = dict(cors=CORSSettings(allowed_origins=["https://ui.example"]), enable_update_weights_route=True)
    srv = ThreadedServer(EngineArgs(model=str(tiny_model_dir), **ENGINE_KWARGS), app_kwargs,
                         served_model_name=["tiny", "alias"], generation_defaults={"temperature": 0.0, "max_tokens": 3})
    yield srv
    srv.stop()


def post(server, path, body, headers=AUTH):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def test_every_served_name_is_listed_and_answers_under_its_own_name(server):
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny", "alias"]
    for name in ("tiny", "alias"):
        assert post(server, "/v1/completions", {"model": name, "prompt": "Hi"}).json()["model"] == name
    assert post(server, "/v1/completions", {"prompt": "Hi"}).json()["model"] == "tiny"
    error = post(server, "/v1/completions", {"model": "other", "prompt": "Hi"}).json()["error"]
    assert "`tiny`, `alias`" in error["message"]


def test_generation_defaults_apply_unless_the_request_sets_the_field(server):
    default = post(server, "/v1/completions", {"prompt": "Once upon", "ignore_eos": True}).json()
    assert default["usage"]["completion_tokens"] == 3  # max_new_tokens from the defaults, not OpenAI's 16
    greedy = post(server, "/v1/completions", {"prompt": "Once upon", "ignore_eos": True, "max_tokens": 3,
                                              "temperature": 0}).json()
    assert default["choices"][0]["text"] == greedy["choices"][0]["text"]  # temperature 0 from the defaults
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                 "ignore_eos": True}).json()
    assert chat["usage"]["completion_tokens"] == 3
    explicit = post(server, "/v1/completions", {"prompt": "Once upon", "ignore_eos": True, "max_tokens": 5}).json()
    assert explicit["usage"]["completion_tokens"] == 5


def test_best_of_returns_the_most_likely_of_the_samples(server):
    body = {"prompt": "The weather", "max_tokens": 6, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    samples = post(server, "/v1/completions", {**body, "n": 4, "logprobs": 0}).json()["choices"]
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in samples]
    best = post(server, "/v1/completions", {**body, "n": 2, "best_of": 4}).json()
    ranked = sorted(range(4), key=lambda i: -totals[i])
    assert [c["text"] for c in best["choices"]] == [samples[i]["text"] for i in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert best["choices"][0]["logprobs"] is None  # not asked for
    assert best["usage"]["completion_tokens"] == 4 * 6  # every sample was generated


def test_truncate_prompt_tokens_keeps_the_last_tokens(server):
    ids = list(range(200, 240))
    body = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    truncated = post(server, "/v1/completions", {**body, "prompt": ids, "truncate_prompt_tokens": 8}).json()
    tail = post(server, "/v1/completions", {**body, "prompt": ids[-8:]}).json()
    assert truncated["usage"]["prompt_tokens"] == 8
    assert truncated["choices"][0]["text"] == tail["choices"][0]["text"]


def test_cors_allows_only_the_configured_origin(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(server.url + "/v1/completions", headers={"Origin": "https://ui.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ui.example"
    refused = httpx.options(server.url + "/v1/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers
    simple = httpx.get(server.url + "/health", headers={"Origin": "https://ui.example"})
    assert simple.headers["access-control-allow-origin"] == "https://ui.example"


def test_update_weights_route_checks_shapes_and_needs_the_key(server, tiny_model_dir, tmp_path):
    assert post(server, "/update_weights_from_disk", {"model_path": str(tiny_model_dir)}, headers={}).status_code == 401
    before = post(server, "/v1/completions", {"prompt": "Swap", "max_tokens": 4, "ignore_eos": True}).json()
    ok = post(server, "/update_weights_from_disk", {"model_path": str(tiny_model_dir)})
    assert ok.status_code == 200 and ok.json()["success"] is True
    after = post(server, "/v1/completions", {"prompt": "Swap", "max_tokens": 4, "ignore_eos": True}).json()
    assert after["choices"][0]["text"] == before["choices"][0]["text"]  # the same weights again
    other = tmp_path / "wider"
    other.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    bad = post(server, "/update_weights_from_disk", {"model_path": str(other), "load_format": "safetensors"})
    assert bad.status_code == 400 and "update_weights" in bad.json()["error"]["message"]


def test_async_update_weights_changes_the_next_tokens(tiny_model_dir):
    args = EngineArgs(model=str(tiny_model_dir), **ENGINE_KWARGS)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(400, 420))}

    async def main():
        engine = AsyncLLM.from_engine_args(args)
        base = engine.engine.runner.params
        sharpened = jax.tree.map(lambda x: x * 3.0, base)
        before = [o async for o in engine.generate(prompt, greedy, "before")][-1]
        await engine.update_weights(sharpened)
        after = [o async for o in engine.generate(prompt, greedy, "after")][-1]
        with pytest.raises(ValueError, match="update_weights"):
            await engine.update_weights({"not": "the tree"})
        await engine.shutdown()
        return before, after, sharpened

    before, after, sharpened = asyncio.run(main())
    oracle = LLM(str(tiny_model_dir), **ENGINE_KWARGS)
    oracle.update_weights(sharpened)
    expected = oracle.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert after.outputs[0].token_ids == expected
    assert before.outputs[0].token_ids != expected


def test_arrival_time_is_stamped_when_the_request_arrives(tiny_model_dir):
    args = EngineArgs(model=str(tiny_model_dir), **ENGINE_KWARGS)

    async def main():
        engine = AsyncLLM.from_engine_args(args)
        arrived = time.time() - 5.0  # e.g. the HTTP request waited 5 s before reaching the engine
        given = [o async for o in engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "a", arrived)][-1]
        start = time.time()
        stamped = [o async for o in engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "b")][-1]
        await engine.shutdown()
        return arrived, given, start, stamped

    arrived, given, start, stamped = asyncio.run(main())
    assert given.metrics.arrival_time == arrived
    assert given.metrics.first_token_time - given.metrics.arrival_time >= 5.0  # TTFT includes the wait
    assert start <= stamped.metrics.arrival_time <= stamped.metrics.first_scheduled_time


def test_enforce_eager_compiles_on_first_use_and_matches_warm(tiny_model_dir):
    eager = LLM(str(tiny_model_dir), enforce_eager=True, **ENGINE_KWARGS)
    assert eager.llm_engine.runner._forward == {}
    warm = LLM(str(tiny_model_dir), **ENGINE_KWARGS)
    prompts = [{"prompt_token_ids": list(range(100, 100 + n))} for n in (3, 20, 37)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert got == [o.outputs[0].token_ids for o in warm.generate(prompts, params, use_tqdm=False)]
    assert 0 < len(eager.llm_engine.runner._forward) <= len(warm.llm_engine.runner._forward)


def test_generation_config_settings(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 77, "do_sample": True, "eos_token_id": 2}))
    expected = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 77}
    assert load_generation_defaults("auto", str(tmp_path)) == expected
    assert load_generation_defaults(str(tmp_path), "/elsewhere") == expected
    assert load_generation_defaults("vllm", str(tmp_path)) == {}
    assert load_generation_defaults("auto", str(tmp_path / "model.gguf")) == {}
    # --override-generation-config: merged over the file's, or alone with "vllm"; other keys ignored
    overrides = {"temperature": 0.2, "top_k": 5, "do_sample": False}
    assert load_generation_defaults("auto", str(tmp_path), overrides) == {**expected, "temperature": 0.2, "top_k": 5}
    assert load_generation_defaults("vllm", str(tmp_path), overrides) == {"temperature": 0.2, "top_k": 5}
    with pytest.raises(ValueError, match="does not exist"):
        load_generation_defaults(str(tmp_path / "missing"), str(tmp_path))


def test_llm_given_no_sampling_params_uses_the_generation_config_defaults(tiny_model_dir, tmp_path):
    """vLLM's LLM.get_default_sampling_params: generate (and chat) without SamplingParams sample
    with the generation_config.json fields (here a folder's, under override_generation_config)."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "repetition_penalty": 1.5,
                                                                "max_new_tokens": 3}))
    llm = LLM(str(tiny_model_dir), generation_config=str(tmp_path), override_generation_config={"max_new_tokens": 5},
              **ENGINE_KWARGS)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.repetition_penalty, defaults.max_tokens) == (0.0, 1.5, 5)
    prompts = [{"prompt_token_ids": list(range(100, 100 + n))} for n in (3, 20)]
    explicit = SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=5)
    greedy = llm.generate(prompts, explicit, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in greedy]
    chat = [{"role": "user", "content": "hi"}]
    assert llm.chat(chat, use_tqdm=False)[0].outputs[0].token_ids == llm.chat(
        chat, explicit, use_tqdm=False)[0].outputs[0].token_ids
    assert LLM(str(tiny_model_dir), generation_config="vllm", **ENGINE_KWARGS).get_default_sampling_params() == \
        SamplingParams()
    with pytest.raises(ValueError, match="override_generation_config must be a dict"):
        EngineArgs(model=str(tiny_model_dir), override_generation_config="temperature=0")


def test_remote_code_models_are_refused_with_a_clear_message(tmp_path, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({
        **config, "architectures": ["FancyForCausalLM"], "auto_map": {"AutoModelForCausalLM": "fancy.Model"}}))
    for trust in (False, True):
        with pytest.raises(ModelLoadError, match="needs remote code.*never runs a model repository's Python code"):
            load_model(str(tmp_path), trust_remote_code=trust)


def test_download_dir_is_the_hub_cache(monkeypatch, tmp_path):
    seen = {}

    def fake_cache_lookup(repo_id, filename, cache_dir=None, revision=None):
        seen["cache_dir"] = cache_dir
        return str(tmp_path / "snap" / "config.json")

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_cache_lookup)
    assert hub.resolve_hub_model("org/model", None, str(tmp_path)) == str(tmp_path / "snap")
    assert seen["cache_dir"] == str(tmp_path)


def chat(server, messages, **fields):
    return post(server, "/v1/chat/completions", {"messages": messages, "ignore_eos": True, **fields})


def rendered(server, messages, **fields) -> str:
    tokens = post(server, "/tokenize", {"messages": messages, **fields}).json()["tokens"]
    return post(server, "/detokenize", {"tokens": tokens}).json()["prompt"]


def test_text_parts_render_one_per_line(server):
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    assert (rendered(server, [{"role": "user", "content": parts}])
            == rendered(server, [{"role": "user", "content": "First part.\nSecond part."}]))


def test_continue_final_message_leaves_the_last_turn_open(server):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    closed = rendered(server, messages, add_generation_prompt=False)
    open_turn = rendered(server, messages, add_generation_prompt=False, continue_final_message=True)
    assert open_turn.endswith("The colour is") and closed.startswith(open_turn) and len(closed) > len(open_turn)
    reply = chat(server, messages, add_generation_prompt=False, continue_final_message=True, max_tokens=3)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == len(
        post(server, "/tokenize", {"prompt": open_turn, "add_special_tokens": False}).json()["tokens"])
    both = chat(server, messages, continue_final_message=True)  # add_generation_prompt defaults to true
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def sse_json(response) -> list[dict]:
    payloads = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_chat_echo_repeats_the_last_message_of_the_reply_role(server):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, my name"}]
    fields = dict(add_generation_prompt=False, continue_final_message=True, max_tokens=3)
    plain = chat(server, messages, **fields).json()["choices"][0]["message"]
    echoed = chat(server, messages, echo=True, **fields).json()["choices"][0]["message"]
    assert echoed == {**plain, "content": "Hello, my name" + plain["content"]}
    chunks = sse_json(chat(server, messages, echo=True, stream=True, **fields))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == echoed["content"]
    # With a generation prompt the reply is the assistant's and the last message the user's: no echo.
    reply = chat(server, messages[:1], echo=True, max_tokens=3).json()["choices"][0]["message"]
    assert reply == chat(server, messages[:1], max_tokens=3).json()["choices"][0]["message"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_stream_chunks_null_fields_and_continuous_usage(server, route):
    """vLLM's chunks: logprobs and finish_reason present (null until the end); with
    continuous_usage_stats (and include_usage) every chunk has the usage so far, then the total."""
    body = {"max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if route == "/v1/completions":
        body["prompt"] = "Count"
    else:
        body["messages"] = [{"role": "user", "content": "Count"}]
    chunks = sse_json(post(server, route, body))
    *choice_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    prompt_tokens = last["usage"]["prompt_tokens"]
    seen = []
    for chunk in choice_chunks:
        choice = chunk["choices"][0]
        assert "logprobs" in choice and "finish_reason" in choice, chunk
        assert chunk["usage"]["prompt_tokens"] == prompt_tokens
        seen.append(chunk["usage"]["completion_tokens"])
    assert seen == sorted(seen) and seen[-1] == 3 and choice_chunks[-1]["choices"][0]["finish_reason"] == "length"
    without = sse_json(post(server, route, {**body, "stream_options": {"continuous_usage_stats": True}}))
    assert all("usage" not in chunk for chunk in without)  # continuous_usage_stats needs include_usage


def test_top_logprobs_over_the_limit_is_named(server):
    response = chat(server, [{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=21)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "top_logprobs" and error["message"].startswith("top_logprobs is 21")
