"""Failures the gateway absorbs: retries, fallback, ejection, limits, timeouts."""

from __future__ import annotations

import json
from typing import Any

import httptools
import pytest_twisted
from load import get, run_load
from prometheus_client.parser import text_string_to_metric_families
from support import header_values, raw_exchange, sleep, status_of
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred

from strangler.retry_budget import INITIAL, MIN_PER_SECOND

ensure = pytest_twisted.ensureDeferred


def pool_rules(
    targets: list[str], upstream_extra: str = "", route_extra: str = "", top: str = ""
) -> str:
    listed = ", ".join(targets)
    return f"""
listen: 127.0.0.1:0
{top}
upstreams:
  monolith:
    targets: [{listed}]
{upstream_extra}
default: monolith
routes:
  - name: all
    match: {{path: /}}
    to: monolith
{route_extra}
"""


def _post(path: str, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: a\r\n{connection}Content-Length: 4\r\n\r\ndata"
    ).encode()


@ensure
async def test_refused_connection_is_retried_on_another_target_for_any_method(
    backends, gateway
):
    alive = backends("alive")
    dead = backends("dead")
    dead_url = dead.url
    await dead.stop()
    gw = gateway(pool_rules([dead_url, alive.url]))

    gets = await run_load(gw.port, lambda i: get(f"/g/{i}"), 30)
    posts = await run_load(gw.port, lambda i: _post(f"/p/{i}"), 30)

    assert [r.status for r in gets.replies] == [200] * 30
    assert [r.status for r in posts.replies] == [200] * 30
    assert len(alive.requests) == 60


@ensure
async def test_5xx_is_retried_for_idempotent_methods_only(backends, gateway):
    good, bad = backends("good"), backends("bad")
    bad.fail_with = 503
    retries = "    retries: {attempts: 1, retry_on: [5xx]}"
    no_ejection = "    outlier: {consecutive_failures: 1000}"
    gw = gateway(
        pool_rules([bad.url, good.url], upstream_extra=no_ejection, route_extra=retries)
    )

    gets = await run_load(gw.port, lambda i: get(f"/g/{i}"), 8, workers=1)
    posts = await run_load(gw.port, lambda i: _post(f"/p/{i}"), 16, workers=1)

    assert [r.status for r in gets.replies] == [200] * 8
    assert sorted(r.status for r in posts.replies) == [200] * 8 + [503] * 8
    assert sum(1 for r in good.requests if r["uri"].startswith("/p/")) == 8


@ensure
async def test_hanging_target_is_retried_after_timeout_when_allowed(backends, gateway):
    good, hung = backends("good"), backends("hung")
    hung_route = """
  - name: hang
    match: {path: /hang}
    to: monolith
    timeout: 200ms
    rewrite: {prefix: /hang, to: /api}
    retries: {attempts: 1, retry_on: [timeout]}
"""
    text = pool_rules([hung.url, good.url]).replace(
        "routes:\n", "routes:\n" + hung_route
    )
    gw = gateway(text)
    hung.resource.render = _hang_render(hung.resource)  # type: ignore[method-assign]

    result = await run_load(gw.port, lambda i: get("/hang/x"), 6, workers=2)

    assert [r.status for r in result.replies] == [200] * 6
    assert {json.loads(r.body)["served_by"] for r in result.replies} == {"good"}


def _hang_render(resource):  # type: ignore[no-untyped-def]
    from twisted.web import server

    def render(request):  # type: ignore[no-untyped-def]
        resource.requests.append({"uri": request.uri.decode()})
        return server.NOT_DONE_YET

    return render


