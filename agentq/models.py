"""Model providers for workers: OpenAI (or any compatible server) and an offline model.

This module imports the Agents SDK and ``openai``, so only workers import it. A worker builds
one provider, and so one ``AsyncOpenAI`` client, per process: creating a client costs tens of
milliseconds of CPU, and sharing one keeps its connection pool warm.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from agents import Model, ModelProvider, ModelResponse, ModelSettings, ModelTracing, Tool
from agents.usage import Usage

if TYPE_CHECKING:
    from agents.agent_output import AgentOutputSchemaBase
    from agents.handoffs import Handoff
    from agents.items import TResponseInputItem, TResponseStreamEvent
    from openai import AsyncOpenAI
    from openai.types.responses.response_prompt_param import ResponsePromptParam

    from agentq.config import Settings

OFFLINE_MODEL_NAME = "offline"


def _text_of(item: Any) -> str:
    content = item.get("content") if isinstance(item, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _schema_arguments(schema: dict[str, Any], text: str) -> dict[str, Any]:
    """Arguments that satisfy a tool's JSON schema, built from the user's words."""
    defaults: dict[str, Any] = {
        "string": text,
        "integer": 1,
        "number": 1.0,
        "boolean": True,
        "array": [],
        "object": {},
    }
    arguments: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type", "string") if isinstance(prop, dict) else "string"
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "string")
        arguments[name] = defaults.get(kind, text)
    return arguments


class OfflineModel(Model):
    """A deterministic model that needs no key or network.

    It behaves like a cooperative agent: when tools are offered and none has answered since the
    user spoke, it calls the first tool with arguments drawn from the user's words; otherwise it
    answers, quoting the tool's output. Usage is estimated at four characters per token.
    """

    def __init__(self, name: str = OFFLINE_MODEL_NAME, latency_ms: float = 0.0) -> None:
        self.name = name
        self.latency = latency_ms / 1000.0
        self._calls = 0

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        from agents.testing import assistant_message, function_call

        if self.latency:
            await asyncio.sleep(self.latency)
        self._calls += 1
        items: list[Any] = [{"role": "user", "content": input}] if isinstance(input, str) else input
        user_text, tool_output = "", None
        for item in items:
            if not isinstance(item, dict):
                continue
            if item.get("role") == "user":
                user_text, tool_output = _text_of(item), None
            elif item.get("type") == "function_call_output":
                tool_output = str(item.get("output", ""))
        function_tools = [t for t in tools if hasattr(t, "params_json_schema")]
        if function_tools and tool_output is None:
            tool = function_tools[0]
            arguments = _schema_arguments(getattr(tool, "params_json_schema", {}), user_text)
            call_id = f"call_{self._calls}"
            output: list[Any] = [function_call(tool.name, arguments, call_id=call_id)]
            produced = json.dumps(arguments)
        else:
            answer = f"{user_text.strip()[:200]}"
            reply = f"(offline) {answer}" if tool_output is None else f"(offline) {tool_output}"
            output = [assistant_message(reply, item_id=f"msg_{self._calls}")]
            produced = reply
        prompt_text = (system_instructions or "") + json.dumps(items, default=str)
        input_tokens = _estimate_tokens(prompt_text)
        output_tokens = _estimate_tokens(produced)
        usage = Usage(
            requests=1,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
        )
        return ModelResponse(output=output, usage=usage, response_id=None)

    def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        raise NotImplementedError("agentq runs agents without streaming")


class OfflineProvider(ModelProvider):
    """Serves :class:`OfflineModel` under every model name."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency_ms = latency_ms
        self._models: dict[str, OfflineModel] = {}

    def get_model(self, model_name: str | None) -> Model:
        name = model_name or OFFLINE_MODEL_NAME
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = OfflineModel(name, self.latency_ms)
        return model


def make_openai_client(settings: Settings) -> AsyncOpenAI:
    from agentq.model_client import ModelClient

    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    http_client = None
    if settings.http_client == "aiohttp":
        from openai import DefaultAioHttpClient

        # aiohttp's connection pool keeps every connection alive and finds a free one in
        # constant time; httpx's scans its whole pool per request, which with hundreds of
        # calls in flight costs a quarter of a run's CPU.
        http_client = DefaultAioHttpClient()
    return ModelClient(
        http_client=http_client,
        # A compatible server may not want a key; the client insists on one.
        api_key=key or "unused",
        base_url=settings.openai_base_url,
        timeout=settings.request_timeout,
        # Retries are agentq's alone (agentq.resilience): the client's own would multiply them
        # and could not see the cluster's rate limits or move a run to the fallback model.
        max_retries=0,
    )


def make_provider(settings: Settings) -> tuple[ModelProvider, AsyncOpenAI | None]:
    """The process's model provider, and the OpenAI client it owns (to close on shutdown)."""
    if settings.uses_offline_model:
        return OfflineProvider(settings.offline_latency_ms), None
    from agents import OpenAIProvider

    client = make_openai_client(settings)
    provider = OpenAIProvider(openai_client=client, use_responses=settings.model_api == "responses")
    return provider, client


def model_label(settings: Settings, agent_model: Any) -> str:
    """The model name recorded for a run: the agent's own, or the configured default."""
    if isinstance(agent_model, str) and agent_model:
        name = agent_model
    elif agent_model is not None and hasattr(agent_model, "model"):
        name = str(agent_model.model)
    else:
        name = settings.default_model
    return name
