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
        self._signal: int | None = None

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

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        self._signal = signum
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.children = [self._spawn() for _ in range(self.count)]
            while True:
                alive = [child for child in self.children if child.poll() is None]
                if self.stopping and not alive:
                    break
                if not self.stopping:
                    for index, child in enumerate(self.children):
                        code = child.poll()
                        if code is not None:
                            logger.warning(
                                "worker process exited; starting another",
                                extra={
                                    "action": "worker_process_restarted",
                                    "pid": child.pid,
                                    "exit_code": code,
                                },
                            )
                            time.sleep(RESTART_PAUSE)
                            if not self.stopping:
                                self.children[index] = self._spawn()
                time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        codes = [child.returncode or 0 for child in self.children]
        return max(codes, default=0)
