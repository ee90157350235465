"""`strangler migrate`: check a plan offline, run and steer it on a gateway.

`check` reads the plan (and the rule file, with `--rules`) on this machine
and needs no gateway. The other commands talk to a running gateway's admin
API like `strangler status` does: `--admin URL` (default
`$STRANGLER_ADMIN_URL`, else http://127.0.0.1:8081) and the token from
`$STRANGLER_ADMIN_TOKEN`. Exit codes: 0 done, 1 refused (a bad plan, an
action the plan's state does not allow, no gateway), 2 a command line that
cannot be understood.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from strangler.admin.client import (
    DEFAULT_ADMIN_URL,
    DEFAULT_TIMEOUT,
    TOKEN_ENV,
    URL_ENV,
    AdminCallError,
    AdminClient,
)
from strangler.errors import ConfigError
from strangler.units import format_duration

__all__ = ["format_migration", "register_commands", "run_check"]

_ACTIONS = {
    "pause": "stop a running plan where it is (the split stays as it is)",
    "resume": "go on with a paused plan; its current step's hold starts again",
    "abort": "end a plan and put the new side back to 0%",
    "promote": "move the new side to 100% now and end the plan (after a human look)",
}


def register_commands(subparsers: Any) -> None:
    """Add `migrate` and its sub-commands to the `strangler` command line."""
    migrate = subparsers.add_parser(
        "migrate",
        help="migration plans: ramp a split step by step, rolling back on its own",
        description="Check a migration plan, hand it to a running gateway, and "
        "watch or steer it. See docs/migrations.md.",
    )
    sub = migrate.add_subparsers(
        dest="migrate_command", required=True, metavar="ACTION"
    )

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument(
        "--admin",
        metavar="URL",
        help=f"admin API base URL (default: ${URL_ENV}, else {DEFAULT_ADMIN_URL}); "
        f"the token is read from ${TOKEN_ENV}",
    )
    admin.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default: {DEFAULT_TIMEOUT:g})",
    )

    check = sub.add_parser(
        "check",
        help="validate a plan file, with file:line errors",
        description="Validate a plan file. With --rules, also check that its route "
        "and upstreams exist and that the route splits to move_to.",
    )
    check.add_argument("plan", metavar="PLAN")
    check.add_argument(
        "--rules", metavar="RULES", help="the rule file to check against"
    )
    check.set_defaults(func=cmd_check)

    start = sub.add_parser(
        "start", parents=[admin], help="hand a plan to the running gateway"
    )
    start.add_argument("plan", metavar="PLAN")
    start.add_argument("--json", action="store_true", help="print JSON instead of text")
    start.set_defaults(func=_command("start", run_start))

    status = sub.add_parser(
        "status",
        parents=[admin],
        help="every plan: step, time at it, gates against their bounds, history",
    )
    status.add_argument("name", metavar="NAME", nargs="?", help="only this plan")
    status.add_argument(
        "--json", action="store_true", help="print JSON instead of text"
    )
    status.set_defaults(func=_command("status", run_status))

    for action, text in _ACTIONS.items():
        parser = sub.add_parser(
            action, parents=[admin], help=text.replace("%", "%%"), description=text
        )
        parser.add_argument("name", metavar="NAME")
        parser.add_argument(
            "--json", action="store_true", help="print JSON instead of text"
        )
        parser.set_defaults(func=_command(action, run_action), action=action)


# `migrate check`: offline.


def cmd_check(args: argparse.Namespace) -> int:
    return run_check(args.plan, args.rules)


def run_check(plan_path: str, rules_path: str | None) -> int:
    """Print `ok` and what the plan does, or every problem; the exit code."""
    from strangler.migration.plan import load_plan
    from strangler.rules import load_rules

    rules = None
    try:
        if rules_path is not None:
            rules = load_rules(rules_path)
        plan = load_plan(plan_path, rules)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    steps = " ".join(f"{step:g}%" for step in plan.steps)
    against = (
        f"checked against {rules_path}"
        if rules_path
        else ("not checked against a rule file (use --rules)")
    )
    print(
        f"{plan_path}: ok: plan {plan.name!r} moves {plan.route} to {plan.move_to} "
        f"through {steps}, holding {format_duration(plan.hold)} each, "
        f"on_fail {plan.on_fail}; {against}"
    )
    return 0


# Commands that talk to the gateway.


def _client(reactor: Any, args: argparse.Namespace) -> AdminClient:
    url = args.admin or os.environ.get(URL_ENV) or DEFAULT_ADMIN_URL
    return AdminClient(url, os.environ.get(TOKEN_ENV), reactor, timeout=args.timeout)


async def run_start(reactor: Any, args: argparse.Namespace) -> int:
    try:
        text = Path(args.plan).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        print(
            f"strangler migrate start: cannot read {args.plan}: {reason}",
            file=sys.stderr,
        )
        return 1
    client = _client(reactor, args)
    view = await client.post("/migrations", {"plan": text, "source": args.plan})
    _print(args, view, format_migration(view))
    return 0


async def run_status(reactor: Any, args: argparse.Namespace) -> int:
    client = _client(reactor, args)
    if args.name:
        view = await client.get(f"/migrations/{quote(args.name, safe='')}")
        _print(args, view, format_migration(view))
        return 0
    views = (await client.get("/migrations"))["migrations"]
    text = "\n\n".join(format_migration(view) for view in views)
    _print(args, views, text or "no migration plans")
    return 0


async def run_action(reactor: Any, args: argparse.Namespace) -> int:
    client = _client(reactor, args)
    path = f"/migrations/{quote(args.name, safe='')}/{args.action}"
    view = await client.post(path)
    _print(args, view, format_migration(view))
    return 0


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _command(
    name: str, work: Callable[[Any, argparse.Namespace], Awaitable[int]]
) -> Callable[[argparse.Namespace], NoReturn]:
    """An entry point running `work` on the global reactor; exits with its code."""

    def run(args: argparse.Namespace) -> NoReturn:
        from twisted.internet import task

        async def main(reactor: Any) -> None:
            try:
                code = await work(reactor, args)
            except AdminCallError as exc:
                print(f"strangler migrate {name}: {exc}", file=sys.stderr)
                code = 1
            except ValueError as exc:  # a malformed --admin URL
                print(f"strangler migrate {name}: {exc}", file=sys.stderr)
                code = 2
            if code:
                raise SystemExit(code)

        task.react(main)
        raise AssertionError("react() returns only by exiting")

    return run


# Output.


def format_migration(view: dict[str, Any]) -> str:
    """One plan for people: where it is, each gate against its bound, history."""
    plan = view["plan"]
    steps = plan["steps"]
    where = "before the first step"
    if view["step"] is not None:
        where = f"step {view['step']}/{len(steps)}"
    lines = [
        f"{_clean(view['name'])}: {view['status'].upper()}  {_clean(plan['route'])} "
        f"-> {_clean(plan['move_to'])} at {view['weight']:g}% ({where}; steps "
        f"{' '.join(f'{s:g}%' for s in steps)})"
    ]
    if view["at_step_seconds"] is not None:
        lines.append(
            f"  at this step for {format_duration(view['at_step_seconds'])} "
            f"(hold {format_duration(plan['hold'])})"
        )
    if view["reason"]:
        lines.append(f"  reason: {_clean(view['reason'])}")
    if view["gates"]:
        lines.append("  gates:")
        rows = [
            (gate["gate"], _value(gate), _bound(gate), gate["status"], gate["detail"])
            for gate in view["gates"]
        ]
        lines += [f"    {row}" for row in _table(rows)]
    if view["history"]:
        lines.append("  history:")
        for entry in view["history"]:
            lines.append(f"    {_history_line(entry, plan['move_to'])}")
    return "\n".join(lines)


def _value(gate: dict[str, Any]) -> str:
    value = gate["value"]
    if value is None:
        return "-"
    return f"{value:g}%" if gate["gate"] in _PERCENT_GATES else f"{value:g}"


def _bound(gate: dict[str, Any]) -> str:
    bound = gate["bound"]
    name = gate["gate"]
    shown = f"{bound:g}%" if name in _PERCENT_GATES else f"{bound:g}"
    return f"{'at least' if name.startswith('min_') else 'at most'} {shown}"


_PERCENT_GATES = ("max_error_rate", "min_shadow_agreement")


def _history_line(entry: dict[str, Any], move_to: str) -> str:
    text = (
        f"{entry['at']}  {entry['event']:<11} {entry['from']:g}% -> {entry['to']:g}%"
        f"  by {_clean(str(entry['by']))}"
    )
    if entry.get("held_for") is not None:
        text += f" after {format_duration(entry['held_for'])}"
    evidence = entry.get("evidence")
    if evidence:
        text += f"  [{_evidence_text(evidence, move_to, entry['event'])}]"
    if entry.get("reason"):
        text += f": {_clean(entry['reason'])}"
    return text


def _evidence_text(evidence: dict[str, Any], move_to: str, event: str) -> str:
    """The numbers of one history entry: requests, failures, p99s, agreement."""
    name = _clean(move_to)
    failed, sent = evidence["new_failed"], evidence["new_requests"]
    # A `started` entry counts what the route did before the plan.
    window = "since the gateway started: " if event == "started" else ""
    parts = [
        f"{window}{evidence['route_requests']} requests",
        f"{failed} of {sent} to {name} failed",
        f"p99 {name} {_ms(evidence.get('new_p99_ms'))}, "
        f"the others {_ms(evidence.get('old_p99_ms'))}",
    ]
    compared = evidence.get("shadow_compared")
    if compared is not None:
        parts.append(f"shadow {evidence.get('shadow_agreed')} of {compared} agreed")
    return "; ".join(parts)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} ms"


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
