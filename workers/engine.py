"""The execution engine: many agent runs in flight on one long-lived asyncio event loop.

A worker process has one engine. Its loop runs in a thread of its own and owns every client the
runs share (the model provider with its one ``AsyncOpenAI`` client, the asyncio database
engine), so none is built per run and each is closed on the loop that opened it. Celery's
consumer thread hands run ids in with :meth:`Engine.submit` and is told through a
``concurrent.futures.Future`` when the run's outcome is stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agents import RunHooks
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from agentq.config import Settings
from agentq.exceptions import (
    ModelUnavailable,
    RunCancelled,
    RunDeferred,
    RunHandedBack,
    StoreUnavailable,
    UnknownAgent,
)
from agentq.logs import Redactor
from agentq.registry import Registry
from agentq.run import ErrorType, RunStatus, Usage
from agentq.store import AsyncRunStore, Claim, Outcome, make_async_engine
from agentq.telemetry import Telemetry
from agentq.tracing import TraceRecorder, install_tracing

logger = logging.getLogger("agentq.engine")

#: Tries at storing a finished run's outcome before the delivery is retried instead.
RECORD_ATTEMPTS = 10

T = TypeVar("T")

#: The database is down, or so busy that no pooled connection came free in time.
STORE_ERRORS = (DBAPIError, PoolTimeout)


async def _stored(operation: Awaitable[T]) -> T:
    """Await a store operation; a database failure becomes StoreUnavailable."""
    try:
        return await operation
    except STORE_ERRORS as exc:
        raise StoreUnavailable(
            f"the database is unavailable: {getattr(exc, 'orig', None) or exc}"
        ) from exc


@dataclass(slots=True)
class InFlight:
    claim: Claim
    cancel_requested: bool = False
    #: What made the run fail, for telemetry (the stored outcome keeps only its message).
    error: BaseException | None = None


@dataclass(slots=True)
class EngineStats:
    started: int = 0
    finished: int = 0
    skipped: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


class Engine:
    """Runs agent runs concurrently on a private event loop thread."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        worker_name: str,
        telemetry: Telemetry | None = None,
        result_of: Callable[[concurrent.futures.Future[Any], float | None], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.worker_name = worker_name
        #: Logs, metrics and Sentry hook in here; other parts report retries and cache use.
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.traces: TraceRecorder | None = None
        self.in_flight: dict[str, InFlight] = {}
        self.stats = EngineStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._agents: dict[str, Any] = {}
        self._store: AsyncRunStore | None = None
        self._provider: Any = None
        self._openai_client: Any = None
        self._run_config: Any = None
        self._resilience: Any = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Futures Celery's slot threads wait on, until their run's outcome is stored.
        self._waiting: set[concurrent.futures.Future[str]] = set()
        self._stopping = False
        self._stop_lock = threading.Lock()
        #: How a Celery task waits for what it sent in: the pool's run slots park instead of
        #: blocking the thread they share.
        self._result_of = result_of or _blocking_result

    # Life cycle (called from other threads).

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="agentq-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the starting thread
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._close())
            loop.close()

    async def _open(self) -> None:
        from agents import RunConfig

        from agentq.models import make_provider
        from agentq.resilience import Resilience

        self._provider, self._openai_client = make_provider(self.settings)
        self._resilience = Resilience.open(self.settings, self._provider, self.telemetry)
        self._run_config = RunConfig(
            model=self.settings.default_model,
            model_provider=self._provider,
            tracing_disabled=not self.settings.enable_tracing,
            input_guardrails=list(self._resilience.guardrails),
        )
        pool = min(max(4, self.settings.slots // 20), 20)
        self._store = AsyncRunStore(
            make_async_engine(self.settings.async_database_url, pool_size=pool),
            worker=self.worker_name,
            lease_seconds=self.settings.lease_seconds,
        )
        # Traces go to our own tables; nothing leaves the process unless a setting says so.
        if self.settings.enable_tracing:
            self.traces = TraceRecorder(self._store.engine, Redactor.from_settings(self.settings))
            self.traces.start()
        install_tracing(self.traces, self.settings.export_traces_to_openai)
        self._heartbeat = asyncio.get_running_loop().create_task(self._renew_leases())

    async def _close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._openai_client is not None:
            await self._openai_client.close()
        if self._resilience is not None:
            await self._resilience.close()
        if self.traces is not None:
            await self.traces.close()
        if self._store is not None:
            store = self._store
            logger.info(
                "engine stopped",
                extra={
                    "action": "engine_stopped",
                    "runs_started": self.stats.started,
                    "runs_finished": self.stats.finished,
                    "claim_batches": store.claims.batches,
                    "claims": store.claims.items,
                    "finish_batches": store.finishes.batches,
                    "finishes": store.finishes.items,
                },
            )
            await store.close()

    def stop(self, grace: float = 0.0) -> None:
        """Wait up to ``grace`` seconds for runs in flight, then hand the rest back.

        Safe to call from several threads: later callers wait for the first one's stop.
        """
        with self._stop_lock:
            loop = self._loop
            if loop is None or not loop.is_running():
                return
            self._stopping = True
            future = asyncio.run_coroutine_threadsafe(self._drain(grace), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=grace + 30)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=30)
            # A run whose hand-back could not finish (a stalled database), or that was sent
            # in as the loop stopped, would leave its slot thread waiting for ever: give the
            # message back; the run's lease lapses and another worker takes it over.
            for waiting in list(self._waiting):
                waiting.cancel()

    async def _drain(self, grace: float) -> None:
        tasks = set(self._tasks)
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        unfinished = [task for task in self._tasks if not task.done()]
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished, timeout=10)

    # Submitting (called from Celery's consumer thread).

    def submit(self, run_id: str) -> concurrent.futures.Future[str]:
        """Execute the run; the future resolves to the stored status once it is recorded."""
        if self._loop is None:
            raise RuntimeError("the engine is not started")
        future = asyncio.run_coroutine_threadsafe(self.execute(run_id), self._loop)
        self._waiting.add(future)
        future.add_done_callback(self._waiting.discard)
        return future

    def run(self, run_id: str) -> str:
        """Execute the run and block the calling thread until its outcome is stored."""
        loop = self._loop
        if loop is None or not loop.is_running() or self._stopping:
            raise RunHandedBack()
        try:
            status: str = self._result_of(self.submit(run_id), None)
            return status
        except concurrent.futures.CancelledError:
            raise RunHandedBack() from None

    # Execution (on the engine's loop).

    async def execute(self, run_id: str) -> str:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            return await self._execute(run_id)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _execute(self, run_id: str) -> str:
        assert self._store is not None
        store = self._store
        claim = await _stored(store.claim(run_id, self.settings.max_attempts))
        if claim is None:
            if not await _stored(store.exists(run_id)):
                await self._dead_letter(None, run_id, "unknown_run", "no run has this id", run_id)
                return "dead_letter"
            # Finished, cancelled, or held by a live worker: a redelivery with nothing to do.
            self.stats.skipped += 1
            logger.info("run not claimed", extra={"action": "run_skipped", "run_id": run_id})
            return "skipped"
        self.stats.started += 1
        entry = self.in_flight[run_id] = InFlight(claim)
        try:
            try:
                with self.telemetry.observe(claim) as observed:
                    outcome = observed.finish(await self._run(claim, entry), entry.error)
            except asyncio.CancelledError:
                # Shutdown: give the run back so another worker takes it at once.
                await asyncio.shield(store.release(run_id, claim.attempt))
                raise RunHandedBack() from None
            recorded = await self._record(run_id, claim.attempt, outcome)
        finally:
            self.in_flight.pop(run_id, None)
        status = outcome.status.value if recorded else "superseded"
        self.stats.finished += 1
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        return status

    async def _record(self, run_id: str, attempt: int, outcome: Outcome) -> bool:
        """Store the outcome, waiting out a database outage rather than losing the result.

        The run stays in flight meanwhile, so its lease keeps being renewed once the
        database is back and no other worker takes it over.
        """
        assert self._store is not None
        pause = 0.5
        for _ in range(RECORD_ATTEMPTS - 1):
            try:
                return await self._store.finish(run_id, attempt, outcome)
            except STORE_ERRORS:
                logger.warning(
                    "cannot store the run's outcome yet",
                    extra={"action": "store_retry", "run_id": run_id, "pause_s": pause},
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
        return await _stored(self._store.finish(run_id, attempt, outcome))

    async def _dead_letter(
        self, task_id: str | None, run_id: str | None, reason: str, detail: str, payload: str
    ) -> None:
        """Record a message that can never run, so it is acknowledged once and not retried."""
        assert self._store is not None
        logger.warning(
            "dead letter",
            extra={"action": "dead_letter", "run_id": run_id, "reason": reason, "detail": detail},
        )
        await _stored(
            self._store.dead_letter(
                task_id=task_id, run_id=run_id, reason=reason, detail=detail, payload=payload
            )
        )

    def dead_letter(
        self, task_id: str | None, run_id: str | None, reason: str, detail: str, payload: str
    ) -> None:
        """Record a dead letter from another thread (the Celery task) and wait until stored."""
        if self._loop is None:
            raise RuntimeError("the engine is not started")
        coroutine = self._dead_letter(task_id, run_id, reason, detail, payload)
        self._result_of(asyncio.run_coroutine_threadsafe(coroutine, self._loop), 60)

    def _agent_for(self, name: str) -> Any:
        prototype = self._agents.get(name)
        if prototype is None:
            prototype = self._agents[name] = self.registry.get(name).factory()
        # Runs sharing one Agent object slow each other down in the SDK's bookkeeping. A shallow
        # copy is the SDK's clone() without re-validating every field on each run.
        agent = copy.copy(prototype)
        if not self.settings.enable_guardrails:
            agent.input_guardrails, agent.output_guardrails = [], []
        return agent

    async def _run(self, claim: Claim, entry: InFlight) -> Outcome:
        try:
            agent = self._agent_for(claim.agent)
        except UnknownAgent as exc:
            return Outcome(RunStatus.FAILED, error_type=ErrorType.UNKNOWN_AGENT, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - the run's error, reported by telemetry
            entry.error = exc
            return Outcome(
                RunStatus.FAILED,
                error_type=ErrorType.INTERNAL,
                error=f"the factory of agent {claim.agent!r} failed: {exc!r}",
            )
        model = self._model_label(agent)
        plan = await self._resilience.plan(
            claim, self.registry.get(claim.agent), agent, model, self._run_config
        )
        if plan.cached is not None:
            cached: Outcome = plan.cached
            return cached
        if plan.deferred is not None:
            # No room under the rate limits: free the slot now and come back when there is.
            assert self._store is not None
            await _stored(self._store.release(claim.run_id, claim.attempt))
            countdown = plan.deferred.wait + random.uniform(0, min(1.0, plan.deferred.wait / 10))
            raise RunDeferred(countdown, plan.deferred.reason)
        outcome = await self._run_agent(claim, entry, agent, model, plan)
        finished: Outcome = await self._resilience.finish(plan, outcome)
        return finished

    async def _run_agent(
        self, claim: Claim, entry: InFlight, agent: Any, model: str, plan: Any
    ) -> Outcome:
        from agents import Runner

        from agentq.resilience import current_run_models

        hooks = _RunControl(entry)
        started = time.monotonic()
        # Scoped to this run's task and the tasks the SDK starts for it.
        current_run_models.set(plan.models)
        try:
            async with asyncio.timeout(self.settings.run_timeout):
                result = await Runner.run(
                    agent,
                    claim.input,
                    context=claim.context,
                    max_turns=plan.max_turns,
                    hooks=hooks,
                    run_config=plan.run_config,
                )
        except RunCancelled:
            return Outcome(
                RunStatus.CANCELLED,
                error_type=ErrorType.CANCELLED,
                error="cancelled while running",
                model=model,
                turns=hooks.turns,
            )
        except TimeoutError:
            return Outcome(
                RunStatus.FAILED,
                error_type=ErrorType.TIMEOUT,
                error=f"the run exceeded its deadline of {self.settings.run_timeout:g} s "
                f"(AGENTQ_RUN_TIMEOUT) after {time.monotonic() - started:.1f} s",
                model=model,
                turns=hooks.turns,
            )
        except Exception as exc:  # noqa: BLE001 - the run's error, reported by telemetry
            error_type, message = classify(exc)
            entry.error = exc
            return Outcome(
                RunStatus.FAILED,
                error_type=error_type,
                error=message,
                model=model,
                turns=hooks.turns,
            )
        return _succeeded(result, model)

    def _model_label(self, agent: Any) -> str:
        from agentq.models import OFFLINE_MODEL_NAME, model_label

        label = model_label(self.settings, getattr(agent, "model", None))
        return f"{OFFLINE_MODEL_NAME}:{label}" if self.settings.uses_offline_model else label

    async def _renew_leases(self) -> None:
        assert self._store is not None
        interval = min(self.settings.lease_seconds / 3.0, 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                cancel = await self._store.renew(list(self.in_flight))
            except Exception:
                logger.exception("lease renewal failed", extra={"action": "lease_renewal_failed"})
                continue
            for run_id in cancel:
                entry = self.in_flight.get(run_id)
                if entry is not None:
                    entry.cancel_requested = True


def _blocking_result(future: concurrent.futures.Future[Any], timeout: float | None) -> Any:
    return future.result(timeout)


class _RunControl(RunHooks[Any]):
    """Run hooks that stop a cancelled run at its next turn and count turns."""

    def __init__(self, entry: InFlight) -> None:
        self.entry = entry
        self.turns = 0

    async def on_llm_start(self, *_: Any) -> None:
        if self.entry.cancel_requested:
            raise RunCancelled()
        self.turns += 1


def _succeeded(result: Any, model: str) -> Outcome:
    from agents import ToolCallItem

    final = result.final_output
    if final is None or isinstance(final, str):
        output = final
    elif hasattr(final, "model_dump_json"):
        output = final.model_dump_json()
    else:
        import json

        output = json.dumps(final, default=str)
    usage = result.context_wrapper.usage
    return Outcome(
        RunStatus.SUCCEEDED,
        output=output,
        usage=Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
            requests=usage.requests,
        ),
        model=model,
        turns=len(result.raw_responses),
        tool_calls=sum(1 for item in result.new_items if isinstance(item, ToolCallItem)),
    )


def classify(exc: BaseException) -> tuple[ErrorType, str]:
    """The stored error type and a message a person can act on."""
    from agents import (
        InputGuardrailTripwireTriggered,
        MaxTurnsExceeded,
        ModelBehaviorError,
        OutputGuardrailTripwireTriggered,
    )

    if isinstance(exc, InputGuardrailTripwireTriggered | OutputGuardrailTripwireTriggered):
        result = getattr(exc, "guardrail_result", None)
        guardrail = getattr(result, "guardrail", None)
        name = guardrail.get_name() if guardrail is not None else "guardrail"
        info = getattr(getattr(result, "output", None), "output_info", None)
        detail = f": {info}" if isinstance(info, str) and info else ""
        return ErrorType.GUARDRAIL, f"guardrail {name!r} tripped{detail}"
    if isinstance(exc, ModelUnavailable):
        return ErrorType.MODEL_ERROR, str(exc)
    if isinstance(exc, MaxTurnsExceeded):
        return ErrorType.MAX_TURNS, f"{exc} (AGENTQ_MAX_TURNS)"
    if isinstance(exc, ModelBehaviorError):
        return ErrorType.MODEL_BEHAVIOR, f"the model misbehaved: {exc}"
    try:
        import openai
    except ImportError:  # pragma: no cover - openai is a dependency
        openai = None  # type: ignore[assignment]
    if (
        openai is not None
        and isinstance(exc, openai.APIStatusError)
        and exc.status_code
        in (
            400,
            404,
            413,
            422,
        )
    ):
        return ErrorType.INVALID_REQUEST, f"the model rejected the request: {exc}"
    if openai is not None and isinstance(exc, openai.APIError):
        return ErrorType.MODEL_ERROR, f"{type(exc).__name__}: {exc}"
    return ErrorType.INTERNAL, f"{type(exc).__name__}: {exc}"