@ensure
async def test_fallback_serves_idempotent_requests_from_the_monolith(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    users.fail_with = 500
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          monolith: {{targets: [{mono.url}]}}
          users: {{targets: [{users.url}]}}
        default: monolith
        routes:
          - name: users-v1
            match: {{path: /api/v1/users}}
            split:
              - {{to: monolith, weight: 0}}
              - to: users
                weight: 100
                fallback: monolith
                rewrite: {{prefix: /api/v1/users, to: /api/v2/users}}
        """
    )

    gets = await run_load(gw.port, lambda i: get(f"/api/v1/users/{i}"), 20)
    post = await raw_exchange(gw.port, _post("/api/v1/users") + b"")

    assert [r.status for r in gets.replies] == [200] * 20
    assert {json.loads(r.body)["served_by"] for r in gets.replies} == {"monolith"}
    assert all(r["uri"].startswith("/api/v1/users/") for r in mono.requests)
    assert all(r["uri"].startswith("/api/v2/users") for r in users.requests)
    assert status_of(post) == 500
    assert gw.server.gateway.state.upstreams["users"].fallbacks == 20
    logged = [line for line in gw.log_lines() if line.get("fallback_from")]
    assert len(logged) == 20 and {line["upstream"] for line in logged} == {"monolith"}


@ensure
async def test_fallback_on_unreachable_new_service(backends, gateway):
    mono = backends("monolith")
    gone = backends("gone")
    gone_url = gone.url
    await gone.stop()
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          monolith: {{targets: [{mono.url}]}}
          users: {{targets: [{gone_url}]}}
        default: monolith
        routes:
          - name: users-v1
            match: {{path: /u}}
            split:
              - {{to: monolith, weight: 50}}
              - {{to: users, weight: 50, fallback: monolith}}
        """
    )

    result = await run_load(gw.port, lambda i: get(f"/u/{i}"), 40)

    assert [r.status for r in result.replies] == [200] * 40


@ensure
async def test_consistently_failing_target_is_ejected(backends, gateway):
    good, bad = backends("good"), backends("bad")
    bad.fail_with = 500
    outlier = "    outlier: {consecutive_failures: 3, base_ejection: 60s, max_ejection_percent: 50}"
    gw = gateway(pool_rules([bad.url, good.url], upstream_extra=outlier))

    await run_load(gw.port, lambda i: get(f"/warm/{i}"), 12, workers=1)
    served_before = len(bad.requests)
    later = await run_load(gw.port, lambda i: get(f"/later/{i}"), 30, workers=1)

    assert served_before == 3
    assert len(bad.requests) == 3
    assert {r.status for r in later.replies} == {200}
    state = gw.server.gateway.state.upstreams["monolith"].states[0]
    assert state.ejected and not state.available


@ensure
async def test_ejection_never_empties_the_pool(backends, gateway):
    one, two = backends("one"), backends("two")
    one.fail_with = two.fail_with = 500
    outlier = "    outlier: {consecutive_failures: 2, base_ejection: 60s, max_ejection_percent: 100}"
    gw = gateway(pool_rules([one.url, two.url], upstream_extra=outlier))

    result = await run_load(gw.port, lambda i: get(f"/x/{i}"), 20, workers=1)

    assert [r.status for r in result.replies] == [500] * 20
    assert len(one.requests) + len(two.requests) == 20


