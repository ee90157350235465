"""Finding the key that keeps one user on one side of a split.

The key only decides which branch a request takes; it never grants access.
A `jwt_claim` key is therefore read from the token's payload without
verifying the signature here: verification belongs to the auth layer, and a
forged claim can do no more than pick a branch the route already offers.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable

import orjson

from strangler.model import Sticky

HeaderLookup = Callable[[bytes], "bytes | None"]


def sticky_key(sticky: Sticky, header: HeaderLookup, client_ip: str) -> str | None:
    """The request's sticky key, or None when it carries none."""
    by = sticky.by
    if by == "header":
        value = header(sticky.name.lower().encode("latin-1"))
        return value.decode("latin-1") if value else None
    if by == "cookie":
        return cookie_value(header(b"cookie"), sticky.name)
    if by == "ip":
        return client_ip
    if by == "jwt_claim":
        return _jwt_claim(header(b"authorization"), sticky.name)
    return None


def cookie_value(cookie_header: bytes | None, name: str) -> str | None:
    """One cookie's value from a `Cookie` header, or None."""
    if not cookie_header:
        return None
    wanted = name.encode("latin-1")
    for part in cookie_header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == wanted and value:
            return value.strip(b'"').decode("latin-1")
    return None


def new_cookie_key() -> str:
    """A fresh random key for a browser that arrived without the sticky cookie."""
    return os.urandom(12).hex()


def set_cookie_header(sticky: Sticky, key: str) -> tuple[bytes, bytes]:
    """The `Set-Cookie` that keeps a browser on the branch it was given."""
    value = (
        f"{sticky.name}={key}; Path=/; Max-Age={int(sticky.cookie_ttl)}; "
        "HttpOnly; SameSite=Lax"
    )
    return b"Set-Cookie", value.encode("latin-1")


def _jwt_claim(authorization: bytes | None, claim: str) -> str | None:
    if not authorization or authorization[:7].lower() != b"bearer ":
        return None
    parts = authorization[7:].strip().split(b".")
    if len(parts) != 3:
        return None
    payload = parts[1] + b"=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    value = claims.get(claim) if isinstance(claims, dict) else None
    if value is None or isinstance(value, dict | list):
        return None
    return str(value)
