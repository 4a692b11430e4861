"""Provider quota shared by every worker: requests and tokens per window, requests in flight.

One limiter serves a worker process. With Redis it keeps, per model, a sliding-window log of
requests (a sorted set of request ids scored by time), their tokens (a hash), and the requests
in flight (a sorted set scored by lease expiry, so a crashed holder's permit lapses). Each
decision is one Lua script reading Redis's own clock, so every process on every host sees one
quota and one time, and a check and its reservation cannot be split by another worker.
Without Redis (embedded mode) the same rules run in process.

A request is counted from its permit until a window after its answer came back: the provider
saw it at some moment in between, so whatever the latency, every window the provider counts
over is one the limiter counted over too.

Tokens are estimated before a call (prompt characters / 4 plus the call's ``max_tokens``) and
corrected with the real usage when it returns, so the window holds what the provider counted;
a call that uses more than its estimate can overshoot the limit by at most its own size. A
request bigger than the whole token limit is let through once the window is empty, or it could
never run.

Waiting never polls. A denied caller gets the exact time until enough of the window ages out
(or until the oldest permit in flight lapses) and sleeps that long, waking early when any
process releases capacity: releases publish on one Redis channel that each process listens to
with a single subscription.

Waiting never holds a worker slot either. Before a run starts, the engine reserves permits
for the calls it expects the run to make (:meth:`Limiter.try_reserve`, which never waits). If
the window has no room, the run's claim is released and its message re-published with a
countdown of the computed wait (:class:`agentq.exceptions.RunDeferred`): the Celery slot is
free at once, and the run starts when capacity returns. A run that has started takes its
reserved permits for its first calls; only calls beyond the reservation, and retries, wait in
the run, briefly, because the run's work so far cannot be set aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from agentq.config import Settings

logger = logging.getLogger("agentq.limits")

KEY_PREFIX = "agentq:limits"
RELEASE_CHANNEL = f"{KEY_PREFIX}:released"

#: The provider sees a request a moment after its permit is granted; counting each request a
#: little longer than the window keeps the provider's window within the limit at its edge.
EDGE_FRACTION = 0.02
EDGE_MAX_SECONDS = 1.0

#: Longest single sleep of a waiter, so a lost wake-up costs at most this much.
MAX_SLEEP_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    """The quota of one model."""

    requests: int
    """Requests started per window."""
    tokens: int
    """Tokens per window."""
    concurrency: int
    """Requests in flight at once."""
    window: float
    """Seconds the request and token counts slide over."""
    lease: float
    """Seconds a permit in flight is held before it lapses (its holder may have died)."""

    @property
    def counted_window(self) -> float:
        return self.window + min(EDGE_MAX_SECONDS, self.window * EDGE_FRACTION)

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        rl = settings.rate_limits
        return cls(
            requests=rl.requests_per_minute,
            tokens=rl.tokens_per_minute,
            concurrency=rl.concurrent_requests,
            window=rl.window_seconds,
            # A call may take the whole request timeout; a permit outlives it a little.
            lease=settings.request_timeout * 2 + 5.0,
        )


@dataclass(frozen=True, slots=True)
class Denied:
    """No room now: ``wait`` seconds until there may be, because of ``reason``."""

    wait: float
    reason: str


@dataclass(slots=True)
class Reservation:
    """Permits reserved for a run's first calls to ``model``, consumed in order."""

    model: str
    ids: list[str] = field(default_factory=list)

    def take(self, model: str) -> str | None:
        if model != self.model or not self.ids:
            return None
        return self.ids.pop(0)


@dataclass(frozen=True, slots=True)
class Permit:
    """One call's right to reach the model; settle it when the call returns."""

    model: str
    request_id: str
    slot_id: str


def _new_id() -> str:
    return uuid.uuid4().hex


