"""XML bodies to JSON and back, for clients and services that disagree.

The mapping is written out with examples in `docs/transforms.md`; in short:
the root element is a one-key object, attributes are `@name` keys, repeated
children are lists, text beside attributes or children is `#text`, an empty
element is null, and text is typed only when writing the value back gives
the same text again. That last rule is what makes the round trip exact for
the documented subset.

Both directions are single passes with explicit stacks (no recursion), and
both count depth in XML elements, so one `max_depth` means the same thing on
the way in and on the way out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from xml.parsers import expat

import orjson

from strangler.transforms import TransformError
from strangler.transforms.safety import (
    DEFAULT_MAX_DEPTH,
    LocatedHandler,
    check_max_depth,
    check_xml_chars,
    load_json,
    parse_xml,
    too_deep,
)

__all__ = [
    "ITEM_NAME",
    "ROOT_NAME",
    "TRANSFORMS",
    "content_type_for",
    "json_to_xml",
    "reads_content_type",
    "typed_scalar",
    "xml_to_json",
]

ROOT_NAME = "root"
ITEM_NAME = "item"
TEXT_KEY = "#text"

# JavaScript's safe integers: a consumer that parses JSON into doubles reads
# these exactly, so turning such text into a number loses nothing.
MAX_SAFE_INT = 2**53 - 1

_XML_SPACE = " \t\r\n"
_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LONGEST_NUMBER = 25  # longer than any canonical int or float repr

# XML 1.0 (fifth edition) name characters, without the colon: an NCName.
_NAME_START = (
    "A-Z_a-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02ff\u0370-\u037d\u037f-\u1fff"
    "\u200c\u200d\u2070-\u218f\u2c00-\u2fef\u3001-\ud7ff\uf900-\ufdcf"
    "\ufdf0-\ufffd\U00010000-\U000effff"
)
_NAME_REST = _NAME_START + "\\-.0-9\u00b7\u0300-\u036f\u203f\u2040"
_NCNAME = f"[{_NAME_START}][{_NAME_REST}]*"
_QNAME = re.compile(f"(?:({_NCNAME}):)?{_NCNAME}")

# One scan finds whether a string needs escaping or cannot be written at all.
_TEXT_ATTENTION = re.compile(
    "[&<>\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]"
)
_ATTR_ATTENTION = re.compile(
    '[&<"\t\n\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]'
)


def xml_to_json(body: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """Convert an XML document to JSON (UTF-8); an empty body stays empty.

    Raises `TransformError` (400) for malformed XML, a DTD or entity, an
    undeclared namespace prefix, or elements nested deeper than `max_depth`.
    """
    check_max_depth(max_depth)
    if not body:
        return b""

    builder = _JsonBuilder(max_depth)
    parse_xml(body, builder)
    try:
        return orjson.dumps(builder.result)
    except orjson.JSONEncodeError as exc:
        # Only reachable if an orjson release writes fewer nested containers
        # than the 255 that MAX_DEPTH_LIMIT is sized for.
        raise too_deep("XML", max_depth, " to write as JSON") from exc


def json_to_xml(body: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """Convert a JSON document to XML with a UTF-8 declaration.

    An empty body stays empty. A top-level object with one element-name key
    whose value is not a list names the root element; anything else is
    wrapped in `<root>`. Raises `TransformError` (400) for malformed JSON, a
    key that is not an XML name, a string XML cannot carry, or nesting deeper
    than `max_depth` elements.
    """
    check_max_depth(max_depth)
    if not body:
        return b""

    try:
        # One element level is at most two JSON containers (a list and an
        # object), so nesting beyond twice the limit is refused unparsed.
        data = load_json(body, 2 * max_depth)
    except TransformError as exc:
        if exc.reason != "too_deep":
            raise
        raise too_deep("JSON", max_depth) from exc
    name, value = _root_of(data)
    return _write_xml(name, value, max_depth).encode()


TRANSFORMS: dict[str, Callable[[bytes], bytes]] = {
    "xml_to_json": xml_to_json,
    "json_to_xml": json_to_xml,
}

_PRODUCES = {"xml_to_json": b"application/json", "json_to_xml": b"application/xml"}


def content_type_for(name: str) -> bytes:
    """The `Content-Type` of what the transform called `name` produces."""
    try:
        return _PRODUCES[name]
    except KeyError:
        known = ", ".join(sorted(_PRODUCES))
        raise ValueError(
            f"unknown transform {name!r}, expected one of {known}"
        ) from None


def reads_content_type(name: str, content_type: bytes | None) -> bool:
    """Whether a body sent with `content_type` is what transform `name` reads.

    XML is `application/xml`, `text/xml` or any `+xml` type; JSON is
    `application/json` or any `+json` type. Parameters such as `charset` are
    ignored. The proxy can use this to leave, say, an HTML error page alone.
    """
    content_type_for(name)
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    if name == "xml_to_json":
        return media in (b"application/xml", b"text/xml") or media.endswith(b"+xml")
    return media == b"application/json" or media.endswith(b"+json")


def typed_scalar(text: str) -> object:
    """The JSON value for non-empty XML text: typed only if it reads back the same.

    `true`/`false` become booleans; an integer with no sign but `-`, no
    leading zero, not `-0`, and at most 2**53 - 1 in size becomes an int; a
    number with a fraction or exponent becomes a float when Python's `repr`
    of that float is exactly the text. Everything else stays a string.
    """
    if text == "true":
        return True
    if text == "false":
        return False
    first = text[0]
    if (first == "-" or "0" <= first <= "9") and len(text) <= _LONGEST_NUMBER:
        found = _NUMBER.fullmatch(text)
        if found is not None:
            if found.group(1) is None and found.group(2) is None:
                number = int(text)
                if abs(number) <= MAX_SAFE_INT and text != "-0":
                    return number
            else:
                real = float(text)
                if repr(real) == text:
                    return real
    return text


def _scalar_text(value: object) -> str:
    """The XML text of a JSON scalar: the inverse of `typed_scalar`."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class _Open:
    """An element whose end tag has not been seen yet."""

    __slots__ = ("declared", "runs", "value")

    def __init__(self, value: dict[str, object] | None, declared: tuple[str, ...]):
        self.value = value
        self.declared = declared
        self.runs: list[str] | None = None


