"""The response cache: an identical request is answered once and served again for a while.

Two layers, like the guide's: an in-process LRU with a TTL in each worker (no round trip for a
hot answer), and Redis with the same TTL, shared by every worker (absent in embedded mode).
A Redis hit warms the local layer with the time the entry has left, so no layer serves an
answer longer than ``AGENTQ_CACHE_TTL`` after it was produced.

The key is a digest of everything that decides the answer: the agent's name and version, the
model asked for, the input, the context and the run's limits. Whether a run may use the cache
at all is the engine's call: agents registered with ``side_effects=True`` and runs submitted
with ``cache=False`` never read or fill it.

Hits and misses are counted per process (:attr:`ResponseCache.hits`, :attr:`misses`) and, with
Redis, cluster-wide (:meth:`ResponseCache.cluster_counts`); telemetry also hears of each lookup.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("agentq.cache")

KEY_PREFIX = "agentq:cache"
COUNTS_KEY = f"{KEY_PREFIX}:counts"


class CacheObserver(Protocol):
    def cache_lookup(self, agent: str, hit: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """What a cached run replays."""

    output: str | None
    model: str | None
    turns: int
    tool_calls: int


def cache_key(
    *,
    agent: str,
    version: str,
    model: str,
    input: str,
    context: dict[str, Any] | None,
    max_turns: int | None = None,
    max_tokens: int | None = None,
) -> str:
    material = json.dumps(
        [agent, version, model, input, context, max_turns, max_tokens],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()


class MemoryLayer:
    """An LRU of at most ``max_entries``, each entry expiring at its own time."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()

    def get(self, key: str) -> CachedResponse | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def set(self, key: str, value: CachedResponse, ttl: float) -> None:
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class ResponseCache:
    """The process's cache: memory first, then Redis when there is one."""

    def __init__(
        self,
        ttl: float,
        max_entries: int,
        redis: Redis[bytes] | None = None,
        observer: CacheObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.memory = MemoryLayer(max_entries, clock)
        self.redis = redis
        self.observer = observer
        self.hits = 0
        self.misses = 0

    async def get(self, key: str, agent: str) -> CachedResponse | None:
        value = self.memory.get(key)
        if value is None and self.redis is not None:
            value = await self._from_redis(key)
        self._count(agent, value is not None)
        if self.redis is not None:
            try:
                await self.redis.hincrby(COUNTS_KEY, "hits" if value else "misses", 1)
            except Exception:  # noqa: BLE001 - counting must not fail the lookup
                logger.warning("cannot count the cache lookup", extra={"action": "cache_error"})
        return value

    async def set(self, key: str, value: CachedResponse) -> None:
        self.memory.set(key, value, self.ttl)
        if self.redis is not None:
            try:
                payload = json.dumps(asdict(value))
                await self.redis.set(f"{KEY_PREFIX}:{key}", payload, px=int(self.ttl * 1000))
            except Exception:  # noqa: BLE001 - a cache that cannot be filled only costs calls
                logger.warning("cannot fill the Redis cache", extra={"action": "cache_error"})

    async def _from_redis(self, key: str) -> CachedResponse | None:
        assert self.redis is not None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(f"{KEY_PREFIX}:{key}")
                pipe.pttl(f"{KEY_PREFIX}:{key}")
                raw, left_ms = await pipe.execute()
        except Exception:  # noqa: BLE001 - a cache outage is a miss, never a failed run
            logger.warning("cannot read the Redis cache", extra={"action": "cache_error"})
            return None
        if raw is None:
            return None
        try:
            value = CachedResponse(**json.loads(raw))
        except (TypeError, ValueError):
            return None
        if isinstance(left_ms, int) and left_ms > 0:
            self.memory.set(key, value, left_ms / 1000.0)
        return value

    def _count(self, agent: str, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        if self.observer is not None:
            try:
                self.observer.cache_lookup(agent, hit)
            except Exception:
                logger.exception("cache observer failed", extra={"action": "telemetry_failed"})

    def stats(self) -> dict[str, int]:
        """This process's hit and miss counts and the memory layer's size."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.memory)}


def cluster_counts(redis_client: Any) -> dict[str, int]:
    """Hits and misses of every worker, read with a synchronous ``redis.Redis``."""
    raw = redis_client.hgetall(COUNTS_KEY) or {}
    counts = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
    return {"hits": counts.get("hits", 0), "misses": counts.get("misses", 0)}