class Limiter:
    """Requests, tokens and concurrency per model. Subclasses keep the state."""

    enforced = True
    """False for :class:`NoLimiter`: callers may skip asking it, which costs a task per call."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.waits = 0
        """Times a call waited for capacity in this process."""
        self.deferrals = 0
        """Runs this process sent back to the queue for lack of capacity."""
        self._wakeups: dict[str, asyncio.Event] = {}

    # The state operations, atomic in each implementation.

    async def _attempt(
        self, model: str, entries: Sequence[tuple[str, int]], slot_id: str | None
    ) -> Denied | None:
        raise NotImplementedError

    async def _settle(self, model: str, request_id: str, tokens: int, slot_id: str) -> None:
        raise NotImplementedError

    async def _drop(self, model: str, ids: Sequence[str]) -> None:
        raise NotImplementedError

    async def _listen(self) -> None:
        """Make sure releases by other processes wake this one's waiters."""

    async def close(self) -> None:
        """Release what the limiter holds (connections, listeners)."""

    # The API.

    async def try_reserve(self, model: str, tokens: Sequence[int]) -> Reservation | Denied:
        """Reserve one request (with its tokens) per item of ``tokens`` now, or say how long
        until there is room. Never waits."""
        ids = [_new_id() for _ in tokens]
        denied = await self._attempt(model, list(zip(ids, tokens, strict=True)), None)
        if denied is not None:
            self.deferrals += 1
            return denied
        return Reservation(model, ids)

    async def acquire(
        self, model: str, tokens: int, reservation: Reservation | None = None
    ) -> Permit:
        """Wait until the model has room for one more request of ``tokens``, then take it."""
        request_id = (reservation.take(model) if reservation else None) or _new_id()
        slot_id = _new_id()
        while True:
            denied = await self._attempt(model, [(request_id, tokens)], slot_id)
            if denied is None:
                return Permit(model, request_id, slot_id)
            self.waits += 1
            logger.debug(
                "waiting for model capacity",
                extra={
                    "action": "rate_limit_wait",
                    "model": model,
                    "reason": denied.reason,
                    "wait_s": round(denied.wait, 3),
                },
            )
            await self._sleep(model, denied.wait)

    async def settle(self, permit: Permit, tokens: int) -> None:
        """The call returned having used ``tokens``: correct the estimate, free the slot."""
        await self._settle(permit.model, permit.request_id, max(0, tokens), permit.slot_id)
        self._wake(permit.model)

    async def release(self, reservation: Reservation | None) -> None:
        """Give back reserved permits the run did not use."""
        if reservation is None or not reservation.ids:
            return
        ids, reservation.ids = reservation.ids, []
        await self._drop(reservation.model, ids)
        self._wake(reservation.model)

    async def _sleep(self, model: str, seconds: float) -> None:
        await self._listen()
        event = self._wakeups.setdefault(model, asyncio.Event())
        pause = min(max(seconds, 0.001), MAX_SLEEP_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=pause)

    def _wake(self, model: str) -> None:
        event = self._wakeups.pop(model, None)
        if event is not None:
            event.set()


class NoLimiter(Limiter):
    """Limits off: every request may go at once."""

    enforced = False

    def __init__(self) -> None:
        super().__init__(Limits(1, 1, 1, 60.0, 60.0))

    async def _attempt(
        self, model: str, entries: Sequence[tuple[str, int]], slot_id: str | None
    ) -> Denied | None:
        return None

    async def _settle(self, model: str, request_id: str, tokens: int, slot_id: str) -> None:
        return None

    async def _drop(self, model: str, ids: Sequence[str]) -> None:
        return None


@dataclass(slots=True)
class _Window:
    requests: dict[str, tuple[float, int]] = field(default_factory=dict)
    in_flight: dict[str, float] = field(default_factory=dict)


class LocalLimiter(Limiter):
    """The limits of one process, for embedded mode (no Redis, one process)."""

    def __init__(self, limits: Limits, clock: Any = time.monotonic) -> None:
        super().__init__(limits)
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def _window(self, model: str, now: float) -> _Window:
        w = self._windows.setdefault(model, _Window())
        horizon = now - self.limits.counted_window
        w.requests = {k: v for k, v in w.requests.items() if v[0] > horizon}
        w.in_flight = {k: v for k, v in w.in_flight.items() if v > now}
        return w

    async def _attempt(
        self, model: str, entries: Sequence[tuple[str, int]], slot_id: str | None
    ) -> Denied | None:
        now = self._clock()
        w = self._window(model, now)
        denied = decide(
            self.limits,
            now,
            sorted(w.requests.values()),
            [(w.requests.get(i), t) for i, t in entries],
            len(w.in_flight) if slot_id is not None else None,
            min(w.in_flight.values(), default=None),
        )
        if denied is None:
            for request_id, tokens in entries:
                w.requests[request_id] = (now, tokens)
            if slot_id is not None:
                w.in_flight[slot_id] = now + self.limits.lease
        return denied

    async def _settle(self, model: str, request_id: str, tokens: int, slot_id: str) -> None:
        w = self._windows.setdefault(model, _Window())
        if request_id in w.requests:
            w.requests[request_id] = (max(w.requests[request_id][0], self._clock()), tokens)
        w.in_flight.pop(slot_id, None)

    async def _drop(self, model: str, ids: Sequence[str]) -> None:
        w = self._windows.setdefault(model, _Window())
        for request_id in ids:
            w.requests.pop(request_id, None)


