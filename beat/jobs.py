"""Beat's jobs as Celery tasks, registered on the workers' app so they run on the workers.

Every job is idempotent per slot (the ``slot`` argument the scheduler adds): a health check
stores a result and decides transitions under a lock, a rollup recomputes and upserts its
minutes, the sweeper's changes are conditional UPDATEs, retention deletes by age, and a batch
is one unique row per schedule and slot.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy import Engine, column, delete, inspect, select, update
from sqlalchemy import table as table_clause

from agentq.alerts import Alerter
from agentq.batch import BatchSchedule, batches, load_schedules
from agentq.config import Settings
from agentq.health import (
    CHECKS,
    HealthChecker,
    HealthRecorder,
    HealthState,
    Transition,
    health_checks,
    health_transitions,
)
from agentq.rollup import metric_rollups, roll_up
from agentq.run import RunStatus
from agentq.store import runs, utcnow
from beat.schedule import BATCH_TASK, HEALTH_TASK, RETENTION_TASK, ROLLUP_TASK, SWEEP_TASK
from beat.sweeper import Sweeper

if TYPE_CHECKING:
    import redis

    from agentq.client import Client

logger = logging.getLogger("agentq.beat")

#: Finished runs deleted per statement, so retention never holds a long lock on runs.
RETENTION_CHUNK = 5000


class Jobs:
    """The resources Beat's jobs share in one worker process, built on first use."""

    def __init__(self, settings: Settings, app: Celery, worker: str | None = None) -> None:
        self.settings = settings
        self.app = app
        self.worker = worker
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._redis: redis.Redis[bytes] | None = None
        self._checker: HealthChecker | None = None
        self._alerter: Alerter | None = None
        self._schedules: dict[str, BatchSchedule] | None = None

    # Lazily built clients: one of each per process, made by the first job that needs it.

    @property
    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                from agentq.client import Client

                self._client = Client(self.settings, celery_app=self.app)
            return self._client

    @property
    def engine(self) -> Engine:
        return self.client.store.engine

    @property
    def redis(self) -> redis.Redis[bytes]:
        with self._lock:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.settings.broker_url)
            return self._redis

    @property
    def checker(self) -> HealthChecker:
        with self._lock:
            if self._checker is None:
                self._checker = HealthChecker(self.settings, celery_app=self.app)
                self._alerter = Alerter(self.settings)
            return self._checker

    def schedules(self) -> dict[str, BatchSchedule]:
        with self._lock:
            if self._schedules is None:
                self._schedules = {s.name: s for s in load_schedules(self.settings)}
            return self._schedules

    # The jobs.

    def health_check(self, check: str) -> dict[str, Any]:
        result = self.checker.run(check)
        transition = HealthRecorder(self.engine).record(result, self.worker)
        if not result.healthy:
            logger.warning(
                "health check %s failed: %s",
                check,
                result.error,
                extra={"action": "health_check_failed", "check": check},
            )
        if transition is not None and self._alerter is not None and _newsworthy(transition):
            self._alerter.send(transition)
        return result.to_dict()

    def rollup(self) -> int:
        return len(roll_up(self.engine, self.settings.beat.rollup_lookback_minutes))

    def sweep(self) -> dict[str, int]:
        report = Sweeper(self.settings, self.engine, self.app, self.redis).sweep()
        return {
            "republished": len(report.republished),
            "requeued": len(report.requeued),
            "failed": len(report.failed),
        }

    def retention(self) -> dict[str, int]:
        return apply_retention(self.settings, self.engine)

    def batch(self, name: str, slot: datetime) -> str | None:
        schedule = self.schedules().get(name)
        if schedule is None:
            logger.warning("no batch schedule %r", name, extra={"action": "batch_unknown"})
            return None
        return create_batch(self.client, schedule, slot)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._checker is not None:
            self._checker.close()
        if self._alerter is not None:
            self._alerter.close()
        if self._redis is not None:
            self._redis.close()


def _newsworthy(transition: Transition) -> bool:
    # unknown -> healthy is the first evaluation after a fresh start, not news.
    return not (
        transition.previous is HealthState.UNKNOWN and transition.state is HealthState.HEALTHY
    )


