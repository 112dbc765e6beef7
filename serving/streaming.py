"""Server-sent events and the asyncio plumbing between HTTP requests and engine streams."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from serving.errors import APIError

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
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
