"""Shadow results as JSON, Prometheus metrics and the `strangler diffs` report.

The admin API of this tree does not mount `/shadow` yet, so the command is
run as a subprocess against a loopback listener that serves exactly what
`strangler.shadow.admin` produces for a real gateway, behind a bearer token.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest_twisted
from load import get, run_load
from openapi_schema_validator import OAS31Validator, validate
from openapi_spec_validator import validate as validate_spec
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry
from shadow_support import (
    json_reply,
    rules,
    services_fixture,
    wait_until,
)
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web import resource, server

from strangler.admin.client import format_status
from strangler.shadow.admin import ShadowCollector, shadow_route, shadow_summary
from strangler.shadow.cli import format_diffs
from strangler.shadow.schema import OPENAPI_PATHS, OPENAPI_SCHEMAS

ensure = pytest_twisted.ensureDeferred
services = services_fixture()
TOKEN = "shadow-test-token"
ROOT = Path(__file__).resolve().parent.parent


async def _shadowed_gateway(services, gateway):  # type: ignore[no-untyped-def]
    """A gateway whose shadow disagrees on one field and has learned one noise field."""
    clock = itertools.count()

    def primary_answer(seen: Any) -> Any:
        return json_reply({"user": {"id": 7, "email": "a@x"}, "at": next(clock)})

    def shadow_answer(seen: Any) -> Any:
        return json_reply({"user": {"id": 7, "email": "A@x"}, "at": -1})

    primary, shadow = services(primary_answer), services(shadow_answer)
    block = "      compare: {noise: auto}\n      methods: [GET]"
    gw = gateway(rules(primary, shadow, block))
    await run_load(gw.port, lambda i: get(f"/api/v1/users/{i}"), 12, workers=1)
    stats = gw.server.gateway.shadows.routes["users-v1"]
    await wait_until(lambda: stats.compared == 12)
    return gw


def _document() -> dict[str, Any]:
    from strangler.admin.openapi import openapi_document

    document = openapi_document()
    document["paths"].update(OPENAPI_PATHS)
    document["components"]["schemas"].update(OPENAPI_SCHEMAS)
    return document


def _check(data: Any, schema_name: str) -> None:
    document = _document()
    schema = {"$ref": f"#/components/schemas/{schema_name}"}
    validate(data, {**schema, "components": document["components"]}, cls=OAS31Validator)


def test_the_openapi_fragment_fits_the_admin_document():
    validate_spec(_document())


@ensure
async def test_json_views_report_agreement_fields_noise_and_samples(services, gateway):
    gw = await _shadowed_gateway(services, gateway)

    summary = shadow_summary(gw.server)
    detail = shadow_route(gw.server, "users-v1")

    _check(summary, "ShadowList")
    _check(detail, "ShadowRoute")
    (line,) = summary["routes"]
    assert line["route"] == "users-v1" and line["active"] is True
    assert (line["compared"], line["agreed"], line["agreement"]) == (12, 0, 0.0)
    assert line["top_field"] == "$.user.email"
    assert detail is not None
    assert [(f["field"], f["count"]) for f in detail["fields"]] == [
        ("$.user.email", 12)
    ]
    assert detail["fields"][0]["example"]["target"] == "/api/v1/users/0"
    assert [n["field"] for n in detail["noise"]["fields"]] == ["$.at"]
    assert detail["noise"]["fields"][0]["suppressed"] == 12
    assert len(detail["samples"]) == 12
    assert detail["samples"][0]["request"]["target"] == "/api/v1/users/11"
    assert shadow_route(gw.server, "nope") is None


@ensure
async def test_a_removed_shadow_keeps_its_history_as_inactive(services, gateway):
    gw = await _shadowed_gateway(services, gateway)
    text = gw.rules_path.read_text()
    gw.rules_path.write_text(text[: text.index("    shadow:")])
    assert gw.server.reload().ok

    (line,) = shadow_summary(gw.server)["routes"]
    assert line["active"] is False and line["compared"] == 12


@ensure
async def test_prometheus_families_carry_the_counts(services, gateway):
    gw = await _shadowed_gateway(services, gateway)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShadowCollector(gw.server.gateway.shadows))

    text = generate_latest(registry).decode()

    assert 'strangler_shadow_compared_total{route="users-v1"} 12.0' in text
    assert 'strangler_shadow_agreed_total{route="users-v1"} 0.0' in text
    assert (
        'strangler_shadow_field_differences_total{field="$.user.email",kind="body",'
        'route="users-v1"} 12.0'
    ) in text
    assert 'strangler_shadow_agreement_ratio{route="users-v1"} 0.0' in text
    assert 'strangler_shadow_noise_fields{route="users-v1"} 1.0' in text
    assert (
        'strangler_shadow_errors_total{reason="timeout",route="users-v1"} 0.0' in text
    )


class _ShadowEndpoints(resource.Resource):
    """`GET /shadow/{route}` as the admin API is to serve it, token and all."""

    isLeaf = True

    def __init__(self, gateway_server: Any) -> None:
        super().__init__()
        self.gateway_server = gateway_server

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        if request.getHeader(b"authorization") != f"Bearer {TOKEN}".encode():
            request.setResponseCode(401)
            return orjson.dumps({"error": "unauthorized", "message": "bad token"})
        parts = [p.decode() for p in request.postpath]
        data = shadow_route(self.gateway_server, parts[1]) if len(parts) == 2 else None
        if data is None:
            request.setResponseCode(404)
            return orjson.dumps({"error": "not_found", "message": "no such shadow"})
        return orjson.dumps(data)


async def _diffs(*args: str, token: str = TOKEN) -> tuple[int, str, str]:
    env = {**os.environ, "STRANGLER_ADMIN_TOKEN": token}
    env.pop("STRANGLER_ADMIN_URL", None)
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        ["-m", "strangler.cli", "diffs", *args],
        env=env,
        path=str(ROOT),
    )
    return code, out.decode(), err.decode()


@ensure
async def test_strangler_diffs_prints_agreement_top_fields_and_noise(services, gateway):
    gw = await _shadowed_gateway(services, gateway)
    site = server.Site(_ShadowEndpoints(gw.server))
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    admin = f"http://127.0.0.1:{port.getHost().port}"
    try:
        code, out, err = await _diffs("users-v1", "--admin", admin)
        as_json = await _diffs("users-v1", "--admin", admin, "--json")
        unknown = await _diffs("nope", "--admin", admin)
        refused = await _diffs("users-v1", "--admin", admin, token="wrong")
    finally:
        await port.stopListening()

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "route users-v1: shadow to users, 100% of GET"
    assert lines[1] == "agreement: 0.0% (0 of 12 compared pairs agree)"
    (row,) = [line for line in lines if "$.user.email" in line]
    assert row.split()[:3] == ["12", "body", "$.user.email"]
    assert 'primary "a@x" / shadow "A@x"' in row
    assert "GET /api/v1/users/0" in row
    (noise_row,) = [line for line in lines if line.startswith("$.at")]
    assert noise_row.split() == ["$.at", "body", "10", "12"]

    assert as_json[0] == 0
    assert orjson.loads(as_json[1])["compared"] == 12
    assert unknown[0] == 1 and "no such shadow (HTTP 404)" in unknown[2]
    assert refused[0] == 1 and "refused the token" in refused[2]


@ensure
async def test_strangler_diffs_says_when_no_gateway_answers():
    probe = reactor.listenTCP(
        0, server.Site(resource.Resource()), interface="127.0.0.1"
    )
    free = probe.getHost().port
    await probe.stopListening()

    code, out, err = await _diffs("users-v1", "--admin", f"http://127.0.0.1:{free}")
    bad = await _diffs("users-v1", "--admin", "ftp://nowhere")

    assert code == 1 and out == ""
    assert "connection refused" in err
    assert bad[0] == 2 and "expected the admin API's base URL" in bad[2]


def test_the_report_of_a_route_with_nothing_compared_yet():
    report = {
        "route": "r",
        "active": True,
        "settings": {"to": "new", "percent": 5.0, "methods": ["GET", "HEAD"]},
        "compared": 0,
        "agreed": 0,
        "agreement": None,
        "mirrored": 0,
        "errors": 2,
        "timeouts": 3,
        "skipped": 0,
        "dropped": 2,
        "in_flight": 1,
        "differences": {"status": 0, "header": 0, "body": 0},
        "ignored": 0,
        "fields": [],
        "noise": {"mode": "off"},
        "error_reasons": {"connect": 2},
        "skipped_reasons": {"method": 4},
    }

    text = format_diffs(report)

    assert text.splitlines()[:2] == [
        "route r: shadow to new, 5% of GET, HEAD",
        "agreement: no pairs compared yet",
    ]
    assert "No differing fields." in text
    # The heading's error count and the reasons below it are the same errors;
    # timeouts are counted apart in both places, never inside "errors".
    assert "copied 0, shadow errors 2, timeouts 3," in text
    (reasons,) = [line for line in text.splitlines() if "by reason" in line]
    assert reasons == "shadow errors by reason: connect 2"
    assert "not copied: method 4" in text


REDACT_KEY = "innocent-key-0123456789abcdef"


def _redacting_rules(primary: Any, shadow: Any, redact: str) -> str:
    return f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0, token: {TOKEN}}}
upstreams:
  monolith: {{targets: [{primary.url}]}}
  users: {{targets: [{shadow.url}]}}
default: monolith
consumers:
  mobile: {{api_keys: [{REDACT_KEY}]}}
auth:
  default: api_key
  api_key: {{header: X-Client, query: client}}
routes:
  - name: users-v1
    match: {{path: /api/v1/users}}
    to: monolith
    shadow: {{to: users, redact: [{redact}]}}
"""


