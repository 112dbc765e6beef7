"""The /v1/responses replies a server keeps (--enable-responses-store), newest last.

A stored reply is its response object and the conversation it answered (the chat messages of
its history and input, without its `instructions`, which do not carry over), so a later request
naming it as `previous_response_id` continues that conversation. Only the last `capacity`
replies are kept; an older id is gone (404), so memory stays bounded however long the server runs.
Background responses (`background: true`) are stored when queued and replaced as they run.
"""

import asyncio
import dataclasses
from collections import OrderedDict
from typing import Any

DEFAULT_CAPACITY = 4096


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as the client got it
    messages: list[dict[str, Any]]  # the chat messages it answered, without its instructions


class ResponseStore:
    """At most `capacity` StoredResponses by response id; putting one more drops the oldest."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self.running: dict[str, asyncio.Task] = {}  # background responses still running, by id

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        self._responses[response["id"]] = StoredResponse(response, messages)
        self._responses.move_to_end(response["id"])
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._responses.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None
