"""The ``agentq beat``, ``agentq health``, ``agentq stats`` and ``agentq flower`` commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from agentq.app import make_celery
from agentq.cli import EXIT_FAILED, Command
from agentq.config import Settings
from agentq.exceptions import ConfigurationError
from beat.schedule import beat_schedule
from beat.scheduler import SlotScheduler

logger = logging.getLogger("agentq.beat")


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--schedule-file",
        type=Path,
        default=Path(tempfile.gettempdir()) / "agentq-beat-schedule",
        help="where Beat keeps the last run time of each entry",
    )


def _beat(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded:
        raise ConfigurationError("REDIS_URL is not set: Beat publishes to the shared broker")
    from agentq.telemetry import init_sentry

    # The scheduler's own errors reach Sentry; its jobs run, and report, in workers.
    init_sentry(settings)
    app = make_celery(settings)
    app.conf.beat_schedule = beat_schedule(settings)
    app.Beat(
        schedule=str(args.schedule_file),
        scheduler=SlotScheduler,
        loglevel=settings.log_level.upper(),
        quiet=True,
    ).run()
    return 0


beat = Command("run the periodic scheduler (a second one fires nothing twice)", _configure, _beat)


def _configure_health(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--stored",
        action="store_true",
        help="report the state Beat's checks last stored instead of checking now",
    )


def _health(args: argparse.Namespace, settings: Settings) -> int:
    from agentq.health import HealthChecker, HealthRecorder, HealthState, format_table, summary

    if args.stored:
        from agentq.store import make_engine

        engine = make_engine(settings.sync_database_url)
        try:
            state, failing, changed_at = HealthRecorder(engine).state()
        finally:
            engine.dispose()
        if args.json:
            since = changed_at.isoformat() if changed_at else None
            out = {"status": state.value, "failing": failing, "since": since}
            sys.stdout.write(json.dumps(out, indent=2) + "\n")
        else:
            sys.stdout.write(f"overall: {state.value}\n")
            for check, error in failing.items():
                sys.stdout.write(f"{check}: {error}\n")
        return 0 if state is HealthState.HEALTHY else EXIT_FAILED
    checker = HealthChecker(settings)
    try:
        results = checker.run_all()
    finally:
        checker.close()
    if args.json:
        sys.stdout.write(json.dumps(summary(results), indent=2) + "\n")
    else:
        sys.stdout.write(format_table(results))
    return 0 if all(r.healthy for r in results) else EXIT_FAILED


def _configure_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=int, default=15, help="minutes back (default 15)")
    parser.add_argument("--agent", help="only this agent")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    from agentq.rollup import format_table, recent
    from agentq.store import make_engine

    if args.minutes <= 0:
        raise ConfigurationError("--minutes must be positive")
    engine = make_engine(settings.sync_database_url)
    try:
        rollups = recent(engine, args.minutes, args.agent)
    finally:
        engine.dispose()
    if args.json:
        rows = [{**asdict(r), "minute": r.minute.isoformat()} for r in rollups]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif not rollups:
        sys.stdout.write(f"no rollups in the last {args.minutes} minutes\n")
    else:
        sys.stdout.write(format_table(rollups))
    return 0


def _configure_flower(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--address", default="0.0.0.0", help="interface to listen on")  # noqa: S104


def _flower(args: argparse.Namespace, settings: Settings) -> int:
    if settings.embedded:
        raise ConfigurationError("REDIS_URL is not set: Flower watches the shared broker")
    user = settings.flower_user
    password = settings.flower_password
    if (user is None) != (password is None):
        raise ConfigurationError(
            "set both AGENTQ_FLOWER_USER and AGENTQ_FLOWER_PASSWORD, or neither"
        )
    argv = ["flower", f"--port={args.port}", f"--address={args.address}"]
    if user is not None and password is not None:
        # Through Flower's environment, not its command line, so the password does not
        # show in the process list.
        os.environ["FLOWER_BASIC_AUTH"] = f"{user}:{password.get_secret_value()}"
    else:
        os.environ.pop("FLOWER_BASIC_AUTH", None)
        logger.warning(
            "Flower runs without authentication: set AGENTQ_FLOWER_USER and AGENTQ_FLOWER_PASSWORD",
            extra={"action": "flower_unauthenticated"},
        )
    make_celery(settings).start(argv)
    return 0


health = Command(
    "check the deployment's health now (exit 0 when healthy)", _configure_health, _health
)
stats = Command("show per-agent metric rollups", _configure_stats, _stats)
flower = Command(
    "run Flower on the broker (basic auth from the environment)", _configure_flower, _flower
)