def create_batch(client: Client, schedule: BatchSchedule, slot: datetime) -> str:
    """Create (or complete) the batch of ``schedule`` for ``slot``; returns its id.

    The batch row is unique per schedule and slot and its runs have idempotency keys made
    of the batch id and position, so a second attempt at the same slot, even one that
    crashed half way, ends with the same single batch and the same runs.
    """
    from sqlalchemy.dialects import postgresql, sqlite

    engine = client.store.engine
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    with engine.begin() as conn:
        conn.execute(
            dialect.insert(batches)
            .values(
                id=uuid.uuid4().hex,
                schedule=schedule.name,
                slot=slot,
                agent=schedule.agent,
                priority=schedule.priority.value,
                size=len(schedule.inputs),
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["schedule", "slot"])
        )
        batch_id = conn.execute(
            select(batches.c.id).where(batches.c.schedule == schedule.name, batches.c.slot == slot)
        ).scalar_one()
    handles = client.submit_many(
        {
            "agent": schedule.agent,
            "input": text,
            "priority": schedule.priority.value,
            "context": schedule.context,
            "idempotency_key": f"batch:{batch_id}:{index}",
        }
        for index, text in enumerate(schedule.inputs)
    )
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id.in_([h.id for h in handles]), runs.c.batch_id.is_(None))
            .values(batch_id=batch_id)
        )
    logger.info(
        "batch %s created",
        schedule.name,
        extra={
            "action": "batch_created",
            "batch_id": batch_id,
            "schedule": schedule.name,
            "slot": slot.isoformat(),
            "runs": len(handles),
            "new_runs": sum(1 for h in handles if h.created),
        },
    )
    return str(batch_id)


def apply_retention(settings: Settings, engine: Engine) -> dict[str, int]:
    """Delete rows older than their configured age; queued and running runs are kept."""
    now = utcnow()
    keep = settings.retention

    def cutoff(days: float) -> datetime:
        return now - timedelta(days=days)

    removed: dict[str, int] = {}
    finished = [RunStatus.SUCCEEDED.value, RunStatus.FAILED.value, RunStatus.CANCELLED.value]
    runs_cutoff = cutoff(keep.runs_days)
    total = 0
    while True:
        with engine.begin() as conn:
            chunk = (
                select(runs.c.id)
                .where(runs.c.status.in_(finished), runs.c.finished_at < runs_cutoff)
                .limit(RETENTION_CHUNK)
                .scalar_subquery()
            )
            count = conn.execute(delete(runs).where(runs.c.id.in_(chunk))).rowcount
        total += count
        if count < RETENTION_CHUNK:
            break
    removed["runs"] = total
    with engine.begin() as conn:
        removed["health_checks"] = conn.execute(
            delete(health_checks).where(
                health_checks.c.checked_at < cutoff(keep.health_checks_days)
            )
        ).rowcount
        removed["health_transitions"] = conn.execute(
            delete(health_transitions).where(
                health_transitions.c.at < cutoff(keep.health_checks_days)
            )
        ).rowcount
        removed["metric_rollups"] = conn.execute(
            delete(metric_rollups).where(metric_rollups.c.minute < cutoff(keep.metric_rollups_days))
        ).rowcount
        removed["batches"] = conn.execute(
            delete(batches).where(batches.c.created_at < cutoff(keep.batches_days))
        ).rowcount
        # Traces and spans belong to runs and go with them.
        tables = set(inspect(conn).get_table_names())
        for table in ("spans", "traces"):
            if table in tables:
                t = table_clause(table, column("started_at"))
                removed[table] = conn.execute(
                    delete(t).where(t.c.started_at < runs_cutoff)
                ).rowcount
    if any(removed.values()):
        logger.info("retention removed rows", extra={"action": "retention", **removed})
    return removed


def register_jobs(app: Celery, settings: Settings, worker: str | None = None) -> Jobs:
    """Register Beat's jobs as tasks on a worker's app; returns their shared resources."""
    jobs = Jobs(settings, app, worker)
    options: dict[str, Any] = {"ignore_result": True, "acks_late": True}

    @app.task(name=HEALTH_TASK, **options)  # type: ignore[untyped-decorator]
    def health_check(check: str, slot: str | None = None) -> dict[str, Any]:
        if check not in CHECKS:
            raise ValueError(f"unknown health check {check!r}")
        return jobs.health_check(check)

    @app.task(name=ROLLUP_TASK, **options)  # type: ignore[untyped-decorator]
    def rollup(slot: str | None = None) -> int:
        return jobs.rollup()

    @app.task(name=SWEEP_TASK, **options)  # type: ignore[untyped-decorator]
    def sweep(slot: str | None = None) -> dict[str, int]:
        return jobs.sweep()

    @app.task(name=RETENTION_TASK, **options)  # type: ignore[untyped-decorator]
    def retention(slot: str | None = None) -> dict[str, int]:
        return jobs.retention()

    @app.task(name=BATCH_TASK, **options)  # type: ignore[untyped-decorator]
    def batch(name: str, slot: str | None = None) -> str | None:
        moment = datetime.fromisoformat(slot) if slot else utcnow().replace(second=0, microsecond=0)
        return jobs.batch(name, moment)

    del health_check, rollup, sweep, retention, batch
    return jobs
