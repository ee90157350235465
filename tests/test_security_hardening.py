"""Hostile request heads, bodies and paths, sent as raw bytes to the real gateway.

Each case is listed with its expected answer in docs/security.md; for each
one the test checks the status and that nothing reached the upstream.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from security_support import auth_rules, get, seen_headers, send, token, write_keys
from support import raw_exchange, status_of
from twisted.internet import defer, protocol, reactor

from strangler.security.paths import PathError, normalise_path, routing_path

ensure = pytest_twisted.ensureDeferred


def rules(backend: str, extra: str = "") -> str:
    return f"""
listen: 127.0.0.1:0
access_log: false
{extra}
upstreams:
  monolith:
    targets: [{backend}]
  admin:
    targets: [{backend}]
default: monolith
routes:
  - name: admin
    match: {{path: /admin}}
    to: admin
  - name: small
    match: {{path: /small}}
    to: monolith
    max_body: 16
"""


H = b"Host: gw.test\r\n"

SMUGGLING = {
    "content-length with transfer-encoding": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate content-length, same value": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nab",
    "duplicate content-length, other value": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "content-length list": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 2, 2\r\n\r\nab",
    "signed content-length +": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: +2\r\n\r\nab",
    "signed content-length -": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: -2\r\n\r\nab",
    "non-numeric content-length": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 2a\r\n\r\nab",
    "overflowing content-length": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 99999999999999999999999\r\n\r\n",
    "transfer-encoding gzip, chunked": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding chunked, chunked": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding twice": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding identity": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: identity\r\n\r\n",
    "transfer-encoding xchunked": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "chunked on HTTP/1.0": b"POST / HTTP/1.0\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk size not hex": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "negative chunk size": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n0\r\n\r\n",
    "overflowing chunk size": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nab\r\n0\r\n\r\n",
    "chunk size ended by bare LF": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n",
    "chunk data longer than its size": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n",
    "bare CR in a header value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n",
    "bare LF in a header value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nX-B: c\r\n\r\n",
    "NUL in a header value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "whitespace before the colon": b"GET / HTTP/1.1\r\nHost : gw.test\r\n\r\n",
    "space inside a header name": b"GET / HTTP/1.1\r\n" + H + b"X A: a\r\n\r\n",
    "obsolete line folding": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",
    "request line ended by bare LF": b"GET / HTTP/1.1\nHost: gw.test\n\n",
    "missing Host": b"GET / HTTP/1.1\r\n\r\n",
    "duplicate Host": b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    "empty Host": b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
    "Host with a space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "Host with markup": b'GET / HTTP/1.1\r\nHost: "><script>x</script>\r\n\r\n',
    "Host with a path": b"GET / HTTP/1.1\r\nHost: a.test/evil\r\n\r\n",
    "Host with userinfo": b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n",
    "Host with a bad port": b"GET / HTTP/1.1\r\nHost: a.test:80x\r\n\r\n",
    "absolute-form without a path": b"GET http://evil.test HTTP/1.1\r\n" + H + b"\r\n",
}


@ensure
async def test_every_smuggling_and_host_case_gets_400_closes_and_reaches_nothing(
    backends, gateway
):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    answers = {}
    for name, payload in SMUGGLING.items():
        # A second, valid request pipelined behind: it must never be answered.
        raw = await raw_exchange(
            gw.port, payload + b"GET /after HTTP/1.1\r\n" + H + b"\r\n"
        )
        answers[name] = raw

    for name, raw in answers.items():
        assert status_of(raw) == 400, name
        assert raw.count(b"HTTP/1.1 ") == 1, name
        assert b"Connection: close" in raw, name
        assert b"<script>" not in raw, name
    assert backend.requests == [], backend.requests


PATHS = {
    # sent -> (what the upstream receives, what routes match)
    b"/api/v1/users/42": ("/api/v1/users/42", "/api/v1/users/42"),
    b"/a/./b": ("/a/b", "/a/b"),
    b"/a/../b": ("/b", "/b"),
    b"//a///b": ("/a/b", "/a/b"),
    b"/a/b/": ("/a/b/", "/a/b/"),
    b"/a/b/..": ("/a/", "/a/"),
    b"/a/%2e%2e/b": ("/b", "/b"),
    b"/a/.%2E/b": ("/b", "/b"),
    b"/a%41b": ("/a%41b", "/aAb"),
    b"/%61pi/%7Eme": ("/%61pi/%7Eme", "/api/~me"),
    b"/a;jsessionid=1/b;x": ("/a;jsessionid=1/b;x", "/a/b"),
    b"/cart/;jsessionid=1": ("/cart/;jsessionid=1", "/cart/"),
    b"/files/a%2fb": ("/files/a%2fb", "/files/a%2Fb"),
    b"/files/a%2fb/../c": ("/files/c", "/files/c"),
    b"/q%20r": ("/q%20r", "/q%20r"),
    b"/.well-known/x": ("/.well-known/x", "/.well-known/x"),
    b"/a.b/c..d/...": ("/a.b/c..d/...", "/a.b/c..d/..."),
}

BAD_PATHS = [
    b"/..",
    b"/a/../../b",
    b"/%2e%2e/admin",
    b"/a\\b",
    b"/a%5C..%5Cadmin",
    b"/a%2F..%2Fadmin",
    b"/a%2F..;x%2Fadmin",
    b"/a%252e%252e/admin",
    b"/a%00b",
    b"/a%0d%0aX-Injected:%201",
    b"/a%zz",
    b"/a%4",
    b"/a;p%zz",
    b"/a/b/..;/c",
    b"/public/..;x/admin",
    b"/a/.;x/b",
    b"/a/%2e%2e;/b",
]


@pytest.mark.parametrize(("sent", "expected"), PATHS.items())
def test_normalise_path(sent, expected):
    wire = normalise_path(sent)
    assert (wire, routing_path(wire)) == (expected[0].encode(), expected[1].encode())


@pytest.mark.parametrize("sent", BAD_PATHS)
def test_unsafe_path_is_refused(sent):
    with pytest.raises(PathError):
        normalise_path(sent)


def test_plain_path_is_returned_as_is():
    path = b"/api/v1/users/42"
    assert normalise_path(path) is path
    assert routing_path(path) is path


@ensure
async def test_upstream_receives_the_path_as_sent_after_normalisation(
    backends, gateway
):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    for sent in PATHS:
        raw = await raw_exchange(
            gw.port,
            b"GET "
            + sent
            + b"?x=%2e&y=%41;z HTTP/1.1\r\n"
            + H
            + b"Connection: close\r\n\r\n",
        )
        assert status_of(raw) == 200, sent

    assert [r["uri"] for r in backend.requests] == [
        wire + "?x=%2e&y=%41;z" for wire, _ in PATHS.values()
    ]
    logged = [line["path"] for line in gw.log_lines()]
    assert logged == [routed for _, routed in PATHS.values()]


@ensure
async def test_route_is_chosen_on_what_the_upstream_acts_on(backends, gateway):
    mono, admin = backends("monolith"), backends("admin")
    text = rules(mono.url).replace(
        f"  admin:\n    targets: [{mono.url}]", f"  admin:\n    targets: [{admin.url}]"
    )
    gw = gateway(text)

    sent = {
        b"/public/../admin/x": "/admin/x",
        b"//admin/x": "/admin/x",
        b"/./admin/x": "/admin/x",
        b"/%61dmin/x": "/%61dmin/x",
        b"/ADMIN/../%61dmin": "/%61dmin",
        b"/admin;x/x": "/admin;x/x",
        b"/admin%2Fx": "/admin%2Fx",
    }
    for path in sent:
        raw = await raw_exchange(
            gw.port,
            b"GET " + path + b" HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
        )
        assert status_of(raw) == 200, path

    assert [r["uri"] for r in admin.requests] == list(sent.values())[:-1]
    assert [r["uri"] for r in mono.requests] == ["/admin%2Fx"]


@ensure
async def test_rewrite_keeps_escapes_and_parameters_past_the_prefix(backends, gateway):
    backend = backends("monolith")
    routes = """
  - name: v1
    match: {path: /api/v1/users}
    to: monolith
    rewrite: {prefix: /api/v1/users, to: /api/v2/users}
