"""`strangler status` and `strangler shift` as a user runs them.

The gateway is `strangler serve` of a real rule file in a subprocess, with
its admin API on a free loopback port; each command is another subprocess.
Backends, where traffic must really flow, are echo servers in this process.
"""

from __future__ import annotations

import json
import signal
import socket
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cli_support import ServeProcess, run_cli
from load import get, run_load
from ramp_support import RAMP, RAMP_KEYS, check_ramp_step, sticky_request
from support import sleep
from twisted.internet import reactor, threads

from strangler.admin.client import (
    AdminCallError,
    AdminClient,
    UsageError,
    format_status,
    parse_assignments,
)

ensure = pytest_twisted.ensureDeferred

TOKEN = "cli-secret"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rules_text(admin_port: int, mono: str, users: str) -> str:
    return textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        access_log: false
        admin: {{listen: 127.0.0.1:{admin_port}, token: {TOKEN}}}
        upstreams:
          monolith:
            targets: [{mono}]
          users:
            balance: least_conn
            targets: [{{url: {users}, weight: 3}}]
        default: monolith
        routes:
          - name: users-v1
            match: {{path: /api/v1/users}}
            split:
              - {{to: monolith, weight: 90}}
              - {{to: users, weight: 10}}
            sticky: {{by: header, name: X-User-Id}}
        """
    )


class Served:
    """A running `strangler serve` and how to reach its two listeners."""

    def __init__(self, process: ServeProcess, admin_port: int, rules: Path) -> None:
        self.process = process
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.url = f"http://127.0.0.1:{process.port}"
        self.rules = rules

    def cli(self, *args: str, token: str | None = TOKEN) -> Any:
        """Run `strangler ARGS` against this gateway's admin API."""
        env = {"STRANGLER_ADMIN_URL": self.admin, "STRANGLER_ADMIN_TOKEN": token or ""}
        return run_cli(*args, env=env)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str, str], Served]]:
    """Start `strangler serve` with given monolith and users URLs; stopped after."""
    started: list[ServeProcess] = []

    def start(mono: str, users: str) -> Served:
        admin_port = free_port()
        rules = tmp_path / "rules.yaml"
        rules.write_text(rules_text(admin_port, mono, users))
        process = ServeProcess(rules)
        started.append(process)
        return Served(process, admin_port, rules)

    yield start
    for process in started:
        process.stop()


UNUSED = "http://127.0.0.1:9"


def test_status_prints_routes_targets_and_last_reload(serve):
    served = serve(UNUSED, "http://127.0.0.1:10")

    result = served.cli("status")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("ROUTES\n")
    lines = out.splitlines()
    (route,) = [line for line in lines if line.startswith("users-v1 ")]
    assert "monolith 90% | users 10%" in route
    assert "rule file" in route
    assert "header X-User-Id" in route
    (default,) = [line for line in lines if line.startswith("default ")]
    assert "monolith 100%" in default
    (target,) = [line for line in lines if "http://127.0.0.1:10" in line]
    assert target.split() == [
        "users",
        "least_conn",
        "http://127.0.0.1:10",
        "3",
        "up",
        "0",
    ]
    reload = lines[lines.index("LAST RELOAD") + 1]
    assert reload.startswith("ok at ")
    assert str(served.rules) in reload


def test_shift_changes_weights_and_status_shows_them_as_runtime(serve):
    served = serve(UNUSED, UNUSED)

    shifted = served.cli("shift", "users-v1", "users=25")
    status = served.cli("status", "--admin", served.admin)
    as_json = served.cli("status", "--json")

    assert shifted.returncode == 0, shifted.stderr
    assert shifted.stdout.startswith(
        "users-v1: monolith 75% | users 25% (runtime, set by admin at "
    )
    (route,) = [
        line for line in status.stdout.splitlines() if line.startswith("users-v1 ")
    ]
    assert "monolith 75% | users 25%" in route
    assert "runtime, set by admin" in route
    routes = json.loads(as_json.stdout)["routes"]
    assert routes[0]["source"] == "runtime"
    assert {e["upstream"]: e["weight"] for e in routes[0]["split"]} == {
        "monolith": 75,
        "users": 25,
    }
    saved = json.loads((served.rules.parent / "rules.state.json").read_text())
    assert saved["weights"]["users-v1"]["weights"] == {"monolith": 75, "users": 25}


