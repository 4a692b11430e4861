"""Retries, fallback and rate limits around every model call of a run.

Retries live here and only here. The ``openai`` client is built with ``max_retries=0`` and the
Agents SDK's runner-managed retries (``ModelSettings.retry``) stay off, because each layer
would multiply the others' attempts (3 of ours x 3 of the client's is 9 calls against a
throttled provider) and because only this layer sees the cluster's rate limits and the
fallback model. Agents should not set ``ModelSettings.retry`` for the same reason.

A call is retried on 429, 408, 409, 5xx, timeouts (the client's per-call timeout is
``AGENTQ_REQUEST_TIMEOUT``) and connection errors, up to ``AGENTQ_MAX_RETRIES`` times, after
an exponential backoff with full jitter, or after the server's ``Retry-After`` when it sends
one (capped at ``AGENTQ_RETRY_BACKOFF_MAX``). Anything else (a bad request, a refused key, a
guardrail, a model that misbehaves) is raised at once. When the default model has spent its
retries on a call, or answered ``AGENTQ_FALLBACK_AFTER_RATE_LIMITS`` 429s in a row, the run
moves to ``AGENTQ_FALLBACK_MODEL`` for the rest of its calls. Every attempt first takes a
permit from the process's :class:`agentq.limits.Limiter`. The whole run stays under the
engine's deadline (``AGENTQ_RUN_TIMEOUT``), which cancels any backoff in progress.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from agents import Model, ModelProvider, ModelResponse, ModelSettings, ModelTracing, Tool

from agentq.exceptions import ModelUnavailable
from agentq.limits import Denied, Limiter, Permit, Reservation
from agentq.run import RunStatus
from agentq.store import Claim, Outcome

if TYPE_CHECKING:
    from agents.agent_output import AgentOutputSchemaBase
    from agents.handoffs import Handoff
    from agents.items import TResponseInputItem, TResponseStreamEvent
    from openai.types.responses.response_prompt_param import ResponsePromptParam
    from redis.asyncio import Redis

    from agentq.config import Settings
    from agentq.registry import AgentSpec

logger = logging.getLogger("agentq.resilience")

RETRYABLE_STATUSES = frozenset({408, 409, 429})


class RetryObserver(Protocol):
    def model_retry(self, model: str, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 3
    backoff: float = 0.5
    """Seconds of the first backoff; doubles per retry."""
    backoff_max: float = 20.0
    fallback_after_rate_limits: int = 3

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds before retry number ``retry`` (1-based)."""
        if retry_after is not None:
            # The server knows when it will take the call; a little jitter spreads a crowd.
            return min(retry_after, self.backoff_max) + rng.uniform(0, self.backoff / 4)
        ceiling = min(self.backoff_max, self.backoff * 2 ** (retry - 1))
        return rng.uniform(0, ceiling)


def retry_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is worth retrying (rate_limit, server_error, timeout, connection), or None."""
    try:
        import openai
    except ImportError:  # pragma: no cover - openai is a dependency
        return None
    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return "rate_limit"
        if exc.status_code >= 500:
            return "server_error"
        if exc.status_code in RETRYABLE_STATUSES:
            return "conflict" if exc.status_code == 409 else "timeout"
    return None


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``retry-after``)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                from datetime import UTC, datetime

                value = (parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                continue
        if value >= 0:
            return value
    return None


def estimate_tokens(
    system_instructions: str | None, input: str | list[Any], max_tokens: int | None
) -> int:
    """Tokens a call may count against the quota: its prompt at ~4 characters a token, plus the
    most it may produce (providers count ``max_tokens`` when they admit a request)."""
    prompt = input if isinstance(input, str) else json.dumps(input, default=str)
    return max(1, (len(system_instructions or "") + len(prompt)) // 4) + (max_tokens or 0)


@dataclass(slots=True)
class ModelRecord:
    """What the run's model calls did: stored with the run."""

    attempts: int = 0
    """Calls sent to a model, retries and fallback calls included."""
    retries: int = 0
    answered_by: str | None = None
    fallback_used: bool = False


@dataclass(slots=True)
class _Target:
    name: str
    model: Model


_JITTER = random.Random()
"""Jitter of retry delays; runs share it on the engine's one event-loop thread."""


