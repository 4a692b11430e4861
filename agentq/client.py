"""The producer's API: submit runs, read them back, wait for them, cancel them.

Importing this module stays light: no Agents SDK, no ``openai``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError, ProgrammingError

from agentq.app import RUN_TASK, make_celery, queue_name
from agentq.config import Settings, get_settings
from agentq.exceptions import (
    BrokerUnavailable,
    InvalidRunRequest,
    RunNotFound,
    RunTimeout,
    StoreUnavailable,
)
from agentq.run import Priority, Run, RunRequest, RunStatus, validate_timeout
from agentq.store import RunStore, make_engine, migrate

if TYPE_CHECKING:
    from celery import Celery

#: What a run request may set besides its agent and input (``submit`` and ``submit_many``).
RUN_OPTIONS = ("priority", "context", "idempotency_key", "max_turns", "max_tokens", "cache")

#: Polling for a result starts fast and backs off to this interval.
MAX_POLL_INTERVAL = 0.5


class RunHandle:
    """A submitted run. ``created`` is False when an idempotency key matched an earlier run."""

    __slots__ = ("client", "created", "id")

    def __init__(self, client: Client, run_id: str, created: bool) -> None:
        self.client = client
        self.id = run_id
        self.created = created

    def get(self) -> Run:
        return self.client.get(self.id)

    def wait(self, timeout: float | None = None) -> Run:
        return self.client.wait(self.id, timeout=timeout)

    def cancel(self) -> Run:
        return self.client.cancel(self.id)

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r}, created={self.created})"


class Client:
    """Submits agent runs and reads their results. Build one per process and reuse it."""

    def __init__(self, settings: Settings | None = None, *, celery_app: Celery | None = None):
        self.settings = settings or get_settings()
        url = self.settings.sync_database_url
        if url.startswith("sqlite"):
            # Embedded mode owns its database file: make sure the schema exists.
            migrate(url)
        self.store = RunStore(make_engine(url))
        self._celery = celery_app
        #: Priorities whose queue this client has declared to the broker.
        self._declared: set[Priority] = set()

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            self._celery = make_celery(self.settings)
        return self._celery

    # Submitting.

    def _request(self, agent: Any, input: Any, **options: Any) -> RunRequest:
        return RunRequest.create(
            agent,
            input,
            max_input_chars=self.settings.max_input_chars,
            max_context_bytes=self.settings.max_context_bytes,
            max_turns_limit=self.settings.max_turns_limit,
            max_tokens_limit=self.settings.max_tokens_limit,
            **options,
        )

    def submit(
        self,
        agent: str,
        input: str,
        *,
        priority: str = "normal",
        context: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        max_turns: int | None = None,
        max_tokens: int | None = None,
        cache: bool = True,
    ) -> RunHandle:
        """Store and enqueue one run. Invalid input raises before anything is stored or sent.

        ``max_turns`` and ``max_tokens`` (per model call) override the configured limits within
        ``AGENTQ_MAX_TURNS_LIMIT`` and ``AGENTQ_MAX_TOKENS_LIMIT``; ``cache=False`` makes the
        run call the model even when an identical run's answer is cached.
        """
        request = self._request(
            agent,
            input,
            priority=priority,
            context=context,
            idempotency_key=idempotency_key,
            max_turns=max_turns,
            max_tokens=max_tokens,
            cache=cache,
        )
        return self._submit([request])[0]

    def submit_many(self, items: Iterable[Mapping[str, Any]]) -> list[RunHandle]:
        """Store and enqueue many runs in one database round trip and one broker round trip.

        Each item is a mapping with ``agent`` and ``input`` and optionally ``priority``,
        ``context``, ``idempotency_key``, ``max_turns``, ``max_tokens`` and ``cache``. Every
        item is validated first: one bad item rejects the whole call, naming its index, and
        nothing is stored or sent.
        """
        requests = []
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise InvalidRunRequest(f"item {index} is not a mapping", field=f"[{index}]")
            unknown = set(item) - {"agent", "input", *RUN_OPTIONS}
            if unknown:
                raise InvalidRunRequest(
                    f"item {index} has unknown fields: {', '.join(sorted(unknown))}",
                    field=f"[{index}]",
                )
            options = {name: item[name] for name in RUN_OPTIONS if name in item}
            try:
                requests.append(self._request(item.get("agent"), item.get("input"), **options))
            except InvalidRunRequest as exc:
                raise InvalidRunRequest(
                    f"item {index}: {exc}", field=f"[{index}].{exc.field}"
                ) from None
        keys = [r.idempotency_key for r in requests if r.idempotency_key]
        if len(keys) != len(set(keys)):
            raise InvalidRunRequest(
                "idempotency keys repeat within one call", field="idempotency_key"
            )
        if not requests:
            return []
        return self._submit(requests)

    def _submit(self, requests: Sequence[RunRequest]) -> list[RunHandle]:
        try:
            stored = self.store.insert(requests)
        except (OperationalError, ProgrammingError) as exc:
            raise StoreUnavailable(_store_hint(exc)) from exc
        fresh = [
            (r.id, r.priority) for r, (_, created) in zip(requests, stored, strict=True) if created
        ]
        self._publish(fresh)
        return [RunHandle(self, run_id, created) for run_id, created in stored]

    def _publish(self, runs: Sequence[tuple[str, Priority]]) -> None:
        if not runs:
            return
        app = self.celery
        try:
            # One pipelined round trip to Redis for the lot, not one per run.
            with app.producer_or_acquire() as producer, producer.batch():
                for run_id, priority in runs:
                    app.send_task(
                        RUN_TASK,
                        args=(run_id,),
                        queue=queue_name(priority),
                        task_id=run_id,
                        producer=producer,
                        # Declaring the queue again on every publish (kombu copies and binds
                        # it each time, cached or not) cost a third of a publish's CPU.
                        declare=None if priority not in self._declared else (),
                        # What Celery would compute with saferepr, for a tenth of the cost.
                        argsrepr=repr((run_id,)),
                        kwargsrepr="{}",
                    )
                    self._declared.add(priority)
        except Exception as exc:  # kombu raises many transport-specific errors
            # A lost connection may come back to a broker that lost its declarations.
            self._declared.clear()
            raise BrokerUnavailable(
                f"stored {len(runs)} run(s) but could not publish them: {exc}; "
                "they stay queued and the sweeper publishes them again",
                run_ids=[run_id for run_id, _ in runs],
            ) from exc

    # Reading.

    def get(self, run_id: str) -> Run:
        try:
            run = self.store.get(run_id)
        except (OperationalError, ProgrammingError) as exc:
            raise StoreUnavailable(_store_hint(exc)) from exc
        if run is None:
            raise RunNotFound(run_id)
        return run

    def wait(self, run_id: str, timeout: float | None = None) -> Run:
        """Block until the run finishes; raise RunTimeout after ``timeout`` seconds."""
        return self.wait_many([run_id], timeout=timeout)[0]

    def wait_many(self, run_ids: Sequence[str], timeout: float | None = None) -> list[Run]:
        """Block until every run finishes; results come in the order of ``run_ids``."""
        limit = validate_timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        pending = list(dict.fromkeys(run_ids))
        done: dict[str, Run] = {}
        interval = 0.02
        while True:
            found = {run.id: run for run in self.store.get_many(pending)}
            for run_id in pending:
                if run_id not in found:
                    raise RunNotFound(run_id)
            done.update({i: r for i, r in found.items() if r.finished})
            pending = [i for i in pending if i not in done]
            if not pending:
                return [done[i] for i in run_ids]
            if deadline is not None and time.monotonic() >= deadline:
                first = found[pending[0]]
                raise RunTimeout(first.id, limit or 0.0, first.status.value)
            pause = (
                interval
                if deadline is None
                else min(interval, max(0.0, deadline - time.monotonic()))
            )
            time.sleep(pause)
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)

    def cancel(self, run_id: str) -> Run:
        """Cancel a queued run, or stop a running one at its next turn."""
        status = self.store.cancel(run_id)
        if status is None:
            raise RunNotFound(run_id)
        return self.get(run_id)

    def close(self) -> None:
        self.store.engine.dispose()
        if self._celery is not None:
            self._celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _store_hint(exc: Exception) -> str:
    text = str(exc).splitlines()[0]
    if "does not exist" in text or "no such table" in text:
        return f"the runs table is missing: run `agentq migrate` first ({text})"
    return f"the database is unavailable: {text}"


__all__ = ["Client", "RunHandle", "RunStatus"]
