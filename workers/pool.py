"""The worker's Celery pool: run slots that grow and shrink, with a share kept for high priority.

A run's slot is a greenlet on Celery's consumer thread: it runs Celery's trace of the run task
(acceptance, the task, the acknowledgement) and parks while the engine executes the run, so a
worker with hundreds of runs in flight has no thread per run to wake and switch to. Every model
call of every run shares the engine's event loop. Beat's jobs, which block on I/O of their own,
run on threads. The pool's size is its number of slots, and the consumer's
prefetch count follows it (acks late, multiplier 1), so the worker never holds more messages
than it has slots: a message it has not taken stays in Redis, where a high-priority one is
taken first as soon as a slot frees.

The high-priority reserve: once the runs of other priorities fill ``size - reserve`` slots,
the consumer stops taking messages from their queues and keeps taking high-priority ones,
so a high run starts at once even behind a backlog. Consumption resumes with a little
hysteresis, so a saturated worker does not toggle its queues on every finished run. On Redis
the gate only narrows the keys of the consumer's next BRPOP, and reopening interrupts the
BRPOP in flight, so closing and reopening costs no queue declarations and no polling; other
brokers cancel and resume the consumers of the general queues.

Growing only raises the limit; shrinking only lowers it: runs in flight always finish on the
slot they hold, so scaling never drops, interrupts or repeats a run.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult, TaskPool
from greenlet import getcurrent, greenlet
from kombu.transport.redis import Channel as RedisChannel

from agentq.app import QUEUE_NAMES, RUN_TASK, queue_name
from agentq.run import Priority

logger = logging.getLogger("agentq.pool")

T = TypeVar("T")

HIGH_QUEUE = queue_name(Priority.HIGH)
GENERAL_QUEUES = tuple(name for name in QUEUE_NAMES if name != HIGH_QUEUE)

#: Upper bound on slot threads per process; the autoscaler's maximum is capped to it.
MAX_SLOTS = 10_000


def reserved_slots(size: int, share: float) -> int:
    """Slots kept for high-priority runs out of ``size``: at least one when a share is set."""
    if share <= 0 or size <= 1:
        return 0
    return min(size - 1, max(1, math.ceil(size * share)))


#: Seconds one BRPOP blocks while only the high queue is consumed, when the BRPOP in flight
#: cannot be interrupted (its connection is not found among Redis's clients, as behind a
#: proxy): taking the other queues again waits for it to return, and with Redis's usual
#: second a freed slot would sit idle that long each time.
GATED_POLL_TIMEOUT = 0.02


def wake_loop(hub: Any) -> None:
    """Make the consumer's loop go round once more before it next waits.

    Celery acknowledges a finished task through ``hub.call_soon``. Called from the loop's own
    thread, as a run slot finishing there does, that neither runs at once nor interrupts the
    poll that follows; with every slot's message delivered and no BRPOP in flight, nothing
    else ends that poll, so the acknowledgement, and with it the next message, would wait out
    the poll's one-second timeout. Writing to the loop's waker ends the poll at once.
    """
    waker = getattr(hub, "_waker", None)
    if waker is not None:
        waker.wake()


def _task_of(args: tuple[Any, ...] | None) -> str | None:
    # The request's arguments for trace_task_ret: (type, id, request dict, body, ...).
    return args[0] if args and isinstance(args[0], str) else None


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
        self._gate: QueueGate | None = None
        #: Run slots parked until their run's future resolves, and the thread they live on.
        self._parked: dict[RunSlot, concurrent.futures.Future[Any]] = {}
        self._slots_thread: int | None = None

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
        # The consumer's loop has stopped: finish the parked slots here, so each run's
        # message is acknowledged, or handed back, before the worker exits.
        self._finish_parked()
        super().on_stop()

    def _finish_parked(self) -> None:
        if not self._parked:
            return
        if threading.get_ident() != self._slots_thread:
            logger.warning(
                "run slots left parked: the pool was stopped from another thread",
                extra={"action": "slots_abandoned", "slots": len(self._parked)},
            )
            return
        for slot, future in list(self._parked.items()):
            # Resolved by the drain: finished, handed back, or given back by a stalled one.
            concurrent.futures.wait([future], timeout=60)
            self._resume(slot)

    def register_with_event_loop(self, loop: Any) -> None:
        self.hub = loop

    def bind(self, consumer: Any) -> None:
        """Called whenever the consumer (re)starts: the reserve gates its queues.

        A restarted consumer (after a lost connection) consumes every queue again.
        """
        self.consumer = consumer
        self.gated = False
        self._gate = None

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

        if _task_of(args) == RUN_TASK and self.hub is not None:
            applied = self._start_slot(target, args, kwargs, finished, accept_callback)
        else:
            applied = super().on_apply(target, args, kwargs, finished, accept_callback, **options)
        self.regate()
        return applied

    # Run slots.

    def _start_slot(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        callback: Callable[..., Any],
        accept_callback: Callable[..., Any] | None,
    ) -> ApplyResult:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def trace() -> None:
            try:
                apply_target(target, args, kwargs, callback, accept_callback)
            except BaseException:  # a greenlet's exception would surface in the consumer
                logger.exception("run slot failed", extra={"action": "slot_failed"})
            finally:
                done.set_result(None)

        self._slots_thread = threading.get_ident()
        RunSlot(self, trace).switch()
        return ApplyResult(done)

    def park(self, slot: RunSlot, future: concurrent.futures.Future[Any]) -> None:
        """Return to the consumer until ``future`` resolves; called from within ``slot``."""
        self._parked[slot] = future
        hub = self.hub
        future.add_done_callback(lambda _: hub.call_soon(self._resume, slot))
        assert slot.parent is not None
        slot.parent.switch()

    def _resume(self, slot: RunSlot) -> None:
        if self._parked.pop(slot, None) is not None and not slot.dead:
            slot.switch()

    def _finished(self, general: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if general:
                self.general_in_flight -= 1
        # Reopen the queues if they were gated.
        hub = self.hub
        if hub is not None:
            hub.call_soon(self.regate)
            if threading.get_ident() == self._slots_thread:
                wake_loop(hub)

    def regate(self) -> None:
        """Stop or resume taking non-high runs so the reserve stays free (consumer thread)."""
        consumer = self.consumer
        reserve = self.reserved
        if consumer is None or consumer.task_consumer is None:
            return
        general_slots = self.limit - reserve
        if not self.gated and reserve and self.general_in_flight >= general_slots:
            self.gated = True
            self._gate_for(consumer).close()
        elif self.gated and (
            not reserve or self.general_in_flight <= general_slots - max(1, reserve // 2)
        ):
            self.gated = False
            self._gate_for(consumer).open()

    def _gate_for(self, consumer: Any) -> QueueGate:
        """The gate of the consumer's current channel (a reconnection brings a new one)."""
        task_consumer = consumer.task_consumer
        gate = self._gate
        if gate is None or not gate.serves(task_consumer):
            channel = getattr(task_consumer, "channel", None)
            if isinstance(channel, RedisChannel):
                gate = RedisQueueGate(task_consumer, channel, lambda: self.gated)
            else:
                gate = ConsumerQueueGate(consumer, task_consumer)
            self._gate = gate
        return gate

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update(
            {
                "max-concurrency": self.limit,
                "in-flight": self.in_flight,
                "parked-runs": len(self._parked),
                "high-priority-reserve": self.reserved,
                "gated": self.gated,
            }
        )
        return info


