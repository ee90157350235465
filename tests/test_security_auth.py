"""API keys, JWT, scopes and identity headers, against the real gateway.

Every refused request is checked twice: the status and challenge the client
gets, and that the upstream never saw it.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from security_support import (
    ADMIN_KEY,
    AUDIENCE,
    ISSUER,
    MOBILE_KEY,
    OTHER_KEY,
    SIGNING_KEY,
    auth_rules,
    body_of,
    claims,
    forged,
    get,
    hs256_with,
    jwks,
    public_pem,
    seen_headers,
    send,
    token,
    write_keys,
    www_authenticate,
)
from twisted.internet import reactor
from twisted.web import resource, server

ensure = pytest_twisted.ensureDeferred


@pytest.fixture
def secured(tmp_path, backends, gateway):  # type: ignore[no-untyped-def]
    """A gateway with consumers, JWT and identity headers in front of one backend."""
    write_keys(tmp_path)
    backend = backends("monolith")
    running = gateway(auth_rules(backend.url))
    return backend, running


def gate_of(running):  # type: ignore[no-untyped-def]
    return running.server.gateway.state.gate


@ensure
async def test_valid_api_key_reaches_upstream_as_its_consumer(secured):
    backend, gw = secured

    status, _raw = await send(
        gw.port, get("/api/v1/users/1", f"X-Api-Key: {MOBILE_KEY}")
    )

    assert status == 200
    headers = seen_headers(backend.requests[0])
    assert headers["x-consumer"] == ["mobile-app"]
    assert "x-user-id" not in headers


@ensure
async def test_api_key_from_key_file_is_accepted(secured):
    backend, gw = secured

    status, _raw = await send(gw.port, get("/admin/panel", f"X-Api-Key: {ADMIN_KEY}"))

    assert status == 200
    assert seen_headers(backend.requests[0])["x-consumer"] == ["admin-tool"]


@ensure
async def test_missing_api_key_gets_401_with_challenge(secured):
    backend, gw = secured

    status, raw = await send(gw.port, get("/keys/x"))

    assert status == 401
    assert www_authenticate(raw) == [b'ApiKey realm="strangler", header="x-api-key"']
    assert body_of(raw)["error"] == "unauthorized"
    assert backend.requests == []


@ensure
async def test_wrong_api_key_gets_401_and_is_counted(secured):
    backend, gw = secured

    wrong = MOBILE_KEY[:-1] + "X"
    status, raw = await send(gw.port, get("/keys/x", f"X-Api-Key: {wrong}"))

    assert status == 401
    assert b'error="invalid_key"' in www_authenticate(raw)[0]
    assert backend.requests == []
    assert gate_of(gw).counters.refused[("auth", "invalid_key")] == 1


@ensure
async def test_api_key_in_query_string_is_ignored_unless_configured(secured):
    backend, gw = secured

    status, _raw = await send(gw.port, get(f"/keys/x?api_key={MOBILE_KEY}"))

    assert status == 401
    assert backend.requests == []


@ensure
async def test_api_key_in_query_string_when_configured(tmp_path, backends, gateway):
    write_keys(tmp_path)
    backend = backends("monolith")
    text = auth_rules(backend.url).replace(
        "api_key: {header: X-Api-Key}", "api_key: {header: X-Api-Key, query: api_key}"
    )
    gw = gateway(text)

    status, _raw = await send(gw.port, get(f"/keys/x?a=1&api_key={MOBILE_KEY}"))

    assert status == 200
    assert seen_headers(backend.requests[0])["x-consumer"] == ["mobile-app"]


@ensure
async def test_api_key_from_environment_variable(
    tmp_path, backends, gateway, monkeypatch
):
    write_keys(tmp_path)
    monkeypatch.setenv("STRANGLER_TEST_KEY", "env-key-abcdefghijklmnop")
    backend = backends("monolith")
    gw = gateway(
        auth_rules(backend.url).replace(
            f"api_keys: [{MOBILE_KEY}]", "api_keys: [${STRANGLER_TEST_KEY}]"
        )
    )

    accepted, _ = await send(
        gw.port, get("/keys/x", "X-Api-Key: env-key-abcdefghijklmnop")
    )
    refused, _ = await send(gw.port, get("/keys/x", f"X-Api-Key: {MOBILE_KEY}"))

    assert (accepted, refused) == (200, 401)


@ensure
async def test_valid_token_sets_identity_headers_from_claims(secured):
    backend, gw = secured

    status, _raw = await send(
        gw.port, get("/tokens/me", f"Authorization: Bearer {token(claims(sub='u-7'))}")
    )

    assert status == 200
    headers = seen_headers(backend.requests[0])
    assert headers["x-consumer"] == ["u-7"]
    assert headers["x-user-id"] == ["u-7"]


@ensure
async def test_client_sent_identity_headers_are_removed(secured):
    backend, gw = secured

    await send(
        gw.port,
        get(
            "/tokens/me",
            f"Authorization: Bearer {token()}",
            "X-Consumer: root",
            "X-User-Id: 0",
            "x-user-id: 1",
        ),
    )
    await send(gw.port, get("/open/page", "X-Consumer: root", "X-User-Id: 0"))

    with_token, anonymous = (seen_headers(r) for r in backend.requests)
    assert with_token["x-consumer"] == ["user-42"]
    assert with_token["x-user-id"] == ["user-42"]
    assert "x-consumer" not in anonymous
    assert "x-user-id" not in anonymous


@ensure
async def test_connection_header_cannot_remove_identity_headers(secured):
    backend, gw = secured

    status, _raw = await send(
        gw.port,
        get(
            "/keys/x",
            f"X-Api-Key: {MOBILE_KEY}",
            "Connection: X-Consumer, X-Request-Id",
        ),
    )

    assert status == 200
    headers = seen_headers(backend.requests[0])
    assert headers["x-consumer"] == ["mobile-app"]
    assert len(headers["x-request-id"]) == 1


@ensure
async def test_missing_scope_gets_403(secured):
    backend, gw = secured

    by_key, raw_key = await send(gw.port, get("/admin/x", f"X-Api-Key: {MOBILE_KEY}"))
    by_token, raw_token = await send(
        gw.port,
        get("/api/v1/users", f"Authorization: Bearer {token(claims(scope='other'))}"),
    )

    assert (by_key, by_token) == (403, 403)
    assert body_of(raw_key)["error"] == "forbidden"
    assert b'error="insufficient_scope"' in www_authenticate(raw_token)[0]
    assert b'scope="users:read"' in www_authenticate(raw_token)[0]
    assert backend.requests == []


@ensure
async def test_scope_from_token_list_claim_is_accepted(secured):
    backend, gw = secured

    payload = claims(scope=None, scp=["users:read", "x"])
    status, _raw = await send(
        gw.port, get("/api/v1/users", f"Authorization: Bearer {token(payload)}")
    )

    assert status == 200
    assert len(backend.requests) == 1


@ensure
async def test_any_accepts_either_credential_and_challenges_both(secured):
    backend, gw = secured

    by_key, _ = await send(gw.port, get("/api/v1/users", f"X-Api-Key: {MOBILE_KEY}"))
    by_token, _ = await send(
        gw.port, get("/api/v1/users", f"Authorization: Bearer {token()}")
    )
    neither, raw = await send(gw.port, get("/api/v1/users"))

    assert (by_key, by_token, neither) == (200, 200, 401)
    challenges = www_authenticate(raw)
    assert [c.split(b" ")[0] for c in challenges] == [b"ApiKey", b"Bearer"]
    assert len(backend.requests) == 2


def _attacks() -> dict[str, str]:
    good = claims()
    pem = public_pem(SIGNING_KEY)
    return {
        "alg none": forged({"alg": "none", "typ": "JWT"}, good, b""),
        "alg none with signature": forged({"alg": "none"}, good, b"x"),
        "alg NONE": forged({"alg": "NONE", "kid": "k1"}, good, b"x"),
        "hs256 signed with the rsa public key": hs256_with(pem, good),
        "jku header": token(jku="https://evil.test/jwks.json"),
        "x5u header": token(x5u="https://evil.test/cert.pem"),
        "embedded jwk": token(jwk={"kty": "oct", "k": "c2VjcmV0"}),
        "kid path traversal": token(kid="../../../../dev/null"),
        "kid with slash": token(kid="keys/k1"),
        "unknown kid": token(kid="k9"),
        "wrong signing key": token(key=OTHER_KEY),
        "wrong audience": token(claims(aud="someone-else")),
        "wrong issuer": token(claims(iss="https://evil.test")),
        "expired": token(claims(exp=int(time.time()) - 3600)),
        "not yet valid": token(claims(nbf=int(time.time()) + 3600)),
        "no exp": token(claims(exp=None)),
        "bad base64": "eyJhbGciOiJSUzI1NiJ9.e30!.c2ln",
        "two parts": "eyJhbGciOiJSUzI1NiJ9.e30",
        "header not json": b64_parts(b"not json", b"{}"),
        "crit header": token(crit=["exp"]),
        "truncated signature": token()[:-10],
    }


def b64_parts(header: bytes, payload: bytes) -> str:
    from security_support import b64

    return f"{b64(header)}.{b64(payload)}.{b64(b'sig')}"


@ensure
async def test_every_jwt_attack_gets_401_with_reason_and_is_counted(secured):
    backend, gw = secured

    answers = {}
    for name, bad in _attacks().items():
        status, raw = await send(
            gw.port, get("/tokens/x", f"Authorization: Bearer {bad}")
        )
        challenge = www_authenticate(raw)
        answers[name] = (status, challenge)

    for name, (status, challenge) in answers.items():
        assert status == 401, name
        assert len(challenge) == 1, name
        assert challenge[0].startswith(
            b'Bearer realm="strangler", error="invalid_token", error_description="'
        ), name
    assert backend.requests == []
    counted = sum(
        n for (kind, _), n in gate_of(gw).counters.refused.items() if kind == "jwt"
    )
    assert counted == len(answers)


@ensure
async def test_jwt_refusal_reasons_name_the_problem(secured):
    _backend, gw = secured
    attacks = _attacks()
    expected = {
        "alg none": "unsigned tokens (alg none) are not accepted",
        "hs256 signed with the rsa public key": "algorithm not allowed",
        "jku header": "token header names its own key (jku, x5u, jwk, x5c)",
        "kid path traversal": "key id is not a plain name",
        "unknown kid": "unknown key id",
        "wrong audience": "wrong audience",
        "expired": "token expired",
        "not yet valid": "token not yet valid",
        "bad base64": "malformed token",
        "wrong signing key": "bad signature",
    }

    for name, reason in expected.items():
        _status, raw = await send(
            gw.port, get("/tokens/x", f"Authorization: Bearer {attacks[name]}")
        )
        assert f'error_description="{reason}"'.encode() in www_authenticate(raw)[0], (
            name
        )
        assert body_of(raw)["message"] == reason


@ensure
async def test_leeway_accepts_a_token_just_expired(secured):
    backend, gw = secured

    recent = token(claims(exp=int(time.time()) - 2))
    status, _raw = await send(
        gw.port, get("/tokens/x", f"Authorization: Bearer {recent}")
    )

    assert status == 200
    assert len(backend.requests) == 1


@ensure
async def test_cached_token_is_refused_once_it_expires(secured):
    from twisted.internet.task import deferLater

    backend, gw = secured
    soon = token(claims(exp=int(time.time()) - 3))  # valid for 1 to 2 s more

    first, _ = await send(gw.port, get("/tokens/x", f"Authorization: Bearer {soon}"))
    await deferLater(reactor, 2.1, lambda: None)
    second, raw = await send(gw.port, get("/tokens/x", f"Authorization: Bearer {soon}"))

    assert (first, second) == (200, 401)
    assert b"token expired" in www_authenticate(raw)[0]
    assert len(backend.requests) == 1


@ensure
async def test_public_key_pem_issuer(tmp_path, backends, gateway):
    (tmp_path / "signer.pem").write_bytes(public_pem(SIGNING_KEY))
    backend = backends("monolith")
    gw = gateway(f"""
