"""Comparing two answers to the same request: status, chosen headers, body.

JSON bodies are compared as structures (key order, whitespace and `1` vs
`1.0` do not matter; `true` vs `1` does), and every difference is reported
with the JSONPath of the field. XML bodies are first compared in canonical
form (C14N 2.0, whitespace-only text dropped); when that differs they are
mapped to JSON with the documented XML mapping so the difference gets a
field path too. One XML and one JSON body (legacy XML against a new JSON
service) are compared after mapping the XML side. Anything else, and any
body larger than the capture limit, is compared by hash.

Everything here is pure: two `Answer` objects in, an `Outcome` out. The
shadow machinery calls it only once both sides of a mirrored pair are
complete.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from xml.etree.ElementTree import C14NWriterTarget, ParseError

import orjson
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from strangler.shadow.jsonpath import PathSet, Segment, State, format_path, generalize
from strangler.transforms import TransformError
from strangler.transforms.safety import load_json
from strangler.transforms.xml_json import xml_to_json

__all__ = [
    "CAPTURE_LIMIT",
    "Answer",
    "Capture",
    "CompareSpec",
    "Difference",
    "Outcome",
    "compare",
    "decoded",
    "short_value",
]

CAPTURE_LIMIT = 1024 * 1024
"""Largest body kept whole for a structural comparison; larger ones are hashed."""

MAX_DIFFERENCES = 50
"""Differences reported for one pair; the rest are only counted."""

MAX_NESTING = 128
_VALUE_WIDTH = 120
_MISSING = object()
_NUMBER = (int, float)
_CONTAINER = (dict, list)


class Answer:
    """One side's response as captured: status, headers and the body (or its hash)."""

    __slots__ = ("_digest", "body", "headers", "size", "status")

    def __init__(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None,
        size: int | None = None,
        digest: bytes | None = None,
    ) -> None:
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.size = len(body) if size is None and body is not None else size or 0
        self._digest = digest

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = blake2b(self.body or b"", digest_size=16).digest()
        return self._digest

    def header(self, lname: bytes) -> bytes | None:
        """All values of a header joined with `, `, or None when absent."""
        found = [value for name, value in self.headers if name.lower() == lname]
        return b", ".join(found) if found else None


