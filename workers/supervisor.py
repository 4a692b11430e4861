"""``agentq worker --processes N``: one engine process per core, under one parent.

A run's CPU, not the model's latency, limits a host, and one Python process uses one core: N
worker processes, each a whole Celery worker with its own event loop, OpenAI client and name
(visible one by one in Flower), serve the same queues. The parent only starts them, restarts
one that dies, and passes SIGTERM/SIGINT on so each drains its own runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from types import FrameType

logger = logging.getLogger("agentq.supervisor")

#: Seconds between restarts of a child that keeps dying, so a broken setup does not spin.
RESTART_PAUSE = 2.0


class Supervisor:
    """Starts ``count`` single-process workers with ``args`` and waits for them."""

    def __init__(self, count: int, args: Sequence[str]) -> None:
        self.count = count
        self.args = list(args)
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        #: Signals received and not yet passed on to the children.
        self._pending: deque[int] = deque()

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["AGENTQ_WORKER_PROCESSES"] = "1"
        # A process group of its own: a terminal's Ctrl-C reaches the child once, forwarded,
        # rather than twice (a second SIGINT is Celery's cold shutdown).
        child = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-m", "agentq", "worker", *self.args],
            env=env,
            process_group=0,
        )
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
