"""Model failures, fallback, cluster-wide limits, guardrails, dead letters and the cache,
with real worker processes against the mock model server."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy

from agentq.app import RUN_TASK
from agentq.client import Client
from agentq.exceptions import InvalidRunRequest
from agentq.run import new_run_id
from agentq.testing import MockOpenAIServer, max_requests_in_window
from tests.integration.waiting import wait_for

pytestmark = pytest.mark.integration

AGENTS = {"AGENTQ_AGENT_MODULES": "tests.integration.agents,tests.integration.resilience_agents"}
FAST_RETRIES = {
    **AGENTS,
    "AGENTQ_MAX_RETRIES": "4",
    "AGENTQ_RETRY_BACKOFF": "0.05",
    "AGENTQ_RETRY_BACKOFF_MAX": "0.5",
}


def test_runs_succeed_when_30_percent_of_model_calls_fail(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    mock_model.configure(error_rate=0.3, error_statuses=[429, 500], retry_after=0.05, seed=7)
    start_worker(extra_env=FAST_RETRIES)
    handles = client.submit_many(
        [{"agent": "calculator", "input": f"What is {i} plus 1?"} for i in range(20)]
    )
    runs = client.wait_many([h.id for h in handles], timeout=120)

    assert [run.status.value for run in runs] == ["succeeded"] * 20, [r.error for r in runs]
    stats = mock_model.stats()
    assert stats["errors_injected"] > 0
    # Every call the server saw, failed or not, is an attempt recorded on some run.
    assert sum(run.model_attempts for run in runs) == stats["total_requests"]
    assert sum(run.model_attempts for run in runs) > sum(run.usage.requests for run in runs)
    for run in runs:
        assert run.attempts == 1  # retried call by call, never by re-running the whole run
        assert run.model in ("gpt-4o", "gpt-4o-mini")


def test_a_failing_default_model_falls_back_and_the_run_records_it(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    mock_model.configure(fail_models=["gpt-4o"])
    start_worker(extra_env={**FAST_RETRIES, "AGENTQ_MAX_RETRIES": "2"})
    handles = client.submit_many(
        [{"agent": "calculator", "input": f"What is {i} plus 2?"} for i in range(4)]
    )
    runs = client.wait_many([h.id for h in handles], timeout=60)

    for run in runs:
        assert run.status.value == "succeeded", run.error
        assert run.model == "gpt-4o-mini"
        assert run.fallback_used
        # First call: 3 tries on gpt-4o (1 + 2 retries), then the fallback; second call goes
        # straight to the fallback.
        assert run.model_attempts == 5
    by_model = mock_model.stats()["requests_by_model"]
    assert by_model == {"gpt-4o": 12, "gpt-4o-mini": 8}


def test_two_workers_share_one_request_limit_without_blocking_their_slots(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    # The limiter's window is a setting: 10 requests per 4 s window stands in for 60 per
    # minute, and the server's own timestamps are checked over every 4 s window.
    window, limit = 4.0, 10
    env = {
        **AGENTS,
        "AGENTQ_RATE_LIMITS__ENABLED": "true",
        "AGENTQ_RATE_LIMITS__REQUESTS_PER_MINUTE": str(limit),
        "AGENTQ_RATE_LIMITS__WINDOW_SECONDS": str(window),
        "AGENTQ_WORKER_CONCURRENCY": "1",
    }
    start_worker(extra_env=env)
    start_worker(extra_env=env)
    backlog = client.submit_many([{"agent": "echo", "input": f"message {i}"} for i in range(30)])
    # Let the first window fill, then ask for a run on a model with room to spare.
    wait_for(lambda: mock_model.stats()["total_requests"] >= limit, 30, "the window to fill")
    other = client.submit("mini-echo", "a model with room").wait(timeout=30)
    unfinished_then = sum(
        1 for run in client.store.get_many([h.id for h in backlog]) if not run.finished
    )
    runs = client.wait_many([h.id for h in backlog], timeout=90)

    assert other.status.value == "succeeded"
    # Both workers' single slots were free while the backlog waited for its quota.
    assert unfinished_then >= 10
    assert [run.status.value for run in runs] == ["succeeded"] * 30
    assert all(run.attempts == 1 for run in runs)  # a deferral does not use up an attempt
    stamps = mock_model.stats()["request_timestamps"]
    assert len(stamps) == 31
    # The other model's one request shares the server's windows but not the limit.
    assert max_requests_in_window(stamps, window) <= limit + 1


def test_a_tokens_per_window_limit_holds_within_one_requests_size(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    window, tokens_limit = 4.0, 600
    per_request = 100 + 20
    mock_model.configure(input_tokens=100, output_tokens=20)
    env = {
        **AGENTS,
        "AGENTQ_RATE_LIMITS__ENABLED": "true",
        "AGENTQ_RATE_LIMITS__TOKENS_PER_MINUTE": str(tokens_limit),
        "AGENTQ_RATE_LIMITS__CONCURRENT_REQUESTS": "1",
        "AGENTQ_RATE_LIMITS__WINDOW_SECONDS": str(window),
        # Estimates below the real usage, so the limit holds only through the corrections.
        "AGENTQ_MAX_TOKENS_PER_REQUEST": "10",
        "AGENTQ_WORKER_CONCURRENCY": "2",
    }
    start_worker(extra_env=env)
    handles = client.submit_many([{"agent": "echo", "input": f"n{i}"} for i in range(12)])
    runs = client.wait_many([h.id for h in handles], timeout=90)

    assert [run.status.value for run in runs] == ["succeeded"] * 12
    stats = mock_model.stats()
    assert stats["input_tokens"] + stats["output_tokens"] == 12 * per_request
    busiest = max_requests_in_window(stats["request_timestamps"], window) * per_request
    assert busiest <= tokens_limit + per_request


def test_permanent_failures_fail_fast_without_retries(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer
) -> None:
    start_worker(extra_env={**FAST_RETRIES, "AGENTQ_BLOCKED_PATTERNS": r"forbidden\s+word"})
    blocked = client.submit("calculator", "say the FORBIDDEN word please").wait(timeout=30)
    assert blocked.status.value == "failed"
    assert blocked.error_type == "guardrail"
    assert "blocked_pattern" in (blocked.error or "")
    assert blocked.model_attempts == 0 and blocked.attempts == 1
    assert mock_model.stats()["total_requests"] == 0

    # The calculator needs two turns; a run allowed one fails once, not after retries.
    short = client.submit("calculator", "What is 1 plus 1?", max_turns=1).wait(timeout=30)
    assert short.status.value == "failed"
    assert short.error_type == "max_turns"
    assert short.attempts == 1
    assert mock_model.stats()["total_requests"] == 1

    unknown = client.submit("no-such-agent", "hello").wait(timeout=30)
    assert unknown.error_type == "unknown_agent" and unknown.attempts == 1

    with pytest.raises(InvalidRunRequest, match="max_turns"):
        client.submit("calculator", "x", max_turns=10_000)
    with pytest.raises(InvalidRunRequest, match="max_tokens"):
        client.submit("calculator", "x", max_tokens=0)


def _dead_letters(postgres_url: str, task_ids: list[str], run_ids: list[str]) -> list[Any]:
    engine = sqlalchemy.create_engine(
        postgres_url.replace("postgresql://", "postgresql+psycopg://")
    )
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text(
                "SELECT task_id, run_id, reason, detail, payload FROM dead_letters "
                "WHERE task_id = ANY(:tasks) OR run_id = ANY(:runs) ORDER BY id"
            ),
            {"tasks": task_ids, "runs": run_ids},
        )
        found = [row._mapping for row in rows]
    engine.dispose()
    return found


def test_poison_messages_become_dead_letters_once(
    client: Client, start_worker: Any, postgres_url: str, redis_url: str
) -> None:
    start_worker(extra_env=AGENTS)
    missing = new_run_id()
    tasks = {name: f"poison-{name}-{new_run_id()[:8]}" for name in ("bad-id", "no-run", "no-args")}
    client.celery.send_task(RUN_TASK, args=("not-a-run-id",), task_id=tasks["bad-id"])
    client.celery.send_task(RUN_TASK, args=(missing,), task_id=tasks["no-run"])
    client.celery.send_task(RUN_TASK, args=(), task_id=tasks["no-args"])

    def letters() -> list[Any]:
        return _dead_letters(postgres_url, list(tasks.values()), [missing])

    wait_for(lambda: len(letters()) >= 3, 30, "three dead letters")
    # The worker is healthy and the messages are gone: a real run still goes through, and
    # no poison message came back to be recorded again.
    assert client.submit("echo", "still alive").wait(timeout=30).status.value == "succeeded"
    time.sleep(1)
    found = letters()
    assert len(found) == 3
    by_task = {row["task_id"]: row for row in found if row["task_id"]}
    assert by_task[tasks["bad-id"]]["reason"] == "malformed_message"
    assert "not a run id" in by_task[tasks["bad-id"]]["detail"]
    assert by_task[tasks["no-args"]]["reason"] == "malformed_message"
    (unknown,) = [row for row in found if row["run_id"] == missing]
    assert unknown["reason"] == "unknown_run"
    import redis

    db = redis.Redis.from_url(redis_url)
    assert sum(db.llen(f"agentq.{p}") for p in ("high", "normal", "low")) == 0
    assert db.hlen("unacked") == 0


def test_a_repeated_request_is_served_from_cache_but_a_side_effecting_one_is_not(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, redis_url: str
) -> None:
    start_worker(extra_env={**AGENTS, "AGENTQ_ENABLE_CACHE": "true"})
    first = client.submit("calculator", "What is 2 plus 3?", context={"user": 1}).wait(30)
    calls = mock_model.stats()["total_requests"]
    second = client.submit("calculator", "What is 2 plus 3?", context={"user": 1}).wait(30)

    assert not first.cached and first.usage.total_tokens > 0
    assert second.status.value == "succeeded"
    assert second.cached
    assert second.output == first.output
    assert second.usage.total_tokens == 0 and second.usage.requests == 0
    assert second.model_attempts == 0
    assert mock_model.stats()["total_requests"] == calls

    other_context = client.submit("calculator", "What is 2 plus 3?", context={"user": 2})
    opted_out = client.submit("calculator", "What is 2 plus 3?", context={"user": 1}, cache=False)
    mails = [client.submit("mailer", "mail bob@example.com") for _ in range(2)]
    rest = client.wait_many([other_context.id, opted_out.id, *[m.id for m in mails]], timeout=30)
    assert [run.cached for run in rest] == [False, False, False, False]
    assert all(run.status.value == "succeeded" for run in rest)
    assert mock_model.stats()["total_requests"] == calls + 4 * 2

    import redis

    counts = redis.Redis.from_url(redis_url).hgetall("agentq:cache:counts")
    assert int(counts[b"hits"]) == 1
    assert int(counts[b"misses"]) == 2
