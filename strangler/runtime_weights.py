"""Split weights changed at runtime, and the small file that keeps them.

A runtime change (`strangler shift`, the admin API, a migration plan) sits
on top of the rule file. It remembers the rule-file weights it was made
against: when the rule file later changes that route's weights, the file
wins and the runtime value is dropped, so an operator editing the file is
never silently overridden by an old shift.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("strangler.weights")


@dataclass(frozen=True)
class WeightOverride:
    """Weights set at runtime for one route."""

    weights: dict[str, float]
    base: dict[str, float]
    set_at: float
    by: str = "admin"


class WeightError(ValueError):
    """A requested weight change that cannot be applied; the message says why."""


def resolve_weights(
    route: str, split: dict[str, float], requested: dict[str, object]
) -> dict[str, float]:
    """Complete and check a requested change against a route's split.

    Names must be upstreams of the split, each weight a number from 0 to 100
    with at most two decimals. Unnamed branches take 0, except that when
    exactly one branch is unnamed it takes what is left, so a two-way split
    can be shifted by naming one side.
    """
    if not requested:
        raise WeightError("give at least one UPSTREAM=PERCENT")
    weights: dict[str, float] = {}
    for name, value in requested.items():
        if name not in split:
            known = ", ".join(split)
            raise WeightError(
                f"route {route!r} does not split to {name!r} (it has {known})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WeightError(f"weight for {name!r} must be a number, got {value!r}")
        if not _is_step(value):
            raise WeightError(
                f"weight for {name!r} must be 0..100 in steps of 0.01, got {value!r}"
            )
        weights[name] = round(float(value), 2)
    missing = [name for name in split if name not in weights]
    given = round(sum(weights.values()), 2)
    if len(missing) == 1:
        rest = round(100 - given, 2)
        if rest < 0:
            raise WeightError(f"weights sum to {given:g}, more than 100")
        weights[missing[0]] = rest
    else:
        for name in missing:
            weights[name] = 0.0
    total = round(sum(weights.values()), 2)
    if total != 100:
        raise WeightError(f"weights must sum to 100, got {total:g}")
    return {name: weights[name] for name in split}


def _is_step(value: float) -> bool:
    """A percentage from 0 to 100 in steps of 0.01."""
    return 0 <= value <= 100 and round(value * 100) == round(value * 100, 6)


def override_problem(override: WeightOverride) -> str | None:
    """Why a saved override cannot be used as it stands, or None when it can.

    Its weights must name the upstreams of the split it was made against
    (`base`), each in steps of 0.01, together summing to 100: what
    `resolve_weights` would have produced.
    """
    if set(override.weights) != set(override.base):
        return (
            f"its weights name {sorted(override.weights)} but the split it was "
            f"made against has {sorted(override.base)}"
        )
    for name, value in override.weights.items():
        if not _is_step(value):
            return f"weight for {name!r} must be 0..100 in steps of 0.01, got {value}"
    total = round(sum(override.weights.values()), 2)
    if total != 100:
        return f"weights must sum to 100, got {total:g}"
    return None


class RuntimeWeights:
    """Runtime overrides by route name, persisted as JSON when given a path."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.overrides: dict[str, WeightOverride] = {}
        if path is not None:
            self._load(path)

    def get(self, route: str) -> WeightOverride | None:
        return self.overrides.get(route)

    def set(self, route: str, override: WeightOverride) -> None:
        self.overrides[route] = override
        self.save()

    def clear(self, route: str) -> None:
        if self.overrides.pop(route, None) is not None:
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        if not self.overrides and not self.path.exists():
            return
        data = {"weights": {name: asdict(o) for name, o in self.overrides.items()}}
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("state_file_not_saved", path=str(self.path), error=exc.strerror)

    def _load(self, path: Path) -> None:
        """Read the saved overrides; anything unusable is logged and left out.

        The file is written by the gateway, but a person or a bad copy can
        break it: start-up must not fail on it, and an entry that could not
        have come from `resolve_weights` is never put in front of traffic.
        """
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("state_file_ignored", path=str(path), error=str(exc))
            return
        entries = (data.get("weights") or {}) if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            log.warning(
                "state_file_ignored",
                path=str(path),
                error="expected an object with a 'weights' object",
            )
            return
        for name, raw in entries.items():
            try:
                override = WeightOverride(
                    weights={k: float(v) for k, v in raw["weights"].items()},
                    base={k: float(v) for k, v in raw["base"].items()},
                    set_at=float(raw["set_at"]),
                    by=str(raw.get("by", "admin")),
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                problem: str | None = "expected an object with weights, base and set_at"
            else:
                problem = override_problem(override)
            if problem is not None:
                log.warning(
                    "state_file_entry_ignored",
                    path=str(path),
                    route=name,
                    reason=problem,
                    hint="the route runs on its rule-file weights",
                )
                continue
            self.overrides[name] = override


def default_state_path(rules_path: Path) -> Path:
    """`rules/demo.yaml` keeps its runtime state in `rules/demo.state.json`."""
    return rules_path.with_name(rules_path.stem + ".state.json")
