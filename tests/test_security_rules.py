"""The security keys of the rule file: what they build and how they complain."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
from security_support import ISSUER, SIGNING_KEY, jwks, public_pem

from strangler.errors import ConfigError
from strangler.model import RateLimit, Rules
from strangler.rules import parse_rules

BASE = """\
upstreams:
  monolith:
    targets: [http://127.0.0.1:9001]
default: monolith
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Rules:
    return parse_rules(
        BASE + textwrap.dedent(text), str(tmp_path / "r.yaml"), env or {}
    )


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, env)
    prefix = str(tmp_path / "r.yaml") + ":"
    return [str(p).removeprefix(prefix) for p in caught.value.problems]


def test_consumers_keep_only_key_digests(tmp_path):
    (tmp_path / "keys.txt").write_text("# one per line\nfile-key-0123456789abcdef\n\n")
    digest = hashlib.sha256(b"hashed-key-0123456789ab").hexdigest()
    rules = load(
        tmp_path,
        f"""
        consumers:
          app:
            api_keys: [${{APP_KEY}}, 'sha256:{digest}']
            api_keys_file: keys.txt
            scopes: [users:read]
            rate_limit: {{rate: 10/s, burst: 20}}
        """,
        {"APP_KEY": "env-key-0123456789abcdef"},
    )

    app = rules.consumers["app"]
    assert app.key_hashes == (
        hashlib.sha256(b"env-key-0123456789abcdef").digest(),
        bytes.fromhex(digest),
        hashlib.sha256(b"file-key-0123456789abcdef").digest(),
    )
    assert "env-key" not in repr(rules)
    assert app.scopes == frozenset({"users:read"})
    assert app.rate_limit == RateLimit(rate=10.0, burst=20, per="consumer")


def test_route_security_keys(tmp_path):
    rules = load(
        tmp_path,
        """
        consumers: {app: {api_keys: [key-0123456789abcdef]}}
        routes:
          - name: users
            match: {path: /users}
            to: monolith
            auth: api_key
            require: {scopes: [users:read], roles: [staff]}
            rate_limit: {rate: 100/s, burst: 200, per: 'header:X-Tenant'}
            max_body: 1MiB
        """,
    )

    route = rules.routes[0]
    assert route.auth == "api_key"
    assert route.require.scopes == {"users:read"} and route.require.roles == {"staff"}
    assert route.rate_limit == RateLimit(
        rate=100.0, burst=200, per="header", header="x-tenant"
    )
    assert route.max_body == 1024 * 1024


def test_rate_spellings(tmp_path):
    rules = load(
        tmp_path,
        """
        routes:
          - {name: a, to: monolith, rate_limit: {rate: 10/m, per: ip}}
          - {name: b, to: monolith, rate_limit: {rate: 50/10s, per: ip}}
        """,
    )

    assert rules.routes[0].rate_limit == RateLimit(rate=10 / 60, burst=10, per="ip")
    assert rules.routes[1].rate_limit == RateLimit(rate=5.0, burst=50, per="ip")


