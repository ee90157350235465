"""The admin API's OpenAPI 3.1 document, served at `/openapi.json`.

Written by hand next to the endpoint table in `strangler.admin.api`, and
held to it by the tests: every response the API sends is validated against
these schemas, and every path and method here is probed on a running
gateway. Schemas are closed (`additionalProperties: false`) so a field
added to a response without a word here fails those tests.
"""

from __future__ import annotations

import copy
from typing import Any

from strangler import __version__
from strangler.metrics import STATUS_CLASSES
from strangler.shadow.schema import OPENAPI_PATHS as SHADOW_PATHS
from strangler.shadow.schema import OPENAPI_SCHEMAS as SHADOW_SCHEMAS

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _closed(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An object with exactly these properties, all required."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
        **extra,
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


_ERROR = {"$ref": "#/components/responses/Error"}
_UNAUTHORIZED = {"$ref": "#/components/responses/Unauthorized"}
_ROUTE_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "A route name from the rule file, or `default` for unmatched "
    "requests.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
}
_WEIGHT = {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.01}
_WEIGHTS = {"type": "object", "additionalProperties": _WEIGHT}
_TIME = {"type": "string", "format": "date-time"}
_HTML = {
    "description": "The dashboard: one HTML page with its script and style inline.",
    "content": {"text/html": {"schema": {"type": "string"}}},
}
_PUBLIC: list[dict[str, list[str]]] = []

_SCHEMAS: dict[str, Any] = {
    "Error": _closed(
        {
            "error": {"type": "string", "description": "A stable code, snake_case."},
            "message": {
                "type": "string",
                "description": "What went wrong, for people.",
            },
        }
    ),
    "Health": _closed({"status": {"enum": ["ok", "draining"]}}),
    "Traffic": _closed(
        {
            "requests": {"type": "integer", "minimum": 0},
            "status": _closed(
                {name: {"type": "integer", "minimum": 0} for name in STATUS_CLASSES}
            ),
            "errors": {
                "type": "integer",
                "minimum": 0,
                "description": "Requests no upstream answered (a 502 or 504 "
                "from the gateway).",
            },
            "mean_ms": {"type": "number", "minimum": 0},
        },
        description="What this route sent to this upstream since the gateway started.",
    ),
    "SplitEntry": _closed(
        {
            "upstream": {"type": "string"},
            "weight": {**_WEIGHT, "description": "The share in force now, percent."},
            "rule_weight": {**_WEIGHT, "description": "The share the rule file gives."},
            "traffic": _ref("Traffic"),
        }
    ),
    "HeaderMatch": _closed(
        {"name": {"type": "string"}, "pattern": _nullable({"type": "string"})}
    ),
    "Match": _closed(
        {
            "summary": {"type": "string", "description": "The match on one line."},
            "path": _nullable({"type": "string"}),
            "path_regex": _nullable({"type": "string"}),
            "methods": _nullable({"type": "array", "items": {"type": "string"}}),
            "host": _nullable({"type": "string"}),
            "headers": {"type": "array", "items": _ref("HeaderMatch")},
        }
    ),
    "Sticky": _closed(
        {
            "by": {"enum": ["header", "cookie", "ip", "jwt_claim"]},
            "name": {"type": "string"},
        }
    ),
    "Shadow": _closed(
        {"to": {"type": "string"}, "percent": {"type": "number", "minimum": 0}}
    ),
    "Route": _closed(
        {
            "name": {"type": "string"},
            "line": _nullable({"type": "integer", "minimum": 0}),
            "match": _nullable(_ref("Match")),
            "split": {"type": "array", "items": _ref("SplitEntry"), "minItems": 1},
            "source": {
                "enum": ["rules", "runtime"],
                "description": "Whether the weights come from the rule file or a "
                "runtime change.",
            },
            "set_at": _nullable(_TIME),
            "by": _nullable({"type": "string"}),
            "sticky": _nullable(_ref("Sticky")),
            "shadow": _nullable(_ref("Shadow")),
        },
        description="A route and its split; `default` (match null) takes what "
        "no route matches.",
    ),
    "RouteList": _closed({"routes": {"type": "array", "items": _ref("Route")}}),
    "SplitRequest": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": _WEIGHT,
        "description": "Upstream names to percentages. Unnamed upstreams get 0, "
        "except that a single unnamed one takes the rest.",
        "examples": [{"monolith": 50, "users": 50}, {"users": 25}],
    },
    "SplitResult": _closed(
        {
            "route": {"type": "string"},
            "weights": _WEIGHTS,
            "source": {"enum": ["rules", "runtime"]},
            "set_at": _nullable(_TIME),
            "by": _nullable({"type": "string"}),
        }
    ),
    "Target": _closed(
        {
            "url": {"type": "string"},
            "weight": {"type": "integer", "minimum": 1},
            "active": {"type": "integer", "minimum": 0},
            "available": {
                "type": "boolean",
                "description": "In rotation: healthy and not ejected.",
            },
            "healthy": {
                "type": "boolean",
                "description": "What the active health checks last decided.",
            },
            "ejected": {
                "type": "boolean",
                "description": "Out of rotation for now by outlier ejection.",
            },
            "ejections": {
                "type": "integer",
                "minimum": 0,
                "description": "Times this target was ejected since it was added.",
            },
        }
    ),
    "HealthCheck": _closed(
        {
            "path": {"type": "string"},
            "interval": {"type": "number", "description": "Seconds."},
            "timeout": {"type": "number", "description": "Seconds."},
        }
    ),
    "Upstream": _closed(
        {
            "name": {"type": "string"},
            "balance": {"enum": ["round_robin", "least_conn", "ip_hash", "random"]},
            "health": _nullable(_ref("HealthCheck")),
            "targets": {"type": "array", "items": _ref("Target")},
            "fallbacks": {
                "type": "integer",
                "minimum": 0,
                "description": "Requests this upstream failed (or could not "
                "take) that a `fallback` upstream served instead.",
            },
            "overloaded": {
                "type": "integer",
                "minimum": 0,
                "description": "Requests refused with 503 at once by "
                "`max_connections` and `max_pending`.",
            },
            "retries": {
                "type": "integer",
                "minimum": 0,
                "description": "Requests sent to this upstream again after "
                "an attempt failed.",
            },
            "ejections": {
                "type": "integer",
                "minimum": 0,
                "description": "Outlier ejections of its targets, all told.",
            },
        }
    ),
    "UpstreamList": _closed(
        {"upstreams": {"type": "array", "items": _ref("Upstream")}}
    ),
    "ReloadResult": _closed(
        {
            "ok": {"type": "boolean"},
            "at": _TIME,
            "errors": {"type": "array", "items": {"type": "string"}},
            "source": {"type": "string", "description": "The rule file."},
        }
    ),
}

