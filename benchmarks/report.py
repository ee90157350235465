"""Turning raw runs into the tables a person reads.

Each figure is the median over runs; ratios are to nginx `proxy_pass`
measured in the same run. The tables are Markdown, so a run's output can be
pasted into `docs/performance.md` as it is.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from candidates import (
    BIG_BODY_BYTES,
    NGINX,
    SHADOW_BASE,
    SHADOW_COST,
    Candidate,
    Running,
    Unavailable,
)
from wrk import WrkResult

REFERENCE = NGINX.name
DIRECT = "direct"


def progress(step: str, name: str, result: WrkResult, others: float) -> str:
    latency = result.latency_ms
    errors = f", {result.errors} errors" if result.errors else ""
    return (
        f"{step:>14}  {name:<20} {result.requests_per_s:>10,.0f} req/s  "
        f"p50 {latency['p50']:.2f} ms  p99 {latency['p99']:.2f} ms  "
        f"others {others:.0f}% CPU{errors}"
    )


def pinning(pin: bool) -> dict[str, str]:
    if not pin:
        return {"all": "not pinned (fewer than 2 CPUs)"}
    return {
        "gateway under test": "core 0 (strangler-workers2: cores 0-1)",
        "wrk": "core 1 (for strangler-workers2: cores 0-1)",
        "backend nginx, shadow nginx and the never-answering target": "core 1",
        "this script, idle-connection holder, py-spy": "core 1",
    }


def describe(
    table: Iterable[Candidate],
    running: Mapping[str, Running],
    unavailable: Mapping[str, Unavailable],
) -> dict[str, Any]:
    """What each row of the main table was, including what it lacked."""
    out: dict[str, Any] = {}
    for candidate in table:
        entry: dict[str, Any] = {"kind": candidate.kind, "label": candidate.label}
        if candidate.name in running:
            started = running[candidate.name]
            entry.update(available=True, features=list(started.features))
            entry["missing"] = dict(started.missing)
        elif candidate.name in unavailable:
            entry.update(
                available=False,
                features=[],
                missing=dict(unavailable[candidate.name].missing),
            )
        out[candidate.name] = entry
    return out


def features_text(entry: Mapping[str, Any]) -> str:
    if entry["kind"] != "strangler":
        return str(entry["label"])
    if not entry["available"]:
        return "not available yet: " + "; ".join(
            f"{name}: {why}" for name, why in entry["missing"].items()
        )
    text = " + ".join(entry["features"])
    if entry["missing"]:
        text += " (not yet: " + ", ".join(entry["missing"]) + ")"
    return text


def _median(runs: list[dict[str, Any]], key: str) -> float:
    if key == "rps":
        return statistics.median(r["requests_per_s"] for r in runs)
    if key in ("cpu_percent", "rss_kib_max", "other_cpu_percent"):
        return statistics.median(r[key] for r in runs)
    return statistics.median(r["latency_ms"][key] for r in runs)


def _errors(runs: list[dict[str, Any]]) -> int:
    return sum(r["non_2xx"] + sum(r["socket_errors"].values()) for r in runs)


def _measured(runs: list[dict[str, Any]], ref_rps: float | None) -> dict[str, Any]:
    rps = _median(runs, "rps")
    every = [r["requests_per_s"] for r in runs]
    return {
        "rps": rps,
        # How far apart the runs were: a wide spread means a noisy figure.
        "spread_percent": (
            100.0 * (max(every) - min(every)) / rps if len(runs) > 1 and rps else None
        ),
        "p50_ms": _median(runs, "p50"),
        "p99_ms": _median(runs, "p99"),
        "ratio": rps / ref_rps if ref_rps else None,
        "cpu_percent": _median(runs, "cpu_percent"),
        "other_cpu_percent": max(r.get("other_cpu_percent", 0.0) for r in runs),
        "rss_load_mib": max(r["rss_kib_max"] for r in runs) / 1024,
        "errors": _errors(runs),
    }


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """Medians and ratios for every table; stored in the JSON as well."""
    out: dict[str, Any] = {}
    throughput = results.get("throughput", {})
    ref = throughput.get(REFERENCE)
    ref_rps = _median(ref["runs"], "rps") if ref else None
    rows = []
    for name, entry in results["candidates"].items():
        row: dict[str, Any] = {"candidate": name, "features": features_text(entry)}
        measured = throughput.get(name)
        if measured and measured["runs"]:
            row.update(_measured(measured["runs"], ref_rps))
            row["rss_idle_mib"] = results["idle_rss_kib"].get(name, 0) / 1024
        rows.append(row)
    out["throughput"] = rows

    latency = results.get("latency_c1", {})
    if DIRECT in latency:
        direct = _median(latency[DIRECT]["runs"], "p50")
        added_ref = None
        if REFERENCE in latency:
            added_ref = _median(latency[REFERENCE]["runs"], "p50") - direct
        out["latency_c1"] = []
        for name, measured in latency.items():
            added = _median(measured["runs"], "p50") - direct
            out["latency_c1"].append(
                {
                    "candidate": name,
                    "p50_ms": _median(measured["runs"], "p50"),
                    "p99_ms": _median(measured["runs"], "p99"),
                    "added_p50_us": added * 1000 if name != DIRECT else None,
                    "other_cpu_percent": max(
                        r.get("other_cpu_percent", 0.0) for r in measured["runs"]
                    ),
                    "added_vs_nginx": (
                        added / added_ref
                        if added_ref and name not in (DIRECT, REFERENCE)
                        else None
                    ),
                }
            )

    out["shadow_cost"] = shadow_cost(throughput)
    if results.get("soak"):
        out["soak"] = soak(results["soak"])

    out["large_bodies"] = {}
    for case, table in results.get("large_bodies", {}).items():
        ref_case = table.get(REFERENCE)
        ref_case_rps = _median(ref_case["runs"], "rps") if ref_case else None
        rows = []
        for name, measured in table.items():
            row = {"candidate": name, **_measured(measured["runs"], ref_case_rps)}
            row["body_mibps"] = row["rps"] * BIG_BODY_BYTES / 2**20
            rows.append(row)
        out["large_bodies"][case] = rows
    return out


def shadow_cost(throughput: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each shadow row against strangler-plain in the same run, as ratios."""
    base = throughput.get(SHADOW_BASE.name)
    if not base or not base["runs"]:
        return []
    base_rps = _median(base["runs"], "rps")
    base_p50, base_p99 = _median(base["runs"], "p50"), _median(base["runs"], "p99")
    rows = []
    for candidate in SHADOW_COST:
        measured = throughput.get(candidate.name)
        if not measured or not measured["runs"]:
            continue
        runs = measured["runs"]
        rows.append(
            {
                "candidate": candidate.name,
                "rps": _median(runs, "rps"),
                "rps_ratio": _median(runs, "rps") / base_rps if base_rps else None,
                "p50_ratio": _median(runs, "p50") / base_p50 if base_p50 else None,
                "p99_ratio": _median(runs, "p99") / base_p99 if base_p99 else None,
                "errors": _errors(runs),
            }
        )
    return rows


