"""Header adapters between v1 clients and v2 services: remove, set, add.

Values may reference the request (`${request.header.X-Name}`) and the
decision (`${route}`, `${upstream}`). Edits apply only to end-to-end
headers: the gateway's own headers (forwarding, request id, framing) are
added after them and cannot be removed or replaced by a rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from strangler.model import HeaderEdits

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
    drop = {name.lower().encode("latin-1") for name in edits.remove}
    drop.update(name.lower().encode("latin-1") for name, _ in edits.set)
    out = [entry for entry in kept if entry[0] not in drop]
    for name, template in (*edits.set, *edits.add):
        raw = name.encode("latin-1")
        out.append((raw.lower(), raw, render(template, route, upstream, header)))
    return out


def edit_response(
    headers: list[tuple[bytes, bytes]],
    edits: HeaderEdits,
    route: str,
    upstream: str,
    header: HeaderLookup,
) -> list[tuple[bytes, bytes]]:
    """The response headers after `edits`, as (name, value)."""
    drop = {name.lower().encode("latin-1") for name in edits.remove}
    drop.update(name.lower().encode("latin-1") for name, _ in edits.set)
    out = [pair for pair in headers if pair[0].lower() not in drop]
    for name, template in (*edits.set, *edits.add):
        out.append((name.encode("latin-1"), render(template, route, upstream, header)))
    return out
