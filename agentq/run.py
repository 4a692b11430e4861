"""The run: what a producer asks for, the states it passes through, and what it produced."""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agentq.exceptions import InvalidRunRequest


class Priority(enum.StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


#: Queues are consumed in this order, so a high-priority run overtakes any backlog.
PRIORITY_ORDER: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    AWAITING_APPROVAL = "awaiting_approval"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})

#: The run state machine. A redelivered message re-enters ``running`` from ``running`` when
#: the previous holder's lease has lapsed (its worker died).
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.RUNNING,
            RunStatus.QUEUED,
            RunStatus.SUCCEEDED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
            RunStatus.AWAITING_APPROVAL,
        }
    ),
    RunStatus.AWAITING_APPROVAL: frozenset(
        {RunStatus.QUEUED, RunStatus.CANCELLED, RunStatus.FAILED}
    ),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}


def can_transition(current: RunStatus, new: RunStatus) -> bool:
    return new in TRANSITIONS[current]


class ErrorType(enum.StrEnum):
    """Why a run failed; stored with the run so a person knows what to do."""

    UNKNOWN_AGENT = "unknown_agent"
    INVALID_REQUEST = "invalid_request"
    GUARDRAIL = "guardrail"
    MAX_TURNS = "max_turns"
    MODEL_BEHAVIOR = "model_behavior"
    MODEL_ERROR = "model_error"
    TIMEOUT = "timeout"
    TOOL_ERROR = "tool_error"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


AGENT_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,99}$")
MAX_WAIT_SECONDS = 7 * 24 * 3600.0


def validate_agent_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidRunRequest("agent name must be a non-empty string", field="agent")
    if not AGENT_NAME.match(name):
        raise InvalidRunRequest(
            f"agent name {name!r} is malformed: use lower-case letters, digits, '_', '-' or '.', "
            "starting with a letter, at most 100 characters",
            field="agent",
        )
    return name


def validate_timeout(timeout: Any, *, name: str = "timeout") -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidRunRequest(f"{name} must be a number of seconds", field=name)
    if math.isnan(timeout) or timeout < 0 or timeout > MAX_WAIT_SECONDS:
        raise InvalidRunRequest(
            f"{name} must be between 0 and {MAX_WAIT_SECONDS:g} seconds, got {timeout!r}",
            field=name,
        )
    return float(timeout)


def parse_priority(priority: Any) -> Priority:
    try:
        return Priority(priority)
    except ValueError:
        allowed = ", ".join(p.value for p in PRIORITY_ORDER)
        raise InvalidRunRequest(
            f"priority must be one of {allowed}, got {priority!r}", field="priority"
        ) from None


@dataclass(frozen=True, slots=True)
class RunRequest:
    """A validated request for one agent run. Build it with :meth:`create`."""

    id: str
    agent: str
    input: str
    priority: Priority
    context: dict[str, Any] | None
    context_json: str | None
    idempotency_key: str | None
    max_turns: int | None = None
    max_tokens: int | None = None
    use_cache: bool = True

    @classmethod
    def create(
        cls,
        agent: Any,
        input: Any,
        *,
        priority: Any = "normal",
        context: Any = None,
        idempotency_key: Any = None,
        max_input_chars: int,
        max_context_bytes: int,
        max_turns: Any = None,
        max_tokens: Any = None,
        cache: Any = True,
        max_turns_limit: int = 1000,
        max_tokens_limit: int = 1_000_000,
    ) -> RunRequest:
        validate_agent_name(agent)
        if not isinstance(input, str):
            raise InvalidRunRequest("input must be a string", field="input")
        if not input.strip():
            raise InvalidRunRequest("input must not be empty", field="input")
        if len(input) > max_input_chars:
            raise InvalidRunRequest(
                f"input is {len(input)} characters, over the limit of {max_input_chars} "
                "(AGENTQ_MAX_INPUT_CHARS)",
                field="input",
            )
        context_json = None
        if context is not None:
            if not isinstance(context, dict):
                raise InvalidRunRequest("context must be a JSON object (a dict)", field="context")
            try:
                context_json = json.dumps(context, allow_nan=False, separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise InvalidRunRequest(
                    f"context is not JSON-serialisable: {exc}", field="context"
                ) from None
            if len(context_json.encode()) > max_context_bytes:
                raise InvalidRunRequest(
                    f"context is over the limit of {max_context_bytes} bytes "
                    "(AGENTQ_MAX_CONTEXT_BYTES)",
                    field="context",
                )
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 255
        ):
            raise InvalidRunRequest(
                "idempotency_key must be a string of 1 to 255 characters", field="idempotency_key"
            )
        if not isinstance(cache, bool):
            raise InvalidRunRequest("cache must be True or False", field="cache")
        return cls(
            id=new_run_id(),
            agent=agent,
            input=input,
            priority=parse_priority(priority),
            context=context,
            context_json=context_json,
            idempotency_key=idempotency_key,
            max_turns=_bounded_override(max_turns, "max_turns", max_turns_limit, "MAX_TURNS_LIMIT"),
            max_tokens=_bounded_override(
                max_tokens, "max_tokens", max_tokens_limit, "MAX_TOKENS_LIMIT"
            ),
            use_cache=cache,
        )


def _bounded_override(value: Any, name: str, limit: int, setting: str) -> int | None:
    """A per-run limit: None keeps the configured one, else an integer in 1..limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRunRequest(f"{name} must be a whole number", field=name)
    if not 1 <= value <= limit:
        raise InvalidRunRequest(
            f"{name} must be between 1 and {limit} (AGENTQ_{setting}), got {value}", field=name
        )
    return value


def new_run_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class Run:
    """A run as stored: its request, where it is in its life, and what it produced."""

    id: str
    agent: str
    input: str
    priority: Priority
    status: RunStatus
    context: dict[str, Any] | None = None
    idempotency_key: str | None = None
    output: str | None = None
    error: str | None = None
    error_type: str | None = None
    usage: Usage = field(default_factory=Usage)
    model: str | None = None
    turns: int = 0
    tool_calls: int = 0
    attempts: int = 0
    cached: bool = False
    worker: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    batch_id: str | None = None
    max_turns: int | None = None
    max_tokens: int | None = None
    use_cache: bool = True
    model_attempts: int = 0
    """Model calls tried for the run, retries and fallback calls included."""
    fallback_used: bool = False
    """True when the fallback model answered (``model`` then names the fallback)."""

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def duration_ms(self) -> float | None:
        """Time from the last start to the end of the run."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds() * 1000.0

    @property
    def queue_ms(self) -> float | None:
        """Time the run waited in the queue before a worker started it."""
        if self.created_at is None or self.started_at is None:
            return None
        return (self.started_at - self.created_at).total_seconds() * 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent": self.agent,
            "input": self.input,
            "priority": self.priority.value,
            "status": self.status.value,
            "context": self.context,
            "idempotency_key": self.idempotency_key,
            "output": self.output,
            "error": self.error,
            "error_type": self.error_type,
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens,
                "total_tokens": self.usage.total_tokens,
                "requests": self.usage.requests,
            },
            "model": self.model,
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "attempts": self.attempts,
            "cached": self.cached,
            "model_attempts": self.model_attempts,
            "fallback_used": self.fallback_used,
            "max_turns": self.max_turns,
            "max_tokens": self.max_tokens,
            "use_cache": self.use_cache,
            "worker": self.worker,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_ms": self.duration_ms,
            "queue_ms": self.queue_ms,
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None