class _JsonBuilder(LocatedHandler):
    """Builds the JSON value while expat reads, refusing too-deep documents early.

    Text arrives in pieces; a run of text ends at the next tag. Runs that are
    only whitespace are indentation and are dropped; the others are kept
    exactly, and all the kept runs of one element are joined.
    """

    def __init__(self, max_depth: int) -> None:
        super().__init__()
        self.result: dict[str, object] = {}
        self._max_depth = max_depth
        self._stack: list[_Open] = []
        self._pending: list[str] = []
        self._bound: dict[str, int] = {"xml": 1}

    def startElement(self, name: str, attrs: object) -> None:
        if self._pending:
            self._flush_text()
        if len(self._stack) >= self._max_depth:
            raise too_deep("XML", self._max_depth, self.where())

        value: dict[str, object] | None = None
        declared: tuple[str, ...] = ()
        if attrs:
            value = {}
            prefixed: list[str] = []
            for key, raw in attrs.items():  # type: ignore[attr-defined]
                value["@" + key] = typed_scalar(raw) if raw else None
                if ":" in key:
                    prefix = self._prefix_of(key, "attribute")
                    if prefix == "xmlns":
                        declared += (key[6:],)
                    else:
                        prefixed.append(key)
            for prefix in declared:
                self._bound[prefix] = self._bound.get(prefix, 0) + 1
            for key in prefixed:
                self._check_bound(key, "attribute")
        if ":" in name:
            self._check_bound(name, "element")

        self._stack.append(_Open(value, declared))

    def characters(self, content: str) -> None:
        self._pending.append(content)

    def endElement(self, name: str) -> None:
        if self._pending:
            self._flush_text()
        done = self._stack.pop()
        text = "".join(done.runs) if done.runs else ""
        value: object
        if done.value is None:
            value = typed_scalar(text) if text else None
        else:
            if text:
                done.value[TEXT_KEY] = typed_scalar(text)
            value = done.value
        for prefix in done.declared:
            self._bound[prefix] -= 1

        if not self._stack:
            self.result = {name: value}
            return
        parent = self._stack[-1]
        if parent.value is None:
            parent.value = {name: value}
        elif name not in parent.value:
            parent.value[name] = value
        else:
            siblings = parent.value[name]
            if type(siblings) is list:
                # An element's own value is never a list, so a list here is
                # the one started for earlier siblings of the same name.
                siblings.append(value)
            else:
                parent.value[name] = [siblings, value]

    def _flush_text(self) -> None:
        pending = self._pending
        text = pending[0] if len(pending) == 1 else "".join(pending)
        pending.clear()
        if self._stack and text.strip(_XML_SPACE):
            current = self._stack[-1]
            if current.runs is None:
                current.runs = [text]
            else:
                current.runs.append(text)

    def _prefix_of(self, name: str, kind: str) -> str:
        """The prefix of a name with a colon, which must be `prefix:local`."""
        prefix, _, local = name.partition(":")
        if not prefix or not local or ":" in local:
            raise TransformError(
                f"{kind} name {name!r} is not a valid namespaced name{self.where()}",
                reason="malformed",
            )
        return prefix

    def _check_bound(self, name: str, kind: str) -> None:
        prefix = self._prefix_of(name, kind)
        if prefix == "xmlns" or not self._bound.get(prefix):
            raise TransformError(
                f"undeclared namespace prefix {prefix!r} in {kind} {name!r}"
                f"{self.where()}",
                reason="malformed",
            )


