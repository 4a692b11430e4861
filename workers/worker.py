"""One worker process: a Celery consumer feeding agent runs to the process's engine.

Celery routes, acknowledges and reports; the engine executes. Celery's thread pool gives
each run in flight a thread that only waits for the engine's answer, so a worker's slots
show in Flower as its pool's concurrency while all model calls share one event loop.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_shutting_down

from agentq.app import CONTROL_QUEUE, QUEUE_NAMES, make_celery, queue_name, register_run_task
from agentq.config import Settings
from agentq.registry import Registry
from agentq.run import PRIORITY_ORDER
from agentq.telemetry import Sampler, build_telemetry, redis_queue_depths
from beat.jobs import register_jobs
from workers.autoscaler import QueueDepthAutoscaler
from workers.engine import Engine
from workers.pool import AgentPool, result_of

logger = logging.getLogger("agentq.worker")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerProcess:
    """The Celery app, the engine and their wiring, built once for this process."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        app: Celery | None = None,
        shutdown_grace: float | None = None,
    ) -> None:
        registry.load(settings.agent_modules)
        self.settings = settings
        self.shutdown_grace = settings.shutdown_grace if shutdown_grace is None else shutdown_grace
        # Before the Celery app, so Sentry's Celery integration sees every task.
        self.telemetry = build_telemetry(settings)
        self.app = app or make_celery(settings)
        self.engine = Engine(
            settings, registry, worker_name(), telemetry=self.telemetry, result_of=result_of
        )
        register_run_task(self.app, self.engine.run, self.engine.dead_letter)
        # Beat only publishes: its health checks, rollups, sweeps and batches run here.
        self.jobs = register_jobs(self.app, settings, worker_name())
        self.pool_cls = type(
            "AgentPool",
            (AgentPool,),
            {
                "high_priority_reserve": settings.high_priority_reserve,
                "drain": staticmethod(self._drain),
                "on_resize": staticmethod(self.telemetry.pool_resized),
            },
        )
        self.autoscaler_cls = type(
            "QueueDepthAutoscaler",
            (QueueDepthAutoscaler,),
            {
                "redis_url": None if settings.embedded else settings.broker_url,
                "idle_seconds": settings.autoscale_idle,
            },
        )
        self.app.steps["consumer"].add(_slots_step(settings.autoscale_interval))
        self._draining: threading.Thread | None = None
        # Re-entrant: Celery calls the shutdown hook from its signal handler, which a second
        # SIGTERM can enter again while the first call still holds the lock.
        self._draining_lock = threading.RLock()
        self._sampler: Sampler | None = None

    def start_engine(self) -> None:
        self.engine.start()
        worker_shutting_down.connect(self._on_shutting_down, weak=False)
        settings = self.settings
        if settings.enable_metrics and settings.statsd_host and not settings.embedded:
            queues = [(p.value, queue_name(p)) for p in PRIORITY_ORDER]
            self._sampler = Sampler(
                self.telemetry,
                redis_queue_depths(self.settings.broker_url, queues),
                lambda: len(self.engine.in_flight),
                self.settings.metrics_interval,
            )
            self._sampler.start()

    def stop_engine(self) -> None:
        worker_shutting_down.disconnect(self._on_shutting_down)
        if self._sampler is not None:
            self._sampler.stop()
        self.engine.stop(grace=0.0)
        self.telemetry.close()
        self.jobs.close()

    def _on_shutting_down(self, **_: Any) -> None:
        # Celery stops consuming and waits for its pool; the engine lets runs in flight
        # finish within the grace period and hands the rest back, which frees the pool.
        with self._draining_lock:
            if self._draining is not None:
                return
            logger.info(
                "worker shutting down",
                extra={
                    "action": "worker_draining",
                    "in_flight": len(self.engine.in_flight),
                    "grace_s": self.shutdown_grace,
                },
            )
            self._draining = threading.Thread(
                target=self.engine.stop, args=(self.shutdown_grace,), daemon=True
            )
            self._draining.start()

    def _drain(self) -> None:
        self._on_shutting_down()
        if self._draining is not None:
            self._draining.join()

    def worker_options(self, **overrides: Any) -> dict[str, Any]:
        low, high = self.settings.min_slots, self.settings.slots
        options: dict[str, Any] = {
            "pool_cls": self.pool_cls,
            "concurrency": high,
            # Consumed in this order: Beat's jobs first, then runs by priority.
            "queues": [CONTROL_QUEUE, *QUEUE_NAMES],
            "hostname": f"agentq@{socket.gethostname()}.{os.getpid()}",
            "loglevel": self.settings.log_level.upper(),
            "optimization": "fair",
        }
        if low < high:
            options.update(autoscale=(high, low), autoscaler_cls=self.autoscaler_cls)
        options.update(overrides)
        return options

    def run(self, **overrides: Any) -> int:
        """Serve until stopped (SIGTERM, SIGINT or a remote shutdown); returns the exit code."""
        self.start_engine()
        tune_gc(self.settings.gc_threshold)
        try:
            worker = self.app.Worker(**self.worker_options(**overrides))
            worker.start()
            return int(worker.exitcode or 0)
        finally:
            self.stop_engine()


def tune_gc(threshold: tuple[int, int, int]) -> None:
    """Freeze what start-up loaded and collect less often (see ``AGENTQ_GC_THRESHOLD``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*threshold)


def _slots_step(autoscale_interval: float) -> type[bootsteps.StartStopStep]:
    class Slots(bootsteps.StartStopStep):  # type: ignore[misc]
        """Ties the pool to the consumer: prefetch equals slots, reserve gating, autoscaling."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, consumer: Any, **kwargs: Any) -> None:
            super().__init__(consumer, **kwargs)
            self._timer: Any = None

        def start(self, consumer: Any) -> None:
            pool = consumer.pool
            if not isinstance(pool, AgentPool):
                return
            pool.bind(consumer)
            # With autoscaling Celery prefetches for the maximum; a worker holding messages
            # it has no slot for keeps them from workers that do, and from priority order.
            slots = pool.num_processes
            consumer.initial_prefetch_count = slots * consumer.prefetch_multiplier
            if consumer.qos is not None and consumer.qos.value != slots:
                consumer.qos.value = slots * consumer.prefetch_multiplier
                consumer.qos.update()
            scaler = consumer.controller.autoscaler
            if scaler is not None and self._timer is None:
                # Celery checks only every keepalive seconds and on received messages, but a
                # full worker receives none: check the queues' depth on a timer of its own.
                self._timer = consumer.timer.call_repeatedly(autoscale_interval, scaler.maybe_scale)
            pool.regate()

        def stop(self, consumer: Any) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    return Slots
