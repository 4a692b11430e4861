"""The sweeper: nothing stays stuck in ``queued`` or ``running``.

* A run running under a lapsed lease has no live worker (a live one renews it): it is queued
  again and re-published, or failed as ``worker_lost`` once its attempts are spent.
* A run queued for longer than ``AGENTQ_BEAT__SWEEP_QUEUED_AFTER`` whose message is in no
  run queue and in no worker's unacknowledged deliveries was lost by the broker (or never
  published): it is re-published.

Looking for the message, rather than re-publishing every old queued run, keeps a long
backlog from being multiplied by duplicates each sweep (which would also inflate the queue
depth autoscaling reads). The scan only happens when old queued runs exist, and a message
popped between the scan's reads is at worst published twice, which is harmless: the claim
is a conditional UPDATE, so the extra delivery finds the run taken and is acknowledged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select, update

from agentq.app import QUEUE_NAMES, RUN_TASK, queue_name
from agentq.config import Settings
from agentq.health import broker_keys
from agentq.run import Priority, RunStatus
from agentq.store import exhausted_statement, runs, utcnow

if TYPE_CHECKING:
    import redis
    from celery import Celery

logger = logging.getLogger("agentq.beat")

#: kombu's Redis transport keeps delivered, unacknowledged messages in this hash.
UNACKED_KEY = "unacked"
#: Messages read from Redis per round trip while scanning.
SCAN_CHUNK = 1000


@dataclass(slots=True)
class SweepReport:
    republished: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Sweeper:
    def __init__(self, settings: Settings, engine: Engine, app: Celery, client: redis.Redis[bytes]):
        self.settings = settings
        self.engine = engine
        self.app = app
        self.redis = client

    def sweep(self, now: datetime | None = None) -> SweepReport:
        now = now or utcnow()
        report = SweepReport()
        publish: list[tuple[str, str]] = []
        self._lapsed(now, report, publish)
        self._lost(now, report, publish)
        self._publish(publish)
        if report.republished or report.requeued or report.failed:
            logger.warning(
                "sweeper recovered runs",
                extra={
                    "action": "sweep",
                    "republished": len(report.republished),
                    "requeued": len(report.requeued),
                    "failed": len(report.failed),
                },
            )
        return report

    def _lapsed(self, now: datetime, report: SweepReport, publish: list[tuple[str, str]]) -> None:
        limit = self.settings.max_attempts
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(runs.c.id, runs.c.priority, runs.c.attempts)
                .where(runs.c.status == RunStatus.RUNNING.value, runs.c.lease_expires_at < now)
                .limit(self.settings.beat.sweep_limit)
            ).all()
            for run_id, priority, attempts in rows:
                if attempts >= limit:
                    if conn.execute(exhausted_statement([run_id], now, limit)).rowcount:
                        report.failed.append(run_id)
                    continue
                # Fenced by the attempt: a worker that claimed the run since the select
                # keeps it.
                requeued = conn.execute(
                    update(runs)
                    .where(
                        runs.c.id == run_id,
                        runs.c.status == RunStatus.RUNNING.value,
                        runs.c.lease_expires_at < now,
                        runs.c.attempts == attempts,
                    )
                    .values(
                        status=RunStatus.QUEUED.value,
                        worker=None,
                        started_at=None,
                        lease_expires_at=None,
                    )
                ).rowcount
                if requeued:
                    report.requeued.append(run_id)
                    publish.append((run_id, priority))

    def _lost(self, now: datetime, report: SweepReport, publish: list[tuple[str, str]]) -> None:
        cutoff = now - timedelta(seconds=self.settings.beat.sweep_queued_after)
        already = {run_id for run_id, _ in publish}
        with self.engine.connect() as conn:
            candidates = {
                run_id: priority
                for run_id, priority in conn.execute(
                    select(runs.c.id, runs.c.priority)
                    .where(runs.c.status == RunStatus.QUEUED.value, runs.c.created_at < cutoff)
                    .order_by(runs.c.created_at)
                    .limit(self.settings.beat.sweep_limit)
                ).all()
                if run_id not in already
            }
        if not candidates:
            return
        missing = set(candidates) - self.message_ids(set(candidates))
        if not missing:
            return
        # Only runs still queued after the scan: one claimed meanwhile had its message.
        with self.engine.connect() as conn:
            still = conn.execute(
                select(runs.c.id).where(
                    runs.c.id.in_(missing), runs.c.status == RunStatus.QUEUED.value
                )
            ).scalars()
            for run_id in still:
                report.republished.append(run_id)
                publish.append((run_id, candidates[run_id]))

    def message_ids(self, wanted: set[str]) -> set[str]:
        """The ids among ``wanted`` that have a message waiting or delivered in Redis."""
        found: set[str] = set()
        for name in QUEUE_NAMES:
            for key in broker_keys(name):
                start = 0
                while True:
                    chunk = self.redis.lrange(key, start, start + SCAN_CHUNK - 1)
                    found.update(_ids(chunk, wanted, delivered=False))
                    if len(chunk) < SCAN_CHUNK:
                        break
                    start += SCAN_CHUNK
        for _, raw in self.redis.hscan_iter(UNACKED_KEY, count=SCAN_CHUNK):
            found.update(_ids([raw], wanted, delivered=True))
        return found

    def _publish(self, publish: list[tuple[str, str]]) -> None:
        if not publish:
            return
        with self.app.producer_or_acquire() as producer:
            for run_id, priority in publish:
                self.app.send_task(
                    RUN_TASK,
                    args=(run_id,),
                    queue=queue_name(Priority(priority)),
                    task_id=run_id,
                    producer=producer,
                )


def _ids(raws: Iterable[Any], wanted: set[str], *, delivered: bool) -> set[str]:
    found = set()
    for raw in raws:
        try:
            message = json.loads(raw)
            if delivered:
                message = message[0]
            task_id = message["headers"]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if task_id in wanted:
            found.add(task_id)
    return found