def soak(record: Mapping[str, Any]) -> dict[str, Any]:
    """Start, end and peak RSS of the soak run, and how much it grew."""
    samples = record["rss_kib"]
    start, end = (samples[0], samples[-1]) if samples else (0, 0)
    # Memory that settles early (pools, caches) is not growth: also compare
    # the second half of the run with its end.
    middle = samples[len(samples) // 2] if samples else 0
    return {
        "candidate": record["candidate"],
        "seconds": record["seconds"],
        "rps": record["requests_per_s"],
        "samples": len(samples),
        "rss_start_mib": start / 1024,
        "rss_middle_mib": middle / 1024,
        "rss_end_mib": end / 1024,
        "rss_peak_mib": max(samples, default=0) / 1024,
        "growth_mib": (end - start) / 1024,
        "growth_second_half_mib": (end - middle) / 1024,
        "errors": record["non_2xx"] + sum(record["socket_errors"].values()),
    }


# -- Markdown -------------------------------------------------------------------

Column = tuple[str, str, str]  # header, key in the summary row, format

THROUGHPUT_COLUMNS: list[Column] = [
    ("candidate", "candidate", ""),
    ("features", "features", ""),
    ("req/s", "rps", ",.0f"),
    ("spread %", "spread_percent", ".0f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("x nginx", "ratio", ".2f"),
    ("CPU %", "cpu_percent", ".0f"),
    ("others' CPU %", "other_cpu_percent", ".0f"),
    ("RSS idle MiB", "rss_idle_mib", ".0f"),
    ("RSS load MiB", "rss_load_mib", ".0f"),
    ("errors", "errors", "d"),
]
LATENCY_COLUMNS: list[Column] = [
    ("candidate", "candidate", ""),
    ("p50 ms", "p50_ms", ".3f"),
    ("p99 ms", "p99_ms", ".3f"),
    ("added p50 us", "added_p50_us", ".0f"),
    ("added / nginx's added", "added_vs_nginx", ".2f"),
    ("others' CPU %", "other_cpu_percent", ".0f"),
]
BODY_COLUMNS: list[Column] = [
    ("candidate", "candidate", ""),
    ("req/s", "rps", ",.0f"),
    ("body MiB/s", "body_mibps", ",.0f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("x nginx", "ratio", ".2f"),
    ("CPU %", "cpu_percent", ".0f"),
    ("others' CPU %", "other_cpu_percent", ".0f"),
    ("peak RSS MiB", "rss_load_mib", ".0f"),
    ("errors", "errors", "d"),
]
IDLE_COLUMNS: list[Column] = [
    ("candidate", "candidate", ""),
    ("open", "open", "d"),
    ("failed", "failed", "d"),
    ("closed by server", "closed_by_server", "d"),
    ("RSS before MiB", "rss_before_mib", ".1f"),
    ("RSS held MiB", "rss_held_mib", ".1f"),
    ("KiB per connection", "kib_per_connection", ".1f"),
]
SHADOW_COLUMNS: list[Column] = [
    ("candidate", "candidate", ""),
    ("req/s", "rps", ",.0f"),
    (f"req/s x {SHADOW_BASE.name}", "rps_ratio", ".2f"),
    ("p50 x", "p50_ratio", ".2f"),
    ("p99 x", "p99_ratio", ".2f"),
    ("errors", "errors", "d"),
]
SOAK_COLUMNS: list[Column] = [
    ("candidate", "candidate", ""),
    ("seconds", "seconds", "d"),
    ("req/s", "rps", ",.0f"),
    ("RSS start MiB", "rss_start_mib", ".1f"),
    ("RSS middle MiB", "rss_middle_mib", ".1f"),
    ("RSS end MiB", "rss_end_mib", ".1f"),
    ("RSS peak MiB", "rss_peak_mib", ".1f"),
    ("growth MiB", "growth_mib", "+.1f"),
    ("second half MiB", "growth_second_half_mib", "+.1f"),
    ("errors", "errors", "d"),
]
BODY_TITLES = {
    "post_1mib": "1 MiB request body (POST)",
    "get_1mib": "1 MiB response (GET)",
}


def table(columns: list[Column], rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table; a value a row lacks is shown as `-`."""
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def idle_rows(idle: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, m in idle["candidates"].items():
        grown = m["rss_held_kib"] - m["rss_before_kib"]
        rows.append(
            {
                **m,
                "candidate": name,
                "rss_before_mib": m["rss_before_kib"] / 1024,
                "rss_held_mib": m["rss_held_kib"] / 1024,
                "kib_per_connection": grown / m["open"] if m["open"] else None,
            }
        )
    return rows


def render(results: Mapping[str, Any]) -> str:
    """All tables of one run, as Markdown."""
    s = results["summary"]
    settings = results["settings"]
    side = settings["side_duration_s"]
    parts = [
        f"### Throughput: wrk -t1 -c{settings['connections']} "
        f"-d{settings['duration_s']}s, median of {settings['runs']}",
        "",
        table(THROUGHPUT_COLUMNS, s["throughput"]),
    ]
    if s.get("shadow_cost"):
        parts += [
            "",
            f"### Shadow cost, against {SHADOW_BASE.name} in the same run",
            "",
            table(SHADOW_COLUMNS, s["shadow_cost"]),
        ]
    if s.get("soak"):
        parts += [
            "",
            f"### Memory over a {s['soak']['seconds']} s run with a hanging shadow: "
            f"RSS sampled every second",
            "",
            table(SOAK_COLUMNS, [s["soak"]]),
        ]
    if s.get("latency_c1"):
        parts += [
            "",
            f"### Added latency at one connection: wrk -c1 -d{side}s",
            "",
            table(LATENCY_COLUMNS, s["latency_c1"]),
        ]
    for case, rows in s.get("large_bodies", {}).items():
        connections = results["large_body_connections"]
        parts += [
            "",
            f"### {BODY_TITLES.get(case, case)}: wrk -c{connections} -d{side}s",
            "",
            table(BODY_COLUMNS, rows),
        ]
    idle = results.get("idle_connections")
    if idle:
        parts += [
            "",
            f"### Memory with {idle['count']:,} idle keep-alive connections",
            "",
            table(IDLE_COLUMNS, idle_rows(idle)),
        ]
    profile = results.get("profile")
    if profile:
        parts += [
            "",
            f"### Profile of {profile['candidate']} ({profile['samples']} samples)",
        ]
        for title, key in (
            ("self time by function", "self_time"),
            ("self time by line", "by_line"),
            ("inclusive time by function", "inclusive"),
            ("self time by file", "by_file"),
        ):
            parts += ["", title, ""]
            parts += [f"- {pct:5.1f}%  {name}" for name, pct in profile[key]]
    return "\n".join(parts)
