"""GPU KV-pool sizing arithmetic, device-free: a fake GPU device with made-up memory_stats."""

import json
import weakref

import jax
import pytest

from jpaged import EngineArgs, kv_pool
from jpaged.attention_backend import select_attention
from jpaged.models import llama
from jpaged.models.config import ModelConfig
from jpaged.runner import largest_step_bytes
from pallas_kernels.reference import write_kv
from test_gpu_lowering import LLAMA3_8B

GIB = kv_pool.GIB


class FakeGpu:
    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


@pytest.fixture
def llama3_8b():
    with open(LLAMA3_8B) as f:
        return ModelConfig.from_hf_config(json.load(f), dtype="bfloat16")


def block_bytes(config):
    return kv_pool.bytes_per_block(config, 16, "bfloat16")  # 2 MiB for Llama-3-8B


def test_utilization_is_a_fraction_of_total_memory(llama3_8b, monkeypatch):
    """jpaged set XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9: the allocator limit is 0.9 x 80 GiB."""
    monkeypatch.setenv(kv_pool.XLA_MEM_FRACTION, "0.9")
    device = FakeGpu({"bytes_limit": int(0.9 * 80 * GIB), "bytes_in_use": 15 * GIB})
    calls = []
    spec = kv_pool.size_pool(llama3_8b, EngineArgs(gpu_memory_utilization=0.9), 8192, "bfloat16", device,
                             step_bytes=lambda: calls.append(1) or 3 * GIB)
    assert calls == [1]
    assert block_bytes(llama3_8b) == 2 << 20
    assert spec.num_blocks == int((0.9 * 80 - 15 - 3) * GIB) // (2 << 20)  # 27648 blocks: 54 GiB


def test_user_fraction_above_utilization_still_means_total_memory(llama3_8b, monkeypatch):
    """A user's XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 does not change what 0.8 means."""
    monkeypatch.setenv(kv_pool.XLA_MEM_FRACTION, "0.95")
    device = FakeGpu({"bytes_limit": int(0.95 * 80 * GIB), "bytes_in_use": 15 * GIB})
    spec = kv_pool.size_pool(llama3_8b, EngineArgs(gpu_memory_utilization=0.8), 8192, "bfloat16", device,
                             step_bytes=lambda: 1 * GIB)
    assert spec.num_blocks == pytest.approx((0.8 * 80 - 16) * GIB / (2 << 20), abs=1)


def test_jax_started_first_sizes_from_its_default_allocator_limit(llama3_8b, monkeypatch, caplog):
    """The variable unset because JAX already ran on the GPU: its allocator holds 0.75 x 80 GiB,
    less than 0.9 asks for; the pool takes what the allocator allows, with a warning."""
    monkeypatch.delenv(kv_pool.XLA_MEM_FRACTION, raising=False)
    memory = kv_pool.GpuMemory.from_stats({"bytes_limit": 60 * GIB, "bytes_in_use": 0}, kv_pool.xla_mem_fraction(), 0)
    assert memory.total == 80 * GIB and memory.fraction == 0.75 and not memory.fraction_set
    device = FakeGpu({"bytes_limit": 60 * GIB, "bytes_in_use": 15 * GIB})
    spec = kv_pool.size_pool(llama3_8b, EngineArgs(gpu_memory_utilization=0.9), 8192, "bfloat16", device,
                             step_bytes=lambda: 1 * GIB)
    assert spec.num_blocks == 44 * GIB // (2 << 20)
    assert "JAX started on the GPU before the engine could set XLA_PYTHON_CLIENT_MEM_FRACTION" in caplog.text


def test_utilization_above_the_allocator_fraction_names_both(llama3_8b, monkeypatch):
    monkeypatch.setenv(kv_pool.XLA_MEM_FRACTION, "0.5")
    device = FakeGpu({"bytes_limit": 40 * GIB, "bytes_in_use": 15 * GIB})
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization 0.9 asks for 72.00 GiB of the device's "
                                         r"80.00 GiB, but XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 .* 40.00 GiB"):
        kv_pool.size_pool(llama3_8b, EngineArgs(gpu_memory_utilization=0.9), 8192, "bfloat16", device)


