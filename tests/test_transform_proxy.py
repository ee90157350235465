"""XML clients reach the JSON users service through the gateway and get XML back."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from defusedxml import ElementTree
from support import header_values, raw_exchange, status_of
from twisted.internet import protocol, reactor

from strangler.demo.backends import DemoPorts, start_demo_backends

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
async def test_xml_request_body_reaches_service_as_json(demo, gateway):
    gw = gateway(translating_rules(demo.monolith_urls[0], demo.users_url))

    raw = await raw_exchange(
        gw.port,
        _post(
            b"/api/v1/users",
            b"<user><name><full>Grace Hopper</full></name><email>grace@example.test</email>"
            b"<active>true</active></user>",
        ),
    )

    assert status_of(raw) == 201, raw
    assert header_values(raw, b"content-type") == [b"application/xml"]
    created = ElementTree.fromstring(raw.split(b"\r\n\r\n", 1)[1])
    assert "Grace Hopper" in ElementTree.tostring(created).decode()


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


@ensure
async def test_demo_v1_clients_get_the_v1_xml_shape_from_the_new_service(demo, gateway):
    gw = gateway(_demo_rules_on(demo, 100))

    raw = await raw_exchange(
        gw.port,
        b"GET /api/v1/users/3 HTTP/1.1\r\nHost: a\r\nX-User-Id: 7\r\nConnection: close\r\n\r\n",
    )
    created = await raw_exchange(
        gw.port,
        _post(
            b"/api/v1/users",
            b"<user><name>Grace Hopper</name><email>grace@example.test</email>"
            b"<active>true</active></user>",
        ),
    )

    assert header_values(raw, b"x-served-by") == [b"users-1"]
    user = ElementTree.fromstring(raw.split(b"\r\n\r\n", 1)[1])
    assert user.tag == "user" and user.get("id") == "3"
    assert user.findtext("name") and user.findtext("email")
    assert status_of(created) == 201
    made = ElementTree.fromstring(created.split(b"\r\n\r\n", 1)[1])
    assert made.tag == "user" and made.findtext("name") == "Grace Hopper"
