"""The per-request mirroring decision, without sockets."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from strangler.errors import ConfigError
from strangler.model import ApiKeyAuth, Auth, Compare, Shadow
from strangler.proxy.exchange import LENGTH, NO_BODY
from strangler.rules import parse_rules
from strangler.shadow.mirror import Mirror, compile_spec, secret_names
from strangler.shadow.registry import ShadowRegistry
from strangler.shadow.stats import Redactor


def _mirror(**settings: Any) -> Mirror:
    shadow = Shadow(to="users", **settings)
    registry = ShadowRegistry(Clock())
    return Mirror(
        "r", shadow, compile_spec(shadow), None, registry, random.Random(7), Clock()
    )  # type: ignore[arg-type]


def _exchange(method: bytes = b"GET", to: str = "monolith", **extra: Any) -> Any:
    fields = {
        "method": method,
        "branch": SimpleNamespace(entry=SimpleNamespace(to=to)),
        "upgrade": False,
        "body_kind": NO_BODY,
        "content_length": 0,
        "pending": [],
        "request_done": False,
        **extra,
    }
    return SimpleNamespace(**fields)


def test_a_share_of_requests_is_sampled():
    mirror = _mirror(percent=25.0, max_in_flight=100_000)
    taken = sum(mirror.tap(_exchange()) is not None for _ in range(8000))
    assert 1800 <= taken <= 2200
    assert mirror.stats.in_flight == taken


def test_the_sampling_decision_comes_before_any_counting():
    mirror = _mirror(percent=0.0)
    for method in (b"GET", b"POST"):
        assert mirror.tap(_exchange(method)) is None
    assert mirror.stats.skipped == {} and mirror.stats.dropped == 0


def test_only_listed_methods_are_copied():
    mirror = _mirror()
    assert mirror.tap(_exchange(b"POST")) is None
    assert mirror.tap(_exchange(b"DELETE")) is None
    assert mirror.tap(_exchange(b"HEAD")) is not None
    assert mirror.stats.skipped == {"method": 2}
    listed = _mirror(methods=frozenset({"GET", "POST"}))
    assert listed.tap(_exchange(b"POST")) is not None


def test_requests_already_going_to_the_shadow_upstream_are_not_copied():
    mirror = _mirror()
    assert mirror.tap(_exchange(to="users")) is None
    assert mirror.stats.skipped == {"same_upstream": 1}


def test_upgrades_and_declared_oversize_bodies_are_skipped():
    mirror = _mirror(max_body=100, methods=frozenset({"GET", "POST"}))
    assert mirror.tap(_exchange(upgrade=True)) is None
    oversize = _exchange(b"POST", body_kind=LENGTH, content_length=101)
    assert mirror.tap(oversize) is None
    fits = _exchange(b"POST", body_kind=LENGTH, content_length=100)
    assert mirror.tap(fits) is not None
    assert mirror.stats.skipped == {"upgrade": 1, "too_large": 1}


def test_copies_past_max_in_flight_are_dropped_and_counted():
    mirror = _mirror(max_in_flight=2)
    calls = [mirror.tap(_exchange()) for _ in range(5)]
    assert [c is not None for c in calls] == [True, True, False, False, False]
    assert mirror.stats.dropped == 3

    calls[0].primary_failed()  # type: ignore[union-attr]
    assert mirror.stats.in_flight == 1
    assert mirror.tap(_exchange()) is not None


def test_an_unsupported_ignore_path_is_left_out_and_the_others_kept():
    shadow = Shadow(to="u", compare=Compare(ignore=("$.a", "$[?(@.x)]", "$..b")))
    spec = compile_spec(shadow, "r")
    assert spec.ignore.label_for(("a",)) == "ignore"
    assert spec.ignore.label_for(("x", "b")) == "ignore"
    assert len(spec.ignore.patterns) == 2


_REDACT_RULES = """\
upstreams:
  monolith: {targets: [http://127.0.0.1:9001]}
  users: {targets: [http://127.0.0.1:9101]}
default: monolith
routes:
  - name: r
    to: monolith
    shadow:
      to: users
      redact: %s
"""


def test_redact_names_are_read_in_lower_case_and_bad_ones_named_by_line():
    rules = parse_rules(_REDACT_RULES % "[X-Tenant, Api_Sig]", "rules.yaml", {})
    shadow = rules.routes[0].shadow
    assert shadow is not None and shadow.redact == ("x-tenant", "api_sig")

    with pytest.raises(ConfigError) as caught:
        parse_rules(_REDACT_RULES % "[X-Tenant, 'bad name']", "rules.yaml", {})
    assert [str(p) for p in caught.value.problems] == [
        "rules.yaml:10: routes[0].shadow.redact[1]: expected an HTTP header name "
        "(no spaces or separators), got 'bad name'"
    ]
    with pytest.raises(ConfigError) as caught:
        parse_rules(_REDACT_RULES % "X-Tenant", "rules.yaml", {})
    assert [str(p) for p in caught.value.problems] == [
        "rules.yaml:10: routes[0].shadow.redact: expected a list, got 'X-Tenant'"
    ]


def test_secret_names_add_where_api_keys_are_read():
    shadow = Shadow(to="users", redact=("x-tenant",))
    plain = SimpleNamespace(auth=None)
    keyed = SimpleNamespace(
        auth=Auth(api_key=ApiKeyAuth(header="x-client", query="client"))
    )
    assert secret_names(shadow, plain) == {"x-tenant"}  # type: ignore[arg-type]
    assert secret_names(shadow, keyed) == {"x-tenant", "x-client", "client"}  # type: ignore[arg-type]
    redactor = Redactor().extended(secret_names(shadow, keyed))  # type: ignore[arg-type]
    assert redactor.secret("X-Client") and redactor.secret("X-TENANT")
    assert not redactor.secret("X-Region")
