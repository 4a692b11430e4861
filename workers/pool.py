"""The worker's Celery pool: run slots that grow and shrink, with a share kept for high priority.

Each slot is a thread that only waits for the engine's answer; every model call of every run
shares the engine's event loop. The pool's size is its number of slots, and the consumer's
prefetch count follows it (acks late, multiplier 1), so the worker never holds more messages
than it has slots: a message it has not taken stays in Redis, where a high-priority one is
taken first as soon as a slot frees.

The high-priority reserve: once the runs of other priorities fill ``size - reserve`` slots,
the consumer stops taking messages from their queues and keeps taking high-priority ones,
so a high run starts at once even behind a backlog. Consumption resumes with a little
hysteresis, so a saturated worker does not toggle its queues on every finished run.

Growing only raises the limit; shrinking only lowers it: runs in flight always finish on the
slot they hold, so scaling never drops, interrupts or repeats a run.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

from celery.concurrency.thread import ApplyResult, TaskPool

from agentq.app import QUEUE_NAMES, queue_name
from agentq.run import Priority

logger = logging.getLogger("agentq.pool")

HIGH_QUEUE = queue_name(Priority.HIGH)
GENERAL_QUEUES = tuple(name for name in QUEUE_NAMES if name != HIGH_QUEUE)

#: Upper bound on slot threads per process; the autoscaler's maximum is capped to it.
MAX_SLOTS = 10_000


def reserved_slots(size: int, share: float) -> int:
    """Slots kept for high-priority runs out of ``size``: at least one when a share is set."""
    if share <= 0 or size <= 1:
        return 0
    return min(size - 1, max(1, math.ceil(size * share)))


#: Seconds one BRPOP blocks while only the high queue is consumed. Taking the other queues
#: again must wait for the BRPOP in flight (which names only the high queue) to return: with
#: Redis's usual second, a freed slot would sit idle that long each time.
GATED_POLL_TIMEOUT = 0.02


def _queue_of(args: tuple[Any, ...] | None) -> str | None:
    # The request's arguments for trace_task_ret: (type, id, request dict, body, ...).
    if not args or len(args) < 3 or not isinstance(args[2], dict):
        return None
    info = args[2].get("delivery_info") or {}
    key = info.get("routing_key")
    return key if isinstance(key, str) else None


class AgentPool(TaskPool):  # type: ignore[misc]
    """Celery's thread pool with run slots that grow and shrink and a high-priority reserve.

    ``limit`` is the number of slots; Flower shows it as the worker's concurrency and its
    pool controls (``pool_grow``/``pool_shrink``, or ``autoscale`` with the autoscaler)
    change it.
    """

    #: Fraction of the slots only high-priority runs may use; set before the pool starts.
    high_priority_reserve: float = 0.0
    #: Called as the pool stops, before it waits for its slots: lets runs in flight finish
    #: within the grace period and hands back the rest, however the worker was told to stop
    #: (a signal, or Flower's and ``celery control``'s remote shutdown).
    drain: Callable[[], None] | None = None
    #: Told of every change of size, as (previous slots, slots): metrics hook in here.
    on_resize: Callable[[int, int], None] | None = None
    limit: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Threads start lazily, one per slot in use, so the executor may allow the maximum.
        self.executor._max_workers = MAX_SLOTS
        self._lock = threading.Lock()
        self.in_flight = 0
        self.general_in_flight = 0
        self.gated = False
        self.consumer: Any = None
        self.hub: Any = None
        self._poll_timeout: float | None = None

    # Sizing (Flower's pool controls and the autoscaler call these on the consumer thread).

    @property
    def num_processes(self) -> int:
        return int(self.limit)

    def grow(self, n: int = 1) -> None:
        self._resize(min(MAX_SLOTS, self.limit + n), "grow")

    def shrink(self, n: int = 1) -> None:
        self._resize(max(1, self.limit - n), "shrink")

    def _resize(self, slots: int, how: str) -> None:
        previous, self.limit = self.limit, slots
        self._log_size(how)
        on_resize = type(self).on_resize
        if on_resize is not None and slots != previous:
            on_resize(previous, slots)
        self.regate()

    def _log_size(self, how: str) -> None:
        logger.info(
            "pool resized",
            extra={
                "action": "pool_resized",
                "how": how,
                "slots": self.limit,
                "in_flight": self.in_flight,
                "reserved": self.reserved,
            },
        )

    @property
    def reserved(self) -> int:
        return reserved_slots(self.limit, self.high_priority_reserve)

    # Running.

    def on_stop(self) -> None:
        drain = type(self).drain
        if drain is not None:
            drain()
        super().on_stop()

    def register_with_event_loop(self, loop: Any) -> None:
        self.hub = loop

    def bind(self, consumer: Any) -> None:
        """Called once the consumer exists: the reserve needs to cancel and add its queues."""
        self.consumer = consumer

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **options: Any,
    ) -> ApplyResult:
        general = _queue_of(args) != HIGH_QUEUE
        with self._lock:
            self.in_flight += 1
            if general:
                self.general_in_flight += 1

        def finished(result: Any) -> None:
            try:
                if callback is not None:
                    callback(result)
            finally:
                self._finished(general)

        applied = super().on_apply(target, args, kwargs, finished, accept_callback, **options)
        self.regate()
        return applied

    def _finished(self, general: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if general:
                self.general_in_flight -= 1
        # The message was acknowledged in this thread; wake the consumer so it takes the next
        # one now rather than at its next timer tick, and reopen the queues if they were gated.
        hub = self.hub
        if hub is not None:
            hub.call_soon(self.regate)

    def regate(self) -> None:
        """Stop or resume taking non-high runs so the reserve stays free (consumer thread)."""
        consumer = self.consumer
        reserve = self.reserved
        if consumer is None or consumer.task_consumer is None:
            return
        general_slots = self.limit - reserve
        if not self.gated and reserve and self.general_in_flight >= general_slots:
            self.gated = True
            for name in GENERAL_QUEUES:
                consumer.task_consumer.cancel_by_queue(name)
            self._set_poll_timeout(GATED_POLL_TIMEOUT)
        elif self.gated and (
            not reserve or self.general_in_flight <= general_slots - max(1, reserve // 2)
        ):
            self.gated = False
            for name in GENERAL_QUEUES:
                if not consumer.task_consumer.consuming_from(name):
                    consumer.task_consumer.add_queue(consumer.app.amqp.queues[name])
            consumer.task_consumer.consume()
            self._set_poll_timeout(None)

    def _set_poll_timeout(self, seconds: float | None) -> None:
        """Shorten (or, with None, restore) the Redis transport's BRPOP timeout, if it has one."""
        channel = getattr(self.consumer.task_consumer, "channel", None)
        if channel is None or not hasattr(channel, "brpop_timeout"):
            return
        if self._poll_timeout is None:
            self._poll_timeout = channel.brpop_timeout
        channel.brpop_timeout = self._poll_timeout if seconds is None else seconds

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update(
            {
                "max-concurrency": self.limit,
                "in-flight": self.in_flight,
                "high-priority-reserve": self.reserved,
                "gated": self.gated,
            }
        )
        return info
