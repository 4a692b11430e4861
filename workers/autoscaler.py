"""Autoscaling a worker's run slots on queue depth.

Celery's own autoscaler counts only the requests a worker already reserved; with prefetch
bounded by the slots that never exceeds the slots, so it would never grow. This one adds the
depth of the agentq queues in Redis (``LLEN`` of ``agentq.high|normal|low``): the desired size
is the runs in flight plus the runs waiting, between the configured minimum and maximum.

It grows at once and shrinks only after ``keepalive`` seconds without a new run, and resizing
changes only the pool's limit and the consumer's prefetch, never a run in flight. Named by
``worker_autoscaler`` so ``celery inspect stats``, Flower's autoscale control and the
``autoscale`` remote command work as with Celery's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker import state
from celery.worker.autoscale import Autoscaler

from agentq.app import QUEUE_NAMES

logger = logging.getLogger("agentq.autoscaler")

#: Seconds a measured queue depth is reused; the scaler runs on every received message.
DEPTH_TTL = 0.5


class QueueDepthAutoscaler(Autoscaler):  # type: ignore[misc]
    """Sizes the pool to runs in flight plus runs queued in Redis."""

    #: Set by the worker process before Celery builds the autoscaler.
    redis_url: str | None = None
    #: Seconds without a new run before shrinking (Celery's ``keepalive``).
    idle_seconds: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keepalive = self.idle_seconds
        self._redis: Any = None
        self._depth = 0
        self._depth_at = 0.0
        self.decisions = 0

    def queue_depth(self) -> int:
        now = time.monotonic()
        if now - self._depth_at < DEPTH_TTL:
            return self._depth
        self._depth_at = now
        if self.redis_url is None:
            return 0
        try:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=2)
            pipe = self._redis.pipeline(transaction=False)
            for name in QUEUE_NAMES:
                pipe.llen(name)
            self._depth = sum(int(n) for n in pipe.execute())
        except Exception:
            logger.warning(
                "cannot read queue depth", exc_info=True, extra={"action": "queue_depth_failed"}
            )
        return self._depth

    @property
    def qty(self) -> int:
        return len(state.reserved_requests) + self.queue_depth()

    def _grow(self, n: int) -> None:
        self._resize(n)

    def _shrink(self, n: int) -> None:
        # Never below the runs in flight: those keep their slots until they finish.
        n = min(n, self.pool.num_processes - max(1, len(state.reserved_requests)))
        if n > 0:
            self._resize(-n)

    def _resize(self, n: int) -> None:
        before = self.pool.num_processes
        if n > 0:
            self.pool.grow(n)
        else:
            self.pool.shrink(-n)
        after = self.pool.num_processes
        if after == before:
            return
        # The consumer's prefetch follows the slots, so the worker holds no more messages than
        # it can start; the rest wait in Redis where priorities apply.
        self.worker.consumer._update_prefetch_count(after - before)
        self.decisions += 1
        logger.info(
            "worker scaled",
            extra={
                "action": "worker_scaled",
                "direction": "up" if after > before else "down",
                "slots_before": before,
                "slots": after,
                "queue_depth": self._depth,
                "in_flight": len(state.reserved_requests),
                "min": self.min_concurrency,
                "max": self.max_concurrency,
            },
        )

    def update(self, max: int | None = None, min: int | None = None) -> tuple[int, int]:
        """The ``autoscale`` remote command: new bounds, applied at once."""
        with self.mutex:
            if max is not None:
                self.max_concurrency = max
                if self.pool.num_processes > max:
                    self._resize(max - self.pool.num_processes)
            if min is not None:
                self.min_concurrency = min
                if self.pool.num_processes < min:
                    self._resize(min - self.pool.num_processes)
            logger.info(
                "autoscale bounds changed",
                extra={
                    "action": "autoscale_bounds",
                    "min": self.min_concurrency,
                    "max": self.max_concurrency,
                },
            )
            return self.max_concurrency, self.min_concurrency

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().info()
        info.update({"queue_depth": self._depth, "decisions": self.decisions})
        return info
