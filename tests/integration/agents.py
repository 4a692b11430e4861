"""Agents the integration tests run in real worker processes (AGENTQ_AGENT_MODULES)."""

from __future__ import annotations

from typing import Any

from agentq import registry


@registry.agent("calculator", description="Adds numbers with a tool.")
def calculator() -> Any:
    from agents import Agent, function_tool

    @function_tool
    def add(a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        return str(a + b)

    return Agent(name="calculator", instructions="Use add to compute sums.", tools=[add])


@registry.agent("echo", description="Answers without tools.")
def echo() -> Any:
    from agents import Agent

    return Agent(name="echo", instructions="Repeat the user's words.")


@registry.agent("leaky", description="Fails in a tool with an error that quotes a secret.")
def leaky() -> Any:
    import os

    from agents import Agent, function_tool

    @function_tool(failure_error_function=None)
    def lookup(order: str) -> str:
        """Look an order up.

        Args:
            order: The order number.
        """
        # An error message a careless library might write: credentials and user input.
        key = os.environ.get("OPENAI_API_KEY", "")
        raise RuntimeError(f"ledger refused key {key} for {order!r}")

    return Agent(name="leaky", instructions="Look orders up.", tools=[lookup])
