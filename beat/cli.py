"""The ``agentq beat`` command: the one scheduler of a deployment."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from agentq.app import make_celery
from agentq.cli import Command
from agentq.config import Settings
from agentq.exceptions import ConfigurationError
from beat.schedule import beat_schedule


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
    app = make_celery(settings)
    app.conf.beat_schedule = beat_schedule(settings)
    app.Beat(
        schedule=str(args.schedule_file), loglevel=settings.log_level.upper(), quiet=True
    ).run()
    return 0


beat = Command("run the periodic scheduler (one per deployment)", _configure, _beat)