def decide(
    limits: Limits,
    now: float,
    window: Sequence[tuple[float, int]],
    entries: Sequence[tuple[tuple[float, int] | None, int]],
    in_flight: int | None,
    first_lapse: float | None,
) -> Denied | None:
    """Whether ``entries`` fit the window (the in-process twin of the Lua script).

    ``window`` is the requests counted now, oldest first, as (time, tokens); each entry is the
    reserved request it takes over (or None for a new one) and its tokens; ``in_flight`` is the
    number of permits in flight when the caller asks for one, else None.
    """
    added = sum(1 for old, _ in entries if old is None)
    moved_tokens = sum(old[1] for old, _ in entries if old is not None)
    window_tokens = sum(tokens for _, tokens in window)
    others_tokens = window_tokens - moved_tokens
    new_tokens = others_tokens + sum(tokens for _, tokens in entries)
    waits: list[Denied] = []
    count = len(window)
    if added and count and count + added > limits.requests:
        # The oldest requests must age out until the new ones fit.
        need = min(count + added - limits.requests, count)
        waits.append(Denied(window[need - 1][0] + limits.counted_window - now, "requests"))
    if new_tokens > limits.tokens and others_tokens > 0:
        freed = 0
        until = window[-1][0]
        for stamp, tokens in window:
            freed += tokens
            until = stamp
            if new_tokens - freed <= limits.tokens:
                break
        waits.append(Denied(until + limits.counted_window - now, "tokens"))
    if waits:
        worst = max(waits, key=lambda d: d.wait)
        return Denied(max(worst.wait, 0.001), worst.reason)
    if in_flight is not None and in_flight >= limits.concurrency:
        lapse = (first_lapse - now) if first_lapse is not None else limits.lease
        return Denied(max(lapse, 0.001), "concurrency")
    return None


# KEYS: requests zset, tokens hash, in-flight zset.
# ARGV: counted window ms, request limit, token limit, concurrency limit, lease ms,
#       slot id ("" for none), then pairs of request id and tokens.
# Returns {1} when granted, else {0, wait ms, reason}.
_ATTEMPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local max_requests = tonumber(ARGV[2])
local max_tokens = tonumber(ARGV[3])
local max_slots = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local slot = ARGV[6]
local req, tok, fly = KEYS[1], KEYS[2], KEYS[3]