@dataclass(slots=True)
class RunModels:
    """The models one run may use and what happened to its calls."""

    primary: _Target
    fallback: _Target | None
    policy: RetryPolicy
    limiter: Limiter
    reservation: Reservation | None = None
    observer: RetryObserver | None = None
    record: ModelRecord = field(default_factory=ModelRecord)
    # One generator for the process: seeding one per run reads the system's entropy each time.
    rng: random.Random = field(default_factory=lambda: _JITTER)
    sleep: Callable[[float], Any] = asyncio.sleep
    on_fallback: bool = False

    @property
    def current(self) -> _Target:
        return self.fallback if self.on_fallback and self.fallback else self.primary

    def _report(self, model: str, reason: str) -> None:
        if self.observer is not None:
            try:
                self.observer.model_retry(model, reason)
            except Exception:
                logger.exception("retry observer failed", extra={"action": "telemetry_failed"})

    async def call(self, tokens: int, send: Callable[[Model], Any]) -> ModelResponse:
        """Send one model call through limits, retries and fallback."""
        retries = 0
        rate_limited = 0
        while True:
            target = self.current
            permit: Permit | None = None
            if self.limiter.enforced:
                permit = await self.limiter.acquire(target.name, tokens, self.reservation)
            self.record.attempts += 1
            used = 0
            try:
                response: ModelResponse = await send(target.model)
                used = response.usage.total_tokens or tokens
            except Exception as exc:
                reason = retry_reason(exc)
                if reason is None:
                    raise
                rate_limited = rate_limited + 1 if reason == "rate_limit" else 0
                switch = (
                    self.fallback is not None
                    and not self.on_fallback
                    and (
                        retries >= self.policy.max_retries
                        or rate_limited >= self.policy.fallback_after_rate_limits
                    )
                )
                if switch:
                    assert self.fallback is not None
                    logger.warning(
                        "model keeps failing, moving the run to the fallback model",
                        extra={
                            "action": "model_fallback",
                            "model": target.name,
                            "fallback": self.fallback.name,
                            "reason": reason,
                        },
                    )
                    self._report(target.name, "fallback")
                    self.on_fallback = True
                    self.record.fallback_used = True
                    retries, rate_limited = 0, 0
                    continue
                if retries >= self.policy.max_retries:
                    raise ModelUnavailable(
                        f"model {target.name!r} failed {retries + 1} times in a row "
                        f"(AGENTQ_MAX_RETRIES={self.policy.max_retries}); last error: "
                        f"{type(exc).__name__}: {exc}",
                        model=target.name,
                        attempts=self.record.attempts,
                    ) from exc
                retries += 1
                self.record.retries += 1
                self._report(target.name, reason)
                await self.sleep(self.policy.delay(retries, retry_after(exc), self.rng))
                continue
            finally:
                if permit is not None:
                    await asyncio.shield(self.limiter.settle(permit, used))
            self.record.answered_by = target.name
            return response


#: The models of the run whose task is executing: each run's task (and the tasks the SDK starts
#: for it) sees its own, so one :class:`ResilientModel` and one ``RunConfig`` serve every run.
current_run_models: ContextVar[RunModels | None] = ContextVar("agentq_run_models", default=None)


class ResilientModel(Model):
    """Every run's model: each call goes through the current run's :meth:`RunModels.call`.

    One instance per process and output-token limit, so a run costs no new ``RunConfig`` (whose
    construction validates its fields, a measurable share of a run's CPU with hundreds in
    flight); the run's own state travels in :data:`current_run_models`.
    """

    def __init__(self, max_tokens: int | None) -> None:
        self.max_tokens = max_tokens

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
        tokens = estimate_tokens(
            system_instructions, input, model_settings.max_tokens or self.max_tokens
        )

        async def send(model: Model) -> ModelResponse:
            return await model.get_response(
                system_instructions,
                input,
                model_settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )

        models = current_run_models.get()
        if models is None:
            raise RuntimeError("a ResilientModel was called outside a run planned by Resilience")
        return await models.call(tokens, send)

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


@dataclass(slots=True)
class RunPlan:
    """How one run meets the limits, the cache and the models; made by :meth:`Resilience.plan`."""

    run_config: Any
    max_turns: int
    models: RunModels | None = None
    cache_key: str | None = None
    cached: Any = None
    """The stored outcome of an identical run, when the cache answered."""
    deferred: Denied | None = None
    """Why and for how long the run must wait before it may start."""


