"""Choosing the route for a request: first match wins, `default` takes the rest.

Matching runs on every request, so each route is compiled once into a small
predicate object: a prefix compared at a segment boundary, an optional regex,
a method set, header conditions and a host. Nothing is parsed per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from strangler.model import Match, Route

HeaderLookup = Callable[[str], "str | None"]


@dataclass(frozen=True, slots=True)
class _CompiledMatch:
    route: Route
    prefix: str | None
    prefix_slash: str | None
    regex_search: Callable[[str], object] | None
    methods: frozenset[str] | None
    headers: tuple[tuple[str, Callable[[str], object] | None], ...]
    host: str | None

    def matches(
        self, method: str, path: str, host: str | None, header: HeaderLookup
    ) -> bool:
        if self.prefix is not None and not (
            path == self.prefix
            or (self.prefix_slash is not None and path.startswith(self.prefix_slash))
        ):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.regex_search is not None and self.regex_search(path) is None:
            return False
        if self.host is not None and (
            host is None or not _host_matches(self.host, host)
        ):
            return False
        for name, search in self.headers:
            value = header(name)
            if value is None or (search is not None and search(value) is None):
                return False
        return True


def _host_matches(wanted: str, host: str) -> bool:
    """Compare a route's host with the request's, ignoring case and any port."""
    bare = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    bare = bare.lower()
    if wanted.startswith("*."):
        return bare.endswith(wanted[1:])
    return bare == wanted


def segment_prefix(prefix: str) -> tuple[str, str]:
    """The exact path and the `prefix/` form that a segment-boundary prefix accepts."""
    if prefix.endswith("/") and prefix != "/":
        return prefix.rstrip("/"), prefix
    if prefix == "/":
        return "/", "/"
    return prefix, prefix + "/"


def _compile(route: Route) -> _CompiledMatch:
    match: Match = route.match
    prefix = prefix_slash = None
    if match.path is not None:
        prefix, prefix_slash = segment_prefix(match.path)
    headers = tuple(
        (h.name.lower(), h.pattern.search if h.pattern is not None else None)
        for h in match.headers
    )
    return _CompiledMatch(
        route=route,
        prefix=prefix,
        prefix_slash=prefix_slash,
        regex_search=match.path_regex.search if match.path_regex is not None else None,
        methods=match.methods,
        headers=headers,
        host=match.host.lower() if match.host else None,
    )


class Router:
    """Routes compiled in file order; `match` returns the first that takes a request."""

    __slots__ = ("_compiled", "needs_headers")

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._compiled = tuple(_compile(route) for route in routes)
        self.needs_headers = any(c.headers for c in self._compiled)

    def match(
        self,
        method: str,
        path: str,
        host: str | None = None,
        header: HeaderLookup = lambda _name: None,
    ) -> Route | None:
        """The first route whose conditions all hold, or None for `default`."""
        for compiled in self._compiled:
            if compiled.matches(method, path, host, header):
                return compiled.route
        return None