class RunSlot(greenlet):  # type: ignore[misc]
    """One run task's Celery trace on the consumer thread (see the module's docstring)."""

    def __init__(self, pool: AgentPool, trace: Callable[[], None]) -> None:
        super().__init__(trace)
        self.pool = pool


def result_of(future: concurrent.futures.Future[T], timeout: float | None = None) -> T:
    """The future's result: a run slot parks until then, any other caller blocks.

    ``timeout`` bounds a blocking wait only: a parked slot is resumed by the future itself,
    or by the pool as it stops.
    """
    current = getcurrent()
    if isinstance(current, RunSlot) and not future.done():
        current.pool.park(current, future)
        if not future.done():
            raise concurrent.futures.CancelledError()
    return future.result(timeout)


class QueueGate:
    """Closes and opens the general queues of one task consumer for the high reserve."""

    def __init__(self, task_consumer: Any) -> None:
        self.task_consumer = task_consumer

    def serves(self, task_consumer: Any) -> bool:
        return task_consumer is self.task_consumer

    def close(self) -> None:
        raise NotImplementedError

    def open(self) -> None:
        raise NotImplementedError


class ConsumerQueueGate(QueueGate):
    """Any broker: cancel the general queues' consumers, and add them back to reopen."""

    def __init__(self, consumer: Any, task_consumer: Any) -> None:
        super().__init__(task_consumer)
        self.queues = consumer.app.amqp.queues

    def close(self) -> None:
        for name in GENERAL_QUEUES:
            self.task_consumer.cancel_by_queue(name)

    def open(self) -> None:
        for name in GENERAL_QUEUES:
            if not self.task_consumer.consuming_from(name):
                self.task_consumer.add_queue(self.queues[name])
        self.task_consumer.consume()


