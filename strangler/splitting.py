"""Choosing the branch of a split route for each request.

Without `sticky` a request is one weighted draw. With `sticky` the branch is
a pure function of the key and the weights, found by weighted rendezvous
hashing: every branch scores the key with a stable hash of (branch label,
key), divided by the branch's weight, and the lowest score wins. Raising one
weight lowers only that branch's scores, so during a ramp keys only ever
move onto the branch that grows, and lowering it sends the same keys back in
reverse order. Labels are upstream names, so reordering the entries or adding
one does not reshuffle anybody.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from hashlib import blake2b
from itertools import accumulate

from strangler.model import SplitEntry

__all__ = ["Splitter"]

_BASIS = 100  # weights are percentages in steps of 0.01: whole basis points
_WHOLE = 100 * _BASIS
_PREFIX = blake2b(b"strangler split\x00", digest_size=8)
_UNIT = 2.0**-53
# Sticky keys come back request after request; their branch is remembered
# while the weights stand (a new Splitter per weight change starts empty).
_REMEMBERED_KEYS = 4096


class Splitter:
    """Picks a split branch by index, at random or sticky to a key.

    `weights` are percentages in entry order summing to 100, in steps of
    0.01; `labels` name the branches (their upstreams) and seed the sticky
    hash. A branch of weight 0 is never picked.
    """

    __slots__ = (
        "_branches",
        "_cumulative",
        "_known",
        "_only",
        "_random",
        "labels",
        "weights",
    )

    def __init__(
        self,
        weights: Sequence[float],
        labels: Sequence[str],
        rng: random.Random | None = None,
    ) -> None:
        points = _basis_points(weights, labels)
        self.weights = tuple(point / _BASIS for point in points)
        self.labels = tuple(labels)
        self._random = (rng if rng is not None else random.Random()).random

        live = [index for index, point in enumerate(points) if point > 0]
        # One live branch needs neither a draw nor a hash.
        self._only = live[0] if len(live) == 1 else -1

        # Sums of whole basis points end at exactly 100.0, above any draw, so
        # float rounding cannot carry a draw into a 0-weight tail.
        self._cumulative = [total / _BASIS for total in accumulate(points)]

        seen: dict[str, int] = {}
        branches = []
        for index, label in enumerate(labels):
            copy = seen.get(label, 0)
            seen[label] = copy + 1
            if points[index] == 0:
                continue
            # A repeated upstream gets its own hash, or it would lose every key.
            tag = label if copy == 0 else f"{label}\x00{copy}"
            prefix = _PREFIX.copy()
            prefix.update(tag.encode() + b"\x00")
            branches.append((index, prefix, 1.0 / points[index]))
        self._branches = tuple(branches)
        self._known: dict[str | bytes, int] = {}

    @classmethod
    def from_entries(
        cls, entries: Sequence[SplitEntry], rng: random.Random | None = None
    ) -> Splitter:
        """The splitter of a route: weights and upstream names from its entries."""
        return cls([e.weight for e in entries], [e.to for e in entries], rng)

    def pick_random(self) -> int:
        """The index of a branch drawn by weight, independent of any earlier pick."""
        if self._only >= 0:
            return self._only
        return bisect_right(self._cumulative, self._random() * 100.0)

    def pick_sticky(self, key: str | bytes) -> int:
        """The index of the branch this key belongs to while the weights stand.

        The score of a branch is an exponential variate with rate equal to its
        weight, drawn from the hash of the key, so the lowest score falls on
        each branch in proportion to its weight.
        """
        if self._only >= 0:
            return self._only
        known = self._known.get(key)
        if known is not None:
            return known
        best = self._score(key)
        if len(self._known) >= _REMEMBERED_KEYS:
            self._known.clear()
        self._known[key] = best
        return best

    def _score(self, key: str | bytes) -> int:
        data = key.encode() if isinstance(key, str) else key
        best = -1
        best_score = math.inf
        for index, prefix, inverse in self._branches:
            hasher = prefix.copy()
            hasher.update(data)
            # 53 bits give a float strictly inside (0, 1), so the log is finite.
            uniform = ((int.from_bytes(hasher.digest(), "big") >> 11) + 0.5) * _UNIT
            score = -math.log(uniform) * inverse
            if score < best_score:
                best = index
                best_score = score
        return best

    def __repr__(self) -> str:
        pairs = ", ".join(
            f"{label}={weight:g}"
            for label, weight in zip(self.labels, self.weights, strict=True)
        )
        return f"Splitter({pairs})"


def _basis_points(weights: Sequence[float], labels: Sequence[str]) -> list[int]:
    """Weights as whole basis points, after checking they form a valid split."""
    if len(weights) != len(labels):
        raise ValueError(
            f"split has {len(weights)} weights but {len(labels)} labels; "
            "expected one label (upstream name) per weight"
        )
    if not weights:
        raise ValueError("split has no branches; expected at least one")

    points = []
    for weight, label in zip(weights, labels, strict=True):
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValueError(
                f"split weight {weight!r} for {label!r} is not a percentage; "
                "expected a number from 0 to 100"
            )
        point = round(weight * _BASIS)
        if abs(weight * _BASIS - point) > 1e-6:
            raise ValueError(
                f"split weight {weight!r} for {label!r} is finer than 0.01; "
                "expected steps of 0.01"
            )
        points.append(point)

    total = sum(points)
    if total != _WHOLE:
        raise ValueError(f"split weights must sum to 100, got {total / _BASIS:g}")
    return points
