"""The small part of JSONPath that shadow comparison needs.

`compare.ignore` names fields with JSONPath, and differences are reported
with it. Only selectors that pick fields are supported: `$`, `.name`,
`['name']`, `[3]`, `[*]`, `.*` and `..name` (`..*` too). Filters, slices and
unions are refused with a message, since an ignore list a person cannot read
at a glance is one nobody trusts.

A compiled `PathSet` is walked one step at a time alongside the documents
being compared, so finding whether a node is ignored costs a few set
operations per node, and nothing at all once no pattern can match below it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "JsonPathError",
    "PathSet",
    "Segment",
    "format_path",
    "generalize",
    "parse_path",
]

Segment = str | int
"""One step of a concrete path: an object key or an array index."""

_KEY, _INDEX, _ANY, _DEEP = 0, 1, 2, 3
_NAME = re.compile(r"[A-Za-z_@#][A-Za-z0-9_@#-]*")
_PLAIN = re.compile(r"[A-Za-z_@#][A-Za-z0-9_@#]*\Z")


class JsonPathError(ValueError):
    """A JSONPath that is malformed or uses a selector this subset lacks."""


@dataclass(frozen=True, slots=True)
class _Step:
    kind: int
    key: Segment | None = None


Pattern = tuple[_Step, ...]


def parse_path(text: str) -> Pattern:
    """Parse one JSONPath; raises `JsonPathError` naming the problem and where."""
    if not text.startswith("$"):
        raise JsonPathError(f"{text!r}: a JSON path starts with $, like $.meta.id")
    steps: list[_Step] = []
    i, end = 1, len(text)
    while i < end:
        if text.startswith("..", i):
            i += 2
            if text.startswith("*", i):
                steps.append(_Step(_DEEP))
                i += 1
                continue
            name = _NAME.match(text, i)
            if name is None:
                raise _bad(text, i, "a field name or * after ..")
            steps.append(_Step(_DEEP, name.group()))
            i = name.end()
        elif text[i] == ".":
            i += 1
            if text.startswith("*", i):
                steps.append(_Step(_ANY))
                i += 1
                continue
            name = _NAME.match(text, i)
            if name is None:
                raise _bad(text, i, "a field name or * after .")
            steps.append(_Step(_KEY, name.group()))
            i = name.end()
        elif text[i] == "[":
            step, i = _bracket(text, i)
            steps.append(step)
        else:
            raise _bad(text, i, "., .. or [")
    return tuple(steps)


def _bracket(text: str, start: int) -> tuple[_Step, int]:
    i = start + 1
    quote = text[i : i + 1]
    if quote in ("'", '"'):
        name: list[str] = []
        i += 1
        while i < len(text) and text[i] != quote:
            if text[i] == "\\":
                i += 1
            name.append(text[i : i + 1])
            i += 1
        if text[i + 1 : i + 2] != "]":
            raise _bad(text, start, f"a quoted name closed by {quote}]")
        return _Step(_KEY, "".join(name)), i + 2
    close = text.find("]", i)
    inner = text[i:close] if close >= 0 else ""
    if inner == "*":
        return _Step(_ANY), close + 1
    if inner.isascii() and inner.isdigit():
        return _Step(_INDEX, int(inner)), close + 1
    raise _bad(
        text,
        start,
        "[*], [N] or ['name'] (filters, slices and unions are not supported)",
    )


def _bad(text: str, at: int, expected: str) -> JsonPathError:
    return JsonPathError(f"{text!r}: at character {at + 1}, expected {expected}")


def format_path(path: Sequence[Segment], indices: bool = True) -> str:
    """A concrete path as JSONPath text: `$.items[2].id`, `$['a b']`.

    With `indices=False` every array index is written `[*]`.
    """
    parts = ["$"]
    for segment in path:
        if isinstance(segment, int):
            parts.append(f"[{segment}]" if indices else "[*]")
        elif _PLAIN.match(segment):
            parts.append("." + segment)
        else:
            quoted = segment.replace("\\", "\\\\").replace("'", "\\'")
            parts.append(f"['{quoted}']")
    return "".join(parts)


def generalize(path: Sequence[Segment]) -> str:
    """JSONPath text with every array index replaced by `[*]`.

    Differences are counted per generalized field, so item 3 and item 7 of a
    list disagreeing on `id` add up under `$.items[*].id`.
    """
    return format_path(path, indices=False)


State = frozenset[tuple[int, int]]
"""Where each pattern stands after the steps taken so far: (pattern, position)."""

_EMPTY: State = frozenset()


class PathSet:
    """Several labelled patterns, matched together while walking a document.

    A node is covered when some pattern matches its path or the path of one
    of its ancestors; the label of the first such pattern is returned, so the
    order of `patterns` gives precedence.
    """

    def __init__(self, patterns: Iterable[tuple[Pattern, str]] = ()) -> None:
        self.patterns = list(patterns)
        self.labels = [label for _, label in self.patterns]
        self.start: State = frozenset((i, 0) for i in range(len(self.patterns)))

    @classmethod
    def of(cls, texts: Iterable[str], label: str) -> PathSet:
        return cls((parse_path(text), label) for text in texts)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def covered(self, state: State) -> str | None:
        """The label of a pattern that is complete in `state`, else None."""
        best: int | None = None
        for index, position in state:
            if position == len(self.patterns[index][0]) and (
                best is None or index < best
            ):
                best = index
        return self.labels[best] if best is not None else None

    def step(self, state: State, segment: Segment) -> State:
        """The state after descending into `segment`."""
        if not state:
            return _EMPTY
        out: set[tuple[int, int]] = set()
        patterns = self.patterns
        for index, position in state:
            pattern = patterns[index][0]
            if position == len(pattern):
                continue
            step = pattern[position]
            kind = step.kind
            if kind == _DEEP:
                out.add((index, position))
                if step.key is None or step.key == segment:
                    out.add((index, position + 1))
            elif kind == _ANY:
                out.add((index, position + 1))
            elif kind == _KEY:
                if isinstance(segment, str) and step.key == segment:
                    out.add((index, position + 1))
            elif isinstance(segment, int) and step.key == segment:
                out.add((index, position + 1))
        return frozenset(out)

    def label_for(self, path: Sequence[Segment]) -> str | None:
        """The label covering a whole concrete path (used outside a walk)."""
        state = self.start
        found = self.covered(state)
        for segment in path:
            if found is not None:
                return found
            state = self.step(state, segment)
            found = self.covered(state)
        return found
