"""`strangler status` and `strangler shift`: the command line over the admin API.

Both talk to a running gateway's admin listener with treq. `AdminClient`
takes the reactor, so tests drive it inside their own reactor; the two
commands are entry points and run it under `twisted.internet.task.react`.
Every failure (refused connection, wrong token, a weight the gateway will
not take) ends as one line on stderr and exit code 1; a command line that
cannot be understood exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, cast
from urllib.parse import quote, urlsplit

import orjson
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

__all__ = [
    "DEFAULT_ADMIN_URL",
    "DEFAULT_TIMEOUT",
    "TOKEN_ENV",
    "URL_ENV",
    "AdminCallError",
    "AdminClient",
    "UsageError",
    "check_admin_url",
    "format_split",
    "format_status",
    "parse_assignments",
    "register_commands",
]

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
DEFAULT_TIMEOUT = 10.0
URL_ENV = "STRANGLER_ADMIN_URL"
TOKEN_ENV = "STRANGLER_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret


class AdminCallError(Exception):
    """A call to the admin API that did not succeed; the message is for people."""


class UsageError(ValueError):
    """The command line itself is wrong (exit code 2)."""


class AdminClient:
    """Calls the admin API of one gateway and returns its parsed JSON answers."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        reactor: Any,
        timeout: float = DEFAULT_TIMEOUT,
        http: HTTPClient | None = None,
    ) -> None:
        self.base_url = check_admin_url(base_url)
        self.token = token or None
        self.timeout = timeout
        if http is None:
            pool = HTTPConnectionPool(reactor, persistent=False)
            http = HTTPClient(cast(IAgent, Agent(reactor, pool=pool)))
        self.http = http

    async def get(self, path: str) -> Any:
        return await self._call("GET", path, None)

    async def post(self, path: str, body: object | None = None) -> Any:
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: object | None) -> Any:
        headers = Headers({b"Accept": [b"application/json"]})
        if self.token is not None:
            value = b"Bearer " + self.token.encode("utf-8")
            headers.setRawHeaders(b"Authorization", [value])
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers.setRawHeaders(b"Content-Type", [b"application/json"])

        where = f"the admin API at {self.base_url}"
        try:
            response = await self.http.request(
                method,
                self.base_url + path,
                headers=headers,
                data=data,
                timeout=self.timeout,
                allow_redirects=False,
            )
            raw = await response.content()
        except ConnectionRefusedError:
            raise AdminCallError(
                f"cannot reach {where}: connection refused "
                "(is the gateway running, with an admin section in its rules?)"
            ) from None
        except ConnectError as exc:
            raise AdminCallError(f"cannot reach {where}: {_one_line(exc)}") from None
        except (CancelledError, ResponseNeverReceived, TimeoutError):
            raise AdminCallError(
                f"no answer from {where} within {self.timeout:g}s"
            ) from None

        payload = _parse_json(raw)
        if response.code == 401:
            hint = (
                f"{TOKEN_ENV} does not match the rule file's admin.token"
                if self.token is not None
                else f"set {TOKEN_ENV} to the rule file's admin.token"
            )
            raise AdminCallError(f"{where} refused the token (401): {hint}")
        if response.code >= 400:
            message = _message(payload) or f"{method} {path} failed"
            raise AdminCallError(f"{message} (HTTP {response.code})")
        if payload is None:
            raise AdminCallError(
                f"{self.base_url}{path} did not answer with JSON "
                f"(HTTP {response.code}); is --admin the admin listener?"
            )
        return payload