@ensure
async def test_shift_through_the_cli_moves_real_traffic(backends, serve, client):
    mono, users = backends("monolith"), backends("users")
    served = serve(mono.url, users.url)

    async def answered_by() -> set[str]:
        seen = set()
        for user in range(20):
            response = await client.get(
                served.url + "/api/v1/users", headers={"X-User-Id": [f"u{user}"]}
            )
            seen.add(json.loads(await response.content())["served_by"])
        return seen

    assert served.cli("shift", "users-v1", "users=100").returncode == 0
    assert await answered_by() == {"users"}
    assert served.cli("shift", "users-v1", "monolith=100").returncode == 0
    assert await answered_by() == {"monolith"}


@ensure
async def test_ramp_through_strangler_shift_under_load_then_sighup(tmp_path, backends):
    """The ramp of the done-when, through `strangler shift` against `serve`.

    Load runs throughout; after the 100% shift the rule file is edited to
    100% too and the gateway told with SIGHUP (`--no-watch`, so nothing else
    reloads it): the rule file wins, and nobody moves.
    """
    mono, users = backends("monolith"), backends("users")
    admin_port = free_port()
    text = rules_text(admin_port, mono.url, users.url).replace(
        "access_log: false", "access_log: false\nexpose_decision: true"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        text.replace(
            "{to: monolith, weight: 90}", "{to: monolith, weight: 100}"
        ).replace("{to: users, weight: 10}", "{to: users, weight: 0}")
    )
    served = Served(ServeProcess(rules, args=("--no-watch",)), admin_port, rules)
    port = served.process.port
    keys = RAMP_KEYS[:600]
    history: dict[str, set[str]] = {}
    ramp_done = False
    background = run_load(
        port,
        lambda i: get(f"/api/v1/users/{i}", {"X-User-Id": f"bg{i % 89}"}),
        1_000_000,
        workers=4,
        until=lambda: ramp_done,
    )
    try:
        for weight in RAMP[1:]:
            shifted = await threads.deferToThread(
                served.cli, "shift", "users-v1", f"users={weight}"
            )
            assert shifted.returncode == 0, shifted.stderr
            step = await run_load(port, sticky_request(keys), len(keys) * 2, workers=8)
            assert step.failures == []
            check_ramp_step(step.replies, keys, weight, history)

        rules.write_text(
            text.replace(
                "{to: monolith, weight: 90}", "{to: monolith, weight: 0}"
            ).replace("{to: users, weight: 10}", "{to: users, weight: 100}")
        )
        served.process.signal(signal.SIGHUP)
        source = None
        for _ in range(50):
            status = await threads.deferToThread(served.cli, "status", "--json")
            source = json.loads(status.stdout)["routes"][0]["source"]
            if source == "rules":
                break
            await sleep(0.1)
        after = await run_load(port, sticky_request(keys), len(keys) * 2, workers=8)
        ramp_done = True
        steady = await background
    finally:
        ramp_done = True
        code = served.process.stop()

    assert source == "rules"
    assert after.failures == []
    check_ramp_step(after.replies, keys, 100, history)
    assert history["moved"] == set(keys)
    assert steady.failures == []
    assert len(steady.replies) > 100
    assert {r.status for r in steady.replies} == {200}
    assert code == 0


def test_wrong_or_missing_token_exits_1_with_one_line(serve):
    served = serve(UNUSED, UNUSED)

    wrong = served.cli("shift", "users-v1", "users=25", token="nope")
    missing = served.cli("status", token=None)

    assert wrong.returncode == 1
    assert wrong.stdout == ""
    assert wrong.stderr.count("\n") == 1
    assert "401" in wrong.stderr
    assert "STRANGLER_ADMIN_TOKEN does not match" in wrong.stderr
    assert missing.returncode == 1
    assert "set STRANGLER_ADMIN_TOKEN" in missing.stderr
    unchanged = served.cli("status")
    assert "monolith 90% | users 10%" in unchanged.stdout


