"""Telemetry from real worker processes: statsd over UDP, Sentry over HTTP, traces in Postgres."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sqlalchemy

from agentq.client import Client
from agentq.testing import MockOpenAIServer
from tests.integration.test_cli import agentq
from tests.integration.waiting import wait_for

pytestmark = pytest.mark.integration

API_KEY = "sk-test-not-a-real-key"


class StatsdListener:
    """A UDP socket standing in for statsd; keeps every metric line it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.extend(data.decode().splitlines())

    def values(self, name: str, kind: str) -> list[float]:
        found = []
        for line in list(self.lines):
            metric, _, rest = line.partition(":")
            value, _, rest = rest.partition("|")
            if metric == name and rest.split("|")[0] == kind:
                found.append(float(value))
        return found

    def names(self) -> set[str]:
        return {line.partition(":")[0] for line in list(self.lines)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class SentryListener:
    """An HTTP server standing in for Sentry: decodes the envelopes the SDK posts."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.events: list[dict[str, Any]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli  # type: ignore[import-not-found]

                    body = brotli.decompress(body)
                listener.receive(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.port}/1"

    def receive(self, path: str, body: bytes) -> None:
        self.raw.append(body)
        if not path.startswith("/api/1/envelope"):
            return
        lines = body.split(b"\n")
        # Envelope: a header line, then item header / item payload pairs.
        for index in range(1, len(lines) - 1, 2):
            try:
                header = json.loads(lines[index])
            except ValueError:
                continue
            if header.get("type") == "event":
                self.events.append(json.loads(lines[index + 1]))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def statsd() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


@pytest.fixture
def sentry() -> Iterator[SentryListener]:
    listener = SentryListener()
    yield listener
    listener.close()


def test_statsd_receives_the_guides_metrics_for_a_known_set_of_runs(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, statsd: StatsdListener
) -> None:
    mock_model.configure(input_tokens=40, output_tokens=7)
    start_worker(
        extra_env={
            "STATSD_HOST": "127.0.0.1",
            "STATSD_PORT": str(statsd.port),
            "AGENTQ_METRICS_INTERVAL": "0.3",
        }
    )
    items = [
        *({"agent": "calculator", "input": f"What is {i} plus 1?"} for i in range(3)),
        *({"agent": "echo", "input": f"Say {word}"} for word in ("yes", "no")),
        {"agent": "leaky", "input": "Where is order 7?", "priority": "high"},
    ]
    runs = client.wait_many([h.id for h in client.submit_many(items)], timeout=60)
    assert [r.status.value for r in runs] == ["succeeded"] * 5 + ["failed"]

    wait_for(lambda: len(statsd.values("agent.execution.total", "c")) >= 6, 10, "all runs")
    wait_for(lambda: statsd.values("agent.runs.in_flight", "g"), 10, "a sample")
    assert sum(statsd.values("agent.execution.total", "c")) == 6
    assert sum(statsd.values("agent.execution.success.calculator", "c")) == 3
    assert sum(statsd.values("agent.execution.success.echo", "c")) == 2
    assert sum(statsd.values("agent.execution.failure.leaky", "c")) == 1
    assert sum(statsd.values("agent.execution.success.total", "c")) == 5
    assert sum(statsd.values("agent.execution.failure.total", "c")) == 1
    assert not statsd.values("agent.execution.failure.calculator", "c")

    durations = statsd.values("agent.execution.duration.calculator", "ms")
    assert len(durations) == 3
    stored = sorted(r.duration_ms or 0 for r in runs[:3])
    for measured, recorded in zip(sorted(durations), stored, strict=True):
        # The engine times the run itself; the stored duration adds claim and record.
        assert 0 < measured <= recorded + 50

    # Two model calls per calculator run (tool call, then answer), one per echo run.
    assert statsd.values("agent.tokens.input.calculator", "g") == [80.0] * 3
    assert statsd.values("agent.tokens.output.calculator", "g") == [14.0] * 3
    assert statsd.values("agent.tokens.total.calculator", "g") == [94.0] * 3
    assert statsd.values("agent.tokens.total.echo", "g") == [47.0] * 2
    assert sum(statsd.values("agent.tokens.total.all", "c")) == 3 * 94 + 2 * 47

    # Sampled: nothing waits in the queues once the runs are done.
    wait_for(
        lambda: (
            {"agent.queue.depth.high", "agent.queue.depth.normal", "agent.queue.depth.low"}
            <= statsd.names()
        ),
        10,
        "queue depth gauges",
    )
    time.sleep(0.5)
    assert statsd.values("agent.queue.depth.normal", "g")[-1] == 0
    assert statsd.values("agent.runs.in_flight", "g")[-1] == 0


def test_a_failed_run_reaches_sentry_tagged_and_without_secrets_or_input(
    client: Client, start_worker: Any, mock_model: MockOpenAIServer, sentry: SentryListener
) -> None:
    start_worker(extra_env={"SENTRY_DSN": sentry.dsn})
    note = "card 4111-1111-1111-1111 belongs to Ada"
    run = client.submit("leaky", f"Refund {note}", priority="high", context={"note": note}).wait(
        timeout=30
    )
    assert run.status.value == "failed"
    # The error message the tool wrote quotes the key and the user's data.
    assert run.error_type == "internal"

    wait_for(lambda: sentry.events, 15, "a Sentry event")
    time.sleep(0.5)
    tagged = [e for e in sentry.events if (e.get("tags") or {}).get("run_id") == run.id]
    assert len(tagged) == 1, [e.get("tags") for e in sentry.events]
    event = tagged[0]
    assert event["tags"]["agent"] == "leaky"
    assert event["tags"]["priority"] == "high"
    assert event["exception"]["values"][-1]["type"]
    assert "[redacted]" in json.dumps(event["exception"])
    for body in sentry.raw:
        text = body.decode(errors="replace")
        assert API_KEY not in text
        assert "4111-1111-1111-1111" not in text
        assert "Refund" not in text


def test_a_runs_trace_is_stored_with_model_and_tool_spans(
    agentq_env: dict[str, str],
    client: Client,
    start_worker: Any,
    mock_model: MockOpenAIServer,
    postgres_url: str,
) -> None:
    mock_model.configure(input_tokens=40, output_tokens=7)
    start_worker()
    run = client.submit("calculator", "What is 20 plus 22?").wait(timeout=30)
    assert run.status.value == "succeeded"

    engine = sqlalchemy.create_engine(
        postgres_url.replace("postgresql://", "postgresql+psycopg://")
    )
    try:
        from agentq.tracing import load_traces

        wait_for(lambda: load_traces(engine, run.id), 10, "the trace to be stored")
        time.sleep(0.5)
        (trace,) = load_traces(engine, run.id)
    finally:
        engine.dispose()
    assert trace["attempt"] == 1
    assert trace["metadata"]["run_id"] == run.id
    assert trace["group_id"] == run.id
    kinds = [span["kind"] for span in trace["spans"]]
    assert kinds.count("function") == 1
    tool = next(span for span in trace["spans"] if span["kind"] == "function")
    assert tool["name"] == "add"
    assert tool["data"]["output"].isdigit()
    model_calls = [s for s in trace["spans"] if s["kind"] in ("response", "generation")]
    assert len(model_calls) == 2
    assert [s["input_tokens"] for s in model_calls] == [40, 40]
    assert [s["output_tokens"] for s in model_calls] == [7, 7]
    ids = {span["id"] for span in trace["spans"]}
    for span in trace["spans"]:
        assert span["duration_ms"] is not None and span["duration_ms"] >= 0
        assert span["parent_id"] is None or span["parent_id"] in ids
    assert any(span["kind"] == "agent" and span["name"] == "calculator" for span in trace["spans"])

    shown = agentq(agentq_env, "get", run.id, "--trace")
    assert shown.returncode == 0, shown.stderr
    assert "function  add" in shown.stdout
    assert "tokens 40 in / 7 out" in shown.stdout
    as_json = json.loads(agentq(agentq_env, "get", run.id, "--trace", "--json").stdout)
    assert as_json["traces"][0]["id"] == trace["id"]
