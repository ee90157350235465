"""Migration plan files: read one, check it against the rules, hold it frozen.

A plan says which route to ramp, which of its upstreams takes over, the
percentages to pass through, how long to hold each one and what evidence
must hold before moving on. It is checked the way a rule file is: every
problem is collected with its file, line and key, and raised together as
one `ConfigError`, so `strangler migrate check` shows all of them at once.

Percentages may be written `5` or `5%`. Plans do not read environment
variables: a `${VAR}` in a plan is reported, because the gateway that runs
the plan and the shell that sent it do not share an environment.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, get_args

from strangler.errors import ConfigError, RuleProblem
from strangler.model import Rules
from strangler.units import parse_duration
from strangler.yaml_source import Document, KeyPath, format_key, load_yaml

__all__ = ["CHECK_INTERVAL", "Gates", "OnFail", "Plan", "load_plan", "parse_plan"]

CHECK_INTERVAL = 1.0
"""Seconds between the runner's checks of every running plan; the shortest hold.

A hold shorter than this would be held for a whole check anyway, so the
checker refuses it rather than let the file promise what the gateway cannot do.
"""

OnFail = Literal["rollback", "pause"]
ON_FAIL: tuple[str, ...] = get_args(OnFail)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PERCENT_TEXT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")


@dataclass(frozen=True, slots=True)
class Gates:
    """The evidence a step needs before the plan moves on; None means not asked.

    Rates and agreement are percentages; `max_p99_ratio` is new p99 over old.
    """

    min_requests: int = 0
    max_error_rate: float | None = None
    max_p99_ratio: float | None = None
    min_shadow_agreement: float | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """One checked plan: ramp `route` onto `move_to` through `steps` percent."""

    name: str
    route: str
    move_to: str
    steps: tuple[float, ...]
    hold: float
    gates: Gates = field(default_factory=Gates)
    on_fail: OnFail = "rollback"
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the progress file and the admin API."""
        return {
            "name": self.name,
            "route": self.route,
            "move_to": self.move_to,
            "steps": list(self.steps),
            "hold": self.hold,
            "gates": {
                "min_requests": self.gates.min_requests,
                "max_error_rate": self.gates.max_error_rate,
                "max_p99_ratio": self.gates.max_p99_ratio,
                "min_shadow_agreement": self.gates.min_shadow_agreement,
            },
            "on_fail": self.on_fail,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan saved by `as_dict`; ValueError if it was tampered with."""
        try:
            gates = data["gates"]
            on_fail = str(data["on_fail"])
            if on_fail not in ON_FAIL:
                raise ValueError(f"on_fail {on_fail!r} is not one of {ON_FAIL}")
            steps = tuple(float(step) for step in data["steps"])
            if not steps:
                raise ValueError("a saved plan has no steps")
            return cls(
                name=str(data["name"]),
                route=str(data["route"]),
                move_to=str(data["move_to"]),
                steps=steps,
                hold=float(data["hold"]),
                gates=Gates(
                    min_requests=int(gates["min_requests"]),
                    max_error_rate=_optional_float(gates["max_error_rate"]),
                    max_p99_ratio=_optional_float(gates["max_p99_ratio"]),
                    min_shadow_agreement=_optional_float(gates["min_shadow_agreement"]),
                ),
                on_fail=on_fail,  # type: ignore[arg-type]
                source=str(data.get("source", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"saved plan is incomplete: {exc}") from exc


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def load_plan(path: str | Path, rules: Rules | None = None) -> Plan:
    """Read and check the plan file at `path` (against `rules` when given)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [RuleProblem(source, 1, "", f"cannot read the plan file: {reason}")]
        ) from exc
    except UnicodeDecodeError as exc:
        problem = RuleProblem(source, 1, "", "the plan file is not valid UTF-8")
        raise ConfigError([problem]) from exc
    return parse_plan(text, source, rules)


def parse_plan(text: str, source: str, rules: Rules | None = None) -> Plan:
    """Check plan `text`; `source` names it in problems and gives the default name.

    With `rules`, the route must exist and split, and `move_to` must be one
    of its upstreams. Without them only the plan's own shape is checked.
    """
    document = load_yaml(text, source, {})
    if document.syntax_error:
        raise ConfigError(list(document.problems))
    checker = _PlanChecker(document)
    plan = checker.read(Path(source).stem, rules)
    if checker.problems or plan is None:
        raise ConfigError(sorted(checker.problems, key=lambda problem: problem.line))
    return plan


