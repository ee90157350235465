"""Weighted and sticky splits through the real gateway, and live rule edits."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest
import pytest_twisted
from load import get, run_load
from ramp_support import RAMP, RAMP_KEYS, check_ramp_step, sticky_request
from structlog.testing import capture_logs
from support import header_values, raw_exchange, sleep, status_of

from strangler.model import Rules
from strangler.rules import load_rules
from strangler.splitting import Splitter

ensure = pytest_twisted.ensureDeferred


def split_rules(
    mono: str, users: str, users_weight: float, extra: str = "", sticky: str = ""
) -> str:
    return f"""
listen: 127.0.0.1:0
expose_decision: true
{extra}
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
      - {{to: monolith, weight: {100 - users_weight:g}}}
      - to: users
        weight: {users_weight:g}
        rewrite: {{prefix: /api/v1/users, to: /api/v2/users}}
{sticky}
"""


STICKY = "    sticky: {by: header, name: X-User-Id}"
UPSTREAM = b"x-strangler-upstream"


@ensure
async def test_unsticky_shares_follow_weights_over_10000_requests(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 30))

    result = await run_load(gw.port, lambda i: get("/api/v1/users"), 10_000, workers=8)

    assert result.failures == []
    assert len(result.replies) == 10_000
    users_share = result.count(UPSTREAM, b"users") / 100
    assert 28 <= users_share <= 32
    assert {r.status for r in result.replies} == {200}


@ensure
async def test_split_entry_rewrite_applies_only_to_its_branch(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 50))

    result = await run_load(gw.port, lambda i: get(f"/api/v1/users/{i}?q=1"), 200)

    assert result.failures == []
    assert mono.requests and users.requests
    assert all(r["uri"].startswith("/api/v1/users/") for r in mono.requests)
    assert all(r["uri"].startswith("/api/v2/users/") for r in users.requests)
    assert all(r["uri"].endswith("?q=1") for r in mono.requests + users.requests)


@ensure
async def test_sticky_key_always_lands_on_the_same_upstream(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 50, sticky=STICKY))

    result = await run_load(
        gw.port, lambda i: get("/api/v1/users", {"X-User-Id": f"user-{i % 50}"}), 500
    )

    landed: dict[int, set[bytes]] = {}
    for reply in result.replies:
        landed.setdefault(reply.index % 50, set()).add(reply.headers[UPSTREAM])
    assert result.failures == []
    assert all(len(upstreams) == 1 for upstreams in landed.values())
    assert {next(iter(u)) for u in landed.values()} == {b"monolith", b"users"}


@ensure
async def test_cookie_stickiness_sets_a_cookie_and_honours_it(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    sticky = "    sticky: {by: cookie, name: strangler_user}"
    gw = gateway(split_rules(mono.url, users.url, 50, sticky=sticky))

    first = await raw_exchange(
        gw.port, b"GET /api/v1/users HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    (cookie,) = header_values(first, b"set-cookie")
    assert cookie.startswith(b"strangler_user=") and b"HttpOnly" in cookie
    chosen = header_values(first, UPSTREAM)[0]
    value = cookie.split(b";")[0]

    again = await run_load(
        gw.port,
        lambda i: get("/api/v1/users", {"Cookie": value.decode()}),
        40,
    )
    assert {r.headers[UPSTREAM] for r in again.replies} == {chosen}
    assert all(b"set-cookie" not in r.headers for r in again.replies)


@ensure
async def test_override_header_forces_a_branch_but_not_a_stranger(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    rules = (
        split_rules(mono.url, users.url, 0).replace(
            "default: monolith", "default: monolith"
        )
        + "    override: {header: X-Strangler-Upstream}\n"
    )
    gw = gateway(rules)

    forced = await run_load(
        gw.port, lambda i: get("/api/v1/users", {"X-Strangler-Upstream": "users"}), 20
    )
    stranger = await run_load(
        gw.port,
        lambda i: get("/api/v1/users", {"X-Strangler-Upstream": "127.0.0.1:22"}),
        20,
    )

    assert {r.headers[UPSTREAM] for r in forced.replies} == {b"users"}
    assert {r.headers[UPSTREAM] for r in stranger.replies} == {b"monolith"}


@ensure
async def test_decision_headers_only_when_exposed(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    hidden = gateway(
        split_rules(mono.url, users.url, 50).replace("expose_decision: true", "")
    )

    raw = await raw_exchange(
        hidden.port,
        b"GET /api/v1/users HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    assert header_values(raw, b"x-strangler-route") == []
    assert header_values(raw, UPSTREAM) == []
    (line,) = hidden.log_lines()
    assert line["route"] == "users-v1" and line["upstream"] in ("monolith", "users")
    assert line["split"] == "random"


async def _wait_for(predicate, limit: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    waited = 0.0
    while not predicate() and waited < limit:
        await sleep(0.1)
        waited += 0.1


@ensure
async def test_rule_file_edit_takes_effect_without_restart(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 0))
    gw.server.watch(interval=0.2)

    gw.rules_path.write_text(split_rules(mono.url, users.url, 100))
    await _wait_for(
        lambda: (
            gw.server.gateway.state.plans["users-v1"].effective_weights()["users"]
            == 100
        )
    )
    result = await run_load(gw.port, lambda i: get("/api/v1/users"), 50)

    assert {r.headers[UPSTREAM] for r in result.replies} == {b"users"}
    assert gw.server.last_reload.ok


@ensure
async def test_invalid_rule_file_is_refused_and_old_rules_keep_serving(
    backends, gateway
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 0))
    gw.server.watch(interval=0.2)

    gw.rules_path.write_text(
        split_rules(mono.url, users.url, 0).replace("weight: 0", "weight: 7")
    )
    await _wait_for(lambda: not gw.server.last_reload.ok)
    result = await run_load(gw.port, lambda i: get("/api/v1/users"), 50)

    assert not gw.server.last_reload.ok
    assert any("must sum to 100" in error for error in gw.server.last_reload.errors)
    assert any(str(gw.rules_path) in error for error in gw.server.last_reload.errors)
    assert result.failures == []
    assert {r.headers[UPSTREAM] for r in result.replies} == {b"monolith"}


def _loader_with_a_build_bug(path: Path) -> Rules:
    """`load_rules`, except that a file marked `# broken` validates but cannot be
    built: its `users` upstream becomes an ip_hash ring too big to construct,
    standing in for any fault between validation and the new state.
    """
    rules = load_rules(path)
    if "# broken" not in path.read_text():
        return rules
    users = rules.upstreams["users"]
    heavy = dataclasses.replace(users.targets[0], weight=5000)
    broken = dataclasses.replace(users, balance="ip_hash", targets=(heavy,))
    return dataclasses.replace(rules, upstreams={**rules.upstreams, "users": broken})


@ensure
async def test_reload_that_cannot_be_built_is_refused_and_watching_goes_on(
    backends, gateway
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 0))
    gw.server.loader = _loader_with_a_build_bug
    gw.server.watch(interval=0.1)

    with capture_logs() as logs:
        gw.rules_path.write_text(split_rules(mono.url, users.url, 100) + "# broken\n")
        await _wait_for(lambda: not gw.server.last_reload.ok)
        refused = gw.server.last_reload
        during = await run_load(gw.port, lambda i: get("/api/v1/users"), 20)

        gw.rules_path.write_text(split_rules(mono.url, users.url, 100))
        await _wait_for(lambda: gw.server.last_reload.ok)
        after = await run_load(gw.port, lambda i: get("/api/v1/users"), 20)

    assert not refused.ok
    (error,) = refused.errors
    assert error.startswith(f"{gw.rules_path}: cannot put the rules in force: ")
    assert "ip_hash weights of upstream 'users'" in error
    assert [e["errors"] for e in logs if e["event"] == "reload_refused"] == [
        refused.errors
    ]
    assert {r.headers[UPSTREAM] for r in during.replies} == {b"monolith"}
    assert gw.server.last_reload.ok
    assert {r.headers[UPSTREAM] for r in after.replies} == {b"users"}
    assert gw.server.gateway.metrics.reloads == {"ok": 1, "error": 1}


@ensure
async def test_ramp_by_rule_edits_under_load_loses_nothing_and_keeps_users_moved(
    backends, gateway
):
    """The traffic-shifting acceptance: 0 -> 1 -> 10 -> 50 -> 100 while load runs.

    Each step is an edit of the rule file that the file watcher picks up, as
    an operator's editor would trigger it; nothing calls `reload()`.
    """
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 0, sticky=STICKY))
    gw.server.watch(interval=0.2)
    history: dict[str, set[str]] = {}
    ramp_done = False
    background = run_load(
        gw.port,
        lambda i: get(f"/api/v1/users/{i}", {"X-User-Id": f"bg{i % 97}"}),
        1_000_000,
        workers=4,
        until=lambda: ramp_done,
    )

    for weight in RAMP:
        gw.rules_path.write_text(
            split_rules(mono.url, users.url, weight, sticky=STICKY)
        )
        await _wait_for(
            lambda w=weight: (
                gw.server.gateway.state.plans["users-v1"].effective_weights()["users"]
                == w
            )
        )
        assert gw.server.last_reload.ok, gw.server.last_reload.errors
        result = await run_load(
            gw.port, sticky_request(RAMP_KEYS), len(RAMP_KEYS) * 2, workers=8
        )
        assert result.failures == []
        check_ramp_step(result.replies, RAMP_KEYS, weight, history)

    ramp_done = True
    steady = await background
    assert gw.server.gateway.metrics.reloads == {"ok": len(RAMP) - 1, "error": 0}
    assert steady.failures == []
    assert len(steady.replies) > 100
    assert {r.status for r in steady.replies} == {200}
    assert history["moved"] == set(RAMP_KEYS)


@ensure
async def test_ramp_through_the_admin_api_under_load_keeps_users_moved(
    backends, gateway, client
):
    """The same ramp as the rule-file one, done the way `strangler shift` does it."""
    import json as jsonlib

    mono, users = backends("monolith"), backends("users")
    admin = "admin: {listen: 127.0.0.1:0, token: ramp-token}"
    gw = gateway(split_rules(mono.url, users.url, 0, extra=admin, sticky=STICKY))
    address = gw.server.start_admin()
    assert address is not None
    keys = RAMP_KEYS[:600]
    history: dict[str, set[str]] = {}
    ramp_done = False
    background = run_load(
        gw.port,
        lambda i: get(f"/api/v1/users/{i}", {"X-User-Id": f"bg{i % 89}"}),
        1_000_000,
        workers=4,
        until=lambda: ramp_done,
    )

    for weight in RAMP[1:]:
        reply = await client.post(
            f"http://127.0.0.1:{address.port}/routes/users-v1/split",
            data=jsonlib.dumps({"users": weight}).encode(),
            headers={
                "Authorization": ["Bearer ramp-token"],
                "Content-Type": ["application/json"],
            },
        )
        assert reply.code == 200, await reply.content()
        await reply.content()
        result = await run_load(gw.port, sticky_request(keys), len(keys) * 2, workers=8)
        assert result.failures == []
        check_ramp_step(result.replies, keys, weight, history)

    ramp_done = True
    steady = await background
    assert steady.failures == [] and {r.status for r in steady.replies} == {200}
    assert history["moved"] == set(keys)


@ensure
async def test_unchanged_upstreams_keep_pools_and_state_across_a_reload(
    backends, gateway
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 50))
    await run_load(gw.port, lambda i: get("/api/v1/users"), 20)
    before = gw.server.gateway.state.upstreams
    pooled = sum(len(pool.idle) for pool in before["monolith"].pools.values())

    text = split_rules(mono.url, users.url, 50)
    gw.rules_path.write_text(
        text.replace(
            "  users:\n    targets", "  users:\n    balance: least_conn\n    targets"
        )
    )
    assert gw.server.reload().ok
    after = gw.server.gateway.state.upstreams

    assert after["monolith"] is before["monolith"]
    assert (
        sum(len(pool.idle) for pool in after["monolith"].pools.values()) == pooled > 0
    )
    assert after["users"] is not before["users"]


@ensure
async def test_health_state_survives_a_reload_that_does_not_touch_the_upstream(
    backends, gateway
):
    mono, users_a, users_b = backends("monolith"), backends("a"), backends("b")
    users_b.fail_with = 503  # its /health too: health checks take it out
    health = "{path: /health, interval: 30s, timeout: 1s, unhealthy_after: 1}"
    text = split_rules(mono.url, f"{users_a.url}, {users_b.url}", 100).replace(
        "  users:\n", f"  users:\n    health: {health}\n"
    )
    gw = gateway(text)
    states = gw.server.gateway.state.upstreams["users"].states
    await _wait_for(lambda: not states[1].available)
    assert not states[1].available
    before = gw.server.gateway.state.upstreams["users"]

    gw.rules_path.write_text(text.replace("expose_decision: true", "timeout: 20s"))
    reloaded = gw.server.reload()
    after = gw.server.gateway.state.upstreams["users"]
    # Checked before the reactor runs again: a rebuilt upstream would start
    # with every target available and probe them from scratch.
    kept = [state.available for state in after.states]
    result = await run_load(gw.port, lambda i: get("/api/v1/users"), 40)

    assert reloaded.ok and gw.server.rules.timeout == 20
    assert after is before and after.health is before.health
    assert kept == [True, False]
    assert {r.status for r in result.replies} == {200}
    assert {r.headers[b"x-served-by"] for r in result.replies} == {b"a"}


SLOW_ROUTE = """
  - name: slow-new
    match: {path: /slow}
    split:
      - {to: monolith, weight: 0}
      - {to: users, weight: 100, timeout: 300ms}
    sticky: {by: cookie, name: strangler_user}
    override: {header: X-Strangler-Upstream}
