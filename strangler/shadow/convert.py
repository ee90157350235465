"""The shadow's own `transform`, applied the way the proxy applies a branch's.

A copy's request body is converted with the shadow's `transform` (format
conversion and JSON field map), and the answers are converted back
before comparing: the shadow's with the shadow's transform and a repeated
primary request's with its branch's, so each is compared in the form the
client would have received. Which bodies convert follows the proxy
(`strangler.transforms.pipeline`): one whose media type is the
transform's input, or that has no `Content-Type`.
"""

from __future__ import annotations

from strangler.model import Transform
from strangler.shadow.compare import CAPTURE_LIMIT, Answer, decoded
from strangler.transforms import pipeline

__all__ = ["convert_answer", "convert_request"]

_REPLACED = (b"content-type", b"content-length", b"content-encoding")


def convert_request(
    transform: Transform | None, body: bytes, content_type: bytes | None
) -> tuple[bytes, bytes | None]:
    """The copy's body and its new `Content-Type` (None when unchanged).

    Raises `TransformError` when the body should convert but does not.
    """
    if (
        transform is None
        or not body
        or not pipeline.converts_request(transform, content_type)
    ):
        return body, None
    return pipeline.convert_request(transform, body), pipeline.request_content_type(
        transform
    )


def convert_answer(answer: Answer, transform: Transform | None) -> Answer:
    """`answer` as the client would get it through `transform`.

    Raises `TransformError` when the body should convert but does not. A
    body too large to hold is left as it is (it is compared by hash anyway).
    """
    if transform is None or answer.status in (204, 304) or answer.body is None:
        return answer
    if not pipeline.converts_response(transform, answer.header(b"content-type")):
        return answer
    body = decoded(answer, CAPTURE_LIMIT)
    if body is None:
        return answer

    body = pipeline.convert_response(transform, body)
    headers = [(n, v) for n, v in answer.headers if n.lower() not in _REPLACED]
    headers.append((b"Content-Type", pipeline.response_content_type(transform)))
    return Answer(answer.status, headers, body)
