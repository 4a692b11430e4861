"""The periodic schedule Celery Beat publishes; each entry is a task the workers run.

Every job goes to the control queue, which workers consume before any run queue, so a
backlog of runs cannot delay a health check. Health checks and the other periodic jobs
expire after one period: a worker coming back after an outage runs the next one, not a burst
of stale ones. Batches do not expire: a slot missed while workers were down still runs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab, schedule

from agentq.app import CONTROL_QUEUE
from agentq.batch import cron_fields, load_schedules
from agentq.config import Settings
from agentq.health import CHECKS, interval

HEALTH_TASK = "agentq.beat.health_check"
ROLLUP_TASK = "agentq.beat.rollup"
SWEEP_TASK = "agentq.beat.sweep"
RETENTION_TASK = "agentq.beat.retention"
BATCH_TASK = "agentq.beat.batch"


def _every(seconds: float) -> schedule:
    return schedule(run_every=timedelta(seconds=seconds))


def _entry(task: str, seconds: float, args: tuple[Any, ...] = ()) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": _every(seconds),
        "args": args,
        "options": {"queue": CONTROL_QUEUE, "expires": seconds},
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Entries for ``beat_schedule``."""
    entries = {
        f"health.{check}": _entry(HEALTH_TASK, interval(settings, check), (check,))
        for check in CHECKS
    }
    entries["rollup"] = _entry(ROLLUP_TASK, settings.beat.rollup_interval)
    entries["sweep"] = _entry(SWEEP_TASK, settings.beat.sweep_interval)
    entries["retention"] = _entry(RETENTION_TASK, settings.beat.retention_interval)
    for batch in load_schedules(settings):
        when: Any = (
            crontab(**cron_fields(batch.cron)) if batch.cron else _every(batch.every or 60.0)
        )
        entries[f"batch.{batch.name}"] = {
            "task": BATCH_TASK,
            "schedule": when,
            "args": (batch.name,),
            "options": {"queue": CONTROL_QUEUE},
        }
    return entries
