"""The rule-file loader: what it accepts, what it builds, and how it complains.

Problems are asserted as the exact `file:line: key: message` lines a user
reads, so a wrong line number or key path fails the test.
"""

from __future__ import annotations

import itertools
import re
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strangler.errors import ConfigError
from strangler.model import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    AccessLog,
    Address,
    Limits,
    Rewrite,
    Rules,
    SplitEntry,
    Transform,
)
from strangler.rules import load_rules, parse_rules
from strangler.yaml_source import format_key, load_yaml

HERE = Path(__file__).parent
EXAMPLE = HERE / "rules" / "product_example.yaml"
SOURCE = "rules/demo.yaml"

# Six lines, so a `routes:` appended to it is on line 7 and its first item on 8.
BASE = """\
upstreams:
  monolith:
    targets: [http://127.0.0.1:9001]
  users:
    targets: [http://127.0.0.1:9101]
default: monolith
"""


def load(text: str, environ: dict[str, str] | None = None) -> Rules:
    return parse_rules(textwrap.dedent(text), SOURCE, environ or {})


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text, environ)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return [str(problem) for problem in caught.value.problems]


def with_routes(routes: str) -> str:
    """BASE plus a `routes:` section; the first route's `- name` is on line 8."""
    return BASE + "routes:\n" + textwrap.dedent(routes)


# The documented example.


def test_product_example_loads_as_written() -> None:
    rules = load_rules(EXAMPLE, {"STRANGLER_ADMIN_TOKEN": "s3cret"})

    assert rules.source == EXAMPLE
    assert rules.listen == Address("127.0.0.1", 8080)
    assert rules.admin is not None
    assert rules.admin.listen == Address("127.0.0.1", 8081)
    assert rules.admin.token == "s3cret"
    assert rules.default == "monolith"

    monolith, users = rules.upstreams["monolith"], rules.upstreams["users"]
    assert [t.authority for t in monolith.targets] == [
        "127.0.0.1:9001",
        "127.0.0.1:9002",
    ]
    assert monolith.health is not None
    assert (monolith.health.path, monolith.health.interval) == ("/health", 2.0)
    assert monolith.health.timeout == 1.0
    assert users.balance == "least_conn"
    assert [(t.port, t.weight) for t in users.targets] == [(9101, 3), (9102, 1)]

    v2, v1 = rules.routes
    assert (v2.name, v2.line, v2.match.path) == ("users-v2", 22, "/api/v2/users")
    assert v2.split == (SplitEntry(to="users", weight=100.0),)
    assert (v1.name, v1.line) == ("users-v1", 26)
    assert v1.match.methods == frozenset({"GET", "POST"})
    assert [(e.to, e.weight) for e in v1.split] == [("monolith", 75), ("users", 25)]
    assert v1.split[0].rewrite is None
    assert v1.split[1].rewrite == Rewrite(to="/api/v2/users", prefix="/api/v1/users")
    assert v1.split[1].transform == Transform("xml_to_json", "json_to_xml")
    assert v1.sticky is not None
    assert (v1.sticky.by, v1.sticky.name) == ("header", "X-User-Id")
    assert v1.shadow is not None
    assert (v1.shadow.to, v1.shadow.percent) == ("users", 100.0)
    assert v1.shadow.transform == Transform(request="xml_to_json")
    assert v1.shadow.compare.ignore == ("$.meta.generated_at",)


def test_product_example_without_its_token_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_rules(EXAMPLE, {})
    assert str(caught.value) == (
        f"{EXAMPLE}:4: admin.token: environment variable STRANGLER_ADMIN_TOKEN "
        "is not set"
    )


# Defaults and what the loader builds.


def test_defaults_are_applied_to_a_minimal_file() -> None:
    rules = load(BASE)

    assert rules.listen == Address("127.0.0.1", 8080)
    assert rules.admin is None
    assert rules.routes == ()
    assert rules.trusted_proxies == ()
    assert rules.expose_decision is False
    assert rules.limits == Limits()
    assert rules.access_log == AccessLog(enabled=True, path="-")
    assert (rules.timeout, rules.connect_timeout) == (
        DEFAULT_TIMEOUT,
        DEFAULT_CONNECT_TIMEOUT,
    )
    assert rules.drain_timeout == 30.0
    monolith = rules.upstreams["monolith"]
    assert (monolith.balance, monolith.health, monolith.timeout) == (
        "round_robin",
        None,
        None,
    )
    assert monolith.targets[0].weight == 1


def test_admin_without_listen_uses_port_8081_and_no_token() -> None:
    rules = load(BASE + "admin: {}\n")
    assert rules.admin is not None
    assert (rules.admin.listen, rules.admin.token) == (Address("127.0.0.1", 8081), None)


