"""The validated rule file as frozen data.

`strangler.rules` turns YAML into these objects once, at load time; the hot
path only reads them. Nothing here parses text or touches the network, so a
whole configuration can be built by hand in a test.

Durations are float seconds and sizes are int bytes by the time they get
here. Names of upstreams are checked to exist before a `Rules` is built, so
code reading a `Route` never meets an unknown upstream.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BalanceName = Literal["round_robin", "least_conn", "ip_hash", "random"]
StickyBy = Literal["header", "cookie", "ip", "jwt_claim"]
TransformName = Literal["xml_to_json", "json_to_xml"]
AuthMode = Literal["api_key", "jwt", "any", "none"]
RateKeyKind = Literal["consumer", "ip", "route", "header"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on; `port` 0 asks the OS for a free one."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Only this machine can reach it: 127.0.0.0/8, ::1 or `localhost`."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


@dataclass(frozen=True, slots=True)
class Target:
    """One instance of an upstream: `http://host:port`, with a balancing weight."""

    url: str
    scheme: str
    host: str
    port: int
    weight: int = 1

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health check of every target of an upstream."""

    path: str = "/health"
    interval: float = 2.0
    timeout: float = 1.0
    expect_status: tuple[int, int] = (200, 399)
    healthy_after: int = 2
    unhealthy_after: int = 3


@dataclass(frozen=True, slots=True)
class Outlier:
    """Passive ejection: a target failing in a row leaves rotation for a while."""

    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How an upstream's `https://` targets are verified: the CAs to trust.

    `ca_pem` holds the certificates read from `ca` when the rule file was
    loaded; they replace the system's trust store for this upstream only.
    """

    ca: Path
    ca_pem: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Upstream:
    """A named pool of targets and how to balance across them."""

    name: str
    targets: tuple[Target, ...]
    balance: BalanceName = "round_robin"
    health: HealthCheck | None = None
    timeout: float | None = None
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    outlier: Outlier = field(default_factory=Outlier)
    max_connections: int | None = None
    max_pending: int | None = None
    tls: UpstreamTls | None = None


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Path rewrite: replace a leading `prefix` with `to`, or a regex substitution.

    Exactly one of `prefix` and `regex` is set. The rewrite only ever touches
    the path; the query string is carried over unchanged by the proxy.
    `location` undoes a prefix rewrite on the `Location` of responses.
    """

    to: str
    prefix: str | None = None
    regex: re.Pattern[str] | None = None
    location: bool = True

    def apply(self, path: str) -> str:
        if self.prefix is not None:
            if path.startswith(self.prefix):
                rest = path[len(self.prefix) :]
                if not rest or rest[0] == "/" or self.prefix.endswith("/"):
                    if self.to.endswith("/") and rest.startswith("/"):
                        rest = rest[1:]
                    joined = self.to + rest
                    return joined if joined.startswith("/") else "/" + joined
            return path
        assert self.regex is not None
        return self.regex.sub(self.to, path, count=1)


@dataclass(frozen=True, slots=True)
class Transform:
    """Body transforms applied on the way to the upstream and back.

    `body` is a JSON field map (`strangler.transforms.body_map.BodyMap`)
    applied to request bodies after any `request` conversion, and undone on
    response bodies before any `response` conversion.
    """

    request: TransformName | None = None
    response: TransformName | None = None
    max_body: int = 10 * MIB
    body: Any = None


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Header changes in one direction: remove, then set (replace), then add."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Header changes toward the upstream and back toward the client."""

    request: HeaderEdits | None = None
    response: HeaderEdits | None = None


@dataclass(frozen=True, slots=True)
class SplitEntry:
    """One branch of a route: an upstream, its share and what to do on the way."""

    to: str
    weight: float = 100.0
    rewrite: Rewrite | None = None
    transform: Transform | None = None
    timeout: float | None = None
    connect_timeout: float | None = None
    fallback: str | None = None
    idle_timeout: float | None = None
    headers: HeaderRules | None = None


@dataclass(frozen=True, slots=True)
class Sticky:
    """How to find the key that keeps one user on one side of a split."""

    by: StickyBy
    name: str = ""
    cookie_ttl: float = 86400.0


@dataclass(frozen=True, slots=True)
class Override:
    """Lets a tester force a split branch with a request header."""

    header: str


@dataclass(frozen=True, slots=True)
class Compare:
    """What a shadow comparison looks at and what it ignores."""

    ignore: tuple[str, ...] = ()
    headers: tuple[str, ...] = ("content-type",)
    noise: Literal["auto", "off"] = "off"


