"""JSON log lines: stable keys, extras, exceptions, and no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from agentq.config import load_settings
from agentq.logs import REDACTED, JsonFormatter, Redactor, configure_logging, secret_values


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("agentq.test", logging.INFO, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_record_is_one_json_line_with_its_action_and_extras() -> None:
    line = JsonFormatter().format(_record("run done", action="agent_execution", turns=2))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["action"] == "agent_execution"
    assert entry["message"] == "run done"
    assert entry["level"] == "info"
    assert entry["logger"] == "agentq.test"
    assert entry["turns"] == 2
    assert entry["ts"].endswith("+00:00")


def test_a_record_without_an_action_is_named_after_its_logger() -> None:
    entry = json.loads(JsonFormatter().format(_record("hello")))
    assert entry["action"] == "agentq_test"


def test_an_exception_carries_its_type_message_and_stack() -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        record = logging.LogRecord(
            "agentq.test", logging.ERROR, __file__, 1, "failed", None, exc_info=True
        )
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["error_type"] == "ValueError"
    assert entry["error_message"] == "bad value"
    assert "Traceback" in entry["stack"]
    assert "raise ValueError" in entry["stack"]


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        ("postgresql://agentq:pa55w0rd@db:5432/agentq", "pa55w0rd"),
        ("redis://:hunter22@redis:6379/0", "hunter22"),
        ("calling with sk-proj-abcdefghijklmnop", "sk-proj-abcdefghijklmnop"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9"),
        ("login password=opensesame&user=x", "opensesame"),
        ('{"api_key": "k-123456"}', "k-123456"),
    ],
)
def test_credential_shaped_text_is_redacted(text: str, leaked: str) -> None:
    redacted = Redactor()(text)
    assert leaked not in redacted
    assert REDACTED in redacted


def test_ordinary_text_is_left_alone() -> None:
    text = '"total_tokens": 94, "input_tokens": 40, redis://127.0.0.1:6379/1 agent support'
    assert Redactor()(text) == text


def test_the_settings_secret_values_are_redacted_wherever_they_appear() -> None:
    settings = load_settings(
        OPENAI_API_KEY="plainkeyvalue0001",
        SENTRY_DSN="https://0123456789abcdef0123456789abcdef@o1.ingest.sentry.io/42",
        JWT_SECRET="jwt-shh-value",
        DATABASE_URL="postgresql://app:dbsecret99@db/app",
    )
    values = secret_values(settings)
    assert "plainkeyvalue0001" in values
    assert "dbsecret99" in values
    assert "0123456789abcdef0123456789abcdef" in values
    redactor = Redactor.from_settings(settings)
    line = JsonFormatter(redactor).format(
        _record(
            "key plainkeyvalue0001 jwt jwt-shh-value",
            action="x",
            url="db at dbsecret99",
            nested={"dsn": "0123456789abcdef0123456789abcdef"},
        )
    )
    for secret in ("plainkeyvalue0001", "jwt-shh-value", "dbsecret99", "0123456789abcdef01"):
        assert secret not in line
    assert json.loads(line)["action"] == "x"


def test_a_secret_with_quotes_is_redacted_inside_json() -> None:
    redactor = Redactor(['pa"ss\\word'])
    line = JsonFormatter(redactor).format(_record('the secret is pa"ss\\word'))
    assert "ss\\\\word" not in line
    assert REDACTED in json.loads(line)["message"]


def test_configure_logging_writes_json_at_the_configured_level(restore_root: None) -> None:
    stream = io.StringIO()
    configure_logging(load_settings(LOG_LEVEL="warning", OPENAI_API_KEY="sk-abcdefgh12345"), stream)
    log = logging.getLogger("agentq.test.configure")
    log.info("not shown")
    log.warning("shown with sk-abcdefgh12345", extra={"action": "probe"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["action"] == "probe"
    assert "sk-abcdefgh12345" not in lines[0]