def test_every_optional_top_level_key_is_read() -> None:
    rules = load(
        BASE
        + textwrap.dedent("""\
        listen: "[::1]:0"
        trusted_proxies: [10.0.0.0/8, 192.168.1.7, "fd00::/8"]
        expose_decision: true
        limits:
          client_header_timeout: 5s
          max_header_bytes: 32KiB
          max_headers: 50
          max_body: 10MiB
        access_log: {enabled: true, path: /var/log/strangler.log}
        timeout: 2m
        connect_timeout: 250ms
        drain_timeout: 0s
        """)
    )

    assert rules.listen == Address("::1", 0)
    assert [str(n) for n in rules.trusted_proxies] == [
        "10.0.0.0/8",
        "192.168.1.7/32",
        "fd00::/8",
    ]
    assert rules.expose_decision is True
    assert rules.limits == Limits(5.0, 32 * 1024, 50, 10 * 1024 * 1024)
    assert rules.access_log == AccessLog(True, "/var/log/strangler.log")
    assert (rules.timeout, rules.connect_timeout, rules.drain_timeout) == (
        120.0,
        0.25,
        0.0,
    )


def test_access_log_false_turns_it_off() -> None:
    assert load(BASE + "access_log: false\n").access_log == AccessLog(enabled=False)


def test_upstream_settings_and_https_default_port() -> None:
    rules = load("""\
        upstreams:
          api:
            balance: ip_hash
            timeout: 3s
            connect_timeout: 500ms
            targets:
              - https://API.example.com/
              - {url: "http://[::1]", weight: 2}
            health:
              path: /ready
              interval: 10s
              timeout: 2s
              expect_status: [200, 204]
              healthy_after: 1
              unhealthy_after: 5
        default: api
        """)

    api = rules.upstreams["api"]
    assert (api.balance, api.timeout, api.connect_timeout) == ("ip_hash", 3.0, 0.5)
    first, second = api.targets
    assert (first.url, first.scheme, first.host, first.port) == (
        "https://API.example.com",
        "https",
        "api.example.com",
        443,
    )
    assert (second.host, second.port, second.weight) == ("::1", 80, 2)
    assert second.authority == "[::1]:80"
    assert api.health is not None
    assert api.health.expect_status == (200, 204)
    assert (api.health.healthy_after, api.health.unhealthy_after) == (1, 5)


def test_single_expect_status_is_a_one_code_range() -> None:
    rules = load("""\
        upstreams:
          api:
            targets: [http://127.0.0.1:1]
            health: {expect_status: 204}
        default: api
        """)
    health = rules.upstreams["api"].health
    assert health is not None
    assert health.expect_status == (204, 204)


def test_route_with_to_becomes_one_split_entry_of_weight_100() -> None:
    rules = load(
        with_routes("""\
          - name: all
            to: users
            timeout: 2s
        """)
    )
    (route,) = rules.routes
    assert route.split == (SplitEntry(to="users", weight=100.0, timeout=2.0),)
    assert route.line == 8


def test_route_level_settings_fold_into_entries_that_lack_them() -> None:
    rules = load(
        with_routes("""\
          - name: r
            match: {path: /old}
            rewrite: {prefix: /old, to: /new}
            transform: {request: xml_to_json}
            connect_timeout: 1s
            split:
              - {to: monolith, weight: 50}
              - to: users
                weight: 50
                rewrite: {regex: "^/old/(.*)$", to: "/v2/\\\\1"}
                timeout: 9s
        """)
    )
    plain, own = rules.routes[0].split

    assert plain.rewrite == Rewrite(to="/new", prefix="/old")
    assert plain.transform == Transform(request="xml_to_json")
    assert (plain.timeout, plain.connect_timeout) == (None, 1.0)
    assert own.rewrite is not None
    assert own.rewrite.regex is not None
    assert own.rewrite.apply("/old/users/7") == "/v2/users/7"
    assert own.transform == Transform(request="xml_to_json")
    assert (own.timeout, own.connect_timeout) == (9.0, 1.0)


def test_match_stores_lowercase_headers_uppercase_methods_and_compiled_regexes() -> (
    None
):
    rules = load(
        with_routes("""\
          - name: r
            match:
              path_regex: "^/api/v[0-9]+/"
              methods: [get, Post]
              host: API.Example.com
              headers:
                X-Api-Version: "^2"
                X-Beta:
            to: users
        """)
    )
    match = rules.routes[0].match

    assert match.methods == frozenset({"GET", "POST"})
    assert match.host == "api.example.com"
    assert match.path_regex is not None
    assert match.path_regex.search("/api/v2/users")
    version, beta = match.headers
    assert version.name == "x-api-version"
    assert version.pattern is not None
    assert version.pattern.search("2.1")
    assert (beta.name, beta.pattern) == ("x-beta", None)


def test_route_without_match_matches_everything() -> None:
    rules = load(with_routes("  - {name: everything, to: users}\n"))
    match = rules.routes[0].match
    assert (match.path, match.path_regex, match.methods, match.headers) == (
        None,
        None,
        None,
        (),
    )


