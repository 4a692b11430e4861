"""One worker process: a Celery consumer feeding agent runs to the process's engine.

Celery routes, acknowledges and reports; the engine executes. Celery's thread pool gives
each run in flight a thread that only waits for the engine's answer, so a worker's slots
show in Flower as its pool's concurrency while all model calls share one event loop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down

from agentq.app import CONTROL_QUEUE, QUEUE_NAMES, make_celery, queue_name, register_run_task
from agentq.config import Settings
from agentq.registry import Registry
from agentq.run import PRIORITY_ORDER
from agentq.telemetry import Sampler, build_telemetry, redis_queue_depths
from beat.jobs import register_jobs
from workers.engine import Engine

logger = logging.getLogger("agentq.worker")

#: Seconds runs in flight may take to finish after SIGTERM before they are handed back.
DEFAULT_SHUTDOWN_GRACE = 60.0


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
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    ) -> None:
        registry.load(settings.agent_modules)
        self.settings = settings
        self.shutdown_grace = shutdown_grace
        # Before the Celery app, so Sentry's Celery integration sees every task.
        self.telemetry = build_telemetry(settings)
        self.app = app or make_celery(settings)
        self.engine = Engine(settings, registry, worker_name(), telemetry=self.telemetry)
        register_run_task(self.app, self.engine.run)
        # Beat only publishes: its health checks, rollups, sweeps and batches run here.
        self.jobs = register_jobs(self.app, settings, worker_name())
        self._draining: threading.Thread | None = None
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
        if self._draining is None:
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

    def worker_options(self, **overrides: Any) -> dict[str, Any]:
        options: dict[str, Any] = {
            "pool_cls": "threads",
            "concurrency": self.settings.slots,
            # Consumed in this order: Beat's jobs first, then runs by priority.
            "queues": [CONTROL_QUEUE, *QUEUE_NAMES],
            "hostname": f"agentq@{socket.gethostname()}.{os.getpid()}",
            "loglevel": self.settings.log_level.upper(),
            "optimization": "fair",
        }
        options.update(overrides)
        return options

    def run(self, **overrides: Any) -> int:
        """Serve until stopped (SIGTERM, SIGINT or a remote shutdown); returns the exit code."""
        self.start_engine()
        try:
            worker = self.app.Worker(**self.worker_options(**overrides))
            worker.start()
            return int(worker.exitcode or 0)
        finally:
            self.stop_engine()
