"""LoRA adapters: PEFT checkpoints for the Llama family, many served at once (vLLM's multi-LoRA).

A request names its adapter with a `LoRARequest`. The engine keeps up to `max_cpu_loras`
adapters' weights in host memory (`AdapterCache`, least recently used out; an evicted one is read
again from its path) and `max_loras` of them on the device, in slots 1..max_loras of the
"lora" entry of the params pytree (`empty_lora_params`, `set_lora_slot`); slot 0 is "no
adapter". `SlotTable` decides which adapter sits in which slot; the scheduler never runs more
distinct adapters at once than there are slots.

Device layout, per layer, per target module with weight [in, out]:

    {"a": [max_loras, in, max_lora_rank], "b": [max_loras, max_lora_rank, out]}  in config.dtype

Slot s holds at index s - 1 the adapter's lora_A transposed (zero past its rank) and its lora_B
transposed times its scaling (alpha / r, or alpha / sqrt(r) for rsLoRA). The model
(`jpaged.models.llama.lora_delta`) computes
x @ a for every slot at once, zeroes the slots other than each token's own and contracts with
b: two dense matmuls for a whole mixed batch, no gather, and no new program shape per adapter.
"""

import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models.llama import param_shapes

# The projections an adapter may target (the Llama family's linears), and their HF module paths.
TARGET_MODULES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TENSOR_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request (vLLM's class and fields): `lora_int_id` >= 1 identifies it
    (one id, one adapter), `lora_name` is what the server lists and the prefix cache keys on,
    `lora_path` a folder with adapter_config.json and adapter_model.safetensors, or a hub id."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("lora_path cannot be empty")


@dataclasses.dataclass(eq=False)  # compared and hashed by identity: a reloaded adapter is another one
class LoRAAdapter:
    """One adapter's weights on the host: (layer, module) -> (a f32[in, r], b f32[r, out]),
    b already scaled. Modules the adapter does not target are absent."""

    name: str
    rank: int  # the largest rank over its modules
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @functools.cached_property
    def digest(self) -> bytes:
        """sha256 of the weights: KV computed under them is reused only under the same weights
        (the first block's hash of a request starts from it)."""
        h = hashlib.sha256()
        for (layer, module), (a, b) in sorted(self.weights.items()):
            h.update(f"{layer}.{module}.{a.shape}.{b.shape}".encode())
            h.update(a.tobytes())
            h.update(b.tobytes())
        return h.digest()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def resolve_adapter_path(path: str, download_dir: str | None = None, token: str | None = None) -> str:
    """A local folder with the adapter: `path` itself, or a hub id's snapshot (downloaded; `token`
    for a gated or private repo)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.count("/") != 1:
        raise ValueError(f"LoRA adapter path {path!r} is not a folder (it needs {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS}) or a hub id (org/name).")
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(path, cache_dir=download_dir,
                                                 allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS], token=token)
    except Exception as e:  # offline, unknown or gated repo: the same answer for the user
        raise ValueError(f"LoRA adapter {path!r} is not a local folder, and downloading it from the hub failed "
                         f"({type(e).__name__}: {e}). This machine may be offline: pass a local folder.") from e


def _pattern_value(pattern: dict, module_name: str):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that is a dotted suffix of the name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


def _check_config(config: dict, path: str, max_lora_rank: int) -> None:
    """ValueError naming every PEFT feature of `config` that jpaged does not serve (vLLM's list)."""
    problems = []
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} lacks {', '.join(missing)}: not a LoRA adapter config.")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config['peft_type']!r} is not LORA.")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save ({config['modules_to_save']}) is not supported.")
    if config.get("use_dora"):
        problems.append("DoRA is not supported.")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("Adapter bias is not supported.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        problems.append(f"init_lora_weights={init!r} modifies the base weights and is not supported.")
    for key in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if config.get(key):
            problems.append(f"{key} is not supported.")
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if any(not isinstance(r, int) or r <= 0 for r in ranks):
        problems.append(f"LoRA rank `r` must be a positive integer, got {ranks}.")
    elif max(ranks) > max_lora_rank:
        problems.append(f"LoRA rank {max(ranks)} is greater than max_lora_rank {max_lora_rank}.")
    if problems:
        raise ValueError(f"LoRA adapter {path}: {' '.join(problems)}")


def load_adapter(request: LoRARequest, model_config, max_lora_rank: int,
                 download_dir: str | None = None, token: str | None = None) -> LoRAAdapter:
    """Reads a PEFT LoRA adapter for `model_config`'s model. ValueError, saying why, for a
    missing or unreadable adapter, a feature jpaged does not serve (DoRA, biases,
    modules_to_save, ...), a rank above max_lora_rank, a module other than the seven Llama
    projections, or a shape that does not fit the model."""
    from safetensors import safe_open

    folder = resolve_adapter_path(request.lora_path, download_dir, token)
    config_path, weights_path = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise ValueError(f"LoRA adapter {request.lora_path!r} has no {ADAPTER_CONFIG}.")
    if not os.path.isfile(weights_path):
        raise ValueError(f"LoRA adapter {request.lora_path!r} has no {ADAPTER_WEIGHTS} (a .bin adapter must be "
                         "converted to safetensors first).")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"LoRA adapter {request.lora_path!r}: cannot read {ADAPTER_CONFIG} ({e}).") from None
    _check_config(config, request.lora_path, max_lora_rank)
    shapes = _module_shapes(model_config)
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = collections.defaultdict(dict)
    try:
        with safe_open(weights_path, framework="numpy") as f:
            for name in f.keys():
                match = _TENSOR_NAME.match(name)
                if match is None or match.group(3) not in TARGET_MODULES:
                    raise ValueError(f"LoRA adapter {request.lora_path!r}: tensor {name} is not a lora_A / lora_B of "
                                     f"one of {', '.join(TARGET_MODULES)}, the modules jpaged adapts.")
                layer, module = int(match.group(1)), match.group(3)
                if layer >= model_config.num_layers:
                    raise ValueError(f"LoRA adapter {request.lora_path!r}: tensor {name} is for layer {layer}, the "
                                     f"model has {model_config.num_layers}.")
                halves[(layer, module)][match.group(4)] = f.get_tensor(name).astype(np.float32)
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors for a truncated or corrupt file
        raise ValueError(f"LoRA adapter {request.lora_path!r}: {ADAPTER_WEIGHTS} is not readable ({e}).") from e
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {request.lora_path!r}: layer {layer} {module} has lora_{''.join(pair)} "
                             "without its other half.")
        module_name = f"model.layers.{layer}.{TARGET_MODULES[module]}"
        rank = _pattern_value(config.get("rank_pattern") or {}, module_name) or config["r"]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module_name) or config["lora_alpha"]
        lora_a, lora_b = pair["A"], pair["B"]  # PEFT: A [r, in], B [out, r]
        fan_in, fan_out = shapes[module]
        if lora_a.shape != (rank, fan_in) or lora_b.shape != (fan_out, rank):
            raise ValueError(f"LoRA adapter {request.lora_path!r}: layer {layer} {module} has lora_A "
                             f"{list(lora_a.shape)} and lora_B {list(lora_b.shape)}; this model needs "
                             f"[{rank}, {fan_in}] and [{fan_out}, {rank}] (an adapter for another base model?).")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weights[(layer, module)] = (np.ascontiguousarray(lora_a.T), np.ascontiguousarray(lora_b.T * scaling))
    if not weights:
        raise ValueError(f"LoRA adapter {request.lora_path!r} holds no LoRA weights.")
    return LoRAAdapter(request.lora_name, max(a.shape[1] for a, _ in weights.values()), weights)


