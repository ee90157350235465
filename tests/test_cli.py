"""The command line as a user runs it: real subprocesses, real rule files."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cli_support import COMMAND, ServeProcess, run_cli
from support import write_rules

GOOD = """
listen: 127.0.0.1:0
upstreams:
  monolith:
    targets: [http://127.0.0.1:9001]
  users:
    targets: [http://127.0.0.1:9101]
default: monolith
routes:
  - name: users-v1
    match: {path: /api/v1/users, methods: [GET, POST]}
    split:
      - {to: monolith, weight: 75}
      - to: users
        weight: 25
        rewrite: {prefix: /api/v1/users, to: /api/v2/users}
    sticky: {by: header, name: X-User-Id}
"""

BAD = """
listen: 127.0.0.1:0
upstreams:
  monolith:
    targets: [ftp://127.0.0.1:9001]
default: monolith
routes:
  - name: one
    match: {path: /a}
    split:
      - {to: monolith, weight: 60}
      - {to: nowhere, weight: 30}
  - name: one
    match: {path: /b, colour: blue}
    to: monolith
"""


def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, GOOD)

    result = run_cli("check", str(rules))

    assert result.returncode == 0
    assert "ok" in result.stdout


def test_check_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, BAD)

    result = run_cli("check", str(rules))

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert any(
        line.startswith(f"{rules}:5: upstreams.monolith.targets[0]") for line in lines
    )
    assert any(f"{rules}:12: routes[0].split[1].to" in line for line in lines)
    assert any(
        f"{rules}:10: routes[0].split" in line and "sum to 100" in line
        for line in lines
    )
    assert any(f"{rules}:13: routes[1].name" in line for line in lines)
    assert any(f"{rules}:14: routes[1].match.colour" in line for line in lines)


def test_check_names_an_unset_variable(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path, GOOD + "admin: {listen: 127.0.0.1:0, token: ${NOT_SET_ANYWHERE}}\n"
    )

    result = run_cli("check", str(rules))

    assert result.returncode == 1
    assert "NOT_SET_ANYWHERE" in result.stderr
    assert "admin.token" in result.stderr


def test_serve_refuses_a_bad_file_with_the_same_messages(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, BAD)

    served = run_cli("serve", str(rules), timeout=20)
    checked = run_cli("check", str(rules))

    assert served.returncode != 0
    assert served.stderr == checked.stderr


def test_explain_shows_route_split_sticky_pick_and_rewrite(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, GOOD)
    picks = {}
    for user in ("1", "2", "3", "4", "5", "6", "7", "8"):
        result = run_cli(
            "explain",
            str(rules),
            "GET",
            "/api/v1/users/42",
            "-H",
            f"X-User-Id: {user}",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        picks[user] = json.loads(result.stdout)

    text = run_cli(
        "explain", str(rules), "GET", "/api/v1/users/42", "-H", "X-User-Id: 7"
    )

    assert {p["route"] for p in picks.values()} == {"users-v1"}
    assert {p["upstream"] for p in picks.values()} == {"monolith", "users"}
    for pick in picks.values():
        expected = (
            "/api/v2/users/42" if pick["upstream"] == "users" else "/api/v1/users/42"
        )
        assert pick["rewritten_path"] == expected
        assert pick["shares"] == {"monolith": 75, "users": 25}
    assert "route:      users-v1" in text.stdout
    assert "sticky:     header X-User-Id = 7" in text.stdout
    assert f"upstream:   {picks['7']['upstream']}" in text.stdout


def test_explain_sends_unmatched_requests_to_default(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, GOOD)

    result = run_cli("explain", str(rules), "DELETE", "/api/v1/users/42", "--json")

    explained = json.loads(result.stdout)
    assert explained["upstream"] == "monolith"
    assert explained["route"].startswith("default")


def test_explain_routes_on_the_path_the_proxy_routes_on(tmp_path: Path) -> None:
    """Escapes, dot segments and ;params are read as the proxy reads them."""
    rules = write_rules(tmp_path, GOOD)

    tricky = run_cli(
        "explain", str(rules), "GET", "/api/v0/../v1/%75sers;x/42", "--json"
    )
    refused = run_cli("explain", str(rules), "GET", "/api/../../etc/passwd")

    explained = json.loads(tricky.stdout)
    assert explained["route"] == "users-v1"
    assert explained["routed_path"] == "/api/v1/users/42"
    assert refused.returncode == 1
    assert "400" in refused.stderr and "Traceback" not in refused.stderr


def _backend_server(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A separate real HTTP server process standing in for the monolith."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from the monolith\n")
    process = subprocess.Popen(
        [
            "python3",
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "-d",
            str(tmp_path / "www"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, port


def test_serve_proxies_to_default_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    backend, port = _backend_server(tmp_path)
    rules = write_rules(
        tmp_path,
        f"""
        listen: 127.0.0.1:0
        access_log: {{path: {tmp_path / "access.log"}}}
        upstreams:
          monolith:
            targets: [http://127.0.0.1:{port}]
        default: monolith
        """,
    )
    gateway = ServeProcess(rules)
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{gateway.port}/hello.txt", timeout=10
        ) as reply:
            body = reply.read()
            request_id = reply.headers["X-Request-Id"]
    finally:
        code = gateway.stop()
        backend.terminate()
        backend.wait(5)

    assert body == b"hello from the monolith\n"
    assert code == 0
    logged = [
        json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()
    ]
    assert [line["request_id"] for line in logged] == [request_id]
    assert logged[0]["status"] == 200


def test_demo_runs_answers_through_the_gateway_and_stops_on_ctrl_c() -> None:
    offset = 10000 + (
        int(time.time() * 1000) % 9000
    )  # every demo port stays below the ephemeral range
    process = subprocess.Popen(
        [*COMMAND, "demo", "--port-offset", str(offset)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    gateway = f"http://127.0.0.1:{8080 + offset}"
    try:
        served = _wait_for_url(gateway + "/api/v1/orders", process)
        with urllib.request.urlopen(gateway + "/api/v2/users/3", timeout=10) as reply:
            users = json.loads(reply.read())
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)

    assert served.startswith("monolith-")
    assert users["id"] == 3
    assert "strangler demo is running" in out
    assert gateway in out
    assert process.returncode == 0, err


def _wait_for_url(url: str, process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"demo exited early: {process.stderr.read() if process.stderr else ''}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.headers["X-Served-By"]
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{url} never answered")


def test_transform_shows_what_a_payload_becomes(tmp_path: Path) -> None:
    import subprocess as sp

    from strangler.demo import DEMO_RULES

    request = sp.run(
        [*COMMAND, "transform", str(DEMO_RULES), "users-v1", "--upstream", "users"],
        input=b"<user><name>Ann</name><email>ann@example.test</email></user>",
        capture_output=True,
        timeout=30,
        check=False,
    )
    response = sp.run(
        [*COMMAND, "transform", str(DEMO_RULES), "users-v1", "--response"],
        input=b'{"id": 3, "name": {"full": "Ann"}, "email": "a@x", "active": true}',
        capture_output=True,
        timeout=30,
        check=False,
    )
    broken = sp.run(
        [*COMMAND, "transform", str(DEMO_RULES), "users-v1"],
        input=b"<user>",
        capture_output=True,
        timeout=30,
        check=False,
    )

    assert json.loads(request.stdout) == {
        "name": {"full": "Ann"},
        "email": "ann@example.test",
    }
    assert response.stdout.startswith(b"<?xml")
    assert (
        b'<user id="3">' in response.stdout and b"<name>Ann</name>" in response.stdout
    )
    assert broken.returncode == 1
    assert b"malformed XML" in broken.stderr