async def _sample(gw: Any, client: Any, count: int) -> dict[str, Any]:
    stats = gw.server.gateway.shadows.routes["users-v1"]
    await wait_until(lambda: stats.compared == count)
    admin = f"http://127.0.0.1:{gw.server.admin_port.getHost().port}"
    response = await client.get(
        f"{admin}/shadow/users-v1", headers={"Authorization": [f"Bearer {TOKEN}"]}
    )
    assert response.code == 200
    report = orjson.loads(await response.content())
    _check(report, "ShadowRoute")
    return report


@ensure
async def test_samples_redact_the_api_key_header_and_configured_names(
    services, gateway, client
):
    primary = services(lambda seen: json_reply({"v": 1, "tenant": "acme"}))
    shadow = services(lambda seen: json_reply({"v": 2, "tenant": "acme"}))
    gw = gateway(_redacting_rules(primary, shadow, "X-Tenant"))
    gw.server.start_admin()
    headers = {
        "X-Client": REDACT_KEY,
        "X-Tenant": "tenant-secret",
        "X-Region": "eu-1",
        "X-Trace": "visible",
    }

    await run_load(gw.port, lambda i: get("/api/v1/users?q=1", headers), 1)
    report = await _sample(gw, client, 1)

    (sample,) = report["samples"]
    seen = dict(map(tuple, sample["request"]["headers"]))
    assert seen["X-Client"] == seen["X-Tenant"] == "[redacted]"
    assert seen["X-Region"] == "eu-1" and seen["X-Trace"] == "visible"
    assert REDACT_KEY not in repr(report) and "tenant-secret" not in repr(report)
    assert report["settings"]["redact"] == ["x-tenant"]
    # Only the report hides them: the shadow received what the client sent.
    assert shadow.copies()[0]["headers"]["x-tenant"] == "tenant-secret"

    # A reload changes what new samples hide; the API-key query parameter too.
    gw.rules_path.write_text(_redacting_rules(primary, shadow, "X-Region"))
    assert gw.server.reload().ok
    await run_load(
        gw.port, lambda i: get(f"/api/v1/users?client={REDACT_KEY}&q=1", headers), 1
    )
    report = await _sample(gw, client, 2)

    newest = report["samples"][0]
    seen = dict(map(tuple, newest["request"]["headers"]))
    assert seen["X-Region"] == "[redacted]" and seen["X-Tenant"] == "tenant-secret"
    assert seen["X-Client"] == "[redacted]"
    assert newest["request"]["target"] == "/api/v1/users?client=[redacted]&q=1"
    assert REDACT_KEY not in repr(report)