local old = redis.call('ZRANGEBYSCORE', req, '-inf', now - window)
for i = 1, #old, 500 do
  redis.call('HDEL', tok, unpack(old, i, math.min(i + 499, #old)))
end
redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', fly, '-inf', now)

local count = redis.call('ZCARD', req)
local window_tokens = 0
for _, v in ipairs(redis.call('HVALS', tok)) do window_tokens = window_tokens + tonumber(v) end

local added, moved, wanted = 0, 0, 0
for i = 7, #ARGV, 2 do
  local held = redis.call('HGET', tok, ARGV[i])
  if held then moved = moved + tonumber(held) else added = added + 1 end
  wanted = wanted + tonumber(ARGV[i + 1])
end
local others = window_tokens - moved
local new_tokens = others + wanted

local wait, reason = -1, ''
if added > 0 and count > 0 and count + added > max_requests then
  local need = math.min(count + added - max_requests, count)
  local at = redis.call('ZRANGE', req, need - 1, need - 1, 'WITHSCORES')
  wait = tonumber(at[2]) + window - now
  reason = 'requests'
end
if new_tokens > max_tokens and others > 0 then
  local freed, upto = 0, now
  local all = redis.call('ZRANGE', req, 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do
    freed = freed + tonumber(redis.call('HGET', tok, all[i]) or '0')
    upto = tonumber(all[i + 1])
    if new_tokens - freed <= max_tokens then break end
  end
  local w = upto + window - now
  if w > wait then wait = w; reason = 'tokens' end
end
if wait < 0 and slot ~= '' and redis.call('ZCARD', fly) >= max_slots then
  local first = redis.call('ZRANGE', fly, 0, 0, 'WITHSCORES')
  wait = tonumber(first[2]) - now
  reason = 'concurrency'
end
if reason ~= '' then
  return {0, math.max(wait, 1), reason}
end

for i = 7, #ARGV, 2 do
  redis.call('ZADD', req, now, ARGV[i])
  redis.call('HSET', tok, ARGV[i], ARGV[i + 1])
end
if slot ~= '' then redis.call('ZADD', fly, now + lease, slot) end
local keep = math.ceil(window + lease)
redis.call('PEXPIRE', req, keep)
redis.call('PEXPIRE', tok, keep)
redis.call('PEXPIRE', fly, keep)
return {1}
"""

# KEYS: requests zset, tokens hash, in-flight zset. ARGV: request id, tokens, slot id,
# channel, model. Corrects the request's tokens while it is still counted, counts it from
# now on (the provider saw it somewhere between its permit and now), and frees the slot.
_SETTLE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], 'XX', 'GT', now, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS: requests zset, tokens hash. ARGV: channel, model, request ids.
_DROP = """
for i = 3, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""


def _keys(model: str) -> list[str]:
    # One hash tag per model keeps a model's keys in one Redis Cluster slot.
    base = f"{KEY_PREFIX}:{{{model}}}"
    return [f"{base}:requests", f"{base}:tokens", f"{base}:in_flight"]


class RedisLimiter(Limiter):
    """The cluster's limits, kept in Redis and shared by every worker process and host."""

    def __init__(self, limits: Limits, redis: Redis[bytes]) -> None:
        super().__init__(limits)
        self.redis = redis
        self._attempt_script = redis.register_script(_ATTEMPT)
        self._settle_script = redis.register_script(_SETTLE)
        self._drop_script = redis.register_script(_DROP)
        self._listener: asyncio.Task[None] | None = None

    async def _attempt(
        self, model: str, entries: Sequence[tuple[str, int]], slot_id: str | None
    ) -> Denied | None:
        args: list[Any] = [
            math.ceil(self.limits.counted_window * 1000),
            self.limits.requests,
            self.limits.tokens,
            self.limits.concurrency,
            math.ceil(self.limits.lease * 1000),
            slot_id or "",
        ]
        for request_id, tokens in entries:
            args += [request_id, int(tokens)]
        reply = await self._attempt_script(keys=_keys(model), args=args)
        if int(reply[0]) == 1:
            return None
        reason = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
        return Denied(int(reply[1]) / 1000.0, reason)

    async def _settle(self, model: str, request_id: str, tokens: int, slot_id: str) -> None:
        await self._settle_script(
            keys=_keys(model), args=[request_id, int(tokens), slot_id, RELEASE_CHANNEL, model]
        )

    async def _drop(self, model: str, ids: Sequence[str]) -> None:
        await self._drop_script(keys=_keys(model)[:2], args=[RELEASE_CHANNEL, model, *ids])

    async def _listen(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._serve_wakeups())

    async def _serve_wakeups(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(RELEASE_CHANNEL)
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                data = message.get("data")
                self._wake(data.decode() if isinstance(data, bytes) else str(data))
        except asyncio.CancelledError:
            raise
        except Exception:
            # Waiters still wake at their computed time; the next wait starts a new listener.
            logger.warning("limit wake-up listener stopped", exc_info=True)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener


def make_limiter(settings: Settings, redis: Redis[bytes] | None) -> Limiter:
    """The process's limiter: shared through Redis, in process without it, or none."""
    if not settings.rate_limits.enabled:
        return NoLimiter()
    limits = Limits.from_settings(settings)
    if redis is None:
        return LocalLimiter(limits)
    return RedisLimiter(limits, redis)
