"""The agent registry: names, factories, and loading the modules that register agents."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from agentq.exceptions import RegistryError, UnknownAgent
from agentq.registry import Registry


def test_register_and_look_up() -> None:
    registry = Registry()

    @registry.agent("billing", version="2", side_effects=True)
    def billing() -> Any:
        """Answers billing questions.

        More text.
        """
        return "agent"

    spec = registry.get("billing")
    assert spec.factory is billing
    assert spec.description == "Answers billing questions."
    assert spec.version == "2"
    assert spec.side_effects
    assert registry.names() == ["billing"]
    assert "billing" in registry


def test_unknown_agent_lists_the_known_ones() -> None:
    registry = Registry()
    registry.agent("alpha")(lambda: None)
    with pytest.raises(UnknownAgent, match="alpha"):
        registry.get("beta")


def test_malformed_names_are_refused() -> None:
    with pytest.raises(RegistryError):
        Registry().agent("Not Valid")


def test_two_factories_under_one_name_are_refused() -> None:
    registry = Registry()

    def first() -> int:
        return 1

    def second() -> int:
        return 2

    registry.agent("dup")(first)
    with pytest.raises(RegistryError, match="already registered"):
        registry.agent("dup")(second)
    # The same factory seen again (a module imported twice) is not a conflict.
    registry.agent("dup")(first)


def test_a_missing_module_is_a_clear_error() -> None:
    with pytest.raises(RegistryError, match="AGENTQ_AGENT_MODULES"):
        Registry().load(["no_such_module_anywhere"])


def test_registering_does_not_import_the_agents_sdk() -> None:
    # Producers import agent modules; they must stay free of the SDK's 1.7 s import.
    code = (
        "import sys, agentq, agentq.examples; from agentq import Client\n"
        "assert 'agents' not in sys.modules and 'openai' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('agents', 'openai')))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
