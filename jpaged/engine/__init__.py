"""Host side of the engine: requests, the KV block manager and the scheduler (pure Python, no JAX)."""

from jpaged.engine.block_manager import KVCacheManager
from jpaged.engine.request import Request, RequestStatus
from jpaged.engine.scheduler import Scheduler, SchedulerStats
from jpaged.engine.scheduler_output import ScheduledRequest, SchedulerOutput

__all__ = [
    "KVCacheManager",
    "Request",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SchedulerStats",
]
