"""Which headers cross the gateway, and what the gateway adds on the way.

Headers are kept as the `(name, value)` byte pairs the parser produced, in
the order received, so repeated headers (`Set-Cookie`) and the client's
spelling of names survive. Hop-by-hop headers describe one connection and
never cross; framing headers (`Content-Length`, `Transfer-Encoding`) are
dropped here and written again by whoever decides the outgoing framing.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Iterable

from strangler.model import Network

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)

# Names no header-edit rule may set, add or remove: framing, hop-by-hop, the
# Host the upstream routes on, and the headers the gateway writes itself.
_MANAGED = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)

_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{8,128}$")
_REQUEST_ID_PREFIX = os.urandom(6).hex()
_request_counter = itertools.count(1)


def new_request_id() -> str:
    """A unique id: a random per-process prefix plus a counter (cheap, no clash)."""
    return f"{_REQUEST_ID_PREFIX}-{next(_request_counter):x}"


def valid_request_id(value: bytes) -> bool:
    """A client-sent id is kept only when it is short, plain and printable."""
    return _VALID_REQUEST_ID.match(value) is not None


def connection_tokens(headers: Headers) -> set[bytes]:
    """Lower-cased header names listed in every `Connection` header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def end_to_end(headers: Headers, also_drop: Iterable[bytes] = ()) -> Headers:
    """The headers that cross a hop: without hop-by-hop ones and those `also_drop`."""
    drop = connection_tokens(headers)
    drop.update(also_drop)
    kept = []
    for pair in headers:
        lowered = pair[0].lower()
        if lowered in HOP_BY_HOP or lowered in drop or lowered.startswith(b"proxy-"):
            continue
        kept.append(pair)
    return kept


def gateway_managed(lname: bytes) -> bool:
    """Whether a lower-case header name is one the gateway alone decides.

    `_` counts as `-`: CGI, WSGI and PHP read both spellings as the same
    variable, so `X_Request_Id` must not pass where `X-Request-Id` may not.
    """
    name = lname.replace(b"_", b"-")
    return name in _MANAGED or name.startswith((b"proxy-", b"x-strangler-"))


def is_trusted(peer_host: str, trusted: tuple[Network, ...]) -> bool:
    """Whether forwarding headers from this peer may be believed."""
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer_host)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def serialize(headers: Headers) -> list[bytes]:
    """Wire form pieces of a header list, ready for `b"".join`."""
    out = []
    for name, value in headers:
        out.append(name)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    return out
