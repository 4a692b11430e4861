"""Built-in input guardrails, as Agents SDK ``InputGuardrail`` objects.

The engine puts them in every run's ``RunConfig`` (when ``AGENTQ_ENABLE_GUARDRAILS`` is on),
next to the agent's own guardrails. They run before the first model call rather than beside
it, so a request that trips one costs no model call, and the run fails at once with error type
``guardrail`` and the guardrail's name; it is never retried.

- ``input_size``: the input is longer than ``AGENTQ_GUARDRAIL_MAX_INPUT_CHARS``.
- ``blocked_pattern``: the input matches one of ``AGENTQ_BLOCKED_PATTERNS`` (regular
  expressions, matched case-insensitively).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agents import GuardrailFunctionOutput, InputGuardrail

from agentq.exceptions import ConfigurationError

if TYPE_CHECKING:
    from agents import Agent, RunContextWrapper
    from agents.items import TResponseInputItem

    from agentq.config import Settings


def input_text(input: str | list[TResponseInputItem]) -> str:
    """The words a guardrail checks: the input, or the text of its user messages."""
    if isinstance(input, str):
        return input
    parts: list[str] = []
    for item in input:
        if not isinstance(item, dict) or item.get("role") not in ("user", None):
            continue
        content: Any = item.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(parts)


def input_size_guardrail(max_chars: int) -> InputGuardrail[Any]:
    def check(
        _context: RunContextWrapper[Any], _agent: Agent[Any], input: str | list[TResponseInputItem]
    ) -> GuardrailFunctionOutput:
        size = len(input_text(input))
        over = size > max_chars
        info = (
            f"the input is {size} characters, over {max_chars} (AGENTQ_GUARDRAIL_MAX_INPUT_CHARS)"
            if over
            else None
        )
        return GuardrailFunctionOutput(output_info=info, tripwire_triggered=over)

    return InputGuardrail(guardrail_function=check, name="input_size", run_in_parallel=False)


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ConfigurationError(
                f"AGENTQ_BLOCKED_PATTERNS: {pattern!r} is not a regular expression: {exc}"
            ) from None
    return compiled


def blocked_pattern_guardrail(patterns: Sequence[str]) -> InputGuardrail[Any]:
    compiled = compile_patterns(patterns)

    def check(
        _context: RunContextWrapper[Any], _agent: Agent[Any], input: str | list[TResponseInputItem]
    ) -> GuardrailFunctionOutput:
        text = input_text(input)
        for pattern in compiled:
            if pattern.search(text):
                return GuardrailFunctionOutput(
                    output_info=f"the input matches the blocked pattern {pattern.pattern!r} "
                    "(AGENTQ_BLOCKED_PATTERNS)",
                    tripwire_triggered=True,
                )
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=False)

    return InputGuardrail(guardrail_function=check, name="blocked_pattern", run_in_parallel=False)


def builtin_input_guardrails(settings: Settings) -> list[InputGuardrail[Any]]:
    """The built-in guardrails the settings ask for; none when guardrails are off."""
    if not settings.enable_guardrails:
        return []
    guardrails = [input_size_guardrail(settings.guardrail_max_input_chars)]
    if settings.blocked_patterns:
        guardrails.append(blocked_pattern_guardrail(settings.blocked_patterns))
    return guardrails
