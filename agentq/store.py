"""Postgres (or embedded SQLite) holds every run: the source of truth for its state.

Statements are SQLAlchemy Core, written once and executed by a synchronous store (producers)
or an asyncio store (workers). Every state change is one conditional UPDATE, so two processes
racing on the same run cannot both win: a redelivered message finds the run already claimed
or finished, and a worker whose claim lapsed cannot overwrite the run's new holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import Executable, Select, Update

from agentq.run import Priority, Run, RunRequest, RunStatus, Usage

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("agent", String(100), nullable=False),
    Column("input", Text, nullable=False),
    Column("context", Text),
    Column("priority", String(10), nullable=False),
    Column("status", String(20), nullable=False),
    Column("output", Text),
    Column("error_type", String(50)),
    Column("error", Text),
    Column("input_tokens", Integer, nullable=False, server_default="0"),
    Column("output_tokens", Integer, nullable=False, server_default="0"),
    Column("total_tokens", Integer, nullable=False, server_default="0"),
    Column("requests", Integer, nullable=False, server_default="0"),
    Column("model", String(100)),
    Column("turns", Integer, nullable=False, server_default="0"),
    Column("tool_calls", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("cached", Boolean, nullable=False, server_default="false"),
    Column("cancel_requested", Boolean, nullable=False, server_default="false"),
    Column("idempotency_key", String(255), unique=True),
    Column("worker", String(255)),
    Column("batch_id", String(32)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("max_turns", Integer),
    Column("max_tokens", Integer),
    Column("use_cache", Boolean, nullable=False, server_default="true"),
    Column("model_attempts", Integer, nullable=False, server_default="0"),
    Column("fallback_used", Boolean, nullable=False, server_default="false"),
    Index("ix_runs_status_created", "status", "created_at"),
    Index("ix_runs_agent_finished", "agent", "finished_at"),
)

RUN_COLUMNS = tuple(
    runs.c[name]
    for name in [
        "id",
        "agent",
        "input",
        "context",
        "priority",
        "status",
        "output",
        "error_type",
        "error",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "requests",
        "model",
        "turns",
        "tool_calls",
        "attempts",
        "cached",
        "worker",
        "idempotency_key",
        "batch_id",
        "created_at",
        "started_at",
        "finished_at",
        "max_turns",
        "max_tokens",
        "use_cache",
        "model_attempts",
        "fallback_used",
    ]
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(255)),
    Column("run_id", String(255)),
    Column("reason", String(50), nullable=False),
    Column("detail", Text),
    Column("payload", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_dead_letters_created", "created_at"),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every stored time is UTC.
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def row_to_run(row: Row[Any]) -> Run:
    m = row._mapping
    return Run(
        id=m["id"],
        agent=m["agent"],
        input=m["input"],
        priority=Priority(m["priority"]),
        status=RunStatus(m["status"]),
        context=json.loads(m["context"]) if m["context"] else None,
        idempotency_key=m["idempotency_key"],
        output=m["output"],
        error=m["error"],
        error_type=m["error_type"],
        usage=Usage(
            input_tokens=m["input_tokens"],
            output_tokens=m["output_tokens"],
            total_tokens=m["total_tokens"],
            requests=m["requests"],
        ),
        model=m["model"],
        turns=m["turns"],
        tool_calls=m["tool_calls"],
        attempts=m["attempts"],
        cached=bool(m["cached"]),
        worker=m["worker"],
        batch_id=m["batch_id"],
        created_at=_aware(m["created_at"]),
        started_at=_aware(m["started_at"]),
        finished_at=_aware(m["finished_at"]),
        max_turns=m["max_turns"],
        max_tokens=m["max_tokens"],
        use_cache=bool(m["use_cache"]),
        model_attempts=m["model_attempts"],
        fallback_used=bool(m["fallback_used"]),
    )


# Statements shared by both stores.


def select_runs(run_ids: Sequence[str]) -> Select[Any]:
    return select(*RUN_COLUMNS).where(runs.c.id.in_(run_ids))


def _request_values(r: RunRequest) -> dict[str, Any]:
    return {
        "id": r.id,
        "agent": r.agent,
        "input": r.input,
        "context": r.context_json,
        "priority": r.priority.value,
        "idempotency_key": r.idempotency_key,
        "max_turns": r.max_turns,
        "max_tokens": r.max_tokens,
        "use_cache": r.use_cache,
    }


#: A new run's columns, and their PostgreSQL array types.
_REQUEST_ARRAYS = {
    "id": "text[]",
    "agent": "text[]",
    "input": "text[]",
    "context": "text[]",
    "priority": "text[]",
    "idempotency_key": "text[]",
    "max_turns": "integer[]",
    "max_tokens": "integer[]",
    "use_cache": "boolean[]",
}

# Arrays rather than a VALUES row per run, for the same reason as _FINISH_MANY: a producer's
# submit_many of thousands of runs compiles nothing and sends 11 parameters.
_INSERT_MANY = text(
    "INSERT INTO runs ("
    + ", ".join(_REQUEST_ARRAYS)
    + ", status, created_at) SELECT "
    + ", ".join(f"request.{name}" for name in _REQUEST_ARRAYS)
    + f", '{RunStatus.QUEUED.value}', CAST(:created_at AS timestamptz) FROM unnest("
    + ", ".join(f"CAST(:{name} AS {kind})" for name, kind in _REQUEST_ARRAYS.items())
    + ") AS request("
    + ", ".join(_REQUEST_ARRAYS)
    + ") ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
)


def insert_runs(
    dialect: str, requests: Sequence[RunRequest], created_at: datetime
) -> tuple[Executable, dict[str, Any]]:
    """INSERT … ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, and its parameters."""
    if dialect == "postgresql":
        rows = [_request_values(r) for r in requests]
        parameters: dict[str, Any] = {"created_at": created_at}
        for name in _REQUEST_ARRAYS:
            parameters[name] = [row[name] for row in rows]
        return _INSERT_MANY, parameters
    values = [
        {**_request_values(r), "status": RunStatus.QUEUED.value, "created_at": created_at}
        for r in requests
    ]
    statement = (
        sqlite.insert(runs)
        .values(values)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(runs.c.id)
    )
    return statement, {}


@dataclass(frozen=True, slots=True)
class Claim:
    """A run a worker now holds: everything it needs to execute it."""

    run_id: str
    agent: str
    input: str
    context: dict[str, Any] | None
    priority: Priority
    attempt: int
    created_at: datetime
    started_at: datetime
    max_turns: int | None = None
    """The run's own turn limit, when it overrides the configured one."""
    max_tokens: int | None = None
    """The run's own output-token limit per model call, when it overrides the configured one."""
    use_cache: bool = True


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished run produced, written in one UPDATE."""

    status: RunStatus
    output: str | None = None
    error_type: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    model: str | None = None
    turns: int = 0
    tool_calls: int = 0
    cached: bool = False
    model_attempts: int = 0
    """Model calls tried, retries and fallback calls included."""
    fallback_used: bool = False
    """True when the fallback model answered some of the run's calls."""


