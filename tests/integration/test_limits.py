"""The Redis limiter shared by processes: two limiters on one Redis stand for two workers."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from agentq.limits import Denied, Limits, RedisLimiter, Reservation

pytestmark = pytest.mark.integration


def test_two_processes_share_one_quota_and_wake_each_other(redis_url: str) -> None:
    from redis.asyncio import Redis

    model = f"model-{uuid.uuid4().hex[:8]}"
    limits = Limits(requests=4, tokens=1000, concurrency=1, window=20.0, lease=30.0)

    async def scenario() -> None:
        one, two = Redis.from_url(redis_url), Redis.from_url(redis_url)
        a, b = RedisLimiter(limits, one), RedisLimiter(limits, two)
        try:
            assert isinstance(await a.try_reserve(model, [10, 10]), Reservation)
            assert isinstance(await b.try_reserve(model, [10]), Reservation)
            permit = await a.acquire(model, 10)  # the fourth request of the window
            denied = await b.try_reserve(model, [10])
            assert isinstance(denied, Denied) and denied.reason == "requests"
            assert 0 < denied.wait <= limits.counted_window

            await a.settle(permit, 10)

            # b waits for the one slot in flight; a's release wakes it through Redis.
            other = f"{model}-c"
            permit = await a.acquire(other, 10)
            waiter = asyncio.create_task(b.acquire(other, 10))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            started = time.monotonic()
            await a.settle(permit, 10)
            second = await asyncio.wait_for(waiter, timeout=limits.lease)
            # Woken by the release, not by the 30 s lease of the permit lapsing.
            assert time.monotonic() - started < limits.lease / 2
            await b.settle(second, 10)

            # Tokens are corrected with real usage: 900 used leaves no room for 200 more.
            third = f"{model}-t"
            permit = await a.acquire(third, 10)
            await a.settle(permit, 900)
            denied = await b.try_reserve(third, [200])
            assert isinstance(denied, Denied) and denied.reason == "tokens"
            assert isinstance(await b.try_reserve(third, [100]), Reservation)
        finally:
            await a.close()
            await b.close()
            await one.aclose()
            await two.aclose()

    asyncio.run(scenario())


def test_an_oversized_request_runs_alone_in_an_empty_window(redis_url: str) -> None:
    from redis.asyncio import Redis

    model = f"model-{uuid.uuid4().hex[:8]}"
    limits = Limits(requests=10, tokens=100, concurrency=5, window=5.0, lease=30.0)

    async def scenario() -> None:
        client = Redis.from_url(redis_url)
        limiter = RedisLimiter(limits, client)
        try:
            assert isinstance(await limiter.try_reserve(model, [500]), Reservation)
            assert isinstance(await limiter.try_reserve(model, [1]), Denied)
        finally:
            await client.aclose()

    asyncio.run(scenario())
