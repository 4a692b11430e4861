"""The worker's OpenAI client: ``AsyncOpenAI`` with a cheaper request path for the Responses API.

Before every ``responses.create`` call, ``openai`` walks the request against its ``TypedDict``
declarations (``maybe_transform``) to rename aliased keys, format dates and files, dump
pydantic models and drop omitted values. For the Agents SDK's requests that walk is about a
quarter of a run's CPU, and for the Responses API it only ever does the last two: no field of
``ResponseCreateParams`` carries an alias or a format. :class:`ModelClient` builds the same
JSON body with a plain structural walk instead, and checks once per process, against the
installed ``openai``, that the declarations still need nothing more; if they do, it uses
``openai``'s own transform. Everything after the body (headers, retries, timeouts, response
parsing, streaming) is ``openai``'s own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
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


def _declares_rewrites(declared: Any, seen: set[Any]) -> bool:
    """Whether any field reachable from ``declared`` has an alias or a format to apply."""
    from openai._utils._transform import PropertyInfo  # the transform's own marker

    if typing.get_origin(declared) is typing.Annotated:
        for marker in typing.get_args(declared)[1:]:
            if isinstance(marker, PropertyInfo) and (
                marker.alias is not None or marker.format is not None
            ):
                return True
    if typing.is_typeddict(declared):
        if declared in seen:
            return False
        seen.add(declared)
        hints = typing.get_type_hints(declared, include_extras=True)
        return any(_declares_rewrites(hint, seen) for hint in hints.values())
    return any(
        _declares_rewrites(arg, seen)
        for arg in typing.get_args(declared)
        if not isinstance(arg, (str, int, bool, bytes)) and arg is not None
    )


@functools.cache
def responses_body_is_structural() -> bool:
    """True when the installed ``openai`` declares no alias or format in a Responses request."""
    seen: set[Any] = set()
    return not any(
        _declares_rewrites(params, seen)
        for params in (
            response_create_params.ResponseCreateParamsNonStreaming,
            response_create_params.ResponseCreateParamsStreaming,
        )
    )


def _request_options(options: dict[str, Any]) -> Any:
    from openai._base_client import make_request_options

    if _names_security():
        return make_request_options(**options, security={"bearer_auth": True})
    return make_request_options(**options)


@functools.cache
def _names_security() -> bool:
    from openai._base_client import make_request_options

    return "security" in inspect.signature(make_request_options).parameters


class PlainResponses(AsyncResponses):
    """``client.responses`` whose ``create`` builds its body with :func:`plain_body`."""

    async def create(self, **kwargs: Any) -> Any:
        if not responses_body_is_structural():
            return await super().create(**kwargs)
        options = {name: kwargs.pop(name) for name in _REQUEST_OPTIONS if name in kwargs}
        stream = kwargs.get("stream")
        return await self._post(
            "/responses",
            body=plain_body(kwargs),
            options=_request_options(options),
            cast_to=Response,
            stream=bool(stream) if not isinstance(stream, (Omit, NotGiven)) else False,
            stream_cls=AsyncStream[ResponseStreamEvent],
        )


class ModelClient(AsyncOpenAI):
    """``AsyncOpenAI`` whose Responses requests skip the type-directed transform."""

    @functools.cached_property
    def responses(self) -> AsyncResponses:
        return PlainResponses(self)
