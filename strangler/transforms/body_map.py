"""Renaming, moving, dropping and setting fields of a JSON body.

When the old and new contracts differ only in where fields live, a route can
map one onto the other without code: `user_name` becomes `name.full`, a
`legacy_flag` is dropped, `meta.version` is set to 2, and every item of the
`users` list gets the same treatment. A `BodyMap` is built once from the rule
file and applied to each body; `reverse()` gives the map for the way back,
undoing each step that can be undone. `BodyMaps` holds the map each
direction of a transform uses.

Paths are dotted keys into nested objects (`name.full`); a key that itself
contains a dot cannot be addressed, and lists are not indexed: `each` maps
their items instead.
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

__all__ = [
    "BodyMap",
    "BodyMapError",
    "BodyMaps",
    "DropField",
    "EachItem",
    "FieldOp",
    "RenameField",
    "SetField",
]

Path = tuple[str, ...]

# orjson refuses to write more than this many nested containers.
_MAX_WRITABLE_DEPTH = 255
_MISSING = object()


@dataclass(frozen=True, slots=True)
class RenameField:
    """Move the value at `source` to `target`; absent source, nothing happens.

    Objects the move leaves empty are removed afterwards, so moving
    `name.full` to `name` puts the value where the `name` object was.
    """

    source: Path
    target: Path

    def apply(self, body: dict[str, object]) -> None:
        parents = _parents(body, self.source)
        if parents is None or self.source[-1] not in parents[-1]:
            return
        value = parents[-1].pop(self.source[-1])
        _put(body, self.target, value)
        _prune(parents, self.source)

    def inverse(self) -> FieldOp:
        return RenameField(self.target, self.source)

    def describe(self) -> str:
        return f"rename {_dotted(self.source)!r} to {_dotted(self.target)!r}"


@dataclass(frozen=True, slots=True)
class DropField:
    """Remove the value at `path`; it cannot be brought back."""

    path: Path

    def apply(self, body: dict[str, object]) -> None:
        parents = _parents(body, self.path)
        if (
            parents is not None
            and parents[-1].pop(self.path[-1], _MISSING) is not _MISSING
        ):
            _prune(parents, self.path)

    def inverse(self) -> FieldOp | None:
        """Nothing: the value is gone, so the way back skips this step."""
        return None

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

    def inverse(self) -> FieldOp | None:
        return DropField(self.path)

    def describe(self) -> str:
        return f"set {_dotted(self.path)!r}"


@dataclass(frozen=True, slots=True)
class EachItem:
    """Apply `ops` to every object in the list at `path`.

    A single object there is treated as a list of one, because XML with one
    repeated child becomes a value, not a one-item list. An absent `path`
    changes nothing; anything else there refuses the body.
    """

    path: Path
    ops: tuple[FieldOp, ...]

    def apply(self, body: dict[str, object]) -> None:
        parents = _parents(body, self.path)
        if parents is None:
            return
        found = parents[-1].get(self.path[-1], _MISSING)
        if found is _MISSING:
            return
        items = found if isinstance(found, list) else [found]
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                where = f"{_dotted(self.path)!r}"
                if isinstance(found, list):
                    where = f"item {index} of {where}"
                raise TransformError(
                    f"each {_dotted(self.path)!r} needs objects, but {where} holds "
                    f"{_kind(item)}",
                    reason="unsupported",
                )
            for op in self.ops:
                op.apply(item)

    def inverse(self) -> FieldOp | None:
        return EachItem(self.path, _inverse_ops(self.ops))

    def describe(self) -> str:
        inner = ", ".join(op.describe() for op in self.ops)
        return f"each {_dotted(self.path)!r} ({inner})"


FieldOp = RenameField | DropField | SetField | EachItem
_OP_TYPES = (RenameField, DropField, SetField, EachItem)


def _inverse_ops(ops: tuple[FieldOp, ...]) -> tuple[FieldOp, ...]:
    """The steps that undo `ops`, last first; a step with no inverse is skipped."""
    undone = (op.inverse() for op in reversed(ops))
    return tuple(op for op in undone if op is not None)


class BodyMap:
    """An ordered list of field operations applied to a JSON object body.

    Built from rule-file entries such as `{"rename": {"from": "user_name",
    "to": "name.full"}}`, `{"drop": "legacy_flag"}`, `{"set": {"path":
    "meta.version", "value": 2}}` and `{"each": {"path": "users", "map":
    [...]}}`; a bad entry raises ValueError naming it.
    """

    __slots__ = ("_ops",)

    def __init__(self, ops: Iterable[Mapping[str, object] | FieldOp]) -> None:
        self._ops: tuple[FieldOp, ...] = _parse_ops("body map", ops)

    @property
    def ops(self) -> tuple[FieldOp, ...]:
        return self._ops

    @property
    def reversible(self) -> bool:
        """Whether `reverse()` undoes every step: false once a field is dropped."""
        return _undoable(self._ops)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BodyMap) and other._ops == self._ops

    def __hash__(self) -> int:
        return hash(self._ops)

    def __repr__(self) -> str:
        return f"BodyMap({', '.join(op.describe() for op in self._ops)})"

    def apply(self, body: object) -> dict[str, object] | list[object]:
        """Apply every operation in order to `body`, changing it in place.

        A top-level list is mapped item by item. Returns `body` itself.
        Raises `TransformError` (400) if `body` (or an item of it) is not an
        object, or if a path must pass through a value that is not one.
        """
        if isinstance(body, list):
            for index, item in enumerate(body):
                if not isinstance(item, dict):
                    raise TransformError(
                        "a body map needs JSON objects, but item "
                        f"{index} of the top-level list is {_kind(item)}",
                        reason="unsupported",
                    )
                for op in self._ops:
                    op.apply(item)
            return body
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

        A rename reverses to the opposite rename, a set to a drop and an
        `each` to an `each` of the reversed steps, in the opposite order. A
        drop has no inverse and is skipped: the way back cannot bring the
        value back, but every other step is still undone.
        """
        return BodyMap(_inverse_ops(self._ops))


