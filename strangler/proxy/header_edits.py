"""Header adapters between v1 clients and v2 services: remove, set, add.

Values may reference the request (`${request.header.X-Name}`) and the
decision (`${route}`, `${upstream}`). Edits apply only to end-to-end
headers: framing, hop-by-hop, `Host` and the gateway's own headers
(forwarding, request id) are refused by the rule checker, and skipped here
as well, so an edit can never put a second `Content-Length` on a pooled
connection or cut a response short.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from strangler.model import HeaderEdits
from strangler.proxy.headers import gateway_managed

_REFERENCE = re.compile(r"\$\{([^}]*)\}")
HeaderLookup = Callable[[bytes], "bytes | None"]


def render(template: str, route: str, upstream: str, header: HeaderLookup) -> bytes:
    """Fill a value template for one request; a missing header becomes empty."""
    if "${" not in template:
        return template.encode("latin-1")

    def fill(found: re.Match[str]) -> str:
        name = found.group(1)
        if name == "route":
            return route
        if name == "upstream":
            return upstream
        value = header(name.removeprefix("request.header.").lower().encode("latin-1"))
        return value.decode("latin-1") if value is not None else ""

    return _REFERENCE.sub(fill, template).encode("latin-1")


def edit_request(
    kept: list[tuple[bytes, bytes, bytes]],
    edits: HeaderEdits,
    route: str,
    upstream: str,
    header: HeaderLookup,
) -> list[tuple[bytes, bytes, bytes]]:
    """The request headers after `edits`, as (lower-case name, name, value)."""
    drop = _dropped(edits)
    out = [entry for entry in kept if entry[0] not in drop]
    for name, template in (*edits.set, *edits.add):
        raw = name.encode("latin-1")
        lname = raw.lower()
        if not gateway_managed(lname):
            out.append((lname, raw, render(template, route, upstream, header)))
    return out


def edit_response(
    headers: list[tuple[bytes, bytes]],
    edits: HeaderEdits,
    route: str,
    upstream: str,
    header: HeaderLookup,
) -> list[tuple[bytes, bytes]]:
    """The response headers after `edits`, as (name, value)."""
    drop = _dropped(edits)
    out = [pair for pair in headers if pair[0].lower() not in drop]
    for name, template in (*edits.set, *edits.add):
        raw = name.encode("latin-1")
        if not gateway_managed(raw.lower()):
            out.append((raw, render(template, route, upstream, header)))
    return out


def _dropped(edits: HeaderEdits) -> set[bytes]:
    """Lower-case names that `remove` and `set` take out, managed ones excepted."""
    names = (*edits.remove, *(name for name, _ in edits.set))
    lowered = (name.lower().encode("latin-1") for name in names)
    return {name for name in lowered if not gateway_managed(name)}
