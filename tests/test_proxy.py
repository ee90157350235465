"""The transparent gateway end to end: real backends, real gateway, real clients."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest_twisted
import support
from cli_support import ServeProcess, run_cli
from support import header_values, raw_exchange, status_of, write_rules
from twisted.internet import defer, protocol, reactor

from strangler.model import HeaderEdits, HeaderRules
from strangler.rules import load_rules

ensure = pytest_twisted.ensureDeferred


def two_upstreams(mono: str, users: str, extra: str = "", routes: str = "") -> str:
    return f"""
listen: 127.0.0.1:0
{extra}
upstreams:
  monolith:
    targets: [{mono}]
  users:
    targets: [{users}]
default: monolith
routes:
  - name: users-v2
    match: {{path: /api/v2/users}}
    to: users
{routes}
"""


def seen_headers(body: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


@ensure
async def test_unmatched_request_reaches_default_unchanged(backends, gateway, client):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    response = await client.post(
        gw.url + "/legacy/orders/7?sort=desc&x=%20y",
        data=b"payload-bytes",
        headers={"X-Custom": ["one", "two"], "Content-Type": ["text/plain"]},
    )
    body = json.loads(await response.content())

    assert response.code == 200
    assert body["served_by"] == "monolith"
    assert body["method"] == "POST"
    assert body["uri"] == "/legacy/orders/7?sort=desc&x=%20y"
    assert body["body"] == "payload-bytes"
    headers = seen_headers(body)
    assert headers["x-custom"] == ["one", "two"]
    assert headers["content-type"] == ["text/plain"]
    assert users.requests == []


@ensure
async def test_route_prefix_matches_at_segment_boundary_only(backends, gateway, client):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    served = {}
    for path in ("/api/v2/users", "/api/v2/users/42", "/api/v2/usersx", "/api/v2"):
        response = await client.get(gw.url + path)
        served[path] = json.loads(await response.content())["served_by"]

    assert served == {
        "/api/v2/users": "users",
        "/api/v2/users/42": "users",
        "/api/v2/usersx": "monolith",
        "/api/v2": "monolith",
    }


@ensure
async def test_rewrite_keeps_query_and_encoded_path(backends, gateway, client):
    mono, users = backends("monolith"), backends("users")
    routes = """
  - name: v1
    match: {path: /api/v1/users}
    to: users
    rewrite: {prefix: /api/v1/users, to: /api/v2/users}
  - name: regex
    match: {path_regex: '^/old/(\\d+)$'}
    to: users
    rewrite: {regex: '^/old/(\\d+)$', to: '/new/\\1'}
