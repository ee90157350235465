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
from twisted.internet import threads

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
