"""DataParallelAsyncLLM: `--data-parallel-size M` engine replicas behind one AsyncLLM interface.

Replica i is a whole engine (AsyncLLM over its own LLMEngine: its own engine thread, scheduler,
prefix cache and KV pool) on devices jax.devices()[i*TP:(i+1)*TP], TP = --tensor-parallel-size.
Each request goes to one replica, chosen by DataParallelRouter (jpaged/dp_router.py: least
loaded, with prefix-cache affinity); its request id then belongs to that replica until its
stream ends, so `abort` reaches the replica that runs it. The server and `LLM` use this class the
way they use AsyncLLM. A replica that fails stops getting requests; the front reports `errored`
only when every replica has.
"""

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterable

import jax

from jpaged import kv_pool
from jpaged.admission import Admission
from jpaged.async_llm import AsyncLLM
from jpaged.config import EngineArgs
from jpaged.dp_router import DEFAULT_MAX_AFFINITY_BLOCKS, DataParallelRouter
from jpaged.llm_engine import EngineDeadError, LLMEngine
from jpaged.loaders import load_model
from jpaged.lora import LoRARequest
from jpaged.outputs import EngineStats, RequestOutput
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def replica_devices(data_parallel_size: int, tensor_parallel_size: int, devices=None) -> list[list]:
    """Replica i's devices: devices[i*TP:(i+1)*TP] (devices: default jax.devices()).

    ValueError naming how many are needed and found when there are too few.
    """
    devices = jax.devices() if devices is None else list(devices)
    needed = data_parallel_size * tensor_parallel_size
    if len(devices) < needed:
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = (f" On CPU, start the process with XLA_FLAGS=--xla_force_host_platform_device_count={needed} "
                    f"to split the host into {needed} devices.")
        raise ValueError(
            f"--data-parallel-size {data_parallel_size} x --tensor-parallel-size {tensor_parallel_size} needs "
            f"{needed} devices, but jax found {len(devices)} ({devices[0].platform if devices else 'none'}).{hint}")
    return [devices[i * tensor_parallel_size:(i + 1) * tensor_parallel_size] for i in range(data_parallel_size)]


