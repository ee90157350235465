"""Active health checks against real backends, and the streak logic with fakes."""

from __future__ import annotations

import pytest_twisted
from load import get, run_load
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
