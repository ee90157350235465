"""Responses the gateway writes itself: short JSON errors, never a traceback."""

from __future__ import annotations

import orjson

REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def error_response(
    status: int,
    error: str,
    message: str,
    request_id: str | None = None,
    close: bool = False,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A complete HTTP/1.1 response with a small JSON body describing the error."""
    payload: dict[str, object] = {"error": error, "message": message}
    if request_id is not None:
        payload["request_id"] = request_id
    body = orjson.dumps(payload) + b"\n"
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
        b"Content-Type: application/json\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
    ]
    if request_id is not None:
        lines.append(b"X-Request-Id: %s\r\n" % request_id.encode("ascii"))
    for name, value in extra_headers or ():
        lines.append(name + b": " + value + b"\r\n")
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)
