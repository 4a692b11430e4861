"""An OpenAI-compatible HTTP server that stands in for the model.

:class:`MockOpenAIServer` speaks enough of the Chat Completions and Responses
APIs for the ``openai`` client and the Agents SDK to run real agent loops
against it, deterministically and without network access. It can add latency,
inject errors, hang requests, and it records what it saw so that tests can
assert on request rates, concurrency and token accounting.

In-process use::

    with MockOpenAIServer(MockOpenAIConfig(latency_ms=20)) as server:
        client = AsyncOpenAI(base_url=server.url, api_key="x")

As a separate process::

    python -m agentq.testing --port 0 --latency-ms 200 --error-rate 0.1 --seed 7

which prints ``listening http://127.0.0.1:PORT/v1`` and serves until SIGTERM or
SIGINT. ``GET /_stats``, ``POST /_reset`` and ``POST /_config`` expose
:meth:`MockOpenAIServer.stats`, :meth:`MockOpenAIServer.reset` and
:meth:`MockOpenAIServer.configure` over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http
import itertools
import json
import logging
import math
import random
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, cast
from urllib.parse import parse_qs

__all__ = [
    "MODEL_IDS",
    "MockOpenAIConfig",
    "MockOpenAIServer",
    "main",
    "max_requests_in_window",
    "synthesize_arguments",
]

logger = logging.getLogger("agentq.testing")

MODEL_IDS: Final[tuple[str, ...]] = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-5-mini")
"""Model ids listed by ``GET /v1/models``; any model name is accepted on requests."""

TIMESTAMP_CAP: Final = 1_000_000

_MAX_HEAD_BYTES: Final = 64 * 1024
_MAX_BODY_BYTES: Final = 32 * 1024 * 1024
_MAX_SCHEMA_DEPTH: Final = 16
_STREAM_PIECE_CHARS: Final = 16

_REASONS: Final[dict[int, str]] = {s.value: s.phrase for s in http.HTTPStatus}

# A shared encoder avoids json.dumps building a new JSONEncoder on every call
# when non-default separators are requested.
_dumps: Final[Callable[[Any], str]] = json.JSONEncoder(separators=(",", ":")).encode

_ERROR_KINDS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("timeout_error", "request_timeout"),
    409: ("conflict_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}


# --------------------------------------------------------------------------- config


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("expected a number, got a boolean")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"expected a finite number, got {value!r}")
    return result


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("expected an integer, got a boolean")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _is_none_word(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def _as_optional_float(value: Any) -> float | None:
    return None if _is_none_word(value) else _as_float(value)


def _as_optional_int(value: Any) -> int | None:
    return None if _is_none_word(value) else _as_int(value)


def _as_optional_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _split_words(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _as_int_tuple(value: Any) -> tuple[int, ...]:
    items: Iterable[Any] = _split_words(value) if isinstance(value, str) else value
    return tuple(_as_int(item) for item in items)


def _as_str_set(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(_split_words(value))
    result: set[str] = set()
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected model names as strings, got {item!r}")
        result.add(item)
    return frozenset(result)


@dataclass(frozen=True, slots=True)
class MockOpenAIConfig:
    """Run-time behaviour of a :class:`MockOpenAIServer`.

    Instances are immutable; change a running server with
    :meth:`MockOpenAIServer.configure` or ``POST /_config``, which accept the
    same field names. Each field's ``help`` metadata documents it and doubles
    as the text of the matching command-line flag.

    Latency, error injection and hanging apply to the model endpoints
    (``/chat/completions`` and ``/responses``) only.
    """

    latency_ms: float = field(
        default=0.0,
        metadata={"help": "milliseconds to wait (asynchronously) before answering"},
    )
    latency_jitter_ms: float = field(
        default=0.0,
        metadata={"help": "extra uniformly random delay in [0, this] milliseconds"},
    )
    input_tokens: int = field(
        default=50, metadata={"help": "input (prompt) tokens reported per call"}
    )
    output_tokens: int = field(
        default=10, metadata={"help": "output (completion) tokens reported per call"}
    )
    error_rate: float = field(
        default=0.0,
        metadata={"help": "fraction (0..1) of requests answered with an injected error"},
    )
    error_statuses: tuple[int, ...] = field(
        default=(429, 500),
        metadata={"help": "HTTP statuses to pick injected errors from, e.g. 429,500"},
    )
    retry_after: float | None = field(
        default=None,
        metadata={"help": "seconds sent as Retry-After on injected 429s; none sends no header"},
    )
    fail_models: AbstractSet[str] = field(
        default=frozenset(),
        metadata={"help": "model names that always get a 500, e.g. gpt-4o,o3"},
    )
    hang_rate: float = field(
        default=0.0,
        metadata={"help": "fraction (0..1) of requests never answered; the connection stays open"},
    )
    reply: str | None = field(
        default=None,
        metadata={"help": "fixed text for final answers instead of 'echo: ...'"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "seed for the random generator behind errors, hangs and jitter"},
    )

    def __post_init__(self) -> None:
        # Normalise container fields so that lists from JSON or sets from
        # callers compare and serialise the same way.
        object.__setattr__(self, "error_statuses", _as_int_tuple(self.error_statuses))
        object.__setattr__(self, "fail_models", _as_str_set(self.fail_models))
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must be >= 0")
        if self.input_tokens < 0 or self.output_tokens < 0:
            raise ValueError("input_tokens and output_tokens must be >= 0")
        for name in ("error_rate", "hang_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate!r}")
        for status in self.error_statuses:
            if not 400 <= status <= 599:
                raise ValueError(f"error_statuses must be 4xx/5xx codes, got {status}")
        if self.error_rate > 0 and not self.error_statuses:
            raise ValueError("error_rate > 0 needs at least one entry in error_statuses")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> MockOpenAIConfig:
        """Build a config from loosely typed values (JSON bodies, CLI strings)."""
        return cls(**_coerce_fields(data))

    def updated(self, changes: Mapping[str, Any]) -> MockOpenAIConfig:
        """Return a copy with ``changes`` (loosely typed, like :meth:`from_mapping`) applied."""
        return dataclasses.replace(self, **_coerce_fields(changes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the same keys accepted by :meth:`from_mapping`."""
        return {
            "latency_ms": self.latency_ms,
            "latency_jitter_ms": self.latency_jitter_ms,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "error_rate": self.error_rate,
            "error_statuses": list(self.error_statuses),
            "retry_after": self.retry_after,
            "fail_models": sorted(self.fail_models),
            "hang_rate": self.hang_rate,
            "reply": self.reply,
            "seed": self.seed,
        }