class _PlanChecker:
    """Collects every problem of one plan document, each at its key's line."""

    def __init__(self, document: Document) -> None:
        self.document = document
        self.problems: list[RuleProblem] = list(document.problems)

    def report(self, path: KeyPath, message: str) -> None:
        if path in self.document.bad_paths:
            return
        line = self.document.line_of(path)
        self.problems.append(
            RuleProblem(self.document.source, line, format_key(path), message)
        )

    def read(self, default_name: str, rules: Rules | None) -> Plan | None:
        value = self.document.value
        if not isinstance(value, dict):
            self.report((), f"expected a mapping of plan keys, got {_show(value)}")
            return None
        before = len(self.problems)
        self._unknown_keys(value, (), _PLAN_KEYS)
        for key in ("route", "move_to", "steps", "hold"):
            if key not in value:
                self.report((), f"missing required key {key!r}")

        name = self._name(value, default_name)
        route = self._text(value, "route")
        move_to = self._text(value, "move_to")
        steps = self._steps(value.get("steps"), ("steps",)) if "steps" in value else ()
        hold = self._hold(value["hold"]) if "hold" in value else None
        gates = self._gates(value.get("gates", {}), ("gates",))
        on_fail = self._on_fail(value.get("on_fail", "rollback"))
        if rules is not None and route is not None:
            self._against_rules(rules, route, move_to, gates)

        if len(self.problems) != before:
            return None
        assert name and route and move_to and steps and hold and gates and on_fail
        return Plan(
            name=name,
            route=route,
            move_to=move_to,
            steps=steps,
            hold=hold,
            gates=gates,
            on_fail=on_fail,  # type: ignore[arg-type]
            source=self.document.source,
        )

    def _unknown_keys(
        self, value: dict[str, Any], path: KeyPath, allowed: tuple[str, ...]
    ) -> None:
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.report(
                    (*path, key),
                    f"unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}",
                )

    def _name(self, value: dict[str, Any], default: str) -> str | None:
        if "name" not in value:
            if _NAME.fullmatch(default):
                return default
            self.report(
                (),
                f"the file name gives the plan name {default!r}, which is not a "
                "name of letters, digits, '_', '.' and '-'; set `name:`",
            )
            return None
        name = value["name"]
        if isinstance(name, str) and _NAME.fullmatch(name):
            return name
        self.report(
            ("name",),
            f"expected a name of letters, digits, '_', '.' and '-', got {_show(name)}",
        )
        return None

    def _text(self, value: dict[str, Any], key: str) -> str | None:
        if key not in value:
            return None
        text = value[key]
        if isinstance(text, str) and text:
            return text
        self.report((key,), f"expected a name, got {_show(text)}")
        return None

    def _steps(self, value: Any, path: KeyPath) -> tuple[float, ...]:
        if not isinstance(value, list) or not value:
            self.report(
                path,
                f"expected a list of percentages like [1, 5, 25], got {_show(value)}",
            )
            return ()
        steps: list[float] = []
        ok = True
        for index, raw in enumerate(value):
            where = (*path, index)
            step = self.percent(raw, where)
            if step is None:
                ok = False
                continue
            if step == 0:
                self.report(where, "a step must be above 0%; the plan starts from 0")
                ok = False
                continue
            if steps and step <= steps[-1]:
                self.report(
                    where,
                    f"steps must rise: {_pct(step)} is not above the step before "
                    f"it ({_pct(steps[-1])})",
                )
                ok = False
                continue
            steps.append(step)
        if ok and steps[-1] != 100:
            self.report(
                (*path, len(value) - 1),
                f"the last step must be 100%, got {_pct(steps[-1])}: a plan ends "
                "with move_to taking the whole route (to stop part way, pause "
                "the plan or use `strangler shift`)",
            )
            ok = False
        return tuple(steps) if ok else ()

    def _hold(self, value: Any) -> float | None:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            self.report(("hold",), f"expected a duration like 10m, got {_show(value)}")
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.report(("hold",), str(exc))
            return None
        if not math.isfinite(seconds) or seconds <= 0:
            self.report(("hold",), f"must be a duration above 0, got {_show(value)}")
            return None
        if seconds < CHECK_INTERVAL:
            self.report(
                ("hold",),
                f"must be at least {CHECK_INTERVAL:g}s, got {_show(value)}: the "
                f"gateway checks running plans every {CHECK_INTERVAL:g}s",
            )
            return None
        return seconds

    def _gates(self, value: Any, path: KeyPath) -> Gates | None:
        if value is None:
            return Gates()
        if not isinstance(value, dict):
            self.report(path, f"expected a mapping of gates, got {_show(value)}")
            return None
        before = len(self.problems)
        self._unknown_keys(value, path, _GATE_KEYS)
        found: dict[str, Any] = {}
        for key, reader in _GATE_READERS.items():
            if key in value:
                found[key] = reader(self, value[key], (*path, key))
        if len(self.problems) != before:
            return None
        return Gates(**found)

    def _on_fail(self, value: Any) -> str | None:
        if isinstance(value, str) and value in ON_FAIL:
            return value
        self.report(
            ("on_fail",), f"expected {' or '.join(ON_FAIL)}, got {_show(value)}"
        )
        return None

    def percent(self, value: Any, path: KeyPath) -> float | None:
        """A percentage from 0 to 100 with at most two decimals: `5`, `5%`, `0.5%`."""
        number: Any = value
        if isinstance(value, str):
            found = _PERCENT_TEXT.fullmatch(value)
            number = float(found.group(1)) if found else None
        ok = isinstance(number, int | float) and not isinstance(number, bool)
        if not ok or not math.isfinite(number) or not 0 <= number <= 100:
            self.report(
                path, f"expected a percentage from 0 to 100 like 5%, got {_show(value)}"
            )
            return None
        try:
            exponent = Decimal(str(number)).as_tuple().exponent
        except InvalidOperation:  # pragma: no cover - finite floats always convert
            exponent = 0
        if isinstance(exponent, int) and exponent < -2:
            self.report(path, f"use at most two decimals, got {_show(value)}")
            return None
        return float(number)

    def _against_rules(
        self,
        rules: Rules,
        route_name: str,
        move_to: str | None,
        gates: Gates | None,
    ) -> None:
        source = rules.source
        route = next((r for r in rules.routes if r.name == route_name), None)
        if route is None:
            names = ", ".join(r.name for r in rules.routes) or "none"
            self.report(
                ("route",),
                f"{source} has no route named {route_name!r} (its routes: {names})",
            )
            return
        upstreams = [entry.to for entry in route.split]
        if len(upstreams) < 2:
            self.report(
                ("route",),
                f"route {route_name!r} sends everything to {upstreams[0]!r}; a plan "
                "needs a route with a split of two or more upstreams",
            )
            return
        wants_shadow = gates is not None and gates.min_shadow_agreement is not None
        if wants_shadow and route.shadow is None:
            self.report(
                ("gates", "min_shadow_agreement"),
                f"route {route_name!r} has no shadow in {source}, so this gate "
                "could never be judged; add a `shadow` to the route or remove "
                "the gate",
            )
        if move_to is None:
            return
        if wants_shadow and route.shadow is not None and route.shadow.to != move_to:
            self.report(
                ("gates", "min_shadow_agreement"),
                f"the shadow of route {route_name!r} goes to {route.shadow.to!r}, "
                f"not to {move_to!r}: its agreement says nothing about {move_to!r}",
            )
        if move_to not in rules.upstreams:
            self.report(
                ("move_to",),
                f"{source} has no upstream named {move_to!r} "
                f"(its upstreams: {', '.join(rules.upstreams)})",
            )
        elif move_to not in upstreams:
            self.report(
                ("move_to",),
                f"route {route_name!r} splits to {', '.join(upstreams)}; "
                f"{move_to!r} is not one of them",
            )


def _min_requests(checker: _PlanChecker, value: Any, path: KeyPath) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    checker.report(path, f"expected a whole number of at least 0, got {_show(value)}")
    return None


def _rate(checker: _PlanChecker, value: Any, path: KeyPath) -> float | None:
    return checker.percent(value, path)


def _ratio(checker: _PlanChecker, value: Any, path: KeyPath) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and math.isfinite(value) and value > 0:
        return float(value)
    checker.report(
        path,
        f"expected a ratio above 0 like 1.5 (new p99 / old p99), got {_show(value)}",
    )
    return None


_PLAN_KEYS = ("name", "route", "move_to", "steps", "hold", "gates", "on_fail")
_GATE_READERS: dict[str, Callable[[_PlanChecker, Any, KeyPath], Any]] = {
    "min_requests": _min_requests,
    "max_error_rate": _rate,
    "max_p99_ratio": _ratio,
    "min_shadow_agreement": _rate,
}
_GATE_KEYS = tuple(_GATE_READERS)


def _show(value: Any) -> str:
    """A value from the file the way its author wrote it."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _pct(value: float) -> str:
    return f"{value:g}%"
