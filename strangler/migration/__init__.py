"""Migration plans: ramp a route's split step by step, on evidence.

`plan` reads and checks a plan file, `evidence` turns the proxy's counters
into what a step is judged on, `runner` moves the split by the clock and
rolls back on its own, `state` keeps each plan's progress across restarts,
and `admin` and `cli` let people start, watch and steer plans.
"""

from __future__ import annotations

from strangler.migration.evidence import Evidence, GateResult, judge, quantile
from strangler.migration.plan import Gates, Plan, load_plan, parse_plan
from strangler.migration.runner import MigrationError, MigrationRunner
from strangler.migration.state import Migration, MigrationStore, migrations_path

__all__ = [
    "Evidence",
    "GateResult",
    "Gates",
    "Migration",
    "MigrationError",
    "MigrationRunner",
    "MigrationStore",
    "Plan",
    "judge",
    "load_plan",
    "migrations_path",
    "parse_plan",
    "quantile",
]