def test_sticky_override_and_shadow_settings_are_read() -> None:
    rules = load(
        with_routes("""\
          - name: r
            split: [{to: monolith, weight: 99.5}, {to: users, weight: 0.5}]
            sticky: {by: cookie, name: sid, cookie_ttl: 1h}
            override: {header: X-Strangler-Force}
            shadow:
              to: users
              percent: 12.5
              methods: [GET, POST]
              timeout: 750ms
              max_body: 64KiB
              max_in_flight: 7
              compare:
                ignore: [$.id]
                headers: [Content-Type, ETag]
                noise: off
        """)
    )
    route = rules.routes[0]

    assert [e.weight for e in route.split] == [99.5, 0.5]
    assert route.sticky is not None
    assert (route.sticky.by, route.sticky.name, route.sticky.cookie_ttl) == (
        "cookie",
        "sid",
        3600.0,
    )
    assert route.override is not None
    assert route.override.header == "x-strangler-force"
    shadow = route.shadow
    assert shadow is not None
    assert (shadow.percent, shadow.timeout, shadow.max_body) == (12.5, 0.75, 65536)
    assert (shadow.methods, shadow.max_in_flight) == (frozenset({"GET", "POST"}), 7)
    assert shadow.compare.ignore == ("$.id",)
    assert shadow.compare.headers == ("content-type", "etag")
    assert shadow.compare.noise == "off"


def test_sticky_by_ip_needs_no_name() -> None:
    rules = load(
        with_routes("""\
          - name: r
            split: [{to: monolith, weight: 50}, {to: users, weight: 50}]
            sticky: {by: ip}
        """)
    )
    assert rules.routes[0].sticky is not None
    assert rules.routes[0].sticky.by == "ip"


def test_fallback_is_kept_on_its_split_entry() -> None:
    rules = load(
        with_routes("""\
          - name: r
            split:
              - {to: users, weight: 100, fallback: monolith}
        """)
    )
    assert rules.routes[0].split[0].fallback == "monolith"


# Environment variables.


def test_variables_are_expanded_with_defaults() -> None:
    rules = load(
        BASE
        + textwrap.dedent("""\
        listen: ${HOST:-0.0.0.0}:${PORT}
        admin: {token: "${TOKEN:-fallback}-x"}
        """),
        {"PORT": "9000", "TOKEN": ""},
    )
    assert rules.listen == Address("0.0.0.0", 9000)
    assert rules.admin is not None
    assert rules.admin.token == "fallback-x"


def test_a_set_variable_wins_over_its_default() -> None:
    rules = load(BASE + "admin: {token: '${TOKEN:-unused}'}\n", {"TOKEN": "real"})
    assert rules.admin is not None
    assert rules.admin.token == "real"


def test_expanded_plain_value_is_typed_again_but_quoted_stays_text() -> None:
    text = """\
        upstreams:
          api:
            targets:
              - url: http://127.0.0.1:1
                weight: ${W}
        default: api
        admin: {token: "${W}"}
        """
    rules = load(text, {"W": "4"})
    assert rules.upstreams["api"].targets[0].weight == 4
    assert rules.admin is not None
    assert rules.admin.token == "4"


def test_double_dollar_brace_is_a_literal() -> None:
    rules = load(BASE + "admin: {token: 'a$${B}'}\n")
    assert rules.admin is not None
    assert rules.admin.token == "a${B}"


def test_unset_variable_is_reported_with_line_and_key() -> None:
    text = BASE + "listen: 127.0.0.1:${PORT}\nadmin:\n  token: ${SECRET}\n"
    assert problems(text) == [
        "rules/demo.yaml:7: listen: environment variable PORT is not set",
        "rules/demo.yaml:9: admin.token: environment variable SECRET is not set",
    ]


def test_malformed_variable_reference_is_reported() -> None:
    assert problems(BASE + "admin: {token: 'a${1X}'}\n") == [
        "rules/demo.yaml:7: admin.token: bad variable reference '${1X}'; "
        "write ${NAME} or ${NAME:-default}"
    ]


# One test per kind of problem.


def test_unknown_key_suggests_the_closest_and_lists_the_allowed() -> None:
    text = with_routes("""\
      - name: r
        splt: []
        to: users
    """)
    (problem,) = problems(text)
    assert problem.startswith(
        "rules/demo.yaml:9: routes[0].splt: unknown key 'splt' (did you mean "
        "'split'?); allowed keys: name, match, to, split, sticky, override, shadow, "
        "rewrite, transform, timeout, connect_timeout"
    )


def test_unknown_key_without_a_close_match_only_lists_the_allowed() -> None:
    assert problems(BASE + "admin: {colour: blue}\n") == [
        "rules/demo.yaml:7: admin.colour: unknown key 'colour'; "
        "allowed keys: listen, token"
    ]


def test_wrong_types_name_the_value_and_what_was_expected() -> None:
    text = """\
        upstreams:
          monolith:
            targets: http://127.0.0.1:9001
        default: monolith
        expose_decision: yes
        routes: {name: r}
        """
    assert problems(text) == [
        "rules/demo.yaml:3: upstreams.monolith.targets: expected a list, "
        "got 'http://127.0.0.1:9001'",
        "rules/demo.yaml:5: expose_decision: expected true or false, got 'yes'",
        "rules/demo.yaml:6: routes: expected a list, got a mapping",
    ]


