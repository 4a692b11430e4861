"""Agents by name: ``@registry.agent("support")`` on a factory that returns an ``Agent``.

Registering costs nothing at import time; the Agents SDK is only imported by the factories,
which run in workers. Producers can therefore import modules that register agents.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from agentq.exceptions import InvalidRunRequest, RegistryError, UnknownAgent
from agentq.run import validate_agent_name

Factory = Callable[[], Any]
F = TypeVar("F", bound=Factory)


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """A registered agent."""

    name: str
    factory: Factory
    description: str
    version: str
    side_effects: bool
    """True when the agent's tools change the world: such runs are never served from cache."""


class Registry:
    def __init__(self) -> None:
        self._specs: dict[str, AgentSpec] = {}

    def agent(
        self,
        name: str,
        *,
        description: str | None = None,
        version: str = "1",
        side_effects: bool = False,
    ) -> Callable[[F], F]:
        """Register the decorated factory under ``name``."""
        try:
            validate_agent_name(name)
        except InvalidRunRequest as exc:
            raise RegistryError(str(exc)) from None

        def register(factory: F) -> F:
            existing = self._specs.get(name)
            if existing is not None and existing.factory is not factory:
                same_origin = getattr(existing.factory, "__qualname__", None) == getattr(
                    factory, "__qualname__", None
                ) and getattr(existing.factory, "__module__", None) == getattr(
                    factory, "__module__", None
                )
                if not same_origin:
                    raise RegistryError(f"agent {name!r} is already registered")
            doc = (factory.__doc__ or "").strip().splitlines()
            self._specs[name] = AgentSpec(
                name=name,
                factory=factory,
                description=description or (doc[0] if doc else ""),
                version=version,
                side_effects=side_effects,
            )
            return factory

        return register

    def get(self, name: str) -> AgentSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownAgent(name, list(self._specs)) from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[AgentSpec]:
        return [self._specs[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def load(self, modules: Iterable[str]) -> None:
        """Import the modules that register agents."""
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise RegistryError(
                    f"cannot import agent module {module!r} (AGENTQ_AGENT_MODULES): {exc}"
                ) from exc

    def clear(self) -> None:
        self._specs.clear()


registry = Registry()
