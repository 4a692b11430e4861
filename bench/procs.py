"""Processes the benchmark starts and watches: CPU and memory of a process tree."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree(pids: Iterable[int]) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            found[pid] = process
            for child in process.children(recursive=True):
                found[child.pid] = child
    return list(found.values())


def named(*names: str) -> list[psutil.Process]:
    """Every process of these names on the host (Redis, Postgres: shared with other users)."""
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] in names:
            found.append(process)
    return found


class CpuMeter:
    """CPU seconds spent by a fixed set of processes between start() and stop().

    Processes are sampled again at stop() so a process that appeared meanwhile (a Postgres
    backend, a worker's child) is counted from zero.
    """

    def __init__(self, find: object) -> None:
        self.find = find  # callable returning the processes to count
        self._start: dict[int, float] = {}
        self.seconds = 0.0

    def _snapshot(self) -> dict[int, float]:
        snap = {}
        for process in self.find():  # type: ignore[operator]
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                snap[process.pid] = times.user + times.system
        return snap

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> float:
        end = self._snapshot()
        self.seconds = sum(value - self._start.get(pid, 0.0) for pid, value in end.items())
        return self.seconds


class MemoryPeak:
    """Peak memory of a process tree, sampled in a thread, in MB.

    ``peak_mb`` sums each process's PSS: a page shared by several processes (the modules a
    forking parent loaded once for its workers, the interpreter's libraries) counts once,
    split between them, as the host's memory and a container's limit count it. ``peak_rss_mb``
    sums RSS, which counts every shared page once per process.
    """

    def __init__(self, pids: Iterable[int], interval: float = 0.25) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peak_mb = 0.0
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            pss = rss = 0
            for process in tree(self.pids):
                with contextlib.suppress(psutil.Error):
                    info = process.memory_full_info()
                    pss += info.pss
                    rss += info.rss
            self.peak_mb = max(self.peak_mb, pss / 2**20)
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def spawn(
    args: list[str],
    env: Mapping[str, str],
    log: Path,
    *,
    python: str = sys.executable,
    stdin: int | None = None,
    stdout: int | None = None,
) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTQ_", "OPENAI_"))}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    full["PYTHONUNBUFFERED"] = "1"
    handle = log.open("ab")
    return subprocess.Popen(
        [python, *args],
        cwd=ROOT,
        env=full,
        stdin=stdin,
        stdout=stdout if stdout is not None else handle,
        stderr=handle,
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def wait_for(predicate: object, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
