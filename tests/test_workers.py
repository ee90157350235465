"""Graceful drain and supervised workers, with `strangler serve` as a subprocess."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from cli_support import EventTail, ServeProcess, run_cli
from support import sleep, write_rules
from twisted.internet import threads

ensure = pytest_twisted.ensureDeferred


def _rules(tmp_path: Path, backend_url: str, extra: str = "") -> Path:
    return write_rules(
        tmp_path,
        f"""
        listen: 127.0.0.1:0
        access_log: {{path: {tmp_path / "access.log"}}}
        {extra}
        upstreams:
          monolith:
            targets: [{backend_url}]
        default: monolith
        """,
    )


def _fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=20) as reply:
        return reply.status, reply.read()


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@ensure
async def test_sigterm_drains_requests_in_flight_then_exits_zero(tmp_path, backends):
    backend = backends("monolith")
    gateway = ServeProcess(_rules(tmp_path, backend.url, "drain_timeout: 10s"))
    base = f"http://127.0.0.1:{gateway.port}"
    try:
        in_flight = [
            threads.deferToThread(_fetch, f"{base}/slow?ms=1500&n={n}")
            for n in range(5)
        ]
        await sleep(0.5)
        gateway.signal(signal.SIGTERM)
        replies = [await request for request in in_flight]
        code = await threads.deferToThread(gateway.process.wait, 20)
    finally:
        gateway.stop()

    assert [status for status, _ in replies] == [200] * 5
    assert all(json.loads(body)["served_by"] == "monolith" for _, body in replies)
    assert code == 0


@ensure
async def test_workers_share_the_port_and_a_dead_worker_is_replaced(tmp_path, backends):
    backend = backends("monolith")
    gateway = ServeProcess(_rules(tmp_path, backend.url), args=("--workers", "2"))
    base = f"http://127.0.0.1:{gateway.port}"
    try:
        first = await threads.deferToThread(_fetch, f"{base}/before")
        workers = _children(gateway.pid)
        assert len(workers) == 2
        import os

        os.kill(workers[0], signal.SIGKILL)
        replaced: list[int] = []
        for _ in range(100):
            replaced = _children(gateway.pid)
            if len(replaced) == 2 and workers[0] not in replaced:
                break
            await sleep(0.1)
        results = [
            await threads.deferToThread(_fetch, f"{base}/after/{n}") for n in range(20)
        ]
    finally:
        code = gateway.stop()

    assert first[0] == 200
    assert len(replaced) == 2 and workers[0] not in replaced
    assert [status for status, _ in results] == [200] * 20
    assert code == 0


@ensure
async def test_sighup_reloads_the_rule_file(tmp_path, backends):
    first, second = backends("first"), backends("second")
    rules = _rules(tmp_path, first.url)
    gateway = ServeProcess(rules, args=("--no-watch",))
    base = f"http://127.0.0.1:{gateway.port}"
    try:
        rules.write_text(rules.read_text().replace(first.url, second.url))
        await sleep(1.5)
        before = json.loads((await threads.deferToThread(_fetch, f"{base}/a"))[1])
        gateway.signal(signal.SIGHUP)
        after = None
        for _ in range(50):
            after = json.loads((await threads.deferToThread(_fetch, f"{base}/b"))[1])
            if after["served_by"] == "second":
                break
            await sleep(0.05)
    finally:
        code = gateway.stop()

    assert before["served_by"] == "first"
    assert after is not None and after["served_by"] == "second"
    assert code == 0


def _split_rules(tmp_path: Path, mono: str, users: str, admin_port: int = 0) -> Path:
    """A route split 100/0 between two upstreams, and an admin API when asked."""
    admin = (
        f"admin: {{listen: 127.0.0.1:{admin_port}, token: {TOKEN}}}"
        if admin_port
        else ""
    )
    return write_rules(
        tmp_path,
        f"""
        listen: 127.0.0.1:0
        access_log: false
        {admin}
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
              - {{to: users, weight: 0}}
        """,
    )


TOKEN = "workers-secret"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _served_by(base: str, count: int) -> list[str]:
    """Which backend answered each of `count` requests, each on a new connection."""
    seen = []
    for n in range(count):
        _, body = await threads.deferToThread(_fetch, f"{base}/api/v1/users/{n}")
        seen.append(json.loads(body)["served_by"])
    return seen


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ({"monolith": 20, "users": 100}, "weights must sum to 100, got 120"),
        ({"monolith": 50, "ghost": 50}, "its weights name ['ghost', 'monolith']"),
        ({"monolith": 99.995, "users": 0.005}, "in steps of 0.01, got 99.995"),
    ],
)
@ensure
async def test_corrupt_state_file_is_ignored_with_a_warning(
    tmp_path, backends, weights, reason
):
    mono, users = backends("monolith"), backends("users")
    rules = _split_rules(tmp_path, mono.url, users.url)
    saved = {"weights": weights, "base": {"monolith": 100, "users": 0}, "set_at": 1}
    state = tmp_path / "rules.state.json"
    state.write_text(json.dumps({"weights": {"users-v1": saved}}))

    gateway = ServeProcess(rules)
    try:
        served = await _served_by(f"http://127.0.0.1:{gateway.port}", 20)
    finally:
        code = gateway.stop()

    (ignored,) = [e for e in gateway.events if e["event"] == "state_file_entry_ignored"]
    assert (ignored["level"], ignored["route"], ignored["path"]) == (
        "warning",
        "users-v1",
        str(state),
    )
    assert reason in ignored["reason"]
    assert served == ["monolith"] * 20
    assert code == 0


@ensure
async def test_every_worker_follows_a_shift_without_rule_file_watching(
    tmp_path, backends
):
    """`--workers 2 --no-watch`: worker 1 still picks up what worker 0's admin set."""
    mono, users = backends("monolith"), backends("users")
    admin_port = _free_port()
    rules = _split_rules(tmp_path, mono.url, users.url, admin_port)
    env = {
        "STRANGLER_ADMIN_URL": f"http://127.0.0.1:{admin_port}",
        "STRANGLER_ADMIN_TOKEN": TOKEN,
    }
    gateway = ServeProcess(rules, args=("--workers", "2", "--no-watch"))
    tail = EventTail(gateway)
    try:
        shifted = None
        for _ in range(50):  # worker 0's admin API comes up after the supervisor
            shifted = await threads.deferToThread(
                run_cli, "shift", "users-v1", "users=100", env=env
            )
            if shifted.returncode == 0:
                break
            await sleep(0.2)
        for _ in range(100):
            if tail.named("runtime_weights_followed"):
                break
            await sleep(0.1)
        served = await _served_by(f"http://127.0.0.1:{gateway.port}", 40)
    finally:
        code = gateway.stop()

    assert shifted is not None and shifted.returncode == 0, shifted.stderr
    assert len(tail.named("runtime_weights_followed")) == 1
    assert served == ["users"] * 40
    assert code == 0