class Resilience:
    """The process's limiter, response cache, retry policy and built-in guardrails.

    Built once per worker process on the engine's event loop, with one Redis client of its own
    (none in embedded mode, where the limits and the cache live in process).
    """

    def __init__(
        self,
        settings: Settings,
        provider: ModelProvider,
        *,
        redis: Redis[bytes] | None = None,
        observer: Any = None,
        limiter: Limiter | None = None,
    ) -> None:
        from agentq.cache import ResponseCache
        from agentq.guardrails import builtin_input_guardrails
        from agentq.limits import make_limiter

        self.settings = settings
        self.provider = provider
        self.redis = redis
        self.observer = observer
        self.limiter = limiter or make_limiter(settings, redis)
        self.cache = (
            ResponseCache(settings.cache_ttl, settings.cache_max_entries, redis, observer)
            if settings.enable_cache
            else None
        )
        self.guardrails = builtin_input_guardrails(settings)
        self._run_configs: dict[int, tuple[Any, Any]] = {}
        self.policy = RetryPolicy(
            max_retries=settings.max_retries,
            backoff=settings.retry_backoff,
            backoff_max=settings.retry_backoff_max,
            fallback_after_rate_limits=settings.fallback_after_rate_limits,
        )

    @classmethod
    def open(cls, settings: Settings, provider: ModelProvider, observer: Any = None) -> Resilience:
        redis = None
        if settings.redis_url is not None and (
            settings.rate_limits.enabled or settings.enable_cache
        ):
            from redis.asyncio import Redis

            redis = Redis.from_url(settings.redis_url.get_secret_value())
        return cls(settings, provider, redis=redis, observer=observer)

    async def close(self) -> None:
        await self.limiter.close()
        if self.redis is not None:
            await self.redis.aclose()  # type: ignore[attr-defined]

    def _target(self, name: str, agent_model: Any) -> _Target:
        if isinstance(agent_model, Model):
            return _Target(name, agent_model)
        return _Target(name, self.provider.get_model(name))

    async def plan(
        self, claim: Claim, spec: AgentSpec, agent: Any, label: str, base_config: Any
    ) -> RunPlan:
        """Look the run up in the cache, reserve its first model calls, and build its config."""
        max_turns = claim.max_turns or self.settings.max_turns
        max_tokens = claim.max_tokens or self.settings.max_tokens_per_request
        plan = RunPlan(run_config=base_config, max_turns=max_turns)
        if self.cache is not None and claim.use_cache and not spec.side_effects:
            from agentq.cache import cache_key

            plan.cache_key = cache_key(
                agent=spec.name,
                version=spec.version,
                model=label,
                input=claim.input,
                context=claim.context,
                max_turns=claim.max_turns,
                max_tokens=claim.max_tokens,
            )
            hit = await self.cache.get(plan.cache_key, spec.name)
            if hit is not None:
                plan.cached = Outcome(
                    RunStatus.SUCCEEDED,
                    output=hit.output,
                    model=hit.model,
                    turns=hit.turns,
                    tool_calls=hit.tool_calls,
                    cached=True,
                )
                return plan
        primary_name = label.split(":", 1)[-1] if ":" in label else label
        agent_model = getattr(agent, "model", None)
        instructions = agent.instructions if isinstance(agent.instructions, str) else None
        expected_calls = 2 if (getattr(agent, "tools", None) or agent.handoffs) else 1
        estimate = estimate_tokens(instructions, claim.input, max_tokens)
        reserved: Reservation | Denied | None = None
        if self.limiter.enforced:
            reserved = await self.limiter.try_reserve(primary_name, [estimate] * expected_calls)
        if isinstance(reserved, Denied):
            plan.deferred = reserved
            return plan
        fallback_name = self.settings.fallback_model
        models = RunModels(
            primary=self._target(primary_name, agent_model),
            fallback=(
                _Target(fallback_name, self.provider.get_model(fallback_name))
                if fallback_name and fallback_name != primary_name
                else None
            ),
            policy=self.policy,
            limiter=self.limiter,
            reservation=reserved,
            observer=self.observer,
        )
        plan.models = models
        plan.run_config = self._run_config(base_config, max_tokens)
        return plan

    def _run_config(self, base_config: Any, max_tokens: int) -> Any:
        """The RunConfig of runs with this output-token limit, made once per process."""
        found = self._run_configs.get(max_tokens)
        if found is None or found[0] is not base_config:
            settings = ModelSettings(max_tokens=max_tokens)
            if base_config.model_settings is not None:
                settings = base_config.model_settings.resolve(settings)
            config = dataclasses.replace(
                base_config, model=ResilientModel(max_tokens), model_settings=settings
            )
            found = self._run_configs[max_tokens] = (base_config, config)
        return found[1]

    async def finish(self, plan: RunPlan, outcome: Outcome) -> Outcome:
        """Record what the models did, give back unused permits, and cache a good answer."""
        models = plan.models
        if models is None:
            return outcome
        if models.reservation is not None:
            await asyncio.shield(self.limiter.release(models.reservation))
        record = models.record
        outcome = dataclasses.replace(
            outcome,
            model=record.answered_by
            if record.fallback_used and record.answered_by
            else outcome.model,
            model_attempts=record.attempts,
            fallback_used=record.fallback_used,
        )
        if (
            self.cache is not None
            and plan.cache_key is not None
            and outcome.status is RunStatus.SUCCEEDED
        ):
            from agentq.cache import CachedResponse

            await self.cache.set(
                plan.cache_key,
                CachedResponse(
                    output=outcome.output,
                    model=outcome.model,
                    turns=outcome.turns,
                    tool_calls=outcome.tool_calls,
                ),
            )
        return outcome

    def stats(self) -> dict[str, Any]:
        """Counters of this process: cache hits and misses, limit waits and deferrals."""
        return {
            "cache": self.cache.stats() if self.cache is not None else None,
            "limit_waits": self.limiter.waits,
            "limit_deferrals": self.limiter.deferrals,
        }