def test_empty_lists_are_refused_where_an_item_is_needed() -> None:
    text = BASE.replace("[http://127.0.0.1:9101]", "[]") + textwrap.dedent("""\
        access_log: maybe
        routes:
          - {name: r, split: []}
        """)
    assert problems(text) == [
        "rules/demo.yaml:5: upstreams.users.targets: expected at least one item, "
        "got an empty list",
        "rules/demo.yaml:7: access_log: expected true, false or {enabled, path}, got 'maybe'",
        "rules/demo.yaml:9: routes[0].split: expected at least one item, "
        "got an empty list",
    ]


def test_missing_required_keys_are_reported_at_their_mapping() -> None:
    text = with_routes("""\
      - match: {path: /x}
        to: users
      - name: s
        shadow: {percent: 5}
        to: users
    """)
    assert problems(text) == [
        "rules/demo.yaml:8: routes[0]: missing required key 'name'",
        "rules/demo.yaml:11: routes[1].shadow: missing required key 'to'",
    ]


def test_missing_default_and_upstreams_are_reported_at_line_1() -> None:
    assert problems("listen: 127.0.0.1:8080\n") == [
        "rules/demo.yaml:1: missing required key 'upstreams'",
        "rules/demo.yaml:1: missing required key 'default'",
    ]


@pytest.mark.parametrize(
    ("route", "line", "key"),
    [
        ("  - {name: r, to: userz}\n", 8, "routes[0].to"),
        (
            "  - name: r\n    split:\n      - {to: userz, weight: 100}\n",
            10,
            "routes[0].split[0].to",
        ),
        (
            "  - name: r\n    to: users\n    shadow: {to: userz}\n",
            10,
            "routes[0].shadow.to",
        ),
        (
            "  - name: r\n    split:\n"
            "      - {to: monolith, weight: 100, fallback: userz}\n",
            10,
            "routes[0].split[0].fallback",
        ),
    ],
)
def test_unknown_upstream_names_are_reported_with_a_suggestion(
    route: str, line: int, key: str
) -> None:
    assert problems(with_routes(route)) == [
        f"rules/demo.yaml:{line}: {key}: unknown upstream 'userz' (did you mean "
        "'users'?); defined upstreams: monolith, users"
    ]


def test_unknown_default_upstream_is_reported() -> None:
    assert problems(BASE.replace("default: monolith", "default: legacy")) == [
        "rules/demo.yaml:6: default: unknown upstream 'legacy'; "
        "defined upstreams: monolith, users"
    ]


def test_split_weights_must_sum_to_100() -> None:
    text = with_routes("""\
      - name: a
        to: users
      - name: b
        to: users
      - name: c
        split:
          - {to: monolith, weight: 75}
          - {to: users, weight: 15}
    """)
    assert problems(text) == [
        "rules/demo.yaml:13: routes[2].split: weights must sum to 100, got 90"
    ]


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        ("33.333", "use at most two decimals, got 33.333"),
        ("101", "expected a percentage from 0 to 100, got 101"),
        ("-1", "expected a percentage from 0 to 100, got -1"),
        ("'50%'", "expected a percentage from 0 to 100, got '50%'"),
        (".nan", "expected a percentage from 0 to 100, got nan"),
    ],
)
def test_bad_split_weight_is_reported(weight: str, message: str) -> None:
    text = with_routes(f"""\
      - name: r
        split:
          - {{to: users, weight: {weight}}}
    """)
    assert problems(text) == [
        f"rules/demo.yaml:10: routes[0].split[0].weight: {message}"
    ]


def test_split_may_not_name_one_upstream_twice() -> None:
    text = with_routes("""\
      - name: r
        split:
          - {to: users, weight: 50}
          - {to: users, weight: 50}
    """)
    assert problems(text) == [
        "rules/demo.yaml:11: routes[0].split[1].to: upstream 'users' already has a "
        "branch in this split (entry 0); branches are told apart by upstream"
    ]


def _split_yaml(weights: list[str]) -> str:
    """A file whose one route splits across upstreams u0, u1, ... by `weights`."""
    upstreams = "".join(
        f"  u{i}: {{targets: ['http://127.0.0.1:{9000 + i}']}}\n"
        for i in range(len(weights))
    )
    entries = "".join(
        f"      - {{to: u{i}, weight: {weight}}}\n" for i, weight in enumerate(weights)
    )
    return (
        f"upstreams:\n{upstreams}default: u0\n"
        f"routes:\n  - name: r\n    split:\n{entries}"
    )


def test_two_decimal_weights_that_sum_to_100_are_exact() -> None:
    rules = parse_rules(_split_yaml(["33.33", "33.33", "33.34"]), SOURCE, {})
    assert [entry.weight for entry in rules.routes[0].split] == [33.33, 33.33, 33.34]


def _as_percent(cents: int) -> str:
    whole, rest = divmod(cents, 100)
    return f"{whole}.{rest:02d}" if rest else str(whole)


@st.composite
def _cents_summing_to_100(draw: st.DrawFn) -> list[int]:
    cuts = draw(st.lists(st.integers(0, 10_000), max_size=9))
    edges = [0, *sorted(cuts), 10_000]
    return [b - a for a, b in itertools.pairwise(edges)]


