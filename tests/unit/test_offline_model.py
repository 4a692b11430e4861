"""The offline model runs real Agents SDK loops with no key or network."""

from __future__ import annotations

import asyncio

from agents import Agent, RunConfig, Runner, function_tool

from agentq.models import OfflineProvider


def test_calls_the_tool_then_answers_with_its_output() -> None:
    calls: list[str] = []

    @function_tool
    def lookup(order_id: str) -> str:
        """Look up an order.

        Args:
            order_id: The order.
        """
        calls.append(order_id)
        return "order is shipped"

    agent = Agent(name="t", instructions="help", tools=[lookup])
    config = RunConfig(model_provider=OfflineProvider(), tracing_disabled=True)
    result = asyncio.run(Runner.run(agent, "Where is A-1?", run_config=config))

    assert calls == ["Where is A-1?"]
    assert "order is shipped" in result.final_output
    usage = result.context_wrapper.usage
    assert usage.requests == 2
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens > 0


def test_answers_without_tools() -> None:
    agent = Agent(name="t", instructions="help")
    config = RunConfig(model_provider=OfflineProvider(), tracing_disabled=True)
    result = asyncio.run(Runner.run(agent, "hello there", run_config=config))
    assert "hello there" in result.final_output
    assert len(result.raw_responses) == 1
