"""Running wrk and reading its report.

wrk prints a human report; this module turns it into numbers. Latencies are
kept in milliseconds, transfer rates in bytes per second. A report that lacks
the throughput line is an error, not a zero: a silent zero would make a
broken candidate look merely slow.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from procs import Processes, pinned

_TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+(\S+)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.MULTILINE)
_TRANSFER = re.compile(r"^Transfer/sec:\s+(\S+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


class WrkError(RuntimeError):
    """wrk failed or printed a report without the figures we need."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk measurement."""

    requests_per_s: float
    requests: int
    latency_ms: dict[str, float]
    transfer_bytes_per_s: float
    non_2xx: int
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_quantity(text: str, units: dict[str, float] | dict[str, int]) -> float:
    """`'1.23ms'` -> 1.23 in the unit whose factor is 1."""
    match = _QUANTITY.match(text.strip())
    if match is None or match.group(2) not in units:
        raise WrkError(
            f"cannot read {text!r}; expected a number with one of {list(units)}"
        )
    return float(match.group(1)) * units[match.group(2)]


def parse_report(text: str) -> WrkResult:
    """Read the figures out of `wrk --latency` output."""
    rps = _RPS.search(text)
    if rps is None:
        raise WrkError(f"no Requests/sec line in wrk output:\n{text}")
    latency = {
        f"p{m.group(1)}": parse_quantity(m.group(2), _TIME_UNITS)
        for m in _PERCENTILE.finditer(text)
    }
    if "p50" not in latency or "p99" not in latency:
        raise WrkError(
            f"no latency distribution in wrk output (use --latency):\n{text}"
        )
    transfer = _TRANSFER.search(text)
    total = _TOTAL.search(text)
    non_2xx = _NON_2XX.search(text)
    socket_errors = _SOCKET_ERRORS.search(text)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        requests=int(total.group(1)) if total else 0,
        latency_ms=latency,
        transfer_bytes_per_s=(
            parse_quantity(transfer.group(1), _SIZE_UNITS) if transfer else 0.0
        ),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=(
            dict(
                zip(
                    ("connect", "read", "write", "timeout"),
                    (int(g) for g in socket_errors.groups()),
                    strict=True,
                )
            )
            if socket_errors
            else {}
        ),
        raw=text,
    )


def run_wrk(
    procs: Processes,
    url: str,
    *,
    connections: int,
    duration: float,
    cpus: str | None,
    script: Path | None = None,
    threads: int = 1,
) -> WrkResult:
    """Run one bounded wrk measurement against `url` and parse it."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"refusing to load {url!r}: only http://127.0.0.1 is allowed")
    seconds = max(1, round(duration))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
    ]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    done = procs.run(pinned(cpus, argv), timeout=seconds + 30)
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
    return parse_report(done.stdout)