@dataclass(frozen=True, slots=True)
class Finished:
    """An outcome to record for the run's attempt ``attempt``."""

    run_id: str
    attempt: int
    outcome: Outcome


# Built once: constructing a statement costs more CPU than executing it, and its cache key
# is the same for every claim, so it is compiled once per process.
_CLAIM = (
    update(runs)
    .where(
        runs.c.id.in_(bindparam("run_ids", expanding=True)),
        or_(
            runs.c.status == RunStatus.QUEUED.value,
            and_(
                runs.c.status == RunStatus.RUNNING.value,
                runs.c.lease_expires_at < bindparam("now"),
            ),
        ),
        runs.c.attempts < bindparam("max_attempts"),
    )
    .values(
        status=RunStatus.RUNNING.value,
        attempts=runs.c.attempts + 1,
        started_at=bindparam("now"),
        worker=bindparam("worker"),
        lease_expires_at=bindparam("lease_until"),
    )
    .returning(
        runs.c.id,
        runs.c.agent,
        runs.c.input,
        runs.c.context,
        runs.c.priority,
        runs.c.attempts,
        runs.c.created_at,
        runs.c.cancel_requested,
        runs.c.max_turns,
        runs.c.max_tokens,
        runs.c.use_cache,
    )
)


def claim_parameters(
    run_ids: Sequence[str], worker: str, now: datetime, lease: timedelta, max_attempts: int
) -> dict[str, Any]:
    """Parameters of the claim: take each of ``run_ids`` that is queued, or running under a
    lapsed lease, and has attempts left."""
    return {
        "run_ids": list(run_ids),
        "now": now,
        "worker": worker,
        "lease_until": now + lease,
        "max_attempts": max_attempts,
    }


