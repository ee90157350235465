"""Shadow traffic: copy requests to a new service and compare its answers.

`mirror` decides per request and sends the copies, `fetch` drives one copy
on the shadow's own pool, `convert` applies the shadow's transform,
`compare` compares two answers (`jsonpath` names fields), `noise` learns
which fields differ on their own, `stats` counts per route, `registry` keeps
all that across reloads, and `admin` (with `schema`, its OpenAPI pieces) and
`cli` show it. The shadow only ever receives from the client's exchange, so it
cannot change or delay what the client gets.
"""

from __future__ import annotations

from strangler.shadow.compare import Answer, CompareSpec, Outcome, compare
from strangler.shadow.jsonpath import JsonPathError, parse_path
from strangler.shadow.mirror import Mirror, build_mirror
from strangler.shadow.registry import ShadowRegistry

__all__ = [
    "Answer",
    "CompareSpec",
    "JsonPathError",
    "Mirror",
    "Outcome",
    "ShadowRegistry",
    "build_mirror",
    "compare",
    "parse_path",
]
