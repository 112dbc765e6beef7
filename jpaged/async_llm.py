"""AsyncLLM: the asyncio front of the engine, for servers.

One background task owns the LLMEngine. It applies queued adds and aborts between steps, runs
each `engine.step()` in a single worker thread (so the event loop stays responsive while the
device computes), and routes the outputs to per-request asyncio queues. Any number of tasks may
call `generate` concurrently; only the background task touches the engine while it runs.
"""

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator

from jpaged.config import EngineArgs
from jpaged.llm_engine import EngineDeadError, LLMEngine
from jpaged.loaders import load_model
from jpaged.outputs import EngineStats, RequestOutput
from jpaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLM:
    """Build with `AsyncLLM.from_engine_args(args)` (blocking: loads, sizes the pool, compiles)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.engine_args: EngineArgs = engine.engine_args
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len: int = engine.max_model_len
        self.validator = engine.validator  # immutable: safe to call from any task
        self.is_ready = True
        self.errored = False
        self._queues: dict[str, asyncio.Queue] = {}
        self._adds: collections.deque = collections.deque()  # (request_id, prompt, params)
        self._aborts: collections.deque = collections.deque()  # request ids
        self._weight_updates: collections.deque = collections.deque()  # (params, future)
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpaged-step")
        self._stats = engine.get_stats()
        self._closed = False

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "AsyncLLM":
        return cls(LLMEngine(engine_args))

    # ---- public API --------------------------------------------------------------------------

    async def generate(self, prompt, sampling_params: SamplingParams | None, request_id: str,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutputs for one prompt (str, token ids, or a prompt dict).

        Yields per sampling_params.output_kind. Raises ValueError before the first yield for an
        invalid request. If the consumer stops iterating, the request is aborted. `arrival_time`
        (time.time(); default: this call) is when queue time and TTFT start counting.
        """
        arrival_time = time.time() if arrival_time is None else arrival_time
        if self.errored or self._closed:
            raise EngineDeadError("the engine is not running (it failed or was shut down)")
        if request_id in self._queues:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._adds.append((request_id, prompt, SamplingParams() if sampling_params is None else sampling_params,
                           arrival_time))
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._aborts.append(request_id)
                if self._wake is not None:
                    self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Ends the request; its generator yields a final output with finish_reason "abort"."""
        self._aborts.append(request_id)
        self._ensure_loop()

    async def update_weights(self, params) -> None:
        """Swaps in new params between two steps (LLMEngine.update_weights: same structure,
        shapes and dtypes, else ValueError). Requests keep running; later tokens use the new weights."""
        if self.errored or self._closed:
            raise EngineDeadError("the engine is not running (it failed or was shut down)")
        done = asyncio.get_running_loop().create_future()
        self._weight_updates.append((params, done))
        self._ensure_loop()
        await done

    async def update_weights_from_disk(self, model_path: str, load_format: str = "auto") -> None:
        """Loads a checkpoint's params (in a thread, in the served dtype) and swaps them in with
        `update_weights`. ModelLoadError (a ValueError) when it cannot be loaded or does not fit."""
        loaded = await asyncio.to_thread(load_model, model_path, dtype=self.model_config.dtype,
                                         load_format=load_format)
        await self.update_weights(loaded.params)

    def get_stats(self) -> EngineStats:
        """The engine's counters as of the last step."""
        return self._stats

    async def shutdown(self) -> None:
        """Ends the background loop; in-flight requests finish with "abort"."""
        self._closed = True
        self.is_ready = False
        if self._loop_task is not None:
            self._wake.set()
            await self._loop_task
            self._loop_task = None
        for output in self.engine.abort_all_requests():
            self._deliver(output)
        while self._adds:
            request_id = self._adds.popleft()[0]
            self._put(request_id, EngineDeadError("the engine was shut down"))
        while self._weight_updates:
            self._weight_updates.popleft()[1].set_exception(EngineDeadError("the engine was shut down"))
        self._stats = self.engine.get_stats()
        self._executor.shutdown(wait=True)

    # ---- background loop ---------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        """Starts the background task on the running event loop (again, if an earlier loop ended)."""
        task = self._loop_task
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    def _put(self, request_id: str, item) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is not None:
            self._put(output.request_id, output)

    def _apply_queued(self) -> None:
        while self._adds:
            request_id, prompt, params, arrival_time = self._adds.popleft()
            if request_id not in self._queues:  # the consumer left before it was added
                continue
            try:
                self.engine.add_request(request_id, prompt, params, arrival_time)
            except ValueError as e:
                self._put(request_id, e)
        while self._aborts:
            self._deliver(self.engine.abort_request(self._aborts.popleft()))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                self._apply_queued()
                while self._weight_updates:
                    params, done = self._weight_updates.popleft()
                    try:
                        await loop.run_in_executor(self._executor, self.engine.update_weights, params)
                        done.set_result(None)
                    except ValueError as e:
                        done.set_exception(e)
                self._stats = self.engine.get_stats()
                if not self.engine.has_unfinished_requests():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                for output in await loop.run_in_executor(self._executor, self.engine.step):
                    self._deliver(output)
        except Exception as e:  # a device or engine failure: fail every request, accept no more
            logger.exception("the engine loop failed")
            self.errored = True
            self.is_ready = False
            for request_id in list(self._queues):
                self._put(request_id, EngineDeadError(f"the engine failed: {e!r}"))