"""
    gw = gateway(two_upstreams(mono.url, users.url, routes=routes))

    first = json.loads(
        await (await client.get(gw.url + "/api/v1/users/a%2Fb?q=1&q=2")).content()
    )
    second = json.loads(await (await client.get(gw.url + "/old/15?z")).content())

    assert first["uri"] == "/api/v2/users/a%2Fb?q=1&q=2"
    assert second["uri"] == "/new/15?z"


@ensure
async def test_hop_by_hop_headers_are_removed_toward_upstream(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    raw = await raw_exchange(
        gw.port,
        b"GET /x HTTP/1.1\r\nHost: shop.test\r\n"
        b"Connection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic abc\r\nProxy-Thing: 1\r\n"
        b"X-Strangler-Shadow: 1\r\n"
        b"X-End-To-End: kept\r\n\r\n",
    )

    assert status_of(raw) == 200
    headers = seen_headers(mono.requests[0])
    for dropped in (
        "x-secret-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-thing",
        "x-strangler-shadow",
    ):
        assert dropped not in headers
    assert headers["x-end-to-end"] == ["kept"]
    assert headers["host"] == ["shop.test"]


@ensure
async def test_client_connection_header_cannot_remove_gateway_headers(
    backends, gateway
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    await raw_exchange(
        gw.port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Forwarded-For, X-Request-Id, "
        b"X-Forwarded-Proto\r\n\r\n",
    )

    headers = seen_headers(mono.requests[0])
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert len(headers["x-request-id"]) == 1


@ensure
async def test_forwarded_headers_from_untrusted_client_are_replaced(
    backends, gateway, client
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    await client.get(
        gw.url + "/",
        headers={
            "X-Forwarded-For": ["6.6.6.6"],
            "X-Forwarded-Proto": ["https"],
            "X-Forwarded-Host": ["evil.test"],
            "Host": ["shop.test"],
        },
    )

    headers = seen_headers(mono.requests[0])
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == ["shop.test"]


@ensure
async def test_forwarded_headers_from_trusted_proxy_are_extended(
    backends, gateway, client
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(
        two_upstreams(mono.url, users.url, extra="trusted_proxies: [127.0.0.0/8]")
    )

    await client.get(
        gw.url + "/",
        headers={
            "X-Forwarded-For": ["203.0.113.9"],
            "X-Forwarded-Proto": ["https"],
            "X-Forwarded-Host": ["shop.example"],
        },
    )

    headers = seen_headers(mono.requests[0])
    assert headers["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-host"] == ["shop.example"]


@ensure
async def test_request_id_is_kept_or_made_and_logged(backends, gateway, client):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    kept = await client.get(
        gw.url + "/a", headers={"X-Request-Id": ["abc-123-def-456"]}
    )
    await kept.content()
    made = await client.get(
        gw.url + "/b", headers={"X-Request-Id": ["bad id\twith junk"]}
    )
    await made.content()

    assert kept.headers.getRawHeaders("X-Request-Id") == ["abc-123-def-456"]
    new_id = made.headers.getRawHeaders("X-Request-Id")[0]
    assert new_id != "bad id\twith junk"
    assert seen_headers(mono.requests[0])["x-request-id"] == ["abc-123-def-456"]
    assert seen_headers(mono.requests[1])["x-request-id"] == [new_id]
    logged = {line["path"]: line for line in gw.log_lines()}
    assert logged["/a"]["request_id"] == "abc-123-def-456"
    assert logged["/b"]["request_id"] == new_id


@ensure
async def test_access_log_has_one_record_with_decision_fields(
    backends, gateway, client
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    response = await client.post(gw.url + "/api/v2/users/1", data=b"12345")
    body = await response.content()

    (line,) = gw.log_lines()
    assert line["event"] == "request"
    assert line["method"] == "POST"
    assert line["path"] == "/api/v2/users/1"
    assert line["route"] == "users-v2"
    assert line["upstream"] == "users"
    assert line["target"] == users.url.removeprefix("http://")
    assert line["status"] == 200
    assert line["bytes_in"] == 5
    assert line["bytes_out"] == len(body)
    assert isinstance(line["duration_ms"], float)


@ensure
async def test_repeated_set_cookie_and_redirect_pass_through(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    cookies = await raw_exchange(
        gw.port, b"GET /cookies HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    redirect = await raw_exchange(
        gw.port, b"GET /redirect HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )

    assert header_values(cookies, b"set-cookie") == [b"a=1; Path=/", b"b=2; Path=/"]
    assert status_of(redirect) == 302
    assert header_values(redirect, b"location") == [
        b"http://example.test/elsewhere?x=1"
    ]


@ensure
async def test_head_204_and_304_have_no_body_and_keep_connection(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    raw = await raw_exchange(
        gw.port,
        b"HEAD /anything HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/304 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/200 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    responses = raw.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"204", b"304", b"200"]
    head_response = b"HTTP/1.1 " + responses[0]
    assert int(header_values(head_response, b"content-length")[0]) > 0
    assert head_response.endswith(b"\r\n\r\n")
    assert responses[1].endswith(b"\r\n\r\n")
    assert b'"method":"GET"' in responses[3]


@ensure
async def test_chunked_response_is_relayed_chunked(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    raw = await raw_exchange(
        gw.port, b"GET /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )

    assert header_values(raw, b"transfer-encoding") == [b"chunked"]
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert body.endswith(b"0\r\n\r\n")
    assert b"first," in body and b"second" in body


@ensure
async def test_http10_client_gets_close_delimited_body(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    raw = await raw_exchange(gw.port, b"GET /chunked HTTP/1.0\r\nHost: a\r\n\r\n")

    assert header_values(raw, b"transfer-encoding") == []
    assert raw.split(b"\r\n\r\n", 1)[1] == b"first,second"


@ensure
async def test_chunked_request_body_reaches_upstream_whole(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    raw = await raw_exchange(
        gw.port,
        [
            b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n",
            b"6\r\n world\r\n0\r\n\r\n",
        ],
    )

    assert status_of(raw) == 200
    assert mono.requests[0]["body"] == "hello world"


@ensure
async def test_pipelined_requests_are_answered_in_order(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    raw = await raw_exchange(
        gw.port,
        b"GET /slow?ms=150 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /api/v2/users/1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /third HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    order = [
        piece
        for piece in (b"/slow?ms=150", b"/api/v2/users/1", b"/third")
        if piece in raw
    ]
    positions = [raw.index(piece) for piece in order]
    assert len(order) == 3
    assert positions == sorted(positions)


@ensure
async def test_unreachable_upstream_gives_502_json(backends, gateway, client):
    mono = backends("monolith")
    dead = backends("dead")
    dead_url = dead.url
    await dead.stop()
    gw = gateway(two_upstreams(mono.url, dead_url))

    response = await client.get(gw.url + "/api/v2/users")
    body = json.loads(await response.content())

    assert response.code == 502
    assert body["error"] == "upstream_unreachable"
    assert body["request_id"] == response.headers.getRawHeaders("X-Request-Id")[0]
    assert "Traceback" not in json.dumps(body)


@ensure
async def test_slow_upstream_gives_504(backends, gateway, client):
    mono, users = backends("monolith"), backends("users")
    routes = """
  - name: slow
    match: {path: /slow}
    to: monolith
    timeout: 200ms
