"""Agent run traces stored in Postgres: a trace per run attempt, a span per step.

:class:`TraceRecorder` is an Agents SDK trace processor. The SDK calls it synchronously on
the worker's event loop as traces and spans end; it only turns each into a row and buffers
it, and a task on the same loop writes the buffer in one batched INSERT every
``flush_interval`` seconds, so a run pays no database round trip for its trace. A trace is
linked to its run through :data:`agentq.telemetry.current_run`, set while the run executes;
the run id is also written into the trace's metadata and group id.

This module does not import the Agents SDK, so ``agentq get RUN_ID --trace`` stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from agentq.logs import Redactor
from agentq.store import metadata
from agentq.telemetry import current_run

logger = logging.getLogger("agentq.tracing")

traces = Table(
    "traces",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("run_id", String(32)),
    Column("attempt", Integer),
    Column("workflow_name", String(255)),
    Column("group_id", String(255)),
    Column("metadata", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
    Index("ix_traces_run_id", "run_id"),
)

spans = Table(
    "spans",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("trace_id", String(64), nullable=False),
    Column("run_id", String(32)),
    Column("parent_id", String(64)),
    Column("kind", String(50), nullable=False),
    Column("name", String(255)),
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
    Column("duration_ms", Float),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("data", Text),
    Column("error", Text),
    Index("ix_spans_trace_id", "trace_id"),
    Index("ix_spans_run_id", "run_id"),
)

#: Rows kept while the database is away; beyond it the oldest traces are dropped.
MAX_BUFFERED_ROWS = 50_000
#: Longest stored span payload; a model's full input can be large.
MAX_DATA_CHARS = 20_000


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _tokens(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    return usage.get("input_tokens"), usage.get("output_tokens")


def _span_name(data: dict[str, Any]) -> str | None:
    name = data.get("name") or data.get("model")
    if name is None and data.get("type") == "response":
        name = data.get("response_id")
    return str(name)[:255] if name is not None else None


class TraceRecorder:
    """Buffers the SDK's traces and spans as rows and writes them to Postgres in batches.

    Implements ``agents.tracing.TracingProcessor`` (registered as its virtual subclass by
    :func:`install_tracing`).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        redactor: Redactor | None = None,
        flush_interval: float = 0.2,
    ) -> None:
        self.engine = engine
        self.redactor = redactor or Redactor()
        self.flush_interval = flush_interval
        self._traces: list[dict[str, Any]] = []
        self._spans: list[dict[str, Any]] = []
        self._open: dict[str, tuple[str | None, datetime]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Event | None = None
        self.written_traces = 0
        self.written_spans = 0

    # TracingProcessor.

    def on_trace_start(self, trace: Any) -> None:
        claim = current_run.get()
        run_id = claim.run_id if claim is not None else None
        if claim is not None:
            trace.metadata = {
                **(trace.metadata or {}),
                "run_id": claim.run_id,
                "attempt": claim.attempt,
            }
            if trace.group_id is None:
                trace.group_id = claim.run_id
        self._open[trace.trace_id] = (run_id, datetime.now(UTC))

    def on_trace_end(self, trace: Any) -> None:
        run_id, started = self._open.pop(trace.trace_id, (None, None))
        meta = trace.metadata or {}
        self._traces.append(
            {
                "id": trace.trace_id,
                "run_id": run_id,
                "attempt": meta.get("attempt"),
                "workflow_name": str(trace.name)[:255],
                "group_id": trace.group_id,
                "metadata": self.redactor(json.dumps(meta, default=str)) if meta else None,
                "started_at": started,
                "ended_at": datetime.now(UTC),
            }
        )
        self._trim()

    def on_span_start(self, span: Any) -> None:
        return None

    def on_span_end(self, span: Any) -> None:
        exported = span.export()
        if exported is None:
            return
        data = exported.get("span_data") or {}
        run_id = self._open.get(span.trace_id, (None,))[0]
        if run_id is None:
            claim = current_run.get()
            run_id = claim.run_id if claim is not None else None
        started = _moment(exported.get("started_at"))
        ended = _moment(exported.get("ended_at"))
        input_tokens, output_tokens = _tokens(data.get("usage"))
        payload = json.dumps(data, default=str)
        if len(payload) > MAX_DATA_CHARS:
            payload = json.dumps({"type": data.get("type"), "truncated": len(payload)})
        error = exported.get("error")
        self._spans.append(
            {
                "id": span.span_id,
                "trace_id": span.trace_id,
                "run_id": run_id,
                "parent_id": exported.get("parent_id"),
                "kind": str(data.get("type") or "unknown")[:50],
                "name": _span_name(data),
                "started_at": started,
                "ended_at": ended,
                "duration_ms": (ended - started).total_seconds() * 1000.0
                if started and ended
                else None,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "data": self.redactor(payload),
                "error": self.redactor(json.dumps(error, default=str)) if error else None,
            }
        )

    def shutdown(self) -> None:
        return None

    def force_flush(self) -> None:
        # Writing needs the engine's loop; the flush task and close() do it there.
        return None

    # Writing (on the engine's loop).

    def start(self) -> None:
        self._closing = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._serve(self._closing))

    async def _serve(self, closing: asyncio.Event) -> None:
        # Never cancelled mid-write: close() asks, and the last pass writes what is left.
        while not closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), self.flush_interval)
            await self.flush()

    async def flush(self) -> None:
        """Write every buffered trace and span in one transaction."""
        if not self._traces and not self._spans:
            return
        trace_rows, self._traces = self._traces, []
        span_rows, self._spans = self._spans, []
        try:
            async with self.engine.begin() as conn:
                if trace_rows:
                    await conn.execute(_insert(conn.dialect.name, traces), trace_rows)
                if span_rows:
                    await conn.execute(_insert(conn.dialect.name, spans), span_rows)
        except Exception as exc:  # noqa: BLE001 - logged; retried at the next flush
            # Keep them for the next flush; a trace is worth less than the run it describes.
            self._traces[:0] = trace_rows
            self._spans[:0] = span_rows
            self._trim()
            logger.warning(
                "cannot store traces yet: %s",
                exc,
                extra={"action": "trace_store_failed", "buffered_spans": len(self._spans)},
            )
            return
        self.written_traces += len(trace_rows)
        self.written_spans += len(span_rows)

    def _trim(self) -> None:
        excess = len(self._traces) + len(self._spans) - MAX_BUFFERED_ROWS
        if excess > 0:
            del self._spans[: min(excess, len(self._spans))]
            del self._traces[: max(0, excess - len(self._spans))]

    async def close(self) -> None:
        """Write what is buffered and stop the flush task."""
        if self._task is not None and self._closing is not None:
            self._closing.set()
            with contextlib.suppress(Exception):
                await self._task
        else:
            await self.flush()


