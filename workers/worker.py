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

from agentq.app import QUEUE_NAMES, make_celery, register_run_task
from agentq.config import Settings
from agentq.registry import Registry
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
        self.app = app or make_celery(settings)
        self.engine = Engine(settings, registry, worker_name())
        register_run_task(self.app, self.engine.run)
        self._draining: threading.Thread | None = None

    def start_engine(self) -> None:
        self.engine.start()
        worker_shutting_down.connect(self._on_shutting_down, weak=False)

    def stop_engine(self) -> None:
        worker_shutting_down.disconnect(self._on_shutting_down)
        self.engine.stop(grace=0.0)

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
            "queues": list(QUEUE_NAMES),
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