"""
    gw = gateway(two_upstreams(mono.url, users.url, routes=routes))

    response = await client.get(gw.url + "/slow?ms=3000")
    body = json.loads(await response.content())

    assert response.code == 504
    assert body["error"] == "upstream_timeout"


@ensure
async def test_malformed_and_smuggling_requests_get_400_and_close(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    cases = [
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"NOT A REQUEST\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET http://evil.test HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    for payload in cases:
        raw = await raw_exchange(gw.port, payload)
        assert status_of(raw) == 400, payload
        assert b'"error":"bad_request"' in raw
        assert b"Traceback" not in raw
    assert mono.requests == []


@ensure
async def test_absolute_form_target_never_changes_destination(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    raw = await raw_exchange(
        gw.port,
        b"GET http://evil.test:81/api/v2/users?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    assert status_of(raw) == 200
    assert users.requests[0]["uri"] == "/api/v2/users?x=1"


@ensure
async def test_connect_method_is_refused(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(two_upstreams(mono.url, users.url))

    raw = await raw_exchange(
        gw.port, b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n"
    )

    assert status_of(raw) == 405
    assert mono.requests == []


@ensure
async def test_oversized_headers_get_431(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(
        two_upstreams(mono.url, users.url, extra="limits: {max_header_bytes: 1KiB}")
    )

    raw = await raw_exchange(
        gw.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 4096 + b"\r\n\r\n"
    )

    assert status_of(raw) == 431
    assert mono.requests == []


class _UpgradeBackend(protocol.Protocol):
    """Answers an upgrade with 101, then echoes every byte upper-cased."""

    def __init__(self) -> None:
        self.buffer = b""
        self.upgraded = False

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data.upper())
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            assert b"upgrade: websocket" in head.lower()
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\nhello-from-upstream"
            )
            self.upgraded = True
            if rest:
                self.transport.write(rest.upper())


class _TunnelClient(protocol.Protocol):
    def __init__(self, done):  # type: ignore[no-untyped-def]
        self.done = done
        self.received = b""
        self.sent_frame = False

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"hello-from-upstream" in self.received and not self.sent_frame:
            self.sent_frame = True
            self.transport.write(b"ping-from-client")
        if b"PING-FROM-CLIENT" in self.received:
            self.transport.loseConnection()

    def connectionLost(self, reason=None):  # type: ignore[no-untyped-def]
        if not self.done.called:
            self.done.callback(self.received)


def open_tunnel(port: int) -> defer.Deferred[bytes]:
    """Upgrade a connection through the gateway, send a frame, return all received."""
    done: defer.Deferred[bytes] = defer.Deferred()
    client_factory = protocol.ClientFactory.forProtocol(lambda: _TunnelClient(done))
    client_factory.protocol = lambda: _TunnelClient(done)  # type: ignore[assignment]
    reactor.connectTCP("127.0.0.1", port, client_factory)
    timer = reactor.callLater(5, lambda: done.called or done.callback(b"timeout"))
    done.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
    return done


@ensure
async def test_websocket_upgrade_becomes_a_two_way_tunnel(backends, gateway):
    factory = protocol.Factory.forProtocol(_UpgradeBackend)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    mono = f"http://127.0.0.1:{port.getHost().port}"
    users = backends("users")
    gw = gateway(two_upstreams(mono, users.url))
    try:
        received = await open_tunnel(gw.port)
    finally:
        await port.stopListening()

    assert received.startswith(b"HTTP/1.1 101 ")
    assert header_values(received, b"upgrade") == [b"websocket"]
    assert b"hello-from-upstream" in received
    assert b"PING-FROM-CLIENT" in received


# -- header edit rules never touch framing or the gateway's own headers ---------

MANAGED_EDITS = """
listen: 127.0.0.1:0
upstreams:
  monolith:
    targets: [http://127.0.0.1:9001]
default: monolith
routes:
  - name: edits
    match: {path: /edits}
    to: monolith
    headers:
      request:
        set: {Content-Length: "0", X-Fine: "1"}
        add: {Transfer-Encoding: chunked, X_Request_Id: forged}
        remove: [Host, Proxy-Authorization]
      response:
        set: {Content-Length: "1"}
        add: {Connection: close, X-Forwarded-For: 1.2.3.4}
"""


def test_check_refuses_header_edits_of_managed_headers(tmp_path):
    path = write_rules(tmp_path, MANAGED_EDITS)

    result = run_cli("check", str(path))

    assert result.returncode != 0
    where = "routes[0].headers"
    expected = [
        (13, f"{where}.request.set.Content-Length"),
        (14, f"{where}.request.add.Transfer-Encoding"),
        (14, f"{where}.request.add.X_Request_Id"),
        (15, f"{where}.request.remove[0]"),
        (15, f"{where}.request.remove[1]"),
        (17, f"{where}.response.set.Content-Length"),
        (18, f"{where}.response.add.Connection"),
        (18, f"{where}.response.add.X-Forwarded-For"),
    ]
    lines = result.stderr.splitlines() + result.stdout.splitlines()
    for line, key in expected:
        prefix = f"{path}:{line}: {key}: "
        assert any(
            text.startswith(prefix) and "cannot change it" in text for text in lines
        ), (prefix, lines)


@ensure
async def test_edits_of_managed_headers_are_skipped_even_past_the_checker(
    backends, gateway, monkeypatch
):
    """Rules built without the checker still cannot reframe either side."""
    mono, users = backends("monolith"), backends("users")
    forced = HeaderRules(
        request=HeaderEdits(
            set=(("Content-Length", "0"), ("X-Fine", "1")),
            add=(("Content-Length", "99"), ("Transfer-Encoding", "chunked")),
            remove=("Host",),
        ),
        response=HeaderEdits(
            set=(("Content-Length", "1"),), add=(("Transfer-Encoding", "chunked"),)
        ),
    )

    def with_forced_edits(path):  # type: ignore[no-untyped-def]
        rules = load_rules(path)
        route = rules.routes[0]
        entry = replace(route.split[0], headers=forced)
        return replace(rules, routes=(replace(route, split=(entry,)),))

    monkeypatch.setattr(support, "load_rules", with_forced_edits)
    gw = gateway(two_upstreams(mono.url, users.url))

    post = b"POST /api/v2/users HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    raw = await raw_exchange(
        gw.port,
        post + b"GET /api/v2/users/2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    first, second = users.requests
    assert seen_headers(first)["content-length"] == ["5"]
    assert "transfer-encoding" not in seen_headers(first)
    assert seen_headers(first)["host"] == ["a"]
    assert seen_headers(first)["x-fine"] == ["1"]
    assert first["body"] == "hello"
    assert second["uri"] == "/api/v2/users/2"
    replies = raw.split(b"HTTP/1.1 200 ")
    assert len(replies) == 3
    for reply in replies[1:]:
        head, body = reply.split(b"\r\n\r\n", 1)
        lengths = header_values(
            b"HTTP/1.1 200 " + head + b"\r\n\r\n", b"content-length"
        )
        assert len(lengths) == 1
        assert len(body) == int(lengths[0])
        assert body.startswith(b"{") and body.endswith(b"}")


class _HopByHopBackend(protocol.Protocol):
    """Answers every request with a response full of hop-by-hop headers."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                b"Connection: X-Foo\r\nX-Foo: secret\r\nKeep-Alive: timeout=5\r\n"
                b"Proxy-Authenticate: Basic realm=upstream\r\nProxy-Thing: 1\r\n"
                b"Trailer: X-Sum\r\nUpgrade: h2c\r\nTE: trailers\r\n"
                b"X-End-To-End: kept\r\n\r\nok"
            )


