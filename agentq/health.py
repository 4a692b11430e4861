"""Health checks: database, model API, memory, broker and worker pool, each with its timeout.

The guide's checks and their intervals and timeouts (database 30 s / 5 s, model API 60 s /
10 s, memory 15 s / 1 s), plus the broker and the worker pool with its backlog. The same
:class:`HealthChecker` serves ``agentq health`` (a probe, run now) and Beat's periodic jobs,
which store every result with :class:`HealthRecorder`. The recorder decides the overall state
under a row lock, so however many workers run checks at once, each change between healthy
and degraded is one stored transition and one alert.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from agentq.app import QUEUE_NAMES
from agentq.config import Settings
from agentq.store import make_engine, metadata, utcnow

if TYPE_CHECKING:
    import redis
    from celery import Celery

_Id = BigInteger().with_variant(Integer, "sqlite")

health_checks = Table(
    "health_checks",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("check", String(50), nullable=False),
    Column("healthy", Boolean, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("error", Text),
    Column("detail", Text),
    Column("worker", String(255)),
    Column("checked_at", DateTime(timezone=True), nullable=False),
    Index("ix_health_checks_check_at", "check", "checked_at"),
    Index("ix_health_checks_checked_at", "checked_at"),
)

health_state = Table(
    "health_state",
    metadata,
    Column("name", String(50), primary_key=True),
    Column("state", String(20), nullable=False),
    Column("failing", Text),
    Column("changed_at", DateTime(timezone=True), nullable=False),
    Column("evaluated_at", DateTime(timezone=True), nullable=False),
)

health_transitions = Table(
    "health_transitions",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("previous", String(20), nullable=False),
    Column("state", String(20), nullable=False),
    Column("failing", Text),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_health_transitions_at", "at"),
)

#: Every check, in the order they are reported.
CHECKS: tuple[str, ...] = ("database", "model", "memory", "broker", "workers")

#: The one row of ``health_state`` that holds the deployment's overall state.
OVERALL = "overall"


class HealthState(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One run of one check."""

    check: str
    healthy: bool
    duration_ms: float
    checked_at: datetime
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "healthy": self.healthy,
            "duration_ms": round(self.duration_ms, 1),
            "checked_at": self.checked_at.isoformat(),
            "error": self.error,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """The overall state changed; ``failing`` maps each failing check to its error."""

    previous: HealthState
    state: HealthState
    failing: dict[str, str]
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "health_transition",
            "previous": self.previous.value,
            "state": self.state.value,
            "failing": self.failing,
            "at": self.at.isoformat(),
        }


class CheckFailed(Exception):
    """A probe found the dependency unhealthy; the message says why."""

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or {}


def interval(settings: Settings, check: str) -> float:
    return float(getattr(settings.health, f"{check}_interval"))


def timeout(settings: Settings, check: str) -> float:
    return float(getattr(settings.health, f"{check}_timeout"))


