"""What a new user does first: the demo on embedded defaults, and the compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AGENTQ_", "OPENAI_"))
        and key not in ("REDIS_URL", "DATABASE_URL", "SENTRY_DSN", "STATSD_HOST")
    }
    env["AGENTQ_DATA_DIR"] = str(tmp_path / "data")
    return env


def test_the_demo_runs_on_embedded_defaults(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agentq", "demo"],
        cwd=tmp_path,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "broker in-memory" in out
    assert "store sqlite" in out
    assert "36 of 36 runs succeeded" in out
    # Progress is shown while runs are in flight, then the summary table.
    assert "[" in out and "/36]" in out
    table = out[out.index("priority  runs") :]
    for priority in ("high", "normal", "low", "all"):
        assert f"\n{priority} " in table
    assert "p50 ms" in table and "p95 ms" in table and "tokens" in table
    assert (tmp_path / "data" / "agentq.sqlite3").exists()


def test_a_standalone_worker_without_a_broker_says_why(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agentq", "worker"],
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "REDIS_URL" in done.stderr


def test_a_bad_setting_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env["AGENTQ_MAX_RETRIES"] = "lots"
    done = subprocess.run(
        [sys.executable, "-m", "agentq", "agents"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "AGENTQ_MAX_RETRIES" in done.stderr


def test_compose_file_validates() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        message = "docker-compose (Debian package docker-compose) is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        [tool, "-f", str(ROOT / "compose.yaml"), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for service in ("redis", "postgres", "migrate", "worker", "beat", "flower", "statsd"):
        assert f"  {service}:" in done.stdout
    assert "noeviction" in done.stdout
    assert "appendonly" in done.stdout