_PATHS: dict[str, Any] = {
    "/health": {
        "get": {
            "operationId": "getHealth",
            "summary": "Liveness for load balancers; needs no token.",
            "security": _PUBLIC,
            "responses": {
                "200": _json(_ref("Health"), "The gateway is serving."),
                "503": _json(_ref("Health"), "The gateway is draining."),
                "default": _ERROR,
            },
        }
    },
    "/": {
        "get": {
            "operationId": "getDashboardRoot",
            "summary": "The dashboard page (it asks for the token itself).",
            "security": _PUBLIC,
            "responses": {"200": _HTML, "default": _ERROR},
        }
    },
    "/dashboard": {
        "get": {
            "operationId": "getDashboard",
            "summary": "The dashboard page, same as `/`.",
            "security": _PUBLIC,
            "responses": {"200": _HTML, "default": _ERROR},
        }
    },
    "/routes": {
        "get": {
            "operationId": "listRoutes",
            "summary": "Every route in rule-file order, then `default`.",
            "responses": {
                "200": _json(_ref("RouteList"), "The routes."),
                "401": _UNAUTHORIZED,
                "default": _ERROR,
            },
        }
    },
    "/routes/{name}": {
        "parameters": [_ROUTE_NAME],
        "get": {
            "operationId": "getRoute",
            "summary": "One route.",
            "responses": {
                "200": _json(_ref("Route"), "The route."),
                "401": _UNAUTHORIZED,
                "404": _json(_ref("Error"), "No route has that name."),
                "default": _ERROR,
            },
        },
    },
    "/routes/{name}/split": {
        "parameters": [_ROUTE_NAME],
        "post": {
            "operationId": "setSplit",
            "summary": "Change a route's weights now; kept in the state file "
            "until the rule file changes that route's weights.",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("SplitRequest")}},
            },
            "responses": {
                "200": _json(_ref("SplitResult"), "The weights now in force."),
                "400": _json(_ref("Error"), "The body or the weights are not valid."),
                "401": _UNAUTHORIZED,
                "404": _json(_ref("Error"), "No route has that name."),
                "413": _json(_ref("Error"), "The body is too large."),
                "415": _json(_ref("Error"), "The body is not JSON."),
                "default": _ERROR,
            },
        },
    },
    "/upstreams": {
        "get": {
            "operationId": "listUpstreams",
            "summary": "Every upstream and the state of each target.",
            "responses": {
                "200": _json(_ref("UpstreamList"), "The upstreams."),
                "401": _UNAUTHORIZED,
                "default": _ERROR,
            },
        }
    },
    "/reload": {
        "get": {
            "operationId": "getReload",
            "summary": "The last reload attempt.",
            "responses": {
                "200": _json(_ref("ReloadResult"), "The last reload."),
                "401": _UNAUTHORIZED,
                "default": _ERROR,
            },
        },
        "post": {
            "operationId": "reload",
            "summary": "Read the rule file again; a file that does not validate "
            "is refused and the old rules keep serving.",
            "responses": {
                "200": _json(_ref("ReloadResult"), "The outcome, refused or not."),
                "401": _UNAUTHORIZED,
                "default": _ERROR,
            },
        },
    },
    "/metrics": {
        "get": {
            "operationId": "getMetrics",
            "summary": "Prometheus metrics in the text exposition format.",
            "responses": {
                "200": {
                    "description": "Requests, latency, bytes, in-flight, reloads.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": _UNAUTHORIZED,
                "default": _ERROR,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "getOpenapi",
            "summary": "This document.",
            "responses": {
                "200": _json({"type": "object"}, "The OpenAPI document."),
                "401": _UNAUTHORIZED,
                "default": _ERROR,
            },
        }
    },
}

# Migration plans (strangler.migration.admin).

_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
_COUNT = {"type": "integer", "minimum": 0}
_PLAN_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "A plan's name: its `name:` key, else its file name without "
    "`.yaml`.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
}
_ACTION = {
    "name": "action",
    "in": "path",
    "required": True,
    "description": "`pause` freezes the split, `resume` goes on (the step's hold "
    "starts again), `abort` puts the new side back to 0%, `promote` moves the "
    "new side to 100% and ends the plan.",
    "schema": {"enum": ["pause", "resume", "abort", "promote"]},
}
_GATE_NAME = {
    "enum": ["min_requests", "max_error_rate", "max_p99_ratio", "min_shadow_agreement"]
}

