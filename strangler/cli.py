"""The `strangler` command line.

Each sub-command is a small function; only this module and the functions it
calls at start-up touch the global reactor. Exit codes: 0 success, 1 the
rules or the request were refused, 2 the command line itself was wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from strangler.errors import ConfigError
from strangler.model import Address, Rules


def _load_or_report(path: str) -> Rules | None:
    from strangler.rules import load_rules

    try:
        return load_rules(Path(path))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return None
    except OSError as exc:
        print(f"{path}: cannot read rule file: {exc.strerror}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    rules = _load_or_report(args.rules)
    if rules is None:
        return 1
    print(
        f"{args.rules}: ok ({len(rules.routes)} routes, "
        f"{len(rules.upstreams)} upstreams, default {rules.default})"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from strangler.explain import explain

    rules = _load_or_report(args.rules)
    if rules is None:
        return 1
    headers = {}
    for raw in args.header or []:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            print(f"-H {raw!r}: expected 'Name: value'", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    if not args.path.startswith("/"):
        print(f"PATH {args.path!r}: must start with /", file=sys.stderr)
        return 2
    from strangler.security.paths import PathError

    try:
        result = explain(
            rules, args.method, args.path, headers, client_ip=args.client_ip
        )
    except PathError as exc:
        print(f"the gateway refuses this path with 400: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(result.as_text())
    return 0


def cmd_transform(args: argparse.Namespace) -> int:
    """Run a route's transform offline: see what a client's payload becomes."""
    from strangler.transforms import TransformError, pipeline

    rules = _load_or_report(args.rules)
    if rules is None:
        return 1
    route = next((r for r in rules.routes if r.name == args.route), None)
    if route is None:
        print(f"no route named {args.route!r}", file=sys.stderr)
        return 1
    entries = [e for e in route.split if e.transform is not None]
    if args.upstream:
        entries = [e for e in entries if e.to == args.upstream]
    if not entries:
        print(
            f"route {args.route!r} has no transform for that upstream", file=sys.stderr
        )
        return 1
    transform = entries[0].transform
    assert transform is not None
    body = sys.stdin.buffer.read()
    convert = pipeline.convert_response if args.response else pipeline.convert_request
    try:
        body = convert(transform, body)
    except TransformError as exc:
        print(f"transform failed ({exc.status}): {exc.message}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(body + (b"" if body.endswith(b"\n") else b"\n"))
    return 0


def _parse_listen(text: str) -> Address:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return Address(host, int(port))


def cmd_serve(args: argparse.Namespace) -> int:
    from strangler.reactor import install

    reactor = install()

    from strangler.logs import configure_logging
    from strangler.rules import load_rules
    from strangler.server import GatewayServer

    rules = _load_or_report(args.rules)
    if rules is None:
        return 1
    state = Path(args.state) if args.state else None
    if state is not None and (unusable := _state_problem(state)):
        print(f"strangler serve: --state {state}: {unusable}", file=sys.stderr)
        return 2
    if args.workers > 1 and args.worker_fd is None:
        from strangler.workers import run_workers

        return run_workers(
            Path(args.rules),
            rules,
            args.workers,
            args.listen,
            watch=not args.no_watch,
            state=args.state,
        )
    configure_logging()
    override = _parse_listen(args.listen) if args.listen else None
    server = GatewayServer(
        rules, reactor, load_rules, listen_override=override, state_path=state
    )
    # Before `listening` is logged, so a signal sent on seeing it is handled.
    server.install_signal_handlers()
    try:
        server.start(inherited_fd=args.worker_fd)
        if args.worker_index == 0:
            server.start_admin()
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"cannot listen: {exc}", file=sys.stderr)
        return 1
    if not args.no_watch:
        server.watch()
    server.follow_state()
    reactor.run(installSignalHandlers=False)
    return 0


def _state_problem(path: Path) -> str | None:
    """Why runtime state cannot be kept at `path`, or None if it can."""
    import os

    if path.is_dir():
        return "is a directory; give a file name, like state.json"
    folder = path.parent
    if not folder.is_dir():
        return f"the directory {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write in {folder}"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return "cannot read and write this file"
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    from strangler.demo.run import run_demo

    return run_demo(port_offset=args.port_offset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strangler",
        description="A Strangler-Fig migration gateway: route, split, shadow and "
        "translate traffic away from a legacy monolith.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway with a rule file")
    serve.add_argument("rules", metavar="RULES")
    serve.add_argument("--listen", help="override the rule file's listen address")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (one per core)",
    )
    serve.add_argument(
        "--no-watch",
        action="store_true",
        help="do not watch the rule file: reload it only on SIGHUP or POST "
        "/reload (runtime weights in the state file are still followed)",
    )
    serve.add_argument(
        "--state",
        metavar="PATH",
        help="where runtime weights are kept (default: beside RULES, "
        "rules.yaml -> rules.state.json); migration progress goes beside it "
        "(state.json -> state.migrations.json)",
    )
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate a rule file")
    check.add_argument("rules", metavar="RULES")
    check.set_defaults(func=cmd_check)

    exp = sub.add_parser(
        "explain", help="show what the gateway would do with a request"
    )
    exp.add_argument("rules", metavar="RULES")
    exp.add_argument("method", metavar="METHOD")
    exp.add_argument("path", metavar="PATH")
    exp.add_argument("-H", "--header", action="append", metavar="'K: V'")
    exp.add_argument(
        "--client-ip", default="127.0.0.1", help="peer address for ip stickiness"
    )
    exp.add_argument("--json", action="store_true", help="print JSON instead of text")
    exp.set_defaults(func=cmd_explain)

    trans = sub.add_parser(
        "transform", help="run a route's body transform on stdin, offline"
    )
    trans.add_argument("rules", metavar="RULES")
    trans.add_argument("route", metavar="ROUTE")
    trans.add_argument("--upstream", help="the split branch whose transform to run")
    trans.add_argument(
        "--response", action="store_true", help="run the response direction instead"
    )
    trans.set_defaults(func=cmd_transform)

    demo = sub.add_parser(
        "demo", help="run a legacy monolith, a new service and the gateway"
    )
    demo.add_argument(
        "--port-offset", type=int, default=0, help="add this to every demo port"
    )
    demo.set_defaults(func=cmd_demo)

    from strangler.admin.client import register_commands

    register_commands(sub)
    from strangler.shadow.cli import register_commands as register_shadow_commands

    register_shadow_commands(sub)
    from strangler.migration.cli import register_commands as register_migrate_commands

    register_migrate_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
