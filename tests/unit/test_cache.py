"""The response cache's in-process layer, key and counters."""

from __future__ import annotations

import asyncio

from agentq.cache import CachedResponse, MemoryLayer, ResponseCache, cache_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


ANSWER = CachedResponse(output="4", model="gpt-4o", turns=2, tool_calls=1)


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    layer = MemoryLayer(10, clock)
    layer.set("k", ANSWER, ttl=5)
    clock.now = 4.9
    assert layer.get("k") == ANSWER
    clock.now = 5.0
    assert layer.get("k") is None


def test_the_least_recently_used_entry_goes_first() -> None:
    layer = MemoryLayer(2)
    layer.set("a", ANSWER, 60)
    layer.set("b", ANSWER, 60)
    assert layer.get("a") is not None
    layer.set("c", ANSWER, 60)
    assert layer.get("b") is None
    assert layer.get("a") is not None and layer.get("c") is not None


def test_the_key_changes_with_everything_that_decides_the_answer() -> None:
    base = {
        "agent": "support",
        "version": "1",
        "model": "gpt-4o",
        "input": "hi",
        "context": {"user": 1},
    }
    key = cache_key(**base)  # type: ignore[arg-type]
    assert cache_key(**base) == key  # type: ignore[arg-type]
    assert cache_key(**{**base, "context": {"user": 1}}) == key  # type: ignore[arg-type]
    for change in (
        {"agent": "other"},
        {"version": "2"},
        {"model": "gpt-4o-mini"},
        {"input": "hi!"},
        {"context": {"user": 2}},
        {"context": None},
        {"max_turns": 3},
    ):
        assert cache_key(**{**base, **change}) != key, change  # type: ignore[arg-type]


def test_hits_and_misses_are_counted_and_reported() -> None:
    seen: list[tuple[str, bool]] = []

    class Observer:
        def cache_lookup(self, agent: str, hit: bool) -> None:
            seen.append((agent, hit))

    cache = ResponseCache(ttl=60, max_entries=10, observer=Observer())

    async def scenario() -> None:
        assert await cache.get("k", "support") is None
        await cache.set("k", ANSWER)
        assert await cache.get("k", "support") == ANSWER

    asyncio.run(scenario())
    assert cache.stats() == {"hits": 1, "misses": 1, "entries": 1}
    assert seen == [("support", False), ("support", True)]