def _outcome_values(outcome: Outcome) -> dict[str, Any]:
    return {
        "status": outcome.status.value,
        "output": outcome.output,
        "error_type": outcome.error_type,
        "error": outcome.error,
        "input_tokens": outcome.usage.input_tokens,
        "output_tokens": outcome.usage.output_tokens,
        "total_tokens": outcome.usage.total_tokens,
        "requests": outcome.usage.requests,
        "model": outcome.model,
        "turns": outcome.turns,
        "tool_calls": outcome.tool_calls,
        "cached": outcome.cached,
        "model_attempts": outcome.model_attempts,
        "fallback_used": outcome.fallback_used,
    }


def finish_statement(run_id: str, attempt: int, outcome: Outcome, now: datetime) -> Update:
    # Fenced by attempt: a worker whose lease lapsed and whose run was claimed again
    # by another worker cannot overwrite that worker's result.
    return (
        update(runs)
        .where(
            runs.c.id == run_id,
            runs.c.attempts == attempt,
            runs.c.status == RunStatus.RUNNING.value,
        )
        .values(**_outcome_values(outcome), finished_at=now, lease_expires_at=None)
    )


#: The columns a finished run's outcome sets, and their PostgreSQL array types.
_OUTCOME_ARRAYS = {
    "status": "text[]",
    "output": "text[]",
    "error_type": "text[]",
    "error": "text[]",
    "input_tokens": "integer[]",
    "output_tokens": "integer[]",
    "total_tokens": "integer[]",
    "requests": "integer[]",
    "model": "text[]",
    "turns": "integer[]",
    "tool_calls": "integer[]",
    "cached": "boolean[]",
    "model_attempts": "integer[]",
    "fallback_used": "boolean[]",
}

# One array per column rather than a VALUES row per run: the statement's text never changes
# with the batch's size, so it is compiled and prepared once per connection.
_FINISH_MANY = text(
    "UPDATE runs SET "
    + ", ".join(f"{name} = outcome.{name}" for name in _OUTCOME_ARRAYS)
    + ", finished_at = :now, lease_expires_at = NULL"
    " FROM unnest(CAST(:id AS text[]), CAST(:attempt AS integer[]), "
    + ", ".join(f"CAST(:{name} AS {kind})" for name, kind in _OUTCOME_ARRAYS.items())
    + ") AS outcome(id, attempt, "
    + ", ".join(_OUTCOME_ARRAYS)
    + ") WHERE runs.id = outcome.id AND runs.attempts = outcome.attempt"
    f" AND runs.status = '{RunStatus.RUNNING.value}'"
    " RETURNING runs.id, runs.attempts"
)


def finish_many_parameters(finished: Sequence[Finished], now: datetime) -> dict[str, Any]:
    """Parameters of the PostgreSQL statement that records many outcomes in one UPDATE.

    Fenced by attempt like one; the statement returns the id and attempt of each run it
    recorded.
    """
    rows = [_outcome_values(f.outcome) for f in finished]
    parameters: dict[str, Any] = {
        "now": now,
        "id": [f.run_id for f in finished],
        "attempt": [f.attempt for f in finished],
    }
    for name in _OUTCOME_ARRAYS:
        parameters[name] = [row[name] for row in rows]
    return parameters


def exhausted_statement(run_ids: Sequence[str], now: datetime, max_attempts: int) -> Update:
    """Fail runs whose every delivery so far died with their worker."""
    return (
        update(runs)
        .where(
            runs.c.id.in_(run_ids),
            runs.c.status == RunStatus.RUNNING.value,
            runs.c.lease_expires_at < now,
            runs.c.attempts >= max_attempts,
        )
        .values(
            status=RunStatus.FAILED.value,
            error_type="worker_lost",
            error=f"the run's worker was lost on each of {max_attempts} attempts",
            finished_at=now,
            lease_expires_at=None,
        )
    )


def release_statement(run_id: str, attempt: int) -> Update:
    """Give a run back to the queue; the attempt does not count against its budget."""
    return (
        update(runs)
        .where(
            runs.c.id == run_id,
            runs.c.attempts == attempt,
            runs.c.status == RunStatus.RUNNING.value,
        )
        .values(
            status=RunStatus.QUEUED.value,
            attempts=runs.c.attempts - 1,
            worker=None,
            started_at=None,
            lease_expires_at=None,
        )
    )


def cancel_queued_statement(run_id: str, now: datetime) -> Update:
    return (
        update(runs)
        .where(
            runs.c.id == run_id,
            runs.c.status.in_([RunStatus.QUEUED.value, RunStatus.AWAITING_APPROVAL.value]),
        )
        .values(
            status=RunStatus.CANCELLED.value,
            error_type="cancelled",
            error="cancelled before it started",
            finished_at=now,
        )
    )


def request_cancel_statement(run_id: str) -> Update:
    return (
        update(runs)
        .where(runs.c.id == run_id, runs.c.status == RunStatus.RUNNING.value)
        .values(cancel_requested=True)
    )


