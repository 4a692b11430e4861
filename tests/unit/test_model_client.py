"""ModelClient sends the Responses request openai's own transform would, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import openai
import pydantic
import pytest
from agents import Agent, ModelSettings, OpenAIProvider, RunConfig, Runner
from openai import AsyncOpenAI, NotGiven, omit
from openai.types.responses import Response, ResponseFunctionToolCall
from openai.types.shared import Reasoning

from agentq import model_client
from agentq.model_client import ModelClient, PlainResponses, plain_body
from agentq.testing import MockOpenAIConfig, MockOpenAIServer
from bench.workload import make_agent as bench_agent


class Answer(pydantic.BaseModel):
    total: int
    note: str


def make_agent(output_type: Any = None) -> Agent[Any]:
    agent: Agent[Any] = bench_agent()
    return agent.clone(
        output_type=output_type,
        model_settings=ModelSettings(
            temperature=0.25,
            top_p=0.5,
            max_tokens=300,
            metadata={"team": "search", "tier": "gold"},
            extra_body={"seed": 7},
            extra_headers={"X-Trace": "abc"},
            reasoning=Reasoning(effort="low"),
            parallel_tool_calls=False,
            store=False,
        ),
    )


async def bodies_and_output(
    server: MockOpenAIServer, client_class: type[AsyncOpenAI], agent: Agent[Any], streamed: bool
) -> tuple[list[dict[str, Any]], list[str], Any]:
    bodies: list[dict[str, Any]] = []
    trace_headers: list[str] = []

    async def record(request: Any) -> None:
        bodies.append(json.loads(request.content))
        trace_headers.append(request.headers.get("X-Trace", ""))

    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]})
    client = client_class(api_key="x", base_url=server.url, http_client=http, max_retries=0)
    config = RunConfig(
        model="gpt-4o",
        model_provider=OpenAIProvider(openai_client=client, use_responses=True),
        tracing_disabled=True,
    )
    try:
        if streamed:
            result = Runner.run_streamed(agent, "What is 40 plus 2?", run_config=config)
            async for _ in result.stream_events():
                pass
        else:
            result = await Runner.run(agent, "What is 40 plus 2?", run_config=config)
        return bodies, trace_headers, result.final_output
    finally:
        await client.close()


def without_call_ids(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bodies with the mock server's per-call ids (unique to each run) blanked."""
    blank = {"call_id": "call", "id": "item"}
    return [
        {
            **body,
            "input": [
                {key: blank.get(key, value) for key, value in item.items()}
                if isinstance(item, dict)
                else item
                for item in body["input"]
            ],
        }
        for body in bodies
    ]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("output_type", [None, Answer], ids=["text", "structured"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_requests_match_openais_transform(output_type: Any, streamed: bool) -> None:
    async def scenario() -> None:
        server = MockOpenAIServer(MockOpenAIConfig())
        await server.start()
        try:
            agent = make_agent(output_type)
            stock = await bodies_and_output(server, AsyncOpenAI, agent, streamed)
            plain = await bodies_and_output(server, ModelClient, agent, streamed)
        finally:
            await server.stop()
        stock_bodies, stock_headers, stock_output = stock
        plain_bodies, plain_headers, plain_output = plain
        # The run made its tool call: the second request carries the SDK's pydantic items.
        assert len(stock_bodies) == 2
        assert any(item.get("type") == "function_call" for item in stock_bodies[1]["input"])
        assert without_call_ids(plain_bodies) == without_call_ids(stock_bodies)
        assert plain_headers == stock_headers == ["abc", "abc"]
        assert plain_output == stock_output
        assert plain_output

    run(scenario())


def test_client_uses_the_plain_path() -> None:
    client = ModelClient(api_key="x", base_url="http://127.0.0.1:9/v1")
    assert isinstance(client.responses, PlainResponses)
    assert client.responses is client.responses
    assert isinstance(client.with_options(timeout=5).responses, PlainResponses)


def test_plain_body_drops_omitted_values_and_dumps_models() -> None:
    call = ResponseFunctionToolCall(
        arguments='{"a": 1}', call_id="c1", name="add", type="function_call"
    )
    body = plain_body(
        {
            "model": "gpt-4o",
            "temperature": omit,
            "user": NotGiven(),
            "input": ({"role": "user", "content": "hi"}, call),
            "include": (name for name in ["message.output_text.logprobs"]),
            "metadata": {"a": "b", "gone": omit},
        }
    )
    assert body == {
        "model": "gpt-4o",
        "input": [
            {"role": "user", "content": "hi"},
            {"arguments": '{"a": 1}', "call_id": "c1", "name": "add", "type": "function_call"},
        ],
        "include": ["message.output_text.logprobs"],
        "metadata": {"a": "b"},
    }


def test_an_aliased_or_formatted_field_is_found() -> None:
    from openai._utils._transform import PropertyInfo
    from openai.types.beta import agent_create_params
    from openai.types.responses import response_create_params

    assert model_client._declares_rewrites(
        agent_create_params.AgentCreateParams, set(), PropertyInfo
    )
    assert not model_client._declares_rewrites(
        response_create_params.ResponseCreateParamsNonStreaming, set(), PropertyInfo
    )
    assert model_client.responses_body_is_structural()


def test_falls_back_to_openais_transform_when_a_field_needs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transformed: list[Any] = []
    original = openai.resources.responses.responses.async_maybe_transform

    async def spy(data: Any, expected: Any) -> Any:
        transformed.append(expected)
        return await original(data, expected)

    monkeypatch.setattr(openai.resources.responses.responses, "async_maybe_transform", spy)
    monkeypatch.setattr(model_client, "responses_body_is_structural", lambda: False)

    async def scenario() -> Any:
        server = MockOpenAIServer(MockOpenAIConfig())
        await server.start()
        try:
            return await bodies_and_output(server, ModelClient, make_agent(), streamed=False)
        finally:
            await server.stop()

    bodies, _, output = run(scenario())
    assert len(bodies) == 2 and output
    assert len(transformed) == 2


def response_body(**usage_details: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "gpt-4o",
        "output": [
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_1",
                "name": "add",
                "arguments": '{"a": 1, "b": 2}',
                "status": "completed",
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 5,
            "output_tokens": 3,
            "total_tokens": 8,
            "input_tokens_details": {"cached_tokens": 0, **usage_details},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def test_responses_are_validated_or_constructed_as_openai_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    constructed: list[Any] = []
    original = openai._base_client.construct_type

    def spy(**kwargs: Any) -> Any:
        constructed.append(kwargs["type_"])
        return original(**kwargs)

    monkeypatch.setattr(openai._base_client, "construct_type", spy)
    client = ModelClient(api_key="x", base_url="http://127.0.0.1:9/v1")
    stock = AsyncOpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")

    complete = response_body(cache_write_tokens=0)
    validated = client._process_response_data(data=complete, cast_to=Response, response=None)
    assert constructed == []
    expected = stock._process_response_data(data=complete, cast_to=Response, response=None)
    assert constructed == [Response]
    assert isinstance(validated, Response)
    assert validated.model_dump() == expected.model_dump()
    assert isinstance(validated.output[0], ResponseFunctionToolCall)
    assert validated.output[0].model_dump(exclude_unset=True) == expected.output[0].model_dump(
        exclude_unset=True
    )

    # A compatible server that leaves out a field openai declares required still works.
    partial = response_body()
    constructed.clear()
    fallback = client._process_response_data(data=partial, cast_to=Response, response=None)
    assert constructed == [Response]
    assert fallback.usage is not None and fallback.usage.total_tokens == 8


def test_idempotency_keys_are_unique_per_request_and_client() -> None:
    first = ModelClient(api_key="x", base_url="http://127.0.0.1:9/v1")
    second = ModelClient(api_key="x", base_url="http://127.0.0.1:9/v1")
    keys = [first._idempotency_key() for _ in range(1000)] + [second._idempotency_key()]
    assert len(set(keys)) == len(keys)
    assert all(key.startswith("stainless-python-retry-") for key in keys)


def test_steps_aside_when_openais_internals_move(monkeypatch: pytest.MonkeyPatch) -> None:
    model_client.responses_body_is_structural.cache_clear()
    monkeypatch.setitem(sys.modules, "openai._utils._transform", None)
    try:
        assert model_client.responses_body_is_structural() is False
    finally:
        monkeypatch.undo()
        model_client.responses_body_is_structural.cache_clear()
    assert model_client.responses_body_is_structural() is True