class DataParallelAsyncLLM:
    """Build with `DataParallelAsyncLLM.from_engine_args(args)` (blocking: builds every replica).

    replicas: the AsyncLLMs, all of the same model and engine args. affinity_slack: the router's
    (default max(1, max_num_seqs // 8)). Like AsyncLLM, any number of tasks may call `generate`
    concurrently; the routing state is touched by one event loop at a time.
    """

    def __init__(self, replicas: list[AsyncLLM], affinity_slack: int | None = None):
        first = replicas[0]
        self.replicas = replicas
        self.engine_args: EngineArgs = first.engine_args
        self.tokenizer = first.tokenizer
        self.model_config = first.model_config
        self.model_path = first.model_path
        self.pooler_config = None  # a pooling engine runs alone (LLMEngine refuses data parallelism)
        self.max_model_len: int = first.max_model_len
        self.validator = first.validator
        args = self.engine_args
        if affinity_slack is None:
            affinity_slack = max(1, args.max_num_seqs // 8)
        # Without a prefix cache there is nothing to be affine to: plain least-loaded.
        self.router = DataParallelRouter(
            len(replicas), args.block_size, affinity_slack,
            max_affinity_blocks=DEFAULT_MAX_AFFINITY_BLOCKS if args.enable_prefix_caching else 0)
        self._owners: dict[str, int] = {}  # request id -> index of the replica running it
        # The queue limits count all replicas' requests together.
        self.admission = Admission(args.max_num_queued_reqs, args.max_num_queued_tokens)
        for replica in replicas:
            replica.admission = self.admission

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "DataParallelAsyncLLM":
        # As LLMEngine does, before the first device query starts JAX's GPU client.
        kv_pool.configure_xla_allocator(engine_args.gpu_memory_utilization)
        slices = replica_devices(engine_args.data_parallel_size, engine_args.tensor_parallel_size)

        def build(index: int) -> AsyncLLM:
            logger.info("data parallel: building replica %d of %d on %s", index, len(slices),
                        ", ".join(str(d) for d in slices[index]))
            # The loaders put weights on the default device: make it this replica's (thread-local),
            # so replica i's weights never pass through device 0's memory.
            with jax.default_device(slices[index][0]):
                return AsyncLLM(LLMEngine(engine_args, show_progress=index == 0, devices=slices[index]))

        # Each replica loads the model and compiles its programs for its own devices (compiled
        # programs are per device assignment: nothing to share). Replica 0 first, alone, so the
        # loaders' lazy imports (transformers' are not thread-safe) happen on one thread; then the
        # others concurrently.
        first = build(0)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(slices) - 1)) as pool:
            return cls([first, *pool.map(build, range(1, len(slices)))])

    @property
    def is_ready(self) -> bool:
        return any(replica.is_ready for replica in self.replicas)

    @property
    def errored(self) -> bool:
        return all(replica.errored for replica in self.replicas)

    # ---- public API: AsyncLLM's --------------------------------------------------------------

    async def generate(self, prompt, sampling_params: SamplingParams | None, request_id: str,
                       arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                       priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """AsyncLLM.generate on the replica the router picks (same outputs, errors and abort on close)."""
        arrival_time = time.time() if arrival_time is None else arrival_time
        if request_id in self._owners:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        available = [replica.is_ready for replica in self.replicas]
        if not any(available):
            raise EngineDeadError("the engine is not running (it failed or was shut down)")
        prompt, token_ids = self._with_token_ids(prompt)
        params = SamplingParams() if sampling_params is None else sampling_params
        salt = prompt.get("cache_salt", cache_salt) if isinstance(prompt, dict) else cache_salt
        seed = self.router.prefix_seed(None if lora_request is None else lora_request.lora_name, salt)
        index = self.router.dispatch(token_ids, params.n, available, seed)
        self._owners[request_id] = index
        stream = self.replicas[index].generate(prompt, params, request_id, arrival_time, lora_request, priority,
                                               cache_salt)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()  # aborts the request if it is still running
            self.router.release(index, params.n)
            del self._owners[request_id]

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Ends the request (or each of several) on the replica running it (nothing for an unknown id)."""
        for one_id in [request_id] if isinstance(request_id, str) else request_id:
            index = self._owners.get(one_id)
            if index is not None:
                await self.replicas[index].abort(one_id)

    def replica_of(self, request_id: str) -> int | None:
        """The index of the replica running `request_id` (None: not running here)."""
        return self._owners.get(request_id)

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """AsyncLLM.add_lora on every replica."""
        return all(await asyncio.gather(*(replica.add_lora(lora_request) for replica in self.replicas)))

    async def remove_lora(self, lora_int_id: int) -> bool:
        """AsyncLLM.remove_lora on every replica; whether any held it."""
        return any(await asyncio.gather(*(replica.remove_lora(lora_int_id) for replica in self.replicas)))

    async def list_loras(self) -> set[int]:
        return await self.replicas[0].list_loras()

    async def update_weights(self, params) -> None:
        """AsyncLLM.update_weights on every replica (each copies the params to its devices)."""
        await asyncio.gather(*(replica.update_weights(params) for replica in self.replicas))

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """AsyncLLM.sleep on every replica."""
        await asyncio.gather(*(replica.sleep(level, mode) for replica in self.replicas))

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        """AsyncLLM.pause_generation on every replica."""
        await asyncio.gather(*(replica.pause_generation(mode=mode, clear_cache=clear_cache)
                               for replica in self.replicas))

    async def resume_generation(self) -> None:
        await asyncio.gather(*(replica.resume_generation() for replica in self.replicas))

    async def is_paused(self) -> bool:
        return any([await replica.is_paused() for replica in self.replicas])

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """AsyncLLM.reset_prefix_cache on every replica."""
        return all(await asyncio.gather(*(replica.reset_prefix_cache(reset_running_requests)
                                          for replica in self.replicas)))

    async def start_profile(self, profile_prefix: str | None = None, delay_iterations: int | None = None,
                            max_iterations: int | None = None) -> None:
        """AsyncLLM.start_profile on replica 0: JAX traces the whole process, so every replica's
        steps; replica 0's steps count delay_iterations and max_iterations."""
        await self.replicas[0].start_profile(profile_prefix, delay_iterations, max_iterations)

    async def stop_profile(self) -> None:
        await self.replicas[0].stop_profile()

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        """AsyncLLM.wake_up on every replica; whether all are fully awake."""
        return all(await asyncio.gather(*(replica.wake_up(tags) for replica in self.replicas)))

    async def is_sleeping(self) -> bool:
        return any([await replica.is_sleeping() for replica in self.replicas])

    async def update_weights_from_disk(self, model_path: str, load_format: str = "auto") -> None:
        """Loads a checkpoint once and swaps it into every replica (see AsyncLLM's)."""
        loaded = await asyncio.to_thread(load_model, model_path, dtype=self.model_config.dtype,
                                         load_format=load_format, quantization=self.engine_args.quantization,
                                         hf_overrides=self.engine_args.hf_overrides, hf_token=self.engine_args.hf_token,
                                         keep_gguf_blocks=self.replicas[0].engine.keep_gguf_blocks)
        await self.update_weights(loaded.params)

    def get_stats(self) -> EngineStats:
        """The replicas' counters summed (histogram counts bucket by bucket) and their LoRA adapter
        names joined; kv_cache_usage is their mean (every pool has the same size)."""
        per_engine = self.get_stats_per_engine()
        totals = {}
        for field in dataclasses.fields(EngineStats):
            values = [getattr(s, field.name) for s in per_engine]
            if field.name.endswith("_lora_adapters"):
                totals[field.name] = tuple(dict.fromkeys(name for names in values for name in names))
            elif field.name in ("iteration_tokens_counts", "spec_accepted_tokens_per_pos"):
                totals[field.name] = tuple(map(sum, zip(*values)))
            elif field.name == "sleep_level":  # the replicas sleep and wake together
                totals[field.name] = values[0]
            else:
                totals[field.name] = sum(values)
        totals["kv_cache_usage"] /= len(per_engine)
        return EngineStats(**totals)

    def get_stats_per_engine(self) -> list[EngineStats]:
        """One snapshot per replica, in replica order (/metrics labels them engine="i")."""
        return [replica.get_stats() for replica in self.replicas]

    async def shutdown(self) -> None:
        """Stops every replica; in-flight requests finish with "abort"."""
        await asyncio.gather(*(replica.shutdown() for replica in self.replicas))

    # ---- helpers -----------------------------------------------------------------------------

    def _with_token_ids(self, prompt) -> tuple[object, list[int]]:
        """(the prompt to hand a replica, its token ids for routing). A text prompt is tokenized
        here once and handed on with its ids, so the replica does not tokenize it again."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt, list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                token_ids = self.tokenizer.encode(prompt["prompt"])
                return {**prompt, "prompt_token_ids": token_ids}, token_ids
            return prompt, []  # the replica raises its ValueError naming the missing key
        return prompt, [int(t) for t in prompt]
