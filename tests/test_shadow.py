"""Shadow traffic through the real gateway, with real primary and shadow services."""

from __future__ import annotations

import itertools

import orjson
import pytest
import pytest_twisted
from load import get, run_load
from shadow_support import (
    Reply,
    Seen,
    json_reply,
    rules,
    services_fixture,
    wait_until,
)

from strangler.shadow.cli import format_diffs

ensure = pytest_twisted.ensureDeferred
services = services_fixture()

USER = {"id": 7, "name": "Ann", "email": "ann@example.com", "roles": ["a", "b"]}


def stats_of(gw, route: str = "users-v1"):  # type: ignore[no-untyped-def]
    return gw.server.gateway.shadows.routes[route]


def post(path: str, body: bytes, chunked: bool = False) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: text/plain\r\n"
    if not chunked:
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:]))
    return (
        (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
    )


@ensure
async def test_identical_answers_give_full_agreement(services, gateway):
    primary = services(lambda seen: json_reply(USER))
    # Same data, other key order and whitespace: structurally identical.
    reordered = (
        b'{ "roles": ["a","b"],\n "email": "ann@example.com", "name": "Ann", "id": 7 }'
    )
    shadow = services(
        lambda seen: (200, {"Content-Type": "application/json"}, reordered)
    )
    gw = gateway(rules(primary, shadow, "      percent: 100"))

    result = await run_load(gw.port, lambda i: get(f"/api/v1/users/{i}"), 40)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 40)

    assert result.failures == []
    assert all(r.status == 200 and r.body == primary_body() for r in result.replies)
    assert stats.agreed == 40 and stats.agreement() == 1.0
    assert stats.fields == {} and stats.in_flight == 0
    copies = shadow.copies()
    assert len(copies) == 40 and len(shadow.seen) == 40
    assert {c["uri"] for c in copies} == {f"/api/v1/users/{i}" for i in range(40)}
    assert len(primary.originals()) == 40


def primary_body() -> bytes:
    return json_reply(USER)[2]  # type: ignore[index]


@ensure
async def test_one_differing_field_is_reported_with_its_json_path(services, gateway):
    primary = services(lambda seen: json_reply({"user": USER, "meta": {"v": 1}}))
    changed = {**USER, "email": "ANN@example.com"}
    shadow = services(lambda seen: json_reply({"user": changed, "meta": {"v": 1}}))
    gw = gateway(rules(primary, shadow, "      percent: 100"))

    result = await run_load(gw.port, lambda i: get("/api/v1/users/7?x=1"), 25)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 25)

    assert {r.status for r in result.replies} == {200}
    assert stats.agreed == 0
    assert list(stats.fields) == [("body", "$.user.email")]
    field = stats.fields[("body", "$.user.email")]
    assert field.count == 25
    assert field.example["primary"] == '"ann@example.com"'
    assert field.example["shadow"] == '"ANN@example.com"'
    assert field.example["target"] == "/api/v1/users/7?x=1"
    assert stats.kinds == {"status": 0, "header": 0, "body": 25}
    sample = stats.samples[-1]
    assert sample["differences"][0]["where"] == "$.user.email"
    assert sample["primary"]["status"] == sample["shadow"]["status"] == 200


@ensure
async def test_an_ignored_field_is_not_reported(services, gateway):
    stamps = itertools.count()
    primary = services(lambda seen: json_reply({"id": 1, "meta": {"at": next(stamps)}}))
    shadow = services(lambda seen: json_reply({"id": 1, "meta": {"at": -1}}))
    block = "      compare: {ignore: [$.meta.at]}"
    gw = gateway(rules(primary, shadow, block))

    await run_load(gw.port, lambda i: get("/api/v1/users"), 20)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 20)

    assert stats.agreed == 20
    assert stats.fields == {}
    assert stats.ignored == 20


@ensure
async def test_a_timestamp_is_learned_as_noise_and_real_differences_remain(
    services, gateway
):
    clock = itertools.count(1000)
    primary = services(
        lambda seen: json_reply({"id": 1, "name": "Ann", "generated_at": next(clock)})
    )
    shadow = services(
        lambda seen: json_reply({"id": 1, "name": "Anne", "generated_at": 5})
    )
    block = "      compare: {noise: auto}"
    gw = gateway(rules(primary, shadow, block))

    await run_load(gw.port, lambda i: get("/api/v1/users"), 30, workers=1)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 30)

    noise = stats.noise
    assert set(noise.fields) == {"$.generated_at"}
    assert noise.probes == noise.sample_size == 10
    assert noise.learned_from == 10
    # Every pair was compared after the first repeat taught the noise.
    assert noise.suppressed == {"$.generated_at": 30}
    assert list(stats.fields) == [("body", "$.name")]
    assert stats.fields[("body", "$.name")].count == 30
    # The repeats went to the primary, marked, and only for the sample.
    assert len(primary.copies()) == 10 and len(primary.originals()) == 30
    assert all(c["method"] == "GET" for c in primary.copies())


