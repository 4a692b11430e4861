"""Settings: the guide's defaults, environment names, and start-up errors naming the variable."""

from __future__ import annotations

import pytest

from agentq.config import load_settings
from agentq.exceptions import ConfigurationError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("AGENTQ_", "OPENAI_")) or name in (
            "DATABASE_URL",
            "REDIS_URL",
            "LOG_LEVEL",
            "SENTRY_DSN",
            "STATSD_HOST",
            "STATSD_PORT",
        ):
            monkeypatch.delenv(name)


def test_defaults_are_the_guides_production_config() -> None:
    settings = load_settings()
    assert settings.default_model == "gpt-4o"
    assert settings.fallback_model == "gpt-4o-mini"
    assert settings.max_concurrent_runs == 100
    assert settings.request_timeout == 30
    assert settings.max_retries == 3
    assert settings.enable_guardrails is True
    assert settings.require_approval == ["sensitive_operations", "data_modification"]
    assert settings.max_tokens_per_request == 4000
    assert settings.enable_tracing is True
    assert settings.enable_metrics is True
    assert settings.log_level == "info"
    assert settings.rate_limits.requests_per_minute == 60
    assert settings.rate_limits.tokens_per_minute == 100_000
    assert settings.rate_limits.concurrent_requests == 10


def test_embedded_defaults_need_no_services() -> None:
    settings = load_settings()
    assert settings.embedded
    assert settings.uses_offline_model
    assert settings.broker_url.startswith("memory://")
    assert settings.sync_database_url.startswith("sqlite:///")


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTQ_DEFAULT_MODEL", "gpt-4.1")
    monkeypatch.setenv("AGENTQ_RATE_LIMITS__REQUESTS_PER_MINUTE", "500")
    monkeypatch.setenv("AGENTQ_REQUIRE_APPROVAL", "payments, deletes")
    monkeypatch.setenv("AGENTQ_AGENT_MODULES", "myapp.agents,otherapp.agents")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9999/v1")
    monkeypatch.setenv("AGENTQ_MODEL_API", "chat_completions")
    settings = load_settings()
    assert settings.default_model == "gpt-4.1"
    assert settings.rate_limits.requests_per_minute == 500
    assert settings.require_approval == ["payments", "deletes"]
    assert settings.agent_modules == ["myapp.agents", "otherapp.agents"]
    assert settings.log_level == "debug"
    assert settings.model_api == "chat_completions"
    assert not settings.uses_offline_model


def test_plain_postgresql_url_means_psycopg_3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://agentq:pw@db:5432/agentq")
    settings = load_settings()
    assert settings.sync_database_url == "postgresql+psycopg://agentq:pw@db:5432/agentq"
    assert settings.async_database_url == "postgresql+psycopg://agentq:pw@db:5432/agentq"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AGENTQ_MAX_RETRIES", "many"),
        ("AGENTQ_MAX_CONCURRENT_RUNS", "0"),
        ("AGENTQ_REQUEST_TIMEOUT", "-5"),
        ("AGENTQ_RATE_LIMITS__TOKENS_PER_MINUTE", "-1"),
        ("AGENTQ_MODEL_API", "completions"),
        ("LOG_LEVEL", "loud"),
        ("STATSD_PORT", "70000"),
        ("REDIS_URL", "http://localhost:6379"),
    ],
)
def test_a_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert name in str(refused.value)


def test_secrets_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://user:hunter2@db/x")
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert "DATABASE_URL" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_secrets_are_masked_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-secret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@db/x")
    settings = load_settings()
    assert "sk-live-secret" not in repr(settings)
    assert "hunter2" not in repr(settings)


def test_visibility_timeout_must_outlast_the_longest_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTQ_RUN_TIMEOUT", "600")
    assert (load_settings().visibility_timeout or 0) > 600
    monkeypatch.setenv("AGENTQ_VISIBILITY_TIMEOUT", "300")
    with pytest.raises(ConfigurationError, match="AGENTQ_VISIBILITY_TIMEOUT"):
        load_settings()


def test_the_readme_documents_every_setting() -> None:
    from pathlib import Path

    from pydantic import BaseModel

    from agentq.config import Settings, env_name

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = []
    for name, field in Settings.model_fields.items():
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            names = [env_name((name, inner)) for inner in nested.model_fields]
        else:
            names = [env_name((name,))]
        missing += [n for n in names if f"`{n}`" not in readme]
    assert missing == []


def test_gc_thresholds_are_three_positive_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentq.config import load_settings

    monkeypatch.setenv("AGENTQ_GC_THRESHOLD", "10000, 50, 100")
    assert load_settings().gc_threshold == (10000, 50, 100)
    for bad in ("10,x,1", "10,0,1", "1,2"):
        monkeypatch.setenv("AGENTQ_GC_THRESHOLD", bad)
        with pytest.raises(ConfigurationError, match="AGENTQ_GC_THRESHOLD"):
            load_settings()
