"""A Beat scheduler that fires each entry at most once per slot, however many Beats run.

Before publishing, a Beat claims ``(entry, slot)`` in Redis with ``SET NX``; a second Beat
started by mistake finds the slot taken and publishes nothing. The slot is the start of the
entry's current period (interval entries) or the scheduled minute (crontab entries), and it
travels to the job as its ``slot`` argument, so the job itself can be idempotent per slot.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery.beat import PersistentScheduler, ScheduleEntry
from celery.schedules import crontab, schedule

if TYPE_CHECKING:
    import redis

logger = logging.getLogger("agentq.beat")

#: Prefix of the Redis keys that record which slots have fired.
SLOT_KEY_PREFIX = "agentq:beat:slot:"


def period_of(entry_schedule: Any) -> float:
    """Seconds between firings; a crontab fires at most once a minute."""
    if isinstance(entry_schedule, crontab):
        return 60.0
    if isinstance(entry_schedule, schedule):
        return float(entry_schedule.run_every.total_seconds())
    return 60.0


def slot_of(entry_schedule: Any, now: float) -> datetime:
    """The start of the slot ``now`` falls in: same answer in every Beat process."""
    period = period_of(entry_schedule)
    start = math.floor(now / period) * period
    return datetime.fromtimestamp(start, UTC)


class SlotScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler with a per-slot claim in Redis before each publish."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._redis: redis.Redis[bytes] | None = None
        super().__init__(*args, **kwargs)

    def _claims(self) -> redis.Redis[bytes]:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.app.conf.broker_url)
        return self._redis

    def claim(self, name: str, slot: datetime, period: float) -> bool:
        key = f"{SLOT_KEY_PREFIX}{name}:{slot.isoformat()}"
        # The key outlives the slot so a Beat lagging behind cannot claim it again.
        ttl = max(120, math.ceil(period * 3))
        return bool(self._claims().set(key, "1", nx=True, ex=ttl))

    def apply_async(
        self,
        entry: ScheduleEntry,
        producer: Any = None,
        advance: bool = True,
        **kwargs: Any,
    ) -> Any:
        entry = self.reserve(entry) if advance else entry
        slot = slot_of(entry.schedule, time.time())
        if not self.claim(entry.name, slot, period_of(entry.schedule)):
            logger.info(
                "slot already fired",
                extra={"action": "beat_slot_taken", "entry": entry.name, "slot": slot.isoformat()},
            )
            return None
        fired = copy.copy(entry)
        fired.kwargs = {**(entry.kwargs or {}), "slot": slot.isoformat()}
        return super().apply_async(fired, producer=producer, advance=False, **kwargs)
