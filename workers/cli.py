"""The ``agentq worker`` and ``agentq demo`` commands."""

from __future__ import annotations

import argparse

from agentq.cli import Command
from agentq.config import Settings


def _configure_worker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="runs in flight at once per process, the autoscaling maximum (default "
        "AGENTQ_WORKER_CONCURRENCY or AGENTQ_MAX_CONCURRENT_RUNS)",
    )
    parser.add_argument(
        "--min-concurrency",
        type=int,
        default=None,
        help="autoscale run slots per process between this and --concurrency on queue depth "
        "(default AGENTQ_WORKER_MIN_CONCURRENCY; unset means a fixed size)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes to start, one per core uses the host (default "
        "AGENTQ_WORKER_PROCESSES or 1)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=None,
        help="seconds runs in flight may take to finish after SIGTERM (default "
        "AGENTQ_SHUTDOWN_GRACE or 60)",
    )


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from agentq.exceptions import ConfigurationError
    from agentq.registry import registry

    if settings.embedded:
        raise ConfigurationError(
            "REDIS_URL is not set: a standalone worker needs a broker shared with producers "
            "(`agentq demo` runs producer and worker in one process without one)"
        )
    if args.concurrency is not None:
        if args.concurrency <= 0:
            raise ConfigurationError("--concurrency must be a positive number of runs")
        settings = settings.model_copy(update={"worker_concurrency": args.concurrency})
    for name in ("min_concurrency", "processes"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be a positive number")
    if args.min_concurrency is not None:
        settings = settings.model_copy(update={"worker_min_concurrency": args.min_concurrency})
    if args.shutdown_grace is not None:
        settings = settings.model_copy(update={"shutdown_grace": args.shutdown_grace})
    processes = settings.worker_processes if args.processes is None else args.processes
    if processes > 1:
        from workers.supervisor import Supervisor, preload

        preload(lambda: registry.load(settings.agent_modules))
        from workers.worker import WorkerProcess

        return Supervisor(processes, lambda: WorkerProcess(settings, registry).run()).run()
    from workers.worker import WorkerProcess

    return WorkerProcess(settings, registry).run()


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=36, help="runs to push through (default 36)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=None,
        help="offline model latency per call (default 150, or AGENTQ_OFFLINE_LATENCY_MS)",
    )


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from workers.demo import run_demo

    return run_demo(settings, runs=args.runs, latency_ms=args.latency_ms)


worker = Command("run a worker process that executes agent runs", _configure_worker, _worker)
demo = Command(
    "push example runs through an in-process worker and print a summary", _configure_demo, _demo
)
