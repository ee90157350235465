"""`strangler demo`: the bundled monolith, users service and gateway in one process."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from strangler.demo import DEMO_RULES
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
    from strangler.server import GatewayServer

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
    import tempfile

    state_dir = tempfile.mkdtemp(prefix="strangler-demo-")
    server = GatewayServer(
        rules,
        reactor,
        lambda _path: rules,
        state_path=Path(state_dir) / "demo.state.json",
    )
    try:
        address = server.start()
        server.start_admin()
    except Exception as exc:
        print(f"cannot start the gateway on {rules.listen}: {exc}", file=sys.stderr)
        backends.stop()
        return 1
    gateway = f"http://{address.host}:{address.port}"
    print(_banner(gateway, backends), flush=True)

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


def _banner(gateway: str, backends: Any) -> str:
    monoliths = ", ".join(backends.monolith_urls)
    return f"""
strangler demo is running (Ctrl-C stops everything)

  gateway          {gateway}
  legacy monolith  {monoliths}  (XML, /api/v1)
  users service    {backends.users_url}  (JSON, /api/v2)
  rules            {DEMO_RULES}

Try:
  curl -i {gateway}/api/v1/orders                      # stays on the monolith
  curl -i {gateway}/api/v2/users/3                     # the new users service
  curl -i {gateway}/api/v1/users/3 -H 'X-User-Id: 7'   # 90/10 split, sticky per user
  curl -i {gateway}/old-home                           # redirects pass through
  strangler explain {DEMO_RULES} GET /api/v1/users/3 -H 'X-User-Id: 7'
  STRANGLER_ADMIN_TOKEN=demo-token strangler migrate start migrations/users.yaml
      # ramps users-v1 on evidence; break users with
      # curl -X POST '{backends.users_url}/admin/fail?rate=0.5' and it rolls back
"""