class RedisQueueGate(QueueGate):
    """Redis: the channel's BRPOP leaves out the general queues while closed.

    The channel keeps its consumers; only the queue cycle it takes BRPOP's keys from is
    filtered. Closing is free: it happens as a run is applied, before the consumer sends its
    next BRPOP. Opening has a BRPOP naming only the high queue in flight; ``CLIENT UNBLOCK``
    ends it as if it had timed out, and the consumer's next BRPOP names every queue.
    """

    def __init__(self, task_consumer: Any, channel: Any, closed: Callable[[], bool]) -> None:
        super().__init__(task_consumer)
        self.channel = channel
        cycle = channel._queue_cycle
        if not isinstance(cycle, _GatedCycle):
            cycle = channel._queue_cycle = _GatedCycle(cycle)
        cycle.closed = closed
        self._admin: Any = None
        #: The BRPOP connection's socket and its Redis client id, once looked up.
        self._blocked: tuple[Any, int | None] | None = None
        self._default_timeout = channel.brpop_timeout

    def close(self) -> None:
        if self._client_id() is None:
            # Nothing can interrupt the gated BRPOP: keep it short instead.
            self.channel.brpop_timeout = GATED_POLL_TIMEOUT

    def open(self) -> None:
        self.channel.brpop_timeout = self._default_timeout
        if not self.channel._in_poll:
            return
        client_id = self._client_id()
        if client_id is None:
            return
        try:
            self._admin_client().execute_command("CLIENT", "UNBLOCK", client_id)
        except Exception:  # the gated BRPOP then simply runs to its timeout
            logger.warning(
                "cannot interrupt the gated BRPOP",
                exc_info=True,
                extra={"action": "gate_unblock_failed"},
            )

    def _admin_client(self) -> Any:
        if self._admin is None:
            self._admin = self.channel._create_client(asynchronous=False)
        return self._admin

    def _client_id(self) -> int | None:
        """Redis's id of the connection the channel sends BRPOP on, matched by its address."""
        connection = getattr(self.channel.client, "connection", None)
        sock = getattr(connection, "_sock", None)
        if sock is None:
            return None
        if self._blocked is not None and self._blocked[0] is sock:
            return self._blocked[1]
        found: int | None = None
        try:
            host, port = sock.getsockname()[:2]
            for entry in self._admin_client().client_list():
                address, _, their_port = str(entry.get("addr", "")).rpartition(":")
                if their_port == str(port) and address.strip("[]") == host:
                    found = int(entry["id"])
                    break
        except Exception:  # unknown: the gate falls back to a short BRPOP
            logger.warning(
                "cannot find the BRPOP connection among Redis's clients",
                exc_info=True,
                extra={"action": "gate_lookup_failed"},
            )
        self._blocked = (sock, found)
        return found


class _GatedCycle:
    """A Redis channel's queue cycle that leaves out the general queues while closed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.closed: Callable[[], bool] = lambda: False

    def update(self, queues: Any) -> None:
        self.inner.update(queues)

    def consume(self, n: int) -> list[str]:
        queues: list[str] = self.inner.consume(n)
        if self.closed():
            return [name for name in queues if name not in GENERAL_QUEUES]
        return queues

    def rotate(self, last_used: str) -> None:
        self.inner.rotate(last_used)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