@ensure
async def test_connection_limit_answers_503_with_retry_after(backends, gateway):
    slow = backends("slow")
    limits = "    max_connections: 1\n    max_pending: 0"
    gw = gateway(pool_rules([slow.url], upstream_extra=limits))

    first = raw_exchange(
        gw.port, b"GET /slow?ms=400 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    await sleep(0.1)
    second = await raw_exchange(
        gw.port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    first_reply = await first

    assert status_of(first_reply) == 200
    assert status_of(second) == 503
    assert header_values(second, b"retry-after") == [b"1"]
    assert b'"error":"upstream_overloaded"' in second


@ensure
async def test_pending_queue_waits_for_a_free_connection(backends, gateway):
    slow = backends("slow")
    limits = "    max_connections: 1\n    max_pending: 10"
    gw = gateway(pool_rules([slow.url], upstream_extra=limits))

    result = await run_load(gw.port, lambda i: get("/slow?ms=20"), 12, workers=4)

    assert [r.status for r in result.replies] == [200] * 12


@ensure
async def test_body_that_stalls_is_cut_after_idle_timeout(backends, gateway):
    stalling = backends("stalling")
    gw = gateway(pool_rules([stalling.url], upstream_extra="    idle_timeout: 200ms"))

    raw = await raw_exchange(gw.port, b"GET /stall HTTP/1.1\r\nHost: a\r\n\r\n", wait=5)

    assert status_of(raw) == 200
    assert raw.endswith(b"partial")
    (line,) = gw.log_lines()
    assert line["error"] == "upstream_timeout"


@ensure
async def test_trickled_headers_get_408(backends, gateway):
    mono = backends("monolith")
    gw = gateway(pool_rules([mono.url], top="limits: {client_header_timeout: 200ms}"))

    raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow", wait=5)

    assert status_of(raw) == 408
    assert mono.requests == []


@ensure
async def test_killing_a_target_under_load_loses_no_request(backends, gateway):
    """Resilience acceptance: two monolith targets, one new service, kill any one."""
    mono_a, mono_b, users = backends("mono-a"), backends("mono-b"), backends("users")
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          monolith:
            targets: [{mono_a.url}, {mono_b.url}]
            outlier: {{consecutive_failures: 2, base_ejection: 30s}}
          users:
            targets: [{users.url}]
        default: monolith
        routes:
          - name: users-v1
            match: {{path: /api/v1/users}}
            retries: {{attempts: 2, retry_on: [connect, 5xx, timeout]}}
            split:
              - {{to: monolith, weight: 50}}
              - {{to: users, weight: 50, fallback: monolith}}
          - name: rest
            match: {{path: /}}
            to: monolith
            retries: {{attempts: 2, retry_on: [connect, 5xx, timeout]}}
        """
    )
    for victim in (mono_a, users):
        load = run_load(
            gw.port,
            lambda i: get("/api/v1/users/1" if i % 2 else "/orders/1"),
            3000,
            workers=8,
        )
        await sleep(0.05)
        await victim.kill()
        result = await load
        assert result.failures == []
        assert len(result.replies) == 3000
        assert {r.status for r in result.replies} == {200}


# -- the body goes again with every retry and fallback ------------------------


def _put(path: str, body: bytes, chunked: bool = False, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    if chunked:
        half = len(body) // 2
        framed = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])
        )
        return (
            (
                f"PUT {path} HTTP/1.1\r\nHost: a\r\n{connection}"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + framed
            + b"0\r\n\r\n"
        )
    return (
        f"PUT {path} HTTP/1.1\r\nHost: a\r\n{connection}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _body(i: int) -> bytes:
    return (f"body-{i}:" + "x" * 700 + f":end-{i}").encode()


@ensure
async def test_a_put_retried_after_a_5xx_sends_the_whole_body_again(backends, gateway):
    good, bad = backends("good"), backends("bad")
    bad.fail_with = 503
    gw = gateway(
        pool_rules(
            [bad.url, good.url],
            upstream_extra="    outlier: {consecutive_failures: 1000}",
            route_extra="    retries: {attempts: 1, retry_on: [5xx]}",
        )
    )

    plain = await run_load(gw.port, lambda i: _put(f"/p/{i}", _body(i)), 4, workers=1)
    chunked = await run_load(
        gw.port, lambda i: _put(f"/c/{i}", _body(i), chunked=True), 4, workers=1
    )

    assert [r.status for r in plain.replies + chunked.replies] == [200] * 8
    assert len(bad.requests) == 8
    seen = {r["uri"]: r for r in good.requests}
    for i in range(4):
        for path in (f"/p/{i}", f"/c/{i}"):
            assert seen[path]["body"] == _body(i).decode()
            assert seen[path]["body_bytes"] == len(_body(i))


@ensure
async def test_a_put_retried_after_a_timeout_sends_the_whole_body_again(
    backends, gateway
):
    good, hung = backends("good"), backends("hung")
    hung.resource.render = _hang_render(hung.resource)  # type: ignore[method-assign]
    retries = "    timeout: 200ms\n    retries: {attempts: 1, retry_on: [timeout]}"
    gw = gateway(pool_rules([hung.url, good.url], route_extra=retries))

    result = await run_load(gw.port, lambda i: _put(f"/t/{i}", _body(i)), 3, workers=1)

    assert [r.status for r in result.replies] == [200] * 3
    assert [r["body"] for r in good.requests] == [_body(i).decode() for i in range(3)]


@ensure
async def test_a_put_that_falls_back_sends_the_whole_body_to_the_fallback(
    backends, gateway
):
    mono, users = backends("monolith"), backends("users")
    users.fail_with = 500
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          monolith: {{targets: [{mono.url}]}}
          users: {{targets: [{users.url}]}}
        default: monolith
        routes:
          - name: users
            match: {{path: /u}}
            split:
              - {{to: monolith, weight: 0}}
              - {{to: users, weight: 100, fallback: monolith}}
        """
    )

    plain = await raw_exchange(gw.port, _put("/u/1", _body(1), close=True))
    chunked = await raw_exchange(
        gw.port, _put("/u/2", _body(2), chunked=True, close=True)
    )

    assert status_of(plain) == 200 and status_of(chunked) == 200
    assert [r["body"] for r in users.requests] == [_body(1).decode(), _body(2).decode()]
    assert [r["body"] for r in mono.requests] == [_body(1).decode(), _body(2).decode()]


# -- a request that reached the upstream is not sent twice unless it may be ---


class _HangsUpOnTheSecond(protocol.Protocol):
    """Answers the first request on a connection; reads the next whole, hangs up."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.count += 1
        self.seen.append(b"%s %s %s" % (self.parser.get_method(), self.url, self.body))
        if self.count > 1:
            self.transport.loseConnection()
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@ensure
async def test_a_post_the_target_read_is_never_sent_again(gateway):
    seen: list[bytes] = []
    factory = protocol.Factory.forProtocol(lambda: _HangsUpOnTheSecond(seen))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    close = {"Connection": "close"}
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        retries = "    retries: {attempts: 2, retry_on: [connect, 5xx, timeout]}"
        gw = gateway(pool_rules([url], route_extra=retries))
        warm = await raw_exchange(gw.port, get("/warm", close))
        posted = await raw_exchange(gw.port, _post("/order", close=True))
        await raw_exchange(gw.port, get("/warm-again", close))
        again = await raw_exchange(gw.port, get("/again", close))
    finally:
        await port.stopListening()

    assert status_of(warm) == 200
    assert status_of(posted) == 502
    assert seen.count(b"POST /order data") == 1
    # A GET on a kept-alive connection that closes unanswered is sent once more.
    assert status_of(again) == 200
    assert seen.count(b"GET /again ") == 2


# -- a refused connection is retried while the body still streams -------------


def _paced(port: int, pieces: list[bytes], gap: float, wait: float) -> Deferred[bytes]:
    """Send `pieces` `gap` seconds apart; everything received until close or `wait`."""
    done: Deferred[bytes] = Deferred()
    received = bytearray()
    calls: list[Any] = []

    class Client(protocol.Protocol):
        def connectionMade(self) -> None:
            for n, piece in enumerate(pieces):
                calls.append(reactor.callLater(n * gap, self.transport.write, piece))
            calls.append(reactor.callLater(wait, self.transport.loseConnection))

        def dataReceived(self, data: bytes) -> None:
            received.extend(data)

        def connectionLost(self, reason: Any = None) -> None:
            for call in calls:
                if call.active():
                    call.cancel()
            if not done.called:
                done.callback(bytes(received))

    protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", port)
    return done


@ensure
async def test_a_refused_connection_is_retried_while_the_body_streams(
    backends, gateway
):
    alive, dead = backends("alive"), backends("dead")
    dead_url = dead.url
    await dead.stop()
    gw = gateway(pool_rules([dead_url, alive.url]))
    body = [b"a" * 500, b"b" * 500, b"c" * 500]
    head = b"POST /late HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
    head += b"Content-Length: 1500\r\n\r\n"

    raw = await _paced(gw.port, [head, *body], 0.2, wait=5)

    assert status_of(raw) == 200
    (request,) = alive.requests
    assert request["body"] == b"".join(body).decode()


# -- the upstream's time to answer starts once the request is all sent ---------


@ensure
async def test_a_slow_upload_is_not_an_upstream_timeout(backends, gateway):
    one, two = backends("one"), backends("two")
    gw = gateway(
        pool_rules(
            [one.url, two.url],
            upstream_extra="    outlier: {consecutive_failures: 1}",
            route_extra="    timeout: 1s",
        )
    )
    pieces = [b"%d" % (n % 10) * 100 for n in range(12)]
    head = b"PUT /upload HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
    head += b"Content-Length: 1200\r\n\r\n"

    raw = await _paced(gw.port, [head, *pieces], 0.22, wait=10)

    assert status_of(raw) == 200
    (request,) = one.requests + two.requests
    assert request["body"] == b"".join(pieces).decode()
    states = gw.server.gateway.state.upstreams["monolith"].states
    assert [s.ejected for s in states] == [False, False]
    assert [s.failures_in_a_row for s in states] == [0, 0]


# -- a branch with no target in rotation falls back at once --------------------


@ensure
async def test_a_new_service_marked_down_is_skipped_for_its_fallback(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    users.resource.render = _hang_render(users.resource)  # type: ignore[method-assign]
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          monolith: {{targets: [{mono.url}]}}
          users:
            targets: [{users.url}]
            health: {{path: /health, interval: 100ms, timeout: 100ms, unhealthy_after: 2}}
        default: monolith
        routes:
          - name: users
            match: {{path: /u}}
            timeout: 5s
            split:
              - {{to: monolith, weight: 0}}
              - {{to: users, weight: 100, fallback: monolith}}
        """
    )
    (state,) = gw.server.gateway.state.upstreams["users"].states
    await _until(lambda: not state.healthy)

    gets = await run_load(gw.port, lambda i: get(f"/u/{i}"), 10, workers=2)
    post = await raw_exchange(gw.port, _post("/u/new", close=True))

    assert [r.status for r in gets.replies] == [200] * 10
    assert {json.loads(r.body)["served_by"] for r in gets.replies} == {"monolith"}
    assert status_of(post) == 200
    assert [r["uri"] for r in users.requests if r["uri"] != "/health"] == []
    assert gw.server.gateway.state.upstreams["users"].fallbacks == 11
    reasons = [line.get("fallback_from") for line in gw.log_lines()]
    assert reasons.count("users") == 11