_SCHEMAS.update(
    {
        "Gate": _closed(
            {
                "gate": _GATE_NAME,
                "bound": {"type": "number"},
                "value": _nullable({"type": "number"}),
                "status": {
                    "enum": ["pass", "fail", "wait", "skip"],
                    "description": "pass and skip let the plan advance, wait "
                    "holds it for evidence, fail triggers on_fail.",
                },
                "detail": {"type": "string"},
            },
            description="One gate judged on the evidence of the current step.",
        ),
        "Evidence": _closed(
            {
                "route_requests": _COUNT,
                "new_requests": {
                    **_COUNT,
                    "description": "Requests the new side answered or failed "
                    "over to a fallback.",
                },
                "new_failed": {
                    **_COUNT,
                    "description": "5xx answers (gateway errors included) and "
                    "fallbacks of the new side.",
                },
                "gateway_errors": _COUNT,
                "fallbacks": _COUNT,
                "old_requests": _COUNT,
                "new_p99_ms": _nullable({"type": "number", "minimum": 0}),
                "old_p99_ms": _nullable({"type": "number", "minimum": 0}),
                "shadow_compared": _nullable(_COUNT),
                "shadow_agreed": _nullable(_COUNT),
            },
            description="What happened on the route since the step started; "
            "for a `started` event, since the gateway started.",
        ),
        "MigrationPlan": _closed(
            {
                "name": {"type": "string"},
                "route": {"type": "string"},
                "move_to": {"type": "string"},
                "steps": {"type": "array", "items": _PERCENT, "minItems": 1},
                "hold": {"type": "number", "description": "Seconds."},
                "gates": _closed(
                    {
                        "min_requests": _COUNT,
                        "max_error_rate": _nullable(_PERCENT),
                        "max_p99_ratio": _nullable({"type": "number"}),
                        "min_shadow_agreement": _nullable(_PERCENT),
                    }
                ),
                "on_fail": {"enum": ["rollback", "pause"]},
                "source": {"type": "string", "description": "The plan file."},
            }
        ),
        "MigrationEvent": _closed(
            {
                "at": _TIME,
                "event": {
                    "enum": [
                        "started",
                        "advanced",
                        "completed",
                        "rolled_back",
                        "paused",
                        "resumed",
                        "aborted",
                        "promoted",
                    ]
                },
                "from": {**_PERCENT, "description": "The new side's share before."},
                "to": {**_PERCENT, "description": "The new side's share after."},
                "by": {"type": "string", "description": "`plan` or `admin`."},
                "reason": _nullable({"type": "string"}),
                "held_for": _nullable({"type": "number", "description": "Seconds."}),
                "gates": {"type": "array", "items": _ref("Gate")},
                "evidence": _nullable(_ref("Evidence")),
            }
        ),
        "Migration": _closed(
            {
                "name": {"type": "string"},
                "status": {
                    "enum": ["running", "paused", "completed", "rolled_back", "aborted"]
                },
                "reason": _nullable({"type": "string"}),
                "weight": {**_PERCENT, "description": "The new side's share now."},
                "step": _nullable({"type": "integer", "minimum": 1}),
                "started_at": _TIME,
                "step_started_at": _TIME,
                "at_step_seconds": _nullable({"type": "number", "minimum": 0}),
                "gates": {"type": "array", "items": _ref("Gate")},
                "evidence": _nullable(_ref("Evidence")),
                "plan": _ref("MigrationPlan"),
                "history": {"type": "array", "items": _ref("MigrationEvent")},
            },
            description="A plan, where it is, its gates now and how it got there.",
        ),
        "MigrationList": _closed(
            {"migrations": {"type": "array", "items": _ref("Migration")}}
        ),
        "StartMigration": _closed(
            {
                "plan": {"type": "string", "description": "The plan file's text."},
                "source": {
                    "type": "string",
                    "description": "The plan's file name, for errors and the "
                    "default plan name.",
                },
            },
            required=["plan"],
        ),
    }
)

