"""One transform's steps in order, the same for the proxy, the shadow and the CLI.

A `Transform` from the rule file has up to three parts: a format conversion
each way (`request`, `response`) and a JSON field map each way (`body`). The
map always works on the JSON form of the body: after `xml_to_json`, before
`json_to_xml`. Which bodies convert at all is decided from their
`Content-Type` media type (`accepts`), never from a substring of it, so a
multipart upload whose boundary happens to contain "xml" is left alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from strangler.transforms.xml_json import (
    TRANSFORMS,
    content_type_for,
    reads_content_type,
)

if TYPE_CHECKING:
    from strangler.model import Transform
    from strangler.transforms.body_map import BodyMap

__all__ = [
    "accepts",
    "convert_request",
    "convert_response",
    "converts_request",
    "converts_response",
    "converts_responses",
    "request_content_type",
    "response_content_type",
]

# What a body map reads and writes, named after the conversion that reads JSON.
_JSON_INPUT = "json_to_xml"


def accepts(name: str, content_type: bytes | None) -> bool:
    """Whether a body of this type is what the transform called `name` reads.

    The media type decides (`application/xml`, `text/xml`, `*+xml`;
    `application/json`, `*+json`), parameters aside. A body with no
    `Content-Type` is converted too, because old clients often omit it.
    """
    if not content_type or not content_type.strip():
        return True
    return reads_content_type(name, content_type)


def converts_request(transform: Transform, content_type: bytes | None) -> bool:
    """Whether a request body with this `Content-Type` must be held and converted."""
    maps = transform.body
    return _converts(transform.request, maps.request if maps else None, content_type)


def converts_response(transform: Transform, content_type: bytes | None) -> bool:
    """Whether a response body with this `Content-Type` must be held and converted."""
    maps = transform.body
    return _converts(transform.response, maps.response if maps else None, content_type)


def _converts(
    name: str | None, body_map: BodyMap | None, content_type: bytes | None
) -> bool:
    """A conversion reads its own media type; a body map alone reads JSON."""
    if name is not None:
        return accepts(name, content_type)
    return body_map is not None and accepts(_JSON_INPUT, content_type)


def converts_responses(transform: Transform) -> bool:
    """Whether the transform changes response bodies at all."""
    maps = transform.body
    return transform.response is not None or (
        maps is not None and maps.response is not None
    )


def convert_request(transform: Transform, body: bytes) -> bytes:
    """The request body as the upstream should get it; raises `TransformError`."""
    maps = transform.body
    return _convert(transform.request, maps.request if maps else None, body)


def convert_response(transform: Transform, body: bytes) -> bytes:
    """The response body as the client should get it; raises `TransformError`."""
    maps = transform.body
    return _convert(transform.response, maps.response if maps else None, body)


def _convert(name: str | None, body_map: BodyMap | None, body: bytes) -> bytes:
    """Run a conversion and a body map, the map always on the JSON side."""
    if body_map is not None and name == _JSON_INPUT:
        body = body_map.apply_body(body)
        body_map = None
    if name is not None:
        body = TRANSFORMS[name](body)
    if body_map is not None:
        body = body_map.apply_body(body)
    return body


def request_content_type(transform: Transform) -> bytes:
    """The `Content-Type` of a converted request body."""
    return content_type_for(transform.request or "xml_to_json")


def response_content_type(transform: Transform) -> bytes:
    """The `Content-Type` of a converted response body."""
    return content_type_for(transform.response or "xml_to_json")
