"""Renaming, moving, dropping and setting fields of a JSON body.

When the old and new contracts differ only in where fields live, a route can
map one onto the other without code: `user_name` becomes `name.full`, a
`legacy_flag` is dropped, `meta.version` is set to 2. A `BodyMap` is built
once from the rule file and applied to each body; `reverse()` gives the map
for the way back, when every operation can be undone.

Paths are dotted keys into nested objects (`name.full`); a key that itself
contains a dot cannot be addressed, and lists are not indexed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson

from strangler.transforms import TransformError
from strangler.transforms.safety import (
    DEFAULT_MAX_DEPTH,
    load_json,
    too_deep,
)

__all__ = ["BodyMap", "DropField", "FieldOp", "RenameField", "SetField"]

Path = tuple[str, ...]

# orjson refuses to write more than this many nested containers.
_MAX_WRITABLE_DEPTH = 255
_MISSING = object()


@dataclass(frozen=True, slots=True)
class RenameField:
    """Move the value at `source` to `target`; absent source, nothing happens."""

    source: Path
    target: Path

    def apply(self, body: dict[str, object]) -> None:
        value = _remove(body, self.source)
        if value is not _MISSING:
            _put(body, self.target, value)

    def inverse(self) -> FieldOp:
        return RenameField(self.target, self.source)

    def describe(self) -> str:
        return f"rename {_dotted(self.source)!r} to {_dotted(self.target)!r}"


@dataclass(frozen=True, slots=True)
class DropField:
    """Remove the value at `path`; it cannot be brought back."""

    path: Path

    def apply(self, body: dict[str, object]) -> None:
        _remove(body, self.path)

    def inverse(self) -> FieldOp:
        raise ValueError(
            f"body map cannot be reversed: {self.describe()} has no inverse, "
            "the dropped value is gone; write the map for the way back yourself"
        )

    def describe(self) -> str:
        return f"drop {_dotted(self.path)!r}"


@dataclass(frozen=True, slots=True)
class SetField:
    """Write a constant at `path`, replacing what was there.

    `value` is held as JSON so each body gets its own copy: a later operation
    that moves something out of it must not change the constant.
    """

    path: Path
    value_json: bytes

    @property
    def value(self) -> object:
        return orjson.loads(self.value_json)

    def apply(self, body: dict[str, object]) -> None:
        _put(body, self.path, self.value)

    def inverse(self) -> FieldOp:
        return DropField(self.path)

    def describe(self) -> str:
        return f"set {_dotted(self.path)!r}"


FieldOp = RenameField | DropField | SetField


class BodyMap:
    """An ordered list of field operations applied to a JSON object body.

    Built from rule-file entries such as `{"rename": {"from": "user_name",
    "to": "name.full"}}`, `{"drop": "legacy_flag"}` and `{"set": {"path":
    "meta.version", "value": 2}}`; a bad entry raises ValueError naming it.
    """

    __slots__ = ("_ops",)

    def __init__(self, ops: Iterable[Mapping[str, object] | FieldOp]) -> None:
        parsed: list[FieldOp] = []
        for index, op in enumerate(ops, start=1):
            if isinstance(op, RenameField | DropField | SetField):
                parsed.append(op)
            else:
                parsed.append(_parse_op(index, op))
        self._ops: tuple[FieldOp, ...] = tuple(parsed)

    @property
    def ops(self) -> tuple[FieldOp, ...]:
        return self._ops

    @property
    def reversible(self) -> bool:
        """Whether `reverse()` exists: false as soon as one field is dropped."""
        return not any(isinstance(op, DropField) for op in self._ops)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BodyMap) and other._ops == self._ops

    def __hash__(self) -> int:
        return hash(self._ops)

    def __repr__(self) -> str:
        return f"BodyMap({', '.join(op.describe() for op in self._ops)})"

    def apply(self, body: object) -> dict[str, object]:
        """Apply every operation in order to `body`, changing it in place.

        Returns `body` itself. Raises `TransformError` (400) if `body` is not
        an object, or if a path must pass through a value that is not one.
        """
        if not isinstance(body, dict):
            raise TransformError(
                f"a body map needs a JSON object, got {_kind(body)}",
                reason="unsupported",
            )
        for op in self._ops:
            op.apply(body)
        return body

    def apply_body(self, body: bytes, max_depth: int = 2 * DEFAULT_MAX_DEPTH) -> bytes:
        """Parse, map and write a JSON body; an empty body stays empty.

        `max_depth` counts nested objects and arrays. Its default is twice the
        XML transforms' element limit because one XML level can become two
        JSON containers, so the JSON made from any accepted XML body fits.
        """
        if not 1 <= max_depth <= _MAX_WRITABLE_DEPTH:
            raise ValueError(
                f"max_depth must be from 1 to {_MAX_WRITABLE_DEPTH}, got {max_depth!r}"
            )
        if not body:
            return b""

        data = load_json(body, max_depth)
        mapped = self.apply(data)
        try:
            return orjson.dumps(mapped)
        except orjson.JSONEncodeError as exc:
            # Moving or setting fields can push a body just under the limit
            # past what the JSON writer accepts.
            raise too_deep("JSON", _MAX_WRITABLE_DEPTH, " once mapped") from exc

    def reverse(self) -> BodyMap:
        """The map that undoes this one, for response bodies.

        A rename reverses to the opposite rename and a set to a drop, in the
        opposite order. A drop has no inverse, so a map with one raises
        ValueError here; see `reversible`.
        """
        return BodyMap(op.inverse() for op in reversed(self._ops))


def _parse_op(index: int, op: object) -> FieldOp:
    where = f"body map op {index}"
    if not isinstance(op, Mapping) or len(op) != 1:
        raise ValueError(
            f"{where}: expected one of {{rename: {{from, to}}}}, {{drop: PATH}} or "
            f"{{set: {{path, value}}}}, got {op!r}"
        )
    ((kind, spec),) = op.items()

    if kind == "rename":
        fields = _fields(where, kind, spec, ("from", "to"))
        return RenameField(
            _path(where, fields["from"]),
            _path(where, fields["to"]),
        )
    if kind == "drop":
        return DropField(_path(where, spec))
    if kind == "set":
        fields = _fields(where, kind, spec, ("path", "value"))
        try:
            value_json = orjson.dumps(fields["value"])
        except orjson.JSONEncodeError as exc:
            raise ValueError(
                f"{where}: set value must be JSON (null, true/false, a number, a "
                f"string, a list or an object with string keys), "
                f"got {fields['value']!r}"
            ) from exc
        return SetField(_path(where, fields["path"]), value_json)
    raise ValueError(
        f"{where}: unknown operation {kind!r}, expected rename, drop or set"
    )


def _fields(
    where: str, kind: str, spec: object, names: tuple[str, str]
) -> Mapping[str, object]:
    if not isinstance(spec, Mapping) or set(spec) != set(names):
        expected = ", ".join(names)
        raise ValueError(
            f"{where}: {kind} needs exactly the keys {expected}, got {spec!r}"
        )
    return spec


def _path(where: str, text: object) -> Path:
    if not isinstance(text, str) or not text:
        raise ValueError(
            f"{where}: expected a dotted path like 'name.full', got {text!r}"
        )
    path = tuple(text.split("."))
    if "" in path:
        raise ValueError(
            f"{where}: path {text!r} has an empty segment; "
            "expected a dotted path like 'name.full'"
        )
    return path


def _remove(body: dict[str, object], path: Path) -> object:
    """Pop the value at `path` and prune the objects that pop left empty."""
    parents = [body]
    node: object = body
    for key in path[:-1]:
        node = parents[-1].get(key)
        if not isinstance(node, dict):
            return _MISSING
        parents.append(node)
    value = parents[-1].pop(path[-1], _MISSING)
    if value is _MISSING:
        return value

    for level in range(len(parents) - 1, 0, -1):
        if parents[level]:
            break
        del parents[level - 1][path[level - 1]]
    return value


def _put(body: dict[str, object], path: Path, value: object) -> None:
    """Write `value` at `path`, creating the objects on the way."""
    node = body
    for depth, key in enumerate(path[:-1], start=1):
        child = node.get(key, _MISSING)
        if child is _MISSING:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise TransformError(
                f"cannot write {_dotted(path)!r}: {_dotted(path[:depth])!r} holds "
                f"{_kind(child)}, not an object",
                reason="unsupported",
            )
        node = child  # type: ignore[assignment]
    node[path[-1]] = value


def _dotted(path: Path) -> str:
    return ".".join(path)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
