"""The progress of migration plans, and the JSON file that keeps it.

A restart must find each plan where it was: which step, paused or not, and
the history with its evidence. The weights themselves already persist in
the runtime weight file; this file, `<rules>.migrations.json` beside it,
holds only the plans. It is written whole to a temporary file and renamed
over the old one, so a crash leaves either the old or the new version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import structlog

from strangler.migration.evidence import GateResult, Snapshot
from strangler.migration.plan import Plan

__all__ = [
    "ACTIVE",
    "MAX_HISTORY",
    "Migration",
    "MigrationStore",
    "Status",
    "migrations_path",
]

log = structlog.get_logger("strangler.migration")

Status = Literal["running", "paused", "completed", "rolled_back", "aborted"]
STATUSES: tuple[str, ...] = get_args(Status)
ACTIVE = frozenset({"running", "paused"})
MAX_HISTORY = 200
"""History entries kept per plan; pause and resume cycles could grow it forever."""

_VERSION = 1


@dataclass
class Migration:
    """One plan and how far it got; only the runner changes it.

    `step` indexes `plan.steps` (None while the new side is back at 0%),
    `weight` is the share of `plan.move_to` the plan last set, and `others`
    how the rest is shared among the other upstreams of the split.
    """

    plan: Plan
    status: Status
    step: int | None
    weight: float
    others: dict[str, float]
    started_at: float
    step_started_at: float
    reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    gates: tuple[GateResult, ...] = ()
    baseline: Snapshot | None = None

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def remember(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        del self.history[:-MAX_HISTORY]

    def record(self) -> dict[str, Any]:
        """Plain JSON data for the progress file."""
        return {
            "plan": self.plan.as_dict(),
            "status": self.status,
            "step": self.step,
            "weight": self.weight,
            "others": self.others,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "reason": self.reason,
            "history": self.history,
            "gates": [gate.as_dict() for gate in self.gates],
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Migration:
        """Rebuild from `record()`; ValueError if the data does not fit."""
        try:
            plan = Plan.from_dict(data["plan"])
            status = str(data["status"])
            if status not in STATUSES:
                raise ValueError(f"unknown status {status!r}")
            step = data["step"]
            if step is not None and not 0 <= int(step) < len(plan.steps):
                raise ValueError(f"step {step!r} is outside the plan's steps")
            history = data.get("history") or []
            if not isinstance(history, list):
                raise ValueError("history is not a list")
            return cls(
                plan=plan,
                status=status,  # type: ignore[arg-type]
                step=None if step is None else int(step),
                weight=float(data["weight"]),
                others={str(k): float(v) for k, v in data["others"].items()},
                started_at=float(data["started_at"]),
                step_started_at=float(data["step_started_at"]),
                reason=None if data.get("reason") is None else str(data["reason"]),
                history=[entry for entry in history if isinstance(entry, dict)],
                gates=tuple(GateResult(**gate) for gate in data.get("gates") or ()),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"incomplete record: {exc}") from exc


class MigrationStore:
    """Reads and writes the progress file; without a path it keeps nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> list[Migration]:
        """Every plan in the file; a damaged entry is logged and left out."""
        if self.path is None:
            return []
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("migration_state_ignored", path=str(self.path), error=str(exc))
            return []
        records = data.get("migrations") if isinstance(data, dict) else None
        found = []
        for record in records if isinstance(records, list) else []:
            try:
                found.append(Migration.from_record(record))
            except ValueError as exc:
                log.warning(
                    "migration_state_entry_ignored", path=str(self.path), error=str(exc)
                )
        return found

    def save(self, migrations: Iterable[Migration]) -> str | None:
        """Write every plan; None when done, else why not (also logged)."""
        if self.path is None:
            return None
        data = {"version": _VERSION, "migrations": [m.record() for m in migrations]}
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
            os.replace(temporary, self.path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            log.error("migration_state_not_saved", path=str(self.path), error=reason)
            return reason
        return None


def migrations_path(state_path: Path) -> Path:
    """Where plans keep their progress: `demo.state.json` -> `demo.migrations.json`."""
    name = state_path.name
    stem = (
        name.removesuffix(".state.json")
        if name.endswith(".state.json")
        else (state_path.stem)
    )
    return state_path.with_name(stem + ".migrations.json")
