"""The two extension points an exchange calls: the request gate and the shadow tap.

Both are optional per gateway state. The gate (authentication, scopes, rate
limits) decides whether a routed request may go upstream and which identity
headers it carries. The shadow tap sees a copy of a mirrored request and of
the primary's response, and never influences what the client gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from strangler.proxy.exchange import Exchange

HeaderPairs = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Verdict:
    """What the gate decided for one request.

    On refusal the client gets `status` with a JSON body built from `error`
    and `message`, plus `response_headers` (`WWW-Authenticate`,
    `Retry-After`, `RateLimit-*`). On acceptance `upstream_headers` are added
    after every header named in `strip` was removed from the client's
    request, and `response_headers` are added to the upstream's response.
    """

    allowed: bool
    status: int = 200
    error: str = ""
    message: str = ""
    consumer: str | None = None
    strip: frozenset[bytes] = frozenset()
    upstream_headers: HeaderPairs = field(default_factory=list)
    response_headers: HeaderPairs = field(default_factory=list)


class RequestGate(Protocol):
    """Decides, after routing and before any upstream is contacted."""

    def check(self, exchange: Exchange) -> Verdict | Deferred[Verdict]: ...


class ShadowTap(Protocol):
    """Receives a mirrored request's pieces and the primary's answer."""

    def request_body(self, data: bytes) -> None: ...
    def request_complete(self) -> None: ...
    def primary_head(self, status: int, headers: HeaderPairs) -> None: ...
    def primary_body(self, data: bytes) -> None: ...
    def primary_complete(self) -> None: ...
    def primary_failed(self) -> None: ...


class ShadowSource(Protocol):
    """Per route: decides whether to mirror a request and starts the tap."""

    def tap(self, exchange: Exchange) -> ShadowTap | None: ...
