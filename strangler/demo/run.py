"""`strangler demo`: the bundled monolith, users service and gateway in one process."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from strangler.demo import DEMO_PLAN, DEMO_RULES
from strangler.demo.backends import DemoPorts, start_demo_backends
from strangler.model import Address, Rules, Target, Upstream


def shift_ports(rules: Rules, offset: int) -> Rules:
    """The demo rules with every loopback port moved by `offset`."""
    if offset == 0:
        return rules

    def moved(target: Target) -> Target:
        port = target.port + offset
        return replace(target, port=port, url=f"{target.scheme}://{target.host}:{port}")

    upstreams = {
        name: replace(up, targets=tuple(moved(t) for t in up.targets))
        for name, up in rules.upstreams.items()
    }
    admin = rules.admin
    if admin is not None:
        admin = replace(admin, listen=_moved_address(admin.listen, offset))
    return replace(
        rules,
        listen=_moved_address(rules.listen, offset),
        admin=admin,
        upstreams=upstreams,
    )


def _moved_address(address: Address, offset: int) -> Address:
    return Address(address.host, address.port + offset)


def _demo_ports(rules: Rules) -> DemoPorts:
    monolith: Upstream = rules.upstreams["monolith"]
    users: Upstream = rules.upstreams["users"]
    return DemoPorts(
        monolith=tuple(t.port for t in monolith.targets), users=users.targets[0].port
    )


def run_demo(port_offset: int = 0, reactor: Any = None) -> int:
    """Start everything, print where to look, run until Ctrl-C."""
    from strangler.logs import configure_logging
    from strangler.rules import load_rules

    if reactor is None:
        from strangler.reactor import install

        reactor = install()
    rules = shift_ports(load_rules(DEMO_RULES), port_offset)
    configure_logging()
    try:
        backends = start_demo_backends(reactor, _demo_ports(rules))
    except Exception as exc:
        print(f"cannot start the demo services: {exc}", file=sys.stderr)
        print(
            "another demo running? try: strangler demo --port-offset 100",
            file=sys.stderr,
        )
        return 1
    # Runtime weights and plan progress live for one run only; the
    # directory goes when the demo stops, however it stops.
    state_dir = tempfile.mkdtemp(prefix="strangler-demo-")
    try:
        return _serve(reactor, rules, backends, Path(state_dir))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _serve(reactor: Any, rules: Rules, backends: Any, state_dir: Path) -> int:
    from strangler.server import GatewayServer

    server = GatewayServer(
        rules,
        reactor,
        lambda _path: rules,
        state_path=state_dir / "demo.state.json",
    )
    try:
        address = server.start()
        admin = server.start_admin()
    except Exception as exc:
        print(f"cannot start the gateway on {rules.listen}: {exc}", file=sys.stderr)
        backends.stop()
        return 1
    gateway = f"http://{address.host}:{address.port}"
    admin_url = f"http://{admin.host}:{admin.port}" if admin is not None else None
    print(_banner(gateway, admin_url, backends), flush=True)

    def shutdown() -> None:
        done = server.stop(drain_timeout=5.0)
        done.addBoth(lambda _: backends.stop())
        done.addBoth(lambda _: reactor.stop())

    import signal

    signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(shutdown))
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(shutdown))
    reactor.run(installSignalHandlers=False)
    print("demo stopped", flush=True)
    return 0


def _banner(gateway: str, admin: str | None, backends: Any) -> str:
    monoliths = ", ".join(backends.monolith_urls)
    rules, plan = shlex.quote(str(DEMO_RULES)), shlex.quote(str(DEMO_PLAN))
    text = f"""
strangler demo is running (Ctrl-C stops everything)

  gateway          {gateway}
  admin API        {admin or "off"}
  legacy monolith  {monoliths}  (XML, /api/v1)
  users service    {backends.users_url}  (JSON, /api/v2)
  rules            {DEMO_RULES}
  migration plan   {DEMO_PLAN}

Try:
  curl -i {gateway}/api/v1/orders                      # stays on the monolith
  curl -i {gateway}/api/v2/users/3                     # the new users service
  curl -i {gateway}/api/v1/users/3 -H 'X-User-Id: 7'   # 90/10 split, sticky per user
  curl -i {gateway}/old-home                           # redirects pass through
  strangler explain {rules} GET /api/v1/users/3 -H 'X-User-Id: 7'
"""
    if admin is None:
        return text
    # The demo rules read the token from the environment, falling back to
    # demo-token; a token the user set is theirs and is not printed.
    token = (
        "# STRANGLER_ADMIN_TOKEN is already set in your environment"
        if os.environ.get("STRANGLER_ADMIN_TOKEN")
        else "export STRANGLER_ADMIN_TOKEN=demo-token"
    )
    return (
        text
        + f"""
Move /api/v1/users to the users service on evidence, then break it:
  {token}
  strangler migrate start {plan} --admin {admin}
  while true; do curl -s -o /dev/null -H "X-User-Id: $RANDOM" \\
    {gateway}/api/v1/users/3; done              # traffic, in another terminal
  strangler migrate status --admin {admin}      # ramps 25% -> 50% -> 100%
  curl -X POST '{backends.users_url}/admin/fail?rate=0.5'   # the new service fails
  strangler migrate status --admin {admin}      # ROLLED_BACK: all on the monolith
"""
    )
