"""Checks on a request head that llhttp accepts but a gateway must not.

llhttp already refuses most framing tricks (see docs/security.md); what is
left is a `Host` that is not a host, and a `Transfer-Encoding` that is not
exactly `chunked` on HTTP/1.1 (llhttp accepts `gzip, chunked`, and chunked
framing on HTTP/1.0, which some servers ignore).
"""

from __future__ import annotations

import re

__all__ = ["framing_problem", "host_problem"]

_HOST = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_GOOD_HOSTS: set[bytes] = set()
_GOOD_HOSTS_MAX = 1024


def host_problem(host: bytes | None) -> str | None:
    """Why a `Host` value is malformed, or None (a missing one is checked elsewhere)."""
    if host is None or host in _GOOD_HOSTS:
        return None
    if not _HOST.fullmatch(host):
        return "malformed Host header"
    _, colon, port = host.rpartition(b":")
    if colon and port.isdigit() and not 0 < int(port) < 65536:
        return "the Host port must be between 1 and 65535"
    if len(_GOOD_HOSTS) < _GOOD_HOSTS_MAX:
        _GOOD_HOSTS.add(host)
    return None


def framing_problem(transfer_encoding: bytes | None, http11: bool) -> str | None:
    """Why a chunked request's framing is refused, or None."""
    if not http11:
        return "Transfer-Encoding is not allowed on HTTP/1.0"
    if transfer_encoding is None or transfer_encoding.strip().lower() != b"chunked":
        return "Transfer-Encoding must be exactly 'chunked'"
    return None
