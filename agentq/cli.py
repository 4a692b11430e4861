"""The ``agentq`` command.

Producer commands (submit, get, cancel, agents, migrate) live here and stay light. Commands
that run a process of their own (``worker``, ``demo``, ``beat``) are plugged in by the
``workers`` and ``beat`` packages through the ``agentq.commands`` entry-point group, so the
library never imports its own entry points.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TextIO

from agentq.config import Settings, get_settings
from agentq.exceptions import AgentqError, ConfigurationError, InvalidRunRequest, RunTimeout
from agentq.run import PRIORITY_ORDER, Run

COMMAND_GROUP = "agentq.commands"

#: Exit codes: 0 success, 1 the run or check failed, 2 bad usage or configuration, 3 timeout.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand another package plugs into ``agentq``."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Settings], int]


def configure_logging(settings: Settings) -> None:
    # JSON lines on stderr, so stdout carries only what a command prints.
    from agentq.logs import configure_logging as configure_json_logging

    configure_json_logging(settings, sys.stderr)


def _client(settings: Settings) -> Any:
    from agentq.client import Client

    return Client(settings)


def _print_run(run: Run, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(run.to_dict(), indent=2) + "\n")
        return
    rows = [
        ("id", run.id),
        ("agent", run.agent),
        ("priority", run.priority.value),
        ("status", run.status.value),
        ("attempts", run.attempts),
        ("model", run.model or ""),
        ("turns", run.turns),
        ("tool calls", run.tool_calls),
        (
            "tokens",
            f"{run.usage.total_tokens} ({run.usage.input_tokens} in, "
            f"{run.usage.output_tokens} out, {run.usage.requests} requests)",
        ),
        ("queued ms", _ms(run.queue_ms)),
        ("duration ms", _ms(run.duration_ms)),
    ]
    if run.error_type:
        rows.append(("error", f"{run.error_type}: {run.error}"))
    if run.output is not None:
        rows.append(("output", run.output))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        out.write(f"{name:<{width}}  {value}\n")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    context = None
    if args.context is not None:
        try:
            context = json.loads(args.context)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"--context is not valid JSON: {exc}") from None
    with _client(settings) as client:
        handle = client.submit(
            args.agent,
            args.input,
            priority=args.priority,
            context=context,
            idempotency_key=args.idempotency_key,
        )
        if not args.wait:
            if args.json:
                sys.stdout.write(json.dumps({"id": handle.id, "created": handle.created}) + "\n")
            else:
                sys.stdout.write(handle.id + "\n")
            return 0
        run = handle.wait(timeout=args.timeout)
        _print_run(run, args.json, sys.stdout)
        return 0 if run.status.value == "succeeded" else EXIT_FAILED


def _get(args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings) as client:
        run = client.get(args.run_id)
        if not args.trace:
            _print_run(run, args.json, sys.stdout)
            return 0
        from agentq.tracing import format_traces, load_traces

        found = load_traces(client.store.engine, run.id)
    if args.json:
        sys.stdout.write(json.dumps({**run.to_dict(), "traces": found}, indent=2, default=str))
        sys.stdout.write("\n")
        return 0
    _print_run(run, False, sys.stdout)
    sys.stdout.write("\n" + (format_traces(found) or "no trace stored for this run") + "\n")
    return 0


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings) as client:
        _print_run(client.cancel(args.run_id), args.json, sys.stdout)
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from agentq.store import migrate

    migrate(settings.sync_database_url, args.revision)
    sys.stdout.write(f"database schema at {args.revision}\n")
    return 0


def _agents(args: argparse.Namespace, settings: Settings) -> int:
    from agentq.registry import registry

    registry.load(settings.agent_modules)
    specs = registry.specs()
    if args.json:
        listed = [
            {
                "name": spec.name,
                "description": spec.description,
                "version": spec.version,
                "side_effects": spec.side_effects,
            }
            for spec in specs
        ]
        sys.stdout.write(json.dumps(listed, indent=2) + "\n")
        return 0
    if not specs:
        sys.stdout.write("no agents registered (AGENTQ_AGENT_MODULES)\n")
        return 0
    width = max(len(spec.name) for spec in specs)
    for spec in specs:
        sys.stdout.write(f"{spec.name:<{width}}  v{spec.version}  {spec.description}\n")
    return 0


def _configure_submit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("agent", help="registered agent name")
    parser.add_argument("input", help="the user's input")
    parser.add_argument("--priority", default="normal", choices=[p.value for p in PRIORITY_ORDER])
    parser.add_argument("--context", help="JSON object handed to the agent's tools")
    parser.add_argument("--idempotency-key", help="submit at most once under this key")
    parser.add_argument("--wait", action="store_true", help="wait for the run to finish")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _configure_run_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _configure_get(parser: argparse.ArgumentParser) -> None:
    _configure_run_id(parser)
    parser.add_argument(
        "--trace", action="store_true", help="also show the run's trace: model calls, tools"
    )


def _configure_migrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default="head")


def _configure_agents(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


BUILTIN_COMMANDS: dict[str, Command] = {
    "submit": Command("submit a run", _configure_submit, _submit),
    "get": Command("show a run", _configure_get, _get),
    "cancel": Command("cancel a run", _configure_run_id, _cancel),
    "migrate": Command("create or upgrade the database schema", _configure_migrate, _migrate),
    "agents": Command("list registered agents", _configure_agents, _agents),
}


def plugged_commands() -> dict[str, Command]:
    commands: dict[str, Command] = {}
    for point in entry_points(group=COMMAND_GROUP):
        command = point.load()
        if isinstance(command, Command):
            commands[point.name] = command
    return commands


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentq", description="Run OpenAI Agents SDK agent runs in production."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(commands):
        command = commands[name]
        command.configure(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    commands = {**BUILTIN_COMMANDS, **plugged_commands()}
    args = build_parser(commands).parse_args(argv)
    try:
        settings = get_settings()
        configure_logging(settings)
        return commands[args.command].run(args, settings)
    except (ConfigurationError, InvalidRunRequest) as exc:
        sys.stderr.write(f"agentq: {exc}\n")
        return EXIT_USAGE
    except RunTimeout as exc:
        sys.stderr.write(f"agentq: {exc}\n")
        return EXIT_TIMEOUT
    except AgentqError as exc:
        sys.stderr.write(f"agentq: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
