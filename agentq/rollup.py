"""Per-agent, per-minute metric rollups of finished runs, stored in ``metric_rollups``.

A rollup recomputes the last few minutes from the runs table and upserts them, so running it
twice, or on two workers at once, stores the same rows: a minute's row is a function of the
runs that finished in it. Durations are finish minus start of the last attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Table,
    and_,
    case,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from agentq.run import RunStatus
from agentq.store import metadata, runs, utcnow

metric_rollups = Table(
    "metric_rollups",
    metadata,
    Column("agent", String(100), primary_key=True),
    Column("minute", DateTime(timezone=True), primary_key=True),
    Column("runs", Integer, nullable=False),
    Column("succeeded", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("cancelled", Integer, nullable=False),
    Column("p50_ms", Float),
    Column("p95_ms", Float),
    Column("p99_ms", Float),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("cached", Integer, nullable=False),
    Column("cache_hit_rate", Float, nullable=False),
    Column("computed_at", DateTime(timezone=True), nullable=False),
    Index("ix_metric_rollups_minute", "minute"),
)

FINISHED = (RunStatus.SUCCEEDED.value, RunStatus.FAILED.value, RunStatus.CANCELLED.value)


@dataclass(frozen=True, slots=True)
class Rollup:
    agent: str
    minute: datetime
    runs: int
    succeeded: int
    failed: int
    cancelled: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cached: int
    cache_hit_rate: float


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every stored time is UTC.
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks, as Postgres's ``percentile_cont``."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def compute(engine: Engine, since: datetime, until: datetime) -> list[Rollup]:
    """Rollups of runs that finished in ``[since, until)``, one per agent and minute."""
    if engine.dialect.name == "postgresql":
        return _compute_postgres(engine, since, until)
    return _compute_python(engine, since, until)


def _window() -> Any:
    return and_(runs.c.status.in_(FINISHED), runs.c.finished_at.is_not(None))


def _compute_postgres(engine: Engine, since: datetime, until: datetime) -> list[Rollup]:
    minute = func.date_trunc(literal_column("'minute'"), runs.c.finished_at).label("minute")
    duration = func.extract("epoch", runs.c.finished_at - runs.c.started_at) * 1000.0

    def count_of(status: str) -> Any:
        return func.count(case((runs.c.status == status, 1)))

    statement = (
        select(
            runs.c.agent,
            minute,
            func.count(),
            count_of(RunStatus.SUCCEEDED.value),
            count_of(RunStatus.FAILED.value),
            count_of(RunStatus.CANCELLED.value),
            func.percentile_cont(0.5).within_group(duration),
            func.percentile_cont(0.95).within_group(duration),
            func.percentile_cont(0.99).within_group(duration),
            func.coalesce(func.sum(runs.c.input_tokens), 0),
            func.coalesce(func.sum(runs.c.output_tokens), 0),
            func.coalesce(func.sum(runs.c.total_tokens), 0),
            func.count(case((runs.c.cached.is_(True), 1))),
        )
        .where(_window(), runs.c.finished_at >= since, runs.c.finished_at < until)
        .group_by(runs.c.agent, minute)
    )
    with engine.connect() as conn:
        rows = conn.execute(statement).all()
    return [
        Rollup(
            agent=agent,
            minute=_aware(at) or at,
            runs=total,
            succeeded=ok,
            failed=bad,
            cancelled=cancelled,
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            input_tokens=int(tin),
            output_tokens=int(tout),
            total_tokens=int(tall),
            cached=cached,
            cache_hit_rate=cached / total if total else 0.0,
        )
        for agent, at, total, ok, bad, cancelled, p50, p95, p99, tin, tout, tall, cached in rows
    ]


def _compute_python(engine: Engine, since: datetime, until: datetime) -> list[Rollup]:
    statement = select(
        runs.c.agent,
        runs.c.status,
        runs.c.started_at,
        runs.c.finished_at,
        runs.c.input_tokens,
        runs.c.output_tokens,
        runs.c.total_tokens,
        runs.c.cached,
    ).where(_window(), runs.c.finished_at >= since, runs.c.finished_at < until)
    groups: dict[tuple[str, datetime], list[Any]] = {}
    with engine.connect() as conn:
        for row in conn.execute(statement):
            finished = _aware(row.finished_at)
            assert finished is not None
            groups.setdefault((row.agent, minute_of(finished)), []).append(row)
    result = []
    for (agent, at), rows in sorted(groups.items()):
        durations = [
            (finished - started).total_seconds() * 1000
            for r in rows
            if (started := _aware(r.started_at)) and (finished := _aware(r.finished_at))
        ]
        cached = sum(1 for r in rows if r.cached)
        result.append(
            Rollup(
                agent=agent,
                minute=at,
                runs=len(rows),
                succeeded=sum(1 for r in rows if r.status == RunStatus.SUCCEEDED.value),
                failed=sum(1 for r in rows if r.status == RunStatus.FAILED.value),
                cancelled=sum(1 for r in rows if r.status == RunStatus.CANCELLED.value),
                p50_ms=percentile(durations, 0.5),
                p95_ms=percentile(durations, 0.95),
                p99_ms=percentile(durations, 0.99),
                input_tokens=sum(r.input_tokens for r in rows),
                output_tokens=sum(r.output_tokens for r in rows),
                total_tokens=sum(r.total_tokens for r in rows),
                cached=cached,
                cache_hit_rate=cached / len(rows),
            )
        )
    return result


def roll_up(engine: Engine, lookback_minutes: int, now: datetime | None = None) -> list[Rollup]:
    """Recompute and store the rollups of the last ``lookback_minutes`` minutes (and this one)."""
    now = now or utcnow()
    since = minute_of(now) - timedelta(minutes=lookback_minutes)
    rollups = compute(engine, since, now)
    if not rollups:
        return []
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    rows = [{**_as_row(r), "computed_at": now} for r in rollups]
    statement = dialect.insert(metric_rollups).values(rows)
    statement = statement.on_conflict_do_update(
        index_elements=["agent", "minute"],
        set_={
            name: statement.excluded[name] for name in rows[0] if name not in ("agent", "minute")
        },
    )
    with engine.begin() as conn:
        conn.execute(statement)
    return rollups


def _as_row(rollup: Rollup) -> dict[str, Any]:
    return {name: getattr(rollup, name) for name in Rollup.__slots__}


def recent(engine: Engine, minutes: int, agent: str | None = None) -> list[Rollup]:
    """Stored rollups of the last ``minutes`` minutes, newest first."""
    since = minute_of(utcnow()) - timedelta(minutes=minutes)
    statement = select(*(metric_rollups.c[name] for name in Rollup.__slots__)).where(
        metric_rollups.c.minute >= since
    )
    if agent is not None:
        statement = statement.where(metric_rollups.c.agent == agent)
    statement = statement.order_by(metric_rollups.c.minute.desc(), metric_rollups.c.agent)
    with engine.connect() as conn:
        rows = conn.execute(statement).all()
    return [Rollup(**{**row._mapping, "minute": _aware(row.minute) or row.minute}) for row in rows]


def format_table(rollups: Sequence[Rollup]) -> str:
    headers = ["minute", "agent", "runs", "ok", "failed", "p50 ms", "p95 ms", "p99 ms", "tokens"]
    headers.append("cache hit")
    table: list[Sequence[str]] = [headers]
    for r in rollups:
        table.append(
            (
                r.minute.strftime("%Y-%m-%d %H:%M"),
                r.agent,
                str(r.runs),
                str(r.succeeded),
                str(r.failed),
                _ms(r.p50_ms),
                _ms(r.p95_ms),
                _ms(r.p99_ms),
                str(r.total_tokens),
                f"{r.cache_hit_rate:.0%}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"
