"""Built-in input guardrails."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agentq.config import load_settings
from agentq.exceptions import ConfigurationError
from agentq.guardrails import (
    blocked_pattern_guardrail,
    builtin_input_guardrails,
    input_size_guardrail,
)


def tripped(guardrail: Any, text: Any) -> bool:
    async def check() -> bool:
        result = await guardrail.run(None, text, None)
        return bool(result.output.tripwire_triggered)

    return asyncio.run(check())


def test_input_size_trips_over_the_limit_only() -> None:
    guardrail = input_size_guardrail(10)
    assert guardrail.get_name() == "input_size"
    assert not guardrail.run_in_parallel
    assert not tripped(guardrail, "x" * 10)
    assert tripped(guardrail, "x" * 11)
    assert tripped(guardrail, [{"role": "user", "content": "y" * 11}])


def test_blocked_patterns_match_case_insensitively() -> None:
    guardrail = blocked_pattern_guardrail([r"drop\s+table", "password"])
    assert guardrail.get_name() == "blocked_pattern"
    assert tripped(guardrail, "please DROP  TABLE users")
    assert tripped(guardrail, [{"role": "user", "content": [{"text": "my Password is"}]}])
    assert not tripped(guardrail, "what is the weather")


def test_a_bad_pattern_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="AGENTQ_BLOCKED_PATTERNS"):
        blocked_pattern_guardrail(["("])


def test_settings_choose_the_builtin_guardrails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTQ_BLOCKED_PATTERNS", "secret, ssn")
    names = [g.get_name() for g in builtin_input_guardrails(load_settings())]
    assert names == ["input_size", "blocked_pattern"]
    monkeypatch.setenv("AGENTQ_ENABLE_GUARDRAILS", "false")
    assert builtin_input_guardrails(load_settings()) == []
