"""The demo's monolith and users service, run for real on 127.0.0.1 port 0.

Most tests start the backends with `start_demo_backends` and talk to them
with treq over real sockets. Timing behaviour (the slow report, the fail
rate) is driven with `Clock` and treq's in-memory `StubTreq` instead.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import pytest_twisted
import yaml
from defusedxml.ElementTree import fromstring as parse_xml
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError, ConnectError, ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IResponse
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel

from strangler.demo import DEMO_RULES, DEMO_USERS
from strangler.demo.backends import DemoBackends, DemoPorts, start_demo_backends
from strangler.demo.monolith import Monolith
from strangler.demo.users_service import UsersService
from strangler.rules import load_rules

ANY_PORTS = DemoPorts(monolith=(0, 0), users=0)


@pytest_twisted.async_yield_fixture()
async def backends() -> AsyncIterator[DemoBackends]:
    running = start_demo_backends(reactor, ANY_PORTS)
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture()
async def http() -> AsyncIterator[HTTPClient]:
    """A treq client whose pooled connections are all closed at the end."""
    pool = HTTPConnectionPool(reactor)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


async def fetch(
    http: HTTPClient, method: str, url: str, **kwargs: Any
) -> tuple[IResponse, bytes]:
    response = await http.request(method, url, **kwargs)
    return response, await response.content()


def header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[-1] if values else None


# -- all backends ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_backend_is_healthy_and_names_itself(
    backends: DemoBackends, http: HTTPClient
) -> None:
    urls = [*backends.monolith_urls, backends.users_url]
    answers = []
    for url in urls:
        response, _ = await fetch(http, "GET", url + "/health")
        answers.append((response.code, header(response, "X-Served-By")))

    assert answers == [(200, "monolith-1"), (200, "monolith-2"), (200, "users-1")]


def test_port_zero_binds_distinct_real_ports(backends: DemoBackends) -> None:
    ports = [*backends.monolith_ports, backends.users_port]
    assert len(ports) == 3
    assert all(port > 0 for port in ports)
    assert len(set(ports)) == 3


@pytest_twisted.ensureDeferred
async def test_stop_closes_listeners_and_open_connections() -> None:
    running = start_demo_backends(reactor, ANY_PORTS)
    connected = await TCP4ClientEndpoint(
        reactor, "127.0.0.1", running.monolith_ports[0]
    ).connect(Factory.forProtocol(_RawClient))
    connected.transport.write(b"GET /health HTTP/1.1\r\nHost: demo\r\n\r\n")
    await connected.answered

    # The connection is kept alive; stop must close it, not wait for it.
    await running.stop().addTimeout(10, reactor)  # guards against a hang only
    await connected.closed

    pool = HTTPConnectionPool(reactor, persistent=False)
    with pytest.raises(ConnectError):
        await HTTPClient(Agent(reactor, pool=pool)).get(running.users_url + "/health")
    await running.stop()  # a second stop is harmless


def test_non_loopback_interface_is_refused() -> None:
    with pytest.raises(ValueError, match=r"loopback.*'0\.0\.0\.0'"):
        start_demo_backends(MemoryReactorClock(), ANY_PORTS, interface="0.0.0.0")


def test_taken_port_closes_the_ports_already_opened() -> None:
    memory = _PortsTaken({9101})
    with pytest.raises(CannotListenError):
        start_demo_backends(memory, DemoPorts())

    assert [port.port for port in memory.opened] == [9001, 9002]
    assert all(port.stopped for port in memory.opened)


@pytest.mark.parametrize(
    ("ports", "complaint"),
    [
        ({"users": 70000}, "users must be a port from 0 to 65535, got 70000"),
        ({"users": "9101"}, "users must be a port number, got '9101'"),
        ({"monolith": ()}, "monolith needs at least one port"),
        ({"monolith": (9001, 9001)}, "each backend needs its own port"),
    ],
)
def test_bad_ports_are_refused_by_name(ports: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        DemoPorts(**ports)


# -- the rule file ---------------------------------------------------------


def test_rule_file_points_at_the_default_backend_ports() -> None:
    memory = MemoryReactorClock()
    start_demo_backends(memory, DemoPorts())
    listening = [f"http://{host}:{port}" for port, _, _, host in memory.tcpServers]

    rules = yaml.safe_load(DEMO_RULES.read_text())
    targets = [
        *rules["upstreams"]["monolith"]["targets"],
        *rules["upstreams"]["users"]["targets"],
    ]
    assert targets == listening


def test_rule_file_loads_with_the_demo_routes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STRANGLER_ADMIN_TOKEN", raising=False)
    rules = load_rules(DEMO_RULES)

    assert rules.admin is not None
    assert rules.admin.token == "demo-token"
    assert rules.default == "monolith"
    assert rules.expose_decision is True
    assert [route.name for route in rules.routes] == ["users-v2", "users-v1"]
    assert [entry.to for entry in rules.routes[0].split] == ["users"]

    users_v1 = rules.routes[1]
    assert [(entry.to, entry.weight) for entry in users_v1.split] == [
        ("monolith", 90),
        ("users", 10),
    ]
    to_users = users_v1.split[1]
    assert to_users.rewrite is not None
    assert to_users.rewrite.apply("/api/v1/users/3") == "/api/v2/users/3"
    assert to_users.transform is not None
    assert (to_users.transform.request, to_users.transform.response) == (
        "xml_to_json",
        "json_to_xml",
    )
    assert users_v1.sticky is not None
    assert (users_v1.sticky.by, users_v1.sticky.name) == ("header", "X-User-Id")


def test_rule_file_token_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STRANGLER_ADMIN_TOKEN", "from-env")
    rules = load_rules(DEMO_RULES)

    assert rules.admin is not None
    assert rules.admin.token == "from-env"


# -- the monolith ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_monolith_home_page_is_html(
    backends: DemoBackends, http: HTTPClient
) -> None:
    response, body = await fetch(http, "GET", backends.monolith_urls[1] + "/")

    assert response.code == 200
    assert header(response, "Content-Type") == "text/html; charset=utf-8"
    assert b"<h1>Legacy Monolith</h1>" in body
    assert b"monolith-2" in body


@pytest_twisted.ensureDeferred
async def test_monolith_lists_the_fixed_users_as_xml(
    backends: DemoBackends, http: HTTPClient
) -> None:
    response, body = await fetch(
        http, "GET", backends.monolith_urls[0] + "/api/v1/users"
    )

    assert response.code == 200
    assert header(response, "Content-Type") == "application/xml"
    root = parse_xml(body)
    assert root.tag == "users"
    listed = [
        (int(user.get("id")), user.findtext("name"), user.findtext("email"))
        for user in root.iter("user")
    ]
    assert listed == [(user.id, user.name, user.email) for user in DEMO_USERS]


@pytest_twisted.ensureDeferred
async def test_monolith_serves_one_user_as_xml(
    backends: DemoBackends, http: HTTPClient
) -> None:
    url = backends.monolith_urls[0] + "/api/v1/users/4"
    response, body = await fetch(http, "GET", url)

    assert response.code == 200
    user = parse_xml(body)
    assert user.tag == "user"
    assert user.get("id") == "4"
    assert user.findtext("name") == "Edsger Dijkstra"
    assert user.findtext("email") == "edsger@example.com"
    assert user.findtext("active") == "false"


@pytest_twisted.ensureDeferred
async def test_monolith_unknown_user_is_an_xml_404(
    backends: DemoBackends, http: HTTPClient
) -> None:
    url = backends.monolith_urls[0] + "/api/v1/users/42"
    response, body = await fetch(http, "GET", url)

    assert response.code == 404
    assert header(response, "Content-Type") == "application/xml"
    error = parse_xml(body)
    assert error.findtext("status") == "404"
    assert error.findtext("message") == "no user with id 42"


@pytest_twisted.ensureDeferred
async def test_monolith_creates_a_user_on_that_instance_only(
    backends: DemoBackends, http: HTTPClient
) -> None:
    first, second = backends.monolith_urls
    body = (
        b"<user><name>Margaret Hamilton</name>"
        b"<email>margaret@example.com</email></user>"
    )
    response, answer = await fetch(
        http,
        "POST",
        first + "/api/v1/users",
        data=body,
        headers={"Content-Type": "application/xml"},
    )
    assert response.code == 201
    assert header(response, "Location") == "/api/v1/users/6"
    assert parse_xml(answer).get("id") == "6"

    found, stored = await fetch(http, "GET", first + "/api/v1/users/6")
    assert found.code == 200
    assert parse_xml(stored).findtext("name") == "Margaret Hamilton"
    assert parse_xml(stored).findtext("active") == "true"

    elsewhere, _ = await fetch(http, "GET", second + "/api/v1/users/6")
    assert elsewhere.code == 404


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"<user><name>Ann", "well-formed XML"),
        (b"<person/>", "expected a <user> element, got <person>"),
        (b"<user><email>a@example.com</email></user>", "non-empty <name>"),
        (b"<user><name>Ann</name><email>nope</email></user>", "'nope'"),
        (
            b'<!DOCTYPE user [<!ENTITY x "boom">]>'
            b"<user><name>&x;</name><email>a@example.com</email></user>",
            "without DTD or entities",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_monolith_refuses_a_bad_user_body(
    backends: DemoBackends, http: HTTPClient, body: bytes, complaint: str
) -> None:
    url = backends.monolith_urls[0] + "/api/v1/users"
    response, answer = await fetch(http, "POST", url, data=body)

    assert response.code == 400
    assert complaint in parse_xml(answer).findtext("message")

    _, listing = await fetch(http, "GET", url)
    assert len(parse_xml(listing).findall("user")) == len(DEMO_USERS)


@pytest_twisted.ensureDeferred
async def test_monolith_serves_orders_as_xml(
    backends: DemoBackends, http: HTTPClient
) -> None:
    base = backends.monolith_urls[0]
    _, listing = await fetch(http, "GET", base + "/api/v1/orders")
    response, one = await fetch(http, "GET", base + "/api/v1/orders/1001")
    missing, _ = await fetch(http, "GET", base + "/api/v1/orders/7")

    ids = [order.get("id") for order in parse_xml(listing).iter("order")]
    assert ids == ["1001", "1002", "1003", "1004"]
    assert response.code == 200
    order = parse_xml(one)
    assert order.findtext("user_id") == "1"
    assert order.findtext("total") == "42.50"
    assert order.find("total").get("currency") == "EUR"
    assert missing.code == 404


@pytest_twisted.ensureDeferred
async def test_monolith_slow_report_answers(
    backends: DemoBackends, http: HTTPClient
) -> None:
    url = backends.monolith_urls[0] + "/api/v1/reports/slow?ms=20"
    response, body = await fetch(http, "GET", url)

    assert response.code == 200
    report = parse_xml(body)
    assert report.get("name") == "slow"
    assert report.findtext("delay_ms") == "20"
    assert header(response, "X-Served-By") == "monolith-1"


@pytest.mark.parametrize("value", ["-5", "abc", "60001", "1.5", ""])
@pytest_twisted.ensureDeferred
async def test_monolith_slow_report_refuses_a_bad_delay(
    backends: DemoBackends, http: HTTPClient, value: str
) -> None:
    url = backends.monolith_urls[0] + "/api/v1/reports/slow"
    response, body = await fetch(http, "GET", url, params={"ms": value})

    assert response.code == 400
    assert repr(value) in parse_xml(body).findtext("message")


@pytest_twisted.ensureDeferred
async def test_monolith_login_sets_two_cookies(
    backends: DemoBackends, http: HTTPClient
) -> None:
    response, _ = await fetch(http, "POST", backends.monolith_urls[0] + "/login")

    cookies = response.headers.getRawHeaders("Set-Cookie")
    assert len(cookies) == 2
    assert cookies[0].startswith("session=monolith-1.1;")
    assert "HttpOnly" in cookies[0]
    assert cookies[1].startswith("theme=classic;")
    assert {cookie.name for cookie in response.cookies()} == {"session", "theme"}


@pytest_twisted.ensureDeferred
async def test_monolith_old_home_redirects_to_root(
    backends: DemoBackends, http: HTTPClient
) -> None:
    url = backends.monolith_urls[0] + "/old-home"
    moved, _ = await fetch(http, "GET", url, allow_redirects=False)
    followed, body = await fetch(http, "GET", url)

    assert moved.code == 302
    assert header(moved, "Location") == "/"
    assert followed.code == 200
    assert [earlier.code for earlier in followed.history()] == [302]
    assert b"Legacy Monolith" in body


@pytest_twisted.ensureDeferred
async def test_monolith_unknown_path_and_wrong_method(
    backends: DemoBackends, http: HTTPClient
) -> None:
    base = backends.monolith_urls[0]
    missing, missing_body = await fetch(http, "GET", base + "/api/v1/invoices")
    refused, _ = await fetch(http, "DELETE", base + "/api/v1/users/1")

    assert missing.code == 404
    assert header(missing, "X-Served-By") == "monolith-1"
    assert parse_xml(missing_body).findtext("message").endswith("/api/v1/invoices")
    assert refused.code == 405
    assert header(refused, "Allow") == "GET"


def test_slow_report_answers_only_once_its_delay_has_passed() -> None:
    clock = Clock()
    stub = StubTreq(Monolith("monolith-1", clock).resource)
    answered = _results(stub.get("http://demo/api/v1/reports/slow?ms=500"))

    stub.flush()
    clock.advance(0.25)
    stub.flush()
    assert answered == []

    clock.advance(0.25)
    stub.flush()
    assert [response.code for response in answered] == [200]
    assert clock.getDelayedCalls() == []


def test_slow_report_is_dropped_when_the_client_leaves() -> None:
    clock = Clock()
    channel = DummyChannel()
    channel.site = Site(Monolith("monolith-1", clock).resource, reactor=clock)
    request = Request(channel)
    request.gotLength(0)
    request.requestReceived(b"GET", b"/api/v1/reports/slow?ms=500", b"HTTP/1.1")
    assert len(clock.getDelayedCalls()) == 1

    request.connectionLost(Failure(ConnectionDone()))

    assert clock.getDelayedCalls() == []


def test_instance_name_must_be_safe_in_a_header() -> None:
    with pytest.raises(ValueError, match=r"instance name.*'bad\\r\\nname'"):
        Monolith("bad\r\nname", Clock())


# -- the users service -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_users_service_lists_the_same_users_as_json(
    backends: DemoBackends, http: HTTPClient
) -> None:
    response, body = await fetch(http, "GET", backends.users_url + "/api/v2/users")

    assert response.code == 200
    assert header(response, "Content-Type") == "application/json"
    assert header(response, "X-Served-By") == "users-1"
    listing = orjson.loads(body)
    assert [(user["id"], user["name"]["full"]) for user in listing["users"]] == [
        (user.id, user.name) for user in DEMO_USERS
    ]
    assert listing["meta"]["generated_at"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_users_service_nests_the_name(
    backends: DemoBackends, http: HTTPClient
) -> None:
    response, body = await fetch(http, "GET", backends.users_url + "/api/v2/users/3")

    assert response.code == 200
    user = orjson.loads(body)
    assert {key: user[key] for key in ("id", "name", "email", "active")} == {
        "id": 3,
        "name": {"full": "Alan Turing"},
        "email": "alan@example.com",
        "active": True,
    }
    assert set(user["meta"]) == {"generated_at"}


def test_users_service_dates_answers_by_its_clock() -> None:
    clock = Clock()
    clock.advance(1_700_000_000.25)
    stub = StubTreq(UsersService("users-1", clock).resource)

    body = _results(stub.json_content(_only(stub.get("http://demo/api/v2/users/1"))))

    assert body[0]["meta"] == {"generated_at": "2023-11-14T22:13:20.250Z"}


@pytest_twisted.ensureDeferred
async def test_users_service_unknown_user_is_a_json_404(
    backends: DemoBackends, http: HTTPClient
) -> None:
    url = backends.users_url + "/api/v2/users/42"
    response, body = await fetch(http, "GET", url)

    assert response.code == 404
    assert header(response, "Content-Type") == "application/json"
    assert orjson.loads(body) == {
        "error": {"status": 404, "message": "no user with id 42"}
    }


@pytest_twisted.ensureDeferred
async def test_users_service_creates_users_in_the_v2_shape_only(
    backends: DemoBackends, http: HTTPClient
) -> None:
    url = backends.users_url + "/api/v2/users"
    nested = {"name": {"full": "Margaret Hamilton"}, "email": "mh@example.com"}
    v1_shaped = {"user": {"name": "Katherine Johnson", "email": "kj@example.com"}}

    first, first_body = await fetch(http, "POST", url, json=nested)
    second, second_body = await fetch(http, "POST", url, json=v1_shaped)
    found, found_body = await fetch(http, "GET", url + "/6")

    assert (first.code, header(first, "Location")) == (201, "/api/v2/users/6")
    assert orjson.loads(first_body)["name"] == {"full": "Margaret Hamilton"}
    assert orjson.loads(first_body)["active"] is True
    assert second.code == 400
    assert "name must be" in orjson.loads(second_body)["error"]["message"]
    assert found.code == 200
    assert orjson.loads(found_body)["name"] == {"full": "Margaret Hamilton"}


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"{not json", "body must be JSON"),
        (b"[1, 2]", "body must be a JSON object, got list"),
        (b'{"name": 42, "email": "a@example.com"}', "got 42"),
        (
            b'{"name": {"full": "Ann"}, "email": "nope"}',
            "email must be an e-mail address",
        ),
        (b'{"name": "Ann", "email": "a@example.com"}', "got 'Ann'"),
        (
            b'{"name": {"full": "Ann"}, "email": "a@example.com", "active": "true"}',
            "got 'true'",
        ),
        (b'{"name": {"full": "Ann"}, "email": "a@example.com", "active": 1}', "got 1"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_users_service_refuses_a_bad_user_body(
    backends: DemoBackends, http: HTTPClient, body: bytes, complaint: str
) -> None:
    url = backends.users_url + "/api/v2/users"
    response, answer = await fetch(http, "POST", url, data=body)

    assert response.code == 400
    assert complaint in orjson.loads(answer)["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_failure_switch_fails_the_api_and_heals(
    backends: DemoBackends, http: HTTPClient
) -> None:
    base = backends.users_url
    switched, switched_body = await fetch(http, "POST", base + "/admin/fail?rate=1")
    broken, broken_body = await fetch(http, "GET", base + "/api/v2/users/1")
    health, _ = await fetch(http, "GET", base + "/health")
    await fetch(http, "POST", base + "/admin/fail?rate=0")
    healed, _ = await fetch(http, "GET", base + "/api/v2/users/1")

    assert switched.code == 200
    assert orjson.loads(switched_body) == {"fail_rate": 1.0}
    assert broken.code == 500
    assert orjson.loads(broken_body)["error"]["status"] == 500
    assert health.code == 200
    assert healed.code == 200
    assert backends.users.fail_rate == 0.0


@pytest.mark.parametrize("query", ["?rate=1.5", "?rate=-0.1", "?rate=abc", ""])
@pytest_twisted.ensureDeferred
async def test_failure_switch_refuses_a_bad_rate(
    backends: DemoBackends, http: HTTPClient, query: str
) -> None:
    url = backends.users_url + "/admin/fail" + query
    response, body = await fetch(http, "POST", url)

    assert response.code == 400
    message = orjson.loads(body)["error"]["message"]
    assert message.startswith("rate must be a number from 0 to 1, got ")
    assert backends.users.fail_rate == 0.0


def test_fail_rate_is_the_share_of_draws_below_it() -> None:
    service = UsersService("users-1", Clock(), rng=_Draws([0.49, 0.5, 0.0, 0.99]))
    stub = StubTreq(service.resource)
    _only(stub.post("http://demo/admin/fail?rate=0.5"))

    codes = [_only(stub.get("http://demo/api/v2/users")).code for _ in range(4)]

    assert codes == [500, 200, 500, 200]


@pytest_twisted.ensureDeferred
async def test_users_service_wrong_method_is_a_json_405(
    backends: DemoBackends, http: HTTPClient
) -> None:
    response, body = await fetch(http, "PUT", backends.users_url + "/health")

    assert response.code == 405
    assert header(response, "Allow") == "GET"
    assert orjson.loads(body)["error"]["message"].startswith("PUT is not allowed")


# -- helpers ---------------------------------------------------------------


class _RawClient(Protocol):
    """Sends bytes by hand and says when a full /health answer and close came."""

    def __init__(self) -> None:
        self.received = b""
        self.answered: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"\r\n\r\nok") and not self.answered.called:
            self.answered.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class _Draws(random.Random):
    """A `Random` whose `random()` returns the given numbers in turn."""

    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self._draws: Iterator[float] = iter(draws)

    def random(self) -> float:
        return next(self._draws)


@dataclass
class _RecordingPort:
    port: int
    stopped: bool = False

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> None:
        self.stopped = True


class _PortsTaken(MemoryReactorClock):
    """A reactor on which some ports are already in use by someone else."""

    def __init__(self, taken: set[int]) -> None:
        super().__init__()
        self.taken = taken
        self.opened: list[_RecordingPort] = []

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> _RecordingPort:
        if port in self.taken:
            raise CannotListenError(interface, port, OSError("address in use"))
        self.opened.append(_RecordingPort(port))
        return self.opened[-1]


def _results(deferred: Deferred[Any]) -> list[Any]:
    """Collects what `deferred` fires with; empty while it has not fired."""
    fired: list[Any] = []
    deferred.addCallback(fired.append)
    return fired


def _only(deferred: Deferred[Any]) -> Any:
    """The result of a Deferred that in-memory code has already fired."""
    fired = _results(deferred)
    assert len(fired) == 1, f"expected the Deferred to have fired, got {deferred!r}"
    return fired[0]
