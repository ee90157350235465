"""Migration plans in the admin API: JSON views, starting a plan, actions.

The admin API mounts these at `/migrations`, `/migrations/{name}` and
`/migrations/{name}/{action}`. A plan arrives as the text of its file and is
checked here against the rules the gateway runs now, so `migrate start`
cannot start a plan that `migrate check` would pass only against an older
rule file. Refusals are `MigrationError`s carrying their HTTP status.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from strangler.errors import ConfigError
from strangler.migration.plan import parse_plan
from strangler.migration.runner import MigrationError, MigrationRunner
from strangler.migration.state import Migration

if TYPE_CHECKING:
    from strangler.server import GatewayServer

__all__ = [
    "act_on_migration",
    "migration_detail",
    "migration_view",
    "migrations_view",
    "start_migration",
]

_START_KEYS = ("plan", "source")


def runner_of(server: GatewayServer) -> MigrationRunner:
    runner: MigrationRunner | None = getattr(server, "migrations", None)
    if runner is None:
        raise MigrationError(
            "this gateway process does not run migration plans; the one that "
            "serves the admin API does",
            503,
            "migrations_not_running",
        )
    return runner


def migrations_view(server: GatewayServer) -> dict[str, Any]:
    """`GET /migrations`: every plan this gateway knows, oldest first."""
    runner = runner_of(server)
    ordered = sorted(runner.migrations.values(), key=lambda m: m.started_at)
    return {"migrations": [migration_view(runner, m) for m in ordered]}


def migration_detail(server: GatewayServer, name: str) -> dict[str, Any]:
    """`GET /migrations/{name}`: one plan; MigrationError 404 if unknown."""
    runner = runner_of(server)
    return migration_view(runner, runner.get(name))


def start_migration(server: GatewayServer, body: object) -> dict[str, Any]:
    """`POST /migrations` with `{"plan": "<file text>", "source": "<file name>"}`."""
    runner = runner_of(server)
    if not isinstance(body, dict) or not isinstance(body.get("plan"), str):
        raise MigrationError(
            'expected a JSON object like {"plan": "<the plan file\'s text>", '
            '"source": "migrations/users.yaml"}',
            400,
            "invalid_body",
        )
    unknown = sorted(set(body) - set(_START_KEYS))
    if unknown:
        raise MigrationError(
            f"unknown key {unknown[0]!r}; allowed keys: {', '.join(_START_KEYS)}",
            400,
            "invalid_body",
        )
    source = body.get("source", "plan.yaml")
    if not isinstance(source, str) or not source:
        raise MigrationError(
            f"source must be the plan's file name, got {source!r}", 400, "invalid_body"
        )
    try:
        plan = parse_plan(body["plan"], source, server.rules)
    except ConfigError as exc:
        raise MigrationError(str(exc), 400, "invalid_plan") from exc
    return migration_view(runner, runner.start(plan, by="admin"))


def act_on_migration(server: GatewayServer, name: str, action: str) -> dict[str, Any]:
    """`POST /migrations/{name}/{action}`: pause, resume, abort or promote."""
    runner = runner_of(server)
    return migration_view(runner, runner.act(name, action, by="admin"))


def migration_view(runner: MigrationRunner, migration: Migration) -> dict[str, Any]:
    """One plan as JSON: where it is, its gates now, and how it got there."""
    now = runner.clock.seconds()
    evidence = runner.evidence(migration)
    return {
        "name": migration.name,
        "status": migration.status,
        "reason": migration.reason,
        "weight": migration.weight,
        "step": None if migration.step is None else migration.step + 1,
        "started_at": _iso(migration.started_at),
        "step_started_at": _iso(migration.step_started_at),
        "at_step_seconds": (
            round(now - migration.step_started_at, 3) if migration.active else None
        ),
        "gates": [gate.as_dict() for gate in runner.current_gates(migration)],
        "evidence": evidence.as_dict() if evidence is not None else None,
        "plan": migration.plan.as_dict(),
        "history": [
            {**entry, "at": _iso(float(entry.get("at", 0.0)))}
            for entry in migration.history
        ],
    }


def _iso(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
