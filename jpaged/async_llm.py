"""AsyncLLM: the asyncio front of the engine, for servers.

The LLMEngine lives on its own thread ("jpaged-engine"), which steps back to back while
requests are unfinished and sleeps otherwise. Adds and aborts reach it through thread-safe
deques and are applied between steps; each step's outputs go back to the event loop of the
request's consumer (`call_soon_threadsafe` into its asyncio queue). So HTTP work (parsing,
detokenized SSE chunks) runs on the event loop while the next step computes, instead of in
the gap between two steps. Any number of tasks may call `generate` concurrently; only the
engine thread touches the engine while it runs.
"""

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable

from jpaged.admission import Admission
from jpaged.config import EngineArgs
from jpaged.llm_engine import EngineDeadError, LLMEngine
from jpaged.loaders import load_model
from jpaged.lora import LoRARequest
from jpaged.outputs import EngineStats, PoolingRequestOutput, RequestOutput
from jpaged.pooling import PoolingParams
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLM:
    """Build with `AsyncLLM.from_engine_args(args)` (blocking: loads, sizes the pool, compiles)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.engine_args: EngineArgs = engine.engine_args
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.model_path = engine.model_path
        self.pooler_config = engine.pooler_config  # None unless --runner pooling
        self.max_model_len: int = engine.max_model_len
        self.validator = engine.validator  # immutable: safe to call from any task
        self.is_ready = True
        self.errored = False
        # request id -> (its consumer's event loop, its asyncio queue); touched on event loops only.
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # (request_id, prompt, params, arrival_time, lora_request, priority, cache_salt)
        self._adds: collections.deque = collections.deque()
        self._aborts: collections.deque = collections.deque()  # request ids
        # Calls to run on the engine thread between two steps: (fn, ready or None, loop, future); one whose
        # ready() is False waits (steps go on) until it holds.
        self._calls: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        # Structured-outputs grammars compile here, off the event loop and the engine thread.
        self._grammar_executor = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                                       thread_name_prefix="jpaged-grammar")
        self._stats = engine.get_stats()
        self._closed = False
        # --max-num-queued-reqs / --max-num-queued-tokens (a data-parallel front shares its own).
        self.admission = Admission(self.engine_args.max_num_queued_reqs, self.engine_args.max_num_queued_tokens)
        # Added requests without a token yet, while the admission counts prefill (engine thread only).
        self._prefilling: set[str] = set()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "AsyncLLM":
        if engine_args.data_parallel_size > 1:
            raise ValueError(f"AsyncLLM runs one engine; data_parallel_size={engine_args.data_parallel_size} "
                             "needs jpaged.data_parallel.DataParallelAsyncLLM.from_engine_args.")
        return cls(LLMEngine(engine_args))

    # ---- public API --------------------------------------------------------------------------

    async def generate(self, prompt, sampling_params: SamplingParams | None, request_id: str,
                       arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                       priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutputs for one prompt (str, token ids, or a prompt dict).

        Yields per sampling_params.output_kind. Raises ValueError before the first yield for an
        invalid request, jpaged.admission.QueueFullError for one over --max-num-queued-reqs or
        --max-num-queued-tokens. If the consumer stops iterating, the request is aborted. `arrival_time`
        (time.time(); default: this call) is when queue time and TTFT start counting.
        lora_request: the LoRA adapter to run it with (an engine with enable_lora). priority,
        cache_salt: as LLMEngine.add_request takes them.
        """
        params = SamplingParams() if sampling_params is None else sampling_params
        async for output in self._stream(prompt, params, request_id, arrival_time, lora_request, priority, cache_salt):
            yield output

    async def encode(self, prompt, pooling_params: PoolingParams | None, request_id: str,
                     arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                     priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[PoolingRequestOutput]:
        """vLLM's: the embedding of one prompt from a pooling engine (--runner pooling), as one
        finished PoolingRequestOutput (outputs None if it was aborted or its step failed). The
        other arguments and the errors are generate's."""
        params = PoolingParams() if pooling_params is None else pooling_params
        async for output in self._stream(prompt, params, request_id, arrival_time, lora_request, priority, cache_salt):
            yield output

    async def _stream(self, prompt, params: SamplingParams | PoolingParams, request_id: str, arrival_time: float | None,
                      lora_request: LoRARequest | None, priority: int, cache_salt: str | None):
        """generate's and encode's body: queues the request and yields its outputs."""
        arrival_time = time.time() if arrival_time is None else arrival_time
        if self.errored or self._closed:
            raise EngineDeadError("the engine is not running (it failed or was shut down)")
        if request_id in self._queues:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        sampling = isinstance(params, SamplingParams)
        num_prompt_tokens = len(self.tokenizer.prompt_and_ids(prompt)[1]) if self.admission.counts_prefill else 0
        # Before any await: concurrent calls see it.
        self.admission.admit(request_id, params.n if sampling else 1, num_prompt_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (loop, queue)
        finished = queued = False
        try:
            if sampling and params.structured_outputs is not None:
                # Compiles (or finds cached) the grammar; ValueError for an invalid one, before queueing.
                await loop.run_in_executor(self._grammar_executor, self.engine.structured_output.compile,
                                           params.structured_outputs)
            self._adds.append((request_id, prompt, params, arrival_time, lora_request, priority, cache_salt))
            queued = True
            self._ensure_thread()
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self.admission.release(request_id)
            if queued and not finished:
                self._aborts.append(request_id)
                self._wake.set()

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Ends the request (or each of several, as vLLM's takes them); its generator yields a final
        output with finish_reason "abort". Unknown or finished ids are ignored."""
        self._aborts.extend([request_id] if isinstance(request_id, str) else request_id)
        self._ensure_thread()

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads an adapter into the engine's host memory (in a thread); ValueError when it cannot be served."""
        return await asyncio.to_thread(self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Drops an adapter from host memory; whether it was there."""
        return self.engine.remove_lora(lora_int_id)

    async def list_loras(self) -> set[int]:
        """The ids of the adapters in host memory."""
        return self.engine.list_loras()

    async def update_weights(self, params) -> None:
        """Swaps in new params between two steps (LLMEngine.update_weights: same structure,
        shapes and dtypes, else ValueError). Requests keep running; later tokens use the new weights."""
        await self._on_engine_thread(lambda: self.engine.update_weights(params))

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """LLMEngine.sleep between two steps. mode "wait": no new request is admitted, the running
        ones finish, then the engine sleeps (the queued ones run after wake_up)."""
        self.engine.check_sleep_args(level, mode)
        await self._pause_with(lambda: self.engine.sleep(level, mode), mode)

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        """vLLM's: LLMEngine.pause between two steps; mode "wait": no new request is admitted, the
        running ones finish, then scheduling pauses. The aborted requests' final outputs are
        delivered before it returns."""
        await self._pause_with(lambda: self.engine.pause(mode, clear_cache), mode)

    async def _pause_with(self, pause, mode: str) -> None:
        """pause() (the engine's pause or sleep) on the engine thread, once drained for mode "wait";
        delivers the outputs of the requests it aborted."""
        ready = self.engine.drained_for_pause if mode == "wait" else None
        for output in await self._on_engine_thread(pause, ready):
            self._deliver(output)

    async def resume_generation(self) -> None:
        """LLMEngine.resume between two steps."""
        await self._on_engine_thread(self.engine.resume)

    async def is_paused(self) -> bool:
        return self.engine.is_paused()

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """LLMEngine.reset_prefix_cache between two steps."""
        return await self._on_engine_thread(lambda: self.engine.reset_prefix_cache(reset_running_requests))

    async def start_profile(self, profile_prefix: str | None = None, delay_iterations: int | None = None,
                            max_iterations: int | None = None) -> None:
        """LLMEngine.start_profile between two steps."""
        await self._on_engine_thread(lambda: self.engine.start_profile(profile_prefix, delay_iterations,
                                                                       max_iterations))

    async def stop_profile(self) -> None:
        await self._on_engine_thread(self.engine.stop_profile)

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        """LLMEngine.wake_up between two steps; whether the engine is fully awake."""
        return await self._on_engine_thread(lambda: self.engine.wake_up(tags))

    async def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    async def _on_engine_thread(self, fn, ready=None):
        """fn()'s result (or its ValueError), run on the engine thread between two steps once
        ready() holds."""
        if self.errored or self._closed:
            raise EngineDeadError("the engine is not running (it failed or was shut down)")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._calls.append((fn, ready, loop, done))
        self._ensure_thread()
        return await done

    async def update_weights_from_disk(self, model_path: str, load_format: str = "auto") -> None:
        """Loads a checkpoint's params (in a thread, in the served dtype) and swaps them in with
        `update_weights`. ModelLoadError (a ValueError) when it cannot be loaded or does not fit."""
        loaded = await asyncio.to_thread(load_model, model_path, dtype=self.model_config.dtype,
                                         load_format=load_format, quantization=self.engine_args.quantization,
                                         hf_overrides=self.engine_args.hf_overrides, hf_token=self.engine_args.hf_token,
                                         keep_gguf_blocks=self.engine.keep_gguf_blocks)
        await self.update_weights(loaded.params)

    def get_stats(self) -> EngineStats:
        """The engine's counters as of the last step."""
        return self._stats

    def get_stats_per_engine(self) -> list[EngineStats]:
        """[get_stats()]: one engine (a DataParallelAsyncLLM gives one per replica)."""
        return [self._stats]

    async def shutdown(self) -> None:
        """Stops the engine thread; in-flight requests finish with "abort"."""
        self._closed = True
        self.is_ready = False
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for output in self.engine.abort_all_requests():
            self._deliver(output)
        while self._adds:
            request_id = self._adds.popleft()[0]
            self._put(request_id, EngineDeadError("the engine was shut down"))
        while self._calls:
            self._calls.popleft()[3].set_exception(EngineDeadError("the engine was shut down"))
        self._stats = self.engine.get_stats()
        self._grammar_executor.shutdown(wait=True)

    # ---- the engine thread -------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        """Starts the engine thread (once) and wakes it."""
        with self._thread_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
                self._thread.start()
        self._wake.set()

    def _put(self, request_id: str, item) -> None:
        """Hands an output or an exception to the request's consumer (from any thread)."""
        entry = self._queues.get(request_id)
        if entry is None:
            return
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is not None:
            self._put(output.request_id, output)

    def _apply_queued(self) -> None:
        while self._adds:
            request_id, prompt, params, arrival_time, lora_request, priority, cache_salt = self._adds.popleft()
            if request_id not in self._queues:  # the consumer left before it was added
                continue
            try:
                self.engine.add_request(request_id, prompt, params, arrival_time, lora_request, priority, cache_salt)
            except ValueError as e:
                self._put(request_id, e)
                continue
            if self.admission.counts_prefill:
                self._prefilling.add(request_id)
        aborted = []
        while self._aborts:
            aborted.append(self.engine.abort_request(self._aborts.popleft()))
        self._stats = self.engine.get_stats()  # before delivering: a finished consumer sees it
        for output in aborted:
            self._deliver(output)
        for _ in range(len(self._calls)):
            fn, ready, loop, done = self._calls.popleft()
            if ready is not None and not ready():
                self._calls.append((fn, ready, loop, done))
                continue
            try:
                result = fn()
                self._stats = self.engine.get_stats()  # e.g. the sleep state, before the caller sees the result
                loop.call_soon_threadsafe(done.set_result, result)
            except ValueError as e:
                loop.call_soon_threadsafe(done.set_exception, e)

    def _end_prefills(self) -> None:
        """Takes the requests that sampled a first token (or ended) out of the prefill backlog."""
        for request_id in [r for r in self._prefilling if not self.engine.is_prefilling(r)]:
            self._prefilling.discard(request_id)
            self.admission.prefill_done(request_id)

    def _run(self) -> None:
        try:
            while not self._closed:
                self._wake.clear()
                self._apply_queued()
                if not self.engine.has_unfinished_requests() or self.engine.is_sleeping():
                    self._wake.wait()
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.get_stats()  # before delivering: a finished consumer sees it
                if self._prefilling:
                    self._end_prefills()
                for output in outputs:
                    self._deliver(output)
        except Exception as e:  # a device or engine failure: fail every request, accept no more
            logger.exception("the engine loop failed")
            self.errored = True
            self.is_ready = False
            for request_id in list(self._queues):
                self._put(request_id, EngineDeadError(f"the engine failed: {e!r}"))