def _module_shapes(model_config) -> dict[str, tuple[int, int]]:
    """Target module -> (in, out) features, from the model's param shapes."""
    layer = param_shapes(model_config)["layers"][0]
    return {module: layer[module] for module in TARGET_MODULES}


def empty_lora_params(model_config, max_loras: int, max_lora_rank: int, sharding=None) -> list[dict]:
    """The params' "lora" entry with every slot empty (zeros): one dict per layer, one
    {"a", "b"} per target module (module docstring), placed with `sharding` when given."""
    dtype = jnp.dtype(model_config.dtype)
    shapes = _module_shapes(model_config)

    def zeros(shape):
        return jnp.zeros(shape, dtype) if sharding is None else jax.device_put(np.zeros(shape, dtype), sharding)

    return [{module: {"a": zeros((max_loras, fan_in, max_lora_rank)), "b": zeros((max_loras, max_lora_rank, fan_out))}
             for module, (fan_in, fan_out) in shapes.items()} for _ in range(model_config.num_layers)]


def slot_weights(adapter: LoRAAdapter, lora_params: list[dict]) -> list[dict]:
    """One slot's worth of `lora_params` for `adapter` (zeros for the modules it does not target
    and past its rank): per layer and module, a [1, in, max_lora_rank] and b [1, max_lora_rank, out]."""
    out = []
    for layer, modules in enumerate(lora_params):
        entry = {}
        for module, w in modules.items():
            a = np.zeros((1, *w["a"].shape[1:]), w["a"].dtype)
            b = np.zeros((1, *w["b"].shape[1:]), w["b"].dtype)
            if (layer, module) in adapter.weights:
                lora_a, lora_b = adapter.weights[(layer, module)]
                a[0, :, :lora_a.shape[1]] = lora_a
                b[0, :lora_b.shape[0]] = lora_b
            entry[module] = {"a": a, "b": b}
        out.append(entry)
    return out