"""


@ensure
async def test_split_entry_timeout_is_its_own_and_the_504_says_where_it_went(
    backends, gateway
):
    """A gateway-made answer carries the decision headers and the sticky cookie."""
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 50) + SLOW_ROUTE)

    timed_out = await raw_exchange(
        gw.port,
        b"GET /slow?ms=3000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        wait=5,
    )
    patient = await raw_exchange(
        gw.port,
        b"GET /slow?ms=600 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        b"X-Strangler-Upstream: monolith\r\n\r\n",
        wait=5,
    )

    assert status_of(timed_out) == 504
    assert b'"error":"upstream_timeout"' in timed_out
    assert header_values(timed_out, b"x-strangler-route") == [b"slow-new"]
    assert header_values(timed_out, UPSTREAM) == [b"users"]
    (cookie,) = header_values(timed_out, b"set-cookie")
    assert cookie.startswith(b"strangler_user=") and b"HttpOnly" in cookie
    assert status_of(patient) == 200
    assert header_values(patient, UPSTREAM) == [b"monolith"]
    assert header_values(patient, b"x-served-by") == [b"monolith"]


@ensure
async def test_gateway_made_502_carries_the_decision_headers(backends, gateway):
    mono = backends("monolith")
    gw = gateway(split_rules(mono.url, "http://127.0.0.1:9", 100))

    raw = await raw_exchange(
        gw.port, b"GET /api/v1/users HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )

    assert status_of(raw) == 502
    assert header_values(raw, b"x-strangler-route") == [b"users-v1"]
    assert header_values(raw, UPSTREAM) == [b"users"]


@ensure
async def test_gateway_refusal_carries_the_decision_headers(backends, gateway):
    """`reject` answers (here 413 from `limits.max_body`) say where it would have gone."""
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 100, extra="limits: {max_body: 10}"))

    raw = await raw_exchange(
        gw.port,
        b"POST /api/v1/users HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n"
        b"Connection: close\r\n\r\n" + b"x" * 100,
    )

    assert status_of(raw) == 413
    assert header_values(raw, b"x-strangler-route") == [b"users-v1"]
    assert header_values(raw, UPSTREAM) == [b"users"]
    assert users.requests == []


def _unsigned_jwt(claims: dict[str, object]) -> str:
    """A token shaped like a JWT; stickiness reads the claim, auth would verify it."""

    def part(data: dict[str, object]) -> str:
        raw = json.dumps(data).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


@ensure
async def test_jwt_claim_stickiness_keys_on_the_claim_not_the_token(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    sticky = "    sticky: {by: jwt_claim, name: sub}"
    gw = gateway(split_rules(mono.url, users.url, 30, sticky=sticky))
    subjects = [f"user-{n}" for n in range(60)]

    # Each subject comes with a different token every time (a new `iat`).
    result = await run_load(
        gw.port,
        lambda i: get(
            "/api/v1/users",
            {
                "Authorization": "Bearer "
                + _unsigned_jwt({"sub": subjects[i % 60], "iat": 1_700_000_000 + i})
            },
        ),
        240,
    )

    landed: dict[str, set[bytes]] = {}
    for reply in result.replies:
        landed.setdefault(subjects[reply.index % 60], set()).add(
            reply.headers[UPSTREAM]
        )
    splitter = Splitter([70, 30], ["monolith", "users"])
    expected = {
        subject: {b"users" if splitter.pick_sticky(subject) else b"monolith"}
        for subject in subjects
    }
    assert result.failures == []
    assert landed == expected
    assert {b"monolith"} in landed.values() and {b"users"} in landed.values()
    assert {line["split"] for line in gw.log_lines()} == {"sticky"}


@pytest.mark.parametrize(
    "sticky",
    [STICKY, "    sticky: {by: jwt_claim, name: sub}"],
    ids=["header", "jwt_claim"],
)
@ensure
async def test_request_without_the_sticky_key_is_drawn_at_random(
    backends, gateway, sticky
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(split_rules(mono.url, users.url, 50, sticky=sticky))
    headers = {"Authorization": "Bearer not-a-jwt"} if "jwt" in sticky else {}

    result = await run_load(gw.port, lambda i: get("/api/v1/users", headers), 400)

    assert result.failures == []
    assert 140 <= result.count(UPSTREAM, b"users") <= 260
    assert {line["split"] for line in gw.log_lines()} == {"random"}
    assert all(b"set-cookie" not in r.headers for r in result.replies)