def check_admin_url(url: str) -> str:
    """The admin base URL without a trailing slash; UsageError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"--admin {url!r}: expected the admin API's base URL, "
            f"like {DEFAULT_ADMIN_URL}"
        )
    return url.rstrip("/")


def parse_assignments(items: Sequence[str]) -> dict[str, float]:
    """`["users=25", "monolith=75"]` as `{"users": 25, "monolith": 75}`.

    Only the shape is checked here; whether the names and numbers make a
    valid split is the gateway's decision, so its message is the one shown.
    """
    weights: dict[str, float] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"{item!r}: expected UPSTREAM=PERCENT, like users=25")
        try:
            number = float(text.strip().removesuffix("%"))
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise UsageError(
                f"{item!r}: {text!r} is not a percentage; expected a number like 25 "
                "or 12.5"
            )
        if name in weights:
            raise UsageError(f"{item!r}: {name!r} is given twice")
        weights[name] = int(number) if number.is_integer() else number
    return weights


# Output.


def _percent(value: float) -> str:
    return f"{value:g}%"


def _weights_text(pairs: Sequence[tuple[str, float]]) -> str:
    return " | ".join(f"{name} {_percent(weight)}" for name, weight in pairs)


def _origin_text(data: dict[str, Any]) -> str:
    if data.get("source") == "runtime":
        return f"runtime, set by {data.get('by')} at {data.get('set_at')}"
    return "rule file"


def format_split(result: dict[str, Any]) -> str:
    """One line for `strangler shift`: the route, its new weights and their source."""
    weights = _weights_text(list(result["weights"].items()))
    return f"{result['route']}: {weights} ({_origin_text(result)})"


def format_status(
    routes: list[dict[str, Any]],
    upstreams: list[dict[str, Any]],
    reload: dict[str, Any],
    shadows: list[dict[str, Any]] | None = None,
) -> str:
    """The `strangler status` tables: routes, upstream targets, last reload.

    `shadows` is `GET /shadow`'s list; each shadowed route's agreement is
    shown beside it.
    """
    agreement = {s["route"]: s for s in shadows or ()}
    route_rows = [
        ("ROUTE", "WEIGHTS", "SOURCE", "STICKY", "REQUESTS", "SHADOW", "MATCH")
    ]
    for route in routes:
        split = route["split"]
        sticky = route["sticky"]
        match = route["match"]
        route_rows.append(
            (
                route["name"],
                _weights_text([(e["upstream"], e["weight"]) for e in split]),
                _origin_text(route),
                f"{sticky['by']} {sticky['name']}".strip() if sticky else "-",
                str(sum(e["traffic"]["requests"] for e in split)),
                _shadow_text(route, agreement.get(route["name"])),
                match["summary"] if match else "(requests no route matches)",
            )
        )

    target_rows = [("UPSTREAM", "BALANCE", "TARGET", "WEIGHT", "HEALTH", "ACTIVE")]
    for upstream in upstreams:
        for index, target in enumerate(upstream["targets"]):
            first = index == 0
            target_rows.append(
                (
                    upstream["name"] if first else "",
                    upstream["balance"] if first else "",
                    target["url"],
                    str(target["weight"]),
                    "up" if target["available"] else "DOWN",
                    str(target["active"]),
                )
            )

    if reload["ok"]:
        reload_lines = [f"ok at {reload['at']} ({reload['source']})"]
    else:
        reload_lines = [
            f"REFUSED at {reload['at']} ({reload['source']}); "
            "the previous rules keep serving:",
            *(f"  {error}" for error in reload["errors"]),
        ]

    return "\n".join(
        [
            "ROUTES",
            *_table(route_rows),
            "",
            "UPSTREAMS",
            *_table(target_rows),
            "",
            "LAST RELOAD",
            *(_clean(line) for line in reload_lines),
        ]
    )


def _shadow_text(route: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """`users 98.4% of 384`: the shadow's upstream and how often it agreed."""
    shadow = route.get("shadow")
    if not shadow:
        return "-"
    if summary is None or not summary["compared"]:
        return f"{shadow['to']} (none compared)"
    return f"{shadow['to']} {summary['agreement'] * 100:.1f}% of {summary['compared']}"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    cells = [[_clean(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in cells
    ]


def _clean(text: str) -> str:
    """Text from the gateway with control characters made harmless for a terminal."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _message(payload: Any) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return str(payload["message"])
    return None


# The commands.


def _client(reactor: Any, args: argparse.Namespace) -> AdminClient:
    url = args.admin or os.environ.get(URL_ENV) or DEFAULT_ADMIN_URL
    return AdminClient(url, os.environ.get(TOKEN_ENV), reactor, timeout=args.timeout)


async def run_status(reactor: Any, args: argparse.Namespace) -> int:
    """`strangler status`: print the tables (or JSON); 1 if the API cannot answer."""
    client = _client(reactor, args)
    try:
        routes = (await client.get("/routes"))["routes"]
        upstreams = (await client.get("/upstreams"))["upstreams"]
        reload = await client.get("/reload")
        shadows = (await client.get("/shadow"))["routes"]
    except AdminCallError as exc:
        print(f"strangler status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        report = {
            "routes": routes,
            "upstreams": upstreams,
            "reload": reload,
            "shadow": shadows,
        }
        print(json.dumps(report, indent=2))
    else:
        print(format_status(routes, upstreams, reload, shadows))
    return 0


async def run_shift(reactor: Any, args: argparse.Namespace) -> int:
    """`strangler shift`: post the weights and print what the gateway now uses."""
    weights = parse_assignments(args.weights)
    client = _client(reactor, args)
    path = f"/routes/{quote(args.route, safe='')}/split"
    try:
        result = await client.post(path, weights)
    except AdminCallError as exc:
        print(f"strangler shift: {exc}", file=sys.stderr)
        return 1
    print(format_split(result))
    return 0


def _react(
    command: str,
    work: Callable[[Any, argparse.Namespace], Awaitable[int]],
    args: argparse.Namespace,
) -> NoReturn:
    """Run one command on the global reactor and exit with its code."""
    from twisted.internet import task

    async def main(reactor: Any) -> None:
        try:
            code = await work(reactor, args)
        except UsageError as exc:
            print(f"strangler {command}: {exc}", file=sys.stderr)
            code = 2
        except Exception as exc:  # the entry point: one line, never a traceback
            print(f"strangler {command}: failed: {_one_line(exc)}", file=sys.stderr)
            code = 1
        if code:
            raise SystemExit(code)

    task.react(main)
    raise AssertionError("react() returns only by exiting")


def cmd_status(args: argparse.Namespace) -> int:
    _react("status", run_status, args)


def cmd_shift(args: argparse.Namespace) -> int:
    _react("shift", run_shift, args)


def register_commands(subparsers: Any) -> None:
    """Add `status` and `shift` to the `strangler` command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        metavar="URL",
        help=f"admin API base URL (default: ${URL_ENV}, else {DEFAULT_ADMIN_URL}); "
        f"the token is read from ${TOKEN_ENV}",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default: {DEFAULT_TIMEOUT:g})",
    )

    status = subparsers.add_parser(
        "status",
        parents=[common],
        help="show live routes, weights, upstream health and the last reload",
    )
    status.add_argument(
        "--json", action="store_true", help="print JSON instead of text"
    )
    status.set_defaults(func=cmd_status)

    shift = subparsers.add_parser(
        "shift",
        parents=[common],
        help="change a route's split at runtime",
        description="Change a route's split now. A two-way split may name one "
        "side: `strangler shift users-v1 users=25` leaves 75 to the other.",
    )
    shift.add_argument("route", metavar="ROUTE")
    shift.add_argument("weights", metavar="UPSTREAM=PCT", nargs="+")
    shift.set_defaults(func=cmd_shift)
