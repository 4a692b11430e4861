"""The ``agentq worker --processes N`` parent: passing signals on and reporting how it ended."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from workers.supervisor import ForkedWorker, Supervisor, exit_status


@pytest.mark.parametrize(
    ("codes", "status"),
    [
        ([0, 0], 0),
        ([], 0),
        ([0, 1], 1),
        ([0, -signal.SIGKILL], 128 + signal.SIGKILL),
        ([2, -signal.SIGTERM], 128 + signal.SIGTERM),
    ],
)
def test_the_exit_status_is_the_worst_of_the_childrens(codes: list[int], status: int) -> None:
    assert exit_status(codes) == status


def test_a_signal_that_comes_while_a_worker_starts_reaches_that_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    supervisor = Supervisor(2, lambda: 0)
    started: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "30"])
        started.append(child)
        # SIGTERM arrives before the parent has the new child in its list.
        os.kill(os.getpid(), signal.SIGTERM)
        return child

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    # Should the signal be lost, the parent would wait for its child for ever.
    watchdog = threading.Timer(10, lambda: [child.kill() for child in started])
    watchdog.start()
    began = time.monotonic()
    try:
        status = supervisor.run()
    finally:
        watchdog.cancel()
        for child in started:
            if child.poll() is None:
                child.kill()
            child.wait()

    assert time.monotonic() - began < 5
    # Stopping before the second worker started: it is never started.
    assert [child.returncode for child in started] == [-signal.SIGTERM]
    assert status == 128 + signal.SIGTERM


def _reaped(child: ForkedWorker, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (code := child.poll()) is None:
        assert time.monotonic() < deadline, "the forked worker did not exit"
        time.sleep(0.01)
    return code


def test_a_forked_worker_exits_with_its_targets_code() -> None:
    assert _reaped(ForkedWorker(lambda: 3)) == 3
    assert _reaped(ForkedWorker(lambda: 0)) == 0


def test_a_forked_worker_that_raises_exits_1_and_one_killed_reports_the_signal() -> None:
    def broken() -> int:
        raise RuntimeError("no broker")

    assert _reaped(ForkedWorker(broken)) == 1

    def sleeper() -> int:
        time.sleep(30)
        return 0

    child = ForkedWorker(sleeper)
    child.send_signal(signal.SIGKILL)
    assert _reaped(child) == -signal.SIGKILL
    child.send_signal(signal.SIGTERM)  # already gone: nothing to signal, no error


def test_a_forked_worker_takes_signals_with_the_default_handlers() -> None:
    # The parent's own handlers (which only note a signal) must not survive the fork, or
    # a worker would ignore the SIGTERM that asks it to drain.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:

        def sleeper() -> int:
            time.sleep(30)
            return 0

        child = ForkedWorker(sleeper)
        time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        assert _reaped(child) == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