@given(_cents_summing_to_100())
def test_any_weights_with_two_decimals_summing_to_100_are_accepted(
    cents: list[int],
) -> None:
    rules = parse_rules(_split_yaml([_as_percent(c) for c in cents]), SOURCE, {})
    assert [round(e.weight * 100) for e in rules.routes[0].split] == cents


@given(
    st.lists(st.integers(0, 10_000), min_size=1, max_size=6).filter(
        lambda cents: sum(cents) != 10_000 and all(c <= 10_000 for c in cents)
    )
)
def test_any_weights_not_summing_to_100_report_their_sum(cents: list[int]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rules(_split_yaml([_as_percent(c) for c in cents]), SOURCE, {})
    total = f"{Decimal(sum(cents)) / 100:f}"
    # `upstreams:`, one line per upstream, `default`, `routes`, `- name`, `split`.
    split_line = 1 + len(cents) + 4
    assert [str(p) for p in caught.value.problems] == [
        f"{SOURCE}:{split_line}: routes[0].split: weights must sum to 100, got {total}"
    ]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1:21", "the scheme must be http:// or https://"),
        ("127.0.0.1:9001", "the scheme must be http:// or https://"),
        ("http://:9001", "it has no valid host"),
        ("http://127.0.0.1:99999", "the port must be a number up to 65535"),
        ("http://127.0.0.1:80a", "the port must be a number up to 65535"),
        ("http://[::1:80", "Invalid IPv6 URL"),
        ("http://127.0.0.1:0", "port 0 cannot be connected to"),
        (
            "http://127.0.0.1:9001/api",
            "a target has no path (got '/api'); use a rewrite for paths",
        ),
        ("http://127.0.0.1:9001/?a=1", "a target has no query string or fragment"),
        ("http://u:p@127.0.0.1:9001", "credentials do not belong in a target URL"),
    ],
)
def test_bad_target_url_is_reported(url: str, reason: str) -> None:
    text = BASE.replace("[http://127.0.0.1:9101]", f"['{url}']")
    assert problems(text) == [
        f"rules/demo.yaml:5: upstreams.users.targets[0]: bad target URL {url!r}: "
        f"{reason}; expected http://host:port"
    ]


def test_target_weight_must_be_at_least_1() -> None:
    second = "{url: 'http://127.0.0.1:9102', weight: 0}"
    text = BASE.replace(
        "[http://127.0.0.1:9101]",
        f"\n      - http://127.0.0.1:9101\n      - {second}",
    )
    assert problems(text) == [
        "rules/demo.yaml:7: upstreams.users.targets[1].weight: expected a whole number "
        "of at least 1, got 0"
    ]


@pytest.mark.parametrize(
    ("match", "key"),
    [
        ("{path_regex: '^/(a'}", "routes[0].match.path_regex"),
        ("{headers: {X-Version: '[2'}}", "routes[0].match.headers.X-Version"),
    ],
)
def test_bad_match_regex_is_reported(match: str, key: str) -> None:
    text = with_routes(f"  - name: r\n    to: users\n    match: {match}\n")
    [problem] = problems(text)
    assert re.fullmatch(
        rf"rules/demo\.yaml:10: {re.escape(key)}: bad regular expression '.*': .+",
        problem,
    )


def test_bad_rewrite_regex_names_the_pattern_and_the_error() -> None:
    text = with_routes("  - name: r\n    to: users\n    rewrite: {regex: '(', to: /}\n")
    assert problems(text) == [
        "rules/demo.yaml:10: routes[0].rewrite.regex: bad regular expression '(': "
        "missing ), unterminated subpattern at position 0"
    ]


def test_duplicate_route_name_points_at_the_first() -> None:
    text = with_routes("""\
      - name: users
        to: users
      - name: other
        to: users
      - name: users
        to: monolith
    """)
    assert problems(text) == [
        "rules/demo.yaml:12: routes[2].name: duplicate route name 'users' "
        "(first used on line 8)"
    ]


def test_route_name_must_be_a_simple_name() -> None:
    assert problems(with_routes("  - {name: 'users v2', to: users}\n")) == [
        "rules/demo.yaml:8: routes[0].name: expected a name of letters, digits, "
        "'_', '.' and '-', got 'users v2'"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10 sec", "expected a duration like 250ms, 10s or 5m, got '10 sec'"),
        ("0s", "must be more than 0, got '0s'"),
        ("-3", "a duration cannot be negative, got -3"),
        ("[1s]", "expected a duration like 250ms or 10s, got a list"),
    ],
)
def test_bad_duration_is_reported(value: str, message: str) -> None:
    assert problems(BASE + f"timeout: {value}\n") == [
        f"rules/demo.yaml:7: timeout: {message}"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10 MB/s", "expected a size like 64KiB or 10MiB, got '10 MB/s'"),
        ("1.5MiB", "expected a size like 64KiB or 10MiB, got '1.5MiB'"),
        ("0", "must be at least 1 bytes, got 0"),
    ],
)
def test_bad_size_is_reported(value: str, message: str) -> None:
    assert problems(BASE + f"limits:\n  max_header_bytes: {value}\n") == [
        f"rules/demo.yaml:8: limits.max_header_bytes: {message}"
    ]


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        (
            "8080",
            "expected host:port like 127.0.0.1:8080 or [::1]:8080, got 8080",
        ),
        (
            "'::1:8080'",
            "expected host:port like 127.0.0.1:8080 or [::1]:8080, got '::1:8080'",
        ),
        ("127.0.0.1:65536", "port must be from 0 to 65535, got 65536"),
        ("'[db8::zz]:80'", "'db8::zz' in brackets is not an IPv6 address"),
    ],
)
def test_bad_listen_address_is_reported(listen: str, message: str) -> None:
    assert problems(BASE + f"listen: {listen}\n") == [
        f"rules/demo.yaml:7: listen: {message}"
    ]


