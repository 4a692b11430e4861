"""The in-process limiter: the same rules the Redis script applies, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from agentq.limits import Denied, Limits, LocalLimiter, Reservation, decide


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(**changes: float) -> Limits:
    values = {"requests": 3, "tokens": 1000, "concurrency": 2, "window": 10.0, "lease": 30.0}
    values.update(changes)
    return Limits(**values)  # type: ignore[arg-type]


def test_requests_beyond_the_window_wait_until_the_oldest_ages_out() -> None:
    clock = Clock()
    limiter = LocalLimiter(limits(), clock)

    async def scenario() -> None:
        for _ in range(3):
            assert isinstance(await limiter.try_reserve("m", [10]), Reservation)
            clock.now += 1
        denied = await limiter.try_reserve("m", [10])
        assert isinstance(denied, Denied)
        assert denied.reason == "requests"
        # The first request was at 1000; the window counts it for 10 s plus its edge margin.
        assert denied.wait == pytest.approx(1000 + limits().counted_window - clock.now)
        clock.now += denied.wait + 0.001
        assert isinstance(await limiter.try_reserve("m", [10]), Reservation)

    asyncio.run(scenario())


def test_tokens_are_estimated_then_corrected_with_real_usage() -> None:
    clock = Clock()
    limiter = LocalLimiter(limits(requests=100), clock)

    async def scenario() -> None:
        permit = await limiter.acquire("m", 800)
        denied = await limiter.try_reserve("m", [300])
        assert isinstance(denied, Denied) and denied.reason == "tokens"
        # The call used far less than estimated: the window has room again.
        await limiter.settle(permit, 100)
        assert isinstance(await limiter.try_reserve("m", [300]), Reservation)

    asyncio.run(scenario())


def test_a_request_larger_than_the_token_limit_runs_alone() -> None:
    limiter = LocalLimiter(limits(tokens=100), Clock())

    async def scenario() -> None:
        assert isinstance(await limiter.try_reserve("m", [500]), Reservation)
        assert isinstance(await limiter.try_reserve("m", [1]), Denied)

    asyncio.run(scenario())


def test_models_have_separate_quotas() -> None:
    limiter = LocalLimiter(limits(requests=1), Clock())

    async def scenario() -> None:
        assert isinstance(await limiter.try_reserve("a", [1]), Reservation)
        assert isinstance(await limiter.try_reserve("a", [1]), Denied)
        assert isinstance(await limiter.try_reserve("b", [1]), Reservation)

    asyncio.run(scenario())


def test_a_reserved_permit_is_taken_without_counting_twice() -> None:
    limiter = LocalLimiter(limits(requests=2), Clock())

    async def scenario() -> None:
        reservation = await limiter.try_reserve("m", [10, 10])
        assert isinstance(reservation, Reservation)
        reserved = list(reservation.ids)
        first = await limiter.acquire("m", 10, reservation)
        second = await limiter.acquire("m", 10, reservation)
        assert [first.request_id, second.request_id] == reserved
        assert reservation.ids == []
        assert isinstance(await limiter.try_reserve("m", [1]), Denied)

    asyncio.run(scenario())


def test_unused_reservations_are_given_back() -> None:
    limiter = LocalLimiter(limits(requests=2), Clock())

    async def scenario() -> None:
        reservation = await limiter.try_reserve("m", [10, 10])
        assert isinstance(reservation, Reservation)
        await limiter.release(reservation)
        assert isinstance(await limiter.try_reserve("m", [10, 10]), Reservation)

    asyncio.run(scenario())


def test_concurrency_waiters_wake_when_a_permit_is_settled() -> None:
    limiter = LocalLimiter(limits(requests=100, concurrency=1))

    async def scenario() -> None:
        first = await limiter.acquire("m", 1)
        waiter = asyncio.create_task(limiter.acquire("m", 1))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await limiter.settle(first, 1)
        # Woken by the release, long before the 30 s lease would lapse.
        second = await asyncio.wait_for(waiter, timeout=2)
        assert second.slot_id != first.slot_id
        assert limiter.waits >= 1

    asyncio.run(scenario())


def test_decide_takes_the_worst_wait() -> None:
    lim = limits(requests=1, tokens=10)
    denied = decide(lim, 5.0, [(1.0, 10)], [(None, 5)], None, None)
    assert isinstance(denied, Denied)
    assert denied.wait == pytest.approx(1.0 + lim.counted_window - 5.0)
