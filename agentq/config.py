"""Typed settings, read once from the environment.

The guide's production config fields are ``AGENTQ_`` plus the field in snake case, nested with
``__`` (``AGENTQ_RATE_LIMITS__REQUESTS_PER_MINUTE``). Names the guide gives as plain environment
variables (``OPENAI_API_KEY``, ``DATABASE_URL``, ``REDIS_URL``, ``LOG_LEVEL`` …) keep those names.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agentq.exceptions import ConfigurationError

ENV_PREFIX = "AGENTQ_"
NESTED_DELIMITER = "__"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class RateLimits(BaseModel):
    """Provider quota shared by every worker of the cluster, per model."""

    requests_per_minute: int = Field(60, gt=0)
    """Model requests started per minute."""
    tokens_per_minute: int = Field(100_000, gt=0)
    """Tokens (input and output) consumed per minute."""
    concurrent_requests: int = Field(10, gt=0)
    """Model requests in flight at once."""
    enabled: bool = False
    """Enforce these limits. Off unless set: a compatible server or a benchmark is not throttled
    by accident; production sets ``AGENTQ_RATE_LIMITS__ENABLED=true``."""
    window_seconds: float = Field(60.0, gt=0, le=3600)
    """Length of the sliding window the per-minute limits count over; 60 is the provider's
    minute, tests shorten it."""


class HealthChecks(BaseModel):
    """How often each health check runs and how long it may take (the guide's values)."""

    database_interval: float = Field(30.0, gt=0)
    database_timeout: float = Field(5.0, gt=0)
    model_interval: float = Field(60.0, gt=0)
    model_timeout: float = Field(10.0, gt=0)
    memory_interval: float = Field(15.0, gt=0)
    memory_timeout: float = Field(1.0, gt=0)
    memory_max_usage: float = Field(0.9, gt=0, le=1)
    """Fraction of the host's (or container's) memory in use above which memory is unhealthy."""
    broker_interval: float = Field(30.0, gt=0)
    broker_timeout: float = Field(5.0, gt=0)
    workers_interval: float = Field(30.0, gt=0)
    workers_timeout: float = Field(5.0, gt=0)
    max_backlog: int = Field(10_000, gt=0)
    """Messages waiting in the run queues above which the pool is unhealthy."""
    database_url: SecretStr | None = None
    """Database the database check probes; unset means ``DATABASE_URL``."""


class BeatJobs(BaseModel):
    """Intervals of the periodic jobs other than health checks, in seconds."""

    rollup_interval: float = Field(60.0, gt=0)
    rollup_lookback_minutes: int = Field(5, gt=0, le=1440)
    """Minutes recomputed by each rollup, so runs finishing late still land in their minute."""
    sweep_interval: float = Field(30.0, gt=0)
    sweep_queued_after: float = Field(60.0, ge=0)
    """Seconds a run may sit queued before the sweeper looks for its broker message."""
    sweep_limit: int = Field(1000, gt=0)
    """Most runs one sweep looks at, so a huge backlog cannot make a sweep unbounded."""
    retention_interval: float = Field(3600.0, gt=0)


class Retention(BaseModel):
    """Age in days after which rows are deleted."""

    runs_days: float = Field(30.0, gt=0)
    """Finished runs only: queued and running runs are never deleted."""
    health_checks_days: float = Field(7.0, gt=0)
    metric_rollups_days: float = Field(90.0, gt=0)
    batches_days: float = Field(30.0, gt=0)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything agentq reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
    )

    # Connections and credentials. Unset means embedded mode: SQLite and an in-process broker.
    openai_api_key: SecretStr | None = Field(None, validation_alias="OPENAI_API_KEY")
    """Key for the OpenAI API or any compatible server."""
    openai_base_url: str | None = Field(None, validation_alias="OPENAI_BASE_URL")
    """Base URL of an OpenAI-compatible server; unset means OpenAI itself."""
    database_url: SecretStr | None = Field(None, validation_alias="DATABASE_URL")
    """``postgresql://user:pass@host:port/db``; unset means an embedded SQLite file."""
    redis_url: SecretStr | None = Field(None, validation_alias="REDIS_URL")
    """Broker and shared-state Redis; unset means an in-process broker (demo only)."""
    sentry_dsn: SecretStr | None = Field(None, validation_alias="SENTRY_DSN")
    statsd_host: str | None = Field(None, validation_alias="STATSD_HOST")
    statsd_port: int = Field(8125, gt=0, lt=65536, validation_alias="STATSD_PORT")
    log_level: LogLevel = Field(
        "info", validation_alias=AliasChoices("LOG_LEVEL", "AGENTQ_LOG_LEVEL")
    )
    jwt_secret: SecretStr | None = Field(None, validation_alias="JWT_SECRET")
    encryption_key: SecretStr | None = Field(None, validation_alias="ENCRYPTION_KEY")

    # The guide's production config.
    default_model: str = Field("gpt-4o", min_length=1)
    fallback_model: str | None = "gpt-4o-mini"
    max_concurrent_runs: int = Field(100, gt=0, le=100_000)
    """Runs in flight at once in one worker process."""
    request_timeout: float = Field(30.0, gt=0, le=3600)
    """Seconds one model call may take."""
    max_retries: int = Field(3, ge=0, le=20)
    """Retries of one model call (429, 5xx, timeouts, connection errors); agentq's own retry
    loop is the only one (the ``openai`` client's and the Agents SDK's are off)."""
    retry_backoff: float = Field(0.5, gt=0, le=60)
    """Seconds of the first retry's backoff; doubles per retry, with full jitter."""
    retry_backoff_max: float = Field(20.0, gt=0, le=600)
    """Longest pause between retries, also the cap on an honoured Retry-After."""
    fallback_after_rate_limits: int = Field(3, gt=0, le=100)
    """Consecutive 429s from the default model after which a run moves to the fallback."""
    enable_guardrails: bool = True
    require_approval: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["sensitive_operations", "data_modification"]
    )
    """Tool categories whose calls wait for a person's approval."""
    max_tokens_per_request: int = Field(4000, gt=0)
    """Output tokens one model call may produce; a run may ask for less or more, up to
    ``max_tokens_limit``."""
    max_tokens_limit: int = Field(32_000, gt=0)
    """Highest per-run ``max_tokens`` override accepted at submission."""
    blocked_patterns: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Regular expressions (comma-separated) whose match in a run's input trips the built-in
    ``blocked_pattern`` guardrail."""
    guardrail_max_input_chars: int = Field(32_000, gt=0)
    """Longest input the built-in ``input_size`` guardrail lets through to the model."""
    enable_cache: bool = False
    """Serve identical requests from the response cache. Off unless set, since an answer that
    depends on the time or the world must not be replayed."""
    cache_ttl: float = Field(300.0, gt=0, le=30 * 86_400)
    """Seconds a cached response is served."""
    cache_max_entries: int = Field(1000, gt=0, le=1_000_000)
    """Entries in each worker process's in-memory cache layer."""
    enable_tracing: bool = True
    """Record each run's trace and spans in Postgres (``agentq get RUN_ID --trace``)."""
    enable_metrics: bool = True
    """Send metrics to statsd when ``STATSD_HOST`` is set."""
    export_traces_to_openai: bool = False
    """Also export traces to OpenAI's trace viewer (needs a real ``OPENAI_API_KEY``)."""
    task_events: bool = False
    """Workers send Celery's task events from the start. Off, Flower (and ``celery control
    enable_events``) switches them on while it watches, so nobody pays for them unwatched."""
    metrics_interval: float = Field(10.0, gt=0, le=3600)
    """Seconds between samples of queue depth and runs in flight sent to statsd."""
    rate_limits: RateLimits = Field(default_factory=RateLimits)  # type: ignore[arg-type]

    # agentq's own.
    agent_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["agentq.examples"]
    )
    """Modules that register agents; workers import them at start-up."""
    model_api: Literal["responses", "chat_completions"] = "responses"
    http_client: Literal["aiohttp", "httpx"] = "aiohttp"
    """HTTP transport of the process's OpenAI client: ``aiohttp`` (openai's own extra, cheaper
    per call with many calls in flight) or ``httpx`` (the client's default)."""
    model_provider: Literal["auto", "openai", "offline"] = "auto"
    """``auto`` uses OpenAI when a key or base URL is set and the offline model otherwise."""
    offline_latency_ms: float = Field(0.0, ge=0, le=60_000)
    """Simulated latency of each offline model call."""
    max_turns: int = Field(10, gt=0, le=1000)
    """Turns (model calls) a run may take; a run may override it up to ``max_turns_limit``."""
    max_turns_limit: int = Field(50, gt=0, le=1000)
    """Highest per-run ``max_turns`` override accepted at submission."""
    max_input_chars: int = Field(100_000, gt=0)
    """Longest input a run request may carry."""
    max_context_bytes: int = Field(64_000, gt=0)
    run_timeout: float = Field(600.0, gt=0, le=86_400)
    """Whole-run deadline in seconds."""
    visibility_timeout: float | None = Field(None, gt=0)
    """Seconds before Redis redelivers an unacknowledged message; above ``run_timeout``."""
    lease_seconds: float = Field(30.0, gt=0, le=3600)
    """A running run's claim lapses if its worker stops renewing it for this long."""
    max_attempts: int = Field(3, gt=0, le=100)
    """Deliveries of one run before it is failed as lost (poison or crashing workers)."""
    data_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "agentq")
    """Where embedded mode keeps its SQLite file."""
    worker_concurrency: int | None = Field(None, gt=0, le=10_000)
    """Run slots per worker process; defaults to ``max_concurrent_runs``. With autoscaling
    this is the maximum."""
    worker_min_concurrency: int | None = Field(None, gt=0, le=10_000)
    """Fewest run slots the autoscaler shrinks a worker process to when its queues are idle;
    unset (or equal to the maximum) means a fixed size."""
    gc_threshold: Annotated[tuple[int, int, int], NoDecode] = (50_000, 100, 1000)
    """Python's garbage-collector thresholds in worker processes (``gc.set_threshold``), as
    ``gen0,gen1,gen2``. Hundreds of runs in flight keep many objects alive, and the default
    (700,10,10) collects so often that scanning them costs more CPU than the runs' own work;
    the objects loaded at start-up are also frozen out of the collector's reach."""
    worker_processes: int = Field(1, gt=0, le=256)
    """Engine processes ``agentq worker`` starts, each a Celery worker with its own event loop;
    one per core uses the host, since a run's CPU (not the model's latency) is the limit."""
    autoscale_interval: float = Field(1.0, gt=0, le=300)
    """Seconds between autoscaling checks of the queues' depth."""
    autoscale_idle: float = Field(30.0, gt=0, le=86_400)
    """Seconds without a new run before the autoscaler shrinks a worker."""
    high_priority_reserve: float = Field(0.1, ge=0, lt=1)
    """Share of each worker's slots only high-priority runs may use, so a backlog of other
    runs never starves them (the guide's emergency agents); at least one slot when above 0."""
    shutdown_grace: float = Field(60.0, ge=0, le=86_400)
    """Seconds runs in flight may take to finish after SIGTERM before they are handed back to
    the queue for another worker."""
    health: HealthChecks = Field(default_factory=HealthChecks)  # type: ignore[arg-type]
    beat: BeatJobs = Field(default_factory=BeatJobs)  # type: ignore[arg-type]
    retention: Retention = Field(default_factory=Retention)  # type: ignore[arg-type]
    alert_webhook_url: SecretStr | None = None
    """Health transitions are POSTed here as JSON."""
    batches: str | None = None
    """Scheduled batches as a JSON list (see ``agentq.batch``); ``batch_file`` names a file."""
    batch_file: Path | None = None
    """JSON or YAML file of scheduled batches."""
    flower_user: str | None = None
    flower_password: SecretStr | None = None

    @field_validator("require_approval", "agent_modules", "blocked_patterns", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("gc_threshold", mode="before")
    @classmethod
    def _thresholds(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = _split_csv(value)
            if len(parts) != 3:
                raise ValueError("must be three whole numbers, gen0,gen1,gen2")
            return tuple(parts)
        return value

    @field_validator("gc_threshold")
    @classmethod
    def _positive_thresholds(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(part <= 0 for part in value):
            raise ValueError("thresholds must be positive")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_scheme(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw in (None, ""):
            return None
        if not isinstance(raw, str) or not raw.startswith(("postgres", "sqlite")):
            raise ValueError("must be a postgresql:// or sqlite:// URL")
        return raw

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_scheme(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw in (None, ""):
            return None
        if not isinstance(raw, str) or not raw.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return raw

    @model_validator(mode="after")
    def _visibility_above_deadline(self) -> Settings:
        if self.visibility_timeout is None:
            # Redis redelivers an unacknowledged message after this long; it must outlast
            # the longest run or a healthy run is handed to a second worker.
            self.visibility_timeout = self.run_timeout + 300.0
        elif self.visibility_timeout <= self.run_timeout:
            raise ValueError(
                "AGENTQ_VISIBILITY_TIMEOUT must be greater than AGENTQ_RUN_TIMEOUT "
                f"({self.visibility_timeout:g} <= {self.run_timeout:g})"
            )
        return self

    # Derived values.

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: producer and worker share one process."""
        return self.redis_url is None

    @property
    def sync_database_url(self) -> str:
        return _sqlalchemy_url(self, asynchronous=False)

    @property
    def async_database_url(self) -> str:
        return _sqlalchemy_url(self, asynchronous=True)

    @property
    def broker_url(self) -> str:
        return self.redis_url.get_secret_value() if self.redis_url else "memory://localhost/"

    @property
    def slots(self) -> int:
        return self.worker_concurrency or self.max_concurrent_runs

    @property
    def min_slots(self) -> int:
        """The autoscaler's lower bound; equal to ``slots`` when autoscaling is off."""
        return min(self.worker_min_concurrency or self.slots, self.slots)

    @property
    def uses_offline_model(self) -> bool:
        if self.model_provider == "auto":
            return self.openai_api_key is None and self.openai_base_url is None
        return self.model_provider == "offline"


def _sqlalchemy_url(settings: Settings, *, asynchronous: bool) -> str:
    if settings.database_url is None:
        path = settings.data_dir / "agentq.sqlite3"
        driver = "sqlite+aiosqlite" if asynchronous else "sqlite"
        return f"{driver}:///{path}"
    raw = settings.database_url.get_secret_value()
    scheme, _, rest = raw.partition("://")
    if scheme.startswith("sqlite"):
        return f"{'sqlite+aiosqlite' if asynchronous else 'sqlite'}://{rest}"
    # The guide's plain postgresql:// form means psycopg 3, which serves sync and asyncio.
    return f"postgresql+psycopg://{rest}"


def env_name(loc: tuple[str | int, ...]) -> str:
    """The environment variable behind a validation error location."""
    field = Settings.model_fields.get(str(loc[0])) if loc else None
    alias = field.validation_alias if field else None
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    # An item of a list or tuple setting (an int in the location) is still that variable.
    names = []
    for part in loc:
        if isinstance(part, int):
            break
        names.append(str(part))
    return ENV_PREFIX + NESTED_DELIMITER.join(names).upper()


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, or raise a ConfigurationError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            name = env_name(loc) if loc else "settings"
            shown = os.environ.get(name)
            value = "" if shown is None or _is_secret(name) else f" (got {shown!r})"
            problems.append(f"{name}{value}: {error['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None


def _is_secret(name: str) -> bool:
    return any(word in name for word in ("KEY", "SECRET", "PASSWORD", "DSN", "URL", "TOKEN"))


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()