@ensure
async def test_text_answers_with_a_timestamp_never_teach_the_whole_body_as_noise(
    services, gateway
):
    clock = itertools.count(1000)

    def monolith(seen: Seen) -> Reply:
        if seen["uri"].endswith("/status"):
            return 200, {"Content-Type": "text/plain"}, b"up at %d" % next(clock)
        return json_reply(USER)

    def users(seen: Seen) -> Reply:
        if seen["uri"].endswith("/status"):
            return 200, {"Content-Type": "text/plain"}, b"up at 1"
        return json_reply({**USER, "email": "wrong@example.com"})

    primary, shadow = services(monolith), services(users)
    gw = gateway(rules(primary, shadow, "      compare: {noise: auto}"))

    # The whole noise sample is spent on the text answers first.
    await run_load(gw.port, lambda i: get("/api/v1/users/status"), 10, workers=1)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 10)
    await run_load(gw.port, lambda i: get("/api/v1/users/7"), 5, workers=1)
    await wait_until(lambda: stats.compared == 15)

    noise = stats.noise
    assert noise.probes == 10 and noise.whole_body == 10
    assert noise.fields == {} and noise.paths.patterns == []
    assert noise.suppressed == {}
    assert stats.fields[("body", "$.email")].count == 5
    assert stats.fields[("body", "$")].count == 10
    assert stats.agreed == 0
    report = stats.detail(active=True)
    assert report["noise"]["whole_body"] == 10 and report["noise"]["fields"] == []
    text = format_diffs(report)
    assert "10 repeated pairs differed as whole bodies" in text
    assert "$.email" in text and "none learned so far" in text


@ensure
async def test_post_is_not_mirrored_unless_listed(services, gateway):
    primary = services(lambda seen: json_reply({"ok": True}))
    shadow = services(lambda seen: json_reply({"ok": True}))
    gw = gateway(rules(primary, shadow, "      percent: 100"))

    result = await run_load(gw.port, lambda i: post("/api/v1/users", b"x" * 50), 10)
    stats = stats_of(gw)

    assert {r.status for r in result.replies} == {200}
    assert len(primary.seen) == 10
    assert shadow.seen == []
    assert stats.skipped == {"method": 10}
    assert stats.mirrored == 0


@ensure
async def test_post_is_mirrored_with_its_body_when_listed(services, gateway):
    primary = services(lambda seen: json_reply({"len": len(seen["body"])}))
    shadow = services(lambda seen: json_reply({"len": len(seen["body"])}))
    gw = gateway(rules(primary, shadow, "      methods: [GET, POST]"))

    body = bytes(range(256)) * 8
    plain = await run_load(gw.port, lambda i: post("/api/v1/users", body), 5)
    chunked = await run_load(gw.port, lambda i: post("/api/v1/users", body, True), 5)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 10)

    assert {r.status for r in plain.replies + chunked.replies} == {200}
    copies = shadow.copies()
    assert len(copies) == 10
    assert all(c["method"] == "POST" and c["body"] == body for c in copies)
    assert all(c["headers"]["content-length"] == str(len(body)) for c in copies)
    assert all(c["headers"]["content-type"] == "text/plain" for c in copies)
    assert stats.agreed == 10


@ensure
async def test_a_request_over_max_body_is_skipped_and_counted(services, gateway):
    primary = services(lambda seen: json_reply({"len": len(seen["body"])}))
    shadow = services(lambda seen: json_reply({"len": len(seen["body"])}))
    gw = gateway(rules(primary, shadow, "      methods: [POST]\n      max_body: 1KiB"))

    small = await run_load(gw.port, lambda i: post("/api/v1/users", b"s" * 1024), 3)
    large = await run_load(gw.port, lambda i: post("/api/v1/users", b"L" * 1025), 4)
    chunked = await run_load(
        gw.port, lambda i: post("/api/v1/users", b"C" * 3000, chunked=True), 4
    )
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 3)

    replies = small.replies + large.replies + chunked.replies
    assert len(replies) == 11 and {r.status for r in replies} == {200}
    assert [len(s["body"]) for s in primary.seen].count(3000) == 4
    assert len(shadow.seen) == 3
    assert all(len(c["body"]) == 1024 for c in shadow.copies())
    assert stats.skipped == {"too_large": 8}