def _root_of(data: object) -> tuple[str, object]:
    """The root element's name and value: a lone key names it, else `<root>`."""
    if isinstance(data, dict) and len(data) == 1:
        key, value = next(iter(data.items()))
        if key[:1] not in ("@", "#") and not isinstance(value, list):
            return key, value
    return ROOT_NAME, data


@lru_cache(maxsize=4096)
def _qname_prefix(name: str) -> str | None:
    """The prefix of a valid XML (namespaced) name, `""` if none, None if invalid.

    Beyond ASCII the fifth edition of XML 1.0 allows more name characters
    than expat and many deployed parsers do, so a non-ASCII name must also
    pass expat itself: the XML written here has to parse on the other side.
    """
    found = _QNAME.fullmatch(name)
    if found is None:
        return None
    if not name.isascii():
        try:
            expat.ParserCreate().Parse(f"<{name}/>".encode(), True)
        except expat.ExpatError:
            return None
    return found.group(1) or ""


_Pending = tuple[str, object, int, frozenset[str], str | None]


def _write_xml(root_name: str, root_value: object, max_depth: int) -> str:
    """Serialise one JSON value as the document element `root_name`.

    Work is a stack of elements still to write and end tags still to emit,
    so the output is produced in one pass whatever the nesting.
    """
    out: list[str] = [_DECLARATION]
    todo: list[_Pending | str] = [(root_name, root_value, 1, frozenset(["xml"]), None)]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        name, value, depth, scope, parent = item
        if depth > max_depth:
            raise too_deep("JSON", max_depth, f" (at element {name!r})")
        prefix = _qname_prefix(name)
        if prefix is None:
            within = f" in {parent!r}" if parent else " at the top level"
            raise TransformError(
                f"JSON key {name!r}{within} is not a valid XML element name",
                reason="unsupported",
            )

        if isinstance(value, dict):
            _write_object(name, value, depth, scope, out, todo)
            continue
        _check_bound(prefix, name, scope, "element")
        if value is None:
            out.append(f"<{name}/>")
        elif isinstance(value, list):
            if not value:
                out.append(f"<{name}/>")
                continue
            out.append(f"<{name}>")
            todo.append(f"</{name}>")
            todo.extend(
                (ITEM_NAME, each, depth + 1, scope, name) for each in reversed(value)
            )
        else:
            out.append(f"<{name}>{_text(value, name)}</{name}>")
    return "".join(out)


