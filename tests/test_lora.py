"""LoRA adapters (jpaged/lora.py) against PEFT's own LoRA on transformers' torch model, the same weights.

Adapters are made and saved by the peft package (random A and B, so each changes the output),
then read by jpaged; the oracle is a greedy loop over `peft.PeftModel` in torch, one adapter at
a time, while jpaged runs every adapter and none mixed in one batch.
"""

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import TINY_HF_CONFIG
from jpaged import LLM, EngineArgs, SamplingParams
from jpaged.lora import LoRAAdapter, LoRARequest, SlotTable, load_adapter
from jpaged.models.config import ModelConfig
from server_harness import API_KEY, MODEL_NAME, ThreadedServer, wait_until_idle
from test_engine import count_compiles

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ENGINE_KWARGS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, num_gpu_blocks_override=48,
                     attention_backend="reference", compilation_cache_dir="", seed=0, enable_lora=True,
                     max_loras=2, max_lora_rank=16)
# name -> LoraConfig fields: attention only; every module with rsLoRA; the MLP with a rank pattern.
ADAPTERS = {
    "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all": dict(r=16, lora_alpha=8, use_rslora=True,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp": dict(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                rank_pattern={"down_proj": 8}, alpha_pattern={"down_proj": 32}),
}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its matrices x3 (as test_engine's `sharpened`): less flat greedy paths."""
    folder = tmp_path_factory.mktemp("tiny_sharp")
    for item in tiny_model_dir.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    save_file({k: v * 3 if v.ndim >= 2 else v for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    """name -> a PEFT adapter folder saved by peft (init_lora_weights=False: B is random too)."""
    dirs = {}
    for seed, (name, fields) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0,
                                                                        **fields))
        with torch.no_grad():  # peft's random init: scaled so that each adapter moves the greedy path
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn_like(param) * 0.3)
        dirs[name] = tmp_path_factory.mktemp(f"lora_{name}")
        model.save_pretrained(str(dirs[name]))
    return dirs


def peft_greedy(base_dir, adapter_dir, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from peft's LoRA model (no cache: the whole sequence each step)."""
    model = hf_model(base_dir)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def lora_request(adapter_dirs, name: str | None) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, list(ADAPTERS).index(name) + 1, str(adapter_dirs[name]))


@pytest.fixture(scope="module")
def llm(base_dir):
    llm = LLM(str(base_dir), **ENGINE_KWARGS)
    yield llm
    pool = llm.llm_engine.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == llm.llm_engine.runner.pool_spec.num_blocks - 1


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 40000, size=int(rng.integers(5, 40))).tolist() for _ in range(count)]


def test_mixed_adapters_in_one_batch_match_peft(llm, base_dir, adapter_dirs):
    """Three adapters and none over eight prompts in one generate call, two slots (so the
    scheduler holds back the third adapter and a slot is reused): each output equals peft's."""
    names = [None, "attn", "all", "mlp", "attn", None, "mlp", "all"]
    batch = prompts(len(names))
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False,
                           lora_request=[lora_request(adapter_dirs, n) for n in names])
    for name, prompt, output in zip(names, batch, outputs):
        want = peft_greedy(base_dir, None if name is None else adapter_dirs[name], prompt, GREEDY.max_tokens)
        assert output.outputs[0].token_ids == want, name
    base = {tuple(peft_greedy(base_dir, None, p, GREEDY.max_tokens)) for p in batch}
    assert all(tuple(o.outputs[0].token_ids) not in base for n, o in zip(names, outputs) if n), \
        "every adapter must change the greedy tokens"


def test_prefix_cache_is_per_adapter(llm, base_dir, adapter_dirs):
    """The same 40-token prompt with an adapter, without, then with it again: the second run must
    not reuse the first's KV (computed under the adapter), the third must."""
    prompt = prompts(1, seed=7)[0] + list(range(500, 540))
    engine = llm.llm_engine
    hits = []
    tokens = []
    for name in ("attn", None, "attn"):
        before = engine.get_stats().prefix_cache_hits
        output = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False,
                              lora_request=lora_request(adapter_dirs, name))[0]
        hits.append(engine.get_stats().prefix_cache_hits - before)
        tokens.append(output.outputs[0].token_ids)
    assert hits[0] == 0 and hits[1] == 0 and hits[2] > 0, hits
    assert tokens[0] == tokens[2] == peft_greedy(base_dir, adapter_dirs["attn"], prompt, GREEDY.max_tokens)
    assert tokens[1] == peft_greedy(base_dir, None, prompt, GREEDY.max_tokens)


