"""A short real plan through the real gateway, against real backends on loopback.

The load generator sends sticky users through the gateway while the plan
ramps; half way the new service starts answering 500, and the plan must put
every user back on the monolith by itself.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from load import get, run_load
from twisted.internet import reactor

from strangler.migration.plan import parse_plan
from strangler.migration.runner import MigrationRunner
from strangler.migration.state import Migration

ensure = pytest_twisted.ensureDeferred

SERVED_BY = b"x-served-by"


def rules(mono: str, users: str, fallback: bool = False) -> str:
    return f"""
listen: 127.0.0.1:0
upstreams:
  monolith:
    targets: [{mono}]
  users:
    targets: [{users}]
default: monolith
routes:
  - name: users-v1
    match: {{path: /api/v1/users}}
    split:
      - {{to: monolith, weight: 100}}
      - to: users
        weight: 0
        {"fallback: monolith" if fallback else ""}
    sticky: {{by: header, name: X-User-Id}}
"""


PLAN = """
route: users-v1
move_to: users
steps: [20, 50, 100]
hold: 1s
gates: {min_requests: 30, max_error_rate: 5%}
on_fail: rollback
"""


def user_request(index: int) -> bytes:
    return get("/api/v1/users/1", {"X-User-Id": f"user-{index % 400}"})


async def ramp_until_it_breaks(
    gw: Any, users: Any, runner: MigrationRunner
) -> tuple[Migration, Any]:
    """Run load while the plan ramps; break `users` once the plan reaches 50%."""
    plan = parse_plan(PLAN, "users.yaml", gw.server.rules)
    migration = runner.start(plan)

    def until() -> bool:
        if migration.weight >= 50 and users.fail_with is None:
            users.fail_with = 500
        return migration.status != "running"

    result = await run_load(
        gw.port, user_request, 200_000, workers=4, time_limit=30, until=until
    )
    return migration, result


def started_runner(gw: Any) -> MigrationRunner:
    runner = MigrationRunner(gw.server.gateway, reactor, interval=0.1)
    runner.run()
    return runner


@ensure
async def test_failing_new_service_is_rolled_back_and_everyone_lands_on_the_monolith(
    backends, gateway
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(rules(mono.url, users.url))
    runner = started_runner(gw)
    try:
        migration, result = await ramp_until_it_breaks(gw, users, runner)
    finally:
        runner.stop()

    assert result.failures == []
    assert migration.status == "rolled_back"
    assert [(e["event"], e["from"], e["to"]) for e in migration.history] == [
        ("started", 0, 20),
        ("advanced", 20, 50),
        ("rolled_back", 50, 0),
    ]
    assert migration.reason is not None and "error rate" in migration.reason
    assert migration.history[-1]["evidence"]["new_failed"] > 0
    assert {r.status for r in result.replies} == {200, 500}
    assert gw.server.gateway.state.plans["users-v1"].effective_weights() == {
        "monolith": 100,
        "users": 0,
    }

    reached_users = len(users.requests)
    after = await run_load(gw.port, user_request, 800, workers=4, time_limit=30)

    assert after.failures == []
    assert len(after.replies) == 800
    assert {r.headers.get(SERVED_BY) for r in after.replies} == {b"monolith"}
    assert {r.status for r in after.replies} == {200}
    assert len(users.requests) == reached_users


@ensure
async def test_failures_hidden_by_a_fallback_still_roll_the_plan_back(
    backends, gateway
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(rules(mono.url, users.url, fallback=True))
    runner = started_runner(gw)
    try:
        migration, result = await ramp_until_it_breaks(gw, users, runner)
    finally:
        runner.stop()

    assert result.failures == []
    assert {r.status for r in result.replies} == {200}, "the fallback serves them"
    assert migration.status == "rolled_back"
    evidence = migration.history[-1]["evidence"]
    assert evidence["fallbacks"] > 0
    assert evidence["new_failed"] >= evidence["fallbacks"]
