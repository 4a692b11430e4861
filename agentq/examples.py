"""Example agents: the demo runs them, and they show how an agent is defined.

Factories import the Agents SDK inside their body so that importing this module stays cheap
for producers.
"""

from __future__ import annotations

from typing import Any

from agentq.registry import registry

ORDER_STATUSES = ("processing", "shipped", "out for delivery", "delivered")


def order_status(order_id: str) -> str:
    """A stand-in for an order system: the same order always has the same status."""
    digits = sum(ord(char) for char in order_id)
    return f"order {order_id} is {ORDER_STATUSES[digits % len(ORDER_STATUSES)]}"


@registry.agent("assistant", description="Answers briefly, with no tools.")
def assistant() -> Any:
    from agents import Agent

    return Agent(
        name="assistant",
        instructions="You are a concise assistant. Answer in one or two sentences.",
    )


@registry.agent("support", description="Customer support that looks up orders with a tool.")
def support() -> Any:
    from agents import Agent, function_tool

    @function_tool
    def lookup_order(order_id: str) -> str:
        """Look up the status of an order.

        Args:
            order_id: The order's identifier, as the customer gave it.
        """
        return order_status(order_id)

    return Agent(
        name="support",
        instructions=(
            "You are a customer support agent. Use lookup_order to find an order's status "
            "before answering, then answer in one sentence."
        ),
        tools=[lookup_order],
    )