class HealthChecker:
    """Runs checks with their timeouts. Build one per process; clients are made on first use."""

    def __init__(self, settings: Settings, *, celery_app: Celery | None = None) -> None:
        self.settings = settings
        self._celery = celery_app
        self._engine: Engine | None = None
        self._redis: redis.Redis[bytes] | None = None
        # A probe that overruns its timeout keeps its thread until the client gives up;
        # a pool of its own keeps that from starving anything else.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(CHECKS) * 2, thread_name_prefix="agentq-health"
        )
        self._probes: dict[str, Callable[[float], dict[str, Any]]] = {
            "database": self._database,
            "model": self._model,
            "memory": self._memory,
            "broker": self._broker,
            "workers": self._workers,
        }

    def run(self, check: str) -> CheckResult:
        """Run one check; a failure or a timeout is an unhealthy result, never an exception."""
        limit = timeout(self.settings, check)
        started = time.perf_counter()
        checked_at = utcnow()
        future = self._pool.submit(self._probes[check], limit)
        try:
            detail = future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            return self._result(check, started, checked_at, f"timed out after {limit:g} s")
        except CheckFailed as exc:
            return self._result(check, started, checked_at, str(exc), exc.detail)
        except Exception as exc:  # noqa: BLE001  any client error: the dependency is unhealthy
            return self._result(check, started, checked_at, _describe(exc))
        return self._result(check, started, checked_at, None, detail)

    def run_all(self, checks: Sequence[str] = CHECKS) -> list[CheckResult]:
        """Run checks in parallel: the whole takes as long as the slowest one."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(checks) or 1) as pool:
            return list(pool.map(self.run, checks))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._engine is not None:
            self._engine.dispose()
        if self._redis is not None:
            self._redis.close()

    @staticmethod
    def _result(
        check: str,
        started: float,
        checked_at: datetime,
        error: str | None,
        detail: dict[str, Any] | None = None,
    ) -> CheckResult:
        return CheckResult(
            check=check,
            healthy=error is None,
            duration_ms=(time.perf_counter() - started) * 1000,
            checked_at=checked_at,
            error=error,
            detail=detail or {},
        )

    # Probes: each returns details when healthy and raises when not.

    def _database(self, limit: float) -> dict[str, Any]:
        if self._engine is None:
            url = self.settings.sync_database_url
            override = self.settings.health.database_url
            if override is not None:
                url = self.settings.model_copy(update={"database_url": override}).sync_database_url
            args: dict[str, Any] = {}
            if url.startswith("postgresql"):
                args = {"connect_timeout": max(1, round(limit))}
            self._engine = make_engine(url) if not args else _probe_engine(url, args)
        with self._engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"dialect": self._engine.dialect.name}

    def _model(self, limit: float) -> dict[str, Any]:
        if self.settings.uses_offline_model:
            return {"provider": "offline"}
        base = (self.settings.openai_base_url or "https://api.openai.com/v1").rstrip("/")
        key = self.settings.openai_api_key
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        # Listing models proves reachability and a valid key without spending tokens or
        # the cluster's rate-limit budget.
        status = http_status("GET", f"{base}/models", headers=headers, timeout=limit)
        if status >= 400:
            raise CheckFailed(f"GET /models answered HTTP {status}", {"status": status})
        return {"status": status, "model": self.settings.default_model}

    def _memory(self, limit: float) -> dict[str, Any]:
        del limit
        used, total, source = memory_usage()
        if total <= 0:
            return {"source": source}
        usage = used / total
        detail: dict[str, Any] = {
            "used_bytes": used,
            "total_bytes": total,
            "usage": round(usage, 4),
            "source": source,
        }
        if usage >= self.settings.health.memory_max_usage:
            raise CheckFailed(
                f"memory {usage:.0%} used, limit {self.settings.health.memory_max_usage:.0%}",
                detail,
            )
        return detail

    def _redis_client(self, limit: float) -> redis.Redis[bytes]:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(
                self.settings.broker_url, socket_timeout=limit, socket_connect_timeout=limit
            )
        return self._redis

    def _broker(self, limit: float) -> dict[str, Any]:
        if self.settings.embedded:
            return {"broker": "in-process"}
        self._redis_client(limit).ping()
        return {"broker": "redis"}

    def _workers(self, limit: float) -> dict[str, Any]:
        if self.settings.embedded:
            return {"broker": "in-process"}
        backlog = queue_depths(self._redis_client(limit))
        if self._celery is None:
            from agentq.app import make_celery

            self._celery = make_celery(self.settings)
        # Replies arrive within a fraction of a second; waiting the whole timeout would
        # only delay the answer.
        replies = self._celery.control.ping(timeout=min(1.0, limit / 2))
        workers = sorted(name for reply in replies for name in reply)
        total = sum(backlog.values())
        detail = {"workers": len(workers), "backlog": backlog, "backlog_total": total}
        if not workers:
            raise CheckFailed("no worker answered a ping", detail)
        if total > self.settings.health.max_backlog:
            raise CheckFailed(
                f"{total} runs waiting, over AGENTQ_HEALTH__MAX_BACKLOG="
                f"{self.settings.health.max_backlog}",
                detail,
            )
        return detail


def http_status(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float,
) -> int:
    """Send one HTTP request and return its status; connection errors raise ``OSError``."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("only http:// and https:// URLs are requested")
    request = urllib.request.Request(  # noqa: S310  the scheme is checked above
        url, data=body, method=method, headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _probe_engine(url: str, connect_args: dict[str, Any]) -> Engine:
    from sqlalchemy import create_engine

    # A probe holds one connection and checks it before use, so a restarted database is
    # seen as up again on the next check.
    return create_engine(
        url, pool_pre_ping=True, pool_size=1, max_overflow=0, connect_args=connect_args
    )


def _describe(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()
    first = message[0] if message else ""
    return f"{type(exc).__name__}: {first}"[:500] if first else type(exc).__name__


def queue_depths(client: redis.Redis[bytes]) -> dict[str, int]:
    """Messages waiting in each run queue, counting kombu's per-priority sub-lists."""
    pipe = client.pipeline()
    for name in QUEUE_NAMES:
        for key in broker_keys(name):
            pipe.llen(key)
    counts = iter(pipe.execute())
    return {name: sum(next(counts) for _ in broker_keys(name)) for name in QUEUE_NAMES}


#: kombu's Redis transport keeps a message of priority p in ``queue + sep + p`` (p > 0).
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def broker_keys(queue: str) -> list[str]:
    return [queue, *(f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS)]


def memory_usage() -> tuple[int, int, str]:
    """Bytes used and available to this process's container (cgroup v2) or host."""
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            current = int((cgroup / "memory.current").read_text().strip())
            return current, int(limit), "cgroup"
    except (OSError, ValueError):
        pass
    try:
        info: dict[str, int] = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            info[name] = int(rest.split()[0]) * 1024
        total = info["MemTotal"]
        return total - info.get("MemAvailable", info.get("MemFree", 0)), total, "host"
    except (OSError, KeyError, ValueError, IndexError):
        pass
    if hasattr(os, "sysconf"):
        try:
            pages = os.sysconf("SC_PHYS_PAGES")
            free = os.sysconf("SC_AVPHYS_PAGES")
            size = os.sysconf("SC_PAGE_SIZE")
            return (pages - free) * size, pages * size, "host"
        except (ValueError, OSError):
            pass
    return 0, 0, "unavailable"


class HealthRecorder:
    """Stores check results and decides the overall state's transitions."""

    def __init__(self, engine: Engine, checks: Sequence[str] = CHECKS) -> None:
        self.engine = engine
        self.checks = tuple(checks)

    def record(self, result: CheckResult, worker: str | None = None) -> Transition | None:
        """Store ``result``; returns the transition it caused, if any, exactly once.

        The overall state row is locked while the latest result of every check is read, so
        concurrent recorders see each other's results in turn and agree on one transition.
        """
        now = utcnow()
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        with self.engine.begin() as conn:
            conn.execute(
                insert(health_checks).values(
                    check=result.check,
                    healthy=result.healthy,
                    duration_ms=result.duration_ms,
                    error=result.error,
                    detail=json.dumps(result.detail, default=str),
                    worker=worker,
                    checked_at=result.checked_at,
                )
            )
            conn.execute(
                dialect.insert(health_state)
                .values(
                    name=OVERALL,
                    state=HealthState.UNKNOWN.value,
                    changed_at=now,
                    evaluated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["name"])
            )
            previous = HealthState(
                conn.execute(
                    select(health_state.c.state)
                    .where(health_state.c.name == OVERALL)
                    .with_for_update()
                ).scalar_one()
            )
            failing: dict[str, str] = {}
            unchecked = 0
            for check in self.checks:
                row = conn.execute(
                    select(health_checks.c.healthy, health_checks.c.error)
                    .where(health_checks.c.check == check)
                    .order_by(health_checks.c.checked_at.desc(), health_checks.c.id.desc())
                    .limit(1)
                ).first()
                if row is None:
                    unchecked += 1
                elif not row.healthy:
                    failing[check] = row.error or "unhealthy"
            # Healthy only once every check has passed: a check that never ran proves nothing.
            if failing:
                state = HealthState.DEGRADED
            elif unchecked:
                state = previous
            else:
                state = HealthState.HEALTHY
            values: dict[str, Any] = {"evaluated_at": now, "failing": json.dumps(failing)}
            if state is not previous:
                values.update(state=state.value, changed_at=now)
            conn.execute(update(health_state).where(health_state.c.name == OVERALL).values(values))
            if state is previous:
                return None
            conn.execute(
                insert(health_transitions).values(
                    previous=previous.value, state=state.value, failing=json.dumps(failing), at=now
                )
            )
        return Transition(previous=previous, state=state, failing=failing, at=now)

    def state(self) -> tuple[HealthState, dict[str, str], datetime | None]:
        """The stored overall state, its failing checks and when it last changed."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    health_state.c.state, health_state.c.failing, health_state.c.changed_at
                ).where(health_state.c.name == OVERALL)
            ).first()
        if row is None:
            return HealthState.UNKNOWN, {}, None
        return HealthState(row.state), json.loads(row.failing or "{}"), row.changed_at


def summary(results: Sequence[CheckResult]) -> dict[str, Any]:
    """The JSON ``agentq health --json`` prints."""
    healthy = all(r.healthy for r in results)
    return {
        "status": HealthState.HEALTHY.value if healthy else HealthState.DEGRADED.value,
        "checks": {r.check: r.to_dict() for r in results},
    }


def format_table(results: Sequence[CheckResult]) -> str:
    width = max((len(r.check) for r in results), default=5)
    lines = []
    for r in results:
        mark = "ok" if r.healthy else "FAIL"
        note = r.error or _brief(r.detail)
        lines.append(f"{r.check:<{width}}  {mark:<4}  {r.duration_ms:7.1f} ms  {note}")
    healthy = all(r.healthy for r in results)
    lines.append(f"overall: {'healthy' if healthy else 'degraded'}")
    return "\n".join(lines) + "\n"


def _brief(detail: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{key}={value}" for key, value in detail.items() if not isinstance(value, dict)
    )
