"""Parsing hostile bodies without letting them hurt the gateway.

Every body a transform reads comes from outside: a client, or an upstream
that may be misbehaving. The parsers here refuse the known XML attacks (a
DTD, entity declarations, external references, and so billion laughs) before
any expansion happens, bound nesting depth so a deep document costs no more
than a flat one, and turn every parser failure into a `TransformError` that
names the line and column. Nothing else may escape: the proxy relies on
catching one exception type.
"""

from __future__ import annotations

import io
import re
from itertools import accumulate
from xml.sax import SAXParseException
from xml.sax.handler import ContentHandler
from xml.sax.xmlreader import InputSource, Locator

import orjson
from defusedxml import DefusedXmlException, DTDForbidden
from defusedxml.expatreader import DefusedExpatParser

from strangler.transforms import TransformError

DEFAULT_MAX_DEPTH = 64

# orjson writes at most 255 nested containers, and one XML level can become
# two JSON containers (an object inside a list), so 127 is the deepest level
# both directions can honour.
MAX_DEPTH_LIMIT = 127

# Code points XML 1.0 cannot carry at all, not even as character references.
_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def check_max_depth(max_depth: int) -> None:
    """Refuse a depth limit the transforms cannot honour (a caller's mistake)."""
    if (
        isinstance(max_depth, bool)
        or not isinstance(max_depth, int)
        or not 1 <= max_depth <= MAX_DEPTH_LIMIT
    ):
        raise ValueError(
            f"max_depth must be an int from 1 to {MAX_DEPTH_LIMIT}, got {max_depth!r}"
        )


def check_body_size(size: int, max_body: int) -> None:
    """Refuse a body over the transform's `max_body` with 413.

    The proxy calls this while buffering, with the running total, so an
    oversized body is refused as soon as it crosses the limit rather than
    after it has all been read.
    """
    if size > max_body:
        raise TransformError(
            f"body is larger than the transform limit of {max_body} bytes",
            status=413,
            reason="too_large",
        )


def too_deep(kind: str, max_depth: int, where: str = "") -> TransformError:
    """The error for a document nested deeper than `max_depth` levels."""
    return TransformError(
        f"{kind} document nested deeper than {max_depth} levels{where}",
        reason="too_deep",
    )


def check_xml_chars(text: str, where: str) -> None:
    """Refuse a string holding a character XML 1.0 has no way to write."""
    found = _NOT_XML_CHAR.search(text)
    if found is not None:
        raise TransformError(
            f"{where} contains U+{ord(found.group()):04X}, which XML 1.0 cannot carry",
            reason="unsupported",
        )


def load_json(body: bytes, max_nesting: int) -> object:
    """Parse JSON nested at most `max_nesting` arrays and objects deep.

    The nesting is measured before parsing: orjson before 3.9.15 recursed
    without a limit and a few megabytes of `[` crashed the process
    (CVE-2024-27454), and even a bounded parser would first build the whole
    deep structure. Errors name the line and column.
    """
    if json_nesting(body) > max_nesting:
        raise too_deep("JSON", max_nesting)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "recursion" in exc.msg:
            raise too_deep("JSON", max_nesting) from exc
        raise TransformError(
            f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            reason="malformed",
        ) from exc


# Everything but quotes and brackets goes; quoted runs are then cut out.
_STRUCTURE = b'"[]{}'
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(_STRUCTURE)))
_QUOTED = re.compile(rb'"[^"]*"?')
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_nesting(body: bytes) -> int:
    """How deeply arrays and objects nest in JSON text, found without parsing.

    Escaped backslashes and then escaped quotes are removed (left to right,
    as JSON pairs them), so every quote left opens or closes a string. Then
    only quotes and brackets are kept, quoted runs are cut, and the brackets
    left become steps of +1 and -1 whose highest running sum is the nesting.
    Every step runs in C. Exact for well-formed JSON; for broken JSON only an
    estimate, which the parser then refuses anyway.
    """
    skeleton = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Two quotes side by side hold no bracket between them, inside a string
    # or out, so dropping them changes nothing and defuses a body of quotes.
    skeleton = skeleton.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    brackets = _QUOTED.sub(b"", skeleton).translate(_BRACKET_STEP)
    return max(accumulate(memoryview(brackets).cast("b")), default=0)


class LocatedHandler(ContentHandler):
    """A SAX handler that can say where in the document it is."""

    _position: Locator | None = None

    def setDocumentLocator(self, locator: Locator) -> None:
        self._position = locator

    def where(self, column: bool = True) -> str:
        """` at line L, column C` for the event being handled, for messages."""
        if self._position is None:
            return ""
        line = self._position.getLineNumber()
        if not column:
            return f" at line {line}"
        return f" at line {line}, column {(self._position.getColumnNumber() or 0) + 1}"


def parse_xml(body: bytes, handler: LocatedHandler) -> None:
    """Feed `body` to `handler` through defusedxml's hardened expat reader.

    Namespace processing is off on purpose: element and attribute names reach
    the handler exactly as written (`ns:tag`, `xmlns:ns`), which is what lets
    a converted document keep its prefixes. A DTD is refused at `<!DOCTYPE`,
    before any entity is declared, which also stops billion laughs and
    external entities; the other two guards stay on in case that ever changes.
    """
    reader = DefusedExpatParser(
        forbid_dtd=True, forbid_entities=True, forbid_external=True
    )
    reader.setContentHandler(handler)
    source = InputSource()
    source.setByteStream(io.BytesIO(body))

    try:
        reader.parse(source)
    except SAXParseException as exc:
        column = (exc.getColumnNumber() or 0) + 1
        raise TransformError(
            f"malformed XML at line {exc.getLineNumber()}, column {column}: "
            f"{exc.getMessage()}",
            reason="malformed",
        ) from exc
    except DTDForbidden as exc:
        where = handler.where(column=False)
        raise TransformError(
            f"XML with a DTD is refused (<!DOCTYPE {exc.name}>{where})",
            reason="refused_construct",
        ) from exc
    except DefusedXmlException as exc:
        # Entity declarations and external references only occur inside a
        # DTD, refused above; this keeps any other refusal a TransformError.
        raise TransformError(
            f"XML construct refused: {exc}{handler.where(column=False)}",
            reason="refused_construct",
        ) from exc
    except (LookupError, UnicodeError) as exc:
        # An encoding declaration naming a codec Python lacks, or bytes that
        # do not decode in the one it names.
        raise TransformError(
            f"malformed XML: cannot decode the body: {exc}", reason="malformed"
        ) from exc
