"""Telemetry hooks: fan-out, the observation of one run, statsd metrics, scrubbing, traces."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from statsd.client.base import StatsClientBase
from statsd.client.udp import Pipeline

from agentq.exceptions import RunHandedBack
from agentq.logs import Redactor
from agentq.run import Priority, RunStatus, Usage
from agentq.store import Claim, Outcome
from agentq.telemetry import (
    RunObserver,
    Sampler,
    StatsdObserver,
    Telemetry,
    current_run,
    metric_part,
    scrubbed,
)
from agentq.tracing import TraceRecorder, format_traces


def _claim(agent: str = "support", attempt: int = 1, run_id: str = "r1") -> Claim:
    now = datetime.now(UTC)
    return Claim(run_id, agent, "Where is my order?", None, Priority.HIGH, attempt, now, now)


class Recorder(RunObserver):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def run_started(self, claim: Claim) -> None:
        self.calls.append(("started", (claim.run_id, current_run.get())))

    def run_finished(self, claim: Claim, outcome: Outcome, duration_ms: float, exc: Any) -> None:
        self.calls.append(("finished", (outcome.status, duration_ms, exc)))

    def run_handed_back(self, claim: Claim, duration_ms: float, reason: str) -> None:
        self.calls.append(("handed_back", (reason,)))

    def run_crashed(self, claim: Claim, exception: BaseException, duration_ms: float) -> None:
        self.calls.append(("crashed", (type(exception),)))

    def model_retry(self, model: str, reason: str) -> None:
        self.calls.append(("retry", (model, reason)))


class Broken(RunObserver):
    def run_finished(self, *_: Any) -> None:
        raise RuntimeError("observer bug")


def test_an_observed_run_reports_start_and_outcome_with_its_duration() -> None:
    seen = Recorder()
    telemetry = Telemetry([seen])
    claim = _claim()
    error = ValueError("tool broke")
    with telemetry.observe(claim) as observed:
        assert current_run.get() is claim
        observed.finish(Outcome(RunStatus.FAILED, error="x"), error)
    assert current_run.get() is None
    assert seen.calls[0] == ("started", ("r1", claim))
    name, (status, duration, exc) = seen.calls[1]
    assert (name, status, exc) == ("finished", RunStatus.FAILED, error)
    assert duration >= 0


@pytest.mark.parametrize("raised", [asyncio.CancelledError()])
def test_a_run_given_back_at_shutdown_is_reported_as_handed_back(raised: BaseException) -> None:
    seen = Recorder()
    with pytest.raises(type(raised)), Telemetry([seen]).observe(_claim()):
        raise raised
    assert [name for name, _ in seen.calls] == ["started", "handed_back"]
    assert seen.calls[-1][1] == ("shutdown",)


def test_a_deferred_run_is_handed_back_with_its_reason() -> None:
    seen = Recorder()

    class Deferred(RunHandedBack):
        """deferred: rate limit"""

    with pytest.raises(Deferred), Telemetry([seen]).observe(_claim()):
        raise Deferred()
    assert seen.calls[-1] == ("handed_back", ("deferred: rate limit",))


def test_a_run_that_raises_is_reported_as_crashed_and_the_error_propagates() -> None:
    seen = Recorder()
    with pytest.raises(KeyError), Telemetry([seen]).observe(_claim()):
        raise KeyError("store")
    assert seen.calls[-1] == ("crashed", (KeyError,))


def test_a_failing_observer_neither_fails_the_run_nor_silences_the_others() -> None:
    seen = Recorder()
    telemetry = Telemetry([Broken(), seen])
    with telemetry.observe(_claim()) as observed:
        observed.finish(Outcome(RunStatus.SUCCEEDED))
    telemetry.model_retry("gpt-4o", "rate_limit")
    assert [name for name, _ in seen.calls] == ["started", "finished", "retry"]


class FakeStatsd(StatsClientBase):  # type: ignore[misc]
    """Collects what would be sent over UDP."""

    def __init__(self) -> None:
        self._prefix = None
        self._maxudpsize = 512
        self.packets: list[str] = []

    def _send(self, data: str) -> None:
        self.packets.append(data)

    def pipeline(self) -> Pipeline:
        return Pipeline(self)

    def close(self) -> None:
        pass

    def lines(self) -> list[str]:
        return [line for packet in self.packets for line in packet.split("\n")]


def test_a_finished_run_sends_the_guides_metrics_in_one_packet() -> None:
    client = FakeStatsd()
    observer = StatsdObserver(client)
    usage = Usage(input_tokens=80, output_tokens=14, total_tokens=94, requests=2)
    observer.run_finished(_claim(), Outcome(RunStatus.SUCCEEDED, usage=usage), 123.4, None)
    assert len(client.packets) == 1
    assert client.lines() == [
        "agent.execution.duration.support:123.400000|ms",
        "agent.execution.success.support:1|c",
        "agent.execution.success.total:1|c",
        "agent.execution.total:1|c",
        "agent.tokens.input.support:80|g",
        "agent.tokens.output.support:14|g",
        "agent.tokens.total.support:94|g",
        "agent.tokens.total.all:94|c",
    ]


def test_a_failed_run_counts_as_a_failure_of_its_agent() -> None:
    client = FakeStatsd()
    StatsdObserver(client).run_finished(_claim("billing.v2"), Outcome(RunStatus.FAILED), 5.0, None)
    lines = client.lines()
    assert "agent.execution.failure.billing_v2:1|c" in lines
    assert "agent.execution.failure.total:1|c" in lines
    assert not any("success" in line for line in lines)


def test_cache_lookups_report_hits_misses_and_hit_rate() -> None:
    client = FakeStatsd()
    observer = StatsdObserver(client)
    for hit in (True, False, True, True):
        observer.cache_lookup("support", hit)
    assert client.packets[-1].split("\n") == [
        "agent.cache.hits:3|g",
        "agent.cache.misses:1|g",
        "agent.cache.hit_rate:0.75|g",
    ]


def test_retries_queue_depth_and_in_flight_have_metrics() -> None:
    client = FakeStatsd()
    observer = StatsdObserver(client)
    observer.run_started(_claim(attempt=2))
    observer.model_retry("gpt-4.1", "rate_limit")
    observer.queue_depth("high", 7)
    observer.in_flight(3)
    lines = client.lines()
    assert "agent.execution.retries:1|c" in lines
    assert "agent.model.retries.total:1|c" in lines
    assert "agent.model.retries.gpt-4_1:1|c" in lines
    assert "agent.queue.depth.high:7|g" in lines
    assert "agent.runs.in_flight:3|g" in lines


def test_scaling_decisions_have_metrics() -> None:
    client = FakeStatsd()
    observer = StatsdObserver(client)
    observer.pool_resized(2, 50)
    observer.pool_resized(50, 10)
    lines = client.lines()
    assert lines.count("agent.worker.scaled.up:1|c") == 1
    assert lines.count("agent.worker.scaled.down:1|c") == 1
    assert "agent.worker.slots:50|g" in lines and "agent.worker.slots:10|g" in lines


def test_the_sampler_reports_depth_per_priority_and_survives_a_broker_error() -> None:
    client = FakeStatsd()
    telemetry = Telemetry([StatsdObserver(client)])
    depths = iter([{"high": 1, "normal": 2, "low": 0}])

    def read() -> dict[str, int]:
        return next(depths)  # the second call raises StopIteration, like a broker error

    sampler = Sampler(telemetry, read, lambda: 4, interval=60)
    sampler.sample()
    sampler.sample()
    lines = client.lines()
    assert lines.count("agent.runs.in_flight:4|g") == 2
    assert "agent.queue.depth.normal:2|g" in lines


def test_metric_parts_cannot_split_a_name() -> None:
    assert metric_part("a.b c/d") == "a_b_c_d"
    assert metric_part("") == "_"


def test_scrubbing_reaches_every_string_of_an_event() -> None:
    event = {
        "message": "key sk-abcdefghijk for Where is my order?",
        "exception": {"values": [{"value": "Where is my order? failed"}]},
        "tags": {"agent": "support"},
        "level": 40,
    }
    clean = scrubbed(event, Redactor(["Where is my order?"]))
    text = str(clean)
    assert "sk-abcdefghijk" not in text
    assert "Where is my order?" not in text
    assert clean["tags"] == {"agent": "support"}
    assert clean["level"] == 40


class FakeTrace:
    def __init__(self, trace_id: str) -> None:
        self.trace_id = trace_id
        self.name = "Agent workflow"
        self.group_id: str | None = None
        self.metadata: dict[str, Any] | None = None


class FakeSpan:
    def __init__(self, span_id: str, parent: str | None, data: dict[str, Any], ms: float) -> None:
        self.span_id = span_id
        self.trace_id = "trace_1"
        start = datetime(2026, 1, 1, tzinfo=UTC)
        self._export = {
            "id": span_id,
            "trace_id": "trace_1",
            "parent_id": parent,
            "started_at": start.isoformat(),
            "ended_at": (start + timedelta(milliseconds=ms)).isoformat(),
            "span_data": data,
            "error": None,
        }

    def export(self) -> dict[str, Any]:
        return self._export


def test_the_recorder_links_traces_to_the_run_and_buffers_rows() -> None:
    recorder = TraceRecorder(engine=None, redactor=Redactor(["s3cret-value"]))  # type: ignore[arg-type]
    claim = _claim(run_id="run42", attempt=2)
    token = current_run.set(claim)
    try:
        trace = FakeTrace("trace_1")
        recorder.on_trace_start(trace)
        recorder.on_span_end(
            FakeSpan(
                "span_b",
                "span_a",
                {"type": "response", "response_id": "resp_1", "usage": {"input_tokens": 40}},
                12.5,
            )
        )
        recorder.on_span_end(
            FakeSpan(
                "span_c", "span_a", {"type": "function", "name": "add", "input": "s3cret-value"}, 1
            )
        )
        recorder.on_span_end(FakeSpan("span_a", None, {"type": "agent", "name": "support"}, 20))
        recorder.on_trace_end(trace)
    finally:
        current_run.reset(token)
    assert trace.metadata == {"run_id": "run42", "attempt": 2}
    assert trace.group_id == "run42"
    (row,) = recorder._traces
    assert (row["run_id"], row["attempt"]) == ("run42", 2)
    spans = {span["id"]: span for span in recorder._spans}
    assert {span["run_id"] for span in spans.values()} == {"run42"}
    assert spans["span_b"]["kind"] == "response"
    assert spans["span_b"]["input_tokens"] == 40
    assert spans["span_b"]["duration_ms"] == pytest.approx(12.5)
    assert "s3cret-value" not in spans["span_c"]["data"]

    shown = format_traces(
        [
            {
                **row,
                "spans": [
                    {**span, "data": None, "error": None}
                    for span in sorted(spans.values(), key=lambda s: s["id"])
                ],
            }
        ]
    )
    lines = shown.splitlines()
    assert lines[0].startswith("trace trace_1  attempt 2")
    assert lines[1].strip().startswith("agent  support")
    assert lines[2].startswith("    response  resp_1  12.5 ms  tokens 40 in / 0 out")
    assert lines[3].startswith("    function  add")


def test_without_statsd_or_sentry_only_logs_are_wired() -> None:
    from agentq.config import load_settings
    from agentq.telemetry import LogObserver, build_telemetry

    telemetry = build_telemetry(load_settings(STATSD_HOST="", SENTRY_DSN=""))
    assert [type(o) for o in telemetry.observers] == [LogObserver]
    # Every hook is still safe to call.
    telemetry.cache_lookup("support", True)
    telemetry.queue_depth("high", 3)
    telemetry.close()


def test_statsd_is_wired_when_a_host_is_set_unless_metrics_are_off() -> None:
    from agentq.config import load_settings
    from agentq.telemetry import build_telemetry

    on = build_telemetry(load_settings(STATSD_HOST="127.0.0.1", SENTRY_DSN=""))
    assert any(isinstance(o, StatsdObserver) for o in on.observers)
    on.close()
    off = build_telemetry(
        load_settings(STATSD_HOST="127.0.0.1", SENTRY_DSN="", enable_metrics=False)
    )
    assert not any(isinstance(o, StatsdObserver) for o in off.observers)
