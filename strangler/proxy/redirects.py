"""Undoing a prefix rewrite on `Location`, so redirects point at the client's paths.

A branch that sends `/api/v1/users` to the service as `/api/v2/users` would
otherwise hand v1 clients a `Location: /api/v2/users/6` from a `201
Created`: a path of the new contract they were never meant to see. Like
nginx's default `proxy_redirect`, the gateway maps such a `Location` back.
It does so when the value is a path (`/api/v2/users/6`), or an absolute URL
naming the request's own `Host` (the host is kept) or the upstream target
that answered (the URL becomes a path, since clients cannot reach the
target). Any other URL is left alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strangler.model import Rewrite, Target
    from strangler.proxy.headers import Headers

__all__ = ["restore_location", "restore_prefix"]


def restore_prefix(rewrite: Rewrite, path: str) -> str | None:
    """The client-side path for an upstream `path`, or None if it is not mapped.

    The inverse of `Rewrite.apply` for a prefix rewrite: a path under the
    rewrite's `to`, at a segment boundary, gets the `prefix` back.
    """
    prefix = rewrite.prefix
    assert prefix is not None
    to = rewrite.to
    if not to.startswith("/"):
        to = "/" + to
    if to.endswith("/"):
        if not path.startswith(to):
            return None
        rest = path[len(to) - 1 :]
    else:
        if not path.startswith(to):
            return None
        rest = path[len(to) :]
        if rest and rest[0] != "/":
            return None
    if prefix.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    return prefix + rest


def restore_location(
    headers: Headers, rewrite: Rewrite, host: bytes | None, target: Target
) -> Headers:
    """`headers` with a `Location` the rewrite produced mapped back, if any.

    `host` is the request's `Host`; `target` the upstream instance that answered.
    """
    for index, (name, value) in enumerate(headers):
        if len(name) == 8 and name.lower() == b"location":
            authority = target.authority.encode("latin-1")
            restored = _restore(value, rewrite, host, authority)
            if restored is not None:
                headers = list(headers)
                headers[index] = (name, restored)
            break
    return headers


def _restore(
    value: bytes, rewrite: Rewrite, host: bytes | None, target: bytes
) -> bytes | None:
    origin = b""
    reference = value
    if not value.startswith(b"/"):
        scheme, sep, rest = value.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return None
        authority, slash, tail = rest.partition(b"/")
        authority = authority.lower()
        if host is not None and authority == host.lower():
            origin = value[: len(scheme) + 3 + len(authority)]
        elif authority != target.lower():
            return None
        reference = slash + tail
        if not reference:
            return None
    elif value.startswith(b"//"):
        return None

    end = len(reference)
    for mark in (b"?", b"#"):
        found = reference.find(mark)
        if found != -1:
            end = min(end, found)
    path = reference[:end].decode("latin-1")
    restored = restore_prefix(rewrite, path)
    if restored is None:
        return None
    return origin + restored.encode("latin-1") + reference[end:]
