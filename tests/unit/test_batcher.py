"""Group commit: callers await their own item while one flusher writes batches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from agentq.batcher import Batcher


class Recorder:
    def __init__(self, pause: float = 0.01, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.pause = pause
        self.fail_on = fail_on

    async def flush(self, items: Sequence[str]) -> list[str]:
        self.batches.append(list(items))
        await asyncio.sleep(self.pause)
        if self.fail_on in items:
            raise RuntimeError(f"cannot write {self.fail_on}")
        return [item.upper() for item in items]


def test_writes_that_arrive_during_a_flush_share_the_next_batch() -> None:
    recorder = Recorder()

    async def scenario() -> list[str]:
        batcher = Batcher(recorder.flush, linger=0)
        first = asyncio.create_task(batcher.submit("a"))
        await asyncio.sleep(0)  # "a" is being written alone
        rest = [asyncio.create_task(batcher.submit(x)) for x in "bcd"]
        return [await first, *[await task for task in rest]]

    assert asyncio.run(scenario()) == ["A", "B", "C", "D"]
    assert recorder.batches == [["a"], ["b", "c", "d"]]


def test_a_lone_write_on_a_quiet_batcher_is_not_delayed() -> None:
    recorder = Recorder(pause=0)

    async def scenario() -> float:
        batcher = Batcher(recorder.flush, linger=5.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit("x")
        return loop.time() - started

    assert asyncio.run(scenario()) < 1.0


def test_a_busy_batcher_lingers_so_close_writes_share_a_statement() -> None:
    recorder = Recorder(pause=0)

    async def scenario() -> None:
        batcher = Batcher(recorder.flush, linger=0.05)
        await batcher.submit("first")
        # Moments after a flush: the next write waits a little for company.
        tasks = [asyncio.create_task(batcher.submit("second"))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(batcher.submit("third")))
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert recorder.batches == [["first"], ["second", "third"]]


def test_a_failed_batch_fails_its_callers_only() -> None:
    recorder = Recorder(fail_on="b")

    async def scenario() -> tuple[list[object], str]:
        batcher = Batcher(recorder.flush, linger=0)
        first = asyncio.create_task(batcher.submit("a"))
        await asyncio.sleep(0)
        failing = [asyncio.create_task(batcher.submit(x)) for x in "bc"]
        results = await asyncio.gather(*failing, return_exceptions=True)
        await first
        return results, await batcher.submit("d")

    results, later = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert later == "D"


def test_batches_never_exceed_the_limit() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = Batcher(recorder.flush, max_batch=3, linger=0)
        await asyncio.gather(*(batcher.submit(str(i)) for i in range(8)))

    asyncio.run(scenario())
    assert max(len(b) for b in recorder.batches) <= 3
    assert sorted(x for b in recorder.batches for x in b) == sorted(str(i) for i in range(8))


@pytest.mark.parametrize("pause", [0.0, 0.01])
def test_counts_items_and_batches(pause: float) -> None:
    recorder = Recorder(pause=pause)

    async def scenario() -> Batcher[str, str]:
        batcher = Batcher(recorder.flush, linger=0)
        await asyncio.gather(*(batcher.submit(str(i)) for i in range(5)))
        return batcher

    batcher = asyncio.run(scenario())
    assert batcher.items == 5
    assert batcher.batches == len(recorder.batches)