def test_weights_the_gateway_refuses_exit_1_with_its_message(serve):
    served = serve(UNUSED, UNUSED)

    too_much = served.cli("shift", "users-v1", "users=150")
    unknown = served.cli("shift", "users-v1", "orders=10")
    no_route = served.cli("shift", "nope", "users=10")

    assert too_much.returncode == 1
    assert "weight for 'users' must be 0..100" in too_much.stderr
    assert unknown.returncode == 1
    assert "does not split to 'orders'" in unknown.stderr
    assert no_route.returncode == 1
    assert "no route named 'nope'" in no_route.stderr


def test_unreachable_admin_api_exits_1():
    port = free_port()

    result = run_cli("status", "--admin", f"http://127.0.0.1:{port}")

    assert result.returncode == 1
    assert result.stderr == (
        f"strangler status: cannot reach the admin API at http://127.0.0.1:{port}: "
        "connection refused (is the gateway running, with an admin section in its "
        "rules?)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("shift", "users-v1", "users"), "expected UPSTREAM=PERCENT"),
        (("shift", "users-v1", "users=lots"), "is not a percentage"),
        (("shift", "users-v1", "users=1", "users=2"), "given twice"),
        (("status", "--admin", "127.0.0.1:8081"), "expected the admin API's base URL"),
    ],
)
def test_command_line_that_makes_no_sense_exits_2(args, message):
    result = run_cli(
        *args, env={"STRANGLER_ADMIN_URL": f"http://127.0.0.1:{free_port()}"}
    )

    assert result.returncode == 2
    assert message in result.stderr


# The pieces the commands are built from, in process.


def test_assignments_parse_to_numbers():
    assert parse_assignments(["users=25", "monolith=74.5%", " new = 0.5 "]) == {
        "users": 25,
        "monolith": 74.5,
        "new": 0.5,
    }
    with pytest.raises(UsageError, match="'=5'"):
        parse_assignments(["=5"])
    with pytest.raises(UsageError, match="not a percentage"):
        parse_assignments(["users=nan"])


def test_status_table_names_refused_reloads_and_down_targets():
    routes = [
        {
            "name": "r",
            "split": [{"upstream": "a", "weight": 100, "traffic": {"requests": 4}}],
            "source": "rules",
            "sticky": None,
            "match": None,
        }
    ]
    upstreams = [
        {
            "name": "a",
            "balance": "random",
            "targets": [
                {"url": "http://h:1", "weight": 1, "active": 2, "available": False}
            ],
        }
    ]
    reload = {
        "ok": False,
        "at": "2025-01-01T00:00:00.000Z",
        "source": "rules.yaml",
        "errors": ["rules.yaml:3: default: no upstream named 'x'\x1b[2J"],
    }

    text = format_status(routes, upstreams, reload)

    (target,) = [line for line in text.splitlines() if "http://h:1" in line]
    assert target.split() == ["a", "random", "http://h:1", "1", "DOWN", "2"]
    assert "REFUSED at 2025-01-01T00:00:00.000Z (rules.yaml)" in text
    assert "  rules.yaml:3: default: no upstream named 'x'?[2J" in text
    assert "\x1b" not in text


@ensure
async def test_client_reports_a_refused_token_as_one_line(backends, gateway):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(rules_text(0, mono.url, users.url))
    gw.server.start_admin()
    url = f"http://127.0.0.1:{gw.server.admin_port.getHost().port}"

    good = await AdminClient(url, TOKEN, reactor).get("/reload")
    with pytest.raises(AdminCallError, match=r"refused the token \(401\)"):
        await AdminClient(url, "wrong", reactor).get("/reload")

    assert good["ok"] is True