async def _status(admin: str) -> tuple[int, str, str]:
    env = {**os.environ, "STRANGLER_ADMIN_TOKEN": TOKEN}
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        ["-m", "strangler.cli", "status", "--admin", admin],
        env=env,
        path=str(ROOT),
    )
    return code, out.decode(), err.decode()


@ensure
async def test_strangler_status_and_the_dashboard_show_shadow_agreement(
    services, gateway, client
):
    answers = itertools.count()
    primary = services(lambda seen: json_reply({"id": 1}))
    # Three of four answers agree.
    shadow = services(lambda seen: json_reply({"id": 1 if next(answers) % 4 else 2}))
    text = rules(primary, shadow, "      percent: 100").replace(
        "listen: 127.0.0.1:0\n",
        f"listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0, token: {TOKEN}}}\n",
    )
    gw = gateway(text)
    gw.server.start_admin()
    admin = f"http://127.0.0.1:{gw.server.admin_port.getHost().port}"

    await run_load(gw.port, lambda i: get("/api/v1/users"), 8, workers=1)
    stats = gw.server.gateway.shadows.routes["users-v1"]
    await wait_until(lambda: stats.compared == 8)
    code, out, err = await _status(admin)
    page = await client.get(f"{admin}/dashboard")
    html = (await page.content()).decode()

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[1].split()[5] == "SHADOW"
    (route,) = [line for line in lines if line.startswith("users-v1 ")]
    assert "users 75.0% of 8" in route
    (default,) = [line for line in lines if line.startswith("default ")]
    assert default.split()[5] == "-"
    # The dashboard reads the same summary and prints the agreement from it.
    assert 'getJson("shadow")' in html
    assert '" agree ("' in html and "summary.agreement" in html


def test_the_status_table_says_when_a_shadow_has_compared_nothing():
    route = {
        "name": "r",
        "split": [{"upstream": "a", "weight": 100, "traffic": {"requests": 0}}],
        "source": "rules",
        "sticky": None,
        "match": None,
        "shadow": {"to": "new", "percent": 5},
    }
    reload = {"ok": True, "at": "t", "source": "rules.yaml", "errors": []}
    summary = {"route": "r", "compared": 0, "agreement": None}

    for shadows in (None, [summary]):
        text = format_status([route], [], reload, shadows)
        (row,) = [line for line in text.splitlines() if line.startswith("r ")]
        assert "new (none compared)" in row
