"""Tests for the OpenAI-compatible mock server in agentq.testing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
import openai
import pytest
from openai import AsyncOpenAI

from agentq.testing import (
    MockOpenAIConfig,
    MockOpenAIServer,
    max_requests_in_window,
    synthesize_arguments,
)

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]

WEATHER_TOOL_CHAT = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "threshold": {"type": "number"},
                "metric": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "extra": {"type": "object", "properties": {}},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "optional_note": {"type": "string"},
            },
            "required": ["city", "days", "threshold", "metric", "tags", "extra", "unit"],
            "additionalProperties": False,
        },
    },
}

EXPECTED_WEATHER_ARGS = {
    "city": "weather in Paris?",
    "days": 1,
    "threshold": 1.0,
    "metric": True,
    "tags": [],
    "extra": {},
    "unit": "celsius",
}


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(guarded())


@asynccontextmanager
async def serve(**config: Any) -> AsyncIterator[MockOpenAIServer]:
    server = MockOpenAIServer(MockOpenAIConfig(**config))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def client_for(server: MockOpenAIServer, **kwargs: Any) -> AsyncOpenAI:
    kwargs.setdefault("max_retries", 0)
    return AsyncOpenAI(base_url=server.url, api_key="x", **kwargs)


# ----------------------------------------------------------------- chat API


def test_chat_completion_text_shape_and_usage() -> None:
    async def body() -> None:
        async with serve() as server:
            async with client_for(server) as client:
                completion = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello there"},
                    ],
                )
            assert completion.object == "chat.completion"
            assert completion.id.startswith("chatcmpl-")
            assert completion.model == "gpt-4o-mini"
            choice = completion.choices[0]
            assert choice.finish_reason == "stop"
            assert choice.message.role == "assistant"
            assert choice.message.content == "echo: hello there"
            assert choice.message.tool_calls is None
            assert completion.usage is not None
            assert completion.usage.prompt_tokens == 50
            assert completion.usage.completion_tokens == 10
            assert completion.usage.total_tokens == 60
            assert completion._request_id is not None
            assert completion._request_id.startswith("req_")

    run(body)


def test_chat_tool_call_then_final_answer() -> None:
    async def body() -> None:
        async with serve() as server:
            async with client_for(server) as client:
                messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
                first = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL_CHAT]
                )
                choice = first.choices[0]
                assert choice.finish_reason == "tool_calls"
                assert choice.message.content is None
                calls = choice.message.tool_calls
                assert calls is not None
                assert len(calls) == 1
                call = calls[0]
                assert call.type == "function"
                assert call.function.name == "get_weather"
                assert json.loads(call.function.arguments) == EXPECTED_WEATHER_ARGS

                messages += [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": call.id,
                                "type": "function",
                                "function": {
                                    "name": call.function.name,
                                    "arguments": call.function.arguments,
                                },
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": call.id, "content": "22C and sunny"},
                ]
                second = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL_CHAT]
                )
                assert second.choices[0].finish_reason == "stop"
                assert (
                    second.choices[0].message.content
                    == "echo: weather in Paris? | tool: 22C and sunny"
                )

                # A new user message starts a new turn, so the tool is called again.
                messages += [
                    {"role": "assistant", "content": second.choices[0].message.content},
                    {"role": "user", "content": [{"type": "text", "text": "and Rome?"}]},
                ]
                third = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL_CHAT]
                )
                third_calls = third.choices[0].message.tool_calls
                assert third_calls is not None
                assert json.loads(third_calls[0].function.arguments)["city"] == "and Rome?"

                # tool_choice="none" forbids calling.
                fourth = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "no tools"}],
                    tools=[WEATHER_TOOL_CHAT],
                    tool_choice="none",
                )
                assert fourth.choices[0].message.content == "echo: no tools"

            stats = server.stats()
            assert stats["tool_calls"] == 2
            assert stats["total_requests"] == 4

    run(body)


def test_chat_streaming() -> None:
    async def body() -> None:
        async with serve(output_tokens=3) as server, client_for(server) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "a fairly long message to split"}],
                stream=True,
            )
            text = ""
            finish: list[str] = []
            usage = None
            chunks = 0
            async for chunk in stream:
                chunks += 1
                assert chunk.object == "chat.completion.chunk"
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    if choice.finish_reason:
                        finish.append(choice.finish_reason)
                if chunk.usage is not None:
                    usage = chunk.usage
            assert text == "echo: a fairly long message to split"
            assert chunks > 3
            assert finish == ["stop"]
            assert usage is not None
            assert usage.prompt_tokens == 50
            assert usage.completion_tokens == 3

            tool_stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "weather in Paris?"}],
                tools=[WEATHER_TOOL_CHAT],
                stream=True,
            )
            name = ""
            arguments = ""
            async for chunk in tool_stream:
                for choice in chunk.choices:
                    for delta in choice.delta.tool_calls or []:
                        if delta.function is not None:
                            name += delta.function.name or ""
                            arguments += delta.function.arguments or ""
                    if choice.finish_reason:
                        finish.append(choice.finish_reason)
            assert name == "get_weather"
            assert json.loads(arguments) == EXPECTED_WEATHER_ARGS
            assert finish == ["stop", "tool_calls"]

    run(body)


# ------------------------------------------------------------ responses API


def test_responses_tool_call_then_final_answer() -> None:
    tool = {
        "type": "function",
        "name": "lookup",
        "description": "Look something up.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query", "limit"],
            "additionalProperties": False,
        },
        "strict": True,
    }

    async def body() -> None:
        async with serve(input_tokens=70, output_tokens=5) as server:
            async with client_for(server) as client:
                first = await client.responses.create(
                    model="gpt-4.1-mini",
                    input=[{"role": "user", "content": "find cats"}],
                    tools=[tool],  # type: ignore[list-item]
                )
                assert first.object == "response"
                assert first.status == "completed"
                assert first.id.startswith("resp_")
                assert len(first.output) == 1
                item = first.output[0]
                assert item.type == "function_call"
                assert item.name == "lookup"
                assert item.status == "completed"
                assert item.id is not None
                assert item.id.startswith("fc_")
                assert item.call_id.startswith("call_")
                assert json.loads(item.arguments) == {"query": "find cats", "limit": 1}
                assert first.usage is not None
                assert first.usage.input_tokens == 70
                assert first.usage.output_tokens == 5
                assert first.usage.total_tokens == 75
                assert first.usage.input_tokens_details.cached_tokens == 0
                assert first.usage.output_tokens_details.reasoning_tokens == 0

                second = await client.responses.create(
                    model="gpt-4.1-mini",
                    input=[
                        {"role": "user", "content": "find cats"},
                        {
                            "type": "function_call",
                            "call_id": item.call_id,
                            "name": item.name,
                            "arguments": item.arguments,
                        },
                        {
                            "type": "function_call_output",
                            "call_id": item.call_id,
                            "output": "3 cats",
                        },
                    ],
                    tools=[tool],  # type: ignore[list-item]
                )
                assert second.output[0].type == "message"
                assert second.output_text == "echo: find cats | tool: 3 cats"

                plain = await client.responses.create(model="gpt-4.1-mini", input="just text")
                assert plain.output_text == "echo: just text"

            stats = server.stats()
            assert stats["tool_calls"] == 1
            assert stats["input_tokens"] == 210
            assert stats["output_tokens"] == 15
            assert stats["requests_by_path"] == {"/v1/responses": 3}
            assert stats["requests_by_model"] == {"gpt-4.1-mini": 3}

    run(body)


def test_responses_streaming_ends_with_completed() -> None:
    async def body() -> None:
        async with serve() as server, client_for(server) as client:
            stream = await client.responses.create(
                model="gpt-4o", input="stream me please, in pieces", stream=True
            )
            types: list[str] = []
            deltas = ""
            sequence: list[int] = []
            final = None
            async for event in stream:
                types.append(event.type)
                sequence.append(event.sequence_number)
                if event.type == "response.output_text.delta":
                    deltas += event.delta
                if event.type == "response.completed":
                    final = event.response
            assert types[0] == "response.created"
            assert types[-1] == "response.completed"
            assert sequence == list(range(len(types)))
            assert deltas == "echo: stream me please, in pieces"
            assert final is not None
            assert final.output_text == deltas
            assert final.usage is not None
            assert final.usage.total_tokens == 60

    run(body)


# ----------------------------------------------------- errors and behaviour


def test_injected_429_with_retry_after() -> None:
    async def body() -> None:
        async with serve(error_rate=1.0, error_statuses=(429,), retry_after=2, seed=1) as server:
            async with client_for(server) as client:
                with pytest.raises(openai.RateLimitError) as caught:
                    await client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                    )
            error = caught.value
            assert error.status_code == 429
            assert error.response.headers["retry-after"] == "2"
            payload = error.response.json()
            assert payload["error"]["code"] == "rate_limit_exceeded"
            assert isinstance(payload["error"]["message"], str)
            assert "type" in payload["error"]
            stats = server.stats()
            assert stats["requests_by_status"] == {"429": 1}
            assert stats["errors_injected"] == 1
            assert stats["input_tokens"] == 0

    run(body)


def test_error_injection_is_reproducible_with_seed() -> None:
    async def statuses(server: MockOpenAIServer, count: int) -> list[int]:
        result = []
        async with httpx.AsyncClient(base_url=server.url) as http:
            for _ in range(count):
                response = await http.post(
                    "/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                )
                result.append(response.status_code)
        return result

    async def body() -> None:
        config = {"error_rate": 0.5, "error_statuses": (429, 500, 503), "seed": 42}
        async with serve(**config) as first, serve(**config) as second:
            a = await statuses(first, 40)
            b = await statuses(second, 40)
            assert a == b
            assert set(a) == {200, 429, 500, 503}
            first.reset()
            assert await statuses(first, 40) == a
            counts = first.stats()["requests_by_status"]
            assert sum(counts.values()) == 40
            assert counts["200"] == a.count(200)

    run(body)


def test_fail_models_always_get_500() -> None:
    async def body() -> None:
        async with serve(fail_models={"broken-model"}) as server:
            async with client_for(server) as client:
                for _ in range(3):
                    with pytest.raises(openai.InternalServerError) as caught:
                        await client.responses.create(model="broken-model", input="hi")
                    assert caught.value.status_code == 500
                ok = await client.responses.create(model="gpt-4o", input="hi")
                assert ok.output_text == "echo: hi"
            stats = server.stats()
            assert stats["requests_by_status"] == {"500": 3, "200": 1}
            assert stats["requests_by_model"] == {"broken-model": 3, "gpt-4o": 1}

    run(body)


def test_hang_keeps_request_open_until_client_gives_up() -> None:
    async def body() -> None:
        async with serve(hang_rate=1.0, seed=3) as server:
            async with client_for(server, timeout=0.3) as client:
                started = time.monotonic()
                with pytest.raises(openai.APITimeoutError):
                    await client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                    )
                assert time.monotonic() - started >= 0.25
            stats = server.stats()
            assert stats["hung_requests"] == 1
            assert stats["requests_by_status"] == {}
            for _ in range(100):
                if server.stats()["in_flight"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert server.stats()["in_flight"] == 0

    run(body)


def test_latency_and_max_in_flight() -> None:
    async def body() -> None:
        async with serve(latency_ms=150) as server:
            async with client_for(server) as client:
                started = time.monotonic()
                await asyncio.gather(
                    *(
                        client.chat.completions.create(
                            model="gpt-4o-mini", messages=[{"role": "user", "content": str(i)}]
                        )
                        for i in range(8)
                    )
                )
                elapsed = time.monotonic() - started
            assert 0.15 <= elapsed < 2.0
            stats = server.stats()
            assert stats["max_in_flight"] == 8
            assert stats["in_flight"] == 0
            timestamps = stats["request_timestamps"]
            assert len(timestamps) == 8
            assert max_requests_in_window(timestamps, 60.0) == 8
            assert server.max_requests_in_window(60.0) == 8

    run(body)


def test_stats_reset_and_config_endpoints() -> None:
    async def body() -> None:
        async with serve() as server:
            root = server.url.removesuffix("/v1")
            async with httpx.AsyncClient(base_url=root) as http:
                response = await http.post(
                    "/_config", json={"input_tokens": 5, "fail_models": ["nope"], "reply": "ok"}
                )
                assert response.status_code == 200
                config = response.json()
                assert config["input_tokens"] == 5
                assert config["fail_models"] == ["nope"]
                assert server.config.input_tokens == 5
                assert server.config.fail_models == frozenset({"nope"})

                chat = await http.post(
                    "/chat/completions",  # no /v1 prefix
                    json={"model": "m1", "messages": [{"role": "user", "content": "x"}]},
                )
                assert chat.json()["usage"]["prompt_tokens"] == 5
                assert chat.json()["choices"][0]["message"]["content"] == "ok"
                failing = await http.post("/v1/responses", json={"model": "nope", "input": "x"})
                assert failing.status_code == 500
                assert failing.json()["error"]["type"] == "server_error"
                models = await http.get("/v1/models")
                assert "gpt-4o-mini" in [m["id"] for m in models.json()["data"]]
                missing = await http.get("/v1/nothing-here")
                assert missing.status_code == 404
                assert "error" in missing.json()

                stats = (await http.get("/_stats")).json()
                assert stats["total_requests"] == 4
                assert stats["requests_by_path"] == {
                    "/chat/completions": 1,
                    "/v1/responses": 1,
                    "/v1/models": 1,
                    "/v1/nothing-here": 1,
                }
                assert stats["requests_by_status"] == {"200": 2, "500": 1, "404": 1}
                assert stats["input_tokens"] == 5
                assert stats["output_tokens"] == 10
                assert len(stats["request_timestamps"]) == 4
                assert stats == server.stats()
                slim = (await http.get("/_stats", params={"timestamps": "0"})).json()
                assert slim["request_timestamps"] == []
                assert slim["total_requests"] == 4

                bad = await http.post("/_config", json={"error_rate": 3})
                assert bad.status_code == 400
                assert "error_rate" in bad.json()["error"]["message"]
                unknown = await http.post("/_config", json={"colour": "blue"})
                assert unknown.status_code == 400
                assert server.config.error_rate == 0.0

                assert (await http.post("/_reset")).status_code == 200
                cleared = (await http.get("/_stats")).json()
                assert cleared["total_requests"] == 0
                assert cleared["requests_by_status"] == {}
                assert cleared["request_timestamps"] == []

    run(body)


def test_keep_alive_reuses_one_connection() -> None:
    async def body() -> None:
        async with serve() as server:
            async with httpx.AsyncClient(base_url=server.url) as http:
                for i in range(6):
                    response = await http.post(
                        "/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": str(i)}]},
                    )
                    assert response.status_code == 200
                    assert response.headers["connection"] == "keep-alive"
                    assert response.json()["choices"][0]["message"]["content"] == f"echo: {i}"
            stats = server.stats()
            assert stats["connections_opened"] == 1
            assert stats["total_requests"] == 6

    run(body)


async def _raw_exchange(server: MockOpenAIServer, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(payload)
    await writer.drain()
    data = await reader.read()  # the last request asks to close
    writer.close()
    await writer.wait_closed()
    return data


def test_chunked_body_and_pipelining() -> None:
    body_json = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "chunky"}]}
    ).encode()
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body_json[i : i + 7]), body_json[i : i + 7])
        for i in range(0, len(body_json), 7)
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
    )
    closing = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    async def body() -> None:
        async with serve() as server:
            data = await _raw_exchange(server, request + closing)
            first_head, _, rest = data.partition(b"\r\n\r\n")
            assert first_head.startswith(b"HTTP/1.1 200 OK")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in first_head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
            )
            first_body = json.loads(rest[:length])
            assert first_body["choices"][0]["message"]["content"] == "echo: chunky"
            second = rest[length:]
            assert second.startswith(b"HTTP/1.1 200 OK")
            assert b"connection: close" in second
            assert server.stats()["connections_opened"] == 1

            garbage = await _raw_exchange(server, b"NOT HTTP\r\n\r\n")
            assert garbage.startswith(b"HTTP/1.1 400")

    run(body)


# --------------------------------------------------------------- Agents SDK


def test_agents_sdk_run_with_function_tool_chat_and_responses() -> None:
    from agents import (
        Agent,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        RunConfig,
        Runner,
        function_tool,
    )

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        calls.append(city)
        return f"sunny in {city}"

    async def body() -> None:
        async with serve(input_tokens=40, output_tokens=4) as server:
            client = client_for(server, max_retries=0)
            run_config = RunConfig(tracing_disabled=True)
            chat_agent = Agent(
                name="chat",
                instructions="Answer using tools.",
                tools=[get_weather],
                model=OpenAIChatCompletionsModel(model="gpt-4o-mini", openai_client=client),
            )
            result = await Runner.run(chat_agent, "Paris", run_config=run_config)
            assert result.final_output == "echo: Paris | tool: sunny in Paris"
            assert calls == ["Paris"]
            usage = result.context_wrapper.usage
            assert usage.requests == 2
            assert usage.input_tokens == 80
            assert usage.output_tokens == 8

            responses_agent = Agent(
                name="responses",
                tools=[get_weather],
                model=OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client),
            )
            result = await Runner.run(responses_agent, "Oslo", run_config=run_config)
            assert result.final_output == "echo: Oslo | tool: sunny in Oslo"
            assert calls == ["Paris", "Oslo"]
            await client.close()

            stats = server.stats()
            assert stats["requests_by_path"] == {"/v1/chat/completions": 2, "/v1/responses": 2}
            assert stats["tool_calls"] == 2
            assert stats["requests_by_status"] == {"200": 4}

    run(body)


# ---------------------------------------------------- thread mode, CLI, helpers


def test_thread_mode_context_manager_and_configure() -> None:
    with MockOpenAIServer(MockOpenAIConfig(output_tokens=2)) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.url.endswith("/v1")
        with httpx.Client(base_url=server.url) as http:
            response = http.post("/responses", json={"model": "gpt-4o", "input": "from a thread"})
            assert response.json()["usage"]["output_tokens"] == 2
            server.configure(output_tokens=9, reply="fixed")
            again = http.post("/responses", json={"model": "gpt-4o", "input": "x"})
            assert again.json()["usage"]["output_tokens"] == 9
            assert again.json()["output"][0]["content"][0]["text"] == "fixed"
        assert server.stats()["output_tokens"] == 11
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/models", timeout=2)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        MockOpenAIConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="error_statuses"):
        MockOpenAIConfig(error_statuses=(200,))
    with pytest.raises(ValueError, match="unknown"):
        MockOpenAIConfig.from_mapping({"latency": 1})
    config = MockOpenAIConfig.from_mapping(
        {"error_statuses": "429, 503", "fail_models": "a,b", "retry_after": "1.5"}
    )
    assert config.error_statuses == (429, 503)
    assert config.fail_models == frozenset({"a", "b"})
    assert config.retry_after == 1.5


def test_synthesize_arguments_respects_schema() -> None:
    schema = {
        "type": "object",
        "$defs": {
            "Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
        },
        "properties": {
            "name": {"type": "string", "minLength": 3, "maxLength": 5},
            "count": {"type": "integer", "minimum": 10},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
            "below": {"type": "number", "exclusiveMaximum": 0.5},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
            "point": {"$ref": "#/$defs/Point"},
            "mode": {"const": "fast"},
            "pair": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "nullable": {"type": ["null", "integer"]},
            "skipped": {"type": "string"},
        },
        "required": [
            "name",
            "count",
            "ratio",
            "below",
            "maybe",
            "point",
            "mode",
            "pair",
            "nullable",
        ],
    }
    assert synthesize_arguments(schema, "hello world") == {
        "name": "hello",
        "count": 10,
        "ratio": 0.25,
        "below": -0.5,
        "maybe": True,
        "point": {"x": 1},
        "mode": "fast",
        "pair": ["hello world", "hello world"],
        "nullable": 1,
    }
    assert synthesize_arguments({"type": "object", "properties": {}}, "x") == {}
    assert synthesize_arguments({}, "x") == {}


def test_max_requests_in_window() -> None:
    stamps = [0.0, 10.0, 59.9, 60.0, 61.0, 200.0]
    assert max_requests_in_window(stamps, 60.0) == 4  # 10.0 .. 61.0
    assert max_requests_in_window([], 60.0) == 0
    assert max_requests_in_window(reversed(stamps), 1.0) == 2  # 59.9 and 60.0
    assert max_requests_in_window(stamps, 0.05) == 1


def test_cli_serves_until_sigterm() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    command = [
        sys.executable,
        "-m",
        "agentq.testing",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--input-tokens",
        "7",
        "--error-statuses",
        "429,500",
        "--fail-models",
        "bad1,bad2",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            if not line:
                pytest.fail(f"server printed nothing; stderr: {process.communicate()[1]}")
            assert line.startswith("listening http://127.0.0.1:"), line
            url = line.split(" ", 1)[1]
            assert url.endswith("/v1")
            with httpx.Client(base_url=url, timeout=5) as http:
                ok = http.post("/chat/completions", json={"model": "m", "messages": []})
                assert ok.json()["usage"]["prompt_tokens"] == 7
                failing = http.post("/responses", json={"model": "bad2", "input": "x"})
                assert failing.status_code == 500
                config = http.get(url.removesuffix("/v1") + "/_config").json()
                assert config["fail_models"] == ["bad1", "bad2"]
                assert config["error_statuses"] == [429, 500]
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=10)
            assert process.returncode == 0, stderr
        finally:
            if process.poll() is None:
                process.kill()
