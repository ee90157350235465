"""XML clients reach the JSON users service through the gateway and get XML back."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import pytest_twisted
from cli_support import run_cli
from defusedxml import ElementTree
from structlog.testing import capture_logs
from support import header_values, raw_exchange, sleep, status_of, write_rules
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web import resource, server

from strangler.demo.backends import DemoPorts, start_demo_backends
from strangler.transforms.xml_json import TRANSFORMS

ensure = pytest_twisted.ensureDeferred


@pytest.fixture
def demo():  # type: ignore[no-untyped-def]
    running = start_demo_backends(reactor, DemoPorts(monolith=(0, 0), users=0))
    yield running
    pytest_twisted.blockon(running.stop())


def translating_rules(monolith: str, users: str, extra: str = "") -> str:
    return f"""
listen: 127.0.0.1:0
upstreams:
  monolith:
    targets: [{monolith}]
  users:
    targets: [{users}]
default: monolith
routes:
  - name: users-v1
    match: {{path: /api/v1/users}}
    to: users
    rewrite: {{prefix: /api/v1/users, to: /api/v2/users}}
    transform: {{request: xml_to_json, response: json_to_xml{extra}}}
"""


def _post(path: bytes, body: bytes, content_type: bytes = b"application/xml") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (path, content_type, len(body), body)
    )


@ensure
async def test_xml_client_reads_json_service_as_xml(demo, gateway):
    gw = gateway(translating_rules(demo.monolith_urls[0], demo.users_url))

    raw = await raw_exchange(
        gw.port, b"GET /api/v1/users/3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )

    assert status_of(raw) == 200
    assert header_values(raw, b"content-type") == [b"application/xml"]
    assert header_values(raw, b"x-served-by") == [b"users-1"]
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert int(header_values(raw, b"content-length")[0]) == len(body)
    root = ElementTree.fromstring(body)
    assert root.tag == "root"  # a multi-key JSON object is wrapped (docs/transforms.md)
    assert root.findtext("id") == "3"


@ensure
async def test_xml_request_body_reaches_service_as_json(backends, gateway):
    backend = backends("users")
    gw = gateway(translating_rules(backend.url, backend.url))

    raw = await raw_exchange(
        gw.port,
        _post(
            b"/api/v1/users",
            b"<user><name><full>Grace Hopper</full></name><email>grace@example.test"
            b"</email><active>true</active></user>",
        ),
    )

    assert status_of(raw) == 200, raw
    seen = backend.requests[0]
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == seen["body_bytes"]
    assert json.loads(seen["body"]) == {
        "user": {
            "name": {"full": "Grace Hopper"},
            "email": "grace@example.test",
            "active": True,
        }
    }
    assert seen["uri"] == "/api/v2/users"


@ensure
async def test_malformed_xml_gets_400_and_reaches_nobody(demo, gateway):
    gw = gateway(translating_rules(demo.monolith_urls[0], demo.users_url))

    raw = await raw_exchange(
        gw.port, _post(b"/api/v1/users", b"<user><name>oops</user>")
    )

    assert status_of(raw) == 400
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "request_transform_failed"
    assert "XML" in body["message"]


@ensure
async def test_xml_entity_attack_gets_400(demo, gateway):
    gw = gateway(translating_rules(demo.monolith_urls[0], demo.users_url))
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
        b"<user><name>&lol2;</name></user>"
    )
    external = (
        b'<?xml version="1.0"?><!DOCTYPE u [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<user><name>&x;</name></user>"
    )

    for payload in (bomb, external):
        raw = await raw_exchange(gw.port, _post(b"/api/v1/users", payload))
        assert status_of(raw) == 400
        assert b"passwd" not in raw.split(b"\r\n\r\n", 1)[1] or b"root:" not in raw


@ensure
async def test_body_over_transform_max_body_gets_413_before_buffering(demo, gateway):
    gw = gateway(
        translating_rules(demo.monolith_urls[0], demo.users_url, ", max_body: 1KiB")
    )

    declared = await raw_exchange(
        gw.port,
        b"POST /api/v1/users HTTP/1.1\r\nHost: a\r\nContent-Type: application/xml\r\n"
        b"Content-Length: 5000000\r\n\r\n<user>",
    )
    chunked = await raw_exchange(
        gw.port,
        b"POST /api/v1/users HTTP/1.1\r\nHost: a\r\nContent-Type: application/xml\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048 + b"\r\n",
    )

    assert status_of(declared) == 413
    assert status_of(chunked) == 413


class _NotJson(protocol.Protocol):
    """A service that claims JSON but answers garbage."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            body = b"{not json"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


@ensure
async def test_unconvertible_response_gives_502(demo, gateway):
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(_NotJson), interface="127.0.0.1"
    )
    try:
        gw = gateway(
            translating_rules(
                demo.monolith_urls[0], f"http://127.0.0.1:{port.getHost().port}"
            )
        )
        raw = await raw_exchange(
            gw.port,
            b"GET /api/v1/users/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    finally:
        await port.stopListening()

    assert status_of(raw) == 502
    assert b'"error":"response_transform_failed"' in raw


@ensure
async def test_routes_without_transform_are_untouched(demo, gateway):
    gw = gateway(translating_rules(demo.monolith_urls[0], demo.users_url))

    raw = await raw_exchange(
        gw.port,
        b"GET /api/v1/orders/1001 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    assert status_of(raw) == 200
    assert header_values(raw, b"x-served-by")[0].startswith(b"monolith-")
    assert b"<order" in raw


@ensure
async def test_header_edits_both_ways_with_references(backends, gateway):
    backend = backends("users")
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          users: {{targets: [{backend.url}]}}
        default: users
        routes:
          - name: users-v2
            match: {{path: /api}}
            to: users
            headers:
              request:
                set: {{X-Api-Version: "2", X-Caller: "${{request.header.X-User-Id}}"}}
                add: {{X-Route: "${{route}}/${{upstream}}"}}
                remove: [X-Debug]
              response:
                set: {{X-Served-By: hidden}}
                add: {{X-Gateway: strangler}}
        """
    )

    raw = await raw_exchange(
        gw.port,
        b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\nX-Debug: 1\r\n"
        b"X-Api-Version: 1\r\nConnection: close\r\n\r\n",
    )

    seen = {name.lower(): value for name, value in backend.requests[0]["headers"]}
    assert seen["x-api-version"] == "2"
    assert seen["x-caller"] == "42"
    assert seen["x-route"] == "users-v2/users"
    assert "x-debug" not in seen
    assert header_values(raw, b"x-served-by") == [b"hidden"]
    assert header_values(raw, b"x-gateway") == [b"strangler"]


@ensure
async def test_body_map_renames_fields_both_ways(demo, gateway):
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          users: {{targets: [{demo.users_url}]}}
        default: users
        routes:
          - name: v1-json
            match: {{path: /api/v1/users}}
            to: users
            rewrite: {{prefix: /api/v1/users, to: /api/v2/users}}
            transform:
              body:
                - rename: {{from: user_name, to: name.full}}
        """
    )
    payload = json.dumps(
        {"user_name": "Ada Lovelace", "email": "ada@example.test"}
    ).encode()

    raw = await raw_exchange(
        gw.port, _post(b"/api/v1/users", payload, b"application/json")
    )

    assert status_of(raw) == 201, raw
    created = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert created["user_name"] == "Ada Lovelace"
    assert "name" not in created


def _demo_rules_on(demo, users_weight: int) -> str:  # type: ignore[no-untyped-def]
    """The shipped demo rule file, pointed at test ports and a chosen split."""
    from strangler.demo import DEMO_RULES

    text = DEMO_RULES.read_text()
    text = text.replace("127.0.0.1:8080", "127.0.0.1:0").replace(
        "127.0.0.1:8081", "127.0.0.1:0"
    )
    text = text.replace("http://127.0.0.1:9001", demo.monolith_urls[0])
    text = text.replace("http://127.0.0.1:9002", demo.monolith_urls[1])
    text = text.replace("http://127.0.0.1:9101", demo.users_url)
    text = text.replace(
        "{to: monolith, weight: 90}", f"{{to: monolith, weight: {100 - users_weight}}}"
    )
    return text.replace("weight: 10\n", f"weight: {users_weight}\n")


def _tree(body: bytes) -> tuple[object, ...]:
    """An XML body as names, attributes, text and children: what a client reads."""

    def walk(element: Any) -> tuple[object, ...]:
        return (
            element.tag,
            sorted(element.attrib.items()),
            (element.text or "").strip(),
            [walk(child) for child in element],
        )

    return walk(ElementTree.fromstring(body))


def _get(path: bytes, method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: a\r\nX-User-Id: 7\r\nConnection: close\r\n\r\n" % (
        method,
        path,
    )


def _body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


@ensure
async def test_demo_v1_clients_get_the_monolith_answers_from_the_new_service(
    demo, gateway
):
    """Done when: old XML clients see the v1 contract, whichever side answers."""
    new = gateway(_demo_rules_on(demo, 100))
    old = gateway(_demo_rules_on(demo, 0))
    created = (
        b"<user><name>Grace Hopper</name><email>grace@example.test</email>"
        b"<active>false</active></user>"
    )

    answers = {}
    for side, gw in (("new", new), ("old", old)):
        answers[side] = {
            "list": await raw_exchange(gw.port, _get(b"/api/v1/users")),
            "one": await raw_exchange(gw.port, _get(b"/api/v1/users/3")),
            "missing": await raw_exchange(gw.port, _get(b"/api/v1/users/42")),
            "head": await raw_exchange(gw.port, _get(b"/api/v1/users", b"HEAD")),
            "created": await raw_exchange(gw.port, _post(b"/api/v1/users", created)),
        }

    new_side, old_side = answers["new"], answers["old"]
    assert header_values(new_side["list"], b"x-served-by") == [b"users-1"]
    assert header_values(old_side["list"], b"x-served-by")[0].startswith(b"monolith")
    for name in ("list", "one", "missing", "created"):
        assert status_of(new_side[name]) == status_of(old_side[name]), name
        assert header_values(new_side[name], b"content-type") == [b"application/xml"]
        assert _tree(_body(new_side[name])) == _tree(_body(old_side[name])), name
    assert _tree(_body(new_side["list"]))[0] == "users"
    assert len(_tree(_body(new_side["list"]))[3]) == 5
    assert status_of(new_side["created"]) == 201
    assert header_values(new_side["created"], b"location") == [b"/api/v1/users/6"]
    assert header_values(old_side["created"], b"location") == [b"/api/v1/users/6"]
    assert status_of(new_side["head"]) == 200
    assert header_values(new_side["head"], b"content-type") == [b"application/xml"]
    assert header_values(old_side["head"], b"content-type") == [b"application/xml"]
    assert _body(new_side["head"]) == b""


# -- big bodies convert off the reactor -----------------------------------------


class _Fixed(resource.Resource):
    """Answers every request with one fixed body and records what it was sent."""

    isLeaf = True

    def __init__(
        self,
        body: bytes,
        content_type: bytes = b"application/json",
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.requests: list[dict[str, Any]] = []

    def render(self, request: server.Request) -> bytes:
        self.requests.append(
            {
                "uri": request.uri,
                "headers": {
                    name.lower(): values[0]
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
                "body": request.content.read(),
            }
        )
        request.setHeader(b"Content-Type", self.content_type)
        for name, value in self.headers:
            request.setHeader(name, value)
        return self.body


@pytest.fixture
def fixed():  # type: ignore[no-untyped-def]
    """Start `_Fixed` backends: `fixed(body, ...)` gives (url, resource)."""
    ports = []

    def start(body: bytes, **kwargs: Any) -> tuple[str, _Fixed]:
        answer = _Fixed(body, **kwargs)
        site = server.Site(answer)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}", answer

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


class _HeldConversion:
    """Holds one conversion until the test lets it go, wherever it runs.

    If the conversion ran on the reactor thread, the test could not release
    it: the wait would time out, and `released` says so.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.released = False
        real = TRANSFORMS[name]

        def held(body: bytes) -> bytes:
            self.started.set()
            self.released = self.release.wait(5)
            return real(body)

        monkeypatch.setitem(TRANSFORMS, name, held)

    async def wait_started(self) -> None:
        for _ in range(1000):  # at most 10 s
            if self.started.is_set():
                return
            await sleep(0.01)
        raise AssertionError("the conversion never started")


async def _until(predicate: Any, what: str) -> None:
    for _ in range(1000):  # at most 10 s
        if predicate():
            return
        await sleep(0.01)
    raise AssertionError(f"never happened: {what}")


BIG_XML = b"<list>" + b"<item>12345</item>" * 6000 + b"</list>"
BIG_JSON = json.dumps({"list": {"item": list(range(20000))}}).encode()


def _big_rules(echo: str, json_service: str) -> str:
    return f"""
    listen: 127.0.0.1:0
    upstreams:
      echo: {{targets: [{echo}]}}
      json: {{targets: [{json_service}]}}
    default: echo
    routes:
      - name: convert-in
        match: {{path: /in}}
        to: echo
        transform: {{request: xml_to_json}}
      - name: convert-out
        match: {{path: /out}}
        to: json
        transform: {{response: json_to_xml}}
      - name: plain
        match: {{path: /plain}}
        to: echo
    """


@pytest.mark.parametrize("direction", ["request", "response"])
@ensure
async def test_a_plain_request_is_served_while_a_large_body_converts(
    backends, fixed, gateway, monkeypatch, direction
):
    assert len(BIG_XML) > 64 * 1024 and len(BIG_JSON) > 64 * 1024
    echo = backends("echo")
    json_url, _ = fixed(BIG_JSON)
    gw = gateway(_big_rules(echo.url, json_url))
    held = _HeldConversion(
        monkeypatch, "xml_to_json" if direction == "request" else "json_to_xml"
    )
    finished: list[str] = []

    if direction == "request":
        big = raw_exchange(gw.port, _post(b"/in", BIG_XML), wait=15)
    else:
        big = raw_exchange(gw.port, _get(b"/out"), wait=15)
    big.addCallback(lambda raw: (finished.append("big"), raw)[1])
    await held.wait_started()
    plain = await raw_exchange(gw.port, _get(b"/plain"))
    finished.append("plain")
    held.release.set()
    converted = await big

    assert held.released, "the conversion blocked the reactor"
    assert finished == ["plain", "big"]
    assert status_of(plain) == 200
    assert status_of(converted) == 200, converted[:300]
    if direction == "request":
        seen = next(r for r in echo.requests if r["uri"] == "/in")
        assert seen["body_bytes"] == len(
            json.dumps({"list": {"item": [12345] * 6000}}, separators=(",", ":"))
        )
    else:
        tree = _tree(_body(converted))
        assert tree[0] == "list" and len(tree[3]) == 20000
        assert int(header_values(converted, b"content-length")[0]) == len(
            _body(converted)
        )


class _Leaving(protocol.Protocol):
    """Sends a request and can hang up before the answer comes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest.mark.parametrize("direction", ["request", "response"])
@ensure
async def test_a_client_leaving_during_a_large_conversion_loses_only_its_request(
    backends, fixed, gateway, monkeypatch, direction
):
    echo = backends("echo")
    json_url, json_service = fixed(BIG_JSON)
    gw = gateway(_big_rules(echo.url, json_url))
    held = _HeldConversion(
        monkeypatch, "xml_to_json" if direction == "request" else "json_to_xml"
    )
    payload = _post(b"/in", BIG_XML) if direction == "request" else _get(b"/out")

    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port).connect(
        protocol.Factory.forProtocol(lambda: _Leaving(payload))
    )
    await held.wait_started()
    client.transport.abortConnection()
    await _until(
        lambda: any(line.get("status") == 499 for line in gw.log_lines()),
        "the request was recorded as abandoned",
    )
    held.release.set()
    conversions = gw.server.gateway.conversions
    await _until(lambda: conversions.busy == 0, "the conversion finished")
    after = await raw_exchange(gw.port, _get(b"/plain"))

    assert held.released
    assert client.received == b""
    assert [r["uri"] for r in echo.requests] == ["/plain"]
    assert len(json_service.requests) == (0 if direction == "request" else 1)
    assert status_of(after) == 200
    statuses = [line["status"] for line in gw.log_lines()]
    assert statuses == [499, 200]


# -- which bodies convert ----------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        b"multipart/form-data; boundary=xmlpart",
        b"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        b"text/plain; note=xml",
    ],
)
@ensure
async def test_a_body_that_only_mentions_xml_passes_through_unchanged(
    backends, gateway, content_type
):
    echo = backends("echo")
    gw = gateway(_big_rules(echo.url, echo.url))
    body = (
        b"--xmlpart\r\nContent-Disposition: form-data; name=f\r\n\r\n"
        b"not <xml\r\n--xmlpart--\r\n"
    )

    raw = await raw_exchange(gw.port, _post(b"/in", body, content_type))

    assert status_of(raw) == 200, raw
    seen = echo.requests[0]
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert headers["content-type"] == content_type.decode()
    assert seen["body"] == body.decode()