async def _until(predicate, limit: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    waited = 0.0
    while not predicate():
        assert waited < limit, "condition not reached"
        await sleep(0.05)
        waited += 0.05


# -- what happened is counted where operators look ------------------------------


@ensure
async def test_admin_api_and_metrics_count_fallbacks_retries_ejections_and_503s(
    backends, gateway, client
):
    mono, one, two = backends("monolith"), backends("one"), backends("two")
    one.fail_with = two.fail_with = 500
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0, token: secret}}
        upstreams:
          monolith: {{targets: [{mono.url}]}}
          tight: {{targets: [{mono.url}], max_connections: 1, max_pending: 0}}
          users:
            targets: [{one.url}, {two.url}]
            outlier: {{consecutive_failures: 1, base_ejection: 60s}}
        default: monolith
        routes:
          - name: slow
            match: {{path: /slow}}
            to: tight
          - name: users
            match: {{path: /u}}
            retries: {{attempts: 1, retry_on: [5xx]}}
            split:
              - {{to: monolith, weight: 0}}
              - {{to: users, weight: 100, fallback: monolith}}
        """
    )
    gw.server.start_admin()
    admin = f"http://127.0.0.1:{gw.server.admin_port.getHost().port}"
    auth = {"Authorization": ["Bearer secret"]}

    served = await raw_exchange(gw.port, get("/u/1", {"Connection": "close"}))
    slow = raw_exchange(gw.port, get("/slow?ms=300", {"Connection": "close"}))
    await _until(lambda: gw.server.gateway.state.upstreams["tight"].in_flight == 1)
    refused = await raw_exchange(gw.port, get("/slow?ms=1", {"Connection": "close"}))
    await slow
    view = await (await client.get(admin + "/upstreams", headers=auth)).json()
    metrics = await (await client.get(admin + "/metrics", headers=auth)).text()

    assert status_of(served) == 200 and status_of(refused) == 503
    upstreams = {u["name"]: u for u in view["upstreams"]}
    users = upstreams["users"]
    assert (users["fallbacks"], users["retries"], users["ejections"]) == (1, 1, 1)
    assert [
        (t["available"], t["healthy"], t["ejected"], t["ejections"])
        for t in users["targets"]
    ] == [(False, True, True, 1), (True, True, False, 0)]
    assert upstreams["tight"]["overloaded"] == 1
    assert upstreams["monolith"]["fallbacks"] == 0
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert (
        samples[("strangler_upstream_fallbacks_total", (("upstream", "users"),))] == 1
    )
    assert samples[("strangler_upstream_retries_total", (("upstream", "users"),))] == 1
    assert (
        samples[("strangler_upstream_overloaded_total", (("upstream", "tight"),))] == 1
    )
    one_labels = (("target", one.url), ("upstream", "users"))
    assert samples[("strangler_upstream_ejections_total", one_labels)] == 1
    assert samples[("strangler_target_ejected", one_labels)] == 1
    assert samples[("strangler_target_available", one_labels)] == 0
    assert samples[("strangler_target_healthy", one_labels)] == 1


# -- retries have limits --------------------------------------------------------


@ensure
async def test_retries_stop_at_the_budget_when_every_target_fails(backends, gateway):
    one, two = backends("one"), backends("two")
    one.fail_with = two.fail_with = 503
    gw = gateway(
        pool_rules(
            [one.url, two.url],
            upstream_extra="    outlier: {consecutive_failures: 1000}",
            route_extra="    retries: {attempts: 3, retry_on: [5xx]}",
        )
    )
    began = reactor.seconds()

    result = await run_load(gw.port, lambda i: get(f"/x/{i}"), 40, workers=1)

    elapsed = reactor.seconds() - began
    assert [r.status for r in result.replies] == [503] * 40
    retries = len(one.requests) + len(two.requests) - 40
    # The budget: 10 to start, 0.2 per request, 3 a second; the policy alone
    # would have allowed 3 per request, 120 in all.
    assert INITIAL <= retries <= INITIAL + 0.2 * 40 + MIN_PER_SECOND * elapsed + 1
    assert gw.server.gateway.state.upstreams["monolith"].retries == retries


class _CutsMidResponse(protocol.Protocol):
    """Starts a 100-byte answer, sends 7 bytes of it, then resets the connection."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(data.split(b"\r\n", 1)[0])
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        reactor.callLater(0.05, self.transport.abortConnection)


