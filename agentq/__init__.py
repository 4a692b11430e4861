"""agentq: run OpenAI Agents SDK agent runs in production through Celery, Redis and Postgres."""

from __future__ import annotations

from agentq.client import Client, RunHandle
from agentq.exceptions import AgentqError
from agentq.registry import registry
from agentq.run import Priority, Run, RunStatus, Usage

__all__ = [
    "AgentqError",
    "Client",
    "Priority",
    "Run",
    "RunHandle",
    "RunStatus",
    "Usage",
    "registry",
]
__version__ = "0.1.0"
