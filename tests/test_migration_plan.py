"""Plan files: what a good one becomes, and every problem at its file and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from strangler.errors import ConfigError
from strangler.migration.plan import Gates, Plan, load_plan, parse_plan
from strangler.rules import load_rules, parse_rules

ROOT = Path(__file__).resolve().parent.parent

RULES = parse_rules(
    """
listen: 127.0.0.1:0
upstreams:
  monolith: {targets: [http://127.0.0.1:9]}
  users: {targets: [http://127.0.0.1:10]}
  orders: {targets: [http://127.0.0.1:11]}
default: monolith
routes:
  - name: users-v2
    match: {path: /api/v2/users}
    to: users
  - name: users-v1
    match: {path: /api/v1/users}
    split:
      - {to: monolith, weight: 100}
      - {to: users, weight: 0}
    shadow: {to: users}
  - name: orders-v1
    match: {path: /api/v1/orders}
    split:
      - {to: monolith, weight: 100}
      - {to: orders, weight: 0}
      - {to: users, weight: 0}
    shadow: {to: orders}
  - name: carts-v1
    match: {path: /api/v1/carts}
    split:
      - {to: monolith, weight: 100}
      - {to: users, weight: 0}
""",
    "rules.yaml",
)

GOOD = """
route: users-v1
move_to: users
steps: [1, 5%, 25, 50.5, 100]
hold: 10m
gates:
  min_requests: 200
  max_error_rate: 1%
  max_p99_ratio: 1.5
  min_shadow_agreement: 99.5%
on_fail: pause
"""


def problems(
    text: str, rules: object = RULES, source: str = "plans/p.yaml"
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_plan(textwrap.dedent(text), source, rules)  # type: ignore[arg-type]
    return [str(problem) for problem in info.value.problems]


def test_a_good_plan_becomes_frozen_data():
    plan = parse_plan(GOOD, "migrations/users.yaml", RULES)

    assert plan == Plan(
        name="users",
        route="users-v1",
        move_to="users",
        steps=(1, 5, 25, 50.5, 100),
        hold=600,
        gates=Gates(
            min_requests=200,
            max_error_rate=1,
            max_p99_ratio=1.5,
            min_shadow_agreement=99.5,
        ),
        on_fail="pause",
        source="migrations/users.yaml",
    )
    assert Plan.from_dict(plan.as_dict()) == plan


def test_defaults_are_no_gates_and_rollback_and_a_name_key_wins():
    plan = parse_plan(
        "name: ramp-2\nroute: users-v1\nmove_to: users\nsteps: [100]\nhold: 1s\n",
        "x.yaml",
        RULES,
    )

    assert (plan.name, plan.gates, plan.on_fail) == ("ramp-2", Gates(), "rollback")


def test_every_problem_is_reported_with_its_line_and_key():
    found = problems(
        """\
        route: users-v1
        move_to: users
        steps: [5, 1, 150, 2.555, 0]
        hold: soon
        gates:
          min_requests: -1
          max_error_rate: 200%
          max_p99_ratio: 0
          min_agreement: 99%
        on_fail: retry
        extra: 1
        """
    )

    assert found == [
        "plans/p.yaml:3: steps[1]: steps must rise: 1% is not above the step "
        "before it (5%)",
        "plans/p.yaml:3: steps[2]: expected a percentage from 0 to 100 like 5%, "
        "got 150",
        "plans/p.yaml:3: steps[3]: use at most two decimals, got 2.555",
        "plans/p.yaml:3: steps[4]: a step must be above 0%; the plan starts from 0",
        "plans/p.yaml:4: hold: expected a duration like 250ms, 10s or 5m, got 'soon'",
        "plans/p.yaml:6: gates.min_requests: expected a whole number of at least 0, "
        "got -1",
        "plans/p.yaml:7: gates.max_error_rate: expected a percentage from 0 to 100 "
        "like 5%, got '200%'",
        "plans/p.yaml:8: gates.max_p99_ratio: expected a ratio above 0 like 1.5 "
        "(new p99 / old p99), got 0",
        "plans/p.yaml:9: gates.min_agreement: unknown key 'min_agreement' (did you "
        "mean 'min_shadow_agreement'?); allowed keys: min_requests, max_error_rate, "
        "max_p99_ratio, min_shadow_agreement",
        "plans/p.yaml:10: on_fail: expected rollback or pause, got 'retry'",
        "plans/p.yaml:11: extra: unknown key 'extra'; allowed keys: name, route, "
        "move_to, steps, hold, gates, on_fail",
    ]


def test_missing_keys_and_a_plan_that_is_not_a_mapping():
    assert problems("steps: [1, 100]\n") == [
        "plans/p.yaml:1: missing required key 'route'",
        "plans/p.yaml:1: missing required key 'move_to'",
        "plans/p.yaml:1: missing required key 'hold'",
    ]
    assert problems("- route\n") == [
        "plans/p.yaml:1: expected a mapping of plan keys, got a list"
    ]
    assert problems("route: [\n")[0].startswith("plans/p.yaml:2: invalid YAML")


def test_route_and_upstreams_are_checked_against_the_rules():
    base = "steps: [1, 100]\nhold: 1s\n"

    assert problems(f"route: users-v9\nmove_to: users\n{base}") == [
        "plans/p.yaml:1: route: rules.yaml has no route named 'users-v9' "
        "(its routes: users-v2, users-v1, orders-v1, carts-v1)"
    ]
    assert problems(f"route: users-v2\nmove_to: users\n{base}") == [
        "plans/p.yaml:1: route: route 'users-v2' sends everything to 'users'; a "
        "plan needs a route with a split of two or more upstreams"
    ]
    assert problems(f"route: carts-v1\nmove_to: orders\n{base}") == [
        "plans/p.yaml:2: move_to: route 'carts-v1' splits to monolith, users; "
        "'orders' is not one of them"
    ]
    assert problems(f"route: users-v1\nmove_to: billing\n{base}") == [
        "plans/p.yaml:2: move_to: rules.yaml has no upstream named 'billing' "
        "(its upstreams: monolith, users, orders)"
    ]


def test_without_rules_only_the_shape_is_checked():
    plan = parse_plan("route: r\nmove_to: u\nsteps: [50, 100]\nhold: 2m\n", "p.yaml")

    assert (plan.route, plan.move_to, plan.hold) == ("r", "u", 120)


def test_environment_variables_are_not_read_in_plans(monkeypatch):
    monkeypatch.setenv("ROUTE", "users-v1")

    found = problems("route: ${ROUTE}\nmove_to: users\nsteps: [100]\nhold: 1s\n")

    assert found == ["plans/p.yaml:1: route: environment variable ROUTE is not set"]


def test_a_file_name_that_is_no_plan_name_needs_a_name_key():
    found = problems(
        "route: users-v1\nmove_to: users\nsteps: [100]\nhold: 1s\n",
        source="my plan.yaml",
    )

    assert found == [
        "my plan.yaml:1: the file name gives the plan name 'my plan', which is not "
        "a name of letters, digits, '_', '.' and '-'; set `name:`"
    ]


def test_an_unreadable_plan_file_is_one_problem(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the plan file"):
        load_plan(tmp_path / "missing.yaml")


def test_the_shipped_demo_plan_fits_the_demo_rules():
    rules = load_rules(ROOT / "strangler" / "demo" / "demo.yaml", {})

    plan = load_plan(ROOT / "migrations" / "users.yaml", rules)

    assert (plan.name, plan.route, plan.move_to) == ("users", "users-v1", "users")
    assert plan.steps == (1, 5, 25, 50, 100)
    assert plan.on_fail == "rollback"


def test_a_plan_must_end_at_100_percent():
    found = problems("route: users-v1\nmove_to: users\nsteps: [1, 5, 50]\nhold: 1m\n")

    assert found == [
        "plans/p.yaml:3: steps[2]: the last step must be 100%, got 50%: a plan "
        "ends with move_to taking the whole route (to stop part way, pause the "
        "plan or use `strangler shift`)"
    ]


def test_a_hold_shorter_than_the_runner_s_check_interval_is_refused():
    base = "route: users-v1\nmove_to: users\nsteps: [100]\n"

    assert problems(base + "hold: 500ms\n") == [
        "plans/p.yaml:4: hold: must be at least 1s, got '500ms': the gateway "
        "checks running plans every 1s"
    ]
    assert parse_plan(base + "hold: 1s\n", "p.yaml", RULES).hold == 1


def test_a_shadow_gate_needs_a_shadow_to_the_new_side():
    gates = "gates:\n  min_requests: 10\n  min_shadow_agreement: 99%\n"
    plan = "move_to: users\nsteps: [100]\nhold: 1m\n" + gates

    assert problems("route: carts-v1\n" + plan) == [
        "plans/p.yaml:7: gates.min_shadow_agreement: route 'carts-v1' has no "
        "shadow in rules.yaml, so this gate could never be judged; add a "
        "`shadow` to the route or remove the gate"
    ]
    assert problems("route: orders-v1\n" + plan) == [
        "plans/p.yaml:7: gates.min_shadow_agreement: the shadow of route "
        "'orders-v1' goes to 'orders', not to 'users': its agreement says "
        "nothing about 'users'"
    ]
    checked = parse_plan("route: users-v1\n" + plan, "p.yaml", RULES)
    assert checked.gates.min_shadow_agreement == 99
