"""The periodic schedule Celery Beat publishes; each entry is a task the workers run."""

from __future__ import annotations

from typing import Any

from agentq.config import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Entries for ``beat_schedule``. Jobs join here as they are built."""
    del settings
    return {}
