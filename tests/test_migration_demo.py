"""The issue's "done when", the way a user does it: `strangler demo`, the
shipped plan started through `strangler migrate start`, real traffic, the new
service broken on purpose, and every user back on the monolith by itself.

Everything runs as subprocesses on 127.0.0.1; load is sent one request at a
time over a keep-alive connection and bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_support import COMMAND, run_cli

from strangler.demo import DEMO_PLAN, DEMO_RULES

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "demo-token"
DEMO_PORTS = (8080, 8081, 9001, 9002, 9101)
PHASE_LIMIT = 60.0
"""Seconds any one phase of the story may take before the test gives up."""
MAX_REQUESTS = 20_000
"""Requests any one phase may send before the test gives up."""


def free_offset() -> int:
    """A port offset at which every demo port is free right now."""
    rng = random.Random()
    for _ in range(50):
        offset = rng.randrange(19_100, 23_600)  # every port below 32768
        if all(_free(port + offset) for port in DEMO_PORTS):
            return offset
    pytest.fail("no free set of demo ports found")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Demo:
    """`strangler demo --port-offset N` in the background, its output collected."""

    def __init__(self, offset: int) -> None:
        env = {k: v for k, v in os.environ.items() if k != "STRANGLER_ADMIN_TOKEN"}
        self.process = subprocess.Popen(
            [*COMMAND, "demo", "--port-offset", str(offset)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        # The access log goes to stdout: it must be read all the time or the
        # demo would block on a full pipe.
        self.readers = [
            threading.Thread(target=_drain, args=(stream, lines), daemon=True)
            for stream, lines in (
                (self.process.stdout, self.out),
                (self.process.stderr, self.err),
            )
        ]
        for reader in self.readers:
            reader.start()

    def wait_for(self, found: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + PHASE_LIMIT
        while time.monotonic() < deadline:
            value = found()
            if value:
                return value
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"{what} never came; demo stderr:\n{''.join(self.err)}")

    def banner_line(self, starts: str) -> str:
        """The banner line that starts with `starts` (once printed), stripped."""
        line = self.wait_for(
            lambda: next(
                (s.strip() for s in list(self.out) if s.strip().startswith(starts)),
                None,
            ),
            f"a banner line starting {starts!r}",
        )
        return str(line)

    def requests_logged(self) -> dict[str, dict[str, Any]]:
        """The access-log lines so far, by request id."""
        found = {}
        for line in list(self.out):
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("event") == "request":
                found[event["request_id"]] = event
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for reader in self.readers:
            reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return self.process.returncode


def _drain(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


class Traffic:
    """Sticky users calling /api/v1/users through the gateway, one at a time."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.sent = 0
        self.rng = random.Random(8)

    def one(self, user: str | None = None) -> tuple[str, str, str, int]:
        """(user, X-Served-By, X-Request-Id, status) of one request."""
        user = user or f"user-{self.rng.randrange(100_000)}"
        self.connection.request("GET", "/api/v1/users/3", headers={"X-User-Id": user})
        reply = self.connection.getresponse()
        reply.read()
        self.sent += 1
        return (
            user,
            reply.headers["X-Served-By"],
            reply.headers["X-Request-Id"],
            (reply.status),
        )

    def until(self, done: Callable[[], bool], what: str, every: int = 25) -> None:
        """Send requests until `done()` (asked every `every` requests), bounded."""
        deadline = time.monotonic() + PHASE_LIMIT
        for count in range(MAX_REQUESTS):
            if count % every == 0 and done():
                return
            if time.monotonic() > deadline:
                break
            self.one()
        pytest.fail(f"{what} did not happen after {self.sent} requests")

    def close(self) -> None:
        self.connection.close()


