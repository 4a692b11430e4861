"""Telemetry as hooks: logs, statsd metrics and Sentry attach to a run's life cycle in one place.

The engine wraps each run in :meth:`Telemetry.observe`; everything operators see about a run
(the ``agent_execution`` log record, the ``agent.execution.*`` metrics, a Sentry event for a
failed run, the link from its trace to the run) hangs off that one call. Other parts report
through the same object: model retries (:meth:`RunObserver.model_retry`), cache lookups
(:meth:`RunObserver.cache_lookup`), queue depth and runs in flight (sampled by
:class:`Sampler`). An observer is a :class:`RunObserver` subclass overriding the hooks it
needs, like a dramatiq middleware; :func:`build_telemetry` picks them from the settings once
per process. A failing observer is logged and never fails the run.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agentq.config import Settings
from agentq.exceptions import RunHandedBack
from agentq.logs import Redactor, secret_values
from agentq.run import RunStatus
from agentq.store import Claim, Outcome

if TYPE_CHECKING:
    from statsd import StatsClient

logger = logging.getLogger("agentq.telemetry")
run_logger = logging.getLogger("agentq.runs")

#: The run the current asyncio task executes; the trace processor links traces through it.
current_run: contextvars.ContextVar[Claim | None] = contextvars.ContextVar(
    "agentq_current_run", default=None
)

_UNSAFE_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def metric_part(name: str) -> str:
    """A name usable as one segment of a statsd metric (dots would split it)."""
    return _UNSAFE_METRIC_CHARS.sub("_", name) or "_"


class RunObserver:
    """Hooks into a run's life and the worker's state. Every hook does nothing by default."""

    def run_started(self, claim: Claim) -> None:
        """The worker claimed the run and is about to execute it."""

    def run_finished(
        self,
        claim: Claim,
        outcome: Outcome,
        duration_ms: float,
        exception: BaseException | None,
    ) -> None:
        """The run produced an outcome (succeeded, failed or cancelled), about to be stored.

        ``exception`` is what made a failed run fail, when there was one.
        """

    def run_handed_back(self, claim: Claim, duration_ms: float, reason: str) -> None:
        """The run went back to the queue unfinished: the worker is stopping (``reason`` is
        ``shutdown``) or the run was deferred (a rate limit with no room …)."""

    def run_crashed(self, claim: Claim, exception: BaseException, duration_ms: float) -> None:
        """The run's execution raised instead of producing an outcome (a store outage …)."""

    def model_retry(self, model: str, reason: str) -> None:
        """A model call is retried (``reason``: rate_limit, timeout, server_error, fallback …)."""

    def cache_lookup(self, agent: str, hit: bool) -> None:
        """The response cache was asked for a run of ``agent``."""

    def queue_depth(self, priority: str, depth: int) -> None:
        """Messages waiting in the queue of a priority class."""

    def in_flight(self, count: int) -> None:
        """Runs executing in this worker process right now."""

    def pool_resized(self, previous: int, slots: int) -> None:
        """The worker's run slots changed (autoscaling, or Flower's pool controls)."""

    def close(self) -> None:
        """Release clients at process shutdown."""


class Observation:
    """One run under observation; :meth:`Telemetry.observe` returns it."""

    __slots__ = ("_token", "claim", "exception", "outcome", "started", "telemetry")

    def __init__(self, telemetry: Telemetry, claim: Claim) -> None:
        self.telemetry = telemetry
        self.claim = claim
        self.outcome: Outcome | None = None
        self.exception: BaseException | None = None
        self.started = 0.0
        self._token: contextvars.Token[Claim | None] | None = None

    def finish(self, outcome: Outcome, exception: BaseException | None = None) -> Outcome:
        """Report the run's outcome (and the exception that failed it); returns the outcome."""
        self.outcome = outcome
        self.exception = exception
        return outcome

    def __enter__(self) -> Observation:
        self.started = time.perf_counter()
        self._token = current_run.set(self.claim)
        self.telemetry.run_started(self.claim)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        duration_ms = (time.perf_counter() - self.started) * 1000.0
        if self._token is not None:
            current_run.reset(self._token)
        if self.outcome is not None:
            self.telemetry.run_finished(self.claim, self.outcome, duration_ms, self.exception)
        elif exc is None or exc_type is _cancelled():
            self.telemetry.run_handed_back(self.claim, duration_ms, "shutdown")
        elif isinstance(exc, RunHandedBack):
            self.telemetry.run_handed_back(self.claim, duration_ms, str(exc))
        else:
            self.telemetry.run_crashed(self.claim, exc, duration_ms)