_SCHEMAS.update(SHADOW_SCHEMAS)
_PATHS.update(SHADOW_PATHS)
_PATHS.update(
    {
        "/migrations": {
            "get": {
                "operationId": "listMigrations",
                "summary": "Every migration plan this gateway knows, oldest first.",
                "responses": {
                    "200": _json(_ref("MigrationList"), "The plans."),
                    "401": _UNAUTHORIZED,
                    "default": _ERROR,
                },
            },
            "post": {
                "operationId": "startMigration",
                "summary": "Check a plan against the live rules and start it.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("StartMigration")}},
                },
                "responses": {
                    "201": _json(_ref("Migration"), "The plan, started."),
                    "400": _json(
                        _ref("Error"),
                        "The body or the plan is not valid (every problem, one "
                        "per line, with file:line).",
                    ),
                    "401": _UNAUTHORIZED,
                    "409": _json(
                        _ref("Error"), "A plan of that name or route is running."
                    ),
                    "413": _json(_ref("Error"), "The body is too large."),
                    "415": _json(_ref("Error"), "The body is not JSON."),
                    "503": _json(
                        _ref("Error"),
                        "The plan's progress cannot be saved (state_not_writable).",
                    ),
                    "default": _ERROR,
                },
            },
        },
        "/migrations/{name}": {
            "parameters": [_PLAN_NAME],
            "get": {
                "operationId": "getMigration",
                "summary": "One plan.",
                "responses": {
                    "200": _json(_ref("Migration"), "The plan."),
                    "401": _UNAUTHORIZED,
                    "404": _json(_ref("Error"), "No plan has that name."),
                    "default": _ERROR,
                },
            },
        },
        "/migrations/{name}/{action}": {
            "parameters": [_PLAN_NAME, _ACTION],
            "post": {
                "operationId": "actOnMigration",
                "summary": "Pause, resume, abort or promote a plan.",
                "responses": {
                    "200": _json(_ref("Migration"), "The plan after the action."),
                    "401": _UNAUTHORIZED,
                    "404": _json(_ref("Error"), "No such plan or action."),
                    "409": _json(
                        _ref("Error"), "The plan's state does not allow the action."
                    ),
                    "default": _ERROR,
                },
            },
        },
    }
)


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "strangler admin API",
        "version": __version__,
        "description": "Routes, weights, upstream health, reloads and metrics "
        "of a running strangler gateway. Send `Authorization: Bearer <admin.token>`; "
        "only `/health` and the dashboard page answer without it.",
    },
    "security": [{"bearer": []}],
    "paths": _PATHS,
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": _SCHEMAS,
        "responses": {
            "Error": _json(_ref("Error"), "Any other error."),
            "Unauthorized": {
                **_json(_ref("Error"), "The bearer token is missing or wrong."),
                "headers": {
                    "WWW-Authenticate": {
                        "description": "Always `Bearer` with the realm.",
                        "schema": {"type": "string"},
                    }
                },
            },
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document, safe for a caller to change."""
    return copy.deepcopy(_DOCUMENT)
