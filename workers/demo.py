"""``agentq demo``: the whole path of agent runs, in one process, on embedded defaults.

With nothing configured it stores runs in SQLite, passes messages through Celery's in-memory
broker and answers with the offline model; with ``REDIS_URL``, ``DATABASE_URL`` or
``OPENAI_API_KEY`` set it uses those instead. A real Celery worker consumes the three priority
queues in this process while the demo submits runs, shows progress and prints a summary.
"""

from __future__ import annotations

import logging
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from agentq.app import make_celery
from agentq.client import Client
from agentq.config import Settings
from agentq.registry import registry
from agentq.run import PRIORITY_ORDER, Run, RunStatus
from agentq.store import migrate
from workers.worker import WorkerProcess

DEFAULT_DEMO_LATENCY_MS = 150.0
PROGRESS_INTERVAL = 0.5

QUESTIONS = (
    "What are your opening hours?",
    "How do I reset my password?",
    "Can I change the delivery address?",
    "Do you ship to Norway?",
    "How long do refunds take?",
    "Is there a student discount?",
)
ORDERS = ("A-1001", "B-2002", "C-3003", "D-4004", "E-5005", "F-6006")


def demo_items(count: int) -> list[dict[str, str]]:
    """Runs of both example agents spread evenly over the three priorities."""
    items = []
    for index in range(count):
        priority = PRIORITY_ORDER[index % len(PRIORITY_ORDER)].value
        if index % 2:
            order = ORDERS[index % len(ORDERS)]
            items.append(
                {"agent": "support", "input": f"Where is my order {order}?", "priority": priority}
            )
        else:
            question = QUESTIONS[index % len(QUESTIONS)]
            items.append({"agent": "assistant", "input": question, "priority": priority})
    return items


def percentile(values: Sequence[float], fraction: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[min(98, max(0, round(fraction * 100) - 1))]


def summary_table(runs: Sequence[Run]) -> str:
    header = (
        "priority",
        "runs",
        "succeeded",
        "failed",
        "other",
        "p50 ms",
        "p95 ms",
        "queue p50 ms",
        "tokens",
    )
    rows: list[tuple[str, ...]] = []
    groups = [(p.value, [r for r in runs if r.priority is p]) for p in PRIORITY_ORDER]
    groups.append(("all", list(runs)))
    for name, group in groups:
        latencies = [r.duration_ms for r in group if r.duration_ms is not None]
        waits = [r.queue_ms for r in group if r.queue_ms is not None]
        succeeded = sum(r.status is RunStatus.SUCCEEDED for r in group)
        failed = sum(r.status is RunStatus.FAILED for r in group)
        rows.append(
            (
                name,
                str(len(group)),
                str(succeeded),
                str(failed),
                str(len(group) - succeeded - failed),
                _fmt(percentile(latencies, 0.50)),
                _fmt(percentile(latencies, 0.95)),
                _fmt(percentile(waits, 0.50)),
                str(sum(r.usage.total_tokens for r in group)),
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows[:-1]), rule, line(rows[-1])])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


class Progress:
    """One status line, redrawn in place on a terminal and printed periodically otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.tty = out.isatty()
        self._last = ""

    def show(self, runs: Sequence[Run], elapsed: float) -> None:
        counts = {status: 0 for status in RunStatus}
        for run in runs:
            counts[run.status] += 1
        done = sum(counts[s] for s in RunStatus if s.finished)
        text = (
            f"[{done:>{len(str(self.total))}}/{self.total}] {elapsed:5.1f}s  "
            f"queued {counts[RunStatus.QUEUED]}  running {counts[RunStatus.RUNNING]}  "
            f"succeeded {counts[RunStatus.SUCCEEDED]}  failed {counts[RunStatus.FAILED]}"
        )
        if text == self._last:
            return
        self._last = text
        self.out.write(("\r" + text) if self.tty else text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")


def run_demo(
    settings: Settings,
    *,
    runs: int = 36,
    latency_ms: float | None = None,
    timeout: float = 300.0,
    out: TextIO = sys.stdout,
) -> int:
    if runs <= 0:
        out.write("--runs must be positive\n")
        return 2
    if settings.uses_offline_model:
        latency = (
            latency_ms
            if latency_ms is not None
            else (settings.offline_latency_ms or DEFAULT_DEMO_LATENCY_MS)
        )
        settings = settings.model_copy(update={"offline_latency_ms": latency})
    if settings.log_level != "debug":
        # The worker's per-task lines would bury the progress line; the summary says the same
        # as the runs' agent_execution records.
        logging.getLogger("celery").setLevel(logging.WARNING)
        logging.getLogger("agentq.runs").setLevel(logging.WARNING)

    migrate(settings.sync_database_url)
    app = make_celery(settings)
    process = WorkerProcess(settings, registry, app=app)
    out.write(
        f"agentq demo: {runs} runs of {', '.join(registry.names())} | "
        f"broker {'in-memory' if settings.embedded else 'redis'} | "
        f"store {settings.sync_database_url.split(':', 1)[0]} | "
        f"model {'offline' if settings.uses_offline_model else settings.default_model}\n"
    )
    process.start_engine()
    worker = app.WorkController(**process.worker_options())
    consumer = threading.Thread(target=worker.start, name="agentq-demo-worker", daemon=True)
    consumer.start()
    client = Client(settings, celery_app=app)
    try:
        started = time.monotonic()
        handles = client.submit_many(demo_items(runs))
        ids = [handle.id for handle in handles]
        progress = Progress(out, len(ids))
        deadline = started + timeout
        while True:
            current = client.store.get_many(ids)
            progress.show(current, time.monotonic() - started)
            if all(run.finished for run in current) or time.monotonic() > deadline:
                break
            time.sleep(PROGRESS_INTERVAL)
        progress.close()
        elapsed = time.monotonic() - started
        order = {run_id: index for index, run_id in enumerate(ids)}
        final = sorted(client.store.get_many(ids), key=lambda run: order[run.id])
    finally:
        worker.stop(in_sighandler=False)
        consumer.join(timeout=30)
        process.stop_engine()
        client.close()
    out.write("\n" + summary_table(final) + "\n\n")
    succeeded = sum(run.status is RunStatus.SUCCEEDED for run in final)
    out.write(f"{succeeded} of {len(final)} runs succeeded in {elapsed:.1f} s\n")
    for run in final:
        if run.status is not RunStatus.SUCCEEDED:
            out.write(f"  {run.id} {run.agent} {run.status.value}: {run.error_type} {run.error}\n")
    return 0 if succeeded == len(final) else 1
