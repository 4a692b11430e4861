"""Every error agentq raises derives from :class:`AgentqError`.

A class's docstring is its default message, so ``raise RunNotFound()`` reads well and callers
can still pass a more precise message. Errors carry the data a caller needs to act on them.
"""

from __future__ import annotations

from typing import Any


class AgentqError(Exception):
    """An agentq operation failed."""

    def __init__(self, message: str | None = None, **data: Any) -> None:
        self.data = data
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(AgentqError):
    """The configuration is invalid."""


class InvalidRunRequest(AgentqError):
    """The run request is invalid; nothing was stored or sent."""

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.field = field


class RunNotFound(AgentqError):
    """No run has that id."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run has id {run_id!r}", run_id=run_id)
        self.run_id = run_id


class RunTimeout(AgentqError):
    """The run did not finish in time."""

    def __init__(self, run_id: str, timeout: float, status: str) -> None:
        super().__init__(
            f"run {run_id} still {status} after {timeout:g} s", run_id=run_id, status=status
        )
        self.run_id = run_id
        self.timeout = timeout
        self.status = status


class BrokerUnavailable(AgentqError):
    """The broker could not be reached; the run is stored and will be published again."""


class StoreUnavailable(AgentqError):
    """The database could not be reached."""


class UnknownAgent(AgentqError):
    """No agent is registered under that name."""

    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"no agent is registered as {name!r} (registered: {listed})", name=name, known=known
        )
        self.name = name


class RegistryError(AgentqError):
    """An agent could not be registered or loaded."""


class RunHandedBack(AgentqError):
    """The worker stopped before the run finished and gave it back for another worker."""


class RunCancelled(AgentqError):
    """The run was cancelled."""


class RunDeadlineExceeded(AgentqError):
    """The run exceeded its whole-run deadline."""


class RunDeferred(RunHandedBack):
    """The model's rate limits have no room for the run yet; it is queued again until they do."""

    def __init__(self, countdown: float, reason: str) -> None:
        super().__init__(
            f"rate limit ({reason}) has no room; run deferred for {countdown:.2f} s",
            countdown=countdown,
            reason=reason,
        )
        self.countdown = countdown
        self.reason = reason


class ModelUnavailable(AgentqError):
    """The model kept failing after every retry (and the fallback model, if any)."""
