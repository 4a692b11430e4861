"""Group commit: many callers' small writes become one statement per batch.

Hundreds of runs in flight in one worker each claim their row and record their outcome. Done
one by one, each write costs a pooled connection, a round trip and a commit, and at a hundred
runs a second that bookkeeping costs more CPU than the runs' own model calls. A
:class:`Batcher` lets callers await their own item while a single flusher writes whatever
has gathered: an item that arrives while the database is idle is written at once, alone, so
there is no added latency when the worker is quiet, and batches grow by themselves exactly
when the load does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Most items written by one statement: bounds the statement's size and a batch's latency.
DEFAULT_MAX_BATCH = 200
#: Seconds a flush waits for company when the previous one was moments ago: on a busy worker
#: the writes of a few milliseconds share a statement; on a quiet one a write goes at once.
DEFAULT_LINGER = 0.005


class Batcher(Generic[Item, Result]):
    """Collects items and writes them with ``flush``, one batch at a time, on one event loop.

    ``flush`` receives a batch and returns one result per item, in order. If it raises, every
    caller of that batch receives the exception; later batches are unaffected.
    """

    def __init__(
        self,
        flush: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        max_batch: int = DEFAULT_MAX_BATCH,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        self._flush = flush
        self.max_batch = max_batch
        self.linger = linger
        self._last_flush = float("-inf")
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        """Batches written so far (items / batches is the mean batch size)."""
        self.items = 0

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._drain())
        # A caller cancelled meanwhile cancels only its wait: its item is written all the same.
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            busy = loop.time() - self._last_flush < self.linger * 4
            if busy and len(self._pending) < self.max_batch:
                await asyncio.sleep(self.linger)
            self._last_flush = loop.time()
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self.batches += 1
            self.items += len(batch)
            try:
                results = await self._flush([item for item, _ in batch])
            except asyncio.CancelledError:
                # The loop is shutting down: nobody may wait forever for a write never made.
                for _, future in (*batch, *self._pending):
                    future.cancel()
                self._pending.clear()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
