"""Beat's jobs against real Redis, Postgres, worker and Beat processes.

Intervals are shortened through the environment (seconds instead of the guide's 15-60 s), and
the "stopped database" is a real PostgreSQL cluster of the test's own, stopped and started
again with ``pg_ctl``.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import text

from agentq.client import Client
from agentq.rollup import minute_of, percentile
from tests.integration.conftest import ROOT
from tests.integration.waiting import wait_for

pytestmark = pytest.mark.integration

FAST = {
    "AGENTQ_HEALTH__DATABASE_INTERVAL": "1",
    "AGENTQ_HEALTH__DATABASE_TIMEOUT": "2",
    "AGENTQ_HEALTH__MEMORY_INTERVAL": "1",
    "AGENTQ_HEALTH__MODEL_INTERVAL": "2",
    "AGENTQ_HEALTH__BROKER_INTERVAL": "2",
    "AGENTQ_HEALTH__WORKERS_INTERVAL": "2",
    "AGENTQ_BEAT__ROLLUP_INTERVAL": "1",
    "AGENTQ_BEAT__SWEEP_INTERVAL": "1",
    "AGENTQ_BEAT__SWEEP_QUEUED_AFTER": "0",
    "AGENTQ_WORKER_CONCURRENCY": "8",
}


class BeatHandle:
    """A real ``agentq beat`` subprocess."""

    def __init__(self, env: Mapping[str, str], directory: Path, index: int) -> None:
        full_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AGENTQ_", "OPENAI_"))
        }
        full_env.update(env)
        full_env["PYTHONPATH"] = str(ROOT)
        full_env["PYTHONUNBUFFERED"] = "1"
        self.log_path = directory / f"beat-{index}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentq",
                "beat",
                "--schedule-file",
                str(directory / f"beat-{index}.schedule"),
            ],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.fixture
def db(postgres_url: str) -> Iterator[sqlalchemy.Engine]:
    engine = sqlalchemy.create_engine(
        postgres_url.replace("postgresql://", "postgresql+psycopg://")
    )
    tables = ("health_checks", "health_state", "health_transitions", "metric_rollups", "batches")
    with engine.begin() as conn:
        for table in tables:
            conn.execute(text(f"DELETE FROM {table}"))
    yield engine
    engine.dispose()


@pytest.fixture
def start_beat(agentq_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    started: list[BeatHandle] = []

    def start(extra_env: Mapping[str, str] | None = None) -> BeatHandle:
        handle = BeatHandle({**agentq_env, **(extra_env or {})}, tmp_path, len(started))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


class Webhook:
    """An HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Cluster:
    """A throwaway PostgreSQL cluster on a free port, owned by the postgres system user."""

    def __init__(self, directory: Path) -> None:
        bindir = _pg_bindir()
        self.pg_ctl = str(bindir / "pg_ctl")
        self.directory = directory
        self.data = directory / "data"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, "postgres")
        self._as_postgres(
            str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
        )
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        # The server's output goes to a file: on an inherited pipe, waiting for pg_ctl's
        # output would wait for the server to exit.
        log = str(self.directory / "server.log")
        self._as_postgres(
            self.pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "start"
        )

    def stop(self) -> None:
        self._as_postgres(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")


def _pg_bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    pytest.fail("initdb is not installed; this test needs a PostgreSQL server binary")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # Not under pytest's tmp_path: the postgres user must be able to reach the directory.
    directory = Path("/tmp") / f"agentq-pg-{os.getpid()}-{time.monotonic_ns()}"
    c = Cluster(directory)
    c.start()
    yield c
    with contextlib.suppress(Exception):
        c.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _rows(db: sqlalchemy.Engine, sql: str, **params: Any) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def _state(db: sqlalchemy.Engine) -> str | None:
    rows = _rows(db, "SELECT state FROM health_state WHERE name = 'overall'")
    return rows[0][0] if rows else None


def test_health_rows_on_schedule_and_one_alert_per_transition(
    client: Client, start_worker: Any, start_beat: Any, db: sqlalchemy.Engine, cluster: Cluster
) -> None:
    webhook = Webhook()
    try:
        env = {
            **FAST,
            "AGENTQ_HEALTH__DATABASE_URL": cluster.url,
            "AGENTQ_ALERT_WEBHOOK_URL": webhook.url,
        }
        start_worker(extra_env=env)
        start_worker(extra_env=env)
        start_beat(env)
        wait_for(lambda: _state(db) == "healthy", 40, "the first healthy state")
        checks = {row[0] for row in _rows(db, 'SELECT DISTINCT "check" FROM health_checks')}
        assert checks >= {"database", "model", "memory", "broker"}

        # Rows keep coming at the database check's 1 s interval.
        before = _rows(db, "SELECT count(*) FROM health_checks WHERE \"check\" = 'database'")[0][0]
        wait_for(
            lambda: (
                _rows(db, "SELECT count(*) FROM health_checks WHERE \"check\" = 'database'")[0][0]
                >= before + 3
            ),
            15,
            "three more database check rows",
        )
        assert webhook.received == []  # the first healthy evaluation is not an alert

        cluster.stop()
        wait_for(lambda: _state(db) == "degraded", 20, "the degraded state")
        wait_for(lambda: webhook.received, 10, "the degraded alert")
        failing = _rows(
            db,
            "SELECT error FROM health_checks WHERE \"check\" = 'database' AND NOT healthy "
            "ORDER BY checked_at DESC LIMIT 1",
        )
        assert failing
        time.sleep(3)  # several more failing checks: still one alert
        assert len(webhook.received) == 1
        alert = webhook.received[0]
        assert alert["previous"] == "healthy"
        assert alert["state"] == "degraded"
        assert set(alert["failing"]) == {"database"}

        cluster.start()
        wait_for(lambda: _state(db) == "healthy", 20, "recovery")
        wait_for(lambda: len(webhook.received) >= 2, 10, "the recovery alert")
        time.sleep(3)
        assert [a["state"] for a in webhook.received] == ["degraded", "healthy"]
        transitions = _rows(db, "SELECT previous, state FROM health_transitions ORDER BY id")
        assert [tuple(t) for t in transitions] == [
            ("unknown", "healthy"),
            ("healthy", "degraded"),
            ("degraded", "healthy"),
        ]
    finally:
        webhook.close()


def test_rollups_match_the_runs(
    client: Client, start_worker: Any, start_beat: Any, db: sqlalchemy.Engine, mock_model: Any
) -> None:
    mock_model.configure(latency_ms=20, input_tokens=30, output_tokens=7)
    start_worker(extra_env=FAST)
    handles = client.submit_many([{"agent": "echo", "input": f"hi {i}"} for i in range(12)])
    runs = client.wait_many([h.id for h in handles], timeout=60)
    assert all(r.status.value == "succeeded" for r in runs)
    start_beat(FAST)

    def stored() -> list[Any]:
        rows = _rows(db, "SELECT * FROM metric_rollups WHERE agent = 'echo' ORDER BY minute")
        return rows if sum(r.runs for r in rows) == len(runs) else []

    rollups = wait_for(stored, 40, "rollups covering every run")
    by_minute: dict[Any, list[Any]] = {}
    for run in runs:
        assert run.finished_at is not None
        by_minute.setdefault(minute_of(run.finished_at), []).append(run)
    assert [r.minute for r in rollups] == sorted(by_minute)
    for rollup in rollups:
        group = by_minute[rollup.minute]
        durations = [r.duration_ms for r in group if r.duration_ms is not None]
        assert rollup.runs == len(group)
        assert rollup.succeeded == len(group)
        assert rollup.failed == 0
        assert rollup.total_tokens == sum(r.usage.total_tokens for r in group)
        assert rollup.input_tokens == sum(r.usage.input_tokens for r in group)
        assert rollup.cache_hit_rate == 0.0
        for column, fraction in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            expected = percentile(durations, fraction)
            assert expected is not None
            assert getattr(rollup, column) == pytest.approx(expected, abs=1.0)

    out = subprocess.run(
        [sys.executable, "-m", "agentq", "stats", "--json"],
        env={**os.environ, **client_env(client)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = json.loads(out.stdout)
    assert sum(row["runs"] for row in listed if row["agent"] == "echo") == len(runs)


def client_env(client: Client) -> dict[str, str]:
    settings = client.settings
    assert settings.database_url is not None and settings.redis_url is not None
    return {
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "REDIS_URL": settings.redis_url.get_secret_value(),
    }


def test_the_sweeper_republishes_a_run_whose_message_was_lost(
    client: Client, start_worker: Any, start_beat: Any, redis_url: str, db: sqlalchemy.Engine
) -> None:
    import redis

    broker = redis.Redis.from_url(redis_url)
    handle = client.submit("echo", "lost in the broker")
    assert broker.llen("agentq.normal") == 1
    broker.delete("agentq.normal")  # the broker lost the message; the run stays queued
    start_worker(extra_env=FAST)
    time.sleep(2)
    assert client.get(handle.id).status.value == "queued"  # nothing else recovers it

    beat = start_beat(FAST)
    run = handle.wait(timeout=30)
    assert run.status.value == "succeeded"
    assert run.attempts == 1
    assert "Sending due task sweep" in beat.log()


def test_a_scheduled_batch_fires_once_per_period_with_two_beats(
    client: Client, start_worker: Any, start_beat: Any, db: sqlalchemy.Engine
) -> None:
    period = 2
    batches = [
        {"name": "digest", "every": period, "agent": "echo", "inputs": ["a", "b", "c"]},
    ]
    env = {**FAST, "AGENTQ_BATCHES": json.dumps(batches)}
    worker = start_worker(extra_env=env)
    first, second = start_beat(env), start_beat(env)
    wait_for(lambda: _rows(db, "SELECT id FROM batches"), 30, "a first batch")
    started = time.monotonic()
    time.sleep(4 * period)
    first.stop()
    second.stop()
    elapsed = time.monotonic() - started + period

    fired = _rows(db, "SELECT id, slot, size FROM batches WHERE schedule = 'digest' ORDER BY slot")
    slots = [row.slot for row in fired]
    assert len(slots) == len(set(slots))
    assert 2 <= len(fired) <= elapsed / period + 2
    # Slots are whole periods apart: never two batches within one period.
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(slots)]
    assert all(gap >= period and gap % period == 0 for gap in gaps), gaps
    for batch in fired:
        linked = _rows(db, "SELECT input FROM runs WHERE batch_id = :b", b=batch.id)
        assert sorted(r.input for r in linked) == ["a", "b", "c"]
    # Both Beats were live: each slot was offered twice and published once.
    assert "beat_slot_taken" in first.log() + second.log()
    wait_for(lambda: worker.log().count("Task agentq.beat.batch[") >= len(fired), 20, "batch tasks")
    time.sleep(1)
    executed = sum(
        1
        for line in worker.log().splitlines()
        if "agentq.beat.batch[" in line and "succeeded" in line
    )
    assert executed == len(fired)