@ensure
async def test_hop_by_hop_headers_are_removed_toward_client(backends, gateway):
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(_HopByHopBackend), interface="127.0.0.1"
    )
    users = backends("users")
    try:
        gw = gateway(
            two_upstreams(f"http://127.0.0.1:{port.getHost().port}", users.url)
        )
        raw = await raw_exchange(
            gw.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
    finally:
        await port.stopListening()

    assert status_of(raw) == 200
    for dropped in (
        b"x-foo",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-thing",
        b"trailer",
        b"upgrade",
        b"te",
    ):
        assert header_values(raw, dropped) == [], dropped
    assert header_values(raw, b"connection") == [b"close"]
    assert header_values(raw, b"x-end-to-end") == [b"kept"]
    assert raw.endswith(b"\r\n\r\nok")


# -- the client address behind a trusted proxy ----------------------------------


def client_keyed(a: str, b: str, trusted: bool) -> str:
    return f"""
listen: 127.0.0.1:0
access_log: false
{"trusted_proxies: [127.0.0.0/8]" if trusted else ""}
upstreams:
  hashed:
    balance: ip_hash
    targets: [{a}, {b}]
  left:
    targets: [{a}]
  right:
    targets: [{b}]
default: hashed
routes:
  - name: sticky
    match: {{path: /sticky}}
    split:
      - {{to: left, weight: 50}}
      - {{to: right, weight: 50}}
    sticky: {{by: ip}}
"""


async def served_by(port: int, path: str, forwarded_for: str) -> str:
    raw = await raw_exchange(
        port,
        f"GET {path} HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {forwarded_for}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert status_of(raw) == 200
    return header_values(raw, b"x-served-by")[0].decode()


@ensure
async def test_ip_hash_and_sticky_ip_use_the_forwarded_client_behind_a_trusted_proxy(
    backends, gateway
):
    a, b = backends("a"), backends("b")
    gw = gateway(client_keyed(a.url, b.url, trusted=True))
    clients = [f"203.0.113.{i}" for i in range(1, 41)]

    for path in ("/hashed", "/sticky"):
        first = {ip: await served_by(gw.port, path, ip) for ip in clients}
        again = {ip: await served_by(gw.port, path, ip) for ip in clients[:10]}
        chained = await served_by(gw.port, path, f"198.51.100.7, {clients[0]}")

        assert set(first.values()) == {"a", "b"}, path
        assert again == {ip: first[ip] for ip in clients[:10]}, path
        # Only the right-most untrusted entry counts; what is left of it is
        # the client's own say.
        assert chained == first[clients[0]], path


@ensure
async def test_ip_hash_and_sticky_ip_ignore_forwarded_for_from_untrusted_peers(
    backends, gateway
):
    a, b = backends("a"), backends("b")
    gw = gateway(client_keyed(a.url, b.url, trusted=False))

    for path in ("/hashed", "/sticky"):
        seen = {await served_by(gw.port, path, f"203.0.113.{i}") for i in range(20)}
        assert len(seen) == 1, path


@ensure
async def test_trusted_proxy_forwarded_proto_and_host_survive_without_for(
    backends, gateway, client
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(
        two_upstreams(mono.url, users.url, extra="trusted_proxies: [127.0.0.0/8]")
    )

    await client.get(
        gw.url + "/",
        headers={"X-Forwarded-Proto": ["https"], "X-Forwarded-Host": ["shop.example"]},
    )

    headers = seen_headers(mono.requests[0])
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-host"] == ["shop.example"]


# -- the same features through `strangler serve`, the way a user runs it ---------

SERVED = """
listen: 127.0.0.1:0
access_log: false
upstreams:
  monolith:
    balance: round_robin
    targets:
      - {{url: {heavy}, weight: 3}}
      - {{url: {light}, weight: 1}}
  users:
    targets: [{users}]
  hops:
    targets: [{hops}]
  sockets:
    targets: [{sockets}]
  gone:
    targets: [{gone}]
default: monolith
routes:
  - name: users-v1
    match: {{path: /api/v1/users}}
    to: users
    rewrite: {{prefix: /api/v1/users, to: /api/v2/users}}
  - name: hops
    match: {{path: /hop}}
    to: hops
  - name: sockets
    match: {{path: /ws}}
    to: sockets
  - name: gone
    match: {{path: /gone}}
    to: gone
  - name: slow
    match: {{path: /slow}}
    to: monolith
    timeout: 300ms
"""


@ensure
async def test_strangler_serve_relays_every_proxy_feature(backends, tmp_path):
    heavy, light, users = backends("heavy"), backends("light"), backends("users")
    listening = [
        reactor.listenTCP(0, protocol.Factory.forProtocol(kind), interface="127.0.0.1")
        for kind in (_HopByHopBackend, _UpgradeBackend)
    ]
    hops, sockets = (f"http://127.0.0.1:{p.getHost().port}" for p in listening)
    dead = backends("dead")
    gone = dead.url
    await dead.stop()
    rules = write_rules(
        tmp_path,
        SERVED.format(
            heavy=heavy.url,
            light=light.url,
            users=users.url,
            hops=hops,
            sockets=sockets,
            gone=gone,
        ),
    )
    served = ServeProcess(rules)
    try:
        port = served.port
        routed = await raw_exchange(
            port,
            b"GET /api/v1/users/7?x=%41 HTTP/1.1\r\nHost: shop.test\r\n"
            b"Connection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
            b"TE: trailers\r\nProxy-Authorization: Basic abc\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\n\r\n",
        )
        balanced = [
            await raw_exchange(
                port, b"GET /spread HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            for _ in range(8)
        ]
        hop = await raw_exchange(
            port, b"GET /hop HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        unreachable = await raw_exchange(
            port, b"GET /gone HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        slow = await raw_exchange(
            port, b"GET /slow?ms=3000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        tunnel = await open_tunnel(port)
    finally:
        code = served.stop()
        for listener in listening:
            await listener.stopListening()

    assert code == 0
    assert status_of(routed) == 200
    (seen,) = users.requests
    assert seen["uri"] == "/api/v2/users/7?x=%41"
    headers = seen_headers(seen)
    for dropped in ("x-secret", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in headers, dropped
    assert headers["host"] == ["shop.test"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == ["shop.test"]

    names = [header_values(raw, b"x-served-by")[0] for raw in balanced]
    assert (names.count(b"heavy"), names.count(b"light")) == (6, 2)

    assert status_of(hop) == 200
    for dropped in (b"x-foo", b"keep-alive", b"proxy-authenticate", b"upgrade"):
        assert header_values(hop, dropped) == [], dropped
    assert header_values(hop, b"x-end-to-end") == [b"kept"]

    assert status_of(unreachable) == 502
    assert b'"error":"upstream_unreachable"' in unreachable
    assert status_of(slow) == 504
    assert b'"error":"upstream_timeout"' in slow

    assert tunnel.startswith(b"HTTP/1.1 101 ")
    assert b"PING-FROM-CLIENT" in tunnel


# -- an upstream that answers before it has read the whole request body ---------


class _EarlyAnswerBackend(protocol.Protocol):
    """A keep-alive HTTP/1.1 server that refuses uploads without reading them.

    It answers a POST's head at once with 413, then counts the body bytes the
    request still owes before it reads another request, as a real server on
    a kept-alive connection must. Requests are only ever read from bytes
    past the body, so a gateway that reuses this connection without having
    sent the whole body gets its next request swallowed as body.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.owed = 0

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.owed:
                taken = min(self.owed, len(self.buffer))
                self.owed -= taken
                self.buffer = self.buffer[taken:]
                if self.owed:
                    return
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            self.buffer = rest
            lines = head.split(b"\r\n")
            if lines[0].startswith(b"POST"):
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        self.owed = int(value)
                self.transport.write(
                    b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno"
                )
            else:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@ensure
async def test_an_early_answer_to_an_upload_never_leaves_the_connection_in_the_pool(
    backends, gateway
):
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(_EarlyAnswerBackend), interface="127.0.0.1"
    )
    users = backends("users")
    try:
        gw = gateway(
            two_upstreams(f"http://127.0.0.1:{port.getHost().port}", users.url)
        )
        refused = await raw_exchange(
            gw.port,
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
            + b"x" * 1000,
            wait=1.0,
        )
        after = [
            await raw_exchange(
                gw.port, b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            for _ in range(3)
        ]
    finally:
        await port.stopListening()

    assert status_of(refused) == 413
    assert header_values(refused, b"connection") == [b"close"]
    assert [status_of(raw) for raw in after] == [200, 200, 200]