def test_bad_admin_listen_address_is_reported() -> None:
    assert problems(BASE + "admin:\n  listen: localhost\n") == [
        "rules/demo.yaml:8: admin.listen: expected host:port like 127.0.0.1:8080 "
        "or [::1]:8080, got 'localhost'"
    ]


def test_ip_hash_weights_over_the_ring_limit_are_refused_at_targets() -> None:
    text = BASE.replace(
        "  users:\n    targets: [http://127.0.0.1:9101]\n",
        "  users:\n"
        "    balance: ip_hash\n"
        "    targets:\n"
        "      - {url: http://127.0.0.1:9101, weight: 600}\n"
        "      - {url: http://127.0.0.1:9102, weight: 401}\n",
    )

    assert problems(text) == [
        "rules/demo.yaml:6: upstreams.users.targets: ip_hash target weights "
        "must sum to at most 1000, got 1001"
    ]


def test_ip_hash_weights_at_the_ring_limit_and_other_balancers_load() -> None:
    heavy = (
        "    targets:\n"
        "      - {url: http://127.0.0.1:9101, weight: 600}\n"
        "      - {url: http://127.0.0.1:9102, weight: 400}\n"
    )
    at_limit = BASE.replace(
        "    targets: [http://127.0.0.1:9101]\n", "    balance: ip_hash\n" + heavy
    )
    round_robin = BASE.replace(
        "    targets: [http://127.0.0.1:9101]\n",
        heavy.replace("400}", "4000}"),
    )

    assert sum(t.weight for t in load(at_limit).upstreams["users"].targets) == 1000
    assert sum(t.weight for t in load(round_robin).upstreams["users"].targets) == 4600


def test_non_loopback_admin_without_token_is_refused_at_its_listen_line() -> None:
    text = BASE + "admin:\n  listen: 0.0.0.0:8081\n"

    assert problems(text) == [
        "rules/demo.yaml:8: admin.token: the admin API on non-loopback 0.0.0.0:8081 "
        "needs a token (token: ${STRANGLER_ADMIN_TOKEN}), or listen on 127.0.0.1"
    ]


@pytest.mark.parametrize("listen", ["127.0.0.2:8081", "'[::1]:8081'", "localhost:1"])
def test_loopback_admin_needs_no_token(listen: str) -> None:
    rules = load(BASE + f"admin:\n  listen: {listen}\n")

    assert rules.admin is not None and rules.admin.token is None
    assert rules.admin.line == 8


def test_check_command_refuses_what_serve_could_not_run(tmp_path: Path) -> None:
    """`strangler check` exits 1 on the ip_hash ring limit and a tokenless admin."""
    from cli_support import run_cli

    path = tmp_path / "rules.yaml"
    path.write_text(
        BASE.replace(
            "    targets: [http://127.0.0.1:9101]\n",
            "    balance: ip_hash\n"
            "    targets: [{url: http://127.0.0.1:9101, weight: 1001}]\n",
        )
        + "admin: {listen: 0.0.0.0:8081}\n"
    )

    result = run_cli("check", str(path))

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:6: upstreams.users.targets: ip_hash target weights must sum to "
        "at most 1000, got 1001",
        f"{path}:8: admin.token: the admin API on non-loopback 0.0.0.0:8081 needs "
        "a token (token: ${STRANGLER_ADMIN_TOKEN}), or listen on 127.0.0.1",
        f"{path}: 2 problems",
    ]
    assert "Traceback" not in result.stderr


def test_route_with_both_to_and_split_is_refused() -> None:
    text = with_routes("""\
      - name: r
        to: users
        split: [{to: users, weight: 100}]
    """)
    assert problems(text) == [
        "rules/demo.yaml:8: routes[0]: give either 'to' or 'split', not both"
    ]


def test_route_with_neither_to_nor_split_is_refused() -> None:
    assert problems(with_routes("  - name: r\n    match: {path: /x}\n")) == [
        "rules/demo.yaml:8: routes[0]: missing 'to' or 'split': where should "
        "matching requests go?"
    ]


