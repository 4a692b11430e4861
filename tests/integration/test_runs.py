"""Agent runs end to end: Client → Redis queues → a real worker process → Postgres."""

from __future__ import annotations

from typing import Any

import pytest

from agentq.client import Client
from agentq.testing import MockOpenAIServer

pytestmark = pytest.mark.integration


def test_runs_across_priorities_complete_with_the_servers_usage(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    mock_model.configure(input_tokens=40, output_tokens=7)
    start_worker()
    handles = client.submit_many(
        [
            {"agent": "calculator", "input": f"What is {i} plus 2?", "priority": priority}
            for i, priority in enumerate(["high", "normal", "low"] * 3)
        ]
    )
    runs = client.wait_many([h.id for h in handles], timeout=60)

    assert [run.status.value for run in runs] == ["succeeded"] * 9
    assert {run.priority.value for run in runs} == {"high", "normal", "low"}
    for run in runs:
        # One call that asks for the tool, one that answers with its result.
        assert run.usage.requests == 2
        assert run.usage.input_tokens == 80
        assert run.usage.output_tokens == 14
        assert run.usage.total_tokens == 94
        assert run.tool_calls == 1
        assert run.turns == 2
        assert run.attempts == 1
        assert run.model == "gpt-4o"
        assert run.output
        assert run.duration_ms is not None and run.duration_ms > 0
        assert run.queue_ms is not None and run.queue_ms >= 0
    stats = mock_model.stats()
    assert stats["tool_calls"] == 9
    assert stats["total_requests"] == 18