def test_out_of_memory_names_the_flag_and_by_how_much(llama3_8b, monkeypatch):
    """0.3 x 80 GiB = 24 GiB, 15 GiB of weights and 8.5 GiB for the step leave 0.5 GiB: 256
    blocks, but one 8192-token sequence needs 512 (+ the null block)."""
    monkeypatch.setenv(kv_pool.XLA_MEM_FRACTION, "0.3")
    device = FakeGpu({"bytes_limit": int(0.3 * 80 * GIB), "bytes_in_use": 15 * GIB})
    args = EngineArgs(gpu_memory_utilization=0.3)
    with pytest.raises(ValueError) as error:
        kv_pool.size_pool(llama3_8b, args, 8192, "bfloat16", device, step_bytes=lambda: int(8.5 * GIB))
    message = str(error.value)
    assert "max_model_len=8192 needs 512 blocks" in message
    assert "leaves room for 255" in message
    assert "short by 0.50 GiB" in message  # 513 blocks = 1.002 GiB, 0.5 GiB left
    # The utilization it names is enough: 24 GiB + 0.502 GiB over 80 GiB.
    needed = float(message.split("--gpu-memory-utilization to at least ")[1].split(",")[0])
    assert needed == pytest.approx((15 + 8.5 + 513 * 2 / 1024) / 80, abs=1e-3)
    assert "--max-model-len (at most 4080 tokens fit now)" in message
    monkeypatch.setenv(kv_pool.XLA_MEM_FRACTION, str(needed))
    device = FakeGpu({"bytes_limit": int(needed * 80 * GIB), "bytes_in_use": 15 * GIB})
    spec = kv_pool.size_pool(llama3_8b, EngineArgs(gpu_memory_utilization=needed), 8192, "bfloat16", device,
                             step_bytes=lambda: int(8.5 * GIB))
    assert spec.num_blocks >= 513


def test_platform_allocator_without_a_limit_asks_for_an_explicit_size(llama3_8b):
    with pytest.raises(ValueError, match="--kv-cache-memory or --num-gpu-blocks-override"):
        kv_pool.size_pool(llama3_8b, EngineArgs(), 8192, "bfloat16", FakeGpu(None))
    spec = kv_pool.size_pool(llama3_8b, EngineArgs(kv_cache_memory=2.0), 8192, "bfloat16", FakeGpu(None))
    assert spec.num_blocks == 1024


def test_configure_xla_allocator_sets_only_an_unset_fraction(monkeypatch):
    monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: False)
    environ = {}
    kv_pool.configure_xla_allocator(0.9, environ)
    assert environ == {kv_pool.XLA_MEM_FRACTION: "0.9"}
    environ = {kv_pool.XLA_MEM_FRACTION: "0.5"}
    kv_pool.configure_xla_allocator(0.9, environ)
    assert environ == {kv_pool.XLA_MEM_FRACTION: "0.5"}
    monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: True)
    environ = {}
    kv_pool.configure_xla_allocator(0.9, environ)  # too late to matter: left alone
    assert environ == {}


def test_largest_step_bytes_from_memory_analysis(tiny_model_dir):
    """The probe compiles the largest bucket's forward and sampler (here on CPU): its bytes cover
    at least the sampler's logits and the forward's hidden-state output."""
    config = ModelConfig.from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()), dtype="float32")
    params = llama.init_params(config, jax.random.key(0))
    _, attention = select_attention("reference", "cpu")
    args = EngineArgs(max_num_batched_tokens=64, max_num_seqs=8)
    step = largest_step_bytes(config, params, attention, write_kv, args, 128, "float32", bucket_pages=True)
    logits = 8 * config.vocab_size * 4
    hidden = 64 * config.hidden_size * 4
    assert logits + hidden <= step < 64 * (1 << 20)


def test_compiled_step_bytes_without_an_analysis_reserves_nothing(caplog):
    assert kv_pool.compiled_step_bytes(None) == 0
    assert "no memory analysis" in caplog.text


def test_out_of_memory_when_even_the_whole_device_is_too_small(llama3_8b, monkeypatch):
    """Weights and the step alone overflow the budget: the shortfall counts them too."""
    monkeypatch.setenv(kv_pool.XLA_MEM_FRACTION, "0.9")
    device = FakeGpu({"bytes_limit": int(0.9 * 20 * GIB), "bytes_in_use": 15 * GIB})
    with pytest.raises(ValueError, match=r"short by 2.00 GiB. Even all of the device would not do; lower "
                                         r"--max-num-batched-tokens / --max-num-seqs, or lower --max-model-len "
                                         r"\(at most 0 tokens fit now\)"):
        kv_pool.size_pool(llama3_8b, EngineArgs(), 8192, "bfloat16", device, step_bytes=lambda: 4 * GIB)


