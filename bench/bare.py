"""The ceiling: the same agent through bare ``Runner.run`` in one process, agent cloned per run.

Run by :mod:`bench.run` as ``python -m bench.bare RUNS CONCURRENCY [CLIENT]`` with the model's
URL in ``OPENAI_BASE_URL``; ``CLIENT`` ``plain`` runs the SDK on agentq's model client instead of
``openai``'s own, for the reference row. The process builds its client, prints ``ready``,
waits for a line on stdin, runs everything, and prints one JSON line with its wall time and CPU.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench.workload import make_agent, make_run_config, run_input


async def main(runs: int, concurrency: int, client_name: str) -> dict[str, float]:
    from agents import Runner

    client_class = None
    if client_name == "plain":
        from agentq.model_client import ModelClient

        client_class = ModelClient
    config, client = make_run_config(client_class)
    prototype = make_agent()
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(index: int) -> None:
        nonlocal failures
        async with gate:
            try:
                await Runner.run(prototype.clone(), run_input(index), run_config=config)
            except Exception:
                failures += 1

    # Warm the client and the SDK's first-call paths outside the measurement, as a worker does.
    await one(-1)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(one(i) for i in range(runs)))
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    await client.close()
    return {
        "runs": runs,
        "failures": failures,
        "wall_s": wall,
        "cpu_s": cpu,
        "finished_at": time.time(),
    }


if __name__ == "__main__":
    client_name = sys.argv[3] if len(sys.argv) > 3 else "openai"
    result = asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), client_name))
    print(json.dumps(result), flush=True)