def plan_view(admin: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{admin}/migrations/users", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


def test_the_demo_plan_ramps_then_rolls_back_on_its_own_when_users_breaks(
    tmp_path: Path,
):
    offset = free_offset()
    demo = Demo(offset)
    traffic = None
    try:
        # The banner names the shipped plan and the exact command for these ports.
        plan_path = demo.banner_line("migration plan").split(maxsplit=2)[2]
        start_line = demo.banner_line("strangler migrate start")
        admin = f"http://127.0.0.1:{8081 + offset}"
        users_url = f"http://127.0.0.1:{9101 + offset}"
        assert Path(plan_path) == DEMO_PLAN
        assert start_line == f"strangler migrate start {DEMO_PLAN} --admin {admin}"
        assert demo.banner_line("export STRANGLER_ADMIN_TOKEN") == (
            f"export STRANGLER_ADMIN_TOKEN={TOKEN}"
        )
        assert demo.banner_line(f"curl -X POST '{users_url}/admin/fail?rate=0.5'")

        # The same plan with 1 s holds, started the way the banner says.
        text = Path(plan_path).read_text()
        assert "hold: 20s" in text
        quick = tmp_path / "users.yaml"
        quick.write_text(text.replace("hold: 20s", "hold: 1s"))
        started = run_cli(
            "migrate",
            "start",
            str(quick),
            "--admin",
            admin,
            env={"STRANGLER_ADMIN_TOKEN": TOKEN},
        )
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("users: RUNNING  users-v1 -> users at 25%")

        # It ramps on evidence: 25% -> 50% once a step held with its gates.
        traffic = Traffic(8080 + offset)
        traffic.until(lambda: plan_view(admin)["weight"] >= 50, "a step up")
        ramping = plan_view(admin)
        assert ramping["status"] == "running", ramping

        # Break the new service half way; the plan must see it and roll back.
        broken = urllib.request.Request(
            f"{users_url}/admin/fail?rate=0.5", method="POST"
        )
        with urllib.request.urlopen(broken, timeout=10) as reply:
            assert json.loads(reply.read()) == {"fail_rate": 0.5}
        traffic.until(lambda: plan_view(admin)["status"] != "running", "a rollback")

        view = plan_view(admin)
        assert (view["status"], view["weight"], view["step"]) == (
            "rolled_back",
            0,
            None,
        )
        assert view["reason"].startswith("error rate "), view["reason"]
        events = [entry["event"] for entry in view["history"]]
        assert events[0] == "started" and events[-1] == "rolled_back"
        assert "advanced" in events
        evidence = view["history"][-1]["evidence"]
        assert evidence["new_failed"] > 0 and evidence["fallbacks"] > 0

        shown = run_cli(
            "migrate", "status", "--admin", admin, env={"STRANGLER_ADMIN_TOKEN": TOKEN}
        )
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith("users: ROLLED_BACK  users-v1 -> users at 0%")
        assert "  reason: error rate " in shown.stdout
        rolled_back = shown.stdout.splitlines()[-1]
        assert re.search(r"rolled_back (50|100)% -> 0%  by plan", rolled_back)
        assert "; p99 users " in rolled_back and ", the others " in rolled_back

        # Every user is routed to the monolith now, not rescued by a fallback.
        answers = [traffic.one(f"user-{n}") for n in range(300)]
        assert {status for _, _, _, status in answers} == {200}
        assert all(served.startswith("monolith-") for _, served, _, _ in answers)
        ids = {request_id for _, _, request_id, _ in answers}
        logged = demo.wait_for(
            lambda: ids <= set(demo.requests_logged()) and demo.requests_logged(),
            "the access log of the last requests",
        )
        assert {(logged[i]["upstream"], logged[i]["fallback_from"]) for i in ids} == {
            ("monolith", None)
        }
    finally:
        if traffic is not None:
            traffic.close()
        code = demo.stop()

    assert code == 0, "".join(demo.err)
    assert any("demo stopped" in line for line in demo.out)


def test_the_demo_plan_is_package_data_and_matches_the_repository_copy(tmp_path):
    """What `pip install` puts in site-packages holds the plan `strangler demo` names."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(
        ROOT / "strangler",
        tmp_path / "strangler",
        ignore=shutil.ignore_patterns("__pycache__"),
    )

    built = subprocess.run(
        [
            sys.executable,
            "-c",
            "import setuptools; setuptools.setup()",
            "-q",
            "build_py",
            "--build-lib",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert built.returncode == 0, built.stderr
    installed = tmp_path / "out" / DEMO_PLAN.relative_to(ROOT)
    assert installed.read_bytes() == (ROOT / "migrations" / "users.yaml").read_bytes()
    assert (tmp_path / "out" / DEMO_RULES.relative_to(ROOT)).is_file()


def test_the_demo_leaves_no_state_directory_behind(tmp_path: Path):
    offset = free_offset()
    env = {k: v for k, v in os.environ.items() if k != "STRANGLER_ADMIN_TOKEN"}
    env["TMPDIR"] = str(tmp_path)
    process = subprocess.Popen(
        [*COMMAND, "demo", "--port-offset", str(offset)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + PHASE_LIMIT
        while not list(tmp_path.glob("strangler-demo-*")):
            assert process.poll() is None, (
                process.stderr.read() if process.stderr else ""
            )
            assert time.monotonic() < deadline, "the demo made no state directory"
            time.sleep(0.05)
        state = next(tmp_path.glob("strangler-demo-*"))
        _wait_for_admin(f"http://127.0.0.1:{8081 + offset}", process)
        shifted = run_cli(
            "shift",
            "users-v1",
            "users=30",
            "--admin",
            f"http://127.0.0.1:{8081 + offset}",
            env={"STRANGLER_ADMIN_TOKEN": TOKEN},
        )
        assert shifted.returncode == 0, shifted.stderr
        assert (state / "demo.state.json").is_file()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        code = process.wait(20)
        if process.stderr is not None:
            process.stderr.close()

    assert code == 0
    assert list(tmp_path.glob("strangler-demo-*")) == []


def _wait_for_admin(admin: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + PHASE_LIMIT
    request = urllib.request.Request(
        f"{admin}/routes", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail("the demo's admin API never answered")
