"""The path policy: what the upstream receives, and the spelling routes match.

A path has two forms here. The *wire* form is what the upstream receives:
the client's bytes, with only the changes that decide which resource an
upstream acts on made for it, so the gateway and the upstream cannot read
the path differently:

- `.` and `..` segments, also spelled `%2e`, are resolved; `..` above the
  root is refused.
- Empty segments are merged (`//a///b` -> `/a/b`), as NGINX does for
  routing and as Tomcat, Jetty and Werkzeug do before their own; a
  trailing `/` is kept.

Everything else is passed as sent: percent-escapes (not decoded, their case
kept), `;parameters`, and the query string.

The *routing* form is the wire form as an upstream reads it, and is what
routes, rewrites and the access log see:

- escapes of unreserved characters (letters, digits, `-._~`) are decoded
  (RFC 3986 makes `%41` and `A` the same), other escapes upper-cased;
- `;parameters` are left out of every segment, the way servlet containers
  map a path (`/admin;x/y` routes as `/admin/y`), so they cannot carry a
  request past a route.

Refused, because no spelling is safe for every upstream: a raw backslash,
a byte outside printable ASCII, an escape of a control character (`%00`-
`%1F`, `%7F`), a broken escape (`%G1`, `%4`), a double-encoded dot, slash
or backslash (`%252e`), a `%2F` or `%5C` next to a dot segment
(`a%2F..%2Fb`), and a dot segment with parameters (`..;x`, which Tomcat
reads as `..`). Refusals raise `PathError`, which the proxy answers with
400. docs/security.md lists every case.
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strangler.model import Rewrite

__all__ = ["PathError", "normalise_path", "routing_path"]


class PathError(ValueError):
    """A request path that cannot be normalised safely."""


_UNRESERVED = frozenset((string.ascii_letters + string.digits + "-._~").encode())
# Characters a path may carry as they are (RFC 3986 pchar plus "/").
_ALLOWED = (string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%").encode()
# The subset that needs no second look: no escapes, no parameters.
_PLAIN = (string.ascii_letters + string.digits + "-._~!$&'()*+,=:@/").encode()
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DOTS = (b".", b"..")
_ENCODED_SEPARATOR = re.compile(rb"%2F|%5C")
_DOUBLE_ENCODED = re.compile(rb"%25(?:2e|2f|5c)", re.IGNORECASE)


def normalise_path(raw: bytes) -> bytes:
    """The wire form of `raw` (which starts with `/`), or `PathError`.

    A path that needs nothing is returned as the same object, and only a
    path without escapes or `;parameters` is: its routing form is itself.
    """
    if not raw.translate(None, _PLAIN) and b"//" not in raw and b"/." not in raw:
        return raw
    return _normalise(raw)


def routing_path(wire: bytes) -> bytes:
    """The routing form of a wire-form path (same object when it has no `%`/`;`)."""
    if b"%" not in wire and b";" not in wire:
        return wire
    names = []
    for segment in wire.split(b"/")[1:]:
        name = segment.partition(b";")[0]
        if b"%" in name:
            name = _decode_unreserved(name)
        if name:
            names.append(name)
    if not names:
        return b"/"
    trailing = not wire.rpartition(b"/")[2].partition(b";")[0]
    return b"/" + b"/".join(names) + (b"/" if trailing else b"")


def rewrite_path(rewrite: Rewrite, wire: bytes, routed: str) -> bytes:
    """The path after `rewrite`, keeping the client's spelling where it can.

    The rewrite is applied to the wire form when it matches there, so escapes
    and `;parameters` past a prefix survive; otherwise to the routing form
    `routed`, which is what the rule was written against.
    """
    sent = wire.decode("latin-1")
    rewritten = rewrite.apply(sent)
    if rewritten == sent and sent != routed:
        rewritten = rewrite.apply(routed)
    return rewritten.encode("latin-1")


def _normalise(raw: bytes) -> bytes:
    bad = raw.translate(None, _ALLOWED)
    if bad:
        raise PathError(
            f"the path has a character that must be percent-encoded: {_show(bad[:1])}"
        )
    if _DOUBLE_ENCODED.search(raw):
        raise PathError("the path has a double-encoded dot, slash or backslash")

    kept: list[bytes] = []
    trailing = False
    for segment in raw.split(b"/")[1:]:
        decoded = _decode_unreserved(segment) if b"%" in segment else segment
        name, params, _ = decoded.partition(b";")
        trailing = not segment or name in _DOTS
        if name in _DOTS:
            if params:
                raise PathError("the path has a dot segment with ;parameters")
            if name == b"..":
                if not kept:
                    raise PathError("the path climbs above the root with '..'")
                kept.pop()
        elif segment:
            if b"%" in decoded and _ENCODED_SEPARATOR.search(decoded):
                pieces = _ENCODED_SEPARATOR.split(decoded)
                if any(piece.partition(b";")[0] in _DOTS for piece in pieces):
                    raise PathError(
                        "the path hides a dot segment behind an encoded slash"
                    )
            kept.append(segment)

    if not kept:
        return b"/"
    return b"/" + b"/".join(kept) + (b"/" if trailing else b"")


def _decode_unreserved(segment: bytes) -> bytes:
    """Decode escapes of unreserved characters, upper-case the others, check all."""
    out = bytearray()
    i = 0
    end = len(segment)
    while i < end:
        byte = segment[i]
        if byte != 0x25:  # "%"
            out.append(byte)
            i += 1
            continue
        pair = segment[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise PathError(
                f"the path has a broken %-escape: {_show(segment[i : i + 3])}"
            )
        value = int(pair, 16)
        if value < 0x20 or value == 0x7F:
            raise PathError(
                f"the path has an escaped control character: %{pair.decode()}"
            )
        if value in _UNRESERVED:
            out.append(value)
        else:
            out += b"%" + pair.upper()
        i += 3
    return bytes(out)


def _show(value: bytes) -> str:
    return repr(value.decode("latin-1"))
