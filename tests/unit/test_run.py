"""Run requests are validated before anything is stored; the run state machine."""

from __future__ import annotations

import math
from typing import Any

import pytest

from agentq.exceptions import InvalidRunRequest
from agentq.run import (
    FINISHED,
    TRANSITIONS,
    Priority,
    RunRequest,
    RunStatus,
    can_transition,
    validate_timeout,
)

LIMITS = {"max_input_chars": 1000, "max_context_bytes": 200}


def request(agent: Any = "support", text: Any = "hi", **options: Any) -> RunRequest:
    return RunRequest.create(agent, text, **LIMITS, **options)


def test_a_valid_request() -> None:
    r = request(priority="high", context={"user_id": 7}, idempotency_key="order-7")
    assert r.priority is Priority.HIGH
    assert r.context_json == '{"user_id":7}'
    assert len(r.id) == 32
    assert request().id != r.id


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"agent": None}, "agent"),
        ({"agent": ""}, "agent"),
        ({"agent": "Support"}, "agent"),
        ({"agent": "1support"}, "agent"),
        ({"agent": "a" * 101}, "agent"),
        ({"agent": "sup port"}, "agent"),
        ({"text": None}, "input"),
        ({"text": "   "}, "input"),
        ({"text": "x" * 1001}, "input"),
        ({"priority": "urgent"}, "priority"),
        ({"priority": 1}, "priority"),
        ({"context": "user=7"}, "context"),
        ({"context": {"n": math.nan}}, "context"),
        ({"context": {"blob": "x" * 300}}, "context"),
        ({"context": {"f": print}}, "context"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": 7}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
    ],
)
def test_bad_input_raises_a_typed_error_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRunRequest) as refused:
        request(**kwargs)
    assert refused.value.field == field
    assert str(refused.value)


@pytest.mark.parametrize("timeout", [-1, math.nan, math.inf, 10**9, "10", True])
def test_absurd_timeouts_are_refused(timeout: Any) -> None:
    with pytest.raises(InvalidRunRequest):
        validate_timeout(timeout)


def test_sensible_timeouts_pass() -> None:
    assert validate_timeout(None) is None
    assert validate_timeout(0) == 0.0
    assert validate_timeout(2.5) == 2.5


def test_finished_runs_never_change() -> None:
    for status in FINISHED:
        assert TRANSITIONS[status] == frozenset()
        assert status.finished


def test_state_machine_paths() -> None:
    assert can_transition(RunStatus.QUEUED, RunStatus.RUNNING)
    assert can_transition(RunStatus.QUEUED, RunStatus.CANCELLED)
    assert can_transition(RunStatus.RUNNING, RunStatus.SUCCEEDED)
    # A lapsed lease lets a new worker take the run over.
    assert can_transition(RunStatus.RUNNING, RunStatus.RUNNING)
    # A worker stopping hands its run back.
    assert can_transition(RunStatus.RUNNING, RunStatus.QUEUED)
    assert can_transition(RunStatus.AWAITING_APPROVAL, RunStatus.QUEUED)
    assert not can_transition(RunStatus.QUEUED, RunStatus.SUCCEEDED)
    assert not can_transition(RunStatus.SUCCEEDED, RunStatus.RUNNING)
    assert not can_transition(RunStatus.CANCELLED, RunStatus.QUEUED)
    assert set(TRANSITIONS) == set(RunStatus)
