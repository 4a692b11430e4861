"""The worker's OpenAI client: ``AsyncOpenAI`` with a cheaper path for Responses API calls.

Before every ``responses.create`` call, ``openai`` walks the request against its ``TypedDict``
declarations (``maybe_transform``) to rename aliased keys, format dates and files, dump
pydantic models and drop omitted values. For the Agents SDK's requests that walk is about a
quarter of a run's CPU, and for the Responses API it only ever does the last two: no field of
``ResponseCreateParams`` carries an alias or a format. :class:`ModelClient` builds the same
JSON body with a plain structural walk instead, and checks once per process, against the
installed ``openai``, that the declarations still need nothing more; if they do, it uses
``openai``'s own transform.

On the way back, ``openai`` builds the ``Response`` model field by field in Python
(``construct_type``), about a tenth of a run's CPU; pydantic's compiled validator builds the
same model in a fifth of the time. :class:`ModelClient` validates a ``Response`` that way and
falls back to ``openai``'s construction when the body does not validate (a compatible server
that leaves out a field ``openai`` declares required, or a newer API than the installed
``openai`` knows). Headers, retries, timeouts, errors and streaming stay ``openai``'s own.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import secrets
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pydantic
import typing_extensions as typing
from openai import AsyncOpenAI, AsyncStream, NotGiven, Omit
from openai.resources.responses import AsyncResponses
from openai.types.responses import Response, ResponseStreamEvent, response_create_params

# Arguments of ``create`` that configure the request rather than form its body.
_REQUEST_OPTIONS = ("extra_headers", "extra_query", "extra_body", "timeout")
_SCALARS = (str, int, float, bool, type(None))


def plain_body(value: Any) -> Any:
    """``value`` as ``openai``'s transform leaves it when no field is aliased or formatted.

    Omitted values (``omit``, ``NOT_GIVEN``) are dropped from mappings, pydantic models are
    dumped as the transform dumps them, and other iterables become lists.
    """
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Mapping):
        return {
            key: plain_body(item)
            for key, item in value.items()
            if not isinstance(item, (Omit, NotGiven))
        }
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(
            mode="json", exclude_unset=True, exclude=getattr(value, "__api_exclude__", None)
        )
    if isinstance(value, (bytes, bytearray)):
        return value
    if isinstance(value, Iterable):
        return [plain_body(item) for item in value]
    return value


def _declares_rewrites(declared: Any, seen: set[Any], marker: type) -> bool:
    """Whether any field reachable from ``declared`` has an alias or a format to apply."""
    if typing.get_origin(declared) is typing.Annotated:
        for found in typing.get_args(declared)[1:]:
            if isinstance(found, marker) and (
                getattr(found, "alias", None) is not None
                or getattr(found, "format", None) is not None
            ):
                return True
    if typing.is_typeddict(declared):
        if declared in seen:
            return False
        seen.add(declared)
        hints = typing.get_type_hints(declared, include_extras=True)
        return any(_declares_rewrites(hint, seen, marker) for hint in hints.values())
    return any(
        _declares_rewrites(arg, seen, marker)
        for arg in typing.get_args(declared)
        if not isinstance(arg, (str, int, bool, bytes)) and arg is not None
    )


@functools.cache
def responses_body_is_structural() -> bool:
    """True when the installed ``openai`` declares no alias or format in a Responses request.

    Also False when ``openai``'s internals that the plain path relies on have moved: the
    plain path then steps aside rather than guess.
    """
    try:
        from openai._base_client import make_request_options  # noqa: F401
        from openai._utils._transform import PropertyInfo
    except ImportError:
        return False
    seen: set[Any] = set()
    return not any(
        _declares_rewrites(params, seen, PropertyInfo)
        for params in (
            response_create_params.ResponseCreateParamsNonStreaming,
            response_create_params.ResponseCreateParamsStreaming,
        )
    )


def _request_options(options: dict[str, Any]) -> Any:
    from openai._base_client import make_request_options

    return make_request_options(**options, **_security())


@functools.cache
def _security() -> dict[str, Any]:
    """The bearer-auth option ``create`` passes, where this ``openai`` knows it."""
    from openai._base_client import make_request_options

    if "security" in inspect.signature(make_request_options).parameters:
        return {"security": {"bearer_auth": True}}
    return {}


class PlainResponses(AsyncResponses):
    """``client.responses`` whose ``create`` builds its body with :func:`plain_body`."""

    async def create(self, **kwargs: Any) -> Any:
        if not responses_body_is_structural():
            return await super().create(**kwargs)
        options = {name: kwargs.pop(name) for name in _REQUEST_OPTIONS if name in kwargs}
        return await self._post(
            "/responses",
            body=plain_body(kwargs),
            options=_request_options(options),
            cast_to=Response,
            # ``omit`` and ``NOT_GIVEN`` are false, as openai's own ``stream or False`` relies on.
            stream=bool(kwargs.get("stream")),
            stream_cls=AsyncStream[ResponseStreamEvent],
        )


class ModelClient(AsyncOpenAI):
    """``AsyncOpenAI`` whose Responses calls skip the type-directed transform and construction."""

    @functools.cached_property
    def responses(self) -> AsyncResponses:
        return PlainResponses(self)

    @functools.cached_property
    def _idempotency_prefix(self) -> str:
        return f"stainless-python-retry-{secrets.token_hex(8)}-"

    @functools.cached_property
    def _idempotency_counter(self) -> Iterator[int]:
        return itertools.count()

    def _idempotency_key(self) -> str:
        # openai makes a key per request from uuid4, a system call each time, to reuse across
        # its own retries; a random prefix per client and a counter are as unique.
        return f"{self._idempotency_prefix}{next(self._idempotency_counter)}"

    def _process_response_data(self, *, data: object, cast_to: Any, response: Any) -> Any:
        if cast_to is Response and isinstance(data, dict):
            try:
                return Response.model_validate(data)
            except pydantic.ValidationError:
                pass
        return super()._process_response_data(data=data, cast_to=cast_to, response=response)
