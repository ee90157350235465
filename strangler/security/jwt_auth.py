"""Bearer tokens (JWT): refuse the known tricks cheaply, verify with PyJWT, cache.

Before any signature is checked, a token is refused when it is not three
base64url parts, when its header says `alg: none`, names its own key
(`jku`, `x5u`, `jwk`, `x5c`), carries `crit` extensions, or has a `kid`
that is anything but a plain name. The issuer (picked by the unverified
`iss`) must list the algorithm, and the key must belong to the algorithm's
family, so an HS256 token can never be checked against an RSA public key.
PyJWT then checks the signature and `exp`, `nbf`, `iss`, `aud` with the
configured leeway.

A verified token is cached until it expires, so a client that reuses its
token pays for one signature check, not one per request.

Keys from a `jwks_url` are fetched with treq on the reactor: at start, when
the cached set is older than `jwks_max_age` (in the background), and when a
token names an unknown `kid` (at most once per `jwks_refresh`).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import jwt
import orjson
import structlog
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from strangler.model import Consumer, JwtAuth, JwtIssuer, JwtKey
from strangler.security.counters import SecurityCounters
from strangler.security.identity import Identity, IdentityFactory
from strangler.security.jwt_keys import ALGORITHM_FAMILY, MAX_JWKS_BYTES, keys_from_jwks

__all__ = ["KEYS_UNAVAILABLE", "JwtVerifier", "bearer_token"]

log = structlog.get_logger("strangler.security")

MAX_TOKEN_BYTES = 8192
CACHE_SIZE = 10_000
FETCH_TIMEOUT = 5.0
KEYS_UNAVAILABLE = "the issuer's signing keys are not available"

_PART = re.compile(rb"[A-Za-z0-9_-]+")
_KID = re.compile(r"[A-Za-z0-9_.:=+-]{1,256}")
_SELF_KEYED = ("jku", "x5u", "jwk", "x5c")

Outcome = Identity | str


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an `Authorization: Bearer ...` header, or None."""
    if authorization is None or authorization[:7].lower() != b"bearer ":
        return None
    token = authorization[7:].strip()
    return token or None


def _b64_json(part: bytes) -> Any:
    padded = part + b"=" * (-len(part) % 4)
    return orjson.loads(base64.urlsafe_b64decode(padded))


_PYJWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.MissingRequiredClaimError, "a required claim is missing"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.DecodeError, "malformed token"),
)


class _IssuerKeys:
    """One issuer's keys: those from the rule file plus the fetched JWKS."""

    def __init__(self, config: JwtIssuer) -> None:
        self.config = config
        self.algorithms = frozenset(config.algorithms)
        self.audience = list(config.audience) or None
        self.static = config.keys
        self.fetched: tuple[JwtKey, ...] = ()
        self.by_kid: dict[str, JwtKey] = {}
        self.loaded = not config.jwks_url
        self.fetched_at = float("-inf")
        self.last_attempt = float("-inf")
        self.last_unknown_kid = float("-inf")
        self.in_flight: Deferred[Any] | None = None
        self._index()

    def set_fetched(self, keys: tuple[JwtKey, ...], now: float) -> None:
        self.fetched = keys
        self.fetched_at = now
        self.loaded = True
        self._index()

    def _index(self) -> None:
        self.by_kid = {
            key.kid: key for key in (*self.static, *self.fetched) if key.kid is not None
        }

    def find(self, kid: str | None, family: str) -> JwtKey | str | None:
        """The key to check with, a refusal reason, or None when `kid` is unknown."""
        if kid is not None:
            key = self.by_kid.get(kid)
            if key is None:
                return None
            return key if key.family == family else "key does not match the algorithm"
        candidates = [k for k in (*self.static, *self.fetched) if k.family == family]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            return None if not self.loaded else "no key for this algorithm"
        return "token has no key id and the issuer has several keys"