def test_jwt_issuer_from_jwks_and_pem(tmp_path):
    (tmp_path / "jwks.json").write_bytes(jwks((SIGNING_KEY, "k1")))
    (tmp_path / "pub.pem").write_bytes(public_pem(SIGNING_KEY))
    rules = load(
        tmp_path,
        f"""
        auth:
          jwt:
            issuers:
              - issuer: {ISSUER}
                audience: [a, b]
                algorithms: [RS256]
                jwks_file: jwks.json
              - {{issuer: other, algorithms: [PS256], public_key: pub.pem}}
            leeway: 30s
        """,
    )

    first, second = rules.auth.jwt.issuers
    assert [k.kid for k in first.keys] == ["k1"]
    assert first.audience == ("a", "b")
    assert second.keys[0].family == "RSA"
    assert rules.auth.jwt.leeway == 30.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "consumers: {app: {api_keys: [short]}}\n",
            "5: consumers.app.api_keys[0]: an API key must be at least 16 characters, "
            "got one of 5",
        ),
        (
            "consumers:\n  a: {api_keys: [same-key-0123456789]}\n"
            "  b: {api_keys: [same-key-0123456789]}\n",
            "7: consumers.b.api_keys: a key of 'b' is also a key of consumer 'a'",
        ),
        (
            "routes:\n  - {name: r, to: monolith, auth: api_key}\n",
            "6: routes[0].auth: auth api_key needs consumers with api_keys; "
            "none have any",
        ),
        (
            "routes:\n  - {name: r, to: monolith, require: {scopes: [x]}}\n",
            "6: routes[0].require: require needs the route to authenticate; set auth",
        ),
        (
            "routes:\n  - {name: r, to: monolith, rate_limit: {rate: 1/s}}\n",
            "6: routes[0].rate_limit: per: consumer needs the route to authenticate; "
            "set auth, or per: ip",
        ),
        (
            "routes:\n  - {name: r, to: monolith, rate_limit: {rate: fast, per: ip}}\n",
            "6: routes[0].rate_limit.rate: expected a rate like 100/s, 10/m or 50/10s, "
            "got 'fast'",
        ),
        (
            "routes:\n  - {name: r, to: monolith, "
            "rate_limit: {rate: 1/s, per: user}}\n",
            "6: routes[0].rate_limit.per: expected one of consumer, ip, route, "
            "header:NAME, got 'user'",
        ),
        (
            "routes:\n  - {name: r, to: monolith, auth: maybe}\n",
            "6: routes[0].auth: expected one of api_key, jwt, any, none, got 'maybe'",
        ),
        (
            "auth:\n  jwt:\n    issuers:\n      - {issuer: x, algorithms: [none], "
            "secret: '0123456789abcdef0123456789abcdef'}\n",
            "8: auth.jwt.issuers[0].algorithms[0]: alg none is never accepted; "
            "name a signing algorithm",
        ),
        (
            "auth:\n  jwt:\n    issuers:\n      - {issuer: x, "
            "algorithms: [HS256, RS256], secret: '0123456789abcdef0123456789abcdef'}\n",
            "8: auth.jwt.issuers[0].algorithms: HS* algorithms go with a secret and "
            "only with a secret; never mix them with public keys",
        ),
        (
            "auth:\n  jwt:\n    issuers:\n      - {issuer: x, algorithms: [RS256], "
            "jwks_url: 'http://keys.example.test/jwks'}\n",
            "8: auth.jwt.issuers[0].jwks_url: expected an https:// URL (http only on "
            "loopback), got 'http://keys.example.test/jwks'",
        ),
        (
            "auth:\n  jwt:\n    issuers:\n      - {issuer: x, algorithms: [RS256], "
            "public_key: missing.pem}\n",
            "8: auth.jwt.issuers[0].public_key: cannot read 'missing.pem': "
            "No such file or directory",
        ),
        (
            "auth:\n  identity_headers: {consumer: X-Forwarded-For}\n",
            "6: auth.identity_headers.consumer: 'X-Forwarded-For' is managed by the "
            "gateway; pick another header",
        ),
        (
            "state: {redis: 'http://127.0.0.1:6379'}\n",
            "5: state.redis: expected a Redis URL like redis://127.0.0.1:6379/0, "
            "got 'http://127.0.0.1:6379'",
        ),
        (
            "tls: {cert: nope.pem, key: nope.key}\n",
            "5: tls.cert: cannot read 'nope.pem': No such file or directory",
        ),
    ],
)
def test_bad_security_keys_are_reported_with_line_and_key(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert expected in found, found


def test_private_key_given_as_public_key_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "private.pem").write_bytes(
        SIGNING_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    found = problems(
        tmp_path,
        """
        auth:
          jwt:
            issuers: [{issuer: x, algorithms: [RS256], public_key: private.pem}]
        """,
    )

    assert found == [
        "8: auth.jwt.issuers[0].public_key: the file holds a private key; "
        "give the public key only"
    ]


def test_rules_without_security_keys_build_no_gate(tmp_path):
    from twisted.internet.task import Clock

    from strangler.security.gate import build_gate

    assert build_gate(load(tmp_path, ""), Clock()) is None
