"""A real uvicorn + AsyncLLM on 127.0.0.1 in a background thread, for the server tests."""

import asyncio
import json
import threading
import time

import httpx
import uvicorn

from jpaged.async_llm import AsyncLLM
from jpaged.config import EngineArgs
from jpaged.data_parallel import DataParallelAsyncLLM
from serving.app import DEFAULT_MAX_HEADER_BYTES, build_app, h11_buffer_bytes
from serving.context import ServingContext

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_REQUEST_BYTES = 64 * 1024


class ThreadedServer:
    """AsyncLLM (DataParallelAsyncLLM with data_parallel_size > 1) + the app under uvicorn, all on
    one event loop in a background thread."""

    def __init__(self, engine_args: EngineArgs, app_kwargs: dict | None = None, **context_kwargs):
        """`app_kwargs`: build_app's options besides the key; `context_kwargs`: ServingContext's."""
        self.engine_args = engine_args
        self.app_kwargs = app_kwargs or {}
        self.context_kwargs = {"served_model_name": MODEL_NAME, "max_request_bytes": MAX_REQUEST_BYTES,
                               **context_kwargs}
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(timeout=300) or self.error is not None:
            raise RuntimeError(f"the test server did not start: {self.error!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        engine_cls = DataParallelAsyncLLM if self.engine_args.data_parallel_size > 1 else AsyncLLM
        self.engine = engine_cls.from_engine_args(self.engine_args)
        self.ctx = ServingContext(self.engine, **self.context_kwargs)
        max_header_bytes = self.app_kwargs.get("max_header_bytes", DEFAULT_MAX_HEADER_BYTES)
        config = uvicorn.Config(build_app(self.ctx, api_keys=[API_KEY], **self.app_kwargs), host="127.0.0.1", port=0,
                                log_level="warning", lifespan="off",
                                h11_max_incomplete_event_size=h11_buffer_bytes(max_header_bytes))
        self.server = uvicorn.Server(config)
        serving = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if serving.done():
                serving.result()  # uvicorn's startup error (it exits with SystemExit)
                raise RuntimeError("uvicorn stopped during startup")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.ready.set()
        await serving
        await self.engine.shutdown()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until_idle(server, timeout: float = 20.0):
    """Polls the engine's stats until no request runs or waits and no KV block is in use."""
    deadline = time.time() + timeout
    while True:
        stats = server.engine.get_stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0:
            return stats
        if time.time() > deadline:
            raise AssertionError(f"the engine did not go idle: {stats}")
        time.sleep(0.05)


def health_ok(server) -> bool:
    return httpx.get(server.url + "/health").status_code == 200


def named_sse_events(raw: str) -> list[dict]:
    """The JSON events of an SSE body whose events are named by their type (`event: T` then
    `data: {"type": T, ...}`: the Responses and Messages streams), checking that framing; such a
    stream has no `[DONE]` line."""
    assert raw.endswith("\n\n") and "[DONE]" not in raw
    events = []
    for block in raw[:-2].split("\n\n"):
        name_line, data_line = block.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {event['type']}"
        events.append(event)
    return events
