"""Redis failures in one line: what went wrong and what to do about it."""
from __future__ import annotations

import redis

from cbir.errors import StoreError
from cbir.store.redis.connect import SOCKET_TIMEOUT_SECONDS


def failure_and_advice(exc: redis.RedisError) -> tuple[str, str]:
    """What went wrong in Redis and what to do about it, in Redis's own words where they suffice
    (without a final period)."""
    reason = str(exc).rstrip(".")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return f"Redis is out of memory ({reason})", "raise its maxmemory or free memory"
    if isinstance(exc, redis.TimeoutError):
        return (f"Redis stopped answering ({reason})", "it is stalled or cut off by the network (a URL sets how "
                f"long to wait: ?socket_timeout=SECONDS, {SOCKET_TIMEOUT_SECONDS:g} s by default)")
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (f"Redis refused ({reason})", "this Redis user may not do that; writing needs a user allowed to "
                "write the cbir:* keys (a read-only user can search: docs/RELIABILITY.md)")
    return "Redis failed", reason


def stopped_answering(exc: BaseException) -> bool:
    """Whether ``exc`` is a StoreError for a server gone or silent: another command to it would only
    wait out the client's retries or the socket timeout again."""
    return isinstance(exc, StoreError) and isinstance(exc.__cause__, (redis.ConnectionError, redis.TimeoutError))


def as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

