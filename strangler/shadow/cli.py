"""`strangler diffs ROUTE`: what a route's shadow comparison found, for people.

Reads `GET /shadow/{route}` from a running gateway's admin API and prints
the agreement rate, the fields that differ most with one example each, the
noise the gateway learned and where copies were lost. Exit codes: 0 with a
report, 1 when the admin API cannot answer (or does not know the route), 2
for a command line that cannot be understood.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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

__all__ = ["format_diffs", "register_commands", "run_diffs"]

DEFAULT_TOP = 10
_EXAMPLE_WIDTH = 60


def register_commands(subparsers: Any) -> None:
    """Add `diffs` to the `strangler` command line."""
    diffs = subparsers.add_parser(
        "diffs",
        help="show what a route's shadow comparison found",
        description="Agreement rate, the fields that differ most with one example "
        "each, learned noise, and copies lost to errors, limits or timeouts.",
    )
    diffs.add_argument("route", metavar="ROUTE")
    diffs.add_argument(
        "--admin",
        metavar="URL",
        help=f"admin API base URL (default: ${URL_ENV}, else {DEFAULT_ADMIN_URL}); "
        f"the token is read from ${TOKEN_ENV}",
    )
    diffs.add_argument(
        "--top",
        type=_positive,
        default=DEFAULT_TOP,
        metavar="N",
        help=f"how many differing fields to list (default: {DEFAULT_TOP})",
    )
    diffs.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default: {DEFAULT_TIMEOUT:g})",
    )
    diffs.add_argument("--json", action="store_true", help="print the raw JSON report")
    diffs.set_defaults(func=cmd_diffs)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, got {text!r}"
        )
    return value


def cmd_diffs(args: argparse.Namespace) -> NoReturn:
    from twisted.internet import task

    async def main(reactor: Any) -> None:
        code = await run_diffs(reactor, args)
        if code:
            raise SystemExit(code)

    task.react(main)
    raise AssertionError("react() returns only by exiting")


async def run_diffs(reactor: Any, args: argparse.Namespace) -> int:
    """Fetch one route's report and print it; the exit code."""
    url = args.admin or os.environ.get(URL_ENV) or DEFAULT_ADMIN_URL
    try:
        client = AdminClient(
            url, os.environ.get(TOKEN_ENV), reactor, timeout=args.timeout
        )
        report = await client.get(f"/shadow/{quote(args.route, safe='')}")
    except (AdminCallError, ValueError) as exc:
        print(f"strangler diffs: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_diffs(report, args.top))
    return 0


def format_diffs(report: dict[str, Any], top: int = DEFAULT_TOP) -> str:
    """The readable report for one route, from `GET /shadow/{route}`."""
    lines = [_heading(report), _agreement(report), _traffic(report)]

    kinds = report["differences"]
    line = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
    lines.append(f"disagreeing pairs by kind: {line}")
    if report["ignored"]:
        lines.append(f"{report['ignored']} differences left out by compare.ignore")

    fields = report["fields"]
    lines.append("")
    if fields:
        shown = fields[:top]
        lines.append(f"TOP DIFFERING FIELDS ({len(shown)} of {len(fields)})")
        lines += _table(
            [("PAIRS", "KIND", "FIELD", "EXAMPLE")]
            + [
                (str(f["count"]), f["kind"], f["field"], _example(f["example"]))
                for f in shown
            ]
        )
    else:
        lines.append("No differing fields.")

    noise = report["noise"]
    if noise["mode"] == "auto":
        lines.append("")
        lines.append(
            f"LEARNED NOISE (compare.noise: auto; {noise['learned_from']} of "
            f"{noise['sample_size']} repeated requests compared, "
            f"{noise['unusable']} unusable)"
        )
        if noise.get("whole_body"):
            lines.append(
                f"{noise['whole_body']} repeated pairs differed as whole bodies "
                "(not JSON or XML, over 1 MiB, or not parsing): not comparable "
                "field by field, so nothing was learned from them"
            )
        if noise["fields"]:
            lines += _table(
                [("FIELD", "KIND", "SEEN", "LEFT OUT")]
                + [
                    (n["field"], n["kind"], str(n["seen"]), str(n["suppressed"]))
                    for n in noise["fields"]
                ]
            )
        else:
            lines.append("none learned so far")

    lost = []
    if report["error_reasons"]:
        # The same errors the heading counts; timeouts are counted there apart.
        lost.append("shadow errors by reason: " + _counts(report["error_reasons"]))
    if report["skipped_reasons"]:
        lost.append("not copied: " + _counts(report["skipped_reasons"]))
    if lost:
        lines.append("")
        lines += lost
    return "\n".join(_clean(line) for line in lines)


def _heading(report: dict[str, Any]) -> str:
    settings = report.get("settings")
    state = "" if report["active"] else " (no longer in the rules)"
    if settings is None:
        return f"route {report['route']}{state}"
    methods = ", ".join(settings["methods"])
    return (
        f"route {report['route']}: shadow to {settings['to']}, "
        f"{settings['percent']:g}% of {methods}{state}"
    )


def _agreement(report: dict[str, Any]) -> str:
    compared = report["compared"]
    if not compared:
        return "agreement: no pairs compared yet"
    rate = report["agreement"] * 100
    return (
        f"agreement: {rate:.1f}% ({report['agreed']} of {compared} compared pairs "
        "agree)"
    )


def _traffic(report: dict[str, Any]) -> str:
    return (
        f"copied {report['mirrored']}, shadow errors {report['errors']}, "
        f"timeouts {report['timeouts']}, not copied {report['skipped']}, "
        f"dropped at max_in_flight {report['dropped']}, in flight {report['in_flight']}"
    )


def _example(example: dict[str, Any] | None) -> str:
    if not example:
        return "-"
    where = f"{example['method']} {example['target']}"
    if example["where"] not in ("$", "status") and "[" in example["where"]:
        where += f" at {example['where']}"
    return (
        f"{_cut(where)}: primary {_cut(example['primary'])} "
        f"/ shadow {_cut(example['shadow'])}"
    )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in counts.items() if count)


def _cut(text: str) -> str:
    return text if len(text) <= _EXAMPLE_WIDTH else text[: _EXAMPLE_WIDTH - 3] + "..."


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    ]


def _clean(text: str) -> str:
    """Text from the gateway (field names, bodies) made safe for a terminal."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)
