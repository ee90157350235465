"""`strangler migrate` as a user runs it: subprocesses, real files, a real gateway."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from cli_support import ServeProcess, run_cli

from strangler.migration.cli import format_migration
from strangler.rules import load_rules
from strangler.workers import Supervisor, run_workers

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cli-secret"


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def write_rules(tmp_path: Path, admin_port: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "rules.yaml"
    nowhere = free_port()
    path.write_text(
        f"""\
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:{admin_port}, token: ${{STRANGLER_ADMIN_TOKEN}}}}
upstreams:
  monolith: {{targets: [http://127.0.0.1:{nowhere}]}}
  users: {{targets: [http://127.0.0.1:{nowhere}]}}
default: monolith
routes:
  - name: users-v1
    match: {{path: /api/v1/users}}
    split:
      - {{to: monolith, weight: 100}}
      - {{to: users, weight: 0}}
    sticky: {{by: header, name: X-User-Id}}
"""
    )
    return path


def write_plan(tmp_path: Path, text: str, name: str = "ramp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_PLAN = """\
route: users-v1
move_to: users
steps: [2, 20, 100]
hold: 1h
gates: {min_requests: 100, max_error_rate: 1%}
"""

BAD_PLAN = """\
route: users-v1
move_to: users
steps: [20, 2]
hold: 1h
on_fail: shrug
"""


def test_check_accepts_the_shipped_plan_against_the_demo_rules():
    result = run_cli(
        "migrate",
        "check",
        str(ROOT / "migrations" / "users.yaml"),
        "--rules",
        str(ROOT / "strangler" / "demo" / "demo.yaml"),
    )

    assert result.returncode == 0, result.stderr
    assert "ok: plan 'users' moves users-v1 to users through 1% 5% 25% 50% 100%" in (
        result.stdout
    )


def test_check_lists_every_problem_with_file_and_line(tmp_path: Path):
    rules = write_rules(tmp_path, free_port())
    plan = write_plan(tmp_path, BAD_PLAN.replace("move_to: users", "move_to: orders"))

    result = run_cli(
        "migrate",
        "check",
        str(plan),
        "--rules",
        str(rules),
        env={"STRANGLER_ADMIN_TOKEN": "x"},
    )

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{plan}:2: move_to: {rules} has no upstream named 'orders' "
        "(its upstreams: monolith, users)",
        f"{plan}:3: steps[1]: steps must rise: 2% is not above the step before it (20%)",
        f"{plan}:5: on_fail: expected rollback or pause, got 'shrug'",
        "3 problems",
    ]
    assert result.stdout == ""


def migrate(admin: str, *args: str, token: str = TOKEN):
    return run_cli(
        "migrate", *args, "--admin", admin, env={"STRANGLER_ADMIN_TOKEN": token}
    )


def test_start_status_pause_and_a_restart_against_a_running_gateway(tmp_path: Path):
    port = free_port()
    admin = f"http://127.0.0.1:{port}"
    rules = write_rules(tmp_path, port)
    plan = write_plan(tmp_path, GOOD_PLAN)
    env = {"STRANGLER_ADMIN_TOKEN": TOKEN}

    gateway = ServeProcess(rules, env=env)
    try:
        started = migrate(admin, "start", str(plan))
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith(
            "ramp: RUNNING  users-v1 -> users at 2% (step 1/3; steps 2% 20% 100%)"
        )

        status = migrate(admin, "status")
        assert status.returncode == 0, status.stderr
        assert "min_requests" in status.stdout and "wait" in status.stdout
        assert "started" in status.stdout

        again = migrate(admin, "start", str(plan))
        assert again.returncode == 1
        assert "plan 'ramp' is already running at 2%" in again.stderr

        paused = migrate(admin, "pause", "ramp")
        assert paused.returncode == 0, paused.stderr
        assert "ramp: PAUSED" in paused.stdout

        wrong = migrate(admin, "status", token="nope")
        assert wrong.returncode == 1
        assert "refused the token (401)" in wrong.stderr
    finally:
        assert gateway.stop() == 0

    progress = json.loads((tmp_path / "rules.migrations.json").read_text())
    assert progress["migrations"][0]["status"] == "paused"

    gateway = ServeProcess(rules, env=env)
    try:
        restored = migrate(admin, "status", "ramp", "--json")
        assert restored.returncode == 0, restored.stderr
        view = json.loads(restored.stdout)
        assert (view["status"], view["weight"], view["step"]) == ("paused", 2, 1)

        resumed = migrate(admin, "resume", "ramp", "--json")
        assert json.loads(resumed.stdout)["status"] == "running"
        aborted = migrate(admin, "abort", "ramp")
        assert "ramp: ABORTED" in aborted.stdout and "at 0%" in aborted.stdout
    finally:
        assert gateway.stop() == 0


def test_start_refuses_a_bad_plan_with_the_gateway_s_reasons(tmp_path: Path):
    port = free_port()
    rules = write_rules(tmp_path, port)
    plan = write_plan(tmp_path, BAD_PLAN)
    gateway = ServeProcess(rules, env={"STRANGLER_ADMIN_TOKEN": TOKEN})
    try:
        result = migrate(f"http://127.0.0.1:{port}", "start", str(plan))
    finally:
        gateway.stop()

    assert result.returncode == 1
    assert f"{plan}:3: steps[1]: steps must rise" in result.stderr
    assert f"{plan}:5: on_fail: expected rollback or pause" in result.stderr


def test_state_flag_keeps_plan_progress_where_it_says(tmp_path: Path):
    port = free_port()
    admin = f"http://127.0.0.1:{port}"
    rules = write_rules(tmp_path / "read-only-config", port)
    (tmp_path / "var").mkdir()
    state = tmp_path / "var" / "gateway.json"
    plan = write_plan(tmp_path, GOOD_PLAN)
    env = {"STRANGLER_ADMIN_TOKEN": TOKEN}

    gateway = ServeProcess(rules, env=env, args=("--state", str(state)))
    try:
        started = migrate(admin, "start", str(plan))
        assert started.returncode == 0, started.stderr
    finally:
        assert gateway.stop() == 0

    assert json.loads(state.read_text())["weights"]["users-v1"]["weights"] == {
        "monolith": 98.0,
        "users": 2.0,
    }
    progress = json.loads((tmp_path / "var" / "gateway.migrations.json").read_text())
    assert progress["migrations"][0]["plan"]["name"] == "ramp"
    assert sorted(p.name for p in rules.parent.iterdir()) == ["rules.yaml"]

    gateway = ServeProcess(rules, env=env, args=("--state", str(state)))
    try:
        restored = migrate(admin, "status", "ramp", "--json")
    finally:
        assert gateway.stop() == 0
    assert restored.returncode == 0, restored.stderr
    assert (
        json.loads(restored.stdout)["status"],
        json.loads(restored.stdout)["weight"],
    ) == (
        "running",
        2,
    )


def test_a_state_path_that_cannot_be_used_is_refused_at_start(tmp_path: Path):
    rules = write_rules(tmp_path, free_port())

    env = {"STRANGLER_ADMIN_TOKEN": TOKEN}
    missing = run_cli(
        "serve", str(rules), "--state", str(tmp_path / "no" / "s.json"), env=env
    )
    folder = run_cli("serve", str(rules), "--state", str(tmp_path), env=env)

    assert missing.returncode == 2
    assert missing.stderr == (
        f"strangler serve: --state {tmp_path / 'no' / 's.json'}: the directory "
        f"{tmp_path / 'no'} does not exist\n"
    )
    assert folder.returncode == 2
    assert "is a directory; give a file name, like state.json" in folder.stderr


def test_workers_all_get_the_state_path(tmp_path: Path, monkeypatch):
    seen: list[list[str]] = []

    def run(supervisor: Supervisor) -> int:
        seen.extend(supervisor.command(index) for index in range(supervisor.count))
        supervisor.sock.close()
        return 0

    monkeypatch.setattr(Supervisor, "run", run)
    rules_path = write_rules(tmp_path, free_port())
    rules = load_rules(rules_path, {"STRANGLER_ADMIN_TOKEN": TOKEN})
    state = str(tmp_path / "gw.json")
    assert run_workers(rules_path, rules, 2, "127.0.0.1:0", state=state) == 0

    assert len(seen) == 2
    for command in seen:
        assert command[command.index("--state") + 1] == state


def test_a_plan_is_refused_loudly_when_its_progress_cannot_be_saved(tmp_path: Path):
    port = free_port()
    rules = write_rules(tmp_path, port)
    # Where progress would go is taken by a directory, as unwritable as a
    # read-only rules directory is for a gateway running as root.
    (tmp_path / "rules.migrations.json").mkdir()
    plan = write_plan(tmp_path, GOOD_PLAN)

    gateway = ServeProcess(rules, env={"STRANGLER_ADMIN_TOKEN": TOKEN})
    try:
        admin = f"http://127.0.0.1:{port}"
        result = migrate(admin, "start", str(plan))
        listed = migrate(admin, "status")
    finally:
        gateway.stop()

    assert result.returncode == 1
    assert (
        f"cannot keep the plan's progress in {tmp_path / 'rules.migrations.json'}: "
        in result.stderr
    )
    assert "strangler serve --state PATH" in result.stderr
    assert listed.stdout.strip() == "no migration plans"
    assert not (tmp_path / "rules.state.json").exists()


def test_status_text_shows_each_step_s_p99s_and_shadow_counts():
    evidence = {
        "route_requests": 400,
        "new_requests": 100,
        "new_failed": 1,
        "gateway_errors": 0,
        "fallbacks": 0,
        "old_requests": 300,
        "new_p99_ms": 12.345,
        "old_p99_ms": 9.8,
        "shadow_compared": 100,
        "shadow_agreed": 98,
    }
    entry = {
        "at": "2026-12-03T20:24:58.579Z",
        "from": 5,
        "to": 25,
        "by": "plan",
        "reason": None,
        "gates": [],
    }
    view = {
        "name": "users",
        "status": "running",
        "reason": None,
        "weight": 25,
        "step": 2,
        "at_step_seconds": 3,
        "gates": [],
        "plan": {
            "route": "users-v1",
            "move_to": "users",
            "steps": [5, 25, 100],
            "hold": 60,
        },
        "history": [
            {
                **entry,
                "event": "started",
                "from": 0,
                "to": 5,
                "held_for": None,
                "evidence": {
                    **evidence,
                    "new_p99_ms": None,
                    "old_p99_ms": None,
                    "shadow_compared": None,
                    "shadow_agreed": None,
                },
            },
            {**entry, "event": "advanced", "held_for": 60, "evidence": evidence},
        ],
    }

    lines = format_migration(view).splitlines()

    assert lines[-2].endswith(
        "started     0% -> 5%  by plan  [since the gateway started: 400 requests; "
        "1 of 100 to users failed; p99 users -, the others -]"
    )
    assert lines[-1].endswith(
        "advanced    5% -> 25%  by plan after 1m  [400 requests; 1 of 100 to users "
        "failed; p99 users 12.3 ms, the others 9.8 ms; shadow 98 of 100 agreed]"
    )