@pytest.mark.parametrize(
    "content_type", [None, b"application/xml", b"text/xml; charset=utf-8", b"a/b+xml"]
)
@ensure
async def test_xml_media_types_and_a_missing_type_convert(
    backends, gateway, content_type
):
    echo = backends("echo")
    gw = gateway(_big_rules(echo.url, echo.url))
    body = b"<a>1</a>"
    declared = b"" if content_type is None else b"Content-Type: %s\r\n" % content_type

    raw = await raw_exchange(
        gw.port,
        b"POST /in HTTP/1.1\r\nHost: a\r\n%sContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (declared, len(body), body),
    )

    assert status_of(raw) == 200, raw
    assert json.loads(echo.requests[0]["body"]) == {"a": 1}


# -- body maps both ways ---------------------------------------------------------


def _mapped_rules(service: str, transform: str) -> str:
    return f"""
    listen: 127.0.0.1:0
    upstreams:
      svc: {{targets: [{service}]}}
    default: svc
    routes:
      - name: mapped
        match: {{path: /api}}
        to: svc
        transform: {transform}
    """


@ensure
async def test_a_drop_keeps_the_renames_reversing_on_the_way_back(fixed, gateway):
    url, service = fixed(b'{"name": {"full": "Ann"}, "legacy_flag": 1}')
    gw = gateway(
        _mapped_rules(
            url,
            "{body: [{rename: {from: user_name, to: name.full}}, {drop: legacy_flag}]}",
        )
    )

    raw = await raw_exchange(
        gw.port,
        _post(
            b"/api", b'{"user_name": "Ann", "legacy_flag": true}', b"application/json"
        ),
    )

    assert json.loads(service.requests[0]["body"]) == {"name": {"full": "Ann"}}
    assert status_of(raw) == 200, raw
    assert json.loads(_body(raw)) == {"user_name": "Ann", "legacy_flag": 1}


