"""Queue limits at an engine's front: vLLM's --max-num-queued-reqs and --max-num-queued-tokens.

Without them a server takes every request it is sent and queues it; under a burst the queue (and
every queued request's wait) grows without bound. With them a request over a limit is refused at
once, and the server answers 503 so that a load balancer or the client's SDK retries it later or
on another instance.

- max_num_queued_reqs: the most unfinished requests (waiting or running), a request of n > 1
  sequences counting n.
- max_num_queued_tokens: the most prompt tokens of requests still in prefill (no token sampled
  yet), each sequence of a request counting its prompt; a request is refused while the backlog is
  at or over the limit. A TTFT valve: the limit / the prefill speed bounds the queue's wait. A
  request counts its whole prompt until its first token (vLLM's rule: conservative under chunked
  prefill and prefix-cache hits).

One `Admission` counts for one front: an AsyncLLM, or all the replicas of a data-parallel front
together. Its counters are touched from event loops and engine threads, under its lock.
"""

import threading

QUEUE_LIMIT_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")

_MESSAGES = {
    "max_num_queued_reqs": "The engine is currently busy and cannot accept new requests. "
                           "Please try again later or on a different instance.",
    "max_num_queued_tokens": "The engine has reached its prefill token backlog limit. "
                             "Please try again later or on a different instance.",
}


class QueueFullError(RuntimeError):
    """A request refused by a queue limit (servers answer 503). reason: the limit's name, one of
    QUEUE_LIMIT_REASONS."""

    def __init__(self, reason: str):
        super().__init__(_MESSAGES[reason])
        self.reason = reason


class Admission:
    """The unfinished requests and prefill backlog of one front, checked against its limits
    (None: no limit)."""

    def __init__(self, max_num_queued_reqs: int | None = None, max_num_queued_tokens: int | None = None):
        self.max_num_queued_reqs = max_num_queued_reqs
        self.max_num_queued_tokens = max_num_queued_tokens
        self._lock = threading.Lock()
        self._num_seqs: dict[str, int] = {}  # request id -> its sequences (n), while unfinished
        self._prefill_tokens: dict[str, int] = {}  # request id -> n x prompt tokens, until its first token
        self.num_unfinished_seqs = 0
        self.num_queued_tokens = 0

    @property
    def counts_prefill(self) -> bool:
        """Whether the prefill backlog is limited (engines then report each request's first token)."""
        return self.max_num_queued_tokens is not None

    def admit(self, request_id: str, num_seqs: int, num_prompt_tokens: int) -> None:
        """Counts a new request, or raises QueueFullError (counting nothing) when it is over a limit."""
        with self._lock:
            if (self.max_num_queued_reqs is not None
                    and self.num_unfinished_seqs + num_seqs > self.max_num_queued_reqs):
                raise QueueFullError("max_num_queued_reqs")
            if self.counts_prefill and self.num_queued_tokens >= self.max_num_queued_tokens:
                raise QueueFullError("max_num_queued_tokens")
            self._num_seqs[request_id] = num_seqs
            self.num_unfinished_seqs += num_seqs
            if self.counts_prefill:
                self._prefill_tokens[request_id] = num_seqs * num_prompt_tokens
                self.num_queued_tokens += num_seqs * num_prompt_tokens

    def prefill_done(self, request_id: str) -> None:
        """The request sampled its first token: its prompt leaves the backlog (no-op if gone)."""
        with self._lock:
            self.num_queued_tokens -= self._prefill_tokens.pop(request_id, 0)

    def release(self, request_id: str) -> None:
        """The request finished, failed or was abandoned: it stops counting (no-op if unknown)."""
        with self._lock:
            self.num_unfinished_seqs -= self._num_seqs.pop(request_id, 0)
            self.num_queued_tokens -= self._prefill_tokens.pop(request_id, 0)
