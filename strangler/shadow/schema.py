"""OpenAPI 3.1 pieces describing the shadow endpoints of the admin API.

The admin API's document merges `OPENAPI_PATHS` into its `paths` and
`OPENAPI_SCHEMAS` into `components.schemas`. Schemas are closed, like the
rest of that document, so a field added to `strangler.shadow.stats` without
a word here fails the tests that validate responses against them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPENAPI_PATHS", "OPENAPI_SCHEMAS"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _closed(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_COUNT = {"type": "integer", "minimum": 0}
_TEXT = {"type": "string"}
_COUNTS = {"type": "object", "additionalProperties": _COUNT}
_HEADERS = {
    "type": "array",
    "items": {"type": "array", "items": _TEXT, "minItems": 2, "maxItems": 2},
}
_KIND = {"enum": ["status", "header", "body"]}

_SUMMARY = {
    "route": _TEXT,
    "active": {
        "type": "boolean",
        "description": "Whether the current rules shadow this route; counts "
        "from earlier rules are kept after the shadow is removed.",
    },
    "to": _nullable(_TEXT),
    "percent": _nullable({"type": "number"}),
    "mirrored": _COUNT,
    "compared": _COUNT,
    "agreed": _COUNT,
    "differed": _COUNT,
    "agreement": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "errors": _COUNT,
    "timeouts": _COUNT,
    "skipped": _COUNT,
    "dropped": _COUNT,
    "in_flight": _COUNT,
    "top_field": _nullable(_TEXT),
}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "ShadowSummary": _closed(_SUMMARY),
    "ShadowList": _closed(
        {"routes": {"type": "array", "items": _ref("ShadowSummary")}}
    ),
    "ShadowRoute": _closed(
        {
            **_SUMMARY,
            "settings": _nullable(_ref("ShadowSettings")),
            "differences": _closed(
                {"status": _COUNT, "header": _COUNT, "body": _COUNT}
            ),
            "fields": {"type": "array", "items": _ref("ShadowField")},
            "ignored": _COUNT,
            "error_reasons": _COUNTS,
            "skipped_reasons": _COUNTS,
            "noise": _ref("ShadowNoise"),
            "samples": {"type": "array", "items": _ref("ShadowSample")},
        }
    ),
    "ShadowSettings": _closed(
        {
            "to": _TEXT,
            "percent": {"type": "number"},
            "methods": {"type": "array", "items": _TEXT},
            "timeout_s": {"type": "number"},
            "max_body": _COUNT,
            "max_in_flight": _COUNT,
            "compare": _closed(
                {
                    "ignore": {"type": "array", "items": _TEXT},
                    "headers": {"type": "array", "items": _TEXT},
                    "noise": {"enum": ["auto", "off"]},
                }
            ),
            "redact": {"type": "array", "items": _TEXT},
        }
    ),
    "ShadowField": _closed(
        {
            "kind": _KIND,
            "field": _TEXT,
            "count": _COUNT,
            "example": _nullable(
                _closed(
                    {
                        "where": _TEXT,
                        "primary": _TEXT,
                        "shadow": _TEXT,
                        "request_id": _TEXT,
                        "method": _TEXT,
                        "target": _TEXT,
                    }
                )
            ),
        }
    ),
    "ShadowNoise": _closed(
        {
            "mode": {"enum": ["auto", "off"]},
            "sample_size": _COUNT,
            "probes": _COUNT,
            "learned_from": _COUNT,
            "unusable": _COUNT,
            "whole_body": _COUNT,
            "fields": {
                "type": "array",
                "items": _closed(
                    {
                        "field": _TEXT,
                        "kind": {"enum": ["header", "body"]},
                        "seen": _COUNT,
                        "suppressed": _COUNT,
                    }
                ),
            },
        }
    ),
    "ShadowSample": _closed(
        {
            "request": _closed(
                {
                    "request_id": _TEXT,
                    "method": _TEXT,
                    "target": _TEXT,
                    "headers": _HEADERS,
                }
            ),
            "differences": {
                "type": "array",
                "items": _closed(
                    {
                        "kind": _KIND,
                        "field": _TEXT,
                        "where": _TEXT,
                        "primary": _TEXT,
                        "shadow": _TEXT,
                    }
                ),
            },
            "more_differences": _COUNT,
            "primary": _ref("ShadowAnswer"),
            "shadow": _ref("ShadowAnswer"),
        }
    ),
    "ShadowAnswer": _closed(
        {
            "status": {"type": "integer"},
            "headers": _HEADERS,
            "body": _TEXT,
            "body_bytes": _COUNT,
            "truncated": {"type": "boolean"},
        }
    ),
}

_ERROR = {"$ref": "#/components/responses/Error"}
_UNAUTHORIZED = {"$ref": "#/components/responses/Unauthorized"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


OPENAPI_PATHS: dict[str, Any] = {
    "/shadow": {
        "get": {
            "operationId": "listShadows",
            "summary": "Every shadowed route with its agreement rate.",
            "responses": {
                "200": _json(_ref("ShadowList"), "One line per shadowed route."),
                "401": _UNAUTHORIZED,
                "default": _ERROR,
            },
        }
    },
    "/shadow/{route}": {
        "parameters": [
            {
                "name": "route",
                "in": "path",
                "required": True,
                "description": "A route that has, or had, a shadow.",
                "schema": {"type": "string"},
            }
        ],
        "get": {
            "operationId": "getShadow",
            "summary": "One route's comparison: differing fields with examples, "
            "learned noise, lost copies and the last differing pairs.",
            "responses": {
                "200": _json(_ref("ShadowRoute"), "The route's shadow report."),
                "401": _UNAUTHORIZED,
                "404": _json(
                    {"$ref": "#/components/schemas/Error"},
                    "No route of that name has a shadow.",
                ),
                "default": _ERROR,
            },
        },
    },
}