listen: 127.0.0.1:0
access_log: false
upstreams: {{monolith: {{targets: [{backend.url}]}}}}
default: monolith
auth:
  default: jwt
  jwt:
    issuers:
      - issuer: {ISSUER}
        audience: {AUDIENCE}
        algorithms: [RS256]
        public_key: signer.pem
""")

    good, _ = await send(gw.port, get("/x", f"Authorization: Bearer {token(kid=None)}"))
    bad, _ = await send(
        gw.port, get("/x", f"Authorization: Bearer {token(key=OTHER_KEY, kid=None)}")
    )

    assert (good, bad) == (200, 401)
    assert len(backend.requests) == 1


class _JwksResource(resource.Resource):
    isLeaf = True

    def __init__(self, document: bytes) -> None:
        super().__init__()
        self.document = document
        self.fetches = 0

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        self.fetches += 1
        request.setHeader(b"Content-Type", b"application/json")
        return self.document


@ensure
async def test_jwks_url_is_fetched_and_refreshed_on_unknown_kid_once(
    tmp_path, backends, gateway
):
    keys = _JwksResource(jwks((SIGNING_KEY, "k1")))
    site = server.Site(keys)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        backend = backends("monolith")
        url = f"http://127.0.0.1:{port.getHost().port}/jwks.json"
        gw = gateway(_jwks_url_rules(backend.url, url))
        first, _ = await send(gw.port, get("/x", f"Authorization: Bearer {token()}"))

        keys.document = jwks((SIGNING_KEY, "k1"), (OTHER_KEY, "k2"))
        rotated, _ = await send(
            gw.port,
            get("/x", f"Authorization: Bearer {token(key=OTHER_KEY, kid='k2')}"),
        )
        fetches_after_rotation = keys.fetches
        unknown = []
        for i in range(5):
            status, _ = await send(
                gw.port, get("/x", f"Authorization: Bearer {token(kid=f'k-{i}')}")
            )
            unknown.append(status)
    finally:
        await port.stopListening()

    assert (first, rotated) == (200, 200)
    assert fetches_after_rotation == 2
    assert unknown == [401] * 5
    assert keys.fetches == 2
    assert len(backend.requests) == 2


@ensure
async def test_leeway_accepts_a_token_not_yet_valid_by_less_than_it(secured):
    backend, gw = secured
    now = int(time.time())

    early = token(claims(nbf=now + 3))  # leeway is 5s
    too_early = token(claims(nbf=now + 60))
    accepted, _ = await send(
        gw.port, get("/tokens/x", f"Authorization: Bearer {early}")
    )
    refused, raw = await send(
        gw.port, get("/tokens/y", f"Authorization: Bearer {too_early}")
    )

    assert (accepted, refused) == (200, 401)
    assert b'error_description="token not yet valid"' in www_authenticate(raw)[0]
    assert [r["uri"] for r in backend.requests] == ["/tokens/x"]


def _jwks_url_rules(backend: str, url: str) -> str:
    return f"""
