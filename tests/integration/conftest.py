"""Real services for integration tests: Postgres, Redis, the mock model, worker processes.

Each test session gets a database of its own on the machine's Postgres and a Redis database
number of its own, so sessions on one machine do not see each other's runs or messages.
Without the services the tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agentq.client import Client
from agentq.config import Settings, load_settings
from agentq.testing import MockOpenAIServer

ROOT = Path(__file__).resolve().parents[2]
REDIS_BASE = os.environ.get("AGENTQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
POSTGRES_BASE = os.environ.get("AGENTQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({exc}); integration tests need it"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    try:
        admin = redis.Redis.from_url(REDIS_BASE + "/0", socket_connect_timeout=2)
        number = int(admin.incr("agentq:test:db-counter")) % 15 + 1
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    url = f"{REDIS_BASE}/{number}"
    db = redis.Redis.from_url(url)
    db.flushdb()
    yield url
    db.flushdb()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    import psycopg

    name = f"agentq_it_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(POSTGRES_BASE + "/postgres", autocommit=True, connect_timeout=3) as c:
            c.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        _unavailable("PostgreSQL", exc)
    url = f"{POSTGRES_BASE}/{name}"
    from agentq.store import migrate

    migrate(url.replace("postgresql://", "postgresql+psycopg://", 1))
    yield url
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(POSTGRES_BASE + "/postgres", autocommit=True) as c,
    ):
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def model_server() -> Iterator[MockOpenAIServer]:
    with MockOpenAIServer() as server:
        yield server


@pytest.fixture
def mock_model(model_server: MockOpenAIServer) -> Iterator[MockOpenAIServer]:
    """The session's mock model, with default behaviour and empty stats for each test."""
    model_server.configure(
        latency_ms=0, error_rate=0.0, hang_rate=0.0, fail_models=[], reply=None, seed=None
    )
    model_server.reset()
    yield model_server


@pytest.fixture
def agentq_env(redis_url: str, postgres_url: str, mock_model: MockOpenAIServer) -> dict[str, str]:
    """The environment a producer and its workers share in a test."""
    return {
        "REDIS_URL": redis_url,
        "DATABASE_URL": postgres_url,
        "OPENAI_BASE_URL": mock_model.url,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "AGENTQ_AGENT_MODULES": "tests.integration.agents,agentq.examples",
        "AGENTQ_DEFAULT_MODEL": "gpt-4o",
        "LOG_LEVEL": "info",
    }


@pytest.fixture(autouse=True)
def _clean_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Empty the queues and the runs table before each test that uses the services."""
    if "agentq_env" in request.fixturenames:
        import redis
        import sqlalchemy

        redis.Redis.from_url(request.getfixturevalue("redis_url")).flushdb()
        url = request.getfixturevalue("postgres_url")
        engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("DELETE FROM runs"))
        engine.dispose()
    yield


def settings_for(env: Mapping[str, str]) -> Settings:
    """Settings read from ``env`` as a process started with it would read them."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(("AGENTQ_", "OPENAI_")) or name in ("REDIS_URL", "DATABASE_URL"):
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return load_settings()


@pytest.fixture
def client(agentq_env: dict[str, str]) -> Iterator[Client]:
    with Client(settings_for(agentq_env)) as c:
        yield c


class WorkerHandle:
    """A real ``agentq worker`` subprocess."""

    def __init__(self, env: Mapping[str, str], log: Path, args: list[str]) -> None:
        full_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AGENTQ_", "OPENAI_"))
        }
        full_env.update(env)
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        full_env["PYTHONUNBUFFERED"] = "1"
        self.log_path = log
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agentq", "worker", *args],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.hostname = f"agentq@{os.uname().nodename}.{self.process.pid}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, client: Client, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            replies = client.celery.control.ping(destination=[self.hostname], timeout=0.5)
            if replies:
                return
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log()}")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._close()

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def start_worker(agentq_env: dict[str, str], client: Client, tmp_path: Path) -> Iterator[Any]:
    """Start real worker processes: ``start_worker(extra_env=None, args=[])``."""
    started: list[WorkerHandle] = []

    def start(
        extra_env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        wait: bool = True,
    ) -> WorkerHandle:
        env = {**agentq_env, **(extra_env or {})}
        log = tmp_path / f"worker-{len(started)}.log"
        handle = WorkerHandle(env, log, args or [])
        started.append(handle)
        if wait:
            handle.wait_ready(client)
        return handle

    yield start
    for handle in started:
        with contextlib.suppress(Exception):
            handle.terminate(timeout=30)
        if handle.process.poll() is None:
            handle.kill()