_FIELD_PARSERS: Final[dict[str, Callable[[Any], Any]]] = {
    "latency_ms": _as_float,
    "latency_jitter_ms": _as_float,
    "input_tokens": _as_int,
    "output_tokens": _as_int,
    "error_rate": _as_float,
    "error_statuses": _as_int_tuple,
    "retry_after": _as_optional_float,
    "fail_models": _as_str_set,
    "hang_rate": _as_float,
    "reply": _as_optional_str,
    "seed": _as_optional_int,
}


def _coerce_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(data) - set(_FIELD_PARSERS))
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    coerced: dict[str, Any] = {}
    for name, value in data.items():
        try:
            coerced[name] = _FIELD_PARSERS[name](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid value for {name}: {exc}") from exc
    return coerced


# ------------------------------------------------------------------ schema filling


def synthesize_arguments(schema: Mapping[str, Any], text: str) -> dict[str, Any]:
    """Build tool-call arguments valid for a JSON schema.

    Strings get ``text``, integers 1, numbers 1.0, booleans true, arrays and
    objects their smallest valid form; only required properties are filled.
    Enums, consts, numeric bounds, string lengths, ``$ref`` and ``anyOf`` /
    ``oneOf`` / ``allOf`` are honoured so that strict schemas still validate.
    """
    value = _synthesize(schema, text, schema, 0)
    return value if isinstance(value, dict) else {}


def _resolve_ref(root: Mapping[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        return None
    node: Any = root
    for raw in ref[1:].split("/"):
        if not raw:
            continue
        key = raw.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _is_null_schema(schema: Any) -> bool:
    return isinstance(schema, Mapping) and schema.get("type") == "null"


def _synthesize(schema: Any, text: str, root: Mapping[str, Any], depth: int) -> Any:
    if depth > _MAX_SCHEMA_DEPTH:
        return None
    if not isinstance(schema, Mapping):
        # `true` or a malformed schema accepts anything.
        return text
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve_ref(root, ref)
        if target is not None:
            return _synthesize(target, text, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            chosen = next((o for o in options if not _is_null_schema(o)), None)
            return None if chosen is None else _synthesize(chosen, text, root, depth + 1)
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and all_of:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in all_of:
            if isinstance(part, Mapping):
                resolved = part
                part_ref = part.get("$ref")
                if isinstance(part_ref, str):
                    target = _resolve_ref(root, part_ref)
                    if isinstance(target, Mapping):
                        resolved = target
                merged.update(resolved)
        return _synthesize(merged, text, root, depth + 1)

    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        if "properties" in schema or "required" in schema:
            kind = "object"
        elif "items" in schema:
            kind = "array"
        else:
            return text

    if kind == "object":
        properties = schema.get("properties")
        props: Mapping[str, Any] = properties if isinstance(properties, Mapping) else {}
        required = schema.get("required")
        names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
        return {name: _synthesize(props.get(name, {}), text, root, depth + 1) for name in names}
    if kind == "array":
        min_items = schema.get("minItems", 0)
        count = min_items if isinstance(min_items, int) and min_items > 0 else 0
        items = schema.get("items", {})
        return [_synthesize(items, text, root, depth + 1) for _ in range(count)]
    if kind == "string":
        value = text
        max_length = schema.get("maxLength")
        if isinstance(max_length, int) and len(value) > max_length:
            value = value[:max_length]
        min_length = schema.get("minLength")
        if isinstance(min_length, int) and len(value) < min_length:
            value = value + "x" * (min_length - len(value))
        return value
    if kind == "integer":
        return _bounded(schema, 1, integer=True)
    if kind == "number":
        return _bounded(schema, 1.0, integer=False)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def _bounded(schema: Mapping[str, Any], start: float, *, integer: bool) -> int | float:
    def bound(name: str) -> float | None:
        raw = schema.get(name)
        return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None

    value = start
    # Strictest lower bound seen so far, used to stay inside an exclusive maximum.
    floor_value: float | None = None
    low = bound("minimum")
    if low is not None:
        floor_value = low
        if value < low:
            value = math.ceil(low) if integer else low
    ex_low = bound("exclusiveMinimum")
    if ex_low is not None:
        floor_value = ex_low if floor_value is None else max(floor_value, ex_low)
        if value <= ex_low:
            value = math.floor(ex_low) + 1 if integer else ex_low + 1.0
    high = bound("maximum")
    if high is not None and value > high:
        value = math.floor(high) if integer else high
    ex_high = bound("exclusiveMaximum")
    if ex_high is not None and value >= ex_high:
        if integer:
            value = math.ceil(ex_high) - 1
        elif floor_value is not None:
            value = (floor_value + ex_high) / 2
        else:
            value = ex_high - 1.0
    return int(value) if integer else float(value)


# ---------------------------------------------------------------- conversation


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        return " ".join(texts)
    return _dumps(content)


@dataclass(slots=True)
class _Turn:
    user_text: str
    tool_output: str | None


def _scan_chat(messages: Any) -> _Turn:
    if not isinstance(messages, list):
        return _Turn("", None)
    last_user = -1
    for index, message in enumerate(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            last_user = index
    user_text = _text_of(messages[last_user].get("content")) if last_user >= 0 else ""
    tool_output: str | None = None
    for message in messages[last_user + 1 :]:
        if isinstance(message, Mapping) and message.get("role") == "tool":
            tool_output = _text_of(message.get("content"))
    return _Turn(user_text, tool_output)


def _scan_responses(items: Any) -> _Turn:
    if isinstance(items, str):
        return _Turn(items, None)
    if not isinstance(items, list):
        return _Turn("", None)
    last_user = -1
    for index, item in enumerate(items):
        if (
            isinstance(item, Mapping)
            and item.get("role") == "user"
            and item.get("type", "message") == "message"
        ):
            last_user = index
    user_text = _text_of(items[last_user].get("content")) if last_user >= 0 else ""
    tool_output: str | None = None
    for item in items[last_user + 1 :]:
        if isinstance(item, Mapping) and item.get("type") == "function_call_output":
            tool_output = _text_of(item.get("output"))
    return _Turn(user_text, tool_output)


_Tool = tuple[str, Mapping[str, Any]]


def _chat_tools(body: Mapping[str, Any]) -> list[_Tool]:
    tools: list[_Tool] = []
    for tool in body.get("tools") or ():
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            params = function.get("parameters")
            tools.append((function["name"], params if isinstance(params, Mapping) else {}))
    return tools


def _responses_tools(body: Mapping[str, Any]) -> list[_Tool]:
    tools: list[_Tool] = []
    for tool in body.get("tools") or ():
        if (
            isinstance(tool, Mapping)
            and tool.get("type") == "function"
            and isinstance(tool.get("name"), str)
        ):
            params = tool.get("parameters")
            tools.append((tool["name"], params if isinstance(params, Mapping) else {}))
    return tools


def _pick_tool(tools: list[_Tool], choice: Any) -> _Tool | None:
    if not tools or choice == "none":
        return None
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
        for tool in tools:
            if tool[0] == name:
                return tool
    return tools[0]


def _requested_format(fmt: Any) -> tuple[str, Any] | None:
    """Normalise a structured-output request to ("json_schema", schema) or ("json_object", None)."""
    if not isinstance(fmt, Mapping):
        return None
    kind = fmt.get("type")
    if kind == "json_schema":
        # Chat nests the schema under "json_schema"; Responses puts it inline.
        holder = fmt.get("json_schema", fmt)
        schema = holder.get("schema") if isinstance(holder, Mapping) else None
        return ("json_schema", schema if isinstance(schema, Mapping) else {})
    if kind == "json_object":
        return ("json_object", None)
    return None


def _final_text(config: MockOpenAIConfig, turn: _Turn, fmt: tuple[str, Any] | None) -> str:
    if config.reply is not None:
        text = config.reply
    else:
        text = f"echo: {turn.user_text}"
        if turn.tool_output is not None:
            text += f" | tool: {turn.tool_output}"
    # Agents with a structured output type parse the answer as JSON, so a
    # plain echo would fail them; give them a schema-valid document instead.
    if fmt is None:
        return text
    if fmt[0] == "json_object":
        return _dumps({"text": text})
    return _dumps(_synthesize(fmt[1], text, fmt[1], 0))


def _pieces(text: str) -> list[str]:
    return [text[i : i + _STREAM_PIECE_CHARS] for i in range(0, len(text), _STREAM_PIECE_CHARS)]


# ------------------------------------------------------------------------ stats


def max_requests_in_window(timestamps: Iterable[float], window_s: float = 60.0) -> int:
    """Largest number of timestamps falling inside any half-open window of ``window_s``."""
    ordered = sorted(timestamps)
    best = 0
    start = 0
    for end, stamp in enumerate(ordered):
        while stamp - ordered[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


class _Stats:
    __slots__ = (
        "by_model",
        "by_path",
        "by_status",
        "connections_opened",
        "errors_injected",
        "hung_requests",
        "in_flight",
        "input_tokens",
        "max_in_flight",
        "output_tokens",
        "timestamps",
        "tool_calls",
        "total_requests",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.clear()

    def clear(self) -> None:
        self.total_requests = 0
        self.by_path: dict[str, int] = {}
        self.by_model: dict[str, int] = {}
        self.by_status: dict[str, int] = {}
        self.input_tokens = 0
        self.output_tokens = 0
        self.tool_calls = 0
        self.errors_injected = 0
        self.hung_requests = 0
        self.connections_opened = 0
        # Requests still being handled keep counting towards the new peak.
        self.max_in_flight = self.in_flight
        self.timestamps: deque[float] = deque(maxlen=TIMESTAMP_CAP)

    def snapshot(self, include_timestamps: bool) -> dict[str, Any]:
        return {
            "total_requests": self.total_requests,
            "requests_by_path": dict(self.by_path),
            "requests_by_model": dict(self.by_model),
            "requests_by_status": dict(self.by_status),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "tool_calls": self.tool_calls,
            "errors_injected": self.errors_injected,
            "hung_requests": self.hung_requests,
            "connections_opened": self.connections_opened,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "request_timestamps": list(self.timestamps) if include_timestamps else [],
        }


# ------------------------------------------------------------------------- HTTP


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass(slots=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    extra_headers: str = ""
    request_id: str = ""
    delay: float = 0.0
    hang: bool = False
    tracked: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    tool_calls: int = 0


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    keep_alive: bool
    chunked: bool = False
    content_length: int = 0
    expect_continue: bool = False
    body: bytes = b""
    error: _Reply | None = None


def _json_reply(status: int, payload: Any, extra_headers: str = "") -> _Reply:
    return _Reply(status, _dumps(payload).encode(), extra_headers=extra_headers)


def _error_reply(
    status: int,
    message: str,
    param: str | None = None,
    extra_headers: str = "",
) -> _Reply:
    default_kind = (
        ("server_error", "server_error") if status >= 500 else ("invalid_request_error", None)
    )
    kind, code = _ERROR_KINDS.get(status, default_kind)
    payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return _json_reply(status, payload, extra_headers)


def _parse_head(raw: bytes) -> _Request:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _HTTPError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _HTTPError(505, f"unsupported HTTP version {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t":
            raise _HTTPError(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        if key in headers:
            if key == "content-length" and headers[key] != value:
                raise _HTTPError(400, "conflicting Content-Length headers")
            if key != "content-length":
                headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value

    if target.startswith(("http://", "https://")):
        # Absolute-form targets (sent through proxies) carry the authority too.
        slash = target.find("/", target.find("//") + 2)
        target = target[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")

    connection = headers.get("connection", "").lower()
    # HTTP/1.1 connections persist unless closed explicitly; HTTP/1.0 ones must opt in.
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection

    request = _Request(method, path, query, headers, keep_alive)
    transfer_encoding = headers.get("transfer-encoding")
    if transfer_encoding is not None:
        codings = [c.strip().lower() for c in transfer_encoding.split(",")]
        if codings[-1] != "chunked":
            raise _HTTPError(400, f"unsupported Transfer-Encoding {transfer_encoding!r}")
        request.chunked = True
    elif "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit():
            raise _HTTPError(400, "invalid Content-Length")
        request.content_length = int(length)
        if request.content_length > _MAX_BODY_BYTES:
            raise _HTTPError(413, "request body too large")
    request.expect_continue = headers.get("expect", "").lower() == "100-continue"
    return request


_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")


def _parse_chunked(buf: bytearray) -> tuple[bytes, int] | None:
    """Decode a chunked body at the start of ``buf``: (body, bytes used), or None if incomplete."""
    pos = 0
    parts: list[bytes] = []
    total = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > 4096:
                raise _HTTPError(400, "chunk size line too long")
            return None
        size_token = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        if not size_token or not all(byte in _HEX_DIGITS for byte in size_token):
            raise _HTTPError(400, "invalid chunk size")
        size = int(size_token, 16)
        pos = eol + 2
        if size == 0:
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return b"".join(parts), eol + 2
                pos = eol + 2
        total += size
        if total > _MAX_BODY_BYTES:
            raise _HTTPError(413, "request body too large")
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise _HTTPError(400, "chunk not terminated by CRLF")
        parts.append(bytes(buf[pos : pos + size]))
        pos += size + 2


class _HTTPProtocol(asyncio.Protocol):
    """One client connection: a minimal HTTP/1.1 server with keep-alive.

    Requests on a connection are answered strictly in order; answers without a
    delay are written straight from ``data_received`` so the common case costs
    no task creation.
    """

    __slots__ = (
        "_buf",
        "_eof",
        "_hanging",
        "_head",
        "_queue",
        "_server",
        "_stopped",
        "_task",
        "_transport",
    )

    def __init__(self, server: MockOpenAIServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: _Request | None = None
        self._queue: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._eof = False
        self._hanging = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server._connection_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()
        self._server._connection_lost(self)
        if self._task is not None:
            self._task.cancel()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._hanging:
            # A client that closes during a hang has given up on it.
            return None
        # A half-closed client may still be waiting: keep the write side open
        # until queued answers have gone out.
        if self._task is not None or self._queue:
            return True
        return None

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self._buf += data
        self._parse()
        if self._task is None:
            self._process()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def _reject(self, status: int, message: str) -> None:
        self._stopped = True
        self._buf.clear()
        self._head = None
        request = _Request("", "", "", {}, keep_alive=False, error=_error_reply(status, message))
        self._queue.append(request)

    def _parse(self) -> None:
        buf = self._buf
        while not self._stopped:
            request = self._head
            if request is None:
                # Stray CRLFs between requests are allowed by RFC 9112.
                while buf[:2] == b"\r\n":
                    del buf[:2]
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD_BYTES:
                        self._reject(431, "request header fields too large")
                    return
                if end > _MAX_HEAD_BYTES:
                    self._reject(431, "request header fields too large")
                    return
                try:
                    request = _parse_head(bytes(buf[:end]))
                except _HTTPError as exc:
                    self._reject(exc.status, exc.message)
                    return
                del buf[: end + 4]
                self._head = request
                if request.expect_continue and self._transport is not None:
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if request.chunked:
                try:
                    parsed = _parse_chunked(buf)
                except _HTTPError as exc:
                    self._reject(exc.status, exc.message)
                    return
                if parsed is None:
                    return
                request.body, used = parsed
            else:
                used = request.content_length
                if len(buf) < used:
                    return
                request.body = bytes(buf[:used])
            del buf[:used]
            self._head = None
            self._queue.append(request)
            if not request.keep_alive:
                self._stopped = True
                buf.clear()

    def _process(self) -> None:
        while self._task is None and self._queue and self._transport is not None:
            request = self._queue.popleft()
            reply = request.error if request.error is not None else self._server._dispatch(request)
            if reply.hang or reply.delay > 0:
                self._hanging = reply.hang
                self._task = self._server._loop_or_raise().create_task(
                    self._answer_later(reply, request.keep_alive)
                )
                return
            sent = self._write(reply, request.keep_alive)
            self._server._finished(reply, sent)
        if self._eof and self._task is None and not self._queue and self._transport is not None:
            self._transport.close()

    async def _answer_later(self, reply: _Reply, keep_alive: bool) -> None:
        sent = False
        try:
            if reply.hang:
                # Never resolved: the request stays open until the client gives
                # up (closing the connection cancels this task) or the server stops.
                await asyncio.get_running_loop().create_future()
            else:
                await asyncio.sleep(reply.delay)
            sent = self._write(reply, keep_alive)
        finally:
            self._task = None
            self._server._finished(reply, sent)
        self._process()

    def _write(self, reply: _Reply, keep_alive: bool) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        head = (
            f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Unknown')}\r\n"
            f"content-type: {reply.content_type}\r\n"
            f"content-length: {len(reply.body)}\r\n"
            f"x-request-id: {reply.request_id}\r\n"
            f"{reply.extra_headers}"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        transport.write(head.encode("latin-1") + reply.body)
        if not keep_alive:
            transport.close()
        return True


# ----------------------------------------------------------------------- server


class MockOpenAIServer:
    """OpenAI-compatible test double serving Chat Completions and Responses.

    Behaviour is deterministic: when the request offers tools and the current
    turn has no tool result yet, the answer is one call to the first offered
    function tool (or the one named by ``tool_choice``; ``"none"`` disables
    calls) with arguments from :func:`synthesize_arguments`. Otherwise the
    answer is ``"echo: <last user text>"``, plus ``" | tool: <output>"`` when a
    tool result follows the last user message. ``config.reply`` replaces that
    text. A requested JSON-schema output format gets a schema-valid document.

    Use :meth:`start`/:meth:`stop` (or ``async with``) inside a running event
    loop, or :meth:`start_in_thread`/:meth:`stop_thread` (or ``with``) to run
    on a private loop in a daemon thread. :meth:`stats`, :meth:`configure` and
    :meth:`reset` are safe to call from any thread.

    Paths work with and without the ``/v1`` prefix. Requests to the control
    endpoints (``/_stats``, ``/_reset``, ``/_config``, ``/_health``) are not
    counted in the stats.
    """

    def __init__(
        self,
        config: MockOpenAIConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._config = config if config is not None else MockOpenAIConfig()
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._lock = threading.Lock()
        self._rng = random.Random(self._config.seed)
        self._stats = _Stats()
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_HTTPProtocol] = set()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Bind and start serving on the running event loop."""
        if self._server is not None:
            raise RuntimeError("server already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        server = await loop.create_server(
            lambda: _HTTPProtocol(self), self._host, self._requested_port, backlog=1024
        )
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every open connection, including hung ones."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.close()
        connections = list(self._connections)
        tasks = [c.task for c in connections if c.task is not None]
        for connection in connections:
            connection.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start_in_thread(self, timeout: float = 10.0) -> str:
        """Serve from a private event loop in a daemon thread; return the base URL."""
        if self._thread is not None or self._server is not None:
            raise RuntimeError("server already started")
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="mock-openai-server", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            raise
        self._thread = thread
        self._thread_loop = loop
        return self.url

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with :meth:`start_in_thread` and join its thread."""
        thread, loop = self._thread, self._thread_loop
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            self._thread = None
            self._thread_loop = None

    def __enter__(self) -> Self:
        self.start_in_thread()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()

    # -- public state

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL including ``/v1``, ready for ``AsyncOpenAI(base_url=...)``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    @property
    def config(self) -> MockOpenAIConfig:
        return self._config

    def configure(self, **changes: Any) -> MockOpenAIConfig:
        """Change behaviour at run time; a new ``seed`` re-seeds the generator."""
        with self._lock:
            self._config = self._config.updated(changes)
            if "seed" in changes:
                self._rng.seed(self._config.seed)
            return self._config

    def reset(self) -> None:
        """Clear the stats and re-seed the generator from ``config.seed``."""
        with self._lock:
            self._stats.clear()
            self._rng.seed(self._config.seed)

    def stats(self, include_timestamps: bool = True) -> dict[str, Any]:
        """Snapshot of what the server saw; the same document ``GET /_stats`` returns.

        Keys: ``total_requests``, ``requests_by_path`` (path as sent, query
        removed), ``requests_by_model``, ``requests_by_status`` (status codes
        as strings, so the in-process and JSON forms are identical; hung
        requests have none), ``input_tokens`` / ``output_tokens`` (as
        reported to clients), ``tool_calls``, ``errors_injected``,
        ``hung_requests``, ``connections_opened``, ``in_flight``,
        ``max_in_flight`` and ``request_timestamps`` (``time.time()`` at
        arrival, oldest dropped past 1,000,000 entries).
        """
        with self._lock:
            return self._stats.snapshot(include_timestamps)

    def max_requests_in_window(self, window_s: float = 60.0) -> int:
        """Peak number of requests that arrived within any ``window_s`` seconds."""
        with self._lock:
            stamps = list(self._stats.timestamps)
        return max_requests_in_window(stamps, window_s)

    # -- connection bookkeeping

    def _loop_or_raise(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("server not started")
        return self._loop

    def _connection_made(self, connection: _HTTPProtocol) -> None:
        self._connections.add(connection)
        with self._lock:
            self._stats.connections_opened += 1

    def _connection_lost(self, connection: _HTTPProtocol) -> None:
        self._connections.discard(connection)

    def _finished(self, reply: _Reply, sent: bool) -> None:
        if not reply.tracked:
            return
        with self._lock:
            stats = self._stats
            stats.in_flight -= 1
            if sent:
                key = str(reply.status)
                stats.by_status[key] = stats.by_status.get(key, 0) + 1
                stats.input_tokens += reply.input_tokens
                stats.output_tokens += reply.output_tokens
                stats.tool_calls += reply.tool_calls

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):08x}"

    # -- routing

    def _dispatch(self, request: _Request) -> _Reply:
        path = request.path
        if path.startswith("/_"):
            try:
                reply = self._control(request)
            except _HTTPError as exc:
                reply = _error_reply(exc.status, exc.message, exc.param)
            reply.request_id = f"req_{self._next_id()}"
            return reply

        now = time.time()
        with self._lock:
            stats = self._stats
            stats.total_requests += 1
            stats.by_path[path] = stats.by_path.get(path, 0) + 1
            stats.timestamps.append(now)
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)

        route = path[3:] if path.startswith("/v1/") else path
        if len(route) > 1:
            route = route.rstrip("/")
        try:
            if route in ("/chat/completions", "/responses"):
                if request.method != "POST":
                    raise _HTTPError(405, f"{request.method} is not allowed on {path}")
                reply = self._generate(request, route == "/responses", now)
            elif route == "/models":
                if request.method != "GET":
                    raise _HTTPError(405, f"{request.method} is not allowed on {path}")
                models = [_model_object(name) for name in MODEL_IDS]
                reply = _json_reply(200, {"object": "list", "data": models})
            elif route.startswith("/models/") and request.method == "GET":
                reply = _json_reply(200, _model_object(route[len("/models/") :]))
            else:
                raise _HTTPError(404, f"Invalid URL ({request.method} {path})")
        except _HTTPError as exc:
            reply = _error_reply(exc.status, exc.message, exc.param)
        except Exception:
            logger.exception("mock OpenAI server failed to answer %s %s", request.method, path)
            reply = _error_reply(500, "The mock server failed while processing your request.")
        reply.tracked = True
        reply.request_id = f"req_{self._next_id()}"
        return reply

    def _control(self, request: _Request) -> _Reply:
        route = request.path.rstrip("/")
        method = request.method
        if route == "/_stats" and method == "GET":
            flags = parse_qs(request.query).get("timestamps", ["1"])
            include = flags[-1].lower() not in ("0", "false", "no")
            return _json_reply(200, self.stats(include_timestamps=include))
        if route == "/_reset" and method == "POST":
            self.reset()
            return _json_reply(200, {"ok": True})
        if route == "/_config" and method == "GET":
            return _json_reply(200, self._config.to_dict())
        if route == "/_config" and method == "POST":
            changes = _json_object(request.body) if request.body.strip() else {}
            try:
                config = self.configure(**changes)
            except (TypeError, ValueError) as exc:
                raise _HTTPError(400, str(exc)) from exc
            return _json_reply(200, config.to_dict())
        if route == "/_health" and method == "GET":
            return _json_reply(200, {"ok": True})
        raise _HTTPError(404, f"Invalid URL ({method} {request.path})")

    # -- model endpoints

    def _generate(self, request: _Request, responses_api: bool, now: float) -> _Reply:
        body = _json_object(request.body)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _HTTPError(400, "you must provide a model parameter", "model")

        config = self._config
        failure: int | None = None
        hang = False
        with self._lock:
            stats = self._stats
            stats.by_model[model] = stats.by_model.get(model, 0) + 1
            rng = self._rng
            if model in config.fail_models:
                failure = 500
            elif config.error_rate > 0 and rng.random() < config.error_rate:
                failure = rng.choice(config.error_statuses)
            elif config.hang_rate > 0 and rng.random() < config.hang_rate:
                hang = True
            delay = config.latency_ms / 1000.0
            if config.latency_jitter_ms > 0:
                delay += rng.random() * config.latency_jitter_ms / 1000.0
            if failure is not None:
                stats.errors_injected += 1
            if hang:
                stats.hung_requests += 1

        if hang:
            return _Reply(200, b"", hang=True)
        if failure is not None:
            reply = _injected_error(failure, model, config)
            reply.delay = delay
            return reply

        stream = body.get("stream") is True
        rid = self._next_id()
        if responses_api:
            reply = _responses_reply(
                body, model=model, config=config, rid=rid, now=now, stream=stream
            )
        else:
            reply = _chat_reply(body, model=model, config=config, rid=rid, now=now, stream=stream)
        reply.delay = delay
        return reply


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HTTPError(400, "We could not parse the JSON body of your request.") from exc
    if not isinstance(value, dict):
        raise _HTTPError(400, "The request body must be a JSON object.")
    return value


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "agentq-mock"}


def _injected_error(status: int, model: str, config: MockOpenAIConfig) -> _Reply:
    extra = ""
    if status == 429:
        message = f"Rate limit reached for {model} (injected by the mock server)."
        if config.retry_after is not None:
            extra = f"retry-after: {config.retry_after:g}\r\n"
    elif model in config.fail_models:
        message = f"The model `{model}` is configured to fail on the mock server."
    else:
        message = f"Injected HTTP {status} from the mock server."
    return _error_reply(status, message, extra_headers=extra)


_SSE_CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"


def _counted(reply: _Reply, config: MockOpenAIConfig, tool_calls: int) -> _Reply:
    reply.input_tokens = config.input_tokens
    reply.output_tokens = config.output_tokens
    reply.tool_calls = tool_calls
    return reply


def _sse(payload: Any) -> str:
    return f"data: {_dumps(payload)}\n\n"


def _chat_reply(
    body: Mapping[str, Any],
    *,
    model: str,
    config: MockOpenAIConfig,
    rid: str,
    now: float,
    stream: bool,
) -> _Reply:
    turn = _scan_chat(body.get("messages"))
    tool = None
    if turn.tool_output is None:
        tool = _pick_tool(_chat_tools(body), body.get("tool_choice"))
    usage = {
        "prompt_tokens": config.input_tokens,
        "completion_tokens": config.output_tokens,
        "total_tokens": config.input_tokens + config.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    completion_id = f"chatcmpl-{rid}"
    created = int(now)
    text: str | None = None
    tool_call: dict[str, Any] | None = None
    if tool is not None:
        arguments = _dumps(synthesize_arguments(tool[1], turn.user_text))
        tool_call = {
            "id": f"call_{rid}",
            "type": "function",
            "function": {"name": tool[0], "arguments": arguments},
        }
        finish_reason = "tool_calls"
    else:
        text = _final_text(config, turn, _requested_format(body.get("response_format")))
        finish_reason = "stop"

    tool_calls = 1 if tool_call is not None else 0
    if not stream:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if tool_call is not None:
            message["tool_calls"] = [tool_call]
        else:
            message["annotations"] = []
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": None,
        }
        return _counted(_Reply(200, _dumps(payload).encode()), config, tool_calls)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
        )

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    if tool_call is not None:
        function = tool_call["function"]
        events.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": tool_call["id"],
                            "type": "function",
                            "function": {"name": function["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        events.append(
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": function["arguments"]}}]})
        )
    else:
        events.extend(chunk({"content": piece}) for piece in _pieces(text or ""))
    events.append(chunk({}, finish_reason))
    events.append(
        _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [],
                "usage": usage,
            }
        )
    )
    events.append("data: [DONE]\n\n")
    stream_reply = _Reply(200, "".join(events).encode(), content_type=_SSE_CONTENT_TYPE)
    return _counted(stream_reply, config, tool_calls)


def _responses_reply(
    body: Mapping[str, Any],
    *,
    model: str,
    config: MockOpenAIConfig,
    rid: str,
    now: float,
    stream: bool,
) -> _Reply:
    turn = _scan_responses(body.get("input"))
    tool = None
    if turn.tool_output is None:
        tool = _pick_tool(_responses_tools(body), body.get("tool_choice"))
    text_param = body.get("text")
    fmt = _requested_format(text_param.get("format")) if isinstance(text_param, Mapping) else None

    item: dict[str, Any]
    if tool is not None:
        item = {
            "type": "function_call",
            "id": f"fc_{rid}",
            "call_id": f"call_{rid}",
            "name": tool[0],
            "arguments": _dumps(synthesize_arguments(tool[1], turn.user_text)),
            "status": "completed",
        }
    else:
        item = {
            "type": "message",
            "id": f"msg_{rid}",
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": _final_text(config, turn, fmt),
                    "annotations": [],
                    "logprobs": [],
                }
            ],
        }
    usage = {
        "input_tokens": config.input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": config.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": config.input_tokens + config.output_tokens,
    }
    response: dict[str, Any] = {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": int(now),
        "status": "completed",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": model,
        "output": [item],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": text_param if isinstance(text_param, Mapping) else {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": body.get("user"),
    }
    tool_calls = 1 if tool is not None else 0
    if not stream:
        return _counted(_Reply(200, _dumps(response).encode()), config, tool_calls)
    stream_reply = _Reply(200, _responses_events(response).encode(), content_type=_SSE_CONTENT_TYPE)
    return _counted(stream_reply, config, tool_calls)


def _responses_events(response: dict[str, Any]) -> str:
    out: list[str] = []
    sequence = itertools.count()

    def emit(event: dict[str, Any]) -> None:
        event["sequence_number"] = next(sequence)
        out.append(f"event: {event['type']}\ndata: {_dumps(event)}\n\n")

    pending = {**response, "status": "in_progress", "output": [], "usage": None}
    emit({"type": "response.created", "response": pending})
    emit({"type": "response.in_progress", "response": pending})
    for index, item in enumerate(response["output"]):
        item_id = item["id"]
        if item["type"] == "message":
            part = item["content"][0]
            text = part["text"]
            emit(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "status": "in_progress", "content": []},
                }
            )
            where = {"item_id": item_id, "output_index": index, "content_index": 0}
            emit(
                {
                    "type": "response.content_part.added",
                    **where,
                    "part": {**part, "text": ""},
                }
            )
            for piece in _pieces(text):
                emit(
                    {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
                )
            emit({"type": "response.output_text.done", **where, "text": text, "logprobs": []})
            emit({"type": "response.content_part.done", **where, "part": part})
        else:
            emit(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "status": "in_progress", "arguments": ""},
                }
            )
            emit(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": item_id,
                    "output_index": index,
                    "delta": item["arguments"],
                }
            )
            emit(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item_id,
                    "output_index": index,
                    "name": item["name"],
                    "arguments": item["arguments"],
                }
            )
        emit({"type": "response.output_item.done", "output_index": index, "item": item})
    emit({"type": "response.completed", "response": response})
    return "".join(out)


# -------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agentq.testing",
        description="Serve an OpenAI-compatible mock model until SIGTERM/SIGINT.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to bind; 0 picks a free one (default: 0)"
    )
    defaults = MockOpenAIConfig()
    for spec in dataclasses.fields(MockOpenAIConfig):
        default = getattr(defaults, spec.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if isinstance(default, frozenset):
            shown = ",".join(sorted(default)) or "none"
        elif default is None:
            shown = "none"
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            dest=spec.name,
            type=_FIELD_PARSERS[spec.name],
            default=None,
            help=f"{spec.metadata['help']} (default: {shown})",
        )
    return parser


async def _serve(config: MockOpenAIConfig, host: str, port: int) -> int:
    server = MockOpenAIServer(config, host=host, port=port)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    sys.stdout.write(f"listening {server.url}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    changes = {
        spec.name: getattr(args, spec.name)
        for spec in dataclasses.fields(MockOpenAIConfig)
        if getattr(args, spec.name) is not None
    }
    try:
        config = MockOpenAIConfig.from_mapping(changes)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(config, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
