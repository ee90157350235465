"""The shadow's own `transform`, applied the way the proxy applies a branch's.

A copy's request body is converted with the shadow's `transform` (format
conversion, then the JSON field map), and the answers are converted back
before comparing: the shadow's with the shadow's transform and a repeated
primary request's with its branch's, so each is compared in the form the
client would have received. Which bodies convert follows the proxy: one
whose `Content-Type` names the transform's input, or has none.
"""

from __future__ import annotations

from strangler.model import Transform
from strangler.proxy.exchange import accepts
from strangler.shadow.compare import CAPTURE_LIMIT, Answer, decoded
from strangler.transforms.xml_json import TRANSFORMS, content_type_for

__all__ = ["convert_answer", "convert_request"]

_REPLACED = (b"content-type", b"content-length", b"content-encoding")


def convert_request(
    transform: Transform | None, body: bytes, content_type: bytes | None
) -> tuple[bytes, bytes | None]:
    """The copy's body and its new `Content-Type` (None when unchanged).

    Raises `TransformError` when the body should convert but does not.
    """
    if transform is None or not body:
        return body, None
    if transform.request is not None:
        if not accepts(transform.request, content_type):
            return body, None
        body = TRANSFORMS[transform.request](body)
    elif transform.body is None or not accepts("json_to_xml", content_type):
        return body, None
    if transform.body is not None:
        body = transform.body.apply_body(body)
    return body, content_type_for(transform.request or "xml_to_json")


def convert_answer(answer: Answer, transform: Transform | None) -> Answer:
    """`answer` as the client would get it through `transform`.

    Raises `TransformError` when the body should convert but does not. A
    body too large to hold is left as it is (it is compared by hash anyway).
    """
    if transform is None or answer.status in (204, 304) or answer.body is None:
        return answer
    content_type = answer.header(b"content-type")
    if transform.response is not None:
        if not accepts(transform.response, content_type):
            return answer
    elif (
        transform.body is None
        or not transform.body.reversible
        or not accepts("json_to_xml", content_type)
    ):
        return answer
    body = decoded(answer, CAPTURE_LIMIT)
    if body is None:
        return answer

    if transform.body is not None and transform.body.reversible:
        body = transform.body.reverse().apply_body(body)
    if transform.response is not None:
        body = TRANSFORMS[transform.response](body)
    headers = [(n, v) for n, v in answer.headers if n.lower() not in _REPLACED]
    headers.append(
        (b"Content-Type", content_type_for(transform.response or "xml_to_json"))
    )
    return Answer(answer.status, headers, body)