@ensure
async def test_a_top_level_list_answer_is_mapped_item_by_item(fixed, gateway):
    url, _ = fixed(b'[{"name": {"full": "Ann"}}, {"name": {"full": "Bob"}}]')
    gw = gateway(
        _mapped_rules(url, "{body: [{rename: {from: user_name, to: name.full}}]}")
    )

    raw = await raw_exchange(gw.port, _get(b"/api/users"))

    assert status_of(raw) == 200, raw
    assert json.loads(_body(raw)) == [{"user_name": "Ann"}, {"user_name": "Bob"}]


@ensure
async def test_a_list_answer_becomes_the_v1_list_shape_with_each(fixed, gateway):
    url, _ = fixed(
        b'{"users": [{"id": 1, "name": {"full": "Ann"}}, {"id": 2, "name": {"full": '
        b'"Bob"}}], "meta": {"page": 1}}'
    )
    gw = gateway(
        _mapped_rules(
            url,
            """
          response: json_to_xml
          body:
            response:
              - drop: meta
              - each:
                  path: users
                  map: [{rename: {from: id, to: "@id"}}, {rename: {from: name.full, to: name}}]
              - rename: {from: users, to: users.user}""",
        )
    )

    raw = await raw_exchange(gw.port, _get(b"/api/users"))

    assert status_of(raw) == 200, raw
    assert _tree(_body(raw)) == _tree(
        b'<users><user id="1"><name>Ann</name></user>'
        b'<user id="2"><name>Bob</name></user></users>'
    )