def _insert(dialect: str, table: Table) -> Any:
    # A write whose commit was not confirmed is retried: rows already stored are skipped.
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing(index_elements=["id"])


def install_tracing(recorder: TraceRecorder | None, export_to_openai: bool) -> None:
    """Make ``recorder`` (and OpenAI's exporter, only if asked) the process's trace processors."""
    from agents.tracing import TracingProcessor, set_trace_processors

    processors: list[Any] = []
    if recorder is not None:
        TracingProcessor.register(TraceRecorder)
        processors.append(recorder)
    if export_to_openai:
        from agents.tracing.processors import default_processor

        processors.append(default_processor())
    set_trace_processors(processors)


def load_traces(engine: Engine, run_id: str) -> list[dict[str, Any]]:
    """The stored traces of a run, oldest first, each with its spans in start order."""
    with engine.connect() as conn:
        trace_rows = conn.execute(
            select(traces).where(traces.c.run_id == run_id).order_by(traces.c.started_at)
        ).mappings()
        found = [dict(row) for row in trace_rows]
        span_rows = conn.execute(
            select(spans).where(spans.c.run_id == run_id).order_by(spans.c.started_at)
        ).mappings()
        by_trace: dict[str, list[dict[str, Any]]] = {t["id"]: [] for t in found}
        for row in span_rows:
            span = dict(row)
            span["data"] = json.loads(span["data"]) if span["data"] else None
            span["error"] = json.loads(span["error"]) if span["error"] else None
            by_trace.setdefault(span["trace_id"], []).append(span)
    for trace in found:
        trace["metadata"] = json.loads(trace["metadata"]) if trace["metadata"] else None
        trace["spans"] = by_trace.get(trace["id"], [])
    return found


def format_traces(found: Sequence[dict[str, Any]]) -> str:
    """Traces as indented span trees: kind, name, duration, tokens, error."""
    lines: list[str] = []
    for trace in found:
        lines.append(
            f"trace {trace['id']}  attempt {trace['attempt']}  {trace['workflow_name'] or ''}"
        )
        children: dict[str | None, list[dict[str, Any]]] = {}
        ids = {span["id"] for span in trace["spans"]}
        for span in trace["spans"]:
            parent = span["parent_id"] if span["parent_id"] in ids else None
            children.setdefault(parent, []).append(span)

        def walk(
            parent: str | None, depth: int, children: dict[str | None, list[dict[str, Any]]]
        ) -> None:
            for span in children.get(parent, []):
                cells = [f"{'  ' * depth}{span['kind']}"]
                if span["name"]:
                    cells.append(str(span["name"]))
                if span["duration_ms"] is not None:
                    cells.append(f"{span['duration_ms']:.1f} ms")
                if span["input_tokens"] is not None or span["output_tokens"] is not None:
                    cells.append(
                        f"tokens {span['input_tokens'] or 0} in / {span['output_tokens'] or 0} out"
                    )
                if span["error"]:
                    error = span["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    cells.append(f"error: {message}")
                lines.append("  " + "  ".join(cells))
                walk(span["id"], depth + 1, children)

        walk(None, 0, children)
        if not trace["spans"]:
            lines.append("  (no spans)")
    return "\n".join(lines)
