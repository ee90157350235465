"""What the shadow of one route has seen: counters, differing fields, samples.

A `RouteStats` lives in the gateway's `ShadowRegistry` under the route's
name, not in a `GatewayState`, so counts, learned noise and the in-flight
bound carry over when the rule file is reloaded. Everything here is bounded:
at most `MAX_FIELDS` distinct differing fields per route (the rest are
counted together) and the last `MAX_SAMPLES` differing pairs.

Samples keep both sides of a pair for a person to read. Bodies are cut to
`SAMPLE_BODY` bytes, and credentials are replaced by `[redacted]` before a
sample is stored: `Authorization`, `Proxy-Authorization`, `Cookie`,
`Set-Cookie`, any header whose name says it carries a key, token, secret,
password or session, names the registry is configured with, the route's
`shadow.redact` names and where `auth.api_key` reads keys, and query
parameters whose names say the same.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from strangler.model import Shadow
from strangler.shadow.compare import (
    CAPTURE_LIMIT,
    Answer,
    Difference,
    Outcome,
    decoded,
)
from strangler.shadow.noise import NoiseLearner

__all__ = [
    "ALWAYS_SECRET",
    "MAX_FIELDS",
    "MAX_SAMPLES",
    "SAMPLE_BODY",
    "Redactor",
    "RouteStats",
    "SampleRequest",
]

MAX_FIELDS = 200
MAX_SAMPLES = 20
SAMPLE_BODY = 2048
REDACTED = "[redacted]"
OTHER_FIELDS = "(other fields)"

ALWAYS_SECRET = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie"}
)
_SECRET_WORDS = re.compile(r"key|token|secret|passw|session|auth|signature|credential")


class Redactor:
    """Decides which header and query-parameter values never reach a report."""

    def __init__(self, extra: frozenset[str] = frozenset()) -> None:
        self.names = ALWAYS_SECRET | {name.lower() for name in extra}

    def extended(self, extra: frozenset[str]) -> Redactor:
        """This redactor with more names; itself when there are none to add."""
        if not extra:
            return self
        return Redactor(self.names | extra)

    def secret(self, name: str) -> bool:
        lname = name.lower()
        return lname in self.names or _SECRET_WORDS.search(lname) is not None

    def headers(self, pairs: list[tuple[bytes, bytes]]) -> list[list[str]]:
        out = []
        for name, value in pairs:
            text = name.decode("latin-1")
            shown = REDACTED if self.secret(text) else value.decode("latin-1")
            out.append([text, shown])
        return out

    def target(self, path: str, query: bytes) -> str:
        if not query:
            return path
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        cleaned = [(k, REDACTED if self.secret(k) else v) for k, v in pairs]
        return f"{path}?{urlencode(cleaned, safe='[]')}"


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """The mirrored request as a sample shows it (already redacted)."""

    request_id: str
    method: str
    target: str
    headers: list[list[str]]


class FieldStat:
    """How often one field differed, and the first example of it."""

    __slots__ = ("count", "example", "kind")

    def __init__(self, kind: str, example: dict[str, Any]) -> None:
        self.kind = kind
        self.count = 0
        self.example = example


class RouteStats:
    """Everything counted for one route's shadow since the gateway started."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.config: Shadow | None = None
        self.in_flight = 0
        self.mirrored = 0
        self.compared = 0
        self.agreed = 0
        self.kinds = {"status": 0, "header": 0, "body": 0}
        self.fields: dict[tuple[str, str], FieldStat] = {}
        self.other_fields = 0
        self.ignored = 0
        self.errors: dict[str, int] = {}
        self.timeouts = 0
        self.skipped: dict[str, int] = {}
        self.dropped = 0
        self.noise = NoiseLearner()
        self.samples: deque[dict[str, Any]] = deque(maxlen=MAX_SAMPLES)

    # -- counting -----------------------------------------------------------------

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def error(self, reason: str) -> None:
        if reason == "timeout":
            self.timeouts += 1
        else:
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def record(
        self,
        outcome: Outcome,
        describe: Callable[[], SampleRequest],
        primary: Answer,
        shadow: Answer,
        redactor: Redactor,
    ) -> None:
        """Count one compared pair; keep a sample when the sides disagreed.

        `describe` builds the redacted request for the sample; it is only
        called for a pair that disagreed.
        """
        self.compared += 1
        self.ignored += outcome.ignored
        if outcome.noise:
            self.noise.count_suppressed(outcome)
        if outcome.agreed:
            self.agreed += 1
            return

        request = describe()
        seen: set[tuple[str, str]] = set()
        for difference in outcome.differences:
            key = (difference.kind, difference.field)
            if key in seen:
                continue
            seen.add(key)
            stat = self.fields.get(key)
            if stat is None:
                if len(self.fields) >= MAX_FIELDS:
                    self.other_fields += 1
                    continue
                stat = self.fields[key] = FieldStat(
                    difference.kind, _example(difference, request)
                )
            stat.count += 1
        for kind in {kind for kind, _ in seen}:
            self.kinds[kind] += 1

        self.samples.append(
            {
                "request": _request_view(request),
                "differences": [_difference_view(d) for d in outcome.differences[:20]],
                "more_differences": outcome.more
                + max(0, len(outcome.differences) - 20),
                "primary": _answer_view(primary, redactor),
                "shadow": _answer_view(shadow, redactor),
            }
        )

    # -- reporting -------------------------------------------------------------

    @property
    def differed(self) -> int:
        return self.compared - self.agreed

    def agreement(self) -> float | None:
        return round(self.agreed / self.compared, 6) if self.compared else None

    def top_fields(self, limit: int | None = None) -> list[dict[str, Any]]:
        ranked = sorted(self.fields.items(), key=lambda item: (-item[1].count, item[0]))
        out = [
            {"kind": kind, "field": name, "count": stat.count, "example": stat.example}
            for (kind, name), stat in ranked[:limit]
        ]
        if self.other_fields and limit is None:
            out.append(
                {
                    "kind": "body",
                    "field": OTHER_FIELDS,
                    "count": self.other_fields,
                    "example": None,
                }
            )
        return out

    def settings(self) -> dict[str, Any] | None:
        config = self.config
        if config is None:
            return None
        return {
            "to": config.to,
            "percent": config.percent,
            "methods": sorted(config.methods),
            "timeout_s": config.timeout,
            "max_body": config.max_body,
            "max_in_flight": config.max_in_flight,
            "compare": {
                "ignore": list(config.compare.ignore),
                "headers": list(config.compare.headers),
                "noise": config.compare.noise,
            },
            "redact": list(config.redact),
        }

    def summary(self, active: bool) -> dict[str, Any]:
        """The per-route line of `GET /shadow`; `active` if the rules shadow it now."""
        config = self.config
        top = self.top_fields(1)
        return {
            "route": self.name,
            "active": active,
            "to": config.to if config is not None else None,
            "percent": config.percent if config is not None else None,
            "mirrored": self.mirrored,
            "compared": self.compared,
            "agreed": self.agreed,
            "differed": self.differed,
            "agreement": self.agreement(),
            "errors": sum(self.errors.values()),
            "timeouts": self.timeouts,
            "skipped": sum(self.skipped.values()),
            "dropped": self.dropped,
            "in_flight": self.in_flight,
            "top_field": top[0]["field"] if top else None,
        }

    def detail(self, active: bool) -> dict[str, Any]:
        """`GET /shadow/{route}`: counts by kind and field, noise and samples."""
        mode = self.config.compare.noise if self.config is not None else "off"
        return {
            **self.summary(active),
            "settings": self.settings(),
            "differences": dict(self.kinds),
            "fields": self.top_fields(),
            "ignored": self.ignored,
            "error_reasons": dict(sorted(self.errors.items())),
            "skipped_reasons": dict(sorted(self.skipped.items())),
            "noise": self.noise.report(mode),
            "samples": list(reversed(self.samples)),
        }


def _example(difference: Difference, request: SampleRequest) -> dict[str, Any]:
    return {
        "where": difference.where,
        "primary": difference.primary,
        "shadow": difference.shadow,
        "request_id": request.request_id,
        "method": request.method,
        "target": request.target,
    }


def _difference_view(difference: Difference) -> dict[str, str]:
    return {
        "kind": difference.kind,
        "field": difference.field,
        "where": difference.where,
        "primary": difference.primary,
        "shadow": difference.shadow,
    }


def _request_view(request: SampleRequest) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "method": request.method,
        "target": request.target,
        "headers": request.headers,
    }


def _answer_view(answer: Answer, redactor: Redactor) -> dict[str, Any]:
    body = decoded(answer, CAPTURE_LIMIT)
    if body is None:
        text = f"({answer.size} bytes, over the capture limit; compared by hash)"
        truncated = True
    else:
        text = body[:SAMPLE_BODY].decode("utf-8", "replace")
        truncated = len(body) > SAMPLE_BODY
    return {
        "status": answer.status,
        "headers": redactor.headers(answer.headers),
        "body": text,
        "body_bytes": answer.size,
        "truncated": truncated,
    }