class Capture:
    """Collects a body up to a limit; past it, only a running hash is kept."""

    __slots__ = ("chunks", "hasher", "limit", "size")

    def __init__(self, limit: int = CAPTURE_LIMIT) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.hasher: blake2b | None = None

    def add(self, data: bytes) -> None:
        self.size += len(data)
        hasher = self.hasher
        if hasher is not None:
            hasher.update(data)
            return
        self.chunks.append(data)
        if self.size > self.limit:
            hasher = self.hasher = blake2b(digest_size=16)
            for chunk in self.chunks:
                hasher.update(chunk)
            self.chunks = []

    def answer(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> Answer:
        if self.hasher is not None:
            return Answer(status, headers, None, self.size, self.hasher.digest())
        return Answer(status, headers, b"".join(self.chunks))


@dataclass(frozen=True, slots=True)
class CompareSpec:
    """A route's `compare` settings, compiled once."""

    headers: tuple[bytes, ...] = (b"content-type",)
    ignore: PathSet = field(default_factory=PathSet)
    limit: int = CAPTURE_LIMIT


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the two answers disagree.

    `kind` is `status`, `header` or `body`; `field` is what differences are
    counted by (a header name, or a JSONPath with `[*]` for indices) and
    `where` the exact place in this pair.
    """

    kind: str
    field: str
    where: str
    primary: str
    shadow: str


@dataclass(slots=True)
class Outcome:
    """What comparing one pair found."""

    differences: list[Difference] = field(default_factory=list)
    ignored: int = 0
    noise: list[str] = field(default_factory=list)
    more: int = 0
    body_mode: str = "none"

    @property
    def agreed(self) -> bool:
        return not self.differences and not self.more


def compare(
    primary: Answer,
    shadow: Answer,
    spec: CompareSpec,
    noise: PathSet | None = None,
    noise_headers: frozenset[bytes] = frozenset(),
) -> Outcome:
    """Compare two answers; `noise` and `noise_headers` are learned noise."""
    outcome = Outcome()
    if primary.status != shadow.status:
        # Bodies and headers of different statuses differ as a consequence;
        # listing them would bury the one difference that matters.
        outcome.differences.append(
            Difference(
                "status", "status", "status", str(primary.status), str(shadow.status)
            )
        )
        return outcome

    paths = spec.ignore
    if noise:
        paths = PathSet([*spec.ignore.patterns, *noise.patterns])
    _compare_bodies(primary, shadow, spec.limit, paths, outcome)

    for lname in spec.headers:
        if lname == b"content-type" and outcome.body_mode == "xml-as-json":
            # The XML side was compared as JSON, so its type says nothing more.
            continue
        ours, theirs = primary.header(lname), shadow.header(lname)
        if lname == b"content-type":
            ours, theirs = _media(ours), _media(theirs)
        if ours == theirs:
            continue
        name = lname.decode("latin-1")
        if lname in noise_headers:
            outcome.noise.append(name)
            continue
        outcome.differences.append(
            Difference("header", name, name, _header_text(ours), _header_text(theirs))
        )
    return outcome


# -- bodies -------------------------------------------------------------------


def _compare_bodies(
    primary: Answer, shadow: Answer, limit: int, paths: PathSet, outcome: Outcome
) -> None:
    ours = decoded(primary, limit)
    theirs = decoded(shadow, limit)
    if ours is None or theirs is None:
        outcome.body_mode = "hash"
        if primary.size != shadow.size or primary.digest != shadow.digest:
            _whole_body(outcome, paths, _hash_text(primary), _hash_text(shadow))
        return
    if ours == theirs:
        outcome.body_mode = "bytes"
        return

    kinds = (_kind(primary, ours), _kind(shadow, theirs))
    if kinds == ("json", "json"):
        outcome.body_mode = "json"
        _compare_json(_json(ours), _json(theirs), ours, theirs, paths, outcome)
    elif kinds == ("xml", "xml"):
        outcome.body_mode = "xml"
        _compare_xml(ours, theirs, paths, outcome)
    elif "xml" in kinds and "json" in kinds:
        outcome.body_mode = "xml-as-json"
        left = _xml_as_data(ours) if kinds[0] == "xml" else _json(ours)
        right = _xml_as_data(theirs) if kinds[1] == "xml" else _json(theirs)
        _compare_json(left, right, ours, theirs, paths, outcome)
    else:
        outcome.body_mode = "bytes"
        _whole_body(outcome, paths, _bytes_text(ours), _bytes_text(theirs))


def _compare_json(
    left: object,
    right: object,
    ours: bytes,
    theirs: bytes,
    paths: PathSet,
    outcome: Outcome,
) -> None:
    if left is _MISSING or right is _MISSING:
        # One side does not parse: say so rather than guess at fields.
        ours_text = "(does not parse) " if left is _MISSING else ""
        theirs_text = "(does not parse) " if right is _MISSING else ""
        _whole_body(
            outcome,
            paths,
            ours_text + _bytes_text(ours),
            theirs_text + _bytes_text(theirs),
        )
        return
    if _canonical(left) == _canonical(right):
        return
    diff_structures(left, right, paths, outcome)


def _compare_xml(ours: bytes, theirs: bytes, paths: PathSet, outcome: Outcome) -> None:
    left, right = _c14n(ours), _c14n(theirs)
    if left is not None and left == right:
        return
    left_data, right_data = _xml_as_data(ours), _xml_as_data(theirs)
    if left_data is _MISSING or right_data is _MISSING:
        _whole_body(outcome, paths, _bytes_text(ours), _bytes_text(theirs))
        return
    before = len(outcome.differences) + outcome.ignored + len(outcome.noise)
    diff_structures(left_data, right_data, paths, outcome)
    if before == len(outcome.differences) + outcome.ignored + len(outcome.noise):
        # Canonical forms differ in something the element mapping does not carry.
        outcome.differences.append(
            Difference(
                "body",
                "$",
                "$",
                "XML differs outside elements, attributes and text",
                _bytes_text(theirs),
            )
        )


def _whole_body(outcome: Outcome, paths: PathSet, ours: str, theirs: str) -> None:
    label = paths.covered(paths.start)
    if label == "ignore":
        outcome.ignored += 1
    elif label == "noise":
        outcome.noise.append("$")
    else:
        outcome.differences.append(Difference("body", "$", "$", ours, theirs))


def diff_structures(
    left: object, right: object, paths: PathSet, outcome: Outcome
) -> None:
    """Walk two parsed JSON values side by side, recording differing fields.

    Paths covered by `paths` are not descended into; a covered subtree that
    differs counts once as ignored (label `ignore`) or as noise.
    """
    stack: list[tuple[tuple[Segment, ...], object, object, State]] = [
        ((), left, right, paths.start)
    ]
    differences = outcome.differences
    while stack:
        path, ours, theirs, state = stack.pop()
        if state:
            label = paths.covered(state)
            if label is not None:
                if not _same(ours, theirs):
                    if label == "ignore":
                        outcome.ignored += 1
                    else:
                        outcome.noise.append(generalize(path))
                continue
        if isinstance(ours, dict) and isinstance(theirs, dict):
            keys = list(ours)
            keys += [key for key in theirs if key not in ours]
            for key in reversed(keys):
                stack.append(
                    (
                        (*path, key),
                        ours.get(key, _MISSING),
                        theirs.get(key, _MISSING),
                        paths.step(state, key) if state else state,
                    )
                )
        elif isinstance(ours, list) and isinstance(theirs, list):
            for index in reversed(range(max(len(ours), len(theirs)))):
                stack.append(
                    (
                        (*path, index),
                        ours[index] if index < len(ours) else _MISSING,
                        theirs[index] if index < len(theirs) else _MISSING,
                        paths.step(state, index) if state else state,
                    )
                )
        elif not _scalar_equal(ours, theirs):
            if state and (
                isinstance(ours, _CONTAINER) or isinstance(theirs, _CONTAINER)
            ):
                # A subtree present on one side only, or one whose type changed:
                # what `paths` covers inside it is left out before it is shown,
                # and a subtree missing on the other side that holds nothing but
                # covered fields is no difference at all.
                ours, ours_covered = _pruned(ours, path, state, paths, outcome)
                theirs, theirs_covered = _pruned(theirs, path, state, paths, outcome)
                if (ours_covered and theirs is _MISSING) or (
                    theirs_covered and ours is _MISSING
                ):
                    continue
            if len(differences) >= MAX_DIFFERENCES:
                outcome.more += 1
                continue
            differences.append(
                Difference(
                    "body",
                    generalize(path),
                    format_path(path),
                    short_value(ours),
                    short_value(theirs),
                )
            )


def _pruned(
    value: object,
    path: tuple[Segment, ...],
    state: State,
    paths: PathSet,
    outcome: Outcome,
) -> tuple[object, bool]:
    """`value` without the fields `paths` covers, each counted as left out.

    The flag says that `value` is a non-empty container holding nothing but
    covered fields, so nothing of it is left to compare.
    """
    if not state or not isinstance(value, _CONTAINER) or not value:
        return value, False
    items = value.items() if isinstance(value, dict) else enumerate(value)
    kept: list[tuple[Segment, object]] = []
    for key, child in items:
        child_path = (*path, key)
        child_state = paths.step(state, key)
        label = paths.covered(child_state) if child_state else None
        if label == "ignore":
            outcome.ignored += 1
            continue
        if label is not None:
            outcome.noise.append(generalize(child_path))
            continue
        pruned, covered = _pruned(child, child_path, child_state, paths, outcome)
        if not covered:
            kept.append((key, pruned))
    if isinstance(value, dict):
        return dict(kept), not kept
    return [child for _, child in kept], not kept


def _scalar_equal(ours: object, theirs: object) -> bool:
    if ours is _MISSING or theirs is _MISSING:
        return ours is theirs
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return type(ours) is type(theirs) and ours == theirs
    if isinstance(ours, _NUMBER) and isinstance(theirs, _NUMBER):
        return ours == theirs
    return type(ours) is type(theirs) and ours == theirs


def _same(ours: object, theirs: object) -> bool:
    if ours is _MISSING or theirs is _MISSING:
        return ours is theirs
    return _canonical(ours) == _canonical(theirs)


def _canonical(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _json(body: bytes) -> object:
    try:
        return load_json(body, MAX_NESTING)
    except TransformError:
        return _MISSING


def _xml_as_data(body: bytes) -> object:
    try:
        return orjson.loads(xml_to_json(body))
    except (TransformError, orjson.JSONDecodeError):
        return _MISSING


def _c14n(body: bytes) -> str | None:
    """Canonical XML (C14N 2.0) through a parser that refuses DTDs and entities."""
    out: list[str] = []
    parser = DefusedXMLParser(
        target=C14NWriterTarget(out.append, strip_text=True), forbid_dtd=True
    )
    try:
        parser.feed(body)
        parser.close()
    except (ParseError, DefusedXmlException, ValueError):
        return None
    return "".join(out)


def decoded(answer: Answer, limit: int) -> bytes | None:
    """The body with gzip or deflate undone, or None if too large to compare whole."""
    body = answer.body
    if body is None:
        return None
    encoding = (answer.header(b"content-encoding") or b"").strip().lower()
    if encoding in (b"", b"identity") or not body:
        return body
    if encoding in (b"gzip", b"x-gzip"):
        return _inflate(body, limit, 16 + zlib.MAX_WBITS)
    if encoding == b"deflate":
        inflated = _inflate(body, limit, zlib.MAX_WBITS)
        return (
            inflated if inflated is not None else _inflate(body, limit, -zlib.MAX_WBITS)
        )
    return body


def _inflate(body: bytes, limit: int, wbits: int) -> bytes | None:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or not inflater.eof:
        return None
    return out


def _kind(answer: Answer, body: bytes) -> str:
    media = _media(answer.header(b"content-type"))
    if media is not None:
        if media == b"application/json" or media.endswith(b"+json"):
            return "json"
        if media in (b"application/xml", b"text/xml") or media.endswith(b"+xml"):
            return "xml"
        return "other"
    start = body.lstrip()[:1]
    if start in (b"{", b"["):
        return "json"
    if start == b"<":
        return "xml"
    return "other"


def _media(value: bytes | None) -> bytes | None:
    if value is None:
        return None
    return value.split(b";", 1)[0].strip().lower()


def short_value(value: object) -> str:
    """A JSON value as short text for reports."""
    if value is _MISSING:
        return "(missing)"
    text = orjson.dumps(value).decode()
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 3] + "..."


def _header_text(value: bytes | None) -> str:
    return "(missing)" if value is None else value.decode("latin-1")[:_VALUE_WIDTH]


def _bytes_text(body: bytes) -> str:
    text = body[:_VALUE_WIDTH].decode("utf-8", "replace")
    more = "..." if len(body) > _VALUE_WIDTH else ""
    return f"{len(body)} bytes: {text!r}{more}"


def _hash_text(answer: Answer) -> str:
    return f"{answer.size} bytes, hash {answer.digest.hex()[:16]}"
