"""Agents for the resilience tests, loaded by their workers through AGENTQ_AGENT_MODULES."""

from __future__ import annotations

from typing import Any

from agentq import registry


@registry.agent("mini-echo", description="Answers without tools on another model.")
def mini_echo() -> Any:
    from agents import Agent

    return Agent(name="mini-echo", instructions="Repeat the user's words.", model="gpt-4.1-mini")


@registry.agent("mailer", description="Sends mail: a side effect.", side_effects=True)
def mailer() -> Any:
    from agents import Agent, function_tool

    @function_tool
    def send_mail(to: str) -> str:
        """Send a mail.

        Args:
            to: The recipient.
        """
        return f"sent to {to}"

    return Agent(name="mailer", instructions="Send the mail asked for.", tools=[send_mail])
