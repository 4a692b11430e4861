"""The execution engine in real worker processes: overlap, priorities, autoscaling, shutdown.

Each test starts ``agentq worker`` subprocesses against the machine's Redis and Postgres and
watches them from outside, as an operator would: through the stored runs, the mock model's
view of the requests it served, Celery's remote control (what Flower shows and uses) and the
workers' JSON log records.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agentq.client import Client
from agentq.testing import MockOpenAIServer
from tests.integration.waiting import broker_drained, wait_for

pytestmark = pytest.mark.integration


def _log_records(log: str, action: str) -> list[dict[str, Any]]:
    """The worker's JSON log records with this ``action`` (other output is skipped)."""
    records = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("action") == action:
            records.append(record)
    return records


def _pool_info(client: Client, hostname: str) -> dict[str, Any]:
    """The worker's pool as ``celery inspect stats`` (and Flower) report it."""
    replies = client.celery.control.inspect([hostname], timeout=2).stats() or {}
    stats = replies.get(hostname)
    assert stats is not None, f"{hostname} did not answer inspect stats"
    pool: dict[str, Any] = stats["pool"]
    return pool


def _most_at_once(runs: list[Any]) -> int:
    """The most runs whose stored [started_at, finished_at) spans overlap at one instant."""
    edges = sorted(
        [(run.started_at, 1) for run in runs] + [(run.finished_at, -1) for run in runs],
        key=lambda edge: (edge[0], edge[1]),
    )
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def test_one_process_keeps_two_hundred_runs_in_flight_at_once(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    runs_count, latency_s = 200, 1.0
    mock_model.configure(latency_ms=latency_s * 1000)
    # The default reserve keeps 20 of the 200 slots for high priority: 180 for these runs.
    worker = start_worker(args=["--concurrency", str(runs_count)])
    general_slots = runs_count - 20
    assert _pool_info(client, worker.hostname)["max-concurrency"] == runs_count

    started = time.monotonic()
    handles = client.submit_many(
        [{"agent": "calculator", "input": f"What is {i} plus 1?"} for i in range(runs_count)]
    )
    # While most runs wait on the model, their slots are parked on the consumer's thread:
    # the process holds no thread per run, and still answers Flower's inspect at once.
    wait_for(lambda: mock_model.stats()["in_flight"] > runs_count // 2, 30, "runs in flight")
    pool = _pool_info(client, worker.hostname)
    threads = len(os.listdir(f"/proc/{worker.pid}/task"))
    runs = client.wait_many([h.id for h in handles], timeout=60)
    wall_s = time.monotonic() - started

    assert pool["parked-runs"] > runs_count // 2
    assert pool["in-flight"] >= pool["parked-runs"]
    assert threads < runs_count // 4, f"{threads} threads for {pool['in-flight']} runs"

    assert [run.status.value for run in runs] == ["succeeded"] * runs_count
    assert {run.worker for run in runs} == {f"{os.uname().nodename}:{worker.pid}"}
    assert all(run.attempts == 1 for run in runs)
    stats = mock_model.stats()
    # Two model calls per run (ask for the tool, answer with its result).
    assert stats["total_requests"] == 2 * runs_count
    assert runs_count // 2 < stats["max_in_flight"] <= general_slots
    assert runs_count // 2 < _most_at_once(runs) <= general_slots
    # One run at a time would take runs x 2 calls x latency = 400 s.
    assert wall_s < runs_count * 2 * latency_s / 10


def test_a_single_slot_takes_its_next_run_as_soon_as_the_last_one_finishes(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    # With its only slot busy the worker has no BRPOP in flight; finishing the run must
    # acknowledge it and fetch the next one at once, not when the consumer's loop next wakes
    # on its own (a second later).
    start_worker(args=["--concurrency", "1"])
    handles = client.submit_many([{"agent": "echo", "input": f"message {i}"} for i in range(15)])
    runs = client.wait_many([h.id for h in handles], timeout=60)

    assert [run.status.value for run in runs] == ["succeeded"] * 15
    assert _most_at_once(runs) == 1
    ordered = sorted(runs, key=lambda run: run.started_at)
    gaps = sorted(
        (after.started_at - before.finished_at).total_seconds()
        for before, after in itertools.pairwise(ordered)
    )
    assert gaps[len(gaps) // 2] < 0.3, f"idle between runs: {gaps}"


def test_high_priority_runs_overtake_a_backlog_of_low_ones(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    backlog, latency_s = 300, 1.0
    mock_model.configure(latency_ms=latency_s * 1000)
    # Four slots, one of them kept for high priority (a tenth, rounded up to one slot).
    start_worker(extra_env={"AGENTQ_HIGH_PRIORITY_RESERVE": "0.1"}, args=["--concurrency", "4"])
    general_slots = 3
    lows = client.submit_many(
        [{"agent": "echo", "input": f"low {i}", "priority": "low"} for i in range(backlog)]
    )
    low_ids = [h.id for h in lows]
    wait_for(
        lambda: sum(run.finished for run in client.store.get_many(low_ids)) >= general_slots,
        30,
        "the backlog to be under way",
    )

    def general_slots_just_filled() -> bool:
        stats = mock_model.stats()
        newest = sorted(stats["request_timestamps"])[-general_slots:]
        return stats["in_flight"] == general_slots and time.time() - newest[0] < 0.4

    # Every general slot has most of a model call still to go: only the reserve can start a
    # high run before one of them frees.
    wait_for(general_slots_just_filled, 30, "the low runs to fill the general slots")
    first = client.submit("echo", "urgent", priority="high").wait(timeout=30)
    low_runs = client.store.get_many(low_ids)
    alongside = [
        run
        for run in low_runs
        if run.started_at is not None
        and run.started_at <= first.started_at
        and (run.finished_at is None or run.finished_at > first.started_at)
    ]
    assert first.status.value == "succeeded"
    assert len(alongside) == general_slots
    assert first.queue_ms is not None and first.queue_ms < latency_s * 1000 / 2

    # A burst of high runs takes the reserve and then every general slot that frees.
    highs = client.submit_many(
        [{"agent": "echo", "input": f"high {i}", "priority": "high"} for i in range(6)]
    )
    high_runs = client.wait_many([h.id for h in highs], timeout=30)
    low_runs = client.store.get_many(low_ids)

    assert [run.status.value for run in high_runs] == ["succeeded"] * 6
    burst_at = min(run.created_at for run in high_runs if run.created_at)
    last_high_start = max(run.started_at for run in high_runs if run.started_at)
    lows_started_meanwhile = sum(
        run.started_at is not None and burst_at <= run.started_at <= last_high_start
        for run in low_runs
    )
    queued_lows = sum(run.status.value == "queued" for run in low_runs)
    queue_ms = sorted(run.queue_ms or 0 for run in high_runs)
    # A low message taken just before the burst was published may still start.
    assert lows_started_meanwhile <= general_slots
    assert queued_lows > backlog / 2
    # Six high runs on four slots: two rounds of a run at most, not the backlog's 100 s.
    assert max(queue_ms) < 3 * latency_s * 1000


def _autoscaler_info(client: Client, hostname: str) -> dict[str, Any]:
    replies = client.celery.control.inspect([hostname], timeout=2).stats() or {}
    info: dict[str, Any] = replies[hostname]["autoscaler"]
    return info


def test_a_worker_grows_with_its_backlog_and_shrinks_back_when_idle(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    runs_count, latency_s = 150, 1.0
    mock_model.configure(latency_ms=latency_s * 1000)
    worker = start_worker(
        extra_env={"AGENTQ_AUTOSCALE_IDLE": "2", "AGENTQ_AUTOSCALE_INTERVAL": "0.5"},
        args=["--min-concurrency", "2", "--concurrency", "50"],
    )
    assert _pool_info(client, worker.hostname)["max-concurrency"] == 2

    handles = client.submit_many(
        [{"agent": "echo", "input": f"run {i}"} for i in range(runs_count)]
    )
    sizes = []
    deadline = time.monotonic() + 60
    while not all(run.finished for run in client.store.get_many([h.id for h in handles])):
        assert time.monotonic() < deadline, "the backlog did not drain in 60 s"
        sizes.append(_pool_info(client, worker.hostname)["max-concurrency"])
        time.sleep(0.2)
    runs = client.wait_many([h.id for h in handles], timeout=5)
    busy_peak = mock_model.stats()["max_in_flight"]
    wait_for(
        lambda: _pool_info(client, worker.hostname)["max-concurrency"] == 2,
        20,
        "the pool to shrink back to its minimum",
    )

    assert [run.status.value for run in runs] == ["succeeded"] * runs_count
    assert all(run.attempts == 1 for run in runs)
    stats = mock_model.stats()
    assert stats["total_requests"] == runs_count
    assert stats["requests_by_status"] == {"200": runs_count}
    assert max(sizes) == 50
    # Far more than the two slots it started with, never more than the 45 of its 50 slots
    # that the default reserve leaves to normal priority.
    assert 10 < busy_peak <= 45
    scaled = _log_records(worker.log(), "worker_scaled")
    assert scaled[0]["direction"] == "up" and scaled[0]["slots_before"] == 2
    assert max(record["slots"] for record in scaled) == 50
    assert scaled[-1]["direction"] == "down" and scaled[-1]["slots"] == 2
    autoscaler = _autoscaler_info(client, worker.hostname)
    assert (autoscaler["min"], autoscaler["max"], autoscaler["current"]) == (2, 50, 2)

    # Flower's autoscale control moves the bounds; raising the minimum grows the pool at once.
    replies = client.celery.control.autoscale(
        10, 4, destination=[worker.hostname], reply=True, timeout=5
    )
    assert replies == [{worker.hostname: {"ok": "autoscale now max=10 min=4"}}]
    autoscaler = _autoscaler_info(client, worker.hostname)
    assert (autoscaler["min"], autoscaler["max"], autoscaler["current"]) == (4, 10, 4)
    assert _pool_info(client, worker.hostname)["max-concurrency"] == 4


def test_flowers_pool_controls_resize_a_fixed_size_worker(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    latency_s = 1.0
    mock_model.configure(latency_ms=latency_s * 1000)
    # No reserve, so every slot is open to the normal-priority runs used to count them.
    worker = start_worker(
        extra_env={"AGENTQ_HIGH_PRIORITY_RESERVE": "0"}, args=["--concurrency", "4"]
    )
    control = client.celery.control
    assert _pool_info(client, worker.hostname)["max-concurrency"] == 4

    def peak_in_flight(runs_count: int) -> int:
        mock_model.reset()
        handles = client.submit_many(
            [{"agent": "echo", "input": f"run {i}"} for i in range(runs_count)]
        )
        runs = client.wait_many([h.id for h in handles], timeout=30)
        assert [run.status.value for run in runs] == ["succeeded"] * runs_count
        return int(mock_model.stats()["max_in_flight"])

    grown = control.pool_grow(3, destination=[worker.hostname], reply=True, timeout=5)
    assert grown == [{worker.hostname: {"ok": "pool will grow"}}]
    assert _pool_info(client, worker.hostname)["max-concurrency"] == 7
    assert peak_in_flight(14) == 7

    shrunk = control.pool_shrink(4, destination=[worker.hostname], reply=True, timeout=5)
    assert shrunk == [{worker.hostname: {"ok": "pool will shrink"}}]
    assert _pool_info(client, worker.hostname)["max-concurrency"] == 3
    assert peak_in_flight(9) == 3


SHUTDOWN_ENV = {"AGENTQ_HIGH_PRIORITY_RESERVE": "0"}


def test_sigterm_lets_runs_that_fit_in_the_grace_period_finish(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, redis_url: str
) -> None:
    slots, waiting, latency_s = 8, 4, 1.0
    mock_model.configure(latency_ms=latency_s * 1000)
    worker = start_worker(
        extra_env=SHUTDOWN_ENV, args=["--concurrency", str(slots), "--shutdown-grace", "20"]
    )
    handles = client.submit_many(
        [{"agent": "calculator", "input": f"What is {i} plus 1?"} for i in range(slots)]
    )
    wait_for(lambda: mock_model.stats()["in_flight"] == slots, 30, "every run's first model call")
    # Runs still in the queue when the signal comes are left there for other workers.
    later = client.submit_many(
        [{"agent": "calculator", "input": f"What is {i} plus 2?"} for i in range(waiting)]
    )

    signalled = time.monotonic()
    assert worker.terminate(timeout=30) == 0
    exited_s = time.monotonic() - signalled
    runs = client.wait_many([h.id for h in handles], timeout=5)

    assert [run.status.value for run in runs] == ["succeeded"] * slots
    assert {run.worker for run in runs} == {runs[0].worker}
    assert all(run.attempts == 1 for run in runs)
    assert mock_model.stats()["total_requests"] == 2 * slots
    left = client.store.get_many([h.id for h in later])
    assert [(run.status.value, run.attempts) for run in left] == [("queued", 0)] * waiting
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen("agentq.normal") == waiting
    assert broker.hlen("unacked") == 0
    # It left as soon as its runs were done (one more model call each), not after the grace.
    assert exited_s < 10


def test_sigterm_hands_runs_longer_than_the_grace_period_to_another_worker(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, redis_url: str
) -> None:
    runs_count = 8
    # Far longer than the grace period and the worker's exit take together.
    mock_model.configure(latency_ms=5000)
    args = ["--concurrency", str(runs_count), "--shutdown-grace", "0.5"]
    first = start_worker(extra_env=SHUTDOWN_ENV, args=args)
    handles = client.submit_many(
        [{"agent": "calculator", "input": f"What is {i} plus 1?"} for i in range(runs_count)]
    )
    run_ids = [h.id for h in handles]
    wait_for(
        lambda: mock_model.stats()["in_flight"] == runs_count, 30, "every run's first model call"
    )

    assert first.terminate(timeout=30) == 0
    at_exit = mock_model.stats()
    handed_back = client.store.get_many(run_ids)
    # The process is gone before any of its runs' first model calls was answered: none of
    # them can have taken effect, and each run is left to do over from the start.
    assert at_exit["total_requests"] == runs_count
    assert at_exit["requests_by_status"] == {}
    draining = _log_records(first.log(), "worker_draining")
    assert [(r["in_flight"], r["grace_s"]) for r in draining] == [(runs_count, 0.5)]
    handed_back_ids = {r["run_id"] for r in _log_records(first.log(), "run_handed_back")}
    assert handed_back_ids == set(run_ids)
    # Given back as they were before the first worker took them, so another takes them at
    # once rather than after their lease lapses, and the cut-off attempt does not count.
    assert [run.status.value for run in handed_back] == ["queued"] * runs_count
    assert all(run.attempts == 0 and run.worker is None for run in handed_back)

    mock_model.configure(latency_ms=200)
    second = start_worker(extra_env=SHUTDOWN_ENV, args=args)
    runs = client.wait_many(run_ids, timeout=30)
    wait_for(lambda: broker_drained(redis_url), 30, "every delivery to be acknowledged")

    assert [run.status.value for run in runs] == ["succeeded"] * runs_count
    assert all(run.worker is not None and run.worker.endswith(f":{second.pid}") for run in runs)
    assert all(run.attempts == 1 and run.usage.requests == 2 for run in runs)
    # The cut-off first calls, then each run's two calls on the second worker, and no more:
    # no run is executed again once it has succeeded.
    time.sleep(1)
    assert mock_model.stats()["total_requests"] == runs_count + 2 * runs_count
    finished_at = {run.id: run.finished_at for run in runs}
    assert {run.id: run.finished_at for run in client.store.get_many(run_ids)} == finished_at


def test_a_remote_shutdown_also_hands_back_what_outlasts_the_grace_period(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, redis_url: str
) -> None:
    # Flower's "shut down" button and `celery control shutdown` send no signal to the process:
    # the grace period must hold for them as for SIGTERM.
    runs_count = 4
    mock_model.configure(latency_ms=5000)
    args = ["--concurrency", str(runs_count), "--shutdown-grace", "0.5"]
    first = start_worker(extra_env=SHUTDOWN_ENV, args=args)
    handles = client.submit_many(
        [{"agent": "echo", "input": f"message {i}"} for i in range(runs_count)]
    )
    run_ids = [h.id for h in handles]
    wait_for(lambda: mock_model.stats()["in_flight"] == runs_count, 30, "every model call")

    client.celery.control.shutdown(destination=[first.hostname])
    started = time.monotonic()
    assert first.process.wait(30) == 0
    # Gone long before the model would have answered: the runs were handed back, not awaited.
    assert time.monotonic() - started < 4.5
    assert mock_model.stats()["requests_by_status"] == {}
    handed_back = client.store.get_many(run_ids)
    assert [(run.status.value, run.attempts) for run in handed_back] == [("queued", 0)] * 4

    mock_model.configure(latency_ms=50)
    start_worker(extra_env=SHUTDOWN_ENV, args=args)
    runs = client.wait_many(run_ids, timeout=30)
    assert [run.status.value for run in runs] == ["succeeded"] * runs_count
    assert all(run.attempts == 1 for run in runs)
    wait_for(lambda: broker_drained(redis_url), 30, "every delivery to be acknowledged")


def _child_pids(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(n) for n in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []
    return children


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # A zombie has exited; it only waits for its parent to collect its status.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Supervised:
    """An ``agentq worker --processes 2`` parent and the worker processes it starts."""

    def __init__(self, parent: Any) -> None:
        self.parent = parent
        self.seen: set[int] = set()

    def children(self) -> list[int]:
        pids = _child_pids(self.parent.pid)
        self.seen.update(pids)
        return pids

    def hostnames(self, client: Client) -> dict[int, str]:
        """Its two children, once both answer ping, with their Celery hostnames."""
        wait_for(lambda: len(self.children()) == 2, 30, "two worker processes")
        node = os.uname().nodename
        names = {pid: f"agentq@{node}.{pid}" for pid in self.children()}

        def answering() -> set[str]:
            replies = client.celery.control.ping(destination=list(names.values()), timeout=0.5)
            return {name for reply in replies for name in reply}

        wait_for(lambda: answering() == set(names.values()), 60, "the workers to answer ping")
        return names


@pytest.fixture
def start_supervisor(start_worker: Any) -> Iterator[Callable[[list[str]], Supervised]]:
    started: list[Supervised] = []

    def start(args: list[str]) -> Supervised:
        parent = start_worker(extra_env=SHUTDOWN_ENV, args=["--processes", "2", *args], wait=False)
        started.append(Supervised(parent))
        return started[-1]

    yield start
    for supervised in started:
        supervised.children()
        with contextlib.suppress(Exception):
            supervised.parent.terminate(timeout=30)
        # Left behind by a parent that could not pass the signal on.
        for pid in supervised.seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_supervisor_runs_two_workers_and_drains_both_on_sigterm(
    client: Client, start_supervisor: Any, mock_model: MockOpenAIServer, redis_url: str
) -> None:
    slots = 4
    mock_model.configure(latency_ms=1000)
    supervised = start_supervisor(["--concurrency", str(slots), "--shutdown-grace", "20"])
    children = supervised.hostnames(client)
    handles = client.submit_many(
        [{"agent": "calculator", "input": f"What is {i} plus 3?"} for i in range(2 * slots)]
    )
    # Each process holds no more runs than its slots, so both are busy.
    wait_for(lambda: mock_model.stats()["in_flight"] == 2 * slots, 30, "both processes' runs")

    assert supervised.parent.terminate(timeout=30) == 0
    assert not any(_alive(pid) for pid in children)
    runs = client.wait_many([h.id for h in handles], timeout=5)
    assert [run.status.value for run in runs] == ["succeeded"] * 2 * slots
    node = os.uname().nodename
    assert {run.worker for run in runs} == {f"{node}:{pid}" for pid in children}
    assert all(run.attempts == 1 for run in runs)
    assert mock_model.stats()["total_requests"] == 2 * 2 * slots
    assert broker_drained(redis_url)


def test_a_supervisor_replaces_a_worker_that_dies_and_reports_one_killed_while_draining(
    client: Client, start_supervisor: Any, mock_model: MockOpenAIServer
) -> None:
    supervised = start_supervisor(["--concurrency", "2", "--shutdown-grace", "20"])
    victim, survivor = supervised.hostnames(client)
    os.kill(victim, signal.SIGKILL)

    replaced = wait_for(
        lambda: set(supervised.children()) - {victim, survivor}, 30, "a new worker process"
    )
    children = supervised.hostnames(client)
    assert set(children) == {survivor, *replaced}
    restarted = _log_records(supervised.parent.log(), "worker_process_restarted")
    assert [(r["pid"], r["exit_code"]) for r in restarted] == [(victim, -signal.SIGKILL)]

    # A drain cut short by a crash is not a clean exit: the parent's status says so.
    mock_model.configure(latency_ms=2000)
    client.submit_many([{"agent": "echo", "input": f"run {i}"} for i in range(4)])
    wait_for(lambda: mock_model.stats()["in_flight"] == 4, 30, "both processes' runs")
    supervised.parent.process.send_signal(signal.SIGTERM)
    os.kill(survivor, signal.SIGKILL)
    assert supervised.parent.terminate(timeout=30) == 128 + signal.SIGKILL


def test_flower_switches_task_events_on_and_sees_each_run(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    # Workers send no task events until someone watches; Flower sends enable_events.
    worker = start_worker()
    seen: dict[str, list[str]] = {}

    def on_event(event: dict[str, Any]) -> None:
        seen.setdefault(event.get("uuid", ""), []).append(event["type"])

    app = client.celery
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": on_event})
        capture = threading.Thread(
            target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True
        )
        capture.start()
        time.sleep(0.5)
        unwatched = client.submit("echo", "nobody is looking").wait(timeout=30)
        time.sleep(0.5)
        assert unwatched.id not in seen

        replies = app.control.enable_events(destination=[worker.hostname], reply=True)
        assert replies and "ok" in next(iter(replies[0].values()))
        watched = client.submit("echo", "Flower is looking").wait(timeout=30)
        wait_for(lambda: "task-succeeded" in seen.get(watched.id, []), 10, "the run's events")
        receiver.should_stop = True
    assert {"task-received", "task-started", "task-succeeded"} <= set(seen[watched.id])