def _cancelled() -> type[BaseException]:
    import asyncio

    return asyncio.CancelledError


class Telemetry(RunObserver):
    """Fans every hook out to the process's observers."""

    def __init__(self, observers: Iterable[RunObserver] = ()) -> None:
        self.observers: list[RunObserver] = list(observers)

    def observe(self, claim: Claim) -> Observation:
        """Wrap a run's execution: ``with telemetry.observe(claim) as seen: seen.finish(...)``."""
        return Observation(self, claim)

    def _each(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                logger.exception(
                    "telemetry observer failed",
                    extra={
                        "action": "telemetry_failed",
                        "observer": type(observer).__name__,
                        "hook": hook,
                    },
                )

    def run_started(self, claim: Claim) -> None:
        self._each("run_started", claim)

    def run_finished(
        self,
        claim: Claim,
        outcome: Outcome,
        duration_ms: float,
        exception: BaseException | None,
    ) -> None:
        self._each("run_finished", claim, outcome, duration_ms, exception)

    def run_handed_back(self, claim: Claim, duration_ms: float, reason: str) -> None:
        self._each("run_handed_back", claim, duration_ms, reason)

    def run_crashed(self, claim: Claim, exception: BaseException, duration_ms: float) -> None:
        self._each("run_crashed", claim, exception, duration_ms)

    def model_retry(self, model: str, reason: str) -> None:
        self._each("model_retry", model, reason)

    def cache_lookup(self, agent: str, hit: bool) -> None:
        self._each("cache_lookup", agent, hit)

    def queue_depth(self, priority: str, depth: int) -> None:
        self._each("queue_depth", priority, depth)

    def in_flight(self, count: int) -> None:
        self._each("in_flight", count)

    def pool_resized(self, previous: int, slots: int) -> None:
        self._each("pool_resized", previous, slots)

    def close(self) -> None:
        self._each("close")


def _run_fields(claim: Claim) -> dict[str, Any]:
    return {
        "run_id": claim.run_id,
        "agent": claim.agent,
        "priority": claim.priority.value,
        "attempt": claim.attempt,
    }


class LogObserver(RunObserver):
    """The guide's ``agent_execution`` and ``agent_error`` records, as JSON log lines."""

    def __init__(self, log: logging.Logger = run_logger) -> None:
        self.log = log

    def run_finished(
        self,
        claim: Claim,
        outcome: Outcome,
        duration_ms: float,
        exception: BaseException | None,
    ) -> None:
        if self.log.isEnabledFor(logging.INFO):
            usage = outcome.usage
            self.log.info(
                "agent_execution",
                extra={
                    "action": "agent_execution",
                    **_run_fields(claim),
                    "status": outcome.status.value,
                    "input_length": len(claim.input),
                    "output_length": len(outcome.output or ""),
                    "duration_ms": round(duration_ms, 1),
                    "tool_calls": outcome.tool_calls,
                    "turns": outcome.turns,
                    "model_used": outcome.model,
                    "tokens_used": {
                        "input": usage.input_tokens,
                        "output": usage.output_tokens,
                        "total": usage.total_tokens,
                        "requests": usage.requests,
                    },
                    "cached": outcome.cached,
                    "error_type": outcome.error_type,
                },
            )
        if outcome.status is RunStatus.FAILED:
            exc_info = (type(exception), exception, exception.__traceback__) if exception else None
            self.log.error(
                "agent_error: %s",
                outcome.error,
                exc_info=exc_info,
                extra={
                    "action": "agent_error",
                    **_run_fields(claim),
                    "error_type": outcome.error_type,
                    "error_message": outcome.error,
                    "exception": type(exception).__name__ if exception else None,
                    "model_used": outcome.model,
                },
            )

    def run_handed_back(self, claim: Claim, duration_ms: float, reason: str) -> None:
        self.log.info(
            "run handed back: %s",
            reason,
            extra={
                "action": "run_handed_back",
                **_run_fields(claim),
                "reason": reason,
                "duration_ms": round(duration_ms, 1),
            },
        )

    def run_crashed(self, claim: Claim, exception: BaseException, duration_ms: float) -> None:
        self.log.error(
            "agent_error: %s",
            exception,
            exc_info=(type(exception), exception, exception.__traceback__),
            extra={
                "action": "agent_error",
                **_run_fields(claim),
                "error_type": "internal",
                "error_message": str(exception),
                "exception": type(exception).__name__,
                "duration_ms": round(duration_ms, 1),
            },
        )

    def model_retry(self, model: str, reason: str) -> None:
        self.log.info(
            "model call retried",
            extra={"action": "model_retry", "model": model, "reason": reason},
        )


class StatsdObserver(RunObserver):
    """The guide's statsd metrics. Each run's metrics leave in one UDP packet or a few."""

    def __init__(self, client: StatsClient) -> None:
        self.client = client
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def run_started(self, claim: Claim) -> None:
        if claim.attempt > 1:
            self.client.incr("agent.execution.retries")

    def run_finished(
        self,
        claim: Claim,
        outcome: Outcome,
        duration_ms: float,
        exception: BaseException | None,
    ) -> None:
        agent = metric_part(claim.agent)
        usage = outcome.usage
        with self.client.pipeline() as pipe:
            pipe.timing(f"agent.execution.duration.{agent}", duration_ms)
            if outcome.status is RunStatus.SUCCEEDED:
                pipe.incr(f"agent.execution.success.{agent}")
                pipe.incr("agent.execution.success.total")
            elif outcome.status is RunStatus.FAILED:
                pipe.incr(f"agent.execution.failure.{agent}")
                pipe.incr("agent.execution.failure.total")
            else:
                pipe.incr(f"agent.execution.{metric_part(outcome.status.value)}.{agent}")
            pipe.incr("agent.execution.total")
            pipe.gauge(f"agent.tokens.input.{agent}", usage.input_tokens)
            pipe.gauge(f"agent.tokens.output.{agent}", usage.output_tokens)
            pipe.gauge(f"agent.tokens.total.{agent}", usage.total_tokens)
            if usage.total_tokens:
                pipe.incr("agent.tokens.total.all", usage.total_tokens)

    def run_handed_back(self, claim: Claim, duration_ms: float, reason: str) -> None:
        self.client.incr("agent.execution.handed_back")

    def run_crashed(self, claim: Claim, exception: BaseException, duration_ms: float) -> None:
        self.client.incr("agent.execution.crashed")

    def model_retry(self, model: str, reason: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.incr("agent.model.retries.total")
            pipe.incr(f"agent.model.retries.{metric_part(model)}")
            pipe.incr(f"agent.model.retry_reason.{metric_part(reason)}")

    def cache_lookup(self, agent: str, hit: bool) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1
            hits, misses = self._hits, self._misses
        with self.client.pipeline() as pipe:
            pipe.gauge("agent.cache.hits", hits)
            pipe.gauge("agent.cache.misses", misses)
            pipe.gauge("agent.cache.hit_rate", round(hits / (hits + misses), 4))

    def queue_depth(self, priority: str, depth: int) -> None:
        self.client.gauge(f"agent.queue.depth.{metric_part(priority)}", depth)

    def in_flight(self, count: int) -> None:
        self.client.gauge("agent.runs.in_flight", count)

    def pool_resized(self, previous: int, slots: int) -> None:
        with self.client.pipeline() as pipe:
            pipe.gauge("agent.worker.slots", slots)
            pipe.incr(f"agent.worker.scaled.{'up' if slots > previous else 'down'}")

    def close(self) -> None:
        self.client.close()


class SentryObserver(RunObserver):
    """A Sentry event per failed run, tagged with the run; its input and secrets scrubbed."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    def run_finished(
        self,
        claim: Claim,
        outcome: Outcome,
        duration_ms: float,
        exception: BaseException | None,
    ) -> None:
        if outcome.status is not RunStatus.FAILED:
            return
        self._capture(claim, outcome.error_type or "internal", outcome.error, exception)

    def run_crashed(self, claim: Claim, exception: BaseException, duration_ms: float) -> None:
        self._capture(claim, "internal", str(exception), exception)

    def _capture(
        self,
        claim: Claim,
        error_type: str,
        message: str | None,
        exception: BaseException | None,
    ) -> None:
        import sentry_sdk

        # The run's input and context are the user's data: none of it goes to Sentry.
        scrub = Redactor([*self.redactor.secrets, claim.input, *_strings(claim.context)])
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("run_id", claim.run_id)
            scope.set_tag("agent", claim.agent)
            scope.set_tag("priority", claim.priority.value)
            scope.set_tag("error_type", error_type)
            scope.set_context(
                "run",
                {
                    "run_id": claim.run_id,
                    "agent": claim.agent,
                    "priority": claim.priority.value,
                    "attempt": claim.attempt,
                    "input_length": len(claim.input),
                },
            )
            scope.add_event_processor(lambda event, _hint: scrubbed(event, scrub))
            if exception is not None:
                sentry_sdk.capture_exception(exception)
            else:
                sentry_sdk.capture_message(f"run failed: {error_type}: {message}", level="error")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list | tuple):
        return [text for item in value for text in _strings(item)]
    return []


def scrubbed(value: Any, redact: Callable[[str], str]) -> Any:
    """``value`` (a Sentry event, or any part of one) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: scrubbed(item, redact) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrubbed(item, redact) for item in value]
    return value


_sentry_ready = False
_sentry_lock = threading.Lock()


def init_sentry(settings: Settings) -> bool:
    """Start the process's Sentry client when ``SENTRY_DSN`` is set; True if it runs."""
    global _sentry_ready  # noqa: PLW0603 - one client per process
    if settings.sentry_dsn is None or not settings.sentry_dsn.get_secret_value():
        return False
    with _sentry_lock:
        if _sentry_ready:
            return True
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration
        from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger

        redactor = Redactor.from_settings(settings)
        # Failed runs are reported by SentryObserver with their tags; the log record of the
        # same failure would be a second, untagged event (and deduplication would drop the
        # tagged one).
        ignore_logger(run_logger.name)
        sentry_sdk.init(
            dsn=settings.sentry_dsn.get_secret_value(),
            integrations=[
                CeleryIntegration(),
                # Log lines as breadcrumbs would carry other runs' errors into an event.
                LoggingIntegration(level=None, event_level=logging.ERROR),
            ],
            # The auto-enabled integrations (openai, openai_agents, httpx, redis, sqlalchemy)
            # add CPU to every run and capture tool errors outside the run's scope.
            auto_enabling_integrations=False,
            before_send=lambda event, _hint: scrubbed(event, redactor),
            # Frame locals hold run inputs and settings; requests and users are not ours.
            include_local_variables=False,
            send_default_pii=False,
            max_request_body_size="never",
        )
        _sentry_ready = True
        return True


def build_telemetry(settings: Settings) -> Telemetry:
    """The process's observers, from the settings. Call once per process."""
    observers: list[RunObserver] = [LogObserver()]
    if settings.enable_metrics and settings.statsd_host:
        from statsd import StatsClient

        observers.append(StatsdObserver(StatsClient(settings.statsd_host, settings.statsd_port)))
    if init_sentry(settings):
        observers.append(SentryObserver(Redactor(secret_values(settings))))
    return Telemetry(observers)


class Sampler:
    """Reports queue depth per priority and runs in flight every ``interval`` seconds."""

    def __init__(
        self,
        telemetry: Telemetry,
        depths: Callable[[], Mapping[str, int]],
        in_flight: Callable[[], int],
        interval: float,
    ) -> None:
        self.telemetry = telemetry
        self.depths = depths
        self.in_flight = in_flight
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="agentq-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        self.telemetry.in_flight(self.in_flight())
        try:
            depths = self.depths()
        except Exception as exc:  # noqa: BLE001 - the broker may be away; the next sample tells
            logger.warning(
                "cannot read queue depth: %s", exc, extra={"action": "queue_depth_failed"}
            )
            return
        for priority, depth in depths.items():
            self.telemetry.queue_depth(priority, depth)

    def _serve(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def redis_queue_depths(
    redis_url: str, queues: Sequence[tuple[str, str]]
) -> Callable[[], dict[str, int]]:
    """Reads the length of each (priority, queue name) from Redis with one client."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def depths() -> dict[str, int]:
        with client.pipeline(transaction=False) as pipe:
            for _, name in queues:
                pipe.llen(name)
            lengths = pipe.execute()
        return {priority: int(n) for (priority, _), n in zip(queues, lengths, strict=True)}

    return depths