@pytest.mark.parametrize(
    ("sticky", "key", "message"),
    [
        (
            "{by: headr, name: X-User}",
            "routes[0].sticky.by",
            "expected one of header, cookie, ip, jwt_claim, got 'headr' "
            "(did you mean 'header'?)",
        ),
        (
            "{by: header}",
            "routes[0].sticky",
            "missing required key 'name' (the header that carries the key)",
        ),
        (
            "{by: jwt_claim}",
            "routes[0].sticky",
            "missing required key 'name' (the token claim that carries the key)",
        ),
        (
            "{by: ip, name: X-Real-IP}",
            "routes[0].sticky.name",
            "not used with by: ip; remove it",
        ),
        (
            "{by: header, name: 'X User'}",
            "routes[0].sticky.name",
            "expected an HTTP header name (no spaces or separators), got 'X User'",
        ),
        (
            "{by: header, name: X-User, cookie_ttl: 1h}",
            "routes[0].sticky.cookie_ttl",
            "only used with by: cookie; remove it",
        ),
    ],
)
def test_bad_sticky_is_reported(sticky: str, key: str, message: str) -> None:
    text = with_routes(f"  - name: r\n    to: users\n    sticky: {sticky}\n")
    assert problems(text) == [f"rules/demo.yaml:10: {key}: {message}"]


def test_unknown_balance_is_reported_with_a_suggestion() -> None:
    text = BASE.replace("  users:\n", "  users:\n    balance: roundrobin\n")
    assert problems(text) == [
        "rules/demo.yaml:5: upstreams.users.balance: expected one of round_robin, "
        "least_conn, ip_hash, random, got 'roundrobin' (did you mean 'round_robin'?)"
    ]


def test_unknown_transform_name_is_reported() -> None:
    text = with_routes("""\
      - name: r
        to: users
        transform: {request: xml_to_yaml, response: json_to_xml}
    """)
    assert problems(text) == [
        "rules/demo.yaml:10: routes[0].transform.request: expected one of "
        "xml_to_json, json_to_xml, got 'xml_to_yaml' (did you mean 'xml_to_json'?)"
    ]


def test_transform_needs_a_direction() -> None:
    text = with_routes("  - name: r\n    to: users\n    transform: {max_body: 1MiB}\n")
    assert problems(text) == [
        "rules/demo.yaml:10: routes[0].transform: give 'request', 'response', 'body' "
        "or a combination"
    ]


ONE_OF = "give exactly one of 'prefix' or 'regex', with 'to'"


@pytest.mark.parametrize(
    ("rewrite", "key", "message"),
    [
        ("{to: /v2}", "routes[0].rewrite", ONE_OF),
        (
            "{prefix: /a, regex: ^/a, to: /b}",
            "routes[0].rewrite",
            ONE_OF,
        ),
        ("{prefix: /a}", "routes[0].rewrite", "missing required key 'to'"),
        (
            "{prefix: a, to: /b}",
            "routes[0].rewrite.prefix",
            "expected a path starting with '/', got 'a'",
        ),
        (
            "{regex: '^/(a)', to: '/\\2'}",
            "routes[0].rewrite.to",
            "refers to group 2 but the regex has 1",
        ),
        (
            "{regex: '^/(?P<x>a)', to: '/\\g<y>'}",
            "routes[0].rewrite.to",
            "refers to group 'y' which the regex does not define",
        ),
    ],
)
def test_bad_rewrite_is_reported(rewrite: str, key: str, message: str) -> None:
    text = with_routes(f"  - name: r\n    to: users\n    rewrite: {rewrite}\n")
    assert problems(text) == [f"rules/demo.yaml:10: {key}: {message}"]


def test_match_path_must_start_with_a_slash() -> None:
    text = with_routes("  - name: r\n    to: users\n    match: {path: api/v1}\n")
    assert problems(text) == [
        "rules/demo.yaml:10: routes[0].match.path: expected a path starting with '/', "
        "got 'api/v1'"
    ]


def test_methods_must_be_http_tokens() -> None:
    text = with_routes("""\
      - name: r
        to: users
        match:
          methods: [GET, "PO ST", 7]
    """)
    assert problems(text) == [
        "rules/demo.yaml:11: routes[0].match.methods[1]: expected an HTTP method "
        "like GET (no spaces or separators), got 'PO ST'",
        "rules/demo.yaml:11: routes[0].match.methods[2]: expected a string, got 7",
    ]


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    text = BASE + "trusted_proxies:\n  - 10.0.0.0/8\n  - 10.0.0.300\n"
    assert problems(text) == [
        "rules/demo.yaml:9: trusted_proxies[1]: expected an IP address or CIDR like "
        "10.0.0.0/8, got '10.0.0.300'"
    ]


def test_duplicate_yaml_key_is_reported() -> None:
    text = BASE + "timeout: 5s\nlisten: 127.0.0.1:1\ntimeout: 6s\n"
    assert problems(text) == [
        "rules/demo.yaml:9: timeout: duplicate key (first on line 7)"
    ]


def test_yaml_syntax_error_reports_its_line() -> None:
    text = BASE + "routes:\n  - name: r\n    to: [users\n  - name: s\n"
    assert problems(text) == [
        "rules/demo.yaml:10: invalid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence)"
    ]