class BodyMapError(ValueError):
    """A bad body map; `direction` is `request` or `response` when one is at fault."""

    def __init__(self, message: str, direction: str | None = None) -> None:
        super().__init__(f"{direction}: {message}" if direction else message)
        self.message = message
        self.direction = direction


@dataclass(frozen=True, slots=True)
class BodyMaps:
    """The field map each direction of a transform applies (None: no mapping).

    From the rule file either one list, written for requests and reversed
    for responses, or `{request: [...], response: [...]}`, each applied as
    written.
    """

    request: BodyMap | None
    response: BodyMap | None

    @classmethod
    def from_rules(cls, value: object) -> BodyMaps:
        """Parse the `body` key of a transform; ValueError says what is wrong."""
        if isinstance(value, list):
            forward = BodyMap(value)
            return cls(forward, forward.reverse())
        if (
            isinstance(value, Mapping)
            and value
            and set(value) <= {"request", "response"}
        ):
            maps: dict[str, BodyMap] = {}
            for direction, ops in value.items():
                if not isinstance(ops, list):
                    raise BodyMapError(
                        f"expected a list of field operations, got {ops!r}", direction
                    )
                try:
                    maps[direction] = BodyMap(ops)
                except ValueError as exc:
                    raise BodyMapError(str(exc), direction) from None
            return cls(maps.get("request"), maps.get("response"))
        raise ValueError(
            "expected a list of field operations, or {request: [...], "
            f"response: [...]}}, got {value!r}"
        )

    def describe(self) -> str:
        """One line for `strangler explain`: what each direction does."""
        parts = []
        for direction, body_map in (
            ("request", self.request),
            ("response", self.response),
        ):
            if body_map is not None and body_map.ops:
                steps = ", ".join(op.describe() for op in body_map.ops)
                parts.append(f"{direction}: {steps}")
        return "; ".join(parts) or "none"


def _undoable(ops: tuple[FieldOp, ...]) -> bool:
    for op in ops:
        if isinstance(op, DropField):
            return False
        if isinstance(op, EachItem) and not _undoable(op.ops):
            return False
    return True


def _parse_ops(
    where: str, ops: Iterable[Mapping[str, object] | FieldOp]
) -> tuple[FieldOp, ...]:
    parsed: list[FieldOp] = []
    for index, op in enumerate(ops, start=1):
        if isinstance(op, _OP_TYPES):
            parsed.append(op)
        else:
            parsed.append(_parse_op(f"{where} op {index}", op))
    return tuple(parsed)


def _parse_op(where: str, op: object) -> FieldOp:
    if not isinstance(op, Mapping) or len(op) != 1:
        raise ValueError(
            f"{where}: expected one of {{rename: {{from, to}}}}, {{drop: PATH}}, "
            f"{{set: {{path, value}}}} or {{each: {{path, map}}}}, got {op!r}"
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
    if kind == "each":
        fields = _fields(where, kind, spec, ("path", "map"))
        inner = fields["map"]
        if not isinstance(inner, list) or not inner:
            raise ValueError(
                f"{where}: each map must be a list of field operations, got {inner!r}"
            )
        return EachItem(_path(where, fields["path"]), _parse_ops(where, inner))
    raise ValueError(
        f"{where}: unknown operation {kind!r}, expected rename, drop, set or each"
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


def _parents(body: dict[str, object], path: Path) -> list[dict[str, object]] | None:
    """The objects from `body` down to the one holding `path`'s last key.

    None when a key on the way is absent or holds something else than an
    object: there is nothing at `path`.
    """
    parents = [body]
    for key in path[:-1]:
        node = parents[-1].get(key)
        if not isinstance(node, dict):
            return None
        parents.append(node)
    return parents


def _prune(parents: list[dict[str, object]], path: Path) -> None:
    """Remove the objects along `path` that are empty now, deepest first.

    An object is removed only if it still sits where it was found, so a
    value just written in its place stays.
    """
    for level in range(len(parents) - 1, 0, -1):
        node = parents[level]
        holder = parents[level - 1]
        key = path[level - 1]
        if node or holder.get(key) is not node:
            break
        del holder[key]


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
        node = child
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