@ensure
async def test_a_target_that_resets_mid_response_cuts_the_client_without_retry(
    gateway,
):
    seen: list[bytes] = []
    factory = protocol.Factory.forProtocol(lambda: _CutsMidResponse(seen))
    ports = [reactor.listenTCP(0, factory, interface="127.0.0.1") for _ in range(2)]
    try:
        urls = [f"http://127.0.0.1:{p.getHost().port}" for p in ports]
        retries = "    retries: {attempts: 2, retry_on: [connect, 5xx, timeout]}"
        gw = gateway(pool_rules(urls, route_extra=retries))
        raw = await raw_exchange(gw.port, get("/cut"), wait=5)
    finally:
        for port in ports:
            await port.stopListening()

    assert status_of(raw) == 200
    assert raw.endswith(b"\r\n\r\npartial")
    assert seen == [b"GET /cut HTTP/1.1"]
    (line,) = gw.log_lines()
    assert line["error"] == "upstream_closed"


@ensure
async def test_nothing_is_retried_once_a_response_byte_reached_the_client(
    backends, gateway
):
    one, two = backends("one"), backends("two")
    retries = "    retries: {attempts: 2, retry_on: [connect, 5xx, timeout]}"
    gw = gateway(
        pool_rules(
            [one.url, two.url],
            upstream_extra="    idle_timeout: 200ms",
            route_extra=retries,
        )
    )

    raw = await raw_exchange(gw.port, get("/stall"), wait=5)

    assert status_of(raw) == 200 and raw.endswith(b"partial")
    assert len(one.requests) + len(two.requests) == 1
    assert gw.server.gateway.state.upstreams["monolith"].retries == 0


# -- a target that fails for a while comes back ---------------------------------


@ensure
async def test_a_target_answering_503_for_a_while_is_ejected_then_returns(
    backends, gateway
):
    flaky, steady = backends("flaky"), backends("steady")
    flaky.fail_with = 503
    outlier = "    outlier: {consecutive_failures: 2, base_ejection: 300ms}"
    retries = "    retries: {attempts: 1, retry_on: [5xx]}"
    gw = gateway(
        pool_rules([flaky.url, steady.url], upstream_extra=outlier, route_extra=retries)
    )
    state = gw.server.gateway.state.upstreams["monolith"].states[0]

    failing = await run_load(gw.port, lambda i: get(f"/a/{i}"), 10, workers=1)
    ejected, sent_while_failing = state.ejected, len(flaky.requests)
    flaky.fail_with = None
    await _until(lambda: state.available)
    later = await run_load(gw.port, lambda i: get(f"/b/{i}"), 20, workers=1)

    assert [r.status for r in failing.replies + later.replies] == [200] * 30
    assert ejected and sent_while_failing == 2
    assert state.ejections == 1 and not state.ejected
    assert sum(1 for r in flaky.requests if r["uri"].startswith("/b/")) == 10
