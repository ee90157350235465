"""Graceful drain and supervised workers, with `strangler serve` as a subprocess."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest_twisted
from cli_support import ServeProcess
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
