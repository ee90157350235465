"""The plan runner: moves a route's split step by step, on evidence, by the clock.

Each running plan is checked every `interval` seconds. A check reads the
step's evidence (counter differences since the step started, see
`strangler.migration.evidence`) and judges every gate. A failed gate acts
at once, without waiting for the hold to end: `on_fail: rollback` puts the
new side back to 0%, `on_fail: pause` freezes the split where it is. The
plan advances only when the hold has passed and no gate fails or waits.

Weights change only through `Gateway.set_weights`, so they persist in the
runtime weight file and reach other workers like any `strangler shift`.
The new side's share grows and the others shrink in proportion; with a
sticky split that moves keys only onto the new side during a ramp. If the
split changes under a running plan (a shift, a rule-file edit, the route
gone) the plan pauses rather than fight the operator.

The runner takes the clock it is given and never reads the time itself,
so tests run whole plans on `twisted.internet.task.Clock`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

import structlog
from twisted.internet.task import LoopingCall

from strangler.errors import StranglerError
from strangler.migration.evidence import (
    AgreementSource,
    Evidence,
    GateResult,
    Snapshot,
    gateway_agreement,
    judge,
    take_snapshot,
)
from strangler.migration.plan import CHECK_INTERVAL, Plan
from strangler.migration.state import Migration, MigrationStore
from strangler.runtime_weights import WeightError

if TYPE_CHECKING:
    from strangler.gateway import Gateway, RoutePlan

__all__ = ["ACTIONS", "CHECK_INTERVAL", "Action", "MigrationError", "MigrationRunner"]

log = structlog.get_logger("strangler.migration")

Action = Literal["pause", "resume", "abort", "promote"]
ACTIONS: tuple[str, ...] = get_args(Action)

_BASIS = 100  # weights are percentages in steps of 0.01
_ALLOWED: dict[str, tuple[str, ...]] = {
    "pause": ("running",),
    "resume": ("paused",),
    "abort": ("running", "paused"),
    "promote": ("running", "paused"),
}


class MigrationError(StranglerError):
    """A plan or an action the runner refuses; the message says why.

    `status` and `code` are what the admin API answers with.
    """

    def __init__(self, message: str, status: int = 409, code: str = "conflict") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class MigrationRunner:
    """Runs every migration plan of one gateway."""

    def __init__(
        self,
        gateway: Gateway,
        clock: Any,
        store: MigrationStore | None = None,
        agreement: AgreementSource | None = None,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.gateway = gateway
        self.clock = clock
        self.store = store if store is not None else MigrationStore(None)
        self.agreement = (
            agreement if agreement is not None else gateway_agreement(gateway)
        )
        self.interval = interval
        self.migrations: dict[str, Migration] = {}
        self._loop: LoopingCall | None = None

    # Life cycle.

    def run(self) -> None:
        """Take up the plans the progress file holds and start checking."""
        now = self.clock.seconds()
        for migration in self.store.load():
            self.migrations[migration.name] = migration
            if migration.status == "running":
                # The counters of the step so far died with the old process:
                # the step's hold starts again with fresh evidence.
                migration.step_started_at = now
            if migration.active:
                migration.baseline = self._snapshot(migration)
            log.info(
                "migration_restored",
                plan=migration.name,
                route=migration.plan.route,
                status=migration.status,
                weight=migration.weight,
            )
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # What the admin API reads.

    def get(self, name: str) -> Migration:
        migration = self.migrations.get(name)
        if migration is None:
            known = ", ".join(sorted(self.migrations)) or "none"
            raise MigrationError(
                f"no migration plan named {name!r} (known: {known})",
                404,
                "unknown_migration",
            )
        return migration

    def evidence(self, migration: Migration) -> Evidence | None:
        """The evidence of an active plan's current step so far.

        A paused plan keeps counting from where its step started, so the
        person deciding to resume or promote it sees what happened since.
        """
        if not migration.active or migration.baseline is None:
            return None
        return Evidence.between(migration.baseline, self._snapshot(migration))

    def current_gates(self, migration: Migration) -> tuple[GateResult, ...]:
        """Gates judged now for an active plan; the last judgement otherwise."""
        evidence = self.evidence(migration)
        if evidence is None:
            return migration.gates
        plan = migration.plan
        return judge(
            plan.gates, evidence, move_to=plan.move_to, weight=migration.weight
        )

    # Starting and the operator's actions.

    def start(self, plan: Plan, by: str = "admin") -> Migration:
        """Begin `plan` now; MigrationError if it cannot run on the live split.

        The ramp begins at the first step at or above the share the new side
        has already, so starting a plan never moves a sticky user back.
        """
        existing = self.migrations.get(plan.name)
        if existing is not None and existing.active:
            raise MigrationError(
                f"plan {plan.name!r} is already {existing.status} at "
                f"{existing.weight:g}%; abort it before starting it again"
            )
        for other in self.migrations.values():
            if other.active and other.plan.route == plan.route:
                raise MigrationError(
                    f"route {plan.route!r} is already being moved by plan "
                    f"{other.name!r} ({other.status}); abort that one first"
                )
        route = self._route_plan(plan)
        if isinstance(route, str):
            raise MigrationError(route, 400, "invalid_plan")

        current = route.effective_weights()
        have = current[plan.move_to]
        first = next((i for i, step in enumerate(plan.steps) if step >= have), None)
        if first is None or have >= 100:
            raise MigrationError(
                f"{plan.move_to!r} already takes {have:g}% of {plan.route!r}; "
                "nothing to do"
            )
        # A plan whose progress cannot be kept would silently start over (or
        # be forgotten) after a restart: refuse it before the split moves.
        unsaved = self.store.save(self.migrations.values())
        if unsaved is not None:
            raise MigrationError(
                f"cannot keep the plan's progress in {self.store.path}: {unsaved}; "
                "start the gateway with `strangler serve --state PATH` pointing "
                "at a writable place",
                503,
                "state_not_writable",
            )
        now = self.clock.seconds()
        migration = Migration(
            plan=plan,
            status="running",
            step=first,
            weight=have,
            others=_others(current, route.rule_weights(), plan.move_to),
            started_at=now,
            step_started_at=now,
        )
        self._apply(migration, plan.steps[first])
        migration.baseline = self._snapshot(migration)
        skipped = plan.steps[:first]
        reason = None
        if skipped:
            shown = ", ".join(f"{step:g}%" for step in skipped)
            reason = f"skipped {shown}: {plan.move_to} already had {have:g}%"
        # What the route did before the plan: every request since this
        # gateway started, at the split it had then.
        before = Evidence.so_far(migration.baseline)
        self._record(migration, "started", have, by, reason, evidence=before)
        self.migrations[plan.name] = migration
        self._save()
        return migration

    def act(self, name: str, action: str, by: str = "admin") -> Migration:
        """`pause`, `resume`, `abort` or `promote` the plan called `name`."""
        migration = self.get(name)
        allowed = _ALLOWED.get(action)
        if allowed is None:
            raise MigrationError(
                f"no action {action!r}; use {', '.join(ACTIONS)}", 404, "unknown_action"
            )
        if migration.status not in allowed:
            raise MigrationError(
                f"plan {name!r} is {migration.status}; {action} needs a plan that is "
                f"{' or '.join(allowed)}"
            )
        # The evidence so far goes into the history: what the human looked at.
        evidence = self.evidence(migration)
        if evidence is not None:
            migration.gates = self.current_gates(migration)
        try:
            getattr(self, f"_{action}")(migration, by, evidence)
        except WeightError as exc:
            raise MigrationError(f"cannot {action} plan {name!r}: {exc}") from exc
        self._save()
        return migration

    def _pause(self, migration: Migration, by: str, evidence: Evidence | None) -> None:
        self._halt(migration, f"paused by {by}", by, evidence)

    def _resume(self, migration: Migration, by: str, evidence: Evidence | None) -> None:
        drift = self._drift(migration)
        if drift is not None:
            raise MigrationError(
                f"{drift}; shift it back to {migration.weight:g}% or abort the plan"
            )
        # The entry keeps what the person saw before resuming; the step's
        # hold and evidence then start afresh.
        migration.status = "running"
        migration.reason = None
        self._record(
            migration, "resumed", migration.weight, by, None, evidence=evidence
        )
        migration.gates = ()
        migration.step_started_at = self.clock.seconds()
        migration.baseline = self._snapshot(migration)

    def _abort(self, migration: Migration, by: str, evidence: Evidence | None) -> None:
        before = migration.weight
        self._apply(migration, 0.0)
        migration.status = "aborted"
        migration.step = None
        migration.reason = f"aborted by {by}"
        self._record(
            migration, "aborted", before, by, migration.reason, evidence=evidence
        )

    def _promote(
        self, migration: Migration, by: str, evidence: Evidence | None
    ) -> None:
        # Promote means the whole route, whatever step the plan was at (a plan
        # saved by an older version may end below 100%).
        before = migration.weight
        self._apply(migration, 100.0)
        migration.step = len(migration.plan.steps) - 1
        migration.status = "completed"
        migration.reason = f"promoted by {by}"
        self._record(
            migration, "promoted", before, by, migration.reason, evidence=evidence
        )

    # The periodic check.

    def check(self) -> None:
        """Judge every running plan once: fail, advance, or keep holding."""
        changed = False
        for migration in list(self.migrations.values()):
            if migration.status != "running":
                continue
            try:
                changed = self._check_one(migration) or changed
            except Exception as exc:  # one plan's failure must not stop the others
                log.exception("migration_check_failed", plan=migration.name)
                self._halt(migration, f"the gateway failed checking the plan: {exc}")
                changed = True
        if changed:
            self._save()

    def _check_one(self, migration: Migration) -> bool:
        drift = self._drift(migration)
        if drift is not None:
            self._halt(migration, drift)
            return True
        plan = migration.plan
        evidence = self.evidence(migration)
        assert evidence is not None
        migration.gates = judge(
            plan.gates, evidence, move_to=plan.move_to, weight=migration.weight
        )
        failed = [gate for gate in migration.gates if gate.status == "fail"]
        if failed:
            self._fail(migration, failed, evidence)
            return True
        held = self.clock.seconds() - migration.step_started_at
        ready = all(gate.status in ("pass", "skip") for gate in migration.gates)
        if held >= plan.hold and ready:
            self._advance(migration, held, evidence)
            return True
        return False

    def _advance(self, migration: Migration, held: float, evidence: Evidence) -> None:
        plan = migration.plan
        before = migration.weight
        assert migration.step is not None
        if migration.step == len(plan.steps) - 1:
            migration.status = "completed"
            self._record(migration, "completed", before, "plan", None, held, evidence)
            return
        self._apply(migration, plan.steps[migration.step + 1])
        migration.step += 1
        migration.step_started_at = self.clock.seconds()
        self._record(migration, "advanced", before, "plan", None, held, evidence)
        migration.baseline = self._snapshot(migration)
        migration.gates = ()

    def _fail(
        self, migration: Migration, failed: list[GateResult], evidence: Evidence
    ) -> None:
        reason = "; ".join(_breach(gate) for gate in failed)
        before = migration.weight
        held = self.clock.seconds() - migration.step_started_at
        if migration.plan.on_fail == "pause":
            migration.status = "paused"
            migration.reason = reason
            self._record(migration, "paused", before, "plan", reason, held, evidence)
            return
        self._apply(migration, 0.0)
        migration.status = "rolled_back"
        migration.step = None
        migration.reason = reason
        self._record(migration, "rolled_back", before, "plan", reason, held, evidence)

    def _halt(
        self,
        migration: Migration,
        reason: str,
        by: str = "plan",
        evidence: Evidence | None = None,
    ) -> None:
        """Pause a plan without touching the split."""
        migration.status = "paused"
        migration.reason = reason
        self._record(
            migration, "paused", migration.weight, by, reason, evidence=evidence
        )

    # The split.

    def _route_plan(self, plan: Plan) -> RoutePlan | str:
        """The live route the plan moves, or why it cannot move it."""
        route = self.gateway.state.plans.get(plan.route)
        if route is None:
            return f"the rules have no route named {plan.route!r}"
        if route.splitter is None or plan.move_to not in route.by_upstream:
            upstreams = ", ".join(route.rule_weights())
            return (
                f"route {plan.route!r} does not split to {plan.move_to!r} ({upstreams})"
            )
        return route

    def _drift(self, migration: Migration) -> str | None:
        """Why the live split no longer is what the plan set, or None."""
        route = self._route_plan(migration.plan)
        if isinstance(route, str):
            return route
        now = route.effective_weights()[migration.plan.move_to]
        if round(now, 2) != round(migration.weight, 2):
            return (
                f"the split of {migration.plan.route!r} changed outside the plan: "
                f"{migration.plan.move_to} is at {now:g}%, the plan set "
                f"{migration.weight:g}%"
            )
        return None

    def _apply(self, migration: Migration, percent: float) -> None:
        plan = migration.plan
        route = self._route_plan(plan)
        if isinstance(route, str):
            raise MigrationError(route, 400, "invalid_plan")
        others = [name for name in route.rule_weights() if name != plan.move_to]
        shares = {name: migration.others.get(name, 0.0) for name in others}
        weights: dict[str, object] = {
            plan.move_to: percent,
            **spread(100.0 - percent, shares),
        }
        self.gateway.set_weights(plan.route, weights, by=f"migration:{plan.name}")
        migration.weight = percent

    def _snapshot(self, migration: Migration) -> Snapshot:
        plan = migration.plan
        return take_snapshot(self.gateway, plan.route, plan.move_to, self.agreement)

    # Records.

    def _record(
        self,
        migration: Migration,
        event: str,
        before: float,
        by: str,
        reason: str | None,
        held: float | None = None,
        evidence: Evidence | None = None,
    ) -> None:
        """One history entry and one log event, with the numbers behind them."""
        plan = migration.plan
        gates = (
            [gate.as_dict() for gate in migration.gates] if evidence is not None else []
        )
        entry = {
            "at": self.clock.seconds(),
            "event": event,
            "from": before,
            "to": migration.weight,
            "by": by,
            "reason": reason,
            "held_for": None if held is None else round(held, 3),
            "gates": gates,
            "evidence": evidence.as_dict() if evidence is not None else None,
        }
        migration.remember(entry)
        alarming = by == "plan" and event in ("rolled_back", "paused")
        (log.warning if alarming else log.info)(
            f"migration_{event}",
            plan=plan.name,
            route=plan.route,
            move_to=plan.move_to,
            from_weight=before,
            to_weight=migration.weight,
            by=by,
            reason=reason,
            held_for=entry["held_for"],
            gates=gates,
            evidence=entry["evidence"],
        )

    def _save(self) -> None:
        self.store.save(self.migrations.values())


def _others(
    current: dict[str, float], rule: dict[str, float], move_to: str
) -> dict[str, float]:
    """How the rest of the split is shared among the other upstreams.

    Their shares now, in proportion; if they have nothing now, as the rule
    file shares them; if that is nothing too, equally.
    """
    for weights in (current, rule):
        others = {name: w for name, w in weights.items() if name != move_to}
        if sum(others.values()) > 0:
            return others
    return {name: 1.0 for name in current if name != move_to}


def spread(total: float, shares: dict[str, float]) -> dict[str, float]:
    """`total` percent split in proportion to `shares`, in steps of 0.01, exactly.

    Largest remainder: everyone gets the floor of their share in basis
    points, and the points left go to the largest fractions, so the parts
    always add up to `total`.
    """
    points = round(total * _BASIS)
    if not shares:
        return {}
    weight_sum = sum(shares.values())
    if weight_sum <= 0:
        shares = dict.fromkeys(shares, 1.0)
        weight_sum = float(len(shares))
    exact = {name: points * share / weight_sum for name, share in shares.items()}
    given = {name: int(value) for name, value in exact.items()}
    left = points - sum(given.values())
    by_fraction = sorted(
        exact, key=lambda name: exact[name] - given[name], reverse=True
    )
    for name in by_fraction[:left]:
        given[name] += 1
    return {name: value / _BASIS for name, value in given.items()}


def _breach(gate: GateResult) -> str:
    value, bound = gate.value, gate.bound
    if gate.gate == "max_error_rate":
        return f"error rate {value:g}% is above {bound:g}% ({gate.detail})"
    if gate.gate == "max_p99_ratio":
        return f"p99 ratio {value:g} is above {bound:g} ({gate.detail})"
    return f"shadow agreement {value:g}% is below {bound:g}% ({gate.detail})"
