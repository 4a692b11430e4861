"""Retries, backoff, Retry-After and fallback of one run's model calls, with fake models."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx2 as httpx
import openai
import pytest
from agents.usage import Usage

from agentq.exceptions import ModelUnavailable
from agentq.limits import Limits, LocalLimiter, NoLimiter
from agentq.resilience import (
    RetryPolicy,
    RunModels,
    _Target,
    estimate_tokens,
    retry_after,
    retry_reason,
)


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://model.test/v1/responses")
    response = httpx.Response(status, headers=headers or {}, request=request)
    cls: type[openai.APIStatusError] = {
        429: openai.RateLimitError,
        500: openai.InternalServerError,
        400: openai.BadRequestError,
    }.get(status, openai.APIStatusError)
    return cls(f"HTTP {status}", response=response, body=None)


class Response:
    def __init__(self, tokens: int = 30) -> None:
        self.usage = Usage(
            requests=1, input_tokens=tokens - 10, output_tokens=10, total_tokens=tokens
        )


class Script:
    """A model that fails with the scripted errors, then answers."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> Response:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return Response()


class Sleeps:
    def __init__(self) -> None:
        self.pauses: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)


class Observer:
    def __init__(self) -> None:
        self.retries: list[tuple[str, str]] = []

    def model_retry(self, model: str, reason: str) -> None:
        self.retries.append((model, reason))


def run_models(
    primary: Script, fallback: Script | None = None, **policy: Any
) -> tuple[RunModels, Sleeps, Observer]:
    sleeps, observer = Sleeps(), Observer()
    models = RunModels(
        primary=_Target("gpt-4o", primary),  # type: ignore[arg-type]
        fallback=_Target("gpt-4o-mini", fallback) if fallback else None,  # type: ignore[arg-type]
        policy=RetryPolicy(**{"max_retries": 3, "backoff": 0.5, **policy}),
        limiter=NoLimiter(),
        observer=observer,
        rng=random.Random(1),
        sleep=sleeps,
    )
    return models, sleeps, observer


async def _send(model: Any) -> Any:
    return await model()


def test_transient_errors_are_retried_with_growing_jittered_backoff() -> None:
    primary = Script(
        status_error(500),
        openai.APITimeoutError(httpx.Request("POST", "http://x")),
        status_error(503),
    )
    models, sleeps, observer = run_models(primary)
    asyncio.run(models.call(10, _send))
    assert primary.calls == 4
    assert models.record.attempts == 4
    assert models.record.answered_by == "gpt-4o"
    assert not models.record.fallback_used
    assert len(sleeps.pauses) == 3
    for retry, pause in enumerate(sleeps.pauses, start=1):
        assert 0 <= pause <= 0.5 * 2 ** (retry - 1)
    assert [reason for _, reason in observer.retries] == ["server_error", "timeout", "server_error"]


def test_retry_after_is_honoured() -> None:
    primary = Script(status_error(429, {"retry-after": "2"}))
    models, sleeps, _ = run_models(primary)
    asyncio.run(models.call(10, _send))
    assert sleeps.pauses[0] >= 2.0
    assert retry_after(status_error(429, {"retry-after-ms": "1500"})) == pytest.approx(1.5)


def test_permanent_errors_are_not_retried() -> None:
    primary = Script(status_error(400))
    models, sleeps, _ = run_models(primary, Script())
    with pytest.raises(openai.BadRequestError):
        asyncio.run(models.call(10, _send))
    assert primary.calls == 1
    assert sleeps.pauses == []
    assert retry_reason(ValueError("x")) is None


def test_spent_retries_move_the_run_to_the_fallback() -> None:
    primary = Script(*[status_error(500) for _ in range(10)])
    fallback = Script()
    models, _, observer = run_models(primary, fallback, max_retries=2)
    asyncio.run(models.call(10, _send))
    assert primary.calls == 3
    assert fallback.calls == 1
    assert models.record.fallback_used
    assert models.record.answered_by == "gpt-4o-mini"
    assert models.record.attempts == 4
    assert ("gpt-4o", "fallback") in observer.retries
    # Later calls of the same run go straight to the fallback.
    asyncio.run(models.call(10, _send))
    assert primary.calls == 3 and fallback.calls == 2


def test_a_run_of_rate_limits_moves_to_the_fallback_early() -> None:
    primary = Script(*[status_error(429) for _ in range(10)])
    fallback = Script()
    models, _, _ = run_models(primary, fallback, max_retries=10, fallback_after_rate_limits=2)
    asyncio.run(models.call(10, _send))
    assert primary.calls == 2
    assert models.record.answered_by == "gpt-4o-mini"


def test_without_a_fallback_spent_retries_fail_with_a_typed_error() -> None:
    primary = Script(*[status_error(500) for _ in range(10)])
    models, _, _ = run_models(primary, max_retries=1)
    with pytest.raises(ModelUnavailable, match="failed 2 times"):
        asyncio.run(models.call(10, _send))


def test_every_attempt_takes_and_settles_a_permit() -> None:
    limiter = LocalLimiter(Limits(requests=100, tokens=10_000, concurrency=1, window=60, lease=60))
    primary = Script(status_error(500))
    models, _, _ = run_models(primary)
    models.limiter = limiter
    asyncio.run(models.call(50, _send))
    window = limiter._windows["gpt-4o"]
    assert len(window.requests) == 2  # the failed attempt reached the server too
    assert sorted(t for _, t in window.requests.values()) == [0, 30]  # corrected
    assert window.in_flight == {}


def test_estimate_counts_the_prompt_and_the_output_cap() -> None:
    assert estimate_tokens("x" * 40, "y" * 40, 100) == 120
    assert estimate_tokens(None, [{"role": "user", "content": "hi"}], None) >= 1
