"""The CLI against real services: submit and get from another process, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest

from agentq.client import Client
from agentq.testing import MockOpenAIServer
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def agentq(
    env: Mapping[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTQ_", "OPENAI_"))}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "agentq", *args],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_wait_and_get_from_the_command_line(
    agentq_env: dict[str, str], client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    start_worker()
    done = agentq(
        agentq_env,
        "submit",
        "calculator",
        "What is 5 plus 6?",
        "--priority",
        "high",
        "--wait",
        "--timeout",
        "60",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded"
    assert run["priority"] == "high"
    assert run["tool_calls"] == 1
    assert run["usage"]["requests"] == 2

    shown = agentq(agentq_env, "get", run["id"])
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout
    assert run["id"] in shown.stdout
    assert client.get(run["id"]).output == run["output"]


def test_get_of_an_unknown_run_fails_clearly(agentq_env: dict[str, str]) -> None:
    done = agentq(agentq_env, "get", "0" * 32)
    assert done.returncode == 1
    assert "no run has id" in done.stderr


def test_submit_refuses_bad_input_with_a_usage_error(
    agentq_env: dict[str, str], client: Client
) -> None:
    done = agentq(agentq_env, "submit", "calculator", "hi", "--context", "{not json")
    assert done.returncode == 2
    assert "--context" in done.stderr
    assert client.store.count_by_status() == {}


def test_the_demo_uses_configured_services(
    agentq_env: dict[str, str], client: Client, mock_model: MockOpenAIServer
) -> None:
    done = agentq(agentq_env, "demo", "--runs", "12", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broker redis" in done.stdout
    assert "store postgresql" in done.stdout
    assert "12 of 12 runs succeeded" in done.stdout
    assert client.store.count_by_status() == {"succeeded": 12}
    # The example agents ran against the configured model server, not the offline model.
    assert mock_model.stats()["total_requests"] >= 12


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_both_openai_apis_run_tool_calling_agents(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, api: str
) -> None:
    start_worker(extra_env={"AGENTQ_MODEL_API": api})
    run = client.submit("calculator", "What is 1 plus 1?").wait(timeout=60)
    assert run.status.value == "succeeded", run.error
    assert run.tool_calls == 1
    path = "/v1/chat/completions" if api == "chat_completions" else "/v1/responses"
    assert mock_model.stats()["requests_by_path"] == {path: 2}
