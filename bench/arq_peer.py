"""The peer: the standard workload through arq, one async worker process per core.

Runs in an interpreter of its own (``AGENTQ_BENCH_ARQ_PYTHON``, or the virtual environment
:mod:`bench.run` creates), since arq pins a ``redis`` older than agentq's. It imports only
:mod:`bench.workload`, never agentq.

``python -m bench.arq_peer worker MAX_JOBS`` serves jobs; each process counts itself ready in
Redis. ``python -m bench.arq_peer submit N`` enqueues N jobs at once and prints one JSON line
with its start time, submit time and CPU. Workers count finished and failed jobs in Redis
and keep the time the last one finished.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from arq import Worker, create_pool
from arq.connections import RedisSettings

from bench.workload import make_agent, make_run_config, run_input

READY_KEY = "bench:arq:ready"
DONE_KEY = "bench:arq:done"
FAILED_KEY = "bench:arq:failed"
LAST_KEY = "bench:arq:last"
QUEUE = "bench:arq:queue"
#: Jobs enqueued concurrently by the producer; arq enqueues one job per call.
SUBMIT_CONCURRENCY = 200


def redis_settings() -> RedisSettings:
    return RedisSettings.from_dsn(os.environ["REDIS_URL"])


async def startup(ctx: dict[str, Any]) -> None:
    ctx["config"], ctx["client"] = make_run_config()
    ctx["agent"] = make_agent()
    await ctx["redis"].incr(READY_KEY)


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["client"].close()


async def run_agent(ctx: dict[str, Any], index: int) -> None:
    from agents import Runner

    try:
        await Runner.run(ctx["agent"].clone(), run_input(index), run_config=ctx["config"])
    except Exception:
        await ctx["redis"].incr(FAILED_KEY)
        raise
    finally:
        pipe = ctx["redis"].pipeline(transaction=False)
        pipe.incr(DONE_KEY)
        pipe.set(LAST_KEY, repr(time.time()))
        await pipe.execute()


def serve(max_jobs: int) -> None:
    worker = Worker(
        functions=[run_agent],
        redis_settings=redis_settings(),
        queue_name=QUEUE,
        max_jobs=max_jobs,
        on_startup=startup,
        on_shutdown=shutdown,
        max_tries=1,
    )
    worker.run()


async def submit(count: int) -> dict[str, float]:
    pool = await create_pool(redis_settings(), default_queue_name=QUEUE)
    gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)

    async def one(index: int) -> None:
        async with gate:
            await pool.enqueue_job("run_agent", index)

    started, cpu0, wall0 = time.time(), time.process_time(), time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    submit_s, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    await pool.aclose()
    return {"started_at": started, "submit_s": submit_s, "cpu_s": cpu}


if __name__ == "__main__":
    command, number = sys.argv[1], int(sys.argv[2])
    if command == "worker":
        serve(number)
    elif command == "submit":
        print(json.dumps(asyncio.run(submit(number))), flush=True)
    else:
        raise SystemExit(f"unknown command {command!r}: worker MAX_JOBS | submit N")
