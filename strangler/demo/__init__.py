"""The services `strangler demo` puts behind the gateway.

A legacy monolith (`strangler.demo.monolith`, XML at `/api/v1`) runs as two
instances, and a new users service (`strangler.demo.users_service`, JSON at
`/api/v2`) replaces part of it. `strangler.demo.backends` starts all three;
`DEMO_RULES` is the rule file that puts the gateway in front of them.

This module holds what the two services share, so that they serve the same
people and answer unknown paths the same way: the fixed users and `Router`, a
small path dispatcher that also stamps `X-Served-By` on every response.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = [
    "DEMO_PLAN",
    "DEMO_RULES",
    "DEMO_USERS",
    "MAX_BODY",
    "DemoUser",
    "ErrorPage",
    "Handler",
    "Router",
    "query_arg",
    "read_body",
]

DEMO_RULES = Path(__file__).with_name("demo.yaml")
"""The rule file `strangler demo` serves, shipped as package data."""

DEMO_PLAN = Path(__file__).with_name("migrations") / "users.yaml"
"""The migration plan for the demo, shipped as package data; the repository
keeps the same file at `migrations/users.yaml`."""

MAX_BODY = 64 * 1024
"""The largest request body a demo service accepts; a demo needs no more."""


@dataclass(frozen=True, slots=True)
class DemoUser:
    """A user both services know, so their answers can be compared."""

    id: int
    name: str
    email: str
    active: bool = True


DEMO_USERS: tuple[DemoUser, ...] = (
    DemoUser(1, "Ada Lovelace", "ada@example.com"),
    DemoUser(2, "Grace Hopper", "grace@example.com"),
    DemoUser(3, "Alan Turing", "alan@example.com"),
    DemoUser(4, "Edsger Dijkstra", "edsger@example.com", active=False),
    DemoUser(5, "Barbara Liskov", "barbara@example.com"),
)

Handler = Callable[[Request, dict[str, str]], bytes | int]
"""Renders one endpoint: gets the path's named groups, returns a body or
`NOT_DONE_YET`."""

ErrorPage = Callable[[Request, int, str], bytes]
"""Sets the status and content type of an error and returns its body."""

_INSTANCE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class _Endpoint:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Handler


class Router(Resource):
    """Dispatches on method and full path with regexes, in the order added.

    A path that matches but not for this method gets 405 with `Allow`; a path
    nothing matches gets 404. Both go through the service's own `error_page`,
    so the monolith answers in XML and the users service in JSON. HEAD is
    served by the GET handler; Twisted drops the body.
    """

    isLeaf = True

    def __init__(self, served_by: str, error_page: ErrorPage) -> None:
        if not _INSTANCE_NAME.fullmatch(served_by):
            raise ValueError(
                "an instance name must be 1 to 64 letters, digits, '.', '_' or '-'"
                f", got {served_by!r}"
            )
        super().__init__()
        self._served_by = served_by.encode("ascii")
        self._error_page = error_page
        self._endpoints: list[_Endpoint] = []

    def add(self, methods: str, pattern: str, handler: Handler) -> None:
        """Serve `methods` (space-separated) on paths fully matching `pattern`."""
        self._endpoints.append(
            _Endpoint(frozenset(methods.split()), re.compile(pattern), handler)
        )

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"X-Served-By", self._served_by)
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        wanted = "GET" if method == "HEAD" else method

        allowed: set[str] = set()
        for endpoint in self._endpoints:
            found = endpoint.pattern.fullmatch(path)
            if found is None:
                continue
            if wanted in endpoint.methods:
                return endpoint.handler(request, found.groupdict())
            allowed |= endpoint.methods

        if allowed:
            allow = ", ".join(sorted(allowed))
            request.setHeader(b"Allow", allow.encode("ascii"))
            return self._error_page(
                request, 405, f"{method} is not allowed on {path}; use {allow}"
            )
        return self._error_page(request, 404, f"nothing is served at {path}")


def query_arg(request: Request, name: str) -> str | None:
    """The first value of query parameter `name`, or None when it is absent."""
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name.encode("ascii"))
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def read_body(request: Request) -> bytes | None:
    """The request body, or None when it is larger than `MAX_BODY`."""
    if request.content is None:
        return b""
    request.content.seek(0)
    body = request.content.read(MAX_BODY + 1)
    return None if len(body) > MAX_BODY else body
