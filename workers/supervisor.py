"""``agentq worker --processes N``: one engine process per core, under one parent.

A run's CPU, not the model's latency, limits a host, and one Python process uses one core: N
worker processes, each a whole Celery worker with its own event loop, OpenAI client and name
(visible one by one in Flower), serve the same queues. The parent only starts them, restarts
one that dies, and passes SIGTERM/SIGINT on so each drains its own runs.

The parent imports what every worker needs (the Agents SDK and ``openai`` alone are 95 MB),
freezes those objects out of the garbage collector's reach, and forks the workers, so the
pages holding them are shared by all of them instead of copied into each. It opens no
connection and starts no thread before forking: each worker builds its own clients.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import random
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol

logger = logging.getLogger("agentq.supervisor")

#: Seconds between restarts of a child that keeps dying, so a broken setup does not spin.
RESTART_PAUSE = 2.0

#: What a worker process imports, loaded once in the parent and shared by every child.
SHARED_MODULES = (
    "agents",
    "openai",
    "aiohttp",
    "psycopg",
    "sqlalchemy.ext.asyncio",
    "celery.worker",
    "kombu.transport.redis",
    "workers.worker",
)


def preload(load_agents: Callable[[], object] = lambda: None) -> None:
    """Import the workers' modules (and, through ``load_agents``, the agents' own) before
    forking, then freeze them.

    ``gc.freeze`` keeps the collector from writing to the shared objects' headers, which
    would copy their pages into every child.
    """
    for module in SHARED_MODULES:
        importlib.import_module(module)
    load_agents()
    gc.collect()
    gc.freeze()


class Child(Protocol):
    """A worker process as the supervisor sees it (``subprocess.Popen`` fits too)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


class ForkedWorker:
    """A worker forked from the supervisor: runs ``target`` in the child and exits with its code.

    ``returncode`` follows ``subprocess.Popen``: the exit status, or minus the signal that
    killed the process.
    """

    def __init__(self, target: Callable[[], int]) -> None:
        self.returncode: int | None = None
        pid = os.fork()
        if pid == 0:
            self._serve(target)
        self.pid = pid

    @staticmethod
    def _serve(target: Callable[[], int]) -> None:
        code = 1
        try:
            # A process group of its own: a terminal's Ctrl-C reaches the child once,
            # forwarded, rather than twice (a second SIGINT is Celery's cold shutdown).
            os.setpgid(0, 0)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            random.seed()  # retries' jitter must differ between workers
            code = target()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported, then the child exits
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class Supervisor:
    """Keeps ``count`` worker processes running ``target`` and waits for them."""

    def __init__(self, count: int, target: Callable[[], int]) -> None:
        self.count = count
        self.target = target
        self.children: list[Child] = []
        self.stopping = False
        #: Signals received and not yet passed on to the children.
        self._pending: deque[int] = deque()

    def _spawn(self) -> Child:
        child = ForkedWorker(self.target)
        logger.info(
            "worker process started",
            extra={"action": "worker_process_started", "pid": child.pid},
        )
        return child

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only noted here; the loop passes it on. A handler that signalled the children itself
        # would miss one being started at that moment, and the parent would wait for it forever.
        self.stopping = True
        self._pending.append(signum)

    def _forward(self) -> None:
        while self._pending:
            signum = self._pending.popleft()
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signum)

    def _pause(self, seconds: float) -> None:
        """Sleep, waking early for a signal so that it reaches the children at once."""
        deadline = time.monotonic() + seconds
        while not self._pending and time.monotonic() < deadline:
            time.sleep(0.05)

    def _replace_exited(self) -> None:
        for index, child in enumerate(self.children):
            code = child.poll()
            if code is None:
                continue
            logger.warning(
                "worker process exited; starting another",
                extra={"action": "worker_process_restarted", "pid": child.pid, "exit_code": code},
            )
            self._pause(RESTART_PAUSE)
            if self.stopping:
                return
            self.children[index] = self._spawn()

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for _ in range(self.count):
                if not self.stopping:
                    self.children.append(self._spawn())
            while True:
                self._forward()
                if not self.stopping:
                    self._replace_exited()
                elif all(child.poll() is not None for child in self.children):
                    break
                self._pause(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return exit_status([child.returncode for child in self.children])


def exit_status(codes: Sequence[int | None]) -> int:
    """The parent's exit status: the worst of its children's, a signal's death included.

    A child killed by a signal has a negative return code; it becomes 128 + the signal's
    number, as a shell reports it, so a worker killed while draining is not a clean exit.
    """
    statuses = [128 - code if code < 0 else code for code in codes if code]
    return max(statuses, default=0)