def test_empty_file_is_refused() -> None:
    assert problems("# nothing yet\n") == [
        "rules/demo.yaml:1: the rule file is empty; it needs at least upstreams "
        "and default"
    ]


def test_all_problems_are_reported_together_in_line_order() -> None:
    text = """\
        listen: 127.0.0.1:99999
        upstreams:
          monolith:
            targets: [ftp://127.0.0.1:1]
            balance: fastest
        default: monolith
        routes:
          - name: r
            to: nowhere
            match: {path: x}
          - name: r
            split: [{to: monolith, weight: 60}]
        admin: {token: "${MISSING}"}
        """
    assert problems(text) == [
        "rules/demo.yaml:1: listen: port must be from 0 to 65535, got 99999",
        "rules/demo.yaml:4: upstreams.monolith.targets[0]: bad target URL "
        "'ftp://127.0.0.1:1': the scheme must be http:// or https://; "
        "expected http://host:port",
        "rules/demo.yaml:5: upstreams.monolith.balance: expected one of round_robin, "
        "least_conn, ip_hash, random, got 'fastest'",
        "rules/demo.yaml:9: routes[0].to: unknown upstream 'nowhere'; "
        "defined upstreams: monolith",
        "rules/demo.yaml:10: routes[0].match.path: expected a path starting with "
        "'/', got 'x'",
        "rules/demo.yaml:11: routes[1].name: duplicate route name 'r' "
        "(first used on line 8)",
        "rules/demo.yaml:12: routes[1].split: weights must sum to 100, got 60",
        "rules/demo.yaml:13: admin.token: environment variable MISSING is not set",
    ]


def test_missing_rule_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_rules(HERE / "rules" / "no_such_file.yaml")
    assert str(caught.value).endswith(
        "no_such_file.yaml:1: cannot read the rule file: No such file or directory"
    )


def test_rule_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(BASE.encode() + b"admin: {token: \xff}\n")
    with pytest.raises(ConfigError) as caught:
        load_rules(path, {})
    assert str(caught.value) == f"{path}:7: the rule file is not valid UTF-8"


# The YAML reader underneath.


def test_yaml_source_records_the_line_of_every_key_path() -> None:
    document = load_yaml(EXAMPLE.read_text(), "x.yaml", {"STRANGLER_ADMIN_TOKEN": "t"})

    assert document.problems == ()
    assert document.lines[("admin", "token")] == 4
    assert document.lines[("upstreams", "users", "targets", 1)] == 17
    assert document.lines[("routes", 1)] == 26
    assert document.lines[("routes", 1, "split")] == 28
    assert document.lines[("routes", 1, "split", 1, "weight")] == 31
    assert document.line_of(("routes", 1, "split", 1, "nonexistent")) == 30


def test_yaml_source_keeps_yaml_1_1_words_as_text() -> None:
    document = load_yaml("a: off\nb: yes\nc: 1:30\nd: true\ne: 010\n", "x", {})
    assert document.value == {
        "a": "off",
        "b": "yes",
        "c": "1:30",
        "d": True,
        "e": "010",
    }


def test_yaml_source_merge_keys_let_explicit_keys_win() -> None:
    text = "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n"
    document = load_yaml(text, "x", {})
    assert document.problems == ()
    assert document.value["other"] == {"x": 1, "y": 3}
    assert document.lines[("other", "x")] == 1
    assert document.lines[("other", "y")] == 4


def test_yaml_source_refuses_an_alias_inside_itself() -> None:
    document = load_yaml("a: &a [1, *a]\n", "x.yaml", {})
    assert [str(p) for p in document.problems] == [
        "x.yaml:1: a[1]: an alias refers to a value that contains it"
    ]


def test_yaml_source_stops_an_alias_bomb() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    document = load_yaml("\n".join(lines) + "\n", "x.yaml", {})
    [problem] = document.problems
    assert problem.message == "more than 100000 values after aliases"


def test_format_key_spells_paths_as_users_read_them() -> None:
    assert (
        format_key(("routes", 2, "split", 0, "weight")) == "routes[2].split[0].weight"
    )
    assert (
        format_key(("upstreams", "users", "targets", 1)) == "upstreams.users.targets[1]"
    )
    assert format_key(("upstreams", "a b")) == 'upstreams["a b"]'
    assert format_key(()) == ""


def test_route_named_default_is_refused() -> None:
    text = with_routes("  - name: default\n    to: users\n")
    (problem,) = problems(text)
    assert problem.startswith(
        "rules/demo.yaml:8: routes[0].name: 'default' names the catch-all"
    )


def test_header_edit_values_must_be_printable_ascii() -> None:
    text = with_routes(
        "  - name: r\n    to: users\n    headers:\n"
        "      response: {set: {X-Price: 'costs 5 \u20ac'}}\n"
    )

    (problem,) = problems(text)

    assert problem.startswith("rules/demo.yaml:")
    assert "routes[0].headers.response.set.X-Price" in problem
    assert "printable ASCII" in problem
