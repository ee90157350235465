"""The admin API end to end: a real gateway, real backends, real HTTP calls."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import orjson
import pytest
import pytest_twisted
from openapi_schema_validator import OAS31Validator, validate
from openapi_spec_validator import validate as validate_spec
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from support import RunningGateway, sleep, write_rules
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from strangler.admin.api import ENDPOINTS, MAX_BODY, build_admin_site
from strangler.errors import ConfigError
from strangler.model import Address
from strangler.rules import load_rules
from strangler.runtime_weights import RuntimeWeights, WeightOverride
from strangler.server import GatewayServer

ensure = pytest_twisted.ensureDeferred

TOKEN = "secret"
UNUSED = "http://127.0.0.1:9"
ADMIN = f"admin: {{listen: 127.0.0.1:0, token: {TOKEN}}}"


def rules_text(
    mono: str,
    users: str,
    weights: tuple[int, int] = (50, 50),
    admin: str = ADMIN,
    extra_route: str = "",
) -> str:
    """Two upstreams, a plain route to the new service and a sticky 2-way split."""
    return f"""
listen: 127.0.0.1:0
{admin}
upstreams:
  monolith:
    targets: [{mono}]
  users:
    balance: least_conn
    targets: [{{url: {users}, weight: 2}}]
default: monolith
routes:
  - name: users-v2
    match: {{path: /api/v2/users, methods: [GET]}}
    to: users
  - name: users-v1
    match: {{path: /api/v1/users}}
    split:
      - {{to: monolith, weight: {weights[0]}}}
      - {{to: users, weight: {weights[1]}}}
    sticky: {{by: header, name: X-User-Id}}
    # Shown by the API; the tests send no DELETE, so nothing is mirrored.
    shadow: {{to: users, percent: 10, methods: [DELETE]}}
{extra_route}
"""


class AdminApi:
    """The admin listener of a running gateway, called with treq."""

    def __init__(self, server: GatewayServer, client: Any) -> None:
        server.start_admin()
        self.url = f"http://127.0.0.1:{server.admin_port.getHost().port}"
        self.client = client

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, bytes]:
        """Status, response headers and raw body of one call."""
        sent = {name: [value] for name, value in (headers or {}).items()}
        if token is not None:
            sent["Authorization"] = [f"Bearer {token}"]
        response = await self.client.request(
            method, self.url + path, data=body, headers=sent
        )
        return response.code, response.headers, await response.content()

    async def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        code, headers, raw = await self.call(method, path, **kwargs)
        assert headers.getRawHeaders("content-type") == ["application/json"]
        return code, orjson.loads(raw)

    async def split(self, route: str, weights: object) -> tuple[int, Any]:
        return await self.json(
            "POST",
            f"/routes/{route}/split",
            body=orjson.dumps(weights),
            headers={"Content-Type": "application/json"},
        )


def start(backends: Any, gateway: Any, client: Any, **kwargs: Any) -> tuple[Any, ...]:
    mono, users = backends("monolith"), backends("users")
    gw = gateway(rules_text(mono.url, users.url, **kwargs))
    return mono, users, gw, AdminApi(gw.server, client)


async def served_by(
    client: Any, gw: RunningGateway, path: str, count: int
) -> list[str]:
    """Which backend answered each of `count` requests, each with its own user key."""
    seen = []
    for user in range(count):
        response = await client.get(gw.url + path, headers={"X-User-Id": [f"u{user}"]})
        seen.append(json.loads(await response.content())["served_by"])
    return seen


def route_named(routes: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(route for route in routes if route["name"] == name)


def weights_of(route: dict[str, Any]) -> dict[str, float]:
    return {entry["upstream"]: entry["weight"] for entry in route["split"]}


# The token.


@ensure
async def test_missing_or_wrong_token_gets_401_with_bearer_challenge(
    backends, gateway, client
):
    _, _, _, admin = start(backends, gateway, client)

    attempts = {
        "missing": await admin.call("GET", "/routes", token=None),
        "wrong": await admin.call("GET", "/routes", token="secreT"),
        "empty": await admin.call("GET", "/routes", token=""),
        "basic": await admin.call(
            "GET", "/routes", token=None, headers={"Authorization": "Basic c2VjcmV0"}
        ),
        "unknown path": await admin.call("GET", "/nowhere", token=None),
        "split": await admin.call(
            "POST",
            "/routes/users-v1/split",
            body=b'{"users": 100}',
            token="nope",
            headers={"Content-Type": "application/json"},
        ),
    }

    for code, headers, raw in attempts.values():
        assert code == 401
        assert headers.getRawHeaders("www-authenticate")[0].startswith("Bearer")
        assert orjson.loads(raw)["error"] == "unauthorized"
    code, _, _ = await admin.call("GET", "/routes")
    assert code == 200
    _, route = await admin.json("GET", "/routes/users-v1")
    assert weights_of(route) == {"monolith": 50, "users": 50}


@ensure
async def test_health_answers_without_token(backends, gateway, client):
    _, _, _, admin = start(backends, gateway, client)

    code, body = await admin.json("GET", "/health", token=None)

    assert (code, body) == (200, {"status": "ok"})


@ensure
async def test_token_is_read_from_the_rules_at_request_time(backends, gateway, client):
    mono, users, gw, admin = start(backends, gateway, client)
    gw.rules_path.write_text(
        rules_text(
            mono.url, users.url, admin="admin: {listen: 127.0.0.1:0, token: new}"
        )
    )

    code, result = await admin.json("POST", "/reload")
    assert code == 200
    assert result["ok"] is True

    assert (await admin.call("GET", "/routes"))[0] == 401
    assert (await admin.call("GET", "/routes", token="new"))[0] == 200


def test_non_loopback_admin_without_token_is_refused_by_the_rules(tmp_path):
    path = write_rules(
        tmp_path, rules_text(UNUSED, UNUSED, admin="admin: {listen: 0.0.0.0:0}")
    )

    with pytest.raises(ConfigError) as refused:
        load_rules(path)

    (problem,) = refused.value.problems
    assert (problem.line, problem.key) == (3, "admin.token")
    assert "non-loopback 0.0.0.0:0 needs a token" in problem.message


@ensure
async def test_non_loopback_admin_override_without_token_is_refused_before_binding(
    tmp_path,
):
    text = rules_text(UNUSED, UNUSED, admin="admin:\n  listen: 127.0.0.1:0\n")
    rules = load_rules(write_rules(tmp_path, text))
    server = GatewayServer(
        rules, reactor, load_rules, admin_override=Address("0.0.0.0", 0)
    )
    try:
        with pytest.raises(ConfigError, match="needs a token") as refused:
            server.start_admin()
        assert server.admin_port is None
    finally:
        await server.stop(drain_timeout=0)
    (problem,) = refused.value.problems
    assert str(problem).startswith(f"{rules.source}:4: admin.token: ")


@ensure
async def test_without_token_only_loopback_host_names_are_answered(
    backends, gateway, client
):
    _, _, _, admin = start(
        backends, gateway, client, admin="admin: {listen: 127.0.0.1:0}"
    )

    plain, _, _ = await admin.call("GET", "/routes", token=None)
    named, _, _ = await admin.call(
        "GET", "/routes", token=None, headers={"Host": "localhost:1"}
    )
    rebound, _, raw = await admin.call(
        "GET", "/routes", token=None, headers={"Host": "attacker.example:8081"}
    )

    assert (plain, named) == (200, 200)
    assert rebound == 403
    assert "attacker.example" in orjson.loads(raw)["message"]


def test_without_token_a_connection_not_over_loopback_is_refused(gateway):
    gw = gateway(rules_text(UNUSED, UNUSED, admin="admin: {listen: 127.0.0.1:0}"))
    site = build_admin_site(gw.server)
    local = DummyRequest([b"routes"])
    remote = DummyRequest([b"routes"])
    remote.getHost = lambda: IPv4Address("TCP", "10.1.2.3", 8081)

    local_body = site.resource.render(local)
    remote_body = site.resource.render(remote)

    assert local.responseCode == 200
    assert [r["name"] for r in orjson.loads(local_body)["routes"]][-1] == "default"
    assert remote.responseCode == 403
    assert "non-loopback 10.1.2.3" in orjson.loads(remote_body)["message"]


# Routes and splits.


@ensure
async def test_routes_show_every_route_with_weights_source_and_traffic(
    backends, gateway, client
):
    _, _, gw, admin = start(backends, gateway, client)
    await served_by(client, gw, "/api/v2/users", 3)
    await served_by(client, gw, "/legacy", 2)
    split_answers = await served_by(client, gw, "/api/v1/users", 12)

    code, body = await admin.json("GET", "/routes")

    assert code == 200
    routes = body["routes"]
    assert [r["name"] for r in routes] == ["users-v2", "users-v1", "default"]
    v1 = route_named(routes, "users-v1")
    assert weights_of(v1) == {"monolith": 50, "users": 50}
    assert [e["rule_weight"] for e in v1["split"]] == [50, 50]
    assert (v1["source"], v1["set_at"], v1["by"]) == ("rules", None, None)
    assert v1["sticky"] == {"by": "header", "name": "X-User-Id"}
    assert v1["shadow"] == {"to": "users", "percent": 10}
    assert v1["match"]["summary"] == "* /api/v1/users"
    traffic = {e["upstream"]: e["traffic"]["requests"] for e in v1["split"]}
    assert traffic == {
        "monolith": split_answers.count("monolith"),
        "users": split_answers.count("users"),
    }
    v2 = route_named(routes, "users-v2")
    assert v2["match"]["methods"] == ["GET"]
    assert v2["split"][0]["traffic"]["requests"] == 3
    assert v2["split"][0]["traffic"]["status"]["2xx"] == 3
    default = route_named(routes, "default")
    assert default["match"] is None
    assert default["split"][0]["upstream"] == "monolith"
    assert default["split"][0]["traffic"]["requests"] == 2


@ensure
async def test_one_route_by_name_and_unknown_route_is_404(backends, gateway, client):
    _, _, _, admin = start(backends, gateway, client)

    code, route = await admin.json("GET", "/routes/users-v2")
    missing, error = await admin.json("GET", "/routes/nope")

    assert code == 200
    assert route["name"] == "users-v2"
    assert weights_of(route) == {"users": 100}
    assert missing == 404
    assert error == {"error": "unknown_route", "message": "no route named 'nope'"}


@ensure
async def test_split_change_moves_real_traffic(backends, gateway, client):
    _, _, gw, admin = start(backends, gateway, client)

    code, result = await admin.split("users-v1", {"users": 100})
    assert code == 200
    assert result["weights"] == {"monolith": 0, "users": 100}
    assert (result["source"], result["by"]) == ("runtime", "admin")
    assert set(await served_by(client, gw, "/api/v1/users", 20)) == {"users"}

    code, result = await admin.split("users-v1", {"users": 0})
    assert code == 200
    assert result["weights"] == {"monolith": 100, "users": 0}
    assert set(await served_by(client, gw, "/api/v1/users", 20)) == {"monolith"}

    code, result = await admin.split("users-v1", {"monolith": 50, "users": 50})
    assert code == 200
    assert (result["source"], result["set_at"]) == ("rules", None)
    assert set(await served_by(client, gw, "/api/v1/users", 40)) == {
        "monolith",
        "users",
    }


INVALID_SPLITS = [
    ("application/json", b'{"users": 150}', 400, "must be 0..100"),
    ("application/json", b'{"users": 12.345}', 400, "steps of 0.01"),
    ("application/json", b'{"nope": 10}', 400, "does not split to 'nope'"),
    ("application/json", b'{"users": "ten"}', 400, "must be a number"),
    ("application/json", b'{"users": 60, "monolith": 60}', 400, "sum to 100"),
    ("application/json", b"{}", 400, "at least one"),
    ("application/json", b"[50, 50]", 400, "expected a JSON object"),
    ("application/json", b'{"users": 5', 400, "not valid JSON"),
    ("text/plain", b'{"users": 5}', 415, "application/json"),
    (None, b'{"users": 5}', 415, "application/json"),
    ("application/json", b" " * (MAX_BODY + 1), 413, "limit"),
]


@pytest.mark.parametrize(("content_type", "body", "status", "message"), INVALID_SPLITS)
@ensure
async def test_invalid_split_is_refused_with_its_reason(
    backends, gateway, client, content_type, body, status, message
):
    _, _, _, admin = start(backends, gateway, client)
    headers = {"Content-Type": content_type} if content_type else {}

    code, error = await admin.json(
        "POST", "/routes/users-v1/split", body=body, headers=headers
    )

    assert code == status
    assert message in error["message"]
    _, route = await admin.json("GET", "/routes/users-v1")
    assert (weights_of(route), route["source"]) == (
        {"monolith": 50, "users": 50},
        "rules",
    )


@ensure
async def test_split_of_unknown_or_single_upstream_route_is_refused(
    backends, gateway, client
):
    _, _, _, admin = start(backends, gateway, client)

    unknown = await admin.split("nope", {"users": 10})
    single = await admin.split("users-v2", {"users": 100})
    default = await admin.split("default", {"monolith": 100})

    assert unknown == (
        404,
        {"error": "unknown_route", "message": "no route named 'nope'"},
    )
    assert single[0] == 400
    assert "single upstream" in single[1]["message"]
    assert default[0] == 400
    assert "no split" in default[1]["message"]


# Runtime weights across restarts and rule edits.


@ensure
async def test_runtime_weights_survive_a_restart(backends, gateway, client):
    _, _, gw, admin = start(backends, gateway, client)
    await admin.split("users-v1", {"monolith": 75, "users": 25})

    saved = json.loads(gw.server.state_path.read_text())
    assert saved["weights"]["users-v1"]["weights"] == {"monolith": 75, "users": 25}

    second = GatewayServer(
        load_rules(gw.rules_path), reactor, load_rules, state_path=gw.server.state_path
    )
    try:
        code, route = await AdminApi(second, client).json("GET", "/routes/users-v1")
    finally:
        await second.stop(drain_timeout=0)
    assert code == 200
    assert weights_of(route) == {"monolith": 75, "users": 25}
    assert (route["source"], route["by"]) == ("runtime", "admin")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", route["set_at"])


@ensure
async def test_reload_reads_runtime_weights_another_process_saved(
    backends, gateway, client
):
    """What SIGHUP does in a worker: the state file is read again with the rules."""
    _, _, gw, admin = start(backends, gateway, client)
    elsewhere = RuntimeWeights(gw.server.state_path)
    base = {"monolith": 50.0, "users": 50.0}
    shifted = {"monolith": 10.0, "users": 90.0}
    elsewhere.set("users-v1", WeightOverride(shifted, base, 1.0, "plan"))

    _, result = await admin.json("POST", "/reload")
    _, route = await admin.json("GET", "/routes/users-v1")

    assert result["ok"] is True
    assert (weights_of(route), route["source"], route["by"]) == (
        shifted,
        "runtime",
        "plan",
    )


@ensure
async def test_rule_file_edit_of_the_split_clears_the_runtime_weights(
    backends, gateway, client
):
    mono, users, gw, admin = start(backends, gateway, client)
    await admin.split("users-v1", {"users": 25})

    elsewhere = "  - name: extra\n    match: {path: /extra}\n    to: monolith\n"
    gw.rules_path.write_text(rules_text(mono.url, users.url, extra_route=elsewhere))
    _, result = await admin.json("POST", "/reload")
    assert result["ok"] is True
    _, kept = await admin.json("GET", "/routes/users-v1")
    assert (weights_of(kept), kept["source"]) == (
        {"monolith": 75, "users": 25},
        "runtime",
    )

    gw.rules_path.write_text(rules_text(mono.url, users.url, weights=(70, 30)))
    _, result = await admin.json("POST", "/reload")
    assert result["ok"] is True
    _, edited = await admin.json("GET", "/routes/users-v1")
    assert (weights_of(edited), edited["source"]) == (
        {"monolith": 70, "users": 30},
        "rules",
    )
    saved = json.loads(gw.server.state_path.read_text())
    assert "users-v1" not in saved["weights"]


@ensure
async def test_refused_reload_is_reported_and_old_rules_keep_serving(
    backends, gateway, client
):
    _, _, gw, admin = start(backends, gateway, client)
    gw.rules_path.write_text("listen: 127.0.0.1:0\nupstreams: {}\ndefault: nowhere\n")

    code, posted = await admin.json("POST", "/reload")
    _, last = await admin.json("GET", "/reload")

    assert code == 200
    assert posted["ok"] is False
    assert posted["errors"]
    assert all(error.startswith(str(gw.rules_path)) for error in posted["errors"])
    assert last == posted
    _, routes = await admin.json("GET", "/routes")
    assert [r["name"] for r in routes["routes"]] == ["users-v2", "users-v1", "default"]


# Upstreams and metrics.


@ensure
async def test_upstreams_show_every_target_and_its_state(backends, gateway, client):
    mono, users, _, admin = start(backends, gateway, client)

    code, body = await admin.json("GET", "/upstreams")

    assert code == 200
    in_rotation = {"healthy": True, "ejected": False, "ejections": 0}
    counters = {"fallbacks": 0, "overloaded": 0, "retries": 0, "ejections": 0}
    assert body["upstreams"] == [
        {
            "name": "monolith",
            "balance": "round_robin",
            "health": None,
            "targets": [
                {"url": mono.url, "weight": 1, "active": 0, "available": True}
                | in_rotation
            ],
        }
        | counters,
        {
            "name": "users",
            "balance": "least_conn",
            "health": None,
            "targets": [
                {"url": users.url, "weight": 2, "active": 0, "available": True}
                | in_rotation
            ],
        }
        | counters,
    ]


@ensure
async def test_metrics_count_requests_by_route_upstream_and_status_class(
    backends, gateway, client
):
    _, _, gw, admin = start(backends, gateway, client)
    for path in ("/api/v2/users/7", "/api/v2/users/8", "/status/404"):
        await client.get(gw.url + path)

    code, headers, raw = await admin.call("GET", "/metrics")

    assert code == 200
    assert headers.getRawHeaders("content-type") == [CONTENT_TYPE_LATEST]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(raw.decode())
        for s in family.samples
    }
    requests = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "strangler_requests_total"
    }
    assert requests == {
        (("route", "users-v2"), ("status_class", "2xx"), ("upstream", "users")): 2,
        (("route", "default"), ("status_class", "4xx"), ("upstream", "monolith")): 1,
    }


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(admin: AdminApi) -> Samples:
    """Every sample of /metrics, by name and sorted labels."""
    code, _, raw = await admin.call("GET", "/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(raw.decode())
        for s in family.samples
    }


def series(samples: Samples, name: str, route: str, upstream: str) -> dict[str, float]:
    """Samples of `name` for one route and upstream, keyed by any other label."""
    found = {}
    for (sample, labels), value in samples.items():
        given = dict(labels)
        where = (given.pop("route", None), given.pop("upstream", None))
        if sample == name and where == (route, upstream):
            found[",".join(given.values())] = value
    return found


@ensure
async def test_metrics_latency_histogram_and_bytes_per_route_and_upstream(
    backends, gateway, client
):
    _, _, gw, admin = start(backends, gateway, client)
    fast = [await client.get(gw.url + f"/api/v2/users/{n}") for n in range(3)]
    fast_bytes = sum([len(await response.content()) for response in fast])
    slow = await client.post(gw.url + "/slow?ms=300", data=b"u" * 1234)
    slow_bytes = len(await slow.content())

    samples = await scrape(admin)

    histogram = "strangler_request_duration_seconds"
    quick = series(samples, f"{histogram}_bucket", "users-v2", "users")
    late = series(samples, f"{histogram}_bucket", "default", "monolith")
    bounds = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25"]
    assert (
        list(quick)
        == list(late)
        == [*bounds, "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"]
    )
    for buckets, count in ((quick, 3), (late, 1)):
        cumulative = list(buckets.values())
        assert cumulative == sorted(cumulative) and cumulative[-1] == count
    # The slow answer took at least 300ms: it is in no bucket up to 0.25s.
    assert [late[bound] for bound in bounds] == [0] * len(bounds)
    assert series(samples, f"{histogram}_count", "users-v2", "users") == {"": 3}
    assert series(samples, f"{histogram}_count", "default", "monolith") == {"": 1}
    assert series(samples, f"{histogram}_sum", "default", "monolith")[""] >= 0.3
    assert series(samples, f"{histogram}_sum", "users-v2", "users")[""] > 0

    received, sent = "strangler_request_bytes_total", "strangler_response_bytes_total"
    assert series(samples, received, "default", "monolith") == {"": 1234}
    assert series(samples, received, "users-v2", "users") == {"": 0}
    assert series(samples, sent, "default", "monolith") == {"": slow_bytes}
    assert series(samples, sent, "users-v2", "users") == {"": fast_bytes}


@ensure
async def test_metrics_in_flight_gauge_rises_while_a_request_runs(
    backends, gateway, client
):
    _, _, gw, admin = start(backends, gateway, client)
    gauge = ("strangler_in_flight_requests", ())

    idle = (await scrape(admin))[gauge]
    running = client.get(gw.url + "/slow?ms=1500")
    during = 0.0
    for _ in range(100):
        during = (await scrape(admin))[gauge]
        if during:
            break
        await sleep(0.02)
    response = await running
    await response.content()
    after = (await scrape(admin))[gauge]

    assert (idle, during, after) == (0, 1, 0)
    assert response.code == 200


@ensure
async def test_metrics_count_reloads_by_outcome(backends, gateway, client):
    _, _, gw, admin = start(backends, gateway, client)
    good = gw.rules_path.read_text()

    _, accepted = await admin.json("POST", "/reload")
    gw.rules_path.write_text(good.replace("weight: 50}", "weight: 40}", 1))
    _, refused = await admin.json("POST", "/reload")
    samples = await scrape(admin)

    assert (accepted["ok"], refused["ok"]) == (True, False)
    reloads = {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "strangler_reloads_total"
    }
    assert reloads == {"ok": 1, "error": 1}


# The OpenAPI document against the real API.


async def _document(admin: AdminApi) -> dict[str, Any]:
    code, document = await admin.json("GET", "/openapi.json")
    assert code == 200
    return document


def _template(document: dict[str, Any], url: str) -> str:
    """The documented path that `url` falls under."""
    for template in document["paths"]:
        pattern = re.sub(r"\\{[a-z]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, url):
            return template
    raise AssertionError(f"{url} is not in the document")


def _schema_for(
    document: dict[str, Any], url: str, method: str, status: int, media: str
) -> dict[str, Any]:
    """The documented schema of one response, with the components it refers to."""
    operation = document["paths"][_template(document, url)].get(method.lower())
    if operation is None:
        # A method the path does not have: the 405 is an ordinary Error.
        assert status == 405
        schema = {"$ref": "#/components/schemas/Error"}
    else:
        responses = operation["responses"]
        response = responses.get(str(status), responses["default"])
        if "$ref" in response:
            name = response["$ref"].rsplit("/", 1)[1]
            response = document["components"]["responses"][name]
        schema = response["content"][media]["schema"]
    return {**schema, "components": document["components"]}


def test_openapi_document_is_valid_openapi_3_1():
    from strangler.admin.openapi import openapi_document

    document = openapi_document()

    validate_spec(document)
    assert document["openapi"] == "3.1.0"


@ensure
async def test_every_response_matches_the_openapi_document(backends, gateway, client):
    _, _, gw, admin = start(backends, gateway, client)
    document = await _document(admin)
    await served_by(client, gw, "/api/v1/users", 4)
    as_json = {"headers": {"Content-Type": "application/json"}}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/routes", {}),
        ("GET", "/routes/users-v1", {}),
        ("GET", "/routes/default", {}),
        ("GET", "/routes/nope", {}),
        ("GET", "/upstreams", {}),
        ("GET", "/reload", {}),
        ("POST", "/reload", {}),
        ("GET", "/health", {"token": None}),
        ("GET", "/routes", {"token": "wrong"}),
        ("DELETE", "/routes", {}),
        ("POST", "/routes/users-v1/split", {**as_json, "body": b'{"users": 12.5}'}),
        ("POST", "/routes/users-v1/split", {**as_json, "body": b'{"users": 101}'}),
        ("POST", "/routes/users-v1/split", {**as_json, "body": b" " * (MAX_BODY + 1)}),
        ("POST", "/routes/users-v1/split", {"body": b"x"}),
        ("POST", "/routes/nope/split", {**as_json, "body": b"{}"}),
        # After the runtime change above, so set_at and by are filled in.
        ("GET", "/routes", {}),
        ("GET", "/routes/users-v1", {}),
    ]

    statuses = set()
    for method, url, options in calls:
        code, headers, raw = await admin.call(method, url, **options)
        media = headers.getRawHeaders("content-type")[0]
        schema = _schema_for(document, url, method, code, media)
        validate(orjson.loads(raw), schema, cls=OAS31Validator)
        statuses.add(code)
    assert statuses == {200, 400, 401, 404, 405, 413, 415}

    gw.rules_path.write_text("upstreams: [")
    code, headers, raw = await admin.call("POST", "/reload")
    refused = orjson.loads(raw)
    assert refused["ok"] is False
    validate(
        refused, _schema_for(document, "/reload", "POST", code, "application/json")
    )

    for path in ("/metrics", "/", "/dashboard", "/openapi.json"):
        code, headers, _ = await admin.call("GET", path)
        media = headers.getRawHeaders("content-type")[0].partition(";")[0]
        responses = document["paths"][path]["get"]["responses"]
        assert code == 200
        assert list(responses["200"]["content"]) == [media]


@ensure
async def test_openapi_document_lists_exactly_the_served_endpoints(
    backends, gateway, client
):
    _, _, _, admin = start(backends, gateway, client)
    document = await _document(admin)
    methods = ("GET", "POST", "PUT", "PATCH", "DELETE")

    for template, item in document["paths"].items():
        url = template.replace("{name}", "users-v1").replace("{route}", "users-v1")
        for method in methods:
            code, headers, body = await admin.call(
                method,
                url,
                body=b'{"users": 10}',
                headers={"Content-Type": "application/json"},
            )
            if method.lower() in item:
                # A 404 about the named thing is fine; one about the path is not.
                assert code != 405, (method, url, code)
                assert not (code == 404 and b"no admin endpoint" in body), (method, url)
            else:
                assert code == 405, (method, url, code)
                assert method not in headers.getRawHeaders("allow")[0]

    for url in ("/nowhere", "/routes/users-v1/other", "/routes/users-v1/split/x"):
        code, _, _ = await admin.call("GET", url)
        assert code == 404, url

    served = {(e.path, m) for e in ENDPOINTS for m in e.handlers}
    documented = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert served == documented


# The dashboard and the error boundary.


@ensure
async def test_dashboard_is_one_self_contained_locked_down_page(
    backends, gateway, client
):
    _, _, _, admin = start(backends, gateway, client)

    pages = [await admin.call("GET", path, token=None) for path in ("/", "/dashboard")]

    code, headers, page = pages[0]
    assert code == 200
    assert pages[1][2] == page
    assert headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    html = page.decode()
    for outside in ("src=", "href=", "<link", "@import", "http://", "https://"):
        assert outside not in html
    assert TOKEN not in html
    assert "Shadow agreement" in html
    assert '"no shadow"' in html
    policy = headers.getRawHeaders("content-security-policy")[0]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy


@ensure
async def test_failure_inside_a_handler_is_a_json_500_without_traceback(
    backends, gateway, client, monkeypatch
):
    _, _, gw, admin = start(backends, gateway, client)

    def broken() -> dict[str, Any]:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(gw.server.gateway.metrics, "summary", broken)
    code, _, raw = await admin.call("GET", "/routes")

    assert code == 500
    assert orjson.loads(raw)["error"] == "internal_error"
    assert b"Traceback" not in raw
    assert b"internal detail" not in raw


@ensure
async def test_unknown_path_is_json_404_and_wrong_method_is_json_405(
    backends, gateway, client
):
    _, _, _, admin = start(backends, gateway, client)

    missing, error = await admin.json("GET", "/routes/users-v1/nothing")
    code, headers, raw = await admin.call("PUT", "/routes/users-v1/split")

    assert (missing, error["error"]) == (404, "not_found")
    assert code == 405
    assert headers.getRawHeaders("allow") == ["POST"]
    assert orjson.loads(raw)["error"] == "method_not_allowed"