"""
    gw = gateway(rules(backend.url) + routes)

    for sent in (
        b"/api/v1/users/%41b;v=1/x%2fy",
        b"/api/v1/%75sers/7",
        b"/api/v1/users;jsessionid=9/8",
    ):
        raw = await raw_exchange(
            gw.port,
            b"GET " + sent + b"?q=%41 HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
        )
        assert status_of(raw) == 200, sent

    assert [r["uri"] for r in backend.requests] == [
        "/api/v2/users/%41b;v=1/x%2fy?q=%41",
        "/api/v2/users/7?q=%41",
        "/api/v2/users/8?q=%41",
    ]


@ensure
async def test_unsafe_paths_get_400_and_reach_nothing(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    for sent in BAD_PATHS:
        raw = await raw_exchange(
            gw.port, b"GET " + sent + b" HTTP/1.1\r\n" + H + b"\r\n"
        )
        assert status_of(raw) == 400, sent
        assert b'"error":"bad_request"' in raw
    assert backend.requests == [], backend.requests


@ensure
async def test_absolute_form_target_is_normalised_and_never_picks_the_host(
    backends, gateway
):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    raw = await raw_exchange(
        gw.port,
        b"GET http://127.0.0.1:1/x/../admin/y?z HTTP/1.1\r\n"
        + H
        + b"Connection: close\r\n\r\n",
    )

    assert status_of(raw) == 200
    assert backend.requests[0]["uri"] == "/admin/y?z"


# -- limits ------------------------------------------------------------


@ensure
async def test_declared_body_over_route_max_body_gets_413_at_once(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    # Only the head is sent: the answer must not wait for the body.
    status, raw = await send(
        gw.port, b"POST /small HTTP/1.1\r\n" + H + b"Content-Length: 17\r\n\r\n"
    )
    fits, _ = await send(
        gw.port,
        b"POST /small HTTP/1.1\r\n"
        + H
        + b"Content-Length: 16\r\nConnection: close\r\n\r\n"
        + b"x" * 16,
    )

    assert status == 413
    assert b'"error":"body_too_large"' in raw
    assert fits == 200
    assert [r["body_bytes"] for r in backend.requests] == [16]


@ensure
async def test_chunked_body_over_max_body_gets_413_and_closes(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    raw = await raw_exchange(
        gw.port,
        [
            b"POST /small HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n",
            b"a\r\n0123456789\r\n",
            b"a\r\n0123456789\r\n0\r\n\r\nGET /after HTTP/1.1\r\n" + H + b"\r\n",
        ],
    )

    assert status_of(raw) == 413
    assert raw.count(b"HTTP/1.1 ") == 1
    assert b"Connection: close" in raw
    assert all(r["uri"] != "/after" for r in backend.requests)
    assert all(r["body_bytes"] <= 16 for r in backend.requests)


@ensure
async def test_global_max_body_applies_to_routes_without_their_own(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, extra="limits: {max_body: 8}"))

    over, _ = await send(
        gw.port, b"POST /x HTTP/1.1\r\n" + H + b"Content-Length: 9\r\n\r\n123456789"
    )
    route_own, _ = await send(
        gw.port,
        b"POST /small HTTP/1.1\r\n"
        + H
        + b"Content-Length: 12\r\nConnection: close\r\n\r\n"
        + b"x" * 12,
    )

    assert (over, route_own) == (413, 200)
    assert [r["uri"] for r in backend.requests] == ["/small"]


@ensure
async def test_header_limits_answer_with_a_status(backends, gateway):
    backend = backends("monolith")
    gw = gateway(
        rules(backend.url, extra="limits: {max_header_bytes: 1KiB, max_headers: 5}")
    )

    too_big, _ = await send(
        gw.port, b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"y" * 2048 + b"\r\n\r\n"
    )
    too_many, _ = await send(
        gw.port,
        b"GET / HTTP/1.1\r\n"
        + H
        + b"".join(b"X-%d: 1\r\n" % i for i in range(8))
        + b"\r\n",
    )
    long_target, _ = await send(
        gw.port, b"GET /" + b"a" * 2048 + b" HTTP/1.1\r\n" + H + b"\r\n"
    )

    assert (too_big, too_many, long_target) == (431, 431, 414)
    assert backend.requests == [], backend.requests


@ensure
async def test_slow_request_head_gets_408(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, extra="limits: {client_header_timeout: 300ms}"))

    raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: gw", wait=3.0)

    assert status_of(raw) == 408
    assert backend.requests == [], backend.requests


class _ConflictingFraming(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )


@ensure
async def test_upstream_response_with_conflicting_framing_gets_502(gateway):
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(_ConflictingFraming), interface="127.0.0.1"
    )
    try:
        gw = gateway(rules(f"http://127.0.0.1:{port.getHost().port}"))
        raw = await raw_exchange(
            gw.port, b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
        )
    finally:
        await port.stopListening()

    assert status_of(raw) == 502


class _Trickle(protocol.Protocol):
    """Writes its pieces one reactor turn apart, as a slow client would."""

    def __init__(self, pieces: list[bytes], done: defer.Deferred[bytes]) -> None:
        self.pieces = list(pieces)
        self.done = done
        self.received = bytearray()
        self.call = None

    def connectionMade(self) -> None:
        self._next()

    def _next(self) -> None:
        self.call = None
        if self.pieces and self.transport.connected:
            self.transport.write(self.pieces.pop(0))
            self.call = reactor.callLater(0.005, self._next)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        if not self.done.called:
            self.done.callback(bytes(self.received))


def trickle(port: int, pieces: list[bytes]) -> defer.Deferred[bytes]:
    """Send `pieces` in separate writes; everything received until the close."""
    done: defer.Deferred[bytes] = defer.Deferred()
    factory = protocol.ClientFactory.forProtocol(lambda: _Trickle(pieces, done))
    factory.protocol = lambda: _Trickle(pieces, done)  # type: ignore[assignment]
    connector = reactor.connectTCP("127.0.0.1", port, factory)
    give_up = reactor.callLater(10, connector.disconnect)
    done.addBoth(lambda result: (give_up.active() and give_up.cancel(), result)[1])
    return done


def head_lines(kib: int) -> list[bytes]:
    """A request head of about `kib` KiB, one header line per piece."""
    lines = [b"GET /big HTTP/1.1\r\n", H]
    lines += [b"X-Filler-%02d: %s\r\n" % (i, b"v" * 1000) for i in range(kib)]
    lines.append(b"Connection: close\r\n\r\n")
    return lines


@ensure
async def test_header_size_is_counted_once_when_the_head_arrives_in_pieces(
    backends, gateway
):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, extra="limits: {max_header_bytes: 16KiB}"))

    fits = await trickle(gw.port, head_lines(9))
    too_big = await trickle(gw.port, head_lines(17))

    assert status_of(fits) == 200
    assert status_of(too_big) == 431
    assert b'"error":"header_too_large"' in too_big
    assert [r["uri"] for r in backend.requests] == ["/big"]


# -- headers a client may not forge, in any spelling ------------------------------

UNDERSCORED = (
    "X_User_Id: 0",
    "X_Consumer: root",
    "x-user_id: 1",
    "X_Forwarded_For: 6.6.6.6",
    "X_Forwarded_Host: evil.test",
    "X_Request_Id: forged-request-id",
)


@ensure
async def test_underscore_spellings_of_gateway_headers_never_reach_the_upstream(
    tmp_path, backends, gateway
):
    write_keys(tmp_path)
    backend = backends("monolith")
    gw = gateway(auth_rules(backend.url))

    with_token, _ = await send(
        gw.port, get("/tokens/me", f"Authorization: Bearer {token()}", *UNDERSCORED)
    )
    anonymous, _ = await send(gw.port, get("/open/page", *UNDERSCORED))

    assert (with_token, anonymous) == (200, 200)
    for seen in backend.requests:
        names = {name.lower() for name, _value in seen["headers"]}
        assert not any("_" in name for name in names), names
    signed, unsigned = (seen_headers(r) for r in backend.requests)
    assert signed["x-user-id"] == ["user-42"]
    assert signed["x-consumer"] == ["user-42"]
    assert "x-user-id" not in unsigned
    assert "x-consumer" not in unsigned
    assert unsigned["x-forwarded-for"] == ["127.0.0.1"]
    assert unsigned["x-forwarded-host"] == ["gw.test"]


@ensure
async def test_underscore_forwarding_headers_are_dropped_without_any_auth(
    backends, gateway
):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    status, _ = await send(gw.port, get("/x", *UNDERSCORED))

    assert status == 200
    names = {name.lower() for name, _value in backend.requests[0]["headers"]}
    assert "x_forwarded_for" not in names
    assert "x_request_id" not in names
    assert "x_forwarded_host" not in names


# -- Host and HTTP versions ------------------------------------------------------


@ensure
async def test_http10_request_without_host_gets_the_target_as_host(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    status, _ = await send(gw.port, b"GET /old-client HTTP/1.0\r\n\r\n")
    kept, _ = await send(gw.port, b"GET /with-host HTTP/1.0\r\nHost: shop.test\r\n\r\n")

    assert (status, kept) == (200, 200)
    without, with_host = (seen_headers(r) for r in backend.requests)
    assert without["host"] == [backend.url.removeprefix("http://")]
    assert "x-forwarded-host" not in without
    assert with_host["host"] == ["shop.test"]


@ensure
async def test_versions_other_than_http10_and_http11_get_505(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    answers = []
    for payload in (
        b"GET / HTTP/2.0\r\n" + H + b"\r\n",
        b"GET / HTTP/0.9\r\n\r\n",
        b"GET /\r\n\r\n",
    ):
        raw = await raw_exchange(
            gw.port, payload + b"GET /after HTTP/1.1\r\n" + H + b"\r\n"
        )
        answers.append(raw)

    for raw in answers:
        assert status_of(raw) == 505, raw
        assert b'"error":"http_version_not_supported"' in raw
        assert b"Connection: close" in raw
        assert raw.count(b"HTTP/1.1 ") == 1
    assert backend.requests == []


@ensure
async def test_connection_header_cannot_remove_host(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    status, _ = await send(
        gw.port, b"GET / HTTP/1.1\r\n" + H + b"Connection: close, Host\r\n\r\n"
    )

    assert status == 200
    assert seen_headers(backend.requests[0])["host"] == ["gw.test"]


@ensure
async def test_host_port_must_be_between_1_and_65535(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url))

    statuses = {}
    for host in (b"a.test:99999", b"a.test:0", b"[::1]:65536", b"a.test:65535"):
        raw = await raw_exchange(
            gw.port,
            b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
        )
        statuses[host] = status_of(raw)

    assert statuses == {
        b"a.test:99999": 400,
        b"a.test:0": 400,
        b"[::1]:65536": 400,
        b"a.test:65535": 200,
    }
    assert [seen_headers(r)["host"] for r in backend.requests] == [["a.test:65535"]]
