"""Graceful drain and supervised workers, with `strangler serve` as a subprocess."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cli_support import EventTail, ServeProcess, run_cli
from support import sleep, write_rules
from twisted.internet import defer, protocol, reactor, threads

from strangler.workers import RestartBackoff, Supervisor

ensure = pytest_twisted.ensureDeferred
# Workers start in a second or two; a machine busy with other work can take
# far longer, and these waits only bound a failing test, they time nothing.
STARTUP_WAIT = 90


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
        # Longer than the file watcher's 1 s poll: proving it does not run
        # needs the time it would have taken (there is no event to wait on).
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


class _Process:
    """A worker process as the supervisor sees it: alive until told to exit."""

    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


class _FakeSupervisor(Supervisor):
    """The real supervision logic over fake processes and a fake clock."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(Path("rules.yaml"), None, 2, None, clock=lambda: self.now)  # type: ignore[arg-type]
        self.starts: list[tuple[int, float]] = []

    def start_worker(self, index: int) -> None:
        self.workers[index] = _Process()  # type: ignore[assignment]
        self.started_at[index] = self.now
        self.starts.append((index, self.now))

    def crash(self, index: int) -> None:
        self.workers[index].code = 1  # type: ignore[attr-defined]

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.tick()
            self.now = round(self.now + 0.1, 1)


def test_a_worker_that_keeps_dying_is_restarted_later_each_time() -> None:
    supervisor = _FakeSupervisor()
    for index in range(2):
        supervisor.start_worker(index)

    pauses = []
    for _ in range(6):
        supervisor.crash(0)
        before = len(supervisor.starts)
        died_at = supervisor.now
        while len(supervisor.starts) == before:
            supervisor.run_for(0.1)
        pauses.append(round(supervisor.starts[-1][1] - died_at, 1))
    supervisor.run_for(12)  # a worker that ran long enough starts the count again
    supervisor.crash(0)
    died_at = supervisor.now
    supervisor.run_for(1)

    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert supervisor.starts[-1][1] - died_at == 0.5
    assert [index for index, _ in supervisor.starts].count(1) == 1


def test_restart_pause_is_capped() -> None:
    backoff = RestartBackoff(first=1.0, limit=5.0, stable_after=10.0)

    pauses = [backoff.after_exit(0.5) for _ in range(6)]

    assert pauses == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff.after_exit(10.0) == 1.0


async def _until(predicate: Any, limit: float = 30.0) -> None:
    """Wait for something the test needs to have happened (bounded)."""
    for _ in range(int(limit / 0.02)):
        if predicate():
            return
        await sleep(0.02)
    raise AssertionError("the condition was never reached")


def _outcome(url: str) -> tuple[int, bytes] | str:
    """The answer, or the name of the error that ended the request."""
    try:
        return _fetch(url)
    except OSError as exc:  # urllib's errors and http.client's disconnects
        return type(exc).__name__


def _read_until(stream, wanted: str, count: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Log events read from `stream` until `count` of them are `wanted` (or EOF)."""
    events: list[dict[str, Any]] = []
    while sum(1 for e in events if e.get("event") == wanted) < count:
        line = stream.readline()
        if not line:
            break
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


@ensure
async def test_sigterm_to_the_supervisor_drains_every_worker_up_to_drain_timeout(
    tmp_path, backends
):
    backend = backends("monolith")
    rules = _rules(tmp_path, backend.url, "drain_timeout: 2s")
    gateway = ServeProcess(rules, args=("--workers", "2"))
    base = f"http://127.0.0.1:{gateway.port}"
    try:
        # The supervisor says it listens before its workers have started.
        ready = threads.deferToThread(
            _read_until, gateway.process.stdout, "listening", 2
        )
        await ready.addTimeout(STARTUP_WAIT, reactor)
        finishing = [
            threads.deferToThread(_outcome, f"{base}/slow?ms=1000&n={n}")
            for n in range(6)
        ]
        hanging = [
            threads.deferToThread(_outcome, f"{base}/hang?n={n}") for n in range(2)
        ]
        await _until(lambda: len(backend.requests) == 8)
        gateway.signal(signal.SIGTERM)
        done = [await request for request in finishing]
        cut = [await request for request in hanging]
        code = await threads.deferToThread(gateway.process.wait, 20)
    finally:
        gateway.stop()

    assert [reply[0] for reply in done] == [200] * 6  # type: ignore[index]
    assert all(isinstance(reply, str) for reply in cut), cut
    assert len([r for r in backend.requests if r["uri"].startswith("/slow")]) == 6
    assert code == 0


@ensure
async def test_sighup_to_the_supervisor_reloads_every_worker(tmp_path, backends):
    first, second = backends("first"), backends("second")
    rules = _rules(tmp_path, first.url)
    gateway = ServeProcess(rules, args=("--workers", "2", "--no-watch"))
    base = f"http://127.0.0.1:{gateway.port}"
    try:
        ready = threads.deferToThread(
            _read_until, gateway.process.stdout, "listening", 2
        )
        await ready.addTimeout(STARTUP_WAIT, reactor)
        rules.write_text(rules.read_text().replace(first.url, second.url))
        reading = threads.deferToThread(
            _read_until, gateway.process.stdout, "reloaded", 2
        )
        reading.addTimeout(STARTUP_WAIT, reactor)
        gateway.signal(signal.SIGHUP)
        events = await reading
        after = [
            json.loads((await threads.deferToThread(_fetch, f"{base}/n/{n}"))[1])
            for n in range(10)
        ]
    finally:
        code = gateway.stop()

    assert sum(1 for e in events if e.get("event") == "reloaded") == 2
    assert {reply["served_by"] for reply in after} == {"second"}
    assert code == 0


class _SlowReader(protocol.Protocol):
    """Reads a response in bursts with pauses, so the gateway's buffer stays full."""

    def __init__(self, done: defer.Deferred[int]) -> None:
        self.done = done
        self.received = 0

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET /download?bytes=33554432 HTTP/1.1\r\nHost: a\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        before = self.received
        self.received += len(data)
        if before // 1048576 != self.received // 1048576:
            self.transport.pauseProducing()
            reactor.callLater(0.05, self.transport.resumeProducing)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.received)