class JwtVerifier:
    """Turns a bearer token into an `Identity`, or a short refusal reason."""

    def __init__(
        self,
        config: JwtAuth,
        consumers: dict[str, Consumer],
        identities: IdentityFactory,
        reactor: Any,
        counters: SecurityCounters,
        previous: JwtVerifier | None = None,
    ) -> None:
        self.config = config
        self._consumers = consumers
        self._identities = identities
        self._reactor = reactor
        self._counters = counters
        self._leeway = config.leeway
        self._required = ["exp", "iss"] if config.require_exp else ["iss"]
        self._cache: dict[bytes, Identity] = {}
        self._last_fetch_log = float("-inf")
        self._issuers: dict[str, _IssuerKeys] = {}
        old = previous._issuers if previous is not None else {}
        for issuer in config.issuers:
            keys = _IssuerKeys(issuer)
            carried = old.get(issuer.issuer)
            if carried is not None and carried.config.jwks_url == issuer.jwks_url:
                keys.fetched = carried.fetched
                keys.fetched_at = carried.fetched_at
                keys.loaded = carried.loaded
                keys._index()
            self._issuers[issuer.issuer] = keys
        self._pool: HTTPConnectionPool | None = None

    def start(self) -> None:
        """Fetch every JWKS URL not already carried over from the previous rules."""
        now = self._reactor.seconds()
        for keys in self._issuers.values():
            if keys.config.jwks_url and not keys.loaded:
                self._fetch(keys, now)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.closeCachedConnections()

    # -- verification ---------------------------------------------------------

    def verify(self, token: bytes, now: float) -> Outcome | Deferred[Outcome]:
        cached = self._cache.get(token)
        if cached is not None:
            return self._still_valid(token, cached, now)
        return self._verify(token, now, may_fetch=True)

    def _still_valid(self, token: bytes, identity: Identity, now: float) -> Outcome:
        if now > identity.expires + self._leeway:
            del self._cache[token]
            return "token expired"
        if now < identity.not_before - self._leeway:
            return "token not yet valid"
        return identity

    def _verify(
        self, token: bytes, now: float, may_fetch: bool
    ) -> Outcome | Deferred[Outcome]:
        if len(token) > MAX_TOKEN_BYTES:
            return "token too large"
        parts = token.split(b".")
        if (
            len(parts) != 3
            or not _PART.fullmatch(parts[0])
            or not _PART.fullmatch(parts[1])
            or (parts[2] and not _PART.fullmatch(parts[2]))
        ):
            return "malformed token"
        try:
            header = _b64_json(parts[0])
            payload = _b64_json(parts[1])
        except (binascii.Error, ValueError):
            return "malformed token"
        if not isinstance(header, dict) or not isinstance(payload, dict):
            return "malformed token"

        alg = header.get("alg")
        if not isinstance(alg, str):
            return "malformed token"
        if alg.lower() == "none":
            return "unsigned tokens (alg none) are not accepted"
        if any(name in header for name in _SELF_KEYED):
            return "token header names its own key (jku, x5u, jwk, x5c)"
        if "crit" in header:
            return "critical header extensions are not supported"
        kid = header.get("kid")
        if kid is not None and (
            not isinstance(kid, str) or not _KID.fullmatch(kid) or ".." in kid
        ):
            return "key id is not a plain name"

        if not parts[2]:
            return "token has no signature"
        iss = payload.get("iss")
        keys = self._issuers.get(iss) if isinstance(iss, str) else None
        if keys is None:
            return "unknown issuer"
        if alg not in keys.algorithms:
            return "algorithm not allowed"

        found = keys.find(kid, ALGORITHM_FAMILY[alg])
        if (
            keys.config.jwks_url
            and now - keys.fetched_at > self.config.jwks_max_age
            and now - keys.last_attempt >= self.config.jwks_refresh
        ):
            self._fetch(keys, now)
        if found is None:
            return self._after_refresh(keys, token, now, may_fetch)
        if isinstance(found, str):
            return found
        return self._check(token, alg, found, keys, payload, now)

    def _after_refresh(
        self, keys: _IssuerKeys, token: bytes, now: float, may_fetch: bool
    ) -> Outcome | Deferred[Outcome]:
        """An unknown key: wait for a rate-limited JWKS refresh, then try again."""
        if may_fetch and keys.config.jwks_url:
            waiting = keys.in_flight
            if (
                waiting is None
                and now - keys.last_unknown_kid >= self.config.jwks_refresh
            ):
                keys.last_unknown_kid = now
                waiting = self._fetch(keys, now)
            if waiting is not None:
                result: Deferred[Outcome] = Deferred()
                waiting.addBoth(lambda _: result.callback(self._retry(token)))
                return result
        return "unknown key id" if keys.loaded else KEYS_UNAVAILABLE

    def _retry(self, token: bytes) -> Outcome:
        outcome = self._verify(token, self._reactor.seconds(), may_fetch=False)
        assert not isinstance(outcome, Deferred)
        return outcome

    def _check(
        self,
        token: bytes,
        alg: str,
        key: JwtKey,
        keys: _IssuerKeys,
        payload: dict[str, Any],
        now: float,
    ) -> Outcome:
        try:
            claims = jwt.decode(
                token.decode("ascii"),
                key.key,
                algorithms=[alg],
                audience=keys.audience,
                issuer=keys.config.issuer,
                leeway=self._leeway,
                options={
                    "require": self._required,
                    "verify_aud": keys.audience is not None,
                },
            )
        except jwt.InvalidTokenError as exc:
            for kind, reason in _PYJWT_REASONS:
                if isinstance(exc, kind):
                    return reason
            return "invalid token"
        identity = self._identity(claims, keys.config)
        if isinstance(identity, str):
            return identity
        if len(self._cache) >= CACHE_SIZE:
            for stale in list(self._cache)[: CACHE_SIZE // 2]:
                del self._cache[stale]
        self._cache[token] = identity
        return identity

    def _identity(self, claims: dict[str, Any], issuer: JwtIssuer) -> Outcome:
        config = self.config
        claim = issuer.consumer_claim or config.consumer_claim
        name = claims.get(claim)
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)
        if not isinstance(name, str) or not name or not name.isprintable():
            return f"token has no usable {claim} claim"
        scopes = _words(claims.get(config.scopes_claim))
        if config.scopes_claim == "scope" and "scp" in claims:
            scopes |= _words(claims.get("scp"))
        roles = _words(claims.get(config.roles_claim))
        consumer = self._consumers.get(name)
        rate_limit = None
        if consumer is not None:
            scopes |= consumer.scopes
            roles |= consumer.roles
            rate_limit = consumer.rate_limit
        expires = claims.get("exp")
        not_before = claims.get("nbf")
        return self._identities.build(
            name,
            "jwt",
            scopes,
            roles,
            rate_limit,
            claims,
            float(expires) if isinstance(expires, int | float) else float("inf"),
            float(not_before) if isinstance(not_before, int | float) else float("-inf"),
        )

    # -- key sets -------------------------------------------------------------

    def _fetch(self, keys: _IssuerKeys, now: float) -> Deferred[Any]:
        if keys.in_flight is not None:
            return keys.in_flight
        url = keys.config.jwks_url
        assert url is not None
        keys.last_attempt = now
        if self._pool is None:
            self._pool = HTTPConnectionPool(self._reactor, persistent=False)
        agent: Any = Agent(self._reactor, pool=self._pool, connectTimeout=FETCH_TIMEOUT)
        client = HTTPClient(agent)
        fetching: Deferred[Any] = client.get(
            url, allow_redirects=False, timeout=FETCH_TIMEOUT, reactor=self._reactor
        )
        fetching.addCallback(_jwks_body)
        fetching.addCallback(keys_from_jwks)

        def done(fetched: tuple[JwtKey, ...]) -> None:
            keys.set_fetched(fetched, self._reactor.seconds())
            log.info("jwks_fetched", issuer=keys.config.issuer, keys=len(fetched))

        def failed(failure: Failure) -> None:
            self._counters.jwks_failures += 1
            seconds = self._reactor.seconds()
            if seconds - self._last_fetch_log >= 60:
                self._last_fetch_log = seconds
                log.warning(
                    "jwks_fetch_failed",
                    issuer=keys.config.issuer,
                    url=url,
                    error=failure.getErrorMessage(),
                )

        def settle(_: object) -> None:
            keys.in_flight = None

        fetching.addCallbacks(done, failed)
        fetching.addBoth(settle)
        if fetching.called:
            return fetching
        keys.in_flight = fetching
        return fetching


def _jwks_body(response: Any) -> Deferred[bytes]:
    """The body of a key-set response, refused past `MAX_JWKS_BYTES`."""
    if response.code != 200:
        raise ValueError(f"the key set URL answered {response.code}")
    length = response.length
    if isinstance(length, int) and length > MAX_JWKS_BYTES:
        raise ValueError(f"the key set is larger than {MAX_JWKS_BYTES} bytes")
    pieces: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_JWKS_BYTES:
            raise ValueError(f"the key set is larger than {MAX_JWKS_BYTES} bytes")
        pieces.append(data)

    return treq.collect(response, collect).addCallback(lambda _: b"".join(pieces))


def _words(value: Any) -> frozenset[str]:
    """Scopes or roles from a claim: a space-separated string or a list of strings."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()
