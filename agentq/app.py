"""The Celery app: one queue per priority class, consumed in order, acknowledged late.

Messages carry only a run id; the run itself lives in the store. Producers publish by task
name and never import the task's code (nor the Agents SDK); workers register the task.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from kombu.entity import Queue

from agentq.config import Settings
from agentq.exceptions import RunDeferred, RunHandedBack, StoreUnavailable
from agentq.run import PRIORITY_ORDER, Priority

RUN_TASK = "agentq.run_agent"
QUEUE_PREFIX = "agentq"


def queue_name(priority: Priority | str) -> str:
    return f"{QUEUE_PREFIX}.{Priority(priority).value}"


QUEUE_NAMES: tuple[str, ...] = tuple(queue_name(p) for p in PRIORITY_ORDER)

#: Beat's periodic jobs (health checks, rollups, sweeper, batches). Workers consume it before
#: the run queues, so a backlog of runs cannot delay a health check.
CONTROL_QUEUE = f"{QUEUE_PREFIX}.control"


def make_celery(settings: Settings, name: str = "agentq") -> Celery:
    """A Celery app configured for agent runs. Build one per process."""
    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    app.conf.update(_celery_config(settings))
    return app


def _celery_config(settings: Settings) -> dict[str, Any]:
    transport_options: dict[str, Any] = {
        "queue_order_strategy": "priority",
        "visibility_timeout": settings.visibility_timeout,
        # Scan for deliveries of dead workers every 10 s rather than every 100 s, so a run
        # whose worker was killed is redelivered soon after its visibility timeout.
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    if settings.embedded:
        # The in-memory broker is polled; the default second between polls is a second of
        # queue wait per run.
        transport_options["polling_interval"] = 0.01
    return {
        "task_queues": [
            Queue(name, routing_key=name)  # type: ignore[no-untyped-call]
            for name in (CONTROL_QUEUE, *QUEUE_NAMES)
        ],
        "task_default_queue": queue_name(Priority.NORMAL),
        "task_routes": {RUN_TASK: {"queue": queue_name(Priority.NORMAL)}},
        # Per-message priority is defeated by prefetch on Redis; separate queues consumed
        # in order are not.
        "broker_transport_options": transport_options,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # After a broker reconnect the old deliveries come back; cancelling what still runs
        # avoids executing them twice in parallel.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        # Three Redis publishes per run; Flower switches them on while it watches.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "enable_utc": True,
    }


#: Executes one run by id in this process and returns the stored status.
RunExecutor = Callable[[str], str]

#: Seconds between re-deliveries of a run whose store could not be reached.
STORE_RETRY_BACKOFF_MAX = 60


#: Records a message that can never run: (task id, run id, reason, detail, payload).
DeadLetterSink = Callable[[str | None, str | None, str, str, str], None]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _poison(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, str] | None:
    """Why a message's arguments cannot name a run (its run id if any, and the reason)."""
    if kwargs or len(args) != 1:
        return None, f"expected one run id argument, got args={args!r} kwargs={kwargs!r}"
    run_id = args[0]
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        return (run_id if isinstance(run_id, str) else None), (
            f"{run_id!r} is not a run id (32 lower-case hex digits)"
        )
    return None


def register_run_task(
    app: Celery, execute: RunExecutor, dead_letter: DeadLetterSink | None = None
) -> Task:
    """Register the run task on a worker's app; ``execute`` is the process's engine.

    The task only routes: the run's whole life is in ``execute``. A run handed back at
    shutdown is requeued for another worker; a store outage re-publishes the message with
    backoff, so the run is never dropped while the database is away. A run the rate limits
    have no room for is re-published with a countdown until they do. A message whose
    arguments name no run is given to ``dead_letter`` and acknowledged: Redis has no
    dead-letter queue, and retrying it would loop forever.
    """

    # max_retries=None on the task: a retry(max_retries=None) call alone means "the task's
    # default" (3), which would drop a run deferred or waiting out a store outage a 4th time.
    @app.task(name=RUN_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)  # type: ignore[untyped-decorator]
    def run_agent(self: Task, *args: Any, **kwargs: Any) -> str:
        poison = _poison(args, kwargs)
        if poison is not None:
            if dead_letter is not None:
                payload = json.dumps({"args": args, "kwargs": kwargs}, default=repr)
                dead_letter(self.request.id, poison[0], "malformed_message", poison[1], payload)
            return "dead_letter"
        run_id: str = args[0]
        try:
            return execute(run_id)
        except RunDeferred as exc:
            raise self.retry(countdown=exc.countdown) from None
        except RunHandedBack:
            raise Reject("handed back at shutdown", requeue=True) from None
        except StoreUnavailable as exc:
            countdown = min(STORE_RETRY_BACKOFF_MAX, 2 ** min(self.request.retries, 6))
            raise self.retry(exc=exc, countdown=countdown, max_retries=None) from exc

    return run_agent
