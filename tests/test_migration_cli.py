"""`strangler migrate` as a user runs it: subprocesses, real files, a real gateway."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from cli_support import ServeProcess, run_cli

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cli-secret"


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def write_rules(tmp_path: Path, admin_port: int) -> Path:
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
