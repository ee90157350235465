"""The plan runner on a fake clock: whole plans in milliseconds.

A real `Gateway` carries the split and its counters; the tests feed those
counters with `Metrics.observe`, as the proxy does per request, and move a
`twisted.internet.task.Clock`, so every timing decision is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from twisted.internet.task import Clock

from strangler.gateway import Gateway
from strangler.migration.evidence import gateway_agreement
from strangler.migration.plan import Plan, parse_plan
from strangler.migration.runner import MigrationError, MigrationRunner, spread
from strangler.migration.state import MigrationStore
from strangler.rules import parse_rules
from strangler.runtime_weights import RuntimeWeights

ROUTE = "users-v1"


def rules_text(users: float = 0, shadow: bool = False, third: bool = False) -> str:
    shares = f"""
      - {{to: monolith, weight: {100 - users:g}}}
      - {{to: users, weight: {users:g}}}"""
    if third:
        shares = f"""
      - {{to: monolith, weight: {60 - users:g}}}
      - {{to: legacy, weight: 40}}
      - {{to: users, weight: {users:g}}}"""
    return f"""
listen: 127.0.0.1:0
upstreams:
  monolith: {{targets: [http://127.0.0.1:9]}}
  legacy: {{targets: [http://127.0.0.1:11]}}
  users: {{targets: [http://127.0.0.1:10]}}
default: monolith
routes:
  - name: {ROUTE}
    match: {{path: /api/v1/users}}
    split:{shares}
    sticky: {{by: header, name: X-User-Id}}
{"    shadow: {to: users}" if shadow else ""}
"""


def plan_text(
    steps: str = "[10, 50, 100]",
    hold: str = "10s",
    gates: str = "{min_requests: 100, max_error_rate: 1%}",
    on_fail: str = "rollback",
) -> str:
    return f"""
route: {ROUTE}
move_to: users
steps: {steps}
hold: {hold}
gates: {gates}
on_fail: {on_fail}
"""


class Harness:
    """A gateway, a clock and a runner, with helpers to feed and move time."""

    def __init__(
        self,
        tmp_path: Path,
        rules: str | None = None,
        agreement: Callable[[str], tuple[int, int] | None] | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.rules = parse_rules(rules or rules_text(), str(tmp_path / "rules.yaml"))
        self.clock = Clock()
        self.weights_path = tmp_path / "rules.state.json"
        self.store = MigrationStore(tmp_path / "rules.migrations.json")
        self.agreement = agreement
        self.gateway, self.runner = self.boot()

    def boot(self) -> tuple[Gateway, MigrationRunner]:
        """A fresh gateway and runner on the same state files (a restart)."""
        gateway = Gateway(
            self.rules, self.clock, runtime=RuntimeWeights(self.weights_path)
        )
        runner = MigrationRunner(
            gateway, self.clock, self.store, agreement=self.agreement
        )
        runner.run()
        return gateway, runner

    def plan(self, text: str | None = None) -> Plan:
        return parse_plan(
            text or plan_text(), str(self.tmp_path / "users.yaml"), self.rules
        )

    def feed(
        self, upstream: str, count: int, status: int = 200, seconds: float = 0.002
    ) -> None:
        for _ in range(count):
            self.gateway.metrics.observe(
                ROUTE, upstream, status, seconds, 0, 0, status in (502, 504)
            )

    def traffic(self, count: int, status: int = 200) -> None:
        """`count` requests shared between the sides the way the split says now."""
        users = round(count * self.users_weight() / 100)
        self.feed("users", users, status)
        self.feed("monolith", count - users)

    def wait(self, seconds: float) -> None:
        for _ in range(round(seconds)):
            self.clock.advance(1.0)

    def users_weight(self) -> float:
        return self.gateway.state.plans[ROUTE].effective_weights()["users"]


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def events(harness: Harness, name: str = "users") -> list[str]:
    return [entry["event"] for entry in harness.runner.get(name).history]


# Advancing.


def test_plan_advances_only_after_the_hold_with_every_gate_held(harness):
    migration = harness.runner.start(harness.plan())
    assert harness.users_weight() == 10

    harness.traffic(100)
    harness.wait(9)
    assert harness.users_weight() == 10
    assert {g.gate: g.status for g in migration.gates} == {
        "min_requests": "pass",
        "max_error_rate": "pass",
    }

    harness.wait(1)
    assert harness.users_weight() == 50
    assert migration.step == 1
    advanced = migration.history[-1]
    assert advanced["event"] == "advanced"
    assert (advanced["from"], advanced["to"], advanced["held_for"]) == (10, 50, 10)
    assert advanced["evidence"]["route_requests"] == 100
    assert advanced["evidence"]["new_requests"] == 10
    override = harness.gateway.runtime.get(ROUTE)
    assert override is not None and override.by == "migration:users"


def test_plan_waits_past_the_hold_until_min_requests_is_reached(harness):
    migration = harness.runner.start(harness.plan())

    harness.traffic(60)
    harness.wait(30)
    assert harness.users_weight() == 10
    waiting = {g.gate: g for g in migration.gates}
    assert waiting["min_requests"].status == "wait"
    assert waiting["max_error_rate"].status == "wait"

    harness.traffic(40)
    harness.wait(1)
    assert harness.users_weight() == 50


def test_each_step_is_judged_on_its_own_requests_only(harness):
    harness.runner.start(harness.plan())
    harness.traffic(100)
    harness.wait(10)
    assert harness.users_weight() == 50

    harness.wait(10)
    assert harness.users_weight() == 50, "the first step's requests count again"
    harness.traffic(100)
    harness.wait(1)
    assert harness.users_weight() == 100


def test_plan_completes_after_its_last_step_holds(harness):
    migration = harness.runner.start(harness.plan())
    for _ in range(3):
        harness.traffic(100)
        harness.wait(10)

    assert migration.status == "completed"
    assert harness.users_weight() == 100
    assert events(harness) == ["started", "advanced", "advanced", "completed"]
    harness.wait(30)
    assert events(harness)[-1] == "completed"


def test_start_begins_at_the_first_step_at_or_above_the_current_share(tmp_path):
    harness = Harness(tmp_path, rules_text(users=10))
    migration = harness.runner.start(harness.plan(plan_text(steps="[1, 5, 25, 100]")))

    assert harness.users_weight() == 25
    assert migration.step == 2
    assert migration.history[0]["from"] == 10
    assert "skipped 1%, 5%" in migration.history[0]["reason"]


def test_start_refuses_a_route_already_all_on_the_new_side(tmp_path):
    harness = Harness(tmp_path, rules_text(users=100))

    with pytest.raises(
        MigrationError, match="already takes 100% of 'users-v1'; nothing to do"
    ):
        harness.runner.start(harness.plan(plan_text(steps="[10, 50, 100]")))
    assert harness.users_weight() == 100
    assert harness.runner.migrations == {}


def test_a_second_plan_for_a_running_name_or_route_is_refused(harness):
    harness.runner.start(harness.plan())

    with pytest.raises(MigrationError, match="already running"):
        harness.runner.start(harness.plan())
    other = harness.plan("name: other\n" + plan_text())
    with pytest.raises(MigrationError, match="already being moved by plan 'users'"):
        harness.runner.start(other)

    harness.runner.act("users", "abort")
    assert harness.runner.start(other).status == "running"


# Failing gates.


def test_error_rate_over_the_bound_rolls_back_at_once(harness):
    migration = harness.runner.start(harness.plan(plan_text(hold="10m")))
    harness.feed("monolith", 90)
    harness.feed("users", 8)
    harness.feed("users", 2, status=500)

    harness.wait(1)

    assert migration.status == "rolled_back"
    assert harness.users_weight() == 0
    assert harness.clock.seconds() == 1, "the rollback did not wait for the hold"
    assert migration.reason.startswith("error rate 20% is above 1%")
    last = migration.history[-1]
    assert (last["event"], last["from"], last["to"]) == ("rolled_back", 10, 0)
    assert (last["evidence"]["new_failed"], last["evidence"]["new_requests"]) == (2, 10)
    harness.traffic(100)
    harness.wait(20)
    assert harness.users_weight() == 0


def test_errors_are_not_judged_before_min_requests(harness):
    migration = harness.runner.start(harness.plan())
    harness.feed("users", 5, status=502)

    harness.wait(3)

    assert migration.status == "running"
    harness.feed("monolith", 95)
    harness.wait(1)
    assert migration.status == "rolled_back"
    assert migration.history[-1]["evidence"]["gateway_errors"] == 5


def test_fallbacks_from_the_new_side_count_as_its_failures(harness):
    migration = harness.runner.start(harness.plan())
    harness.feed("monolith", 100)
    # What the proxy records when users fails and the monolith answers instead.
    harness.gateway.state.upstreams["users"].fallbacks += 10
    harness.feed("monolith", 10)

    harness.wait(1)

    assert migration.status == "rolled_back"
    evidence = migration.history[-1]["evidence"]
    assert (evidence["fallbacks"], evidence["new_failed"]) == (10, 10)


def test_slow_new_side_fails_the_p99_ratio(harness):
    gates = "{min_requests: 50, max_p99_ratio: 1.5}"
    migration = harness.runner.start(harness.plan(plan_text(gates=gates, hold="1m")))
    harness.feed("monolith", 60, seconds=0.02)
    harness.feed("users", 25, seconds=0.4)

    harness.wait(1)

    assert migration.status == "rolled_back"
    assert migration.reason.startswith("p99 ratio")
    evidence = migration.history[-1]["evidence"]
    assert evidence["new_p99_ms"] > 250 and evidence["old_p99_ms"] < 25


def test_p99_ratio_with_too_few_requests_on_a_side_does_not_block(harness):
    gates = "{min_requests: 50, max_p99_ratio: 1.5}"
    migration = harness.runner.start(harness.plan(plan_text(gates=gates)))
    harness.feed("monolith", 60, seconds=0.02)
    harness.feed("users", 5, seconds=0.4)

    harness.wait(10)

    assert migration.step == 1
    skipped = migration.history[-1]["gates"][1]
    assert (skipped["gate"], skipped["status"]) == ("max_p99_ratio", "skip")


def test_low_shadow_agreement_rolls_back(tmp_path):
    counts = {"compared": 0, "agreed": 0}
    harness = Harness(
        tmp_path,
        rules_text(shadow=True),
        agreement=lambda route: (counts["compared"], counts["agreed"]),
    )
    gates = "{min_requests: 10, min_shadow_agreement: 99%}"
    migration = harness.runner.start(harness.plan(plan_text(gates=gates)))

    harness.traffic(10)
    counts.update(compared=50, agreed=50)
    harness.wait(10)
    assert migration.step == 1

    counts.update(compared=150, agreed=140)
    harness.traffic(10)
    harness.wait(1)
    assert migration.status == "rolled_back"
    assert migration.reason.startswith("shadow agreement 90% is below 99%")


def test_a_shadow_removed_under_a_plan_holds_it_instead_of_skipping_the_gate(
    tmp_path,
):
    harness = Harness(tmp_path, rules_text(shadow=True))
    gates = "{min_requests: 10, min_shadow_agreement: 99%}"
    migration = harness.runner.start(harness.plan(plan_text(gates=gates)))
    without = parse_rules(rules_text(), str(tmp_path / "rules.yaml"))
    harness.gateway.apply(without)

    harness.traffic(100)
    harness.wait(30)

    assert (migration.status, migration.step, harness.users_weight()) == (
        "running",
        0,
        10,
    )
    gate = {g.gate: g for g in migration.gates}["min_shadow_agreement"]
    assert gate.status == "wait"
    assert gate.detail == "the route has no shadow now; the plan holds until it has one"


def test_gateway_agreement_reads_the_shadow_registry(tmp_path):
    harness = Harness(tmp_path, rules_text(shadow=True))
    read = gateway_agreement(harness.gateway)
    stats = harness.gateway.shadows.stats_for(ROUTE)
    stats.compared, stats.agreed = 40, 39

    assert read(ROUTE) == (40, 39)
    (tmp_path / "plain").mkdir()
    plain = Harness(tmp_path / "plain", rules_text())
    assert gateway_agreement(plain.gateway)(ROUTE) is None


def test_on_fail_pause_freezes_the_split_and_resume_starts_the_step_afresh(harness):
    migration = harness.runner.start(harness.plan(plan_text(on_fail="pause")))
    harness.feed("monolith", 90)
    harness.feed("users", 10, status=500)

    harness.wait(1)
    assert migration.status == "paused"
    assert harness.users_weight() == 10
    assert "error rate 100%" in migration.reason
    harness.wait(60)
    assert (migration.status, harness.users_weight()) == ("paused", 10)

    harness.runner.act("users", "resume")
    harness.traffic(100)
    harness.wait(10)
    assert migration.status == "running"
    assert harness.users_weight() == 50
    assert events(harness) == ["started", "paused", "resumed", "advanced"]


# The operator's actions.


def test_pause_by_the_operator_stops_advancing(harness):
    migration = harness.runner.start(harness.plan())
    harness.traffic(100)

    harness.runner.act("users", "pause")
    harness.wait(30)

    assert (migration.status, harness.users_weight()) == ("paused", 10)
    assert migration.history[-1]["by"] == "admin"
    assert migration.history[-1]["evidence"]["route_requests"] == 100


def test_promote_moves_the_new_side_to_100_and_ends_the_plan(harness):
    migration = harness.runner.start(harness.plan())
    harness.traffic(40)

    harness.runner.act("users", "promote")

    assert (migration.status, harness.users_weight()) == ("completed", 100)
    assert migration.step == 2
    promoted = migration.history[-1]
    assert (promoted["event"], promoted["from"], promoted["to"]) == (
        "promoted",
        10,
        100,
    )
    assert promoted["evidence"]["route_requests"] == 40
    assert [gate["gate"] for gate in promoted["gates"]] == [
        "min_requests",
        "max_error_rate",
    ]
    with pytest.raises(MigrationError, match="is completed"):
        harness.runner.act("users", "pause")


def test_promote_goes_to_100_even_for_a_saved_plan_that_ended_lower(harness):
    """Plans saved by an older version could end below 100%; promote still means all."""
    older = replace(harness.plan(), steps=(10.0, 50.0))
    migration = harness.runner.start(older)

    harness.runner.act("users", "promote")

    assert (migration.status, migration.step, harness.users_weight()) == (
        "completed",
        1,
        100,
    )
    assert harness.gateway.state.plans[ROUTE].effective_weights()["monolith"] == 0


def test_a_paused_plan_keeps_counting_for_whoever_resumes_or_promotes_it(harness):
    migration = harness.runner.start(harness.plan())
    harness.traffic(30)
    harness.runner.act("users", "pause")
    harness.traffic(50)

    view_gates = {g.gate: g for g in harness.runner.current_gates(migration)}
    assert view_gates["min_requests"].value == 80
    harness.runner.act("users", "resume")

    resumed = migration.history[-1]
    assert resumed["event"] == "resumed"
    assert resumed["evidence"]["route_requests"] == 80
    assert {gate["gate"]: gate["status"] for gate in resumed["gates"]} == {
        "min_requests": "wait",
        "max_error_rate": "wait",
    }
    assert harness.runner.evidence(migration).route_requests == 0

    harness.runner.act("users", "pause")
    harness.traffic(200)
    harness.runner.act("users", "promote")
    assert migration.history[-1]["evidence"]["route_requests"] == 200


def test_the_started_entry_shows_the_route_s_traffic_before_the_plan(tmp_path):
    harness = Harness(tmp_path, rules_text(users=10))
    harness.feed("monolith", 90)
    harness.feed("users", 9)
    harness.feed("users", 1, status=500)

    migration = harness.runner.start(harness.plan())

    started = migration.history[0]
    assert started["event"] == "started"
    assert started["evidence"]["route_requests"] == 100
    assert (started["evidence"]["new_failed"], started["evidence"]["new_requests"]) == (
        1,
        10,
    )
    assert started["gates"] == []


def test_a_plan_whose_progress_cannot_be_saved_is_refused_before_the_split_moves(
    tmp_path,
):
    (tmp_path / "not-a-directory").write_text("")
    harness = Harness(tmp_path)
    harness.store.path = tmp_path / "not-a-directory" / "rules.migrations.json"

    with capture_logs() as logs, pytest.raises(MigrationError) as info:
        harness.runner.start(harness.plan())

    assert (info.value.status, info.value.code) == (503, "state_not_writable")
    assert info.value.message.startswith(
        f"cannot keep the plan's progress in {harness.store.path}: Not a directory; "
        "start the gateway with `strangler serve --state PATH`"
    )
    assert harness.runner.migrations == {}
    assert harness.users_weight() == 0
    assert [e["event"] for e in logs] == ["migration_state_not_saved"]
    assert logs[0]["log_level"] == "error"


def test_abort_puts_the_new_side_back_to_zero(harness):
    migration = harness.runner.start(harness.plan())
    harness.traffic(100)
    harness.wait(10)

    harness.runner.act("users", "abort")

    assert (migration.status, harness.users_weight()) == ("aborted", 0)
    assert migration.step is None
    with pytest.raises(MigrationError, match="is aborted"):
        harness.runner.act("users", "resume")


def test_unknown_plan_or_action_is_refused_with_404(harness):
    harness.runner.start(harness.plan())

    with pytest.raises(MigrationError, match="no migration plan named 'nope'") as info:
        harness.runner.act("nope", "pause")
    assert info.value.status == 404
    with pytest.raises(MigrationError, match="no action 'skip'") as info:
        harness.runner.act("users", "skip")
    assert info.value.status == 404


def test_a_split_changed_outside_the_plan_pauses_it(harness):
    migration = harness.runner.start(harness.plan())

    harness.gateway.set_weights(ROUTE, {"users": 30}, by="admin")
    harness.wait(1)

    assert migration.status == "paused"
    assert "changed outside the plan: users is at 30%" in migration.reason
    assert harness.users_weight() == 30
    with pytest.raises(MigrationError, match="shift it back to 10%"):
        harness.runner.act("users", "resume")

    harness.gateway.set_weights(ROUTE, {"users": 10}, by="admin")
    harness.runner.act("users", "resume")
    assert migration.status == "running"


# Records and restarts.


def test_every_step_change_is_a_log_event_with_its_evidence(harness):
    with capture_logs() as logs:
        harness.runner.start(harness.plan())
        harness.traffic(100)
        harness.wait(10)
        harness.feed("users", 50, status=503)
        harness.feed("monolith", 50)
        harness.wait(1)

    found = [e for e in logs if e["event"].startswith("migration_")]
    assert [e["event"] for e in found] == [
        "migration_started",
        "migration_advanced",
        "migration_rolled_back",
    ]
    advanced, rolled_back = found[1], found[2]
    assert (advanced["from_weight"], advanced["to_weight"]) == (10, 50)
    assert advanced["evidence"]["route_requests"] == 100
    assert rolled_back["log_level"] == "warning"
    assert rolled_back["evidence"]["new_failed"] == 50


def test_a_restart_resumes_the_plan_where_it_was(harness):
    harness.runner.start(harness.plan())
    harness.traffic(100)
    harness.wait(10)
    assert harness.users_weight() == 50
    harness.runner.stop()

    harness.gateway, harness.runner = harness.boot()
    restored = harness.runner.get("users")

    assert (restored.status, restored.step, restored.weight) == ("running", 1, 50)
    assert harness.users_weight() == 50
    assert events(harness) == ["started", "advanced"]
    harness.wait(15)
    assert harness.users_weight() == 50, "advanced without evidence after restart"
    harness.traffic(100)
    harness.wait(10)
    assert harness.users_weight() == 100


def test_a_restart_keeps_paused_and_finished_plans_as_they_were(harness):
    harness.runner.start(harness.plan())
    harness.runner.act("users", "pause")
    other = harness.plan("name: done\n" + plan_text())
    harness.runner.stop()

    harness.gateway, harness.runner = harness.boot()
    assert harness.runner.get("users").status == "paused"
    harness.runner.act("users", "abort")
    harness.runner.start(other)
    harness.runner.act("done", "promote")
    harness.runner.stop()

    harness.gateway, harness.runner = harness.boot()
    assert harness.runner.get("users").status == "aborted"
    assert harness.runner.get("done").status == "completed"
    assert harness.users_weight() == 100


def test_a_damaged_progress_file_is_ignored(tmp_path):
    (tmp_path / "rules.migrations.json").write_text("{not json")
    harness = Harness(tmp_path)

    assert harness.runner.migrations == {}


# Sticky users.


def keys_on_users(harness: Harness, keys: list[str]) -> list[str]:
    plan = harness.gateway.state.plans[ROUTE]
    assert plan.splitter is not None
    return [plan.splitter.labels[plan.splitter.pick_sticky(key)] for key in keys]


def test_no_sticky_key_moves_back_during_a_ramp(harness):
    keys = [f"user-{n}" for n in range(5000)]
    harness.runner.start(
        harness.plan(plan_text(steps="[1, 5, 25, 50, 100]", gates="{min_requests: 0}"))
    )
    seen = [keys_on_users(harness, keys)]
    for _ in range(5):
        harness.wait(10)
        seen.append(keys_on_users(harness, keys))

    shares = [sides.count("users") / len(keys) * 100 for sides in seen]
    for share, step in zip(shares, [1, 5, 25, 50, 100, 100], strict=True):
        assert abs(share - step) < 2, shares
    for index, key in enumerate(keys):
        path = [sides[index] for sides in seen]
        first = path.index("users")
        assert set(path[first:]) == {"users"}, (key, path)


def test_the_other_sides_shrink_in_proportion_and_keep_their_keys(tmp_path):
    harness = Harness(tmp_path, rules_text(third=True))
    keys = [f"user-{n}" for n in range(5000)]
    before = keys_on_users(harness, keys)
    harness.runner.start(harness.plan(plan_text(steps="[20, 70, 100]", gates="{}")))
    weights = harness.gateway.state.plans[ROUTE].effective_weights()
    assert weights == {"monolith": 48.0, "legacy": 32.0, "users": 20.0}

    harness.wait(10)
    after = keys_on_users(harness, keys)

    assert harness.users_weight() == 70
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert moved and {new for _, new in moved} == {"users"}


def test_spread_always_adds_up_exactly():
    assert spread(99, {"a": 1, "b": 1, "c": 1}) == {"a": 33.0, "b": 33.0, "c": 33.0}
    parts = spread(99.99, {"a": 2, "b": 1, "c": 1})
    assert round(sum(parts.values()), 2) == 99.99
    assert parts == {"a": 50.0, "b": 25.0, "c": 24.99} or parts == {
        "a": 49.99,
        "b": 25.0,
        "c": 25.0,
    }
    assert spread(100, {"a": 0, "b": 0}) == {"a": 50.0, "b": 50.0}


def test_a_plan_whose_check_fails_is_paused_and_the_runner_keeps_going(tmp_path):
    broken = {"now": False}

    def agreement(route: str) -> tuple[int, int] | None:
        if broken["now"]:
            raise RuntimeError("registry unavailable")
        return None

    harness = Harness(tmp_path, agreement=agreement)
    migration = harness.runner.start(harness.plan())

    broken["now"] = True
    harness.wait(1)
    assert migration.status == "paused"
    assert "failed checking the plan: registry unavailable" in migration.reason

    broken["now"] = False
    harness.runner.act("users", "resume")
    harness.traffic(100)
    harness.wait(10)
    assert harness.users_weight() == 50
