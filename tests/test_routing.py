"""Route matching without sockets: prefixes, regexes, methods, headers, hosts."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from strangler.model import HeaderMatch, Match, Route, SplitEntry
from strangler.routing import Router


def route(name: str, **match: object) -> Route:
    return Route(name=name, match=Match(**match), split=(SplitEntry(to="up"),))


def names(
    router: Router, method: str, path: str, host: str | None = None, **headers: str
) -> str | None:
    lowered = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    found = router.match(method, path, host, lowered.get)
    return found.name if found is not None else None


def test_prefix_matches_at_a_segment_boundary_only() -> None:
    router = Router((route("users", path="/api/v1/users"),))

    assert names(router, "GET", "/api/v1/users") == "users"
    assert names(router, "GET", "/api/v1/users/42") == "users"
    assert names(router, "GET", "/api/v1/usersx") is None
    assert names(router, "GET", "/api/v1") is None


def test_prefix_with_trailing_slash_and_root() -> None:
    router = Router((route("slash", path="/docs/"), route("root", path="/")))

    assert names(router, "GET", "/docs/intro") == "slash"
    assert names(router, "GET", "/docs") == "slash"
    assert names(router, "GET", "/anything") == "root"


def test_first_match_wins_in_file_order() -> None:
    router = Router((route("narrow", path="/api/v1/users"), route("wide", path="/api")))

    assert names(router, "GET", "/api/v1/users/1") == "narrow"
    assert names(router, "GET", "/api/v1/orders") == "wide"


def test_methods_regex_headers_and_host_all_must_hold() -> None:
    router = Router(
        (
            route(
                "strict",
                path="/api",
                path_regex=re.compile(r"^/api/\d+$"),
                methods=frozenset({"GET", "POST"}),
                headers=(
                    HeaderMatch("x-canary", re.compile("^yes$")),
                    HeaderMatch("x-present"),
                ),
                host="shop.example",
            ),
        )
    )
    ok = {"x_canary": "yes", "x_present": ""}

    assert names(router, "GET", "/api/7", "shop.example:8080", **ok) == "strict"
    assert names(router, "DELETE", "/api/7", "shop.example", **ok) is None
    assert names(router, "GET", "/api/x", "shop.example", **ok) is None
    assert names(router, "GET", "/api/7", "other.example", **ok) is None
    assert (
        names(router, "GET", "/api/7", "shop.example", x_canary="no", x_present="")
        is None
    )
    assert names(router, "GET", "/api/7", "shop.example", x_canary="yes") is None


def test_wildcard_host_matches_subdomains_case_insensitively() -> None:
    router = Router((route("tenant", host="*.example.com"),))

    assert names(router, "GET", "/", "EU.Example.com") == "tenant"
    assert names(router, "GET", "/", "example.org") is None
    assert names(router, "GET", "/") is None


def test_router_knows_whether_it_needs_headers() -> None:
    assert not Router((route("a", path="/a"),)).needs_headers
    assert Router((route("h", headers=(HeaderMatch("x-a"),)),)).needs_headers


segment = st.text(alphabet="abcxyz019-_", min_size=1, max_size=6)


@given(
    st.lists(segment, min_size=1, max_size=4), st.lists(segment, max_size=3), segment
)
def test_prefix_property_matches_exactly_its_subtree(prefix, rest, stranger) -> None:
    base = "/" + "/".join(prefix)
    router = Router((route("r", path=base),))

    assert names(router, "GET", base + "".join("/" + s for s in rest)) == "r"
    assert names(router, "GET", base + stranger) is None
