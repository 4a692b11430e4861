"""Scheduled batches: runs Beat creates on a schedule, tracked together as one batch.

Schedules come from ``AGENTQ_BATCHES`` (a JSON list) or ``AGENTQ_BATCH_FILE`` (JSON or YAML)::

    [{"name": "nightly-digest", "cron": "0 3 * * *", "agent": "support",
      "inputs": ["Summarise yesterday's tickets"], "priority": "low"}]

``cron`` takes the five crontab fields (minute hour day-of-month month day-of-week, UTC);
``every`` (seconds) is the alternative for short periods. A batch is one row per schedule and
scheduled slot (unique), so a slot fires once however many schedulers or workers try.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator
from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
)

from agentq.config import Settings
from agentq.exceptions import ConfigurationError
from agentq.run import Priority
from agentq.store import metadata

batches = Table(
    "batches",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("schedule", String(100), nullable=False),
    Column("slot", DateTime(timezone=True), nullable=False),
    Column("agent", String(100), nullable=False),
    Column("priority", String(10), nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("schedule", "slot", name="uq_batches_schedule_slot"),
    Index("ix_batches_created_at", "created_at"),
)


class BatchSchedule(BaseModel):
    """One scheduled batch: which agent gets which inputs, and when."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    agent: str = Field(min_length=1, max_length=100)
    inputs: list[str] = Field(min_length=1)
    """One run per input, all in the same batch."""
    priority: Priority = Priority.LOW
    context: dict[str, Any] | None = None
    cron: str | None = None
    """Five crontab fields, evaluated in UTC."""
    every: float | None = Field(None, gt=0)
    """Seconds between batches, for periods shorter than a minute."""

    @model_validator(mode="after")
    def _one_schedule(self) -> BatchSchedule:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of cron or every")
        if self.cron is not None:
            cron_fields(self.cron)
        return self


def cron_fields(expression: str) -> dict[str, str]:
    """The crontab fields of a five-field expression, checked by Celery's parser."""
    from celery.schedules import crontab

    parts = expression.split()
    if len(parts) != 5:
        raise ValueError(f"cron {expression!r} must have 5 fields, has {len(parts)}")
    names = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
    fields = dict(zip(names, parts, strict=True))
    crontab(**fields)  # raises ValueError on a bad field
    return fields


def load_schedules(settings: Settings) -> list[BatchSchedule]:
    """The configured schedules; a bad one is a ConfigurationError naming it."""
    raw: Any = []
    source = "AGENTQ_BATCHES"
    if settings.batch_file is not None:
        source = f"AGENTQ_BATCH_FILE ({settings.batch_file})"
        raw = _read_file(settings.batch_file)
    elif settings.batches:
        try:
            raw = json.loads(settings.batches)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{source} is not valid JSON: {exc}") from None
    if isinstance(raw, dict):
        raw = raw.get("batches", [])
    if not isinstance(raw, list):
        raise ConfigurationError(f"{source} must be a list of batch schedules")
    schedules = []
    for index, item in enumerate(raw):
        try:
            schedules.append(BatchSchedule.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'schedule'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ConfigurationError(f"{source} item {index}: {problems}") from None
    names = [s.name for s in schedules]
    if len(names) != len(set(names)):
        raise ConfigurationError(f"{source}: schedule names repeat")
    return schedules


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"AGENTQ_BATCH_FILE cannot be read: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigurationError("a YAML AGENTQ_BATCH_FILE needs PyYAML installed") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"AGENTQ_BATCH_FILE is not valid YAML: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"AGENTQ_BATCH_FILE is not valid JSON: {exc}") from None
