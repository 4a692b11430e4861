"""The standard workload, importable without agentq: the agent, its inputs and its model client.

The agentq workers, the bare-SDK ceiling and the arq peer all build their agent and their
OpenAI provider here, so the three run the identical workload. The arq peer runs in an
environment of its own (arq pins an older ``redis``), which is why this module imports only
the Agents SDK and ``openai``.
"""

from __future__ import annotations

import os
from typing import Any

AGENT_NAME = "bench"


def make_agent() -> Any:
    from agents import Agent, function_tool

    @function_tool
    def add(a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        return str(a + b)

    return Agent(name=AGENT_NAME, instructions="Use add to compute sums.", tools=[add])


def run_input(index: int) -> str:
    return f"What is {index} plus 2?"


def make_run_config(client_class: Any = None) -> tuple[Any, Any]:
    """A RunConfig on the model server named by ``OPENAI_BASE_URL``, and its client to close.

    Configured as agentq configures its workers: the Responses API, no client retries, the
    request timeout, tracing off, and the HTTP transport ``AGENTQ_HTTP_CLIENT`` names (the
    benchmark sets aiohttp, agentq's default, for all three). The client is ``openai``'s
    ``AsyncOpenAI`` unless ``client_class`` names another (the reference row runs the bare SDK
    on agentq's :class:`agentq.model_client.ModelClient`).
    """
    from agents import OpenAIProvider, RunConfig, set_trace_processors
    from openai import AsyncOpenAI

    set_trace_processors([])
    http_client = None
    if os.environ.get("AGENTQ_HTTP_CLIENT") == "aiohttp":
        from openai import DefaultAioHttpClient

        http_client = DefaultAioHttpClient()
    client = (client_class or AsyncOpenAI)(
        http_client=http_client,
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        base_url=os.environ["OPENAI_BASE_URL"],
        timeout=float(os.environ.get("AGENTQ_REQUEST_TIMEOUT", "30")),
        max_retries=0,
    )
    provider = OpenAIProvider(openai_client=client, use_responses=True)
    config = RunConfig(
        model=os.environ.get("AGENTQ_DEFAULT_MODEL", "gpt-4o"),
        model_provider=provider,
        tracing_disabled=True,
    )
    return config, client
