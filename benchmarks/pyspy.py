"""Profile a running gateway with py-spy and say where its time goes.

py-spy samples the process from outside, so the gateway runs unmodified. The
collapsed-stack output (`--format raw`) is summarised as self time per
function, per line and per file (where the CPU actually was) and inclusive
time per function (what a call costs with everything below it), each as a
share of all samples. Time inside C code (a `send`, an orjson call) counts
as self time of the Python line that called it.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from procs import Processes

_LINE_NUMBER = re.compile(r":\d+\)$")
NO_PYTHON_FRAME = "(no Python frame: native code or idle)"


@dataclass(frozen=True)
class ProfileSummary:
    """Shares of samples, as (name, percent) pairs, largest first."""

    samples: int
    self_time: list[tuple[str, float]]
    inclusive: list[tuple[str, float]]
    by_file: list[tuple[str, float]]
    by_line: list[tuple[str, float]]


def record(
    procs: Processes, pid: int, seconds: int, out: Path, fmt: str, cpus: str | None
) -> Path:
    """Sample `pid` for `seconds` into `out` (`fmt` is `raw` or `flamegraph`)."""
    if shutil.which("py-spy") is None:
        raise RuntimeError("py-spy is not installed: python3 -m pip install py-spy")
    argv = [
        "py-spy", "record", "--pid", str(pid), "--duration", str(seconds),
        "--rate", "250", "--idle", "--nonblocking", "--format", fmt, "-o", str(out),
    ]  # fmt: skip
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    done = procs.run(argv, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr.strip()}")
    return out


def summarise(collapsed: Path, top: int = 15) -> ProfileSummary:
    """Read py-spy's collapsed stacks and rank functions and files."""
    self_counts: Counter[str] = Counter()
    inclusive_counts: Counter[str] = Counter()
    file_counts: Counter[str] = Counter()
    line_counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        # py-spy writes samples taken outside any Python frame with no stack.
        raw_frames = stack.split(";") if stack.strip() else [NO_PYTHON_FRAME]
        frames = [_LINE_NUMBER.sub(")", frame) for frame in raw_frames]
        total += count
        line_counts[raw_frames[-1]] += count
        self_counts[frames[-1]] += count
        file_counts[_file_of(frames[-1])] += count
        for frame in set(frames):
            inclusive_counts[frame] += count
    if total == 0:
        raise RuntimeError(f"{collapsed}: no samples")

    def ranked(counter: Counter[str]) -> list[tuple[str, float]]:
        return [
            (name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)
        ]

    return ProfileSummary(
        total,
        ranked(self_counts),
        ranked(inclusive_counts),
        ranked(file_counts),
        ranked(line_counts),
    )


def _file_of(frame: str) -> str:
    """`name (path/to/file.py)` -> `path/to/file.py` (py-spy already shortens it)."""
    if frame == NO_PYTHON_FRAME:
        return frame
    return frame.rpartition(" (")[2].rstrip(")") or frame