def test_no_compiles_when_adapters_move_between_slots(llm, adapter_dirs):
    """After warmup, loading adapters into slots (and evicting them) compiles nothing."""
    llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)  # the engine is warm
    names = ["mlp", "all", "attn", None, "all"]
    with count_compiles() as compiles:
        llm.generate([{"prompt_token_ids": p} for p in prompts(len(names), seed=3)], GREEDY, use_tqdm=False,
                     lora_request=[lora_request(adapter_dirs, n) for n in names])
    assert compiles == []


def test_update_weights_keeps_the_adapters(llm, base_dir, adapter_dirs):
    prompt = prompts(1, seed=11)[0]
    request = lora_request(adapter_dirs, "all")
    before = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False, lora_request=request)[0]
    engine = llm.llm_engine
    llm.update_weights(engine.runner.params)
    after = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False, lora_request=request)[0]
    assert after.outputs[0].token_ids == before.outputs[0].token_ids


def write_adapter(folder, config: dict, tensors: dict) -> str:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


def test_adapters_jpaged_cannot_serve_are_refused_and_nothing_is_queued(llm, adapter_dirs, tmp_path):
    q_a = np.zeros((8, 64), np.float32)
    q_b = np.zeros((64, 8), np.float32)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    good = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cases = {
        "rank": ({**good, "r": 32}, {name.format("A"): np.zeros((32, 64), np.float32),
                                     name.format("B"): np.zeros((64, 32), np.float32)},
                 "LoRA rank 32 is greater than max_lora_rank 16"),
        "dora": ({**good, "use_dora": True}, {name.format("A"): q_a, name.format("B"): q_b}, "DoRA"),
        "shape": (good, {name.format("A"): np.zeros((8, 32), np.float32), name.format("B"): q_b},
                  "an adapter for another base model"),
        "module": (good, {"base_model.model.lm_head.lora_A.weight": q_a}, "is not a lora_A / lora_B"),
        "half": (good, {name.format("A"): q_a}, "without its other half"),
    }
    for lora_id, (case, (config, tensors, message)) in enumerate(cases.items(), start=10):
        path = write_adapter(tmp_path / case, config, tensors)
        with pytest.raises(ValueError, match=message):
            llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, use_tqdm=False,
                         lora_request=LoRARequest(case, lora_id, path))
    with pytest.raises(ValueError, match="is not a folder"):
        llm.generate("hi", GREEDY, use_tqdm=False, lora_request=LoRARequest("gone", 20, str(tmp_path / "none")))
    assert not llm.llm_engine.has_unfinished_requests()


def test_lora_off_refuses_a_lora_request(base_dir, adapter_dirs):
    kwargs = {**ENGINE_KWARGS, "enable_lora": False}
    llm = LLM(str(base_dir), **kwargs)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate("hi", GREEDY, use_tqdm=False, lora_request=lora_request(adapter_dirs, "attn"))
    assert "lora" not in llm.llm_engine.runner.params


def test_load_adapter_folds_the_scaling_into_b(adapter_dirs):
    tensors = load_file(str(adapter_dirs["mlp"] / "adapter_model.safetensors"))
    model_config = ModelConfig.from_hf_config(TINY_HF_CONFIG, dtype="float32")
    adapter = load_adapter(lora_request(adapter_dirs, "mlp"), model_config, max_lora_rank=16)
    down_a, down_b = adapter.weights[(1, "down_proj")]
    up_a, up_b = adapter.weights[(0, "up_proj")]
    peft_b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    np.testing.assert_array_equal(down_a.T, tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    np.testing.assert_allclose(down_b, peft_b.T * (32 / 8))  # alpha_pattern / rank_pattern
    np.testing.assert_allclose(up_b, tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].T * 1.0)
    assert (down_a.shape, up_a.shape, adapter.rank) == ((128, 8), (64, 4), 8)
    assert (0, "q_proj") not in adapter.weights


def test_slot_table_keeps_running_adapters_and_evicts_the_least_recently_used():
    a, b, c, d = (LoRAAdapter(name, 1, {}) for name in "abcd")
    table = SlotTable(3)
    slots, loads = table.assign({a, b}, keep=set())
    assert loads == [(1, a), (2, b)] and slots == {a: 1, b: 2}
    slots, loads = table.assign({c}, keep={a, b})
    assert loads == [(3, c)]
    table.assign({b}, keep={b})
    slots, loads = table.assign({d}, keep={a, b})  # c is the only one no running request holds
    assert loads == [(3, d)] and slots == {d: 3}
    slots, loads = table.assign({c}, keep={a, b, d})  # all held: the least recently used goes (a)
    assert loads == [(1, c)]
    with pytest.raises(ValueError, match="max-loras"):
        table.assign({a, b, c, d}, keep=set())


