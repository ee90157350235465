"""How the gateway state resolves each branch's timeouts from the rule file."""

from __future__ import annotations

import textwrap

from twisted.internet.testing import MemoryReactorClock

from strangler.gateway import Gateway
from strangler.rules import parse_rules

RULES = """
listen: 127.0.0.1:0
timeout: 30s
upstreams:
  monolith: {targets: [http://127.0.0.1:9001]}
  users: {targets: [http://127.0.0.1:9101], timeout: 4s}
  legacy: {targets: [http://127.0.0.1:9201], idle_timeout: 7s}
default: monolith
routes:
  - name: quick
    match: {path: /quick}
    timeout: 2s
    connect_timeout: 300ms
    split:
      - {to: users, weight: 100, fallback: legacy}
      - {to: monolith, weight: 0}
  - name: plain
    match: {path: /plain}
    to: users
"""


def _state():  # type: ignore[no-untyped-def]
    rules = parse_rules(textwrap.dedent(RULES), "rules.yaml", {})
    return Gateway(rules, MemoryReactorClock()).state


def test_idle_timeout_defaults_to_the_timeout_in_force_for_the_branch() -> None:
    state = _state()

    quick = {b.entry.to: b for b in state.plans["quick"].branches}
    (plain,) = state.plans["plain"].branches

    assert (quick["users"].timeout, quick["users"].idle_timeout) == (2.0, 2.0)
    assert (quick["monolith"].timeout, quick["monolith"].idle_timeout) == (2.0, 2.0)
    assert (plain.timeout, plain.idle_timeout) == (4.0, 4.0)
    assert state.default_plan.branches[0].idle_timeout == 30.0


def test_a_fallback_outside_the_split_keeps_the_routes_timeouts() -> None:
    state = _state()

    fallback = state.plans["quick"].fallbacks["users"]

    assert fallback.upstream.name == "legacy"
    assert fallback.timeout == 2.0
    assert fallback.connect_timeout == 0.3
    # The upstream's own idle_timeout still beats the route's timeout.
    assert fallback.idle_timeout == 7.0