def renew_statement(run_ids: Sequence[str], until: datetime) -> Update:
    return (
        update(runs)
        .where(runs.c.id.in_(run_ids), runs.c.status == RunStatus.RUNNING.value)
        .values(lease_expires_at=until)
        .returning(runs.c.id, runs.c.cancel_requested)
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the producer read while a worker writes; the busy timeout waits out
        # the brief write locks instead of failing.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def make_async_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine.sync_engine)
        return engine
    # No pre-ping: it would cost a round trip per write, and a connection that went stale is
    # invalidated by its first failed statement, which the engine retries.
    return create_async_engine(url, pool_size=pool_size, max_overflow=5)


class RunStore:
    """Synchronous access to runs, for producers and the CLI."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def insert(self, requests: Sequence[RunRequest]) -> list[tuple[str, bool]]:
        """Store new runs. Returns each request's run id and whether it was created now.

        A request whose idempotency key is already stored gets the existing run's id.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            statement, parameters = insert_runs(self.dialect, requests, now)
            created = set(conn.execute(statement, parameters).scalars())
            keys = [
                r.idempotency_key for r in requests if r.id not in created and r.idempotency_key
            ]
            existing: dict[str, str] = {}
            if keys:
                found = conn.execute(
                    select(runs.c.idempotency_key, runs.c.id).where(
                        runs.c.idempotency_key.in_(keys)
                    )
                )
                existing = {key: run_id for key, run_id in found.all()}
        result = []
        for r in requests:
            if r.id in created:
                result.append((r.id, True))
            else:
                result.append((existing[r.idempotency_key or ""], False))
        return result

    def get(self, run_id: str) -> Run | None:
        found = self.get_many([run_id])
        return found[0] if found else None

    def get_many(self, run_ids: Iterable[str]) -> list[Run]:
        ids = list(run_ids)
        if not ids:
            return []
        with self.engine.connect() as conn:
            return [row_to_run(row) for row in conn.execute(select_runs(ids))]

    def cancel(self, run_id: str) -> RunStatus | None:
        """Cancel a queued run now, or ask a running one to stop at its next turn.

        Returns the run's status after the request, or None when no run has that id.
        """
        with self.engine.begin() as conn:
            conn.execute(cancel_queued_statement(run_id, utcnow()))
            conn.execute(request_cancel_statement(run_id))
            status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
        return RunStatus(status) if status else None

    def count_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs.c.status, func.count()).group_by(runs.c.status))
            return {status: count for status, count in rows.all()}


class _Connection:
    """One connection kept open for a stream of small writes, opened again after a failure.

    Checking a connection out of the pool and beginning a transaction for each write cost two
    thirds of the write's CPU; a batcher writes one batch at a time, so it can own one.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._connection: AsyncConnection | None = None

    async def get(self) -> AsyncConnection:
        if self._connection is None or self._connection.closed:
            connection = await self.engine.connect()
            if self.engine.dialect.name == "postgresql":
                # Each write is one conditional UPDATE, atomic on its own: no BEGIN and
                # COMMIT round trips. SQLite writes a batch in one transaction.
                connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            self._connection = connection
        return self._connection

    async def discard(self) -> None:
        """Drop a connection a failed write may have left broken or mid-transaction."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


