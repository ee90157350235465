"""The request gate: authentication, scopes, identity headers and rate limits.

`build_gate` compiles the rule file's security keys once per rule set into
per-route policies, so a request costs a dictionary lookup, the credential
check (one SHA-256 for an API key, a cache hit for a known token) and one
token bucket per limit. Answers that do not depend on the request (401s,
the plain acceptance) are built once and shared. Only a request whose
limit lives in Redis, or whose token needs a key set not yet fetched, gets
a Deferred.

Order of checks: credentials (401), then scopes and roles (403), then rate
limits (429); a request refused early never spends a token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from strangler.model import Auth, AuthMode, RateLimit, Require, Route, Rules
from strangler.proxy.hooks import RequestGate, Verdict
from strangler.security.api_keys import KeyIndex, query_value
from strangler.security.counters import SecurityCounters
from strangler.security.identity import Identity, IdentityFactory, claims_identity
from strangler.security.jwt_auth import KEYS_UNAVAILABLE, JwtVerifier, bearer_token
from strangler.security.rate_limit import (
    ClientAddresses,
    TokenBuckets,
    accepted_verdict,
    limited_verdict,
)
from strangler.security.redis_state import SharedBuckets

if TYPE_CHECKING:
    from strangler.proxy.exchange import Exchange

__all__ = ["Gate", "build_gate"]

log = structlog.get_logger("strangler.security")

ALLOW = Verdict(True)
STATE_LOG_INTERVAL = 60.0
_MAX_KEY_TEXT = 128


@dataclass(frozen=True, slots=True)
class _Policy:
    """What one route asks of a request, compiled."""

    route: str | None
    mode: AuthMode
    require: Require | None
    limit: RateLimit | None
    buckets: TokenBuckets | None
    limit_header: bytes | None
    forbidden: Verdict | None
    forbidden_bearer: Verdict | None


def build_gate(
    rules: Rules, reactor: Any, previous: RequestGate | None = None
) -> Gate | None:
    """The gate for `rules`, or None when the rules ask for no checks at all.

    `previous` is the gate of the rules being replaced: buckets of unchanged
    limits, the Redis connection and fetched key sets carry over, so a
    reload neither resets limits nor refetches keys.
    """
    old = previous if isinstance(previous, Gate) else None
    if not _needs_gate(rules):
        if old is not None:
            old.close()
        return None
    gate = Gate(rules, reactor, old)
    if old is not None:
        old.close(keep=gate)
    gate.start()
    return gate


def _needs_gate(rules: Rules) -> bool:
    if rules.consumers or rules.auth is not None:
        return True
    return any(
        route.auth is not None
        or route.require is not None
        or route.rate_limit is not None
        for route in rules.routes
    )


def _challenge(scheme: str, realm: str, **params: str) -> tuple[bytes, bytes]:
    text = f'{scheme} realm="{realm}"'
    for name, value in params.items():
        text += f', {name}="{value}"'
    return (b"WWW-Authenticate", text.encode("latin-1"))


class Gate:
    """Decides each routed request; built by `build_gate` from one rule set."""

    def __init__(
        self, rules: Rules, reactor: Any, previous: Gate | None = None
    ) -> None:
        self._reactor = reactor
        self._seconds = reactor.seconds
        self.counters: SecurityCounters = (
            previous.counters if previous is not None else SecurityCounters()
        )
        auth = rules.auth or Auth()
        self._realm = auth.realm
        self._identities = IdentityFactory(auth.identity_headers)
        self._strip = self._identities.strip
        self._strip_only = Verdict(True, strip=self._strip)

        api = auth.api_key
        self._key_header = (api.header if api is not None else "x-api-key").encode(
            "latin-1"
        )
        self._key_query = (
            api.query.encode("latin-1") if api is not None and api.query else None
        )
        self._keys = KeyIndex(
            (digest, consumer.name)
            for consumer in rules.consumers.values()
            for digest in consumer.key_hashes
        )
        self._key_identities = {
            consumer.name: self._identities.build(
                consumer.name,
                "api_key",
                consumer.scopes,
                consumer.roles,
                consumer.rate_limit,
            )
            for consumer in rules.consumers.values()
        }
        self._jwt: JwtVerifier | None = None
        if auth.jwt is not None:
            self._jwt = JwtVerifier(
                auth.jwt,
                rules.consumers,
                self._identities,
                reactor,
                self.counters,
                previous._jwt if previous is not None else None,
            )

        self._addresses = ClientAddresses(rules.trusted_proxies)
        old_buckets = previous._all_buckets if previous is not None else {}
        self._all_buckets: dict[tuple[str, str, RateLimit], TokenBuckets] = {}
        self._consumer_buckets = {
            consumer.name: self._buckets(
                "consumer", consumer.name, consumer.rate_limit, old_buckets
            )
            for consumer in rules.consumers.values()
            if consumer.rate_limit is not None
        }
        self._default = self._policy(None, auth, old_buckets)
        self._policies = {
            route.name: self._policy(route, auth, old_buckets) for route in rules.routes
        }

        self._shared: SharedBuckets | None = None
        self._deny_on_state_error = False
        if rules.state is not None:
            self._deny_on_state_error = rules.state.on_state_error == "deny"
            carried = previous._shared if previous is not None else None
            if carried is not None and carried.config == rules.state:
                self._shared = carried
            else:
                self._shared = SharedBuckets(rules.state, reactor)
        self._last_state_log = float("-inf")

        self._build_refusals(auth)

    # -- construction -------------------------------------------------------------

    def _buckets(
        self,
        kind: str,
        name: str,
        limit: RateLimit,
        old: dict[tuple[str, str, RateLimit], TokenBuckets],
    ) -> TokenBuckets:
        key = (kind, name, limit)
        buckets = old.get(key) or TokenBuckets(limit)
        self._all_buckets[key] = buckets
        return buckets

    def _policy(
        self,
        route: Route | None,
        auth: Auth,
        old: dict[tuple[str, str, RateLimit], TokenBuckets],
    ) -> _Policy:
        mode: AuthMode = auth.default
        require = limit = buckets = header = None
        if route is not None:
            mode = route.auth or auth.default
            require = route.require
            limit = route.rate_limit
            if limit is not None:
                buckets = self._buckets("route", route.name, limit, old)
                if limit.header is not None:
                    header = limit.header.encode("latin-1")
        forbidden = forbidden_bearer = None
        if require is not None:
            wanted = []
            if require.scopes:
                wanted.append("scopes " + " ".join(sorted(require.scopes)))
            if require.roles:
                wanted.append("roles " + " ".join(sorted(require.roles)))
            message = "this route requires " + " and ".join(wanted)
            forbidden = Verdict(False, 403, "forbidden", message)
            bearer = _challenge(
                "Bearer",
                self._realm,
                error="insufficient_scope",
                scope=" ".join(sorted(require.scopes)),
            )
            forbidden_bearer = Verdict(
                False, 403, "forbidden", message, response_headers=[bearer]
            )
        return _Policy(
            route.name if route is not None else None,
            mode,
            require,
            limit,
            buckets,
            header,
            forbidden,
            forbidden_bearer,
        )

    def _build_refusals(self, auth: Auth) -> None:
        realm = self._realm
        header_name = auth.api_key.header if auth.api_key is not None else "X-Api-Key"
        key_challenge = _challenge("ApiKey", realm, header=header_name)
        bearer_challenge = _challenge("Bearer", realm)
        where = f"the {header_name} header"
        if auth.api_key is not None and auth.api_key.query:
            where += f" or the {auth.api_key.query} query parameter"
        self._missing = {
            "api_key": Verdict(
                False,
                401,
                "unauthorized",
                f"an API key is required in {where}",
                response_headers=[key_challenge],
            ),
            "jwt": Verdict(
                False,
                401,
                "unauthorized",
                "a bearer token is required",
                response_headers=[bearer_challenge],
            ),
            "any": Verdict(
                False,
                401,
                "unauthorized",
                "an API key or a bearer token is required",
                response_headers=[key_challenge, bearer_challenge],
            ),
        }
        self._bad_key = Verdict(
            False,
            401,
            "unauthorized",
            "the API key is not valid",
            response_headers=[
                _challenge("ApiKey", realm, header=header_name, error="invalid_key")
            ],
        )
        self._unavailable = Verdict(
            False,
            503,
            "auth_unavailable",
            "the token cannot be checked now; try again",
            response_headers=[(b"Retry-After", b"5")],
        )
        self._state_down = Verdict(
            False,
            503,
            "state_unavailable",
            "rate limits cannot be checked now; try again",
            response_headers=[(b"Retry-After", b"1")],
        )
        self._token_refusals: dict[str, Verdict] = {}

    def start(self) -> None:
        if self._jwt is not None:
            self._jwt.start()

    def close(self, keep: Gate | None = None) -> None:
        """Release connections, except those `keep` (the next gate) took over."""
        if self._shared is not None and (
            keep is None or keep._shared is not self._shared
        ):
            self._shared.close()
        if self._jwt is not None:
            self._jwt.close()

    # -- the hot path ---------------------------------------------------------------

    def check(self, exchange: Exchange) -> Verdict | Deferred[Verdict]:
        plan = exchange.plan
        route = plan.route if plan is not None else None
        policy = (
            self._default
            if route is None
            else self._policies.get(route.name, self._default)
        )
        if policy.mode == "none":
            return self._authorised(None, exchange, policy)
        found = self._authenticate(exchange, policy.mode)
        if isinstance(found, Identity):
            return self._authorised(found, exchange, policy)
        if isinstance(found, Verdict):
            return found
        return found.addCallback(self._resume, exchange, policy)

    def _resume(
        self, found: Identity | Verdict, exchange: Exchange, policy: _Policy
    ) -> Verdict | Deferred[Verdict]:
        if isinstance(found, Verdict):
            return found
        return self._authorised(found, exchange, policy)

    def _authenticate(
        self, exchange: Exchange, mode: AuthMode
    ) -> Identity | Verdict | Deferred[Identity | Verdict]:
        if mode != "jwt":
            key = exchange.header_value(self._key_header)
            if key is None and self._key_query is not None:
                key = query_value(exchange.query, self._key_query)
            if key is not None:
                owner = self._keys.owner(key)
                if owner is None:
                    self.counters.refuse("auth", "invalid_key")
                    return self._bad_key
                return self._key_identities[owner]
            if mode == "api_key" or self._jwt is None:
                self.counters.refuse("auth", "missing")
                return self._missing["api_key" if mode == "api_key" else mode]
        assert self._jwt is not None
        token = bearer_token(exchange.header_value(b"authorization"))
        if token is None:
            self.counters.refuse("auth", "missing")
            return self._missing[mode]
        outcome = self._jwt.verify(token, self._seconds())
        if isinstance(outcome, Deferred):
            return outcome.addCallback(self._token_outcome)
        return self._token_outcome(outcome)

    def _token_outcome(self, outcome: Identity | str) -> Identity | Verdict:
        if type(outcome) is Identity:
            return outcome
        assert isinstance(outcome, str)
        self.counters.refuse("jwt", outcome)
        if outcome == KEYS_UNAVAILABLE:
            return self._unavailable
        verdict = self._token_refusals.get(outcome)
        if verdict is None:
            header = _challenge(
                "Bearer", self._realm, error="invalid_token", error_description=outcome
            )
            verdict = Verdict(
                False, 401, "invalid_token", outcome, response_headers=[header]
            )
            self._token_refusals[outcome] = verdict
        return verdict

    def _authorised(
        self, identity: Identity | None, exchange: Exchange, policy: _Policy
    ) -> Verdict | Deferred[Verdict]:
        require = policy.require
        if require is not None and (
            identity is None
            or not require.scopes <= identity.scopes
            or not require.roles <= identity.roles
        ):
            self.counters.refuse("scope", "missing")
            base = (
                policy.forbidden_bearer
                if identity is not None and identity.via == "jwt"
                else policy.forbidden
            )
            assert base is not None
            return Verdict(
                False,
                403,
                base.error,
                base.message,
                consumer=identity.consumer if identity is not None else None,
                response_headers=base.response_headers,
            )
        if policy.buckets is not None or (
            identity is not None and identity.rate_limit is not None
        ):
            return self._limit(exchange, policy, identity)
        return self._accept(exchange, identity)

    def _accept(self, exchange: Exchange, identity: Identity | None) -> Verdict:
        if identity is not None:
            return identity.verdict
        strip = self._strip
        if strip:
            for entry in exchange.kept:
                if claims_identity(entry[0], strip):
                    return self._strip_only
        return ALLOW

    # -- rate limits ------------------------------------------------------------------

    def _limit(
        self, exchange: Exchange, policy: _Policy, identity: Identity | None
    ) -> Verdict | Deferred[Verdict]:
        route_buckets = policy.buckets
        route_key = (
            self._route_key(policy, exchange, identity)
            if route_buckets is not None
            else ""
        )
        consumer_buckets = (
            self._consumer_buckets.get(identity.consumer)
            if identity is not None and identity.rate_limit is not None
            else None
        )
        shared = self._shared
        if shared is not None:
            pending = self._take_shared(
                shared, policy, route_key, consumer_buckets, identity
            )
            if pending is not None:
                return pending.addCallbacks(
                    self._shared_answer,
                    self._shared_failed,
                    callbackArgs=(exchange, policy, identity),
                    errbackArgs=(
                        exchange,
                        policy,
                        route_key,
                        consumer_buckets,
                        identity,
                    ),
                )
            self._state_error("no connection to Redis")
            if self._deny_on_state_error:
                self.counters.refuse("state", "unavailable")
                return self._state_down
        return self._take_local(exchange, policy, route_key, consumer_buckets, identity)

    def _route_key(
        self, policy: _Policy, exchange: Exchange, identity: Identity | None
    ) -> str:
        limit = policy.limit
        assert limit is not None
        per = limit.per
        if per == "route":
            return ""
        if per == "consumer" and identity is not None:
            return "c:" + identity.consumer
        if per == "header" and policy.limit_header is not None:
            value = exchange.header_value(policy.limit_header)
            if value is not None:
                return "h:" + _key_text(value)
        client = exchange.client
        return "ip:" + self._addresses.of(
            client.peer_host, client.trusted, exchange.forwarded[0]
        )

    def _take_local(
        self,
        exchange: Exchange,
        policy: _Policy,
        route_key: str,
        consumer_buckets: TokenBuckets | None,
        identity: Identity | None,
    ) -> Verdict:
        now = self._seconds()
        consumer = identity.consumer if identity is not None else None
        route_buckets = policy.buckets
        first = None
        if route_buckets is not None:
            first = route_buckets.bucket(route_key, now)
            if first[0] < 1.0:
                return self._limited(
                    route_buckets.limit, first[0], consumer, policy.route
                )
        drawn: list[tuple[RateLimit, float]] = []
        if consumer_buckets is not None:
            second = consumer_buckets.bucket("", now)
            if second[0] < 1.0:
                return self._limited(consumer_buckets.limit, second[0], consumer, None)
            second[0] -= 1.0
            drawn.append((consumer_buckets.limit, second[0]))
        if first is not None and route_buckets is not None:
            first[0] -= 1.0
            drawn.append((route_buckets.limit, first[0]))
        return accepted_verdict(self._accept(exchange, identity), drawn)

    def _limited(
        self, limit: RateLimit, level: float, consumer: str | None, route: str | None
    ) -> Verdict:
        self.counters.refuse(
            "rate", f"route:{route}" if route is not None else "consumer"
        )
        return limited_verdict(limit, level, consumer)

    def _take_shared(
        self,
        shared: SharedBuckets,
        policy: _Policy,
        route_key: str,
        consumer_buckets: TokenBuckets | None,
        identity: Identity | None,
    ) -> Deferred[tuple[int, list[float]]] | None:
        wanted: list[tuple[str, float, int]] = []
        if policy.buckets is not None:
            assert policy.route is not None and policy.limit is not None
            limit = policy.limit
            wanted.append(
                (shared.key("r", policy.route, route_key), limit.rate, limit.burst)
            )
        if consumer_buckets is not None:
            assert identity is not None
            limit = consumer_buckets.limit
            wanted.append((shared.key("c", identity.consumer), limit.rate, limit.burst))
        return shared.take(tuple(wanted))

    def _shared_answer(
        self,
        reply: tuple[int, list[float]],
        exchange: Exchange,
        policy: _Policy,
        identity: Identity | None,
    ) -> Verdict:
        deny, levels = reply
        if deny == 0:
            drawn: list[tuple[RateLimit, float]] = []
            if policy.limit is not None:
                drawn.append((policy.limit, levels[0]))
            if (
                identity is not None
                and identity.rate_limit is not None
                and len(levels) > len(drawn)
            ):
                drawn.append((identity.rate_limit, levels[len(drawn)]))
            return accepted_verdict(self._accept(exchange, identity), drawn)
        consumer = identity.consumer if identity is not None else None
        if deny == 1 and policy.limit is not None:
            return self._limited(policy.limit, levels[0], consumer, policy.route)
        assert identity is not None and identity.rate_limit is not None
        return self._limited(identity.rate_limit, levels[deny - 1], consumer, None)

    def _shared_failed(
        self,
        failure: Failure,
        exchange: Exchange,
        policy: _Policy,
        route_key: str,
        consumer_buckets: TokenBuckets | None,
        identity: Identity | None,
    ) -> Verdict:
        self._state_error(failure.getErrorMessage())
        if self._deny_on_state_error:
            self.counters.refuse("state", "unavailable")
            return self._state_down
        return self._take_local(exchange, policy, route_key, consumer_buckets, identity)

    def _state_error(self, reason: str) -> None:
        """Count every decision made without Redis; log at most once a minute."""
        self.counters.state_errors += 1
        now = self._seconds()
        if now - self._last_state_log >= STATE_LOG_INTERVAL:
            self._last_state_log = now
            log.warning(
                "shared_state_unavailable",
                reason=reason,
                action="deny" if self._deny_on_state_error else "local limits",
                errors_so_far=self.counters.state_errors,
            )


def _key_text(value: bytes) -> str:
    """A header value as a bucket key: long ones hashed, so keys stay small."""
    if len(value) > _MAX_KEY_TEXT:
        return hashlib.sha256(value).hexdigest()
    return value.decode("latin-1")
