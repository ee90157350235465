"""Who a request comes from, and the headers that tell the upstream.

An `Identity` is built once per consumer (API keys) or once per verified
token (cached), together with the accepting verdict the gate returns, so
an authenticated request allocates nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strangler.model import IdentityHeaders, RateLimit
from strangler.proxy.hooks import Verdict

__all__ = ["Identity", "IdentityFactory", "claims_identity"]


def _canonical(lname: bytes) -> bytes:
    return lname.replace(b"_", b"-")


def claims_identity(lname: bytes, strip: frozenset[bytes]) -> bool:
    """Whether a client header (lower-case name) is one of the identity headers.

    `strip` holds the names with `-` only; a client's `_` (0x5F) counts as `-`,
    since CGI, WSGI and PHP read `X_User_Id` and `X-User-Id` as the same
    `HTTP_X_USER_ID`. nginx and Envoy drop underscore headers for that reason.
    """
    return lname in strip or (0x5F in lname and _canonical(lname) in strip)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: its name, grants and limits, and what to send on."""

    consumer: str
    via: str
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    rate_limit: RateLimit | None = None
    expires: float = float("inf")
    not_before: float = float("-inf")
    verdict: Verdict = field(default_factory=lambda: Verdict(True), compare=False)


def _header_safe(value: str) -> bytes | None:
    """A claim value as a header value, or None if it could split or smuggle headers."""
    if not value or len(value) > 1024:
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return None
    return value.encode("utf-8")


class IdentityFactory:
    """Builds identities with the identity headers the rule file names."""

    def __init__(self, config: IdentityHeaders) -> None:
        self._consumer_header = (
            config.consumer.encode("latin-1") if config.consumer is not None else None
        )
        self._claim_headers = tuple(
            (claim, header.encode("latin-1")) for claim, header in config.claims
        )
        names = [header.lower() for _claim, header in config.claims]
        if config.consumer is not None:
            names.append(config.consumer.lower())
        self.strip = frozenset(_canonical(name.encode("latin-1")) for name in names)

    def build(
        self,
        consumer: str,
        via: str,
        scopes: frozenset[str],
        roles: frozenset[str],
        rate_limit: RateLimit | None,
        claims: dict[str, Any] | None = None,
        expires: float = float("inf"),
        not_before: float = float("-inf"),
    ) -> Identity:
        headers: list[tuple[bytes, bytes]] = []
        if self._consumer_header is not None:
            value = _header_safe(consumer)
            if value is not None:
                headers.append((self._consumer_header, value))
        if claims is not None:
            for claim, header in self._claim_headers:
                raw = claims.get(claim)
                if isinstance(raw, str | int) and not isinstance(raw, bool):
                    value = _header_safe(str(raw))
                    if value is not None:
                        headers.append((header, value))
        verdict = Verdict(
            allowed=True, consumer=consumer, strip=self.strip, upstream_headers=headers
        )
        return Identity(
            consumer=consumer,
            via=via,
            scopes=scopes,
            roles=roles,
            rate_limit=rate_limit,
            expires=expires,
            not_before=not_before,
            verdict=verdict,
        )
