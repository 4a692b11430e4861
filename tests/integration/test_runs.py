"""Agent runs end to end: Client → Redis queues → a real worker process → Postgres."""

from __future__ import annotations

from typing import Any

import pytest

from agentq.client import Client
from agentq.exceptions import InvalidRunRequest
from agentq.testing import MockOpenAIServer
from tests.integration.waiting import broker_drained, wait_for

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


def test_a_redelivered_message_for_a_finished_run_does_nothing(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, redis_url: str
) -> None:
    start_worker()
    run = client.submit("calculator", "What is 2 plus 3?").wait(timeout=30)
    assert run.status.value == "succeeded"
    requests_before = mock_model.stats()["total_requests"]

    # The broker hands the same message out again, as after a visibility timeout.
    client._publish([(run.id, run.priority)])
    wait_for(lambda: broker_drained(redis_url), 30, "the duplicate to be consumed")

    again = client.get(run.id)
    assert again.attempts == 1
    assert again.finished_at == run.finished_at
    assert again.output == run.output
    assert mock_model.stats()["total_requests"] == requests_before


def test_a_run_survives_kill_9_of_its_worker_and_completes_once(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, redis_url: str
) -> None:
    mock_model.configure(latency_ms=1500)
    short = {
        "AGENTQ_RUN_TIMEOUT": "10",
        "AGENTQ_VISIBILITY_TIMEOUT": "12",
        "AGENTQ_LEASE_SECONDS": "3",
    }
    first = start_worker(extra_env=short)
    handle = client.submit("calculator", "What is 20 plus 22?")
    wait_for(lambda: mock_model.stats()["in_flight"] >= 1, 30, "the first model call")
    assert client.get(handle.id).status.value == "running"
    first.kill()

    start_worker(extra_env=short)
    run = handle.wait(timeout=60)

    assert run.status.value == "succeeded"
    assert run.attempts == 2
    assert run.tool_calls == 1
    wait_for(lambda: broker_drained(redis_url), 30, "every delivery to be acknowledged")
    # One call died with the first worker; the second attempt made the run's two calls.
    assert mock_model.stats()["total_requests"] == 3
    assert client.get(run.id).attempts == 2


def test_an_unknown_agent_fails_clearly_without_retrying(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    start_worker()
    run = client.submit("no-such-agent", "hello").wait(timeout=30)

    assert run.status.value == "failed"
    assert run.error_type == "unknown_agent"
    assert "no-such-agent" in (run.error or "")
    assert "calculator" in (run.error or "")
    assert run.attempts == 1
    assert mock_model.stats()["total_requests"] == 0


@pytest.mark.parametrize(
    ("agent", "text", "options", "field"),
    [
        ("calculator", "hi", {"priority": "urgent"}, "priority"),
        ("", "hi", {}, "agent"),
        ("Bad Name!", "hi", {}, "agent"),
        ("calculator", "x" * 100_001, {}, "input"),
        ("calculator", "hi", {"context": {"when": object()}}, "context"),
        ("calculator", "hi", {"context": ["not", "an", "object"]}, "context"),
    ],
    ids=[
        "priority",
        "empty-agent",
        "malformed-agent",
        "long-input",
        "context-not-json",
        "context-list",
    ],
)
def test_bad_input_is_refused_with_nothing_stored_or_sent(
    client: Client,
    redis_url: str,
    agent: str,
    text: str,
    options: dict[str, Any],
    field: str,
) -> None:
    with pytest.raises(InvalidRunRequest) as refused:
        client.submit(agent, text, **options)
    assert refused.value.field == field
    assert client.store.count_by_status() == {}
    assert broker_drained(redis_url)


def test_a_bad_item_in_submit_many_rejects_the_whole_call(client: Client, redis_url: str) -> None:
    with pytest.raises(InvalidRunRequest) as refused:
        client.submit_many(
            [{"agent": "calculator", "input": "1 plus 1"}, {"agent": "calculator", "input": ""}]
        )
    assert refused.value.field == "[1].input"
    assert client.store.count_by_status() == {}
    assert broker_drained(redis_url)


def test_waiting_with_an_absurd_timeout_is_refused(client: Client) -> None:
    handle = client.submit("calculator", "1 plus 1")
    for timeout in (-1, float("nan"), 10**9):
        with pytest.raises(InvalidRunRequest):
            handle.wait(timeout=timeout)


def test_a_repeated_idempotency_key_returns_the_existing_run(
    client: Client, redis_url: str
) -> None:
    first = client.submit("calculator", "1 plus 1", idempotency_key="order-7")
    second = client.submit("calculator", "1 plus 1", idempotency_key="order-7")

    assert (first.created, second.created) == (True, False)
    assert second.id == first.id
    assert client.store.count_by_status() == {"queued": 1}
    import redis

    assert redis.Redis.from_url(redis_url).llen("agentq.normal") == 1


def test_cancel_stops_a_queued_run_from_starting(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, redis_url: str
) -> None:
    handle = client.submit("calculator", "1 plus 1")
    assert handle.cancel().status.value == "cancelled"

    start_worker()
    wait_for(lambda: broker_drained(redis_url), 30, "the message to be consumed")
    run = client.get(handle.id)
    assert run.status.value == "cancelled"
    assert run.attempts == 0
    assert mock_model.stats()["total_requests"] == 0


def test_cancel_stops_a_running_run_at_its_next_turn(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    mock_model.configure(latency_ms=2500)
    start_worker(extra_env={"AGENTQ_LEASE_SECONDS": "3"})
    handle = client.submit("calculator", "What is 4 plus 4?")
    wait_for(lambda: mock_model.stats()["in_flight"] >= 1, 30, "the first model call")

    assert handle.cancel().status.value == "running"
    run = handle.wait(timeout=30)

    assert run.status.value == "cancelled"
    assert run.error_type == "cancelled"
    assert mock_model.stats()["total_requests"] == 1