@ensure
async def test_sigterm_lets_a_long_download_in_flight_finish_whole(tmp_path, backends):
    backend = backends("monolith")
    gateway = ServeProcess(_rules(tmp_path, backend.url, "drain_timeout: 20s"))
    done: defer.Deferred[int] = defer.Deferred()
    try:
        protocol.ClientCreator(reactor, _SlowReader, done).connectTCP(
            "127.0.0.1", gateway.port
        )
        await _until(lambda: bool(backend.requests))
        gateway.signal(signal.SIGTERM)
        received = await done.addTimeout(30, reactor)
        code = await threads.deferToThread(gateway.process.wait, 20)
    finally:
        gateway.stop()

    head = 200  # the response head is small; the body is all that matters here
    assert received > 33554432
    assert received < 33554432 + head * 10
    assert code == 0


def _keep_asking(port: int, stop_at: float, outcomes: list[Any]) -> None:
    """One keep-alive client asking until the gateway stops taking connections.

    Each outcome is a status with the body length, or the name of the error
    that ended the client. Bounded by `stop_at` whatever happens.
    """
    import http.client
    import time

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        while time.monotonic() < stop_at:
            try:
                conn.request("GET", "/slow?ms=200")
                reply = conn.getresponse()
                outcomes.append((reply.status, len(reply.read())))
            except (OSError, http.client.HTTPException) as exc:
                outcomes.append(type(exc).__name__)
                return
    finally:
        conn.close()


@ensure
async def test_a_drain_under_load_finishes_every_request_it_took(tmp_path, backends):
    """SIGTERM during steady load: every request the gateway began is answered whole.

    Clients that try to start a request after the listener closed are
    refused (or find their idle keep-alive connection closed); none of
    those reached the gateway, which the access log shows.
    """
    import time

    backend = backends("monolith")
    gateway = ServeProcess(_rules(tmp_path, backend.url, "drain_timeout: 10s"))
    outcomes: list[Any] = []
    stop_at = time.monotonic() + 30
    clients = [
        threads.deferToThread(_keep_asking, gateway.port, stop_at, outcomes)
        for _ in range(8)
    ]
    try:
        await _until(lambda: len(outcomes) >= 16)
        answered_before = len(outcomes)
        gateway.signal(signal.SIGTERM)
        for client in clients:
            await client
        code = await threads.deferToThread(gateway.process.wait, 30)
    finally:
        gateway.stop()

    answers = [o for o in outcomes if isinstance(o, tuple)]
    endings = [o for o in outcomes if isinstance(o, str)]
    logged = [
        json.loads(line)
        for line in (tmp_path / "access.log").read_text().splitlines()
        if '"event":"request"' in line
    ]

    assert answered_before > 0 and len(answers) > answered_before
    assert {status for status, _ in answers} == {200}
    # http.client raises IncompleteRead for a cut body, which would end a client.
    assert len(endings) == 8
    assert set(endings) <= {
        "ConnectionRefusedError",
        "RemoteDisconnected",
        "ConnectionResetError",
    }
    assert len(logged) == len(answers)
    assert {entry["status"] for entry in logged} == {200}
    assert code == 0
