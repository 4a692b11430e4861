"""The benchmark's agent registered for agentq workers (``AGENTQ_AGENT_MODULES=bench.agents``)."""

from __future__ import annotations

from agentq.registry import registry
from bench.workload import AGENT_NAME, make_agent

registry.agent(AGENT_NAME, description="Benchmark agent: two model calls, one tool call.")(
    make_agent
)
