"""Server-sent events and the asyncio plumbing between HTTP requests and engine streams."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from jpaged.outputs import RequestOutput
from serving.errors import APIError

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
SSE_KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see the connection in use
# nginx's status for a request whose client went away; nobody reads it, the logs do.
CLIENT_CLOSED_REQUEST = 499


def sse_event(payload: BaseModel) -> str:
    """One SSE event `data: {json}\\n\\n`; fields that are None are left out, as vLLM does."""
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


def sse_error(error: APIError) -> str:
    """An error after the stream started (status 200 already sent), in OpenAI's error shape."""
    return f"data: {json.dumps(error.to_dict())}\n\n"


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """`first`, then the items of `rest`."""
    yield first
    async for item in rest:
        yield item


async def merge_async_iterators(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yields (i, item) from all iterators as items arrive; the first exception is re-raised.

    Closing the merged iterator (or an exception) cancels every source, which makes each engine
    stream abort its request.
    """
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def drain(i: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((i, item))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))
            return
        await queue.put((i, finished))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def final_outputs(request: Request, streams: list[AsyncIterator[T]]) -> list[T] | None:
    """Each stream's last item, in the streams' order, once all ended (they run concurrently);
    None when the client disconnected first (every stream is then closed: their requests abort).
    The first exception of a stream is raised. Call it only after the request body was read."""
    merged = merge_async_iterators(streams)

    async def collect() -> list[T]:
        finals = [None] * len(streams)
        async for i, item in merged:
            finals[i] = item
        return finals

    completed, finals = await unless_disconnected(request, collect())
    return finals if completed else None


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
    """Awaits `awaitable` unless the client disconnects first, in which case it is cancelled.

    Returns (True, result) when it completed, (False, None) when the client went away. Call it
    only after the request body has been read: it consumes the ASGI receive channel.
    """
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait([work, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(watcher, work, return_exceptions=True)
    if work.cancelled():
        return False, None
    return True, work.result()


async def start_stream(request: Request, outputs: AsyncIterator[RequestOutput],
                       events: Callable[[RequestOutput], AsyncIterator[str]], keep_alive_interval: float = 0,
                       error_events: Callable[[APIError], list[str]] | None = None) -> Response:
    """A streamed reply: `events(first)` once the request's first output is there.

    It waits for that output before any header, so an invalid request (or one the queue limits
    refuse) gets its 4xx rather than a broken stream; 499 when the client leaves first. With
    `keep_alive_interval` (seconds, --sse-keep-alive-interval) it waits that long at most: the
    stream then starts without the first output, and an SSE comment goes out whenever it is idle
    that long (queued, prefilling, between tokens), so proxies with read timeouts keep the
    connection; an error of the first output then arrives as `error_events(exc)`.
    """
    first = asyncio.ensure_future(anext(outputs))
    completed, _ = await unless_disconnected(request, asyncio.wait([first], timeout=keep_alive_interval or None))
    if not completed:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await outputs.aclose()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if first.done():
        stream = events(first.result())  # its error, e.g. an APIError's 4xx, before any header
    else:
        stream = _after_first(first, outputs, events, error_events)
    if keep_alive_interval:
        stream = _with_keep_alive(stream, keep_alive_interval)
    return StreamingResponse(stream, media_type="text/event-stream")


async def _after_first(first: asyncio.Future, outputs: AsyncIterator[RequestOutput],
                       events: Callable[[RequestOutput], AsyncIterator[str]],
                       error_events: Callable[[APIError], list[str]]) -> AsyncIterator[str]:
    try:
        output = await first
    except APIError as exc:
        for event in error_events(exc):
            yield event
        return
    finally:
        if not first.done() or first.cancelled():  # the client left while the request waited
            await outputs.aclose()
    async for event in events(output):
        yield event


async def _with_keep_alive(stream: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """`stream`'s events, and SSE_KEEP_ALIVE whenever none came for `interval` seconds."""
    pending = asyncio.ensure_future(anext(stream, None))
    try:
        while True:
            done, _ = await asyncio.wait([pending], timeout=interval)
            if not done:
                yield SSE_KEEP_ALIVE
                continue
            event = pending.result()
            if event is None:
                return
            yield event
            pending = asyncio.ensure_future(anext(stream, None))
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()