listen: 127.0.0.1:0
access_log: false
upstreams: {{monolith: {{targets: [{backend}]}}}}
default: monolith
auth:
  default: jwt
  jwt:
    issuers:
      - issuer: {ISSUER}
        audience: {AUDIENCE}
        algorithms: [RS256]
        jwks_url: '{url}'
"""


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@ensure
async def test_jwks_url_down_gives_503_auth_unavailable_not_401(backends, gateway):
    backend = backends("monolith")
    url = f"http://127.0.0.1:{_closed_port()}/jwks.json"
    gw = gateway(_jwks_url_rules(backend.url, url))

    answers = [
        await send(gw.port, get(f"/x/{i}", f"Authorization: Bearer {token()}"))
        for i in range(3)
    ]

    assert [status for status, _ in answers] == [503] * 3
    for _status, raw in answers:
        assert body_of(raw)["error"] == "auth_unavailable"
        assert www_authenticate(raw) == []  # the token was not judged bad
        assert b"Retry-After: 5\r\n" in raw
    counters = gate_of(gw).counters
    assert counters.jwks_failures >= 1
    assert counters.refused[("jwt", "the issuer's signing keys are not available")] == 3
    assert backend.requests == []


@ensure
async def test_fetched_keys_keep_serving_when_the_jwks_url_goes_down(backends, gateway):
    keys = _JwksResource(jwks((SIGNING_KEY, "k1")))
    port = reactor.listenTCP(0, server.Site(keys), interface="127.0.0.1")
    backend = backends("monolith")
    url = f"http://127.0.0.1:{port.getHost().port}/jwks.json"
    gw = gateway(_jwks_url_rules(backend.url, url))
    try:
        before, _ = await send(gw.port, get("/a", f"Authorization: Bearer {token()}"))
    finally:
        await port.stopListening()

    after, _ = await send(
        gw.port, get("/b", f"Authorization: Bearer {token(claims(sub='u-2'))}")
    )

    assert (before, after) == (200, 200)
    assert [r["uri"] for r in backend.requests] == ["/a", "/b"]
