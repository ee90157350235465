"""`strangler diffs` against a real `strangler serve`, as an operator uses it."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest_twisted
from cli_support import ServeProcess, run_cli
from shadow_support import Service, json_reply, wait_until
from support import write_rules
from twisted.internet import reactor, threads

from strangler.demo.backends import DemoPorts, start_demo_backends

TOKEN = "diffs-token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as reply:
        reply.read()
        return reply.status


def _report(admin: str) -> dict:
    result = run_cli(
        "diffs",
        "users-v1",
        "--json",
        "--admin",
        admin,
        env={"STRANGLER_ADMIN_TOKEN": TOKEN},
    )
    return json.loads(result.stdout) if result.returncode == 0 else {}


@pytest_twisted.ensureDeferred
async def test_diffs_reports_the_field_the_new_service_gets_wrong(tmp_path: Path):
    old = Service(
        lambda seen: json_reply({"id": 7, "email": "a@example.test", "at": seen["uri"]})
    )
    new = Service(
        lambda seen: json_reply({"id": 7, "email": "A@EXAMPLE.TEST", "at": seen["uri"]})
    )
    admin_port = _free_port()
    rules = write_rules(
        tmp_path,
        f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:{admin_port}, token: {TOKEN}}}
        access_log: {{path: {tmp_path / "access.log"}}}
        upstreams:
          monolith: {{targets: [{old.url}]}}
          users: {{targets: [{new.url}]}}
        default: monolith
        routes:
          - name: users-v1
            match: {{path: /api/v1/users}}
            to: monolith
            shadow: {{to: users, percent: 100}}
        """,
    )
    gateway = ServeProcess(rules)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        statuses = [
            await threads.deferToThread(
                _fetch, f"http://127.0.0.1:{gateway.port}/api/v1/users/{n}"
            )
            for n in range(20)
        ]
        await wait_until(lambda: len(new.copies()) == 20)
        report: dict = {}

        def compared_all() -> bool:
            report.update(_report(admin))
            return report.get("compared") == 20

        for _ in range(50):
            if await threads.deferToThread(compared_all):
                break
        text = run_cli(
            "diffs", "users-v1", "--admin", admin, env={"STRANGLER_ADMIN_TOKEN": TOKEN}
        )
    finally:
        gateway.stop()
        await old.stop()
        await new.stop()

    assert statuses == [200] * 20
    assert report["compared"] == 20
    assert report["agreed"] == 0
    assert "$.email" in text.stdout
    assert text.returncode == 0


DEMO_SHADOW = Path(__file__).resolve().parent.parent / "rules" / "demo-shadow.yaml"


def _fetch_body(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.read()


@pytest_twisted.ensureDeferred
async def test_the_demo_shadow_rules_find_what_the_new_users_service_gets_wrong(
    tmp_path: Path,
):
    demo = start_demo_backends(reactor, DemoPorts(monolith=(0, 0), users=0))
    admin_port = _free_port()
    text = DEMO_SHADOW.read_text()
    # The shipped file as it is, with only the demo's fixed ports moved.
    moves = {
        "127.0.0.1:8090": "127.0.0.1:0",
        "127.0.0.1:8091": f"127.0.0.1:{admin_port}",
        "http://127.0.0.1:9001": demo.monolith_urls[0],
        "http://127.0.0.1:9002": demo.monolith_urls[1],
        "http://127.0.0.1:9101": demo.users_url,
    }
    for old, new in moves.items():
        assert old in text
        text = text.replace(old, new)
    rules = tmp_path / "demo-shadow.yaml"
    rules.write_text(text + f"access_log: {{path: {tmp_path / 'access.log'}}}\n")
    env = {"STRANGLER_ADMIN_TOKEN": "demo-token"}
    check = run_cli("check", str(rules))
    gateway = ServeProcess(rules, env=env)
    admin = f"http://127.0.0.1:{admin_port}"
    paths = [f"/api/v1/users/{n}" for n in range(1, 6)] + ["/api/v1/users"]
    try:
        through = [
            await threads.deferToThread(
                _fetch_body, f"http://127.0.0.1:{gateway.port}{path}"
            )
            for path in paths * 2
        ]
        direct = [
            await threads.deferToThread(_fetch_body, demo.monolith_urls[0] + path)
            for path in paths
        ]
        report: dict = {}

        def compared_all() -> bool:
            result = run_cli("diffs", "users-v1", "--json", "--admin", admin, env=env)
            report.update(json.loads(result.stdout) if result.returncode == 0 else {})
            return report.get("compared") == 12

        for _ in range(50):
            if await threads.deferToThread(compared_all):
                break
        text_report = run_cli("diffs", "users-v1", "--admin", admin, env=env)
    finally:
        gateway.stop()
        await demo.stop()

    assert check.returncode == 0, check.stderr
    # Clients got exactly the monolith's answers.
    assert through == direct * 2
    assert report["compared"] == 12 and report["agreed"] == 10
    # Every single user agrees once the new service's timestamp is ignored;
    # the list has another shape than the v1 list, and the report says where.
    assert report["ignored"] == 10
    assert {f["field"] for f in report["fields"]} == {"$.users", "$.root"}
    assert {f["example"]["target"] for f in report["fields"]} == {"/api/v1/users"}
    assert text_report.returncode == 0
    lines = text_report.stdout.splitlines()
    assert "agreement: 83.3% (10 of 12 compared pairs agree)" in lines
    assert any(line.split()[:3] == ["2", "body", "$.users"] for line in lines)
    assert "$.user.@generated_at" not in text_report.stdout
