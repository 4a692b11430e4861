"""The overall health state and its transitions, on an in-memory SQLite store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool

from agentq.health import CheckResult, HealthRecorder, HealthState
from agentq.store import metadata, utcnow


@pytest.fixture
def recorder() -> Iterator[HealthRecorder]:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    metadata.create_all(engine)
    yield HealthRecorder(engine, checks=("database", "model"))
    engine.dispose()


def result(check: str, healthy: bool = True) -> CheckResult:
    return CheckResult(check, healthy, 1.0, utcnow(), error=None if healthy else "down")


def test_healthy_only_once_every_check_has_passed(recorder: HealthRecorder) -> None:
    assert recorder.record(result("database")) is None
    assert recorder.state()[0] is HealthState.UNKNOWN

    became = recorder.record(result("model"))
    assert became is not None
    assert (became.previous, became.state) == (HealthState.UNKNOWN, HealthState.HEALTHY)


def test_one_transition_per_change_and_none_while_it_lasts(recorder: HealthRecorder) -> None:
    recorder.record(result("database"))
    recorder.record(result("model"))

    down = recorder.record(result("database", healthy=False))
    assert down is not None and down.state is HealthState.DEGRADED
    assert down.failing == {"database": "down"}
    assert recorder.record(result("database", healthy=False)) is None
    assert recorder.record(result("model")) is None

    up = recorder.record(result("database"))
    assert up is not None
    assert (up.previous, up.state) == (HealthState.DEGRADED, HealthState.HEALTHY)
    assert recorder.state()[:2] == (HealthState.HEALTHY, {})


def test_a_failing_check_degrades_even_before_the_others_ran(recorder: HealthRecorder) -> None:
    first = recorder.record(result("model", healthy=False))
    assert first is not None and first.state is HealthState.DEGRADED
