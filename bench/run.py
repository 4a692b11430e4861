"""The standard workload, end to end, against agentq, the bare SDK and arq in one sitting.

``python -m bench`` (or ``python -m bench.run``) starts its own mock model server, a fresh
Postgres database and Redis database, then measures in turn:

1. agentq: N runs submitted at once with ``Client.submit_many`` to real worker processes;
2. priorities: a low backlog fills every slot, high runs submitted behind it are timed;
3. the ceiling: the same runs through bare ``Runner.run`` in the same number of processes;
4. the peer: the same runs through arq, one async worker process per core;
5. CPU per run at low concurrency, agentq against the bare SDK;

and prints one table. Numbers are only comparable within one sitting on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import sqlalchemy

from agentq.client import Client
from agentq.config import load_settings
from agentq.store import migrate
from bench.procs import ROOT, CpuMeter, MemoryPeak, named, spawn, stop, tree, wait_for
from bench.workload import AGENT_NAME, run_input

POSTGRES_BASE = os.environ.get("AGENTQ_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
REDIS_BASE = os.environ.get("AGENTQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
#: arq pins a redis client older than agentq's, so the peer runs in an environment of its own.
ARQ_VENV = ROOT / ".bench-venv-arq"


def arq_python() -> str:
    """The interpreter of the arq peer: ``AGENTQ_BENCH_ARQ_PYTHON``, or a venv made once."""
    configured = os.environ.get("AGENTQ_BENCH_ARQ_PYTHON")
    if configured:
        return configured
    python = ARQ_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {ARQ_VENV} for the arq peer ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(ARQ_VENV)], check=True)
    check = [str(python), "-c", "import arq, aiohttp, agents"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        from importlib.metadata import version

        # The same Agents SDK, openai and HTTP transport as agentq's workers: only the queue
        # differs.
        pins = [
            f"openai-agents=={version('openai-agents')}",
            f"openai[aiohttp]=={version('openai')}",
        ]
        subprocess.run([str(python), "-m", "pip", "install", "-q", "arq", *pins], check=True)
    return str(python)


@dataclass
class Phase:
    name: str
    runs: int = 0
    failed: int = 0
    wall_s: float = 0.0
    runs_per_s: float = 0.0
    cpu_ms: dict[str, float] = field(default_factory=dict)
    peak_mb: float = 0.0
    """Peak summed PSS of the workers (shared pages counted once)."""
    peak_rss_mb: float = 0.0
    """Peak summed RSS of the workers (shared pages counted in each process)."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Environment:
    model_url: str
    redis_url: str
    postgres_url: str
    logs: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.postgres_url,
            "OPENAI_BASE_URL": self.model_url,
            "OPENAI_API_KEY": "sk-bench",
            "AGENTQ_AGENT_MODULES": "bench.agents",
            "AGENTQ_ENABLE_TRACING": "false",
            # agentq's default transport, set for all three so only the queue differs.
            "AGENTQ_HTTP_CLIENT": "aiohttp",
            "LOG_LEVEL": "warning",
            **extra,
        }


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@contextlib.contextmanager
def environment(latency_ms: float) -> Iterator[Environment]:
    logs = Path(tempfile.mkdtemp(prefix="agentq-bench-"))
    mock = spawn(
        ["-m", "agentq.testing", "--port", "0", "--latency-ms", str(latency_ms)],
        {},
        logs / "mock.log",
        stdout=subprocess.PIPE,
    )
    assert mock.stdout is not None
    line = mock.stdout.readline().decode().strip()
    if not line.startswith("listening "):
        raise RuntimeError(f"mock server did not start: {line!r}")
    admin = redis.Redis.from_url(REDIS_BASE + "/0")
    number = int(admin.incr("agentq:test:db-counter")) % 15 + 1
    redis_url = f"{REDIS_BASE}/{number}"
    redis.Redis.from_url(redis_url).flushdb()
    name = f"agentq_bench_{uuid.uuid4().hex[:8]}"
    admin_db = sqlalchemy.create_engine(
        POSTGRES_BASE.replace("postgresql://", "postgresql+psycopg://") + "/postgres",
        isolation_level="AUTOCOMMIT",
    )
    with admin_db.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    postgres_url = f"{POSTGRES_BASE}/{name}"
    migrate(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        yield Environment(line.split()[1], redis_url, postgres_url, logs)
    finally:
        stop(mock)
        redis.Redis.from_url(redis_url).flushdb()
        with admin_db.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_db.dispose()


def service_meters() -> dict[str, CpuMeter]:
    return {
        "redis": CpuMeter(lambda: named("redis-server")),
        "postgres": CpuMeter(lambda: named("postgres", "postgresql")),
    }


class Workers:
    """``agentq worker`` processes for the duration of a with-block."""

    def __init__(self, env: Environment, client: Client, processes: int, args: list[str]):
        self.env = env
        self.client = client
        self.processes = processes
        self.args = args
        self.handles: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Workers:
        log = self.env.logs / "workers.log"
        self.handles = [
            spawn(
                ["-m", "agentq", "worker", "--processes", str(self.processes), *self.args],
                self.env.env(),
                log,
            )
        ]
        ok = wait_for(lambda: len(self.ping()) >= self.processes, timeout=120, interval=0.5)
        if not ok:
            self.__exit__()
            raise RuntimeError(f"workers did not start; see {log}")
        self.warm_up()
        return self

    def warm_up(self) -> None:
        """A few runs per process before measuring, as the bare ceiling does: a long-lived
        worker has paid its first-call costs (lazy imports, statement compilation) long ago."""
        count = self.processes * 8
        handles = self.client.submit_many(items(count, "normal"))
        self.client.wait_many([h.id for h in handles], timeout=120)
        with self.client.store.engine.begin() as conn:
            conn.execute(sqlalchemy.text("DELETE FROM runs"))

    def ping(self) -> list[Any]:
        replies = self.client.celery.control.ping(timeout=0.5)
        return [r for r in replies if any(name.startswith("agentq@") for name in r)]

    @property
    def pids(self) -> list[int]:
        return [handle.pid for handle in self.handles]

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            stop(handle, timeout=120)


def count_finished(client: Client, run_ids: Sequence[str] | None = None) -> int:
    query = "SELECT count(*) FROM runs WHERE status IN ('succeeded','failed','cancelled')"
    with client.store.engine.connect() as conn:
        return int(conn.execute(sqlalchemy.text(query)).scalar_one())


def items(count: int, priority: str, offset: int = 0) -> list[dict[str, Any]]:
    return [
        {"agent": AGENT_NAME, "input": run_input(offset + i), "priority": priority}
        for i in range(count)
    ]


def measure_agentq(env: Environment, client: Client, runs: int, processes: int,
                   worker_args: list[str], timeout: float) -> Phase:
    phase = Phase("agentq", runs=runs)
    with Workers(env, client, processes, worker_args) as workers:
        worker_cpu = CpuMeter(lambda: tree(workers.pids))
        meters = {"workers": worker_cpu, **service_meters()}
        batch = items(runs, "normal")
        with MemoryPeak(workers.pids) as memory:
            for meter in meters.values():
                meter.start()
            producer0 = time.process_time()
            started = time.monotonic()
            handles = client.submit_many(batch)
            submit_s = time.monotonic() - started
            producer_cpu = time.process_time() - producer0
            wait_for(lambda: count_finished(client) >= runs, timeout, interval=0.25)
            for meter in meters.values():
                meter.stop()
        done = client.store.get_many([h.id for h in handles])
        phase.peak_mb = memory.peak_mb
        phase.peak_rss_mb = memory.peak_rss_mb
    phase.failed = sum(r.status.value != "succeeded" for r in done)
    finished = [r.finished_at.timestamp() for r in done if r.finished_at]
    first_created = min(r.created_at.timestamp() for r in done)
    phase.wall_s = max(finished) - first_created if finished else float("nan")
    phase.runs_per_s = (runs - phase.failed) / phase.wall_s
    phase.cpu_ms = {name: m.seconds * 1000 / runs for name, m in meters.items()}
    phase.cpu_ms["producer"] = producer_cpu * 1000 / runs
    waits = [r.queue_ms for r in done if r.queue_ms is not None]
    phase.extra = {
        "submit_runs_per_s": runs / submit_s,
        "queue_ms_p50": percentile(waits, 0.5),
        "queue_ms_p99": percentile(waits, 0.99),
    }
    return phase


def measure_priorities(env: Environment, client: Client, backlog: int, high: int,
                       processes: int, worker_args: list[str], timeout: float) -> Phase:
    """A low backlog fills every slot; high runs submitted one by one must overtake it."""
    phase = Phase("priorities", runs=backlog + high)
    with Workers(env, client, processes, worker_args):
        low = client.submit_many(items(backlog, "low"))
        # Let the backlog occupy every slot before the first high run arrives.
        time.sleep(3.0)
        highs = []
        for index in range(high):
            highs.extend(client.submit_many(items(1, "high", offset=index)))
            time.sleep(0.2)
        high_runs = client.wait_many([h.id for h in highs], timeout=timeout)
        low_left = backlog - count_finished(client) + len(high_runs)
        wait_for(lambda: count_finished(client) >= backlog + high, timeout, interval=0.5)
        low_runs = client.store.get_many([h.id for h in low])
    high_waits = [r.queue_ms for r in high_runs if r.queue_ms is not None]
    low_waits = [r.queue_ms for r in low_runs if r.queue_ms is not None]
    phase.failed = sum(r.status.value != "succeeded" for r in (*high_runs, *low_runs))
    phase.extra = {
        "high_queue_ms_p50": percentile(high_waits, 0.5),
        "high_queue_ms_p99": percentile(high_waits, 0.99),
        "high_queue_ms_max": max(high_waits, default=float("nan")),
        "low_queue_ms_p50": percentile(low_waits, 0.5),
        "low_queue_ms_p99": percentile(low_waits, 0.99),
        "low_still_queued_when_high_done": low_left,
    }
    return phase


def measure_bare(env: Environment, runs: int, processes: int, concurrency: int | None,
                 name: str = "bare", client: str = "openai") -> Phase:
    """The bare SDK; ``client`` ``plain`` runs it on agentq's model client (the reference row)."""
    phase = Phase(name, runs=runs)
    shares = [runs // processes + (1 if i < runs % processes else 0) for i in range(processes)]
    children = []
    for share in shares:
        child = spawn(
            ["-m", "bench.bare", str(share), str(concurrency or share), client],
            env.env(),
            env.logs / "bare.log",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        children.append(child)
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"bare process failed; see {env.logs / 'bare.log'}")
    meters = service_meters()
    for meter in meters.values():
        meter.start()
    started = time.time()
    results = []
    with MemoryPeak(child.pid for child in children) as memory:
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        for child in children:
            assert child.stdout is not None
            results.append(json.loads(child.stdout.readline()))
    for child in children:
        child.wait(30)
    for meter in meters.values():
        meter.stop()
    phase.failed = sum(r["failures"] for r in results)
    phase.wall_s = max(r["finished_at"] for r in results) - started
    phase.runs_per_s = (runs - phase.failed) / phase.wall_s
    phase.cpu_ms = {"workers": sum(r["cpu_s"] for r in results) * 1000 / runs}
    phase.cpu_ms.update({k: m.seconds * 1000 / runs for k, m in meters.items()})
    phase.peak_mb = memory.peak_mb
    phase.peak_rss_mb = memory.peak_rss_mb
    return phase


def measure_arq(env: Environment, runs: int, processes: int, max_jobs: int,
                timeout: float) -> Phase:
    phase = Phase("arq", runs=runs)
    children = [
        spawn(["-m", "bench.arq_peer", "worker", str(max_jobs)], env.env(),
              env.logs / "arq.log", python=arq_python())
        for _ in range(processes)
    ]
    db = redis.Redis.from_url(env.redis_url)
    try:
        if not wait_for(lambda: int(db.get("bench:arq:ready") or 0) >= processes, 120, 0.5):
            raise RuntimeError(f"arq workers did not start; see {env.logs / 'arq.log'}")
        meters = {"workers": CpuMeter(lambda: tree(c.pid for c in children)), **service_meters()}
        with MemoryPeak(c.pid for c in children) as memory:
            for meter in meters.values():
                meter.start()
            producer = subprocess.run(
                [arq_python(), "-m", "bench.arq_peer", "submit", str(runs)],
                cwd=ROOT, env={**os.environ, **env.env(), "PYTHONPATH": str(ROOT)},
                capture_output=True, check=True,
            )
            submitted = json.loads(producer.stdout)
            wait_for(lambda: int(db.get("bench:arq:done") or 0) >= runs, timeout, 0.25)
            for meter in meters.values():
                meter.stop()
        finished_at = float(db.get("bench:arq:last") or "nan")
        phase.failed = int(db.get("bench:arq:failed") or 0)
        phase.wall_s = finished_at - submitted["started_at"]
        phase.runs_per_s = (runs - phase.failed) / phase.wall_s
        phase.cpu_ms = {k: m.seconds * 1000 / runs for k, m in meters.items()}
        phase.cpu_ms["producer"] = submitted["cpu_s"] * 1000 / runs
        phase.peak_mb = memory.peak_mb
        phase.peak_rss_mb = memory.peak_rss_mb
        phase.extra = {"submit_runs_per_s": runs / submitted["submit_s"]}
    finally:
        for child in children:
            stop(child)
    return phase


def measure_low_concurrency(env: Environment, client: Client, runs: int,
                            concurrency: int, timeout: float) -> Phase:
    """CPU per run with few runs in flight: one agentq worker process of ``concurrency`` slots."""
    phase = Phase("agentq-low", runs=runs)
    args = ["--concurrency", str(concurrency), "--min-concurrency", str(concurrency)]
    with Workers(env, client, 1, args) as workers:
        meter = CpuMeter(lambda: tree(workers.pids))
        meter.start()
        started = time.monotonic()
        client.submit_many(items(runs, "normal"))
        wait_for(lambda: count_finished(client) >= runs, timeout, interval=0.25)
        phase.wall_s = time.monotonic() - started
        meter.stop()
    phase.runs_per_s = runs / phase.wall_s
    phase.cpu_ms = {"workers": meter.seconds * 1000 / runs}
    return phase


def reset(env: Environment) -> None:
    redis.Redis.from_url(env.redis_url).flushdb()
    engine = sqlalchemy.create_engine(env.postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM runs"))
    engine.dispose()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = [
        "agentq", "openai-agents", "openai", "celery", "kombu", "redis", "sqlalchemy", "psycopg"
    ]
    found = {name: version(name) for name in names}
    with contextlib.suppress(Exception):
        found["arq"] = subprocess.run(
            [arq_python(), "-c", "import arq; print(arq.VERSION)"], capture_output=True,
            text=True, check=True,
        ).stdout.strip()
    found["python"] = platform.python_version()
    with contextlib.suppress(Exception):
        found["redis-server"] = redis.Redis.from_url(REDIS_BASE).info()["redis_version"]
    return found


def ceiling_of(phases: dict[str, Phase]) -> Phase | None:
    """The best bare-SDK configuration measured (one process per core, agent cloned per run)."""
    bare = [phase for name, phase in phases.items() if name.startswith("bare-")]
    bare = [phase for phase in bare if phase.name != "bare-low"]
    return max(bare, key=lambda phase: phase.runs_per_s, default=None)


def targets(phases: dict[str, Phase], args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """The engine's targets: (what, measured, met)."""
    found: list[tuple[str, str, bool]] = []
    agentq, ceiling, peer = phases.get("agentq"), ceiling_of(phases), phases.get("arq")
    if agentq and ceiling:
        ratio = agentq.runs_per_s / ceiling.runs_per_s
        found.append(("throughput >= 0.90 x best bare SDK", f"{ratio:.2f} x ({ceiling.name})",
                      ratio >= 0.9))
    if agentq and peer:
        ratio = agentq.runs_per_s / peer.runs_per_s
        found.append(("throughput >= 1.50 x arq", f"{ratio:.2f} x", ratio >= 1.5))
    low, bare_low = phases.get("agentq-low"), phases.get("bare-low")
    if low and bare_low:
        ratio = low.cpu_ms["workers"] / bare_low.cpu_ms["workers"]
        found.append((f"worker CPU/run at {args.low_concurrency} in flight <= 1.25 x bare",
                      f"{ratio:.2f} x", ratio <= 1.25))
    prio = phases.get("priorities")
    if prio:
        p99 = prio.extra["high_queue_ms_p99"]
        found.append((f"high queue wait p99 < 1 s behind {args.backlog} low", f"{p99:.0f} ms",
                      p99 < 1000))
    if agentq:
        in_flight = args.processes * args.concurrency
        found.append((f"peak worker memory < 400 MB, {in_flight} in flight",
                      f"{agentq.peak_mb:.0f} MB PSS ({agentq.peak_rss_mb:.0f} MB RSS)",
                      agentq.peak_mb < 400))
        rate = agentq.extra["submit_runs_per_s"]
        found.append(("submit_many >= 2000 runs/s", f"{rate:.0f} runs/s", rate >= 2000))
    return found


def table(phases: dict[str, Phase], args: argparse.Namespace) -> str:
    ceiling = ceiling_of(phases)
    peer = phases.get("arq")
    lines = [
        f"workload: {args.runs} runs x (2 model calls + 1 tool call), model latency "
        f"{args.latency_ms:g} ms, {args.processes} process(es) x {args.concurrency} in flight, "
        f"host {os.cpu_count()} cores",
        "",
        f"{'config':<14}{'runs/s':>8}{'/ceiling':>10}{'/arq':>7}{'failed':>8}"
        f"{'cpu ms/run: workers':>21}{'redis':>7}{'pg':>7}{'producer':>10}"
        f"{'PSS MB':>8}{'RSS MB':>8}",
    ]
    for phase in phases.values():
        if phase.name == "priorities":
            continue
        c = phase.cpu_ms
        ratio_c = f"{phase.runs_per_s / ceiling.runs_per_s:.2f}" if ceiling else "-"
        ratio_p = f"{phase.runs_per_s / peer.runs_per_s:.2f}" if peer else "-"
        lines.append(
            f"{phase.name:<14}{phase.runs_per_s:>8.1f}{ratio_c:>10}{ratio_p:>7}{phase.failed:>8}"
            f"{c.get('workers', float('nan')):>21.1f}{c.get('redis', float('nan')):>7.1f}"
            f"{c.get('postgres', float('nan')):>7.1f}{c.get('producer', float('nan')):>10.2f}"
            f"{phase.peak_mb:>8.0f}{phase.peak_rss_mb:>8.0f}"
        )
    lines += [
        "",
        "bare-N: Runner.run with N runs in flight per process (all: every run at once); the "
        f"ceiling is the fastest. *-low: {args.low_concurrency} in flight in one process.",
        "ref-plain-N: the bare SDK on agentq's model client (agentq.model_client), not a "
        "ceiling: agentq against it is the cost of the queue alone.",
    ]
    agentq = phases.get("agentq")
    if agentq:
        x = agentq.extra
        lines.append(
            f"agentq queue wait p50 {x['queue_ms_p50']:.0f} ms p99 {x['queue_ms_p99']:.0f} ms "
            "(normal priority, all submitted at once)"
        )
    prio = phases.get("priorities")
    if prio:
        x = prio.extra
        lines.append(
            f"priorities ({args.backlog} low queued, {args.high} high submitted behind them): "
            f"high queue wait p50 {x['high_queue_ms_p50']:.0f} ms p99 {x['high_queue_ms_p99']:.0f}"
            f" ms max {x['high_queue_ms_max']:.0f} ms; low p50 {x['low_queue_ms_p50']:.0f} ms "
            f"p99 {x['low_queue_ms_p99']:.0f} ms; {x['low_still_queued_when_high_done']} low "
            f"runs still unfinished when every high run was done; failed {prio.failed}"
        )
    lines += ["", "targets:"]
    for what, measured, met in targets(phases, args):
        lines.append(f"  {'met ' if met else 'MISS'}  {what}: {measured}")
    return "\n".join(lines)


def median_phase(measured: Sequence[Phase]) -> Phase:
    """The measurement with the median worker CPU per run; the spread goes in its extras."""
    ordered = sorted(measured, key=lambda phase: phase.cpu_ms.get("workers", 0.0))
    chosen = ordered[len(ordered) // 2]
    if len(ordered) > 1:
        chosen.extra["cpu_ms_workers_all"] = [p.cpu_ms.get("workers") for p in measured]
    return chosen


def _bare_step(env: Environment, args: argparse.Namespace, size: str) -> Callable[[], Phase]:
    in_flight = None if size == "all" else int(size)
    return lambda: measure_bare(env, args.runs, args.processes, in_flight, name=f"bare-{size}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--concurrency", type=int, default=500,
        help="runs in flight per process: agentq's slots, arq's max_jobs, the bare SDK's gather",
    )
    parser.add_argument("--backlog", type=int, default=5000, help="low runs in the priority test")
    parser.add_argument("--high", type=int, default=20, help="high runs in the priority test")
    parser.add_argument("--low-concurrency", type=int, default=10)
    parser.add_argument("--low-runs", type=int, default=500)
    parser.add_argument("--low-repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument(
        "--only", default="bare,ref,agentq,arq,priorities,low",
        help="comma-separated phases to run",
    )
    parser.add_argument(
        "--bare-in-flight", default="50,500,all",
        help="runs in flight per process for the bare SDK, each measured (the best is the "
        "ceiling); 'all' runs every run at once",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(","))
    phases: dict[str, Phase] = {}
    worker_args = ["--concurrency", str(args.concurrency)]
    with environment(args.latency_ms) as env:
        # Aliased fields take their environment names as keywords.
        settings = load_settings(
            REDIS_URL=env.redis_url, DATABASE_URL=env.postgres_url, agent_modules=["bench.agents"]
        )
        assert not settings.embedded
        with Client(settings) as client:
            print(f"logs in {env.logs}", file=sys.stderr)
            steps: list[tuple[str, str, Callable[[], Phase]]] = [
                ("bare", f"bare-{size}", _bare_step(env, args, size))
                for size in args.bare_in_flight.split(",")
            ]
            steps += [
                ("ref", f"ref-plain-{args.concurrency}", lambda: measure_bare(
                    env, args.runs, args.processes, args.concurrency,
                    name=f"ref-plain-{args.concurrency}", client="plain")),
                ("agentq", "agentq", lambda: measure_agentq(
                    env, client, args.runs, args.processes, worker_args, args.timeout)),
                ("arq", "arq", lambda: measure_arq(
                    env, args.runs, args.processes, args.concurrency, args.timeout)),
                ("priorities", "priorities", lambda: measure_priorities(
                    env, client, args.backlog, args.high, args.processes, worker_args,
                    args.timeout)),
            ]
            # CPU per run at low concurrency is a small number measured over a few seconds:
            # alternate the two several times and keep each one's median.
            for _ in range(args.low_repeats):
                steps += [
                    ("low", "agentq-low", lambda: measure_low_concurrency(
                        env, client, args.low_runs, args.low_concurrency, args.timeout)),
                    ("low", "bare-low", lambda: measure_bare(
                        env, args.low_runs, 1, args.low_concurrency, name="bare-low")),
                ]
            repeated: dict[str, list[Phase]] = {}
            for group, name, step in steps:
                if group not in wanted:
                    continue
                reset(env)
                print(f"measuring {name} ...", file=sys.stderr)
                phase = step()
                print(json.dumps(asdict(phase)), file=sys.stderr)
                repeated.setdefault(name, []).append(phase)
                phases[name] = median_phase(repeated[name])
    report = table(phases, args)
    print(report)
    if args.json:
        payload = {"versions": versions(), "cpu": platform.processor() or platform.machine(),
                   "cores": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30,
                   "args": vars(args) | {"json": str(args.json)},
                   "phases": {k: asdict(v) for k, v in phases.items()},
                   "targets": targets(phases, args), "table": report}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
