"""Active health checks against real backends, and the streak logic with fakes."""

from __future__ import annotations

import pytest_twisted
from load import get, run_load
from structlog.testing import capture_logs
from support import sleep
from twisted.internet import reactor
from twisted.web import resource, server

from strangler.balancing import TargetState
from strangler.health import TargetHealth
from strangler.model import HealthCheck, Target

CHECK = HealthCheck(
    path="/health", interval=0.1, timeout=0.5, healthy_after=2, unhealthy_after=3
)


def _state() -> TargetState:
    return TargetState(Target("http://127.0.0.1:1", "http", "127.0.0.1", 1))


def test_target_leaves_after_unhealthy_after_failures_in_a_row() -> None:
    health = TargetHealth(_state())

    changes = [
        health.record(ok, CHECK, "status 500")
        for ok in (False, False, True, False, False, False)
    ]

    assert changes == [None, None, None, None, None, False]
    assert health.state.available is False
    assert health.last_error == "status 500"


def test_target_returns_after_healthy_after_successes() -> None:
    health = TargetHealth(_state())
    for _ in range(3):
        health.record(False, CHECK)

    changes = [health.record(ok, CHECK) for ok in (True, False, True, True)]

    assert changes == [None, None, None, True]
    assert health.state.available is True


class _Switchable(resource.Resource):
    """A backend whose /health can be broken and healed by the test."""

    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name
        self.healthy = True

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/health" and not self.healthy:
            request.setResponseCode(503)
        return self.name


@pytest_twisted.ensureDeferred
async def test_unhealthy_target_leaves_rotation_and_returns(gateway):
    one, two = _Switchable(b"one"), _Switchable(b"two")
    ports = [
        reactor.listenTCP(0, server.Site(r), interface="127.0.0.1") for r in (one, two)
    ]
    urls = [f"http://127.0.0.1:{p.getHost().port}" for p in ports]
    try:
        gw = gateway(
            f"""
            listen: 127.0.0.1:0
            upstreams:
              monolith:
                targets: [{urls[0]}, {urls[1]}]
                health: {{path: /health, interval: 100ms, timeout: 500ms, healthy_after: 2, unhealthy_after: 2}}
            default: monolith
            """
        )
        states = gw.server.gateway.state.upstreams["monolith"].states

        two.healthy = False
        await _until(lambda: not states[1].available)
        while_down = await run_load(gw.port, lambda i: get("/x"), 40)
        two.healthy = True
        await _until(lambda: states[1].available)
        after = await run_load(gw.port, lambda i: get("/x"), 40)
    finally:
        for port in ports:
            await port.stopListening()

    assert {r.body for r in while_down.replies} == {b"one"}
    assert {r.body for r in after.replies} == {b"one", b"two"}


async def _until(predicate, limit: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    waited = 0.0
    while not predicate():
        assert waited < limit, "condition not reached"
        await sleep(0.05)
        waited += 0.05


class _Flapping(resource.Resource):
    """A /health that answers 200 and 503 by turns, counting the probes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.probes = 0

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/health":
            self.probes += 1
            if self.probes % 2 == 0:
                request.setResponseCode(503)
        return b"flapping"


@pytest_twisted.ensureDeferred
async def test_a_flapping_health_endpoint_never_takes_the_target_out(gateway):
    flapping = _Flapping()
    port = reactor.listenTCP(0, server.Site(flapping), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        gw = gateway(
            f"""
            listen: 127.0.0.1:0
            upstreams:
              monolith:
                targets: [{url}]
                health: {{path: /health, interval: 50ms, timeout: 500ms, healthy_after: 2, unhealthy_after: 2}}
            default: monolith
            """
        )
        (state,) = gw.server.gateway.state.upstreams["monolith"].states
        seen = []
        while flapping.probes < 12:
            seen.append(state.healthy)
            await sleep(0.02)
        served = await run_load(gw.port, lambda i: get("/x"), 5)
    finally:
        await port.stopListening()

    assert set(seen) == {True}
    assert [r.body for r in served.replies] == [b"flapping"] * 5


@pytest_twisted.ensureDeferred
async def test_expect_status_decides_which_answers_are_healthy(backends, gateway):
    backend = backends("app")
    check = "interval: 50ms, timeout: 500ms, unhealthy_after: 2"
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          strict:
            targets: [{backend.url}]
            health: {{path: /status/204, expect_status: 200, {check}}}
          exact:
            targets: [{backend.url}]
            health: {{path: /status/204, expect_status: 204, {check}}}
          redirects:
            targets: [{backend.url}]
            health: {{path: /status/302, {check}}}
          broken:
            targets: [{backend.url}]
            health: {{path: /status/500, {check}}}
        default: strict
        """
    )
    upstreams = gw.server.gateway.state.upstreams
    (strict,) = upstreams["strict"].states
    (broken,) = upstreams["broken"].states

    await _until(lambda: not strict.healthy and not broken.healthy)
    probed = len(backend.requests)
    await _until(lambda: len(backend.requests) >= probed + 8)

    assert upstreams["exact"].states[0].healthy
    assert upstreams["redirects"].states[0].healthy
    assert not strict.healthy and not broken.healthy
    assert upstreams["strict"].health is not None
    (strict_health,) = upstreams["strict"].health.targets
    assert strict_health.last_error == "status 204, expected 200"


@pytest_twisted.ensureDeferred
async def test_health_failures_are_logged_in_plain_words(backends, gateway):
    alive, hung, gone = backends("alive"), backends("hung"), backends("gone")
    hung.resource.render = lambda request: server.NOT_DONE_YET  # type: ignore[method-assign]
    gone_url = gone.url
    await gone.stop()
    with capture_logs() as logs:
        gw = gateway(
            f"""
            listen: 127.0.0.1:0
            upstreams:
              monolith:
                targets: [{alive.url}, {hung.url}, {gone_url}]
                health: {{path: /health, interval: 100ms, timeout: 600ms, unhealthy_after: 2}}
            default: monolith
            """
        )
        states = gw.server.gateway.state.upstreams["monolith"].states
        await _until(lambda: not states[1].healthy and not states[2].healthy)

    reasons = {
        entry["target"]: entry["reason"]
        for entry in logs
        if entry["event"] == "target_unhealthy"
    }
    assert reasons == {
        hung.url: "no answer within 600ms",
        gone_url: "connection refused",
    }
    # The hung target's probes in flight never held back the others'.
    assert states[0].healthy
    assert len(alive.requests) >= 3