class FragmentedDevice:
    """Fails an allocation once the pool's live arrays would pass `capacity` bytes: what XLA's
    allocator does when fragmentation leaves less room than its totals report."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.live = []  # weak references: an array dropped by `allocate` frees its bytes

    def block_until_ready(self, array):
        self.live = [ref for ref in self.live if ref() is not None]
        if sum(ref().nbytes for ref in self.live) + array.nbytes > self.capacity:
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate with allocator GPU_0_bfc\nsummary")
        self.live.append(weakref.ref(array))
        return array


def pool_spec(num_blocks, min_blocks):
    return kv_pool.KVPoolSpec(num_blocks=num_blocks, block_size=16, num_layers=4, num_kv_heads=2, head_dim=8,
                              dtype="float32", min_blocks=min_blocks)


def test_a_pool_sized_from_memory_settles_for_the_blocks_that_fit(monkeypatch, caplog):
    spec = pool_spec(1000, min_blocks=65)
    array_bytes = 1000 * 2 * 16 * 8 * 4
    device = FragmentedDevice(int(6.5 * array_bytes))  # 6 of the 8 arrays fit
    monkeypatch.setattr(kv_pool.jax, "block_until_ready", device.block_until_ready)
    pool = kv_pool.allocate(spec, jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))
    assert len(pool) == 4
    num_blocks = pool[0][0].shape[0]
    assert num_blocks == int(1000 * 6 / 8 * 0.98)  # 735: one retry
    assert all(k.shape == v.shape == (num_blocks, 2, 16, 8) for k, v in pool)
    assert "ran out of memory after 6 of the KV cache's 8 arrays of 1000 blocks" in caplog.text
    assert "trying 735 blocks instead" in caplog.text


@pytest.mark.parametrize("min_blocks", [0, 900], ids=["exact", "too-few-fit"])
def test_a_pool_that_cannot_shrink_fails_naming_the_flags(monkeypatch, min_blocks):
    """An exact size (--num-gpu-blocks-override, --kv-cache-memory) is not shrunk; nor below one
    max_model_len sequence."""
    device = FragmentedDevice(int(6.5 * 1000 * 2 * 16 * 8 * 4))
    monkeypatch.setattr(kv_pool.jax, "block_until_ready", device.block_until_ready)
    with pytest.raises(ValueError, match=r"Out of device memory for the KV cache: the device ran out of memory "
                                         r"after 6 of the KV cache's 8 arrays of 1000 blocks \(RESOURCE_EXHAUSTED.*"
                                         r"Lower --num-gpu-blocks-override"):
        kv_pool.allocate(pool_spec(1000, min_blocks), jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))


def test_sizing_from_gpu_memory_lets_the_pool_shrink_to_one_sequence(llama3_8b, monkeypatch):
    monkeypatch.setenv(kv_pool.XLA_MEM_FRACTION, "0.9")
    device = FakeGpu({"bytes_limit": int(0.9 * 80 * GIB), "bytes_in_use": 15 * GIB})
    spec = kv_pool.size_pool(llama3_8b, EngineArgs(), 8192, "bfloat16", device, step_bytes=lambda: GIB)
    assert spec.min_blocks == 8192 // 16 + 1
    exact = kv_pool.size_pool(llama3_8b, EngineArgs(num_gpu_blocks_override=600), 8192, "bfloat16", device)
    assert exact.min_blocks == 0


def test_the_out_of_memory_message_says_how_fragmented_the_allocator_is():
    state = kv_pool._allocator_state([FakeGpu(None), FakeGpu({
        "bytes_in_use": int(120.5 * GIB), "bytes_limit": int(125.82 * GIB), "largest_free_block_bytes": int(1.5 * GIB)})])
    assert state == "; allocator: 120.50 GiB in use of 125.82, largest free block 1.50 GiB"
    assert kv_pool._allocator_state([FakeGpu({"bytes_in_use": 1})]) == ""