@ensure
async def test_a_body_map_works_on_the_json_side_of_json_to_xml(backends, gateway):
    echo = backends("echo")
    gw = gateway(
        _mapped_rules(
            echo.url,
            "{request: json_to_xml, body: [{rename: {from: user_name, to: user.name}}]}",
        )
    )

    raw = await raw_exchange(
        gw.port, _post(b"/api", b'{"user_name": "Ann"}', b"application/json")
    )

    assert status_of(raw) == 200, raw
    seen = echo.requests[0]
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert headers["content-type"] == "application/xml"
    assert _tree(seen["body"].encode()) == _tree(b"<user><name>Ann</name></user>")


@pytest.mark.parametrize(
    "transform",
    ["{request: json_to_xml}", "{body: [{rename: {from: a, to: b.c}}]}"],
)
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 200 + b"]" * 200, "JSON document nested deeper than"),
        (b'{"a": ', "malformed JSON at line 1, column 7"),
    ],
)
@ensure
async def test_deep_or_malformed_json_gets_400_and_reaches_nobody(
    backends, gateway, transform, body, message
):
    echo = backends("echo")
    gw = gateway(_mapped_rules(echo.url, transform))

    raw = await raw_exchange(gw.port, _post(b"/api", body, b"application/json"))

    assert status_of(raw) == 400
    answer = json.loads(_body(raw))
    assert answer["error"] == "request_transform_failed"
    assert message in answer["message"]
    assert echo.requests == []


