"""Learning a route's noise: fields that differ between two calls to the primary.

Timestamps, generated ids and request counters differ between any two
answers, even from the same service, so a shadow that disagrees on them
proves nothing. With `compare.noise: auto` the first `sample_size` mirrored
requests of a route that are safe to repeat (GET, HEAD or OPTIONS without a
body) are also sent a second time to the primary upstream. Every field on
which the two primary answers disagree is learned as noise: from then on a
shadow difference there is counted as noise, not as a disagreement. The
learned fields are part of every report, so nothing is hidden.

The whole body (`$`) is never learned. Two primary answers that differ as
a whole (text with a timestamp in it, a body over the capture limit, one
that does not parse) say nothing about which field is noise, and learning
`$` would turn every later body difference on the route into noise. Such
pairs are counted as `whole_body` instead, and shown in the report.
"""

from __future__ import annotations

from typing import Any

from strangler.shadow.compare import Answer, CompareSpec, Outcome, compare
from strangler.shadow.jsonpath import PathSet, parse_path

__all__ = ["NOISE_SAMPLE", "SAFE_TO_REPEAT", "NoiseLearner"]

NOISE_SAMPLE = 10
"""Requests per route sent twice to the primary to learn its noise."""

SAFE_TO_REPEAT = frozenset({b"GET", b"HEAD", b"OPTIONS"})
"""Only these are ever sent to the primary a second time, whatever `methods` says."""


class NoiseLearner:
    """One route's learned noise: body fields and headers, with how often seen."""

    def __init__(self, sample_size: int = NOISE_SAMPLE) -> None:
        self.sample_size = sample_size
        self.probes = 0
        self.learned_from = 0
        self.unusable = 0
        self.whole_body = 0
        self.fields: dict[str, int] = {}
        self.headers: dict[str, int] = {}
        self.suppressed: dict[str, int] = {}
        self.paths = PathSet()
        self.header_names: frozenset[bytes] = frozenset()

    def wants_probe(self) -> bool:
        """Whether the next safe request should also be repeated to the primary."""
        return self.probes < self.sample_size

    def probe_started(self) -> None:
        self.probes += 1

    def probe_failed(self) -> None:
        """A repeat got no usable answer; it still counts toward the sample."""
        self.unusable += 1

    def learn(self, first: Answer, second: Answer, spec: CompareSpec) -> list[str]:
        """Compare two primary answers to one request; returns newly learned fields.

        Answers with different statuses teach nothing (the primary itself
        was flaky, not its fields) and only count as unusable; bodies that
        differ as a whole teach nothing about the body and count as
        `whole_body`.
        """
        if first.status != second.status:
            self.unusable += 1
            return []
        self.learned_from += 1
        outcome = compare(first, second, spec)
        new: list[str] = []
        for difference in outcome.differences:
            if difference.kind == "body" and difference.field == "$":
                # Not comparable field by field: nothing to learn from the body.
                self.whole_body += 1
                continue
            table = self.headers if difference.kind == "header" else self.fields
            if difference.field not in table:
                new.append(difference.field)
            table[difference.field] = table.get(difference.field, 0) + 1
        if new:
            self.paths = PathSet((parse_path(text), "noise") for text in self.fields)
            self.header_names = frozenset(
                name.encode("latin-1") for name in self.headers
            )
        return new

    def count_suppressed(self, outcome: Outcome) -> None:
        """Record the shadow differences that were left out as noise."""
        for name in outcome.noise:
            self.suppressed[name] = self.suppressed.get(name, 0) + 1

    def report(self, mode: str) -> dict[str, Any]:
        """What was learned, for the admin API and `strangler diffs`."""
        fields = [
            {
                "field": name,
                "kind": kind,
                "seen": seen,
                "suppressed": self.suppressed.get(name, 0),
            }
            for kind, table in (("body", self.fields), ("header", self.headers))
            for name, seen in sorted(table.items())
        ]
        return {
            "mode": mode,
            "sample_size": self.sample_size if mode == "auto" else 0,
            "probes": self.probes,
            "learned_from": self.learned_from,
            "unusable": self.unusable,
            "whole_body": self.whole_body,
            "fields": fields,
        }