@pytest.mark.parametrize("behaviour", ["hang", "reset", "trickle"])
@ensure
async def test_a_failing_shadow_never_touches_client_responses(
    services, gateway, behaviour
):
    primary = services(lambda seen: json_reply({"uri": seen["uri"]}))
    shadow = services(lambda seen: behaviour)
    block = "      timeout: 300ms\n      max_in_flight: 5"
    gw = gateway(rules(primary, shadow, block))

    result = await run_load(
        gw.port, lambda i: get(f"/api/v1/users/{i}"), 300, workers=8
    )
    stats = stats_of(gw)
    await wait_until(lambda: stats.in_flight == 0)

    assert result.failures == []
    assert len(result.replies) == 300
    for reply in result.replies:
        assert reply.status == 200
        assert reply.body == json_reply({"uri": f"/api/v1/users/{reply.index}"})[2]  # type: ignore[index]
    assert stats.compared == 0
    assert stats.mirrored + stats.dropped == 300
    failed = stats.timeouts + sum(stats.errors.values())
    assert failed == stats.mirrored
    if behaviour == "reset":
        assert stats.errors == {"closed": stats.mirrored}
    else:
        assert stats.timeouts == stats.mirrored


@ensure
async def test_max_in_flight_drops_are_counted(services, gateway):
    primary = services(lambda seen: json_reply({"ok": 1}))
    shadow = services(lambda seen: "hang")
    gw = gateway(rules(primary, shadow, "      timeout: 10s\n      max_in_flight: 3"))

    result = await run_load(gw.port, lambda i: get("/api/v1/users"), 50, workers=4)
    stats = stats_of(gw)

    assert {r.status for r in result.replies} == {200}
    assert stats.in_flight == 3
    assert stats.mirrored == 3
    assert stats.dropped == 47
    await wait_until(lambda: len(shadow.seen) == 3)
    for request in shadow.resource.held:
        request.transport.abortConnection()
    await wait_until(lambda: stats.in_flight == 0)
    assert stats.errors == {"closed": 3}


@ensure
async def test_a_shadow_500_is_a_status_difference(services, gateway):
    primary = services(lambda seen: json_reply(USER))
    shadow = services(lambda seen: json_reply({"error": "boom"}, status=500))
    gw = gateway(rules(primary, shadow, "      percent: 100"))

    result = await run_load(gw.port, lambda i: get("/api/v1/users"), 10)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 10)

    assert {r.status for r in result.replies} == {200}
    assert list(stats.fields) == [("status", "status")]
    assert stats.kinds["status"] == 10
    assert stats.fields[("status", "status")].example["shadow"] == "500"


@ensure
async def test_compared_headers_are_reported_by_name(services, gateway):
    primary = services(lambda seen: json_reply(USER, **{"X-Version": "1"}))
    shadow = services(lambda seen: json_reply(USER, **{"X-Version": "2"}))
    block = "      compare: {headers: [content-type, x-version]}"
    gw = gateway(rules(primary, shadow, block))

    await run_load(gw.port, lambda i: get("/api/v1/users"), 5)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 5)

    assert list(stats.fields) == [("header", "x-version")]
    assert stats.kinds == {"status": 0, "header": 5, "body": 0}


@ensure
async def test_no_copy_when_the_primary_is_already_the_shadow_upstream(
    services, gateway
):
    monolith = services(lambda seen: json_reply({"from": "monolith"}))
    users = services(lambda seen: json_reply({"from": "users"}))
    route = (
        "    split:\n"
        "      - {to: monolith, weight: 50}\n"
        "      - {to: users, weight: 50}\n"
    )
    text = rules(monolith, users, "      percent: 100").replace(
        "    to: monolith\n", route
    )
    gw = gateway(text)

    result = await run_load(gw.port, lambda i: get("/api/v1/users"), 200)
    stats = stats_of(gw)
    await wait_until(lambda: stats.in_flight == 0)

    served_by_users = sum(r.body == b'{"from":"users"}' for r in result.replies)
    assert 0 < served_by_users < 200
    assert stats.skipped == {"same_upstream": served_by_users}
    assert len(users.copies()) == 200 - served_by_users
    assert len(users.originals()) == served_by_users
    assert monolith.copies() == []


