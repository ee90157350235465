"""The path normalisation policy: one spelling of a path for routing and upstream.

Routes match the normalised path and the upstream receives that same path,
so a spelling the gateway and an upstream would read differently cannot
slip past a route. The policy (docs/security.md has every case):

- `%XX` escapes of unreserved characters (letters, digits, `-._~`) are
  decoded; every other escape is kept, with its hex digits upper-cased.
- `;parameters` are removed from every segment (`/a;x=1/b` -> `/a/b`).
- Empty segments are merged (`//a///b` -> `/a/b`); a trailing `/` is kept.
- `.` and `..` segments, also spelled `%2e`, are resolved; `..` above the
  root is refused.
- `%2F` and `%5C` stay encoded (they are data inside a segment), but a
  segment where decoding them would make a `.` or `..` segment is refused.
- Double-encoded dots and slashes (`%252e`, `%252f`, `%255c`) are refused.
- A raw backslash, a byte outside printable ASCII, an escape of a control
  character (`%00`-`%1F`, `%7F`) or a broken escape (`%G1`, `%4`) is
  refused.

Refusals raise `PathError`, which the proxy answers with 400.
"""

from __future__ import annotations

import re
import string

__all__ = ["PathError", "normalise_path"]


class PathError(ValueError):
    """A request path that cannot be normalised safely."""


_UNRESERVED = frozenset((string.ascii_letters + string.digits + "-._~").encode())
# Characters a path may carry as they are (RFC 3986 pchar plus "/").
_ALLOWED = (string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%").encode()
# The subset that needs no second look: no escapes, no parameters.
_PLAIN = (string.ascii_letters + string.digits + "-._~!$&'()*+,=:@/").encode()
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ENCODED_SEPARATOR = re.compile(rb"%2F|%5C")
_DOUBLE_ENCODED = re.compile(rb"%25(?:2e|2f|5c)", re.IGNORECASE)


def normalise_path(raw: bytes) -> bytes:
    """The normalised form of `raw` (which starts with `/`), or `PathError`."""
    if not raw.translate(None, _PLAIN) and b"//" not in raw and b"/." not in raw:
        return raw
    return _normalise(raw)


def _normalise(raw: bytes) -> bytes:
    bad = raw.translate(None, _ALLOWED)
    if bad:
        raise PathError(
            f"the path has a character that must be percent-encoded: {_show(bad[:1])}"
        )
    if _DOUBLE_ENCODED.search(raw):
        raise PathError("the path has a double-encoded dot, slash or backslash")

    kept: list[bytes] = []
    segments = raw.split(b"/")[1:]
    trailing = False
    for segment in segments:
        if b";" in segment:
            segment = segment.partition(b";")[0]
        if b"%" in segment:
            segment = _decode_unreserved(segment)
        trailing = segment in (b"", b".", b"..")
        if segment == b"..":
            if not kept:
                raise PathError("the path climbs above the root with '..'")
            kept.pop()
        elif segment and segment != b".":
            if b"%" in segment and _ENCODED_SEPARATOR.search(segment):
                pieces = _ENCODED_SEPARATOR.split(segment)
                if b"." in pieces or b".." in pieces:
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