@dataclass(frozen=True, slots=True)
class Shadow:
    """Copy a share of a route's requests to another upstream and compare."""

    to: str
    percent: float = 100.0
    methods: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS"})
    rewrite: Rewrite | None = None
    transform: Transform | None = None
    timeout: float = 5.0
    max_body: int = MIB
    max_in_flight: int = 100
    compare: Compare = field(default_factory=Compare)
    redact: tuple[str, ...] = ()
    """Header and query-parameter names (lower case) that samples never show."""


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A request header that must be present and, if given, match a regex."""

    name: str
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """Conditions a request must meet for a route to take it; all must hold."""

    path: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: frozenset[str] | None = None
    headers: tuple[HeaderMatch, ...] = ()
    host: str | None = None


@dataclass(frozen=True, slots=True)
class Retries:
    """When a request that reached an upstream may be sent again.

    Connection failures before any byte was sent are always retried on
    another target; these settings add retries after sending, for
    idempotent methods only.
    """

    attempts: int = 1
    retry_on: tuple[str, ...] = ("connect",)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `rate` tokens a second refill it, it holds at most `burst`.

    `per` says whose bucket a request draws from; with `per: header` the
    bucket is chosen by the value of the lower-case header `header`.
    """

    rate: float
    burst: int
    per: RateKeyKind = "consumer"
    header: str | None = None


@dataclass(frozen=True, slots=True)
class Require:
    """Scopes and roles a consumer must all hold to use a route."""

    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Route:
    """A named rule: what it matches and where matching requests go.

    A route written with `to:` is held as a one-entry `split` so the proxy has
    one code path; route-level `rewrite`, `transform` and timeouts are folded
    into each entry that does not set its own.
    """

    name: str
    match: Match
    split: tuple[SplitEntry, ...]
    sticky: Sticky | None = None
    override: Override | None = None
    shadow: Shadow | None = None
    retries: Retries | None = None
    line: int = 0
    auth: AuthMode | None = None
    require: Require | None = None
    rate_limit: RateLimit | None = None
    max_body: int | None = None
    # The route's own timeouts, kept for a fallback upstream outside the split.
    timeout: float | None = None
    connect_timeout: float | None = None
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Admin:
    """The admin API listener and the bearer token that guards it."""

    listen: Address
    token: str | None = None
    # Where the rule file sets the listener, for problems found after loading.
    line: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client may send."""

    client_header_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    max_body: int | None = None
    client_body_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Consumer:
    """A named caller: the SHA-256 digests of its API keys, its grants, its limit."""

    name: str
    key_hashes: tuple[bytes, ...] = field(default=(), repr=False)
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class ApiKeyAuth:
    """Where an API key is read: a header, and the query string only if named."""

    header: str = "x-api-key"
    query: str | None = None


@dataclass(frozen=True, slots=True)
class JwtKey:
    """One verification key: a public key object, or an HMAC secret as bytes."""

    kid: str | None
    family: Literal["RSA", "EC", "OKP", "oct"]
    key: Any = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class JwtIssuer:
    """One token issuer, its algorithm allow-list and where its keys come from."""

    issuer: str
    algorithms: tuple[str, ...]
    audience: tuple[str, ...] = ()
    keys: tuple[JwtKey, ...] = ()
    jwks_url: str | None = None
    consumer_claim: str | None = None


@dataclass(frozen=True, slots=True)
class JwtAuth:
    """Bearer tokens: issuers, clock leeway and the claims that name a caller."""

    issuers: tuple[JwtIssuer, ...]
    leeway: float = 0.0
    consumer_claim: str = "sub"
    scopes_claim: str = "scope"
    roles_claim: str = "roles"
    require_exp: bool = True
    jwks_refresh: float = 60.0
    jwks_max_age: float = 600.0


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    """Headers the gateway sets from the caller's identity (client copies removed)."""

    consumer: str | None = None
    claims: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Auth:
    """How callers are identified; `default` applies where a route says nothing."""

    default: AuthMode = "none"
    api_key: ApiKeyAuth | None = None
    jwt: JwtAuth | None = None
    identity_headers: IdentityHeaders = field(default_factory=IdentityHeaders)
    realm: str = "strangler"


@dataclass(frozen=True, slots=True)
class SharedState:
    """Redis holding counters that several gateways share."""

    redis: str
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = field(default=None, repr=False)
    on_state_error: Literal["open", "deny"] = "open"
    timeout: float = 0.25
    prefix: str = "strangler"


@dataclass(frozen=True, slots=True)
class Tls:
    """Certificate and key (PEM files) for TLS on the public listener."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class AccessLog:
    """Where the one-line-per-request access log goes (`-` is stdout)."""

    enabled: bool = True
    path: str = "-"


@dataclass(frozen=True, slots=True)
class Rules:
    """A whole, valid rule file."""

    source: Path
    listen: Address
    upstreams: dict[str, Upstream]
    default: str
    routes: tuple[Route, ...] = ()
    admin: Admin | None = None
    trusted_proxies: tuple[Network, ...] = ()
    expose_decision: bool = False
    limits: Limits = field(default_factory=Limits)
    access_log: AccessLog = field(default_factory=AccessLog)
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    drain_timeout: float = 30.0
    consumers: dict[str, Consumer] = field(default_factory=dict)
    auth: Auth | None = None
    state: SharedState | None = None
    tls: Tls | None = None