@ensure
async def test_legacy_xml_is_compared_with_new_json_after_rewrite(services, gateway):
    legacy = b"<?xml version='1.0'?><user><id>7</id><name>Ann</name></user>"
    primary = services(lambda seen: (200, {"Content-Type": "application/xml"}, legacy))

    def new_service(seen: Seen) -> Reply:
        name = "Ann" if seen["uri"].endswith("/7") else "Bob"
        return json_reply({"user": {"id": 7, "name": name}})

    shadow = services(new_service)
    block = "      rewrite: {prefix: /api/v1/users, to: /api/v2/users}"
    gw = gateway(rules(primary, shadow, block))

    await run_load(gw.port, lambda i: get("/api/v1/users/7"), 4)
    await run_load(gw.port, lambda i: get("/api/v1/users/8"), 3)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 7)

    assert {c["uri"] for c in shadow.copies()} == {"/api/v2/users/7", "/api/v2/users/8"}
    assert stats.agreed == 4
    assert list(stats.fields) == [("body", "$.user.name")]
    assert stats.fields[("body", "$.user.name")].example["shadow"] == '"Bob"'


@ensure
async def test_samples_redact_credentials(services, gateway):
    primary = services(
        lambda seen: json_reply({"v": 1}, **{"Set-Cookie": "sid=primary-secret"})
    )
    shadow = services(lambda seen: json_reply({"v": 2}))
    gw = gateway(rules(primary, shadow, "      percent: 100"))

    headers = {
        "Authorization": "Bearer top-secret",
        "Cookie": "sid=cookie-secret",
        "X-Api-Key": "key-secret",
        "X-Trace": "visible",
    }
    await run_load(
        gw.port, lambda i: get("/api/v1/users?token=query-secret&q=ok", headers), 1
    )
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 1)

    sample = stats.samples[-1]
    text = repr(sample)
    for secret in ("top-secret", "cookie-secret", "key-secret", "query-secret"):
        assert secret not in text
    assert "primary-secret" not in text
    request_headers = dict(map(tuple, sample["request"]["headers"]))
    assert request_headers["Authorization"] == "[redacted]"
    assert request_headers["X-Trace"] == "visible"
    assert sample["request"]["target"] == "/api/v1/users?token=[redacted]&q=ok"
    # The shadow itself still received the client's credentials.
    assert shadow.copies()[0]["headers"]["authorization"] == "Bearer top-secret"


@ensure
async def test_counts_survive_a_reload(services, gateway):
    primary = services(lambda seen: json_reply(USER))
    shadow = services(lambda seen: json_reply(USER))
    gw = gateway(rules(primary, shadow, "      percent: 100"))

    await run_load(gw.port, lambda i: get("/api/v1/users"), 10)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 10)
    gw.rules_path.write_text(
        gw.rules_path.read_text().replace(
            "percent: 100", "percent: 100.0\n      timeout: 2s"
        )
    )
    assert gw.server.reload().ok
    await run_load(gw.port, lambda i: get("/api/v1/users"), 10)
    await wait_until(lambda: stats.compared == 20)

    assert stats_of(gw) is stats
    assert stats.config is not None and stats.config.timeout == 2.0
    assert stats.agreed == 20


@ensure
async def test_sampling_follows_percent(services, gateway):
    primary = services(lambda seen: json_reply({"ok": 1}))
    shadow = services(lambda seen: json_reply({"ok": 1}))
    gw = gateway(rules(primary, shadow, "      percent: 20"))

    await run_load(gw.port, lambda i: get("/api/v1/users"), 2000, workers=8)
    stats = stats_of(gw)
    await wait_until(lambda: stats.in_flight == 0)

    assert 300 <= stats.mirrored <= 500
    assert len(shadow.seen) == stats.mirrored


class _SlowGate:
    """Lets every request in, a little later: the body arrives before the tap."""

    def check(self, exchange):  # type: ignore[no-untyped-def]
        from twisted.internet import defer, reactor

        from strangler.proxy.hooks import Verdict

        decided: defer.Deferred[Verdict] = defer.Deferred()
        reactor.callLater(0.05, decided.callback, Verdict(allowed=True))
        return decided

    def close(self) -> None:
        """Nothing to release."""


@ensure
async def test_a_body_read_while_an_async_gate_decides_is_still_copied(
    services, gateway
):
    primary = services(lambda seen: json_reply({"len": len(seen["body"])}))
    shadow = services(lambda seen: json_reply({"len": len(seen["body"])}))
    gw = gateway(rules(primary, shadow, "      methods: [POST]"))
    gw.server.gateway.state.gate = _SlowGate()

    body = b"b" * 5000
    plain = await run_load(gw.port, lambda i: post("/api/v1/users", body), 3)
    chunked = await run_load(gw.port, lambda i: post("/api/v1/users", body, True), 3)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 6)

    assert {r.status for r in plain.replies + chunked.replies} == {200}
    assert [c["body"] for c in shadow.copies()] == [body] * 6
    assert stats.agreed == 6