@ensure
async def test_an_oversized_answer_gets_502_and_a_log_line_naming_route_and_upstream(
    fixed, gateway
):
    url, _ = fixed(BIG_JSON)
    gw = gateway(_mapped_rules(url, "{response: json_to_xml, max_body: 1KiB}"))

    with capture_logs() as logs:
        raw = await raw_exchange(gw.port, _get(b"/api/users"))

    assert status_of(raw) == 502
    answer = json.loads(_body(raw))
    assert answer["error"] == "response_transform_failed"
    assert "over 1024 bytes" in answer["message"]
    failed = [e for e in logs if e["event"] == "response_transform_failed"]
    assert len(failed) == 1
    assert (failed[0]["route"], failed[0]["upstream"]) == ("mapped", "svc")
    assert failed[0]["log_level"] == "error"


# -- redirects, HEAD, Expect --------------------------------------------------------


@pytest.mark.parametrize(
    ("rewrite", "location"),
    [
        ("{prefix: /api/v1, to: /api/v2}", b"/api/v1/users/6?x=1"),
        ("{prefix: /api/v1, to: /api/v2, location: false}", b"/api/v2/users/6?x=1"),
        ("{regex: '^/api/v1(.*)$', to: '/api/v2\\1'}", b"/api/v2/users/6?x=1"),
    ],
)
@ensure
async def test_location_gets_the_client_prefix_back(fixed, gateway, rewrite, location):
    url, service = fixed(b"{}", headers=((b"Location", b"/api/v2/users/6?x=1"),))
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          svc: {{targets: [{url}]}}
        default: svc
        routes:
          - name: moved
            match: {{path: /api/v1}}
            to: svc
            rewrite: {rewrite}
        """
    )

    raw = await raw_exchange(gw.port, _get(b"/api/v1/users"))

    assert service.requests[0]["uri"] == b"/api/v2/users"
    assert header_values(raw, b"location") == [location]


class _ExpectingClient(protocol.Protocol):
    """Sends a head with `Expect: 100-continue` and the body only once told to."""

    def __init__(self, head: bytes, body: bytes, done: Deferred[bytes]) -> None:
        self.head = head
        self.body = body
        self.done = done
        self.received = b""
        self.sent_body = False

    def connectionMade(self) -> None:
        self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.sent_body and b"100 Continue\r\n\r\n" in self.received:
            self.sent_body = True
            self.transport.write(self.body)

    def connectionLost(self, reason: object = None) -> None:
        if not self.done.called:
            self.done.callback(self.received)


@ensure
async def test_a_held_body_gets_100_continue_from_the_gateway(backends, gateway):
    echo = backends("echo")
    gw = gateway(_mapped_rules(echo.url, "{request: xml_to_json}"))
    body = b"<a>1</a>"
    head = (
        b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Type: application/xml\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        % len(body)
    )
    done: Deferred[bytes] = Deferred()
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port).connect(
        protocol.Factory.forProtocol(lambda: _ExpectingClient(head, body, done))
    )
    give_up = reactor.callLater(5, client.transport.loseConnection)
    try:
        raw = await done
    finally:
        if give_up.active():
            give_up.cancel()

    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
    assert raw.count(b"100 Continue") == 1
    seen = echo.requests[0]
    assert json.loads(seen["body"]) == {"a": 1}
    assert "expect" not in {name.lower() for name, _ in seen["headers"]}


@ensure
async def test_header_rules_on_a_split_entry_apply_to_that_branch_only(
    backends, gateway
):
    old, new = backends("old"), backends("new")
    gw = gateway(
        f"""
        listen: 127.0.0.1:0
        upstreams:
          old: {{targets: [{old.url}]}}
          new: {{targets: [{new.url}]}}
        default: old
        routes:
          - name: users
            match: {{path: /api}}
            override: {{header: X-Force}}
            split:
              - {{to: old, weight: 50}}
              - to: new
                weight: 50
                headers:
                  request:
                    set: {{X-Api-Version: "2", X-Caller: "${{request.header.X-User-Id}}"}}
                    remove: [X-Debug]
                  response:
                    add: {{X-Branch: "${{upstream}}"}}
        """
    )

    def ask(branch: bytes) -> bytes:
        return (
            b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Force: %s\r\nX-User-Id: 42\r\n"
            b"X-Debug: 1\r\nConnection: close\r\n\r\n" % branch
        )

    to_new = await raw_exchange(gw.port, ask(b"new"))
    to_old = await raw_exchange(gw.port, ask(b"old"))

    new_seen = {name.lower(): value for name, value in new.requests[0]["headers"]}
    old_seen = {name.lower(): value for name, value in old.requests[0]["headers"]}
    assert (new_seen["x-api-version"], new_seen["x-caller"]) == ("2", "42")
    assert "x-debug" not in new_seen
    assert "x-api-version" not in old_seen and old_seen["x-debug"] == "1"
    assert header_values(to_new, b"x-branch") == [b"new"]
    assert header_values(to_old, b"x-branch") == []


def test_explain_shows_the_transforms_of_the_branch_and_the_shadow(tmp_path):
    rules = write_rules(
        tmp_path,
        """
        listen: 127.0.0.1:0
        upstreams:
          users: {targets: [http://127.0.0.1:9]}
          users2: {targets: [http://127.0.0.1:10]}
        default: users
        routes:
          - name: users-v1
            match: {path: /api/v1/users}
            to: users
            transform:
              request: xml_to_json
              response: json_to_xml
              body: [{rename: {from: user.name, to: name.full}}]
            shadow:
              to: users2
              transform: {request: xml_to_json}
        """,
    )

    result = run_cli("explain", str(rules), "GET", "/api/v1/users/3")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "transform:  request xml_to_json, response json_to_xml" in lines
    assert (
        "body map:   request: rename 'user.name' to 'name.full'; "
        "response: rename 'name.full' to 'user.name'"
    ) in lines
    assert (
        "shadow:     users2 (100% of GET, HEAD, OPTIONS); "
        "transform request xml_to_json, response none"
    ) in lines