class AsyncRunStore:
    """Asyncio access to runs, for workers: claim, renew, finish.

    Claims and outcomes are written in batches (:class:`agentq.batcher.Batcher`), each batcher
    on a connection of its own: each caller awaits its own run, and whatever gathered while
    the previous batch was being written goes in one statement, so a worker with hundreds of
    runs in flight spends one round trip, not hundreds, on their bookkeeping.
    """

    def __init__(self, engine: AsyncEngine, worker: str, lease_seconds: float) -> None:
        from agentq.batcher import Batcher

        self.engine = engine
        self.worker = worker
        self.lease = timedelta(seconds=lease_seconds)
        self._claim_connection = _Connection(engine)
        self._finish_connection = _Connection(engine)
        self.claims: Batcher[tuple[str, int], Claim | None] = Batcher(self._claim_batch)
        self.finishes: Batcher[Finished, bool] = Batcher(self._finish_batch)

    async def close(self) -> None:
        await self._claim_connection.close()
        await self._finish_connection.close()
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _writing(self, held: _Connection) -> AsyncIterator[AsyncConnection]:
        connection = await held.get()
        try:
            async with connection.begin():
                yield connection
        except BaseException:
            await held.discard()
            raise

    async def claim(self, run_id: str, max_attempts: int) -> Claim | None:
        """Take the run if it is queued, or running under a lapsed lease; else None."""
        return await self.claims.submit((run_id, max_attempts))

    async def finish(self, run_id: str, attempt: int, outcome: Outcome) -> bool:
        """Record the run's end. False when the run is no longer this attempt's to finish."""
        return await self.finishes.submit(Finished(run_id, attempt, outcome))

    async def _claim_batch(self, wanted: Sequence[tuple[str, int]]) -> list[Claim | None]:
        now = utcnow()
        rows: dict[str, Any] = {}
        async with self._writing(self._claim_connection) as conn:
            for limit in {max_attempts for _, max_attempts in wanted}:
                ids = list(dict.fromkeys(run_id for run_id, m in wanted if m == limit))
                parameters = claim_parameters(ids, self.worker, now, self.lease, limit)
                taken = {row.id: row._mapping for row in await conn.execute(_CLAIM, parameters)}
                rows.update(taken)
                lost = [run_id for run_id in ids if run_id not in taken]
                if lost:
                    await conn.execute(exhausted_statement(lost, now, limit))
        claims: dict[str, Claim] = {}
        cancelled: list[Finished] = []
        for run_id, m in rows.items():
            if m["cancel_requested"]:
                outcome = Outcome(RunStatus.CANCELLED, error_type="cancelled", error="cancelled")
                cancelled.append(Finished(run_id, m["attempts"], outcome))
                continue
            claims[run_id] = Claim(
                run_id=run_id,
                agent=m["agent"],
                input=m["input"],
                context=json.loads(m["context"]) if m["context"] else None,
                priority=Priority(m["priority"]),
                attempt=m["attempts"],
                created_at=_aware(m["created_at"]) or now,
                started_at=now,
                max_turns=m["max_turns"],
                max_tokens=m["max_tokens"],
                use_cache=bool(m["use_cache"]),
            )
        if cancelled:
            # Through the finish batcher, which owns the connection outcomes are written on.
            await asyncio.gather(*(self.finishes.submit(f) for f in cancelled))
        # Two deliveries of one run in one batch: only the first caller holds the claim.
        return [claims.pop(run_id, None) for run_id, _ in wanted]

    async def _finish_batch(self, finished: Sequence[Finished]) -> list[bool]:
        now = utcnow()
        recorded: set[tuple[str, int]] = set()
        async with self._writing(self._finish_connection) as conn:
            if conn.dialect.name == "postgresql":
                result = await conn.execute(_FINISH_MANY, finish_many_parameters(finished, now))
                recorded.update((run_id, attempt) for run_id, attempt in result.all())
            else:
                # Embedded SQLite: one statement per run, still one transaction and one commit.
                for f in finished:
                    statement = finish_statement(f.run_id, f.attempt, f.outcome, now)
                    if (await conn.execute(statement)).rowcount:
                        recorded.add((f.run_id, f.attempt))
        return [(f.run_id, f.attempt) in recorded for f in finished]

    async def release(self, run_id: str, attempt: int) -> bool:
        """Hand a run this worker holds back to the queue, for another worker to take."""
        async with self.engine.begin() as conn:
            result = await conn.execute(release_statement(run_id, attempt))
        return bool(result.rowcount)

    async def renew(self, run_ids: Sequence[str]) -> set[str]:
        """Extend the leases of runs in flight; returns those a producer asked to cancel."""
        if not run_ids:
            return set()
        async with self.engine.begin() as conn:
            rows = await conn.execute(renew_statement(run_ids, utcnow() + self.lease))
            return {run_id for run_id, cancel in rows.all() if cancel}

    async def exists(self, run_id: str) -> bool:
        async with self.engine.connect() as conn:
            found = await conn.execute(select(runs.c.id).where(runs.c.id == run_id))
            return found.first() is not None

    async def dead_letter(
        self, *, task_id: str | None, run_id: str | None, reason: str, detail: str, payload: str
    ) -> None:
        """Record a message that cannot be executed, so a person can see why it was dropped."""
        async with self.engine.begin() as conn:
            await conn.execute(
                dead_letters.insert().values(
                    task_id=(task_id or "")[:255] or None,
                    run_id=(run_id or "")[:255] or None,
                    reason=reason,
                    detail=detail,
                    payload=payload[:10_000],
                    created_at=utcnow(),
                )
            )

    async def get(self, run_id: str) -> Run | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select_runs([run_id]))).first()
        return row_to_run(row) if row else None


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database schema up to ``revision`` with the packaged Alembic migrations."""
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revision)