def set_lora_slot(lora_params: list[dict], slot, weights: list[dict]) -> list[dict]:
    """`lora_params` with slot `slot` (1..max_loras, an i32 scalar) holding `weights`
    (`slot_weights`). Jitted by the runner with lora_params donated."""
    def put(w, new):
        return {name: jax.lax.dynamic_update_slice(w[name], new[name], (slot - 1, 0, 0)) for name in ("a", "b")}

    return [{module: put(w, new[module]) for module, w in layer.items()} for layer, new in zip(lora_params, weights)]


class AdapterCache:
    """Host copies of adapters by lora_int_id, least recently used first out past `capacity`
    (--max-cpu-loras); thread-safe. `get` loads an adapter that is not (or no longer) here, or
    whose id now names another LoRARequest."""

    def __init__(self, capacity: int, load):
        self.capacity = capacity
        self._load = load  # LoRARequest -> LoRAAdapter
        self._adapters: collections.OrderedDict[int, tuple[LoRARequest, LoRAAdapter]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, request: LoRARequest) -> LoRAAdapter:
        with self._lock:
            entry = self._adapters.get(request.lora_int_id)
            if entry is not None and entry[0] == request:
                self._adapters.move_to_end(request.lora_int_id)
                return entry[1]
            adapter = self._load(request)
            self._adapters[request.lora_int_id] = (request, adapter)
            self._adapters.move_to_end(request.lora_int_id)
            while len(self._adapters) > self.capacity:
                self._adapters.popitem(last=False)
            return adapter

    def peek(self, request: LoRARequest) -> LoRAAdapter | None:
        """The adapter if it is here, without loading it or refreshing its place."""
        with self._lock:
            entry = self._adapters.get(request.lora_int_id)
            return entry[1] if entry is not None and entry[0] == request else None

    def remove(self, lora_int_id: int) -> bool:
        with self._lock:
            return self._adapters.pop(lora_int_id, None) is not None

    def requests(self) -> list[LoRARequest]:
        with self._lock:
            return [request for request, _ in self._adapters.values()]


class SlotTable:
    """Which adapter (a LoRAAdapter, by identity) sits in which device slot 1..num_slots."""

    def __init__(self, num_slots: int):
        self.slots: list[LoRAAdapter | None] = [None] * num_slots  # slot s + 1 -> its adapter
        self._last_used = [0] * num_slots
        self._clock = 0

    def assign(self, needed: set, keep: set) -> tuple[dict, list[tuple[int, LoRAAdapter]]]:
        """Slots for the adapters of one step: ({adapter: slot}, [(slot, adapter) to load]).
        An adapter to load takes an empty slot, else the least recently used one whose adapter is
        neither needed now nor in `keep` (the running requests' adapters), else any not needed now.
        ValueError when `needed` has more adapters than slots."""
        if len(needed) > len(self.slots):
            raise ValueError(f"a step needs {len(needed)} LoRA adapters but there are {len(self.slots)} slots "
                             "(--max-loras)")
        self._clock += 1
        loads = []
        for adapter in sorted(needed, key=lambda a: a.name):
            if adapter not in self.slots:
                candidates = [i for i, held in enumerate(self.slots) if held not in needed]
                index = min(candidates, key=lambda i: (self.slots[i] is not None, self.slots[i] in keep,
                                                       self._last_used[i]))
                self.slots[index] = adapter
                loads.append((index + 1, adapter))
            self._last_used[self.slots.index(adapter)] = self._clock
        return {adapter: self.slots.index(adapter) + 1 for adapter in needed}, loads

    def evict(self, adapter: LoRAAdapter) -> None:
        """Forgets the adapter's slot (after its load failed)."""
        if adapter in self.slots:
            self.slots[self.slots.index(adapter)] = None
