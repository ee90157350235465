"""Migration plans through the admin API of a real gateway, against the document."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest_twisted
from openapi_schema_validator import OAS31Validator, validate

from strangler.admin.openapi import openapi_document

ensure = pytest_twisted.ensureDeferred

TOKEN = "secret"


def rules_text(mono: str, users: str) -> str:
    return f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0, token: {TOKEN}}}
upstreams:
  monolith: {{targets: [{mono}]}}
  users: {{targets: [{users}]}}
default: monolith
routes:
  - name: users-v1
    match: {{path: /api/v1/users}}
    split:
      - {{to: monolith, weight: 100}}
      - {{to: users, weight: 0}}
    sticky: {{by: header, name: X-User-Id}}
"""


PLAN = """\
route: users-v1
move_to: users
steps: [5, 50, 100]
hold: 1h
gates: {min_requests: 10, max_error_rate: 1%}
"""


class Admin:
    """Calls the admin API and checks every answer against the OpenAPI document."""

    def __init__(self, gw: Any, client: Any) -> None:
        address = gw.server.start_admin()
        self.url = f"http://127.0.0.1:{address.port}"
        self.client = client
        self.document = openapi_document()
        self.statuses: set[int] = set()

    async def call(
        self, method: str, path: str, body: object = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": [f"Bearer {TOKEN}"]}
        data = None
        if body is not None:
            headers["Content-Type"] = ["application/json"]
            data = orjson.dumps(body)
        response = await self.client.request(
            method, self.url + path, headers=headers, data=data
        )
        payload = orjson.loads(await response.content())
        validate(payload, self._schema(path, method, response.code), cls=OAS31Validator)
        self.statuses.add(response.code)
        return response.code, payload

    def _schema(self, path: str, method: str, status: int) -> dict[str, Any]:
        paths = self.document["paths"]
        item = next(
            (
                paths[template]
                for template in paths
                if re.fullmatch(
                    re.sub(r"\\{[a-z]+\\}", "[^/]+", re.escape(template)), path
                )
            ),
            None,
        )
        assert item is not None, f"{path} is not documented"
        responses = item[method.lower()]["responses"]
        response = responses.get(str(status), responses["default"])
        if "$ref" in response:
            name = response["$ref"].rsplit("/", 1)[1]
            response = self.document["components"]["responses"][name]
        schema = response["content"]["application/json"]["schema"]
        return {**schema, "components": self.document["components"]}


@ensure
async def test_start_watch_and_steer_a_plan_through_the_admin_api(
    backends, gateway, client
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(rules_text(mono.url, users.url))
    admin = Admin(gw, client)

    code, started = await admin.call(
        "POST", "/migrations", {"plan": PLAN, "source": "migrations/users.yaml"}
    )
    assert code == 201
    assert (started["name"], started["status"], started["weight"]) == (
        "users",
        "running",
        5,
    )
    assert started["history"][0]["event"] == "started"
    weights = gw.server.gateway.state.plans["users-v1"].effective_weights()
    assert weights == {"monolith": 95, "users": 5}

    code, listed = await admin.call("GET", "/migrations")
    assert [m["name"] for m in listed["migrations"]] == ["users"]
    code, one = await admin.call("GET", "/migrations/users")
    assert {g["gate"]: g["status"] for g in one["gates"]} == {
        "min_requests": "wait",
        "max_error_rate": "wait",
    }
    assert one["evidence"]["route_requests"] == 0

    code, paused = await admin.call("POST", "/migrations/users/pause")
    assert (code, paused["status"], paused["reason"]) == (
        200,
        "paused",
        "paused by admin",
    )
    code, refused = await admin.call("POST", "/migrations/users/pause")
    assert (code, refused["error"]) == (409, "conflict")
    code, promoted = await admin.call("POST", "/migrations/users/promote")
    assert (promoted["status"], promoted["weight"]) == ("completed", 100)

    progress = orjson.loads(
        (gw.rules_path.with_name("rules.migrations.json")).read_bytes()
    )
    assert progress["migrations"][0]["status"] == "completed"
    assert admin.statuses == {200, 201, 409}


@ensure
async def test_bad_plans_and_unknown_names_are_refused_with_reasons(
    backends, gateway, client
):
    mono, users = backends("monolith"), backends("users")
    gw = gateway(rules_text(mono.url, users.url))
    admin = Admin(gw, client)
    bad = PLAN.replace("move_to: users", "move_to: billing").replace("5, 50", "50, 5")

    code, invalid = await admin.call(
        "POST", "/migrations", {"plan": bad, "source": "p.yaml"}
    )
    assert (code, invalid["error"]) == (400, "invalid_plan")
    assert invalid["message"].splitlines() == [
        "p.yaml:2: move_to: "
        f"{gw.rules_path} has no upstream named 'billing' (its upstreams: "
        "monolith, users)",
        "p.yaml:3: steps[1]: steps must rise: 5% is not above the step before it (50%)",
    ]
    code, body = await admin.call("POST", "/migrations", {"text": PLAN})
    assert (code, body["error"]) == (400, "invalid_body")
    code, body = await admin.call("GET", "/migrations/nope")
    assert (code, body["error"]) == (404, "unknown_migration")
    code, body = await admin.call("POST", "/migrations", {"plan": PLAN})
    assert code == 201
    code, body = await admin.call("POST", "/migrations/plan/skip")
    assert (code, body["error"]) == (404, "unknown_action")
    code, body = await admin.call("POST", "/migrations", {"plan": PLAN})
    assert (code, body["error"]) == (409, "conflict")
    assert "already running" in body["message"]
