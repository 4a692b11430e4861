"""The worker's store on real PostgreSQL: batched claims and outcomes keep one-run semantics."""

from __future__ import annotations

import asyncio

import pytest

from agentq.client import Client
from agentq.run import RunStatus, Usage
from agentq.store import AsyncRunStore, Outcome, make_async_engine

pytestmark = pytest.mark.integration


def _store(client: Client, worker: str = "test-worker") -> AsyncRunStore:
    return AsyncRunStore(
        make_async_engine(client.settings.async_database_url), worker=worker, lease_seconds=30
    )


def test_concurrent_claims_of_one_run_give_it_to_one_caller(client: Client) -> None:
    handles = client.submit_many([{"agent": "echo", "input": f"hi {i}"} for i in range(3)])
    ids = [h.id for h in handles]

    async def scenario() -> list[object]:
        store = _store(client)
        try:
            # Every run delivered twice at once, as after a visibility timeout.
            return await asyncio.gather(*(store.claim(i, 3) for i in ids + ids))
        finally:
            await store.close()

    claims = asyncio.run(scenario())
    taken = [c for c in claims if c is not None]
    assert sorted(c.run_id for c in taken) == sorted(ids)  # type: ignore[attr-defined]
    assert all(run.attempts == 1 for run in client.store.get_many(ids))


def test_outcomes_written_together_are_each_fenced_by_their_attempt(client: Client) -> None:
    handles = client.submit_many([{"agent": "echo", "input": f"hi {i}"} for i in range(4)])
    ids = [h.id for h in handles]

    async def scenario() -> list[bool]:
        store = _store(client)
        try:
            claims = await asyncio.gather(*(store.claim(i, 3) for i in ids))
            assert all(c is not None for c in claims)
            outcomes = [
                Outcome(
                    RunStatus.SUCCEEDED,
                    output=f"answer {n}",
                    usage=Usage(input_tokens=10 + n, output_tokens=n, total_tokens=10 + 2 * n,
                                requests=2),
                    model="gpt-4o",
                    turns=2,
                    tool_calls=1,
                    model_attempts=3,
                    fallback_used=n == 1,
                )
                for n in range(3)
            ]
            failed = Outcome(RunStatus.FAILED, error_type="timeout", error="too slow")
            return await asyncio.gather(
                store.finish(ids[0], 1, outcomes[0]),
                store.finish(ids[1], 1, outcomes[1]),
                store.finish(ids[2], 1, failed),
                # A stale attempt must not overwrite the run's holder.
                store.finish(ids[3], 2, outcomes[2]),
            )
        finally:
            await store.close()

    recorded = asyncio.run(scenario())
    assert recorded == [True, True, True, False]
    by_id = {run.id: run for run in client.store.get_many(ids)}
    first, second, third, fourth = (by_id[i] for i in ids)
    assert (first.status, first.output, first.usage.total_tokens) == (
        RunStatus.SUCCEEDED, "answer 0", 10)
    assert (second.usage.input_tokens, second.fallback_used, second.model_attempts) == (
        11, True, 3)
    assert (third.status, third.error_type, third.error, third.output) == (
        RunStatus.FAILED, "timeout", "too slow", None)
    assert fourth.status is RunStatus.RUNNING
    assert all(run.finished_at is not None for run in (first, second, third))