def _write_object(
    name: str,
    value: dict[str, object],
    depth: int,
    scope: frozenset[str],
    out: list[str],
    todo: list[_Pending | str],
) -> None:
    """Write the start tag and text of an object's element, queue its children."""
    attributes: list[str] = []
    text = ""
    children: list[tuple[str, object]] = []
    declared: list[str] = []
    prefixed: list[tuple[str, str]] = []
    for key, child in value.items():
        if key[:1] == "@":
            attribute = key[1:]
            prefix = _qname_prefix(attribute)
            if prefix is None:
                raise TransformError(
                    f"JSON key {key!r} in {name!r} is not a valid XML attribute name",
                    reason="unsupported",
                )
            if prefix == "xmlns":
                declared.append(attribute[6:])
            elif prefix:
                prefixed.append((prefix, attribute))
            attributes.append(f' {attribute}="{_attribute_text(child, key, name)}"')
        elif key == TEXT_KEY:
            if child is not None:
                text = _text(child, name, key)
        else:
            children.append((key, child))

    if declared:
        scope = scope.union(declared)
    _check_bound(_qname_prefix(name) or "", name, scope, "element")
    for prefix, attribute in prefixed:
        _check_bound(prefix, "@" + attribute, scope, "attribute")

    start = f"<{name}{''.join(attributes)}"
    if not text and not any(child != [] for _, child in children):
        out.append(start + "/>")
        return
    out.append(f"{start}>{text}")
    todo.append(f"</{name}>")
    for key, child in reversed(children):
        if isinstance(child, list):
            todo.extend((key, each, depth + 1, scope, name) for each in reversed(child))
        else:
            todo.append((key, child, depth + 1, scope, name))


def _check_bound(prefix: str, name: str, scope: frozenset[str], kind: str) -> None:
    if prefix == "xmlns" and kind == "element":
        raise TransformError(
            f"JSON key {name!r} is not a valid XML element name: the 'xmlns' "
            "prefix only declares namespaces, as an '@xmlns:...' key",
            reason="unsupported",
        )
    if prefix and prefix not in scope:
        raise TransformError(
            f"JSON key {name!r} uses namespace prefix {prefix!r} but no enclosing "
            f"object declares it with '@xmlns:{prefix}'",
            reason="unsupported",
        )


def _text(value: object, name: str, key: str | None = None) -> str:
    """Escaped element text for a JSON scalar."""
    if isinstance(value, dict | list):
        what = "an object" if isinstance(value, dict) else "a list"
        raise TransformError(
            f"JSON key {key!r} in {name!r} holds {what}; text needs a string, "
            "number or boolean",
            reason="unsupported",
        )
    text = _scalar_text(value)
    if _TEXT_ATTENTION.search(text) is None:
        return text
    check_xml_chars(text, f"the text of {name!r}")
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\r", "&#13;")
    )


def _attribute_text(value: object, key: str, name: str) -> str:
    """Escaped attribute value for a JSON scalar; null is the empty value."""
    if isinstance(value, dict | list):
        what = "an object" if isinstance(value, dict) else "a list"
        raise TransformError(
            f"JSON key {key!r} in {name!r} holds {what}; an attribute needs a "
            "string, number, boolean or null",
            reason="unsupported",
        )
    if value is None:
        return ""
    text = _scalar_text(value)
    if _ATTR_ATTENTION.search(text) is None:
        return text
    check_xml_chars(text, f"attribute {key!r} of {name!r}")
    # Tabs and newlines are escaped because a parser turns literal ones in an
    # attribute into spaces.
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace('"', "&quot;")
        .replace("\t", "&#9;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
    )
