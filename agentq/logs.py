"""Structured logs: one JSON object per line on stderr, secrets redacted.

Every record carries a stable ``action`` key (``agent_execution``, ``agent_error``,
``run_skipped`` …) that log pipelines filter on; the message is for people. Values passed in
``extra`` become keys of the record. Before a line is written, the values of the settings'
secrets and anything shaped like a credential (a password in a URL, an API key, a
``password=`` pair) are replaced by ``[redacted]``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import SecretStr

from agentq.config import Settings

REDACTED = "[redacted]"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)

_CREDENTIAL_PATTERNS = (
    # scheme://user:password@host: keep the user, drop the password.
    (re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s\"']*:)[^@\s\"']+@"), r"\g<keep>"),
    # scheme://key@host (a Sentry DSN's public key).
    (re.compile(r"(?P<keep>https?://)[0-9a-fA-F]{16,}@"), r"\g<keep>"),
    # OpenAI-style and bearer keys.
    (re.compile(r"(?P<keep>)\bsk-[A-Za-z0-9_\-]{8,}"), r"\g<keep>"),
    (re.compile(r"(?P<keep>\b[Bb]earer\s+)[A-Za-z0-9._\-]{8,}"), r"\g<keep>"),
    (
        re.compile(
            r"(?P<keep>\b(?:password|passwd|secret|api_key|apikey|token)[\"']?\s*[=:]\s*[\"']?)"
            r"[^\s\"'&,;}]+",
            re.IGNORECASE,
        ),
        r"\g<keep>",
    ),
)


class Redactor:
    """Replaces known secret values and credential-shaped text with ``[redacted]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = [secret for secret in secrets if secret]
        values: set[str] = set()
        for secret in self.secrets:
            if len(secret) < 4:
                # Too short to replace without mangling ordinary text.
                continue
            values.add(secret)
            # The same value as it appears inside a JSON string.
            values.add(json.dumps(secret)[1:-1])
        self._secrets = sorted(values, key=len, reverse=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        return cls(secret_values(settings))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern, keep in _CREDENTIAL_PATTERNS:
            text = pattern.sub(keep + REDACTED + _suffix(pattern), text)
        return text


def _suffix(pattern: re.Pattern[str]) -> str:
    # The URL patterns consume the "@" that ends the credential; put it back.
    return "@" if pattern.pattern.endswith("@") else ""


def secret_values(settings: Settings) -> list[str]:
    """The plain values of every secret setting that is set, and their URLs' passwords."""
    values = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            raw = value.get_secret_value()
            if raw:
                values.append(raw)
                values.extend(_url_credentials(raw))
    return values


def _url_credentials(raw: str) -> list[str]:
    _, sep, rest = raw.partition("://")
    if not sep or "@" not in rest:
        return []
    userinfo = rest.split("@", 1)[0]
    user, _, password = userinfo.partition(":")
    # A DSN's public key is a credential on its own; a database user name is not.
    return [password] if password else ([user] if len(user) >= 16 else [])


class JsonFormatter(logging.Formatter):
    """One JSON line per record: ``ts``, ``level``, ``logger``, ``action``, ``message``, extras."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "action": getattr(record, "action", None) or _default_action(record),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry.setdefault("error_type", type(exc).__name__)
            entry.setdefault("error_message", str(exc))
            entry["stack"] = "".join(traceback.format_exception(*record.exc_info))
        elif record.stack_info:
            entry["stack"] = record.stack_info
        return self.redactor(json.dumps(entry, default=str, ensure_ascii=False))


def _default_action(record: logging.LogRecord) -> str:
    # Third-party records (Celery, Alembic) get an action naming their source.
    return record.name.replace(".", "_")


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (stderr) as redacted JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(Redactor.from_settings(settings)))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    if settings.log_level != "debug":
        # Alembic narrates every step at INFO; a migration is one line of news to a user.
        logging.getLogger("alembic").setLevel(logging.WARNING)