@ensure
async def test_noise_learning_never_repeats_a_write_to_the_primary(services, gateway):
    primary = services(lambda seen: json_reply({"n": len(primary.seen)}))
    shadow = services(lambda seen: json_reply({"n": 0}))
    gw = gateway(
        rules(primary, shadow, "      methods: [POST]\n      compare: {noise: auto}")
    )

    await run_load(gw.port, lambda i: post("/api/v1/users", b"order"), 15)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 15)

    assert len(primary.seen) == 15 and primary.copies() == []
    assert len(shadow.copies()) == 15
    assert stats.noise.probes == 0


@ensure
async def test_pairs_are_compared_when_the_primary_answers_last(services, gateway):
    primary = services(lambda seen: (0.05, json_reply(USER)))
    shadow = services(lambda seen: json_reply({**USER, "name": "Bo"}))
    gw = gateway(rules(primary, shadow, "      percent: 100"))

    await run_load(gw.port, lambda i: get("/api/v1/users"), 8, workers=4)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 8)

    assert stats.fields[("body", "$.name")].count == 8


@ensure
async def test_the_shadow_transform_converts_the_copy_and_its_answer(services, gateway):
    legacy = b"<user><id>7</id><name>Ann</name></user>"
    primary = services(lambda seen: (200, {"Content-Type": "application/xml"}, legacy))
    shadow = services(lambda seen: json_reply({"user": {"id": 7, "name": "Ann"}}))
    block = (
        "      methods: [POST]\n"
        "      transform: {request: xml_to_json, response: json_to_xml}"
    )
    gw = gateway(rules(primary, shadow, block))

    xml = b"<user><name>Ann</name></user>"
    request = (
        b"POST /api/v1/users HTTP/1.1\r\nHost: g\r\nContent-Type: application/xml\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(xml), xml)
    )
    result = await run_load(gw.port, lambda i: request, 3)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 3)

    assert [r.body for r in result.replies] == [legacy] * 3
    assert [s["body"] for s in primary.seen] == [xml] * 3
    copy = shadow.copies()[0]
    assert copy["headers"]["content-type"] == "application/json"
    assert orjson.loads(copy["body"]) == {"user": {"name": "Ann"}}
    assert stats.agreed == 3


def _converting_rules(primary, shadow) -> str:  # type: ignore[no-untyped-def]
    """The route converts the legacy XML answer to JSON for its clients."""
    return rules(primary, shadow, "      percent: 100").replace(
        "    to: monolith\n",
        "    to: monolith\n    transform: {response: xml_to_json}\n",
    )


LEGACY_USER = b"<?xml version='1.0'?><user id='7'><name>Ann</name><age>41</age></user>"
CONVERTED_USER = {"user": {"@id": 7, "name": "Ann", "age": 41}}


@ensure
async def test_the_primary_is_compared_as_the_route_transform_delivered_it(
    services, gateway
):
    primary = services(
        lambda seen: (200, {"Content-Type": "application/xml"}, LEGACY_USER)
    )
    shadow = services(lambda seen: json_reply(CONVERTED_USER))
    gw = gateway(_converting_rules(primary, shadow))

    result = await run_load(gw.port, lambda i: get(f"/api/v1/users/{i}"), 10)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 10)

    assert {orjson.loads(r.body) == CONVERTED_USER for r in result.replies} == {True}
    assert stats.agreed == 10 and stats.agreement() == 1.0
    assert stats.fields == {}


@ensure
async def test_a_field_the_shadow_gets_wrong_after_the_route_transform_is_named(
    services, gateway
):
    primary = services(
        lambda seen: (200, {"Content-Type": "application/xml"}, LEGACY_USER)
    )
    wrong = {"user": {**CONVERTED_USER["user"], "age": "41"}}
    shadow = services(lambda seen: json_reply(wrong))
    gw = gateway(_converting_rules(primary, shadow))

    await run_load(gw.port, lambda i: get("/api/v1/users/7"), 5)
    stats = stats_of(gw)
    await wait_until(lambda: stats.compared == 5)

    assert stats.agreed == 0
    assert list(stats.fields) == [("body", "$.user.age")]
    example = stats.fields[("body", "$.user.age")].example
    assert (example["where"], example["primary"], example["shadow"]) == (
        "$.user.age",
        "41",
        '"41"',
    )
    # The sample shows the primary's answer as the client got it: JSON.
    sample = stats.samples[-1]["primary"]
    assert orjson.loads(sample["body"]) == CONVERTED_USER
    assert dict(map(tuple, sample["headers"]))["Content-Type"] == "application/json"