# Runs in a subprocess: XLA_FLAGS must give 2 CPU devices before jax starts.
TENSOR_PARALLEL_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
from jpaged import LLM, LoRARequest, SamplingParams
base_dir, requests, prompts, kwargs = sys.argv[1], *map(json.loads, sys.argv[2:])
llm = LLM(base_dir, tensor_parallel_size=2, enforce_eager=True, **kwargs)
outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False,
                       lora_request=[r and LoRARequest(*r) for r in requests])
print(json.dumps([o.outputs[0].token_ids for o in outputs]))
"""


def test_tensor_parallel_matches_peft(base_dir, adapter_dirs):
    """The slots replicated over 2 devices, the base weights split: the same tokens as peft's."""
    names = ["all", None, "mlp"]
    batch = prompts(len(names), seed=13)
    requests = [None if n is None else [n, list(ADAPTERS).index(n) + 1, str(adapter_dirs[n])] for n in names]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", TENSOR_PARALLEL_SCRIPT, str(base_dir), json.dumps(requests),
                           json.dumps(batch), json.dumps(ENGINE_KWARGS)], capture_output=True, text=True,
                          timeout=900, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = json.loads(done.stdout.strip().splitlines()[-1])
    for name, prompt, got in zip(names, batch, tokens):
        assert got == peft_greedy(base_dir, None if name is None else adapter_dirs[name], prompt, 10), name


@pytest.fixture(scope="module")
def lora_server(base_dir, adapter_dirs):
    server = ThreadedServer(EngineArgs(model=str(base_dir), **ENGINE_KWARGS), app_kwargs={"enable_lora_updating": True})
    yield server
    server.stop()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def test_server_serves_adapters_as_models(lora_server, base_dir, adapter_dirs):
    """/v1/load_lora_adapter, /v1/models, completions and chat naming the adapter (its tokens
    are peft's), unknown names 404, /v1/unload_lora_adapter."""
    server = lora_server
    answer = post(server, "/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": str(adapter_dirs["attn"])})
    assert answer.status_code == 200 and answer.text == "Success: LoRA adapter 'attn' added successfully."
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    card = next(m for m in models if m["id"] == "attn")
    assert card["parent"] == MODEL_NAME and card["root"] == str(adapter_dirs["attn"])
    prompt = prompts(1, seed=5)[0]
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir))

    def peft_text(adapter_dir):
        return tokenizer.decode(peft_greedy(base_dir, adapter_dir, prompt, 10), skip_special_tokens=True)

    reply = post(server, "/v1/completions", {**body, "model": "attn"}).json()
    assert reply["model"] == "attn"
    assert reply["choices"][0]["text"] == peft_text(adapter_dirs["attn"])
    base = post(server, "/v1/completions", {**body, "model": MODEL_NAME}).json()
    assert base["choices"][0]["text"] == peft_text(None) != reply["choices"][0]["text"]
    chat = post(server, "/v1/chat/completions", {"model": "attn", "max_tokens": 4, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "attn"

    again = post(server, "/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": str(adapter_dirs["all"])})
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
    clash = post(server, "/v1/load_lora_adapter", {"lora_name": MODEL_NAME, "lora_path": str(adapter_dirs["all"])})
    assert clash.status_code == 400 and "conflicts with a served base model" in clash.json()["error"]["message"]
    bad = post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(base_dir)})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    missing = post(server, "/v1/completions", {**body, "model": "mlp"})
    assert missing.status_code == 404 and "The model `mlp` does not exist" in missing.json()["error"]["message"]

    inplace = post(server, "/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": str(adapter_dirs["all"]),
                                                       "load_inplace": True})
    assert inplace.status_code == 200
    reloaded = post(server, "/v1/completions", {**body, "model": "attn"}).json()
    assert reloaded["choices"][0]["text"] == peft_text(adapter_dirs["all"])

    gone = post(server, "/v1/unload_lora_adapter", {"lora_name": "attn"})
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'attn' removed successfully."
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "attn"}).status_code == 404
    assert post(server, "/v1/completions", {**body, "model": "attn"}).status_code == 404
    wait_until_idle(server)
