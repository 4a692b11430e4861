"""Waiting on real processes from a test: poll with a deadline, fail saying what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from agentq.app import QUEUE_NAMES


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def broker_drained(redis_url: str) -> bool:
    """No message waits in a run queue and none is delivered but unacknowledged."""
    db = redis.Redis.from_url(redis_url)
    waiting = sum(db.llen(name) for name in QUEUE_NAMES)
    return waiting == 0 and db.hlen("unacked") == 0
