"""Body transforms: the documented XML/JSON mapping, its round trips, its refusals
of hostile input, and the JSON field mapper."""

from __future__ import annotations

import copy
import json
import re
import threading
from pathlib import Path
from typing import Any

import defusedxml.minidom
import orjson
import pytest
import pytest_twisted
from defusedxml.ElementTree import fromstring as defused_fromstring
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from strangler.errors import ConfigError, StranglerError
from strangler.model import Transform
from strangler.rules import load_rules
from strangler.transforms import TransformError, pipeline
from strangler.transforms.body_map import BodyMap, BodyMaps, DropField, RenameField
from strangler.transforms.offload import ConversionPool
from strangler.transforms.safety import check_body_size, json_nesting
from strangler.transforms.xml_json import (
    TRANSFORMS,
    content_type_for,
    json_to_xml,
    reads_content_type,
    typed_scalar,
    xml_to_json,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "transforms.md"
DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'
XML_SPACE = " \t\r\n"


# The examples of docs/transforms.md, read from the page itself so that the
# page and the tests cannot drift apart.

_EXAMPLE = re.compile(
    r"<!-- example: (?P<name>.+?), (?P<way>both|xml_to_json|json_to_xml) -->\s*"
    r"```xml\n(?P<xml>.*?)\n```\s*```json\n(?P<json>.*?)\n```",
    re.DOTALL,
)
_TABLE_ROW = re.compile(r"^\| `(?P<text>[^`]*)` \| `(?P<json>[^`]*)` \|$", re.MULTILINE)


def _doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def _examples(*ways: str) -> list[Any]:
    return [
        pytest.param(
            found["xml"].encode(),
            found["json"].encode(),
            found["way"],
            id=found["name"],
        )
        for found in _EXAMPLE.finditer(_doc_text())
        if found["way"] in ways
    ]


def _typed_text_rows() -> list[Any]:
    text = _doc_text()
    start = text.index("<!-- typed-text table -->")
    table = text[start : text.index("\n\n", start)]
    return [
        pytest.param(found["text"], found["json"], id=found["text"])
        for found in _TABLE_ROW.finditer(table)
    ]


def _body_map_example(marker: str = "body-map example") -> dict[str, Any]:
    text = _doc_text()
    start = text.index(f"<!-- {marker} -->")
    opening = text.index("```json\n", start) + len("```json\n")
    block = text[opening : text.index("\n```", opening)]
    return orjson.loads(block)  # type: ignore[no-any-return]


def _tree(xml: bytes) -> tuple[Any, ...]:
    """An XML document as comparable data, ignoring what XML calls presentation.

    Names and attributes as written (prefixes and `xmlns` declarations
    included), attribute order ignored, text joined and dropped when only
    whitespace; comments and processing instructions do not count.
    """
    document = defusedxml.minidom.parseString(xml, forbid_dtd=True)
    return _node(document.documentElement)


def _node(element: Any) -> tuple[Any, ...]:
    text = "".join(
        child.data
        for child in element.childNodes
        if child.nodeType in (child.TEXT_NODE, child.CDATA_SECTION_NODE)
    )
    children = tuple(
        _node(child)
        for child in element.childNodes
        if child.nodeType == child.ELEMENT_NODE
    )
    attributes = frozenset(element.attributes.items())
    return (
        element.tagName,
        attributes,
        text if text.strip(XML_SPACE) else "",
        children,
    )


def _strict(value: object) -> bytes:
    """JSON with sorted keys: equal only if types match too (1 is not 1.0)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _refusal(call: Any, body: bytes, **kwargs: Any) -> TransformError:
    with pytest.raises(TransformError) as caught:
        call(body, **kwargs)
    return caught.value


def test_the_doc_holds_the_examples_this_file_runs() -> None:
    """Guards the parametrised tests below against finding nothing to run."""
    every = _examples("both", "xml_to_json", "json_to_xml")
    assert _doc_text().count("<!-- example:") == len(every)
    assert len(_examples("both")) >= 7
    assert len(_examples("xml_to_json")) >= 2
    assert len(_examples("json_to_xml")) >= 6
    assert len(_typed_text_rows()) >= 20
    assert _body_map_example()["map"]


@pytest.mark.parametrize(("xml", "expected", "way"), _examples("both", "xml_to_json"))
def test_doc_example_xml_to_json(xml: bytes, expected: bytes, way: str) -> None:
    assert _strict(orjson.loads(xml_to_json(xml))) == _strict(orjson.loads(expected))


@pytest.mark.parametrize(("expected", "body", "way"), _examples("json_to_xml"))
def test_doc_example_json_to_xml_is_written_exactly(
    expected: bytes, body: bytes, way: str
) -> None:
    assert json_to_xml(body) == DECLARATION + expected


@pytest.mark.parametrize(("xml", "body", "way"), _examples("both"))
def test_doc_example_round_trips_back_to_the_same_tree(
    xml: bytes, body: bytes, way: str
) -> None:
    assert _tree(json_to_xml(body)) == _tree(xml)
    assert _tree(json_to_xml(xml_to_json(xml))) == _tree(xml)


@pytest.mark.parametrize(("text", "expected"), _typed_text_rows())
def test_doc_typed_text_table(text: str, expected: str) -> None:
    converted = orjson.loads(xml_to_json(f"<v>{text}</v>".encode()))
    assert _strict(converted) == _strict({"v": orjson.loads(expected)})


@pytest.mark.parametrize(("text", "expected"), _typed_text_rows())
def test_typed_text_is_written_back_as_the_same_text(text: str, expected: str) -> None:
    value = orjson.loads(expected)
    assert (
        json_to_xml(orjson.dumps({"v": value}))
        == DECLARATION + f"<v>{text}</v>".encode()
    )


@pytest.mark.parametrize("marker", ["body-map example", "body-map list example"])
def test_doc_body_map_example(marker: str) -> None:
    example = _body_map_example(marker)
    body_map = BodyMap(example["map"])
    mapped = body_map.apply(example["request"])
    assert _strict(mapped) == _strict(example["mapped"])
    assert list(mapped) == list(example["mapped"])
    if "answer" in example:
        returned = body_map.reverse().apply(example["answer"])
        assert _strict(returned) == _strict(example["returned"])


# XML to JSON details


def test_empty_body_stays_empty_both_ways() -> None:
    assert xml_to_json(b"") == b""
    assert json_to_xml(b"") == b""


def test_xml_in_a_declared_legacy_encoding_becomes_utf8_json() -> None:
    body = b'<?xml version="1.0" encoding="ISO-8859-1"?><name>Ren\xe9</name>'
    assert xml_to_json(body) == '{"name":"René"}'.encode()


def test_text_keeps_its_surrounding_spaces_but_indentation_is_dropped() -> None:
    body = b"<a>\n  <b> 42 </b>\n  <c>   </c>\n</a>"
    assert orjson.loads(xml_to_json(body)) == {"a": {"b": " 42 ", "c": None}}


def test_one_child_is_a_value_and_separated_namesakes_are_gathered() -> None:
    body = b"<a><one>1</one><b>1</b><c/><b>2</b></a>"
    assert orjson.loads(xml_to_json(body)) == {"a": {"one": 1, "b": [1, 2], "c": None}}


def test_attribute_whitespace_is_a_value_not_indentation() -> None:
    assert orjson.loads(xml_to_json(b'<a x=" "/>')) == {"a": {"@x": " "}}


def test_huge_digit_strings_stay_strings() -> None:
    digits = "9" * 5000
    assert typed_scalar(digits) == digits
    assert orjson.loads(xml_to_json(f"<a>{digits}</a>".encode())) == {"a": digits}


def test_xml_output_is_utf8_with_a_declaration() -> None:
    assert json_to_xml('{"a": "é"}'.encode()) == DECLARATION + "<a>é</a>".encode()


def test_control_characters_that_xml_reads_back_are_escaped() -> None:
    body = orjson.dumps({"a": {"@t": "x\ty\nz\r", "#text": "p\rq"}})
    written = json_to_xml(body)
    assert b'"x&#9;y&#10;z&#13;"' in written
    assert b">p&#13;q<" in written
    assert orjson.loads(xml_to_json(written)) == orjson.loads(body)


# Namespaces


def test_prefixes_are_kept_as_written() -> None:
    body = b'<p:a xmlns:p="urn:x"><p:b p:c="1"/></p:a>'
    converted = xml_to_json(body)
    assert orjson.loads(converted) == {"p:a": {"@xmlns:p": "urn:x", "p:b": {"@p:c": 1}}}
    assert json_to_xml(converted) == DECLARATION + body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b"<p:a/>",
            "undeclared namespace prefix 'p' in element 'p:a' at line 1, column 1",
        ),
        (
            b'<a><b xmlns:p="u"/><p:c/></a>',
            "undeclared namespace prefix 'p' in element 'p:c' at line 1, column 20",
        ),
        (b'<a p:x="1"/>', "undeclared namespace prefix 'p' in attribute 'p:x'"),
        (
            b'<a:b:c xmlns:a="u"/>',
            "element name 'a:b:c' is not a valid namespaced name",
        ),
        (b'<xmlns:a xmlns:a="u"/>', "undeclared namespace prefix 'xmlns'"),
    ],
)
def test_xml_with_a_namespace_error_is_refused(body: bytes, message: str) -> None:
    error = _refusal(xml_to_json, body)
    assert error.status == 400
    assert message in error.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"p:a": 1}', "JSON key 'p:a' uses namespace prefix 'p' but no enclosing"),
        (
            b'{"a": {"b": {"@xmlns:p": "u"}, "p:c": 1}}',
            "JSON key 'p:c' uses namespace prefix 'p'",
        ),
        (b'{"a": {"@p:x": 1}}', "JSON key '@p:x' uses namespace prefix 'p'"),
        (
            b'{"xmlns:a": {"@xmlns:a": "u"}}',
            "JSON key 'xmlns:a' is not a valid XML element name: the 'xmlns' prefix",
        ),
    ],
)
def test_json_with_an_undeclared_prefix_is_refused(body: bytes, message: str) -> None:
    assert message in _refusal(json_to_xml, body).message


def test_a_prefix_declared_on_an_ancestor_or_builtin_is_accepted() -> None:
    body = b'{"a": {"@xmlns:p": "u", "b": {"p:c": 1, "@xml:lang": "en"}}}'
    expected = b'<a xmlns:p="u"><b xml:lang="en"><p:c>1</p:c></b></a>'
    assert json_to_xml(body) == DECLARATION + expected


# JSON to XML refusals


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"first name": 1}', "JSON key 'first name' at the top level is not a valid"),
        (b'{"a": {"2nd": 1}}', "JSON key '2nd' in 'a' is not a valid XML element name"),
        (b'{"a": {"": 1}}', "JSON key '' in 'a' is not a valid XML element name"),
        (b'{"a": {"#comment": 1}}', "JSON key '#comment' in 'a' is not a valid"),
        (b'{"a": {"@": 1}}', "JSON key '@' in 'a' is not a valid XML attribute name"),
        (b'{"a": {"@x y": 1}}', "JSON key '@x y' in 'a' is not a valid XML attribute"),
        (b'{"a": {"b:c:d": 1}}', "JSON key 'b:c:d' in 'a' is not a valid XML element"),
        (
            '{"a": {"\U00010000": 1}}'.encode(),
            "JSON key '\U00010000' in 'a' is not a valid XML element name",
        ),
        (
            b'{"a": {"@id": {"v": 1}}}',
            "JSON key '@id' in 'a' holds an object; an attribute needs a string",
        ),
        (b'{"a": {"@id": [1]}}', "JSON key '@id' in 'a' holds a list"),
        (b'{"a": {"#text": [1], "b": 1}}', "JSON key '#text' in 'a' holds a list"),
        (b'{"a": "x\\u0001"}', "the text of 'a' contains U+0001, which XML 1.0"),
        (b'{"a": {"@b": "\\uffff"}}', "attribute '@b' of 'a' contains U+FFFF"),
    ],
)
def test_json_that_xml_cannot_hold_is_refused(body: bytes, message: str) -> None:
    error = _refusal(json_to_xml, body)
    assert error.status == 400
    assert message in error.message


def test_names_beyond_ascii_that_expat_reads_are_accepted() -> None:
    assert json_to_xml('{"résumé": {"日本": 1}}'.encode()) == (
        DECLARATION + "<résumé><日本>1</日本></résumé>".encode()
    )


# Attacks and malformed input

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE user [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<user><name>&secret;</name></user>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE user SYSTEM "http://127.0.0.1:9/user.dtd">
<user/>"""

PARAMETER_ENTITY = b"""<!DOCTYPE user [
<!ENTITY % remote SYSTEM "http://127.0.0.1:9/evil.dtd"> %remote;]>
<user/>"""

QUADRATIC_BLOWUP = (
    b'<!DOCTYPE kaboom [<!ENTITY a "'
    + b"x" * 50_000
    + b'">]><kaboom>'
    + b"&a;" * 10_000
    + b"</kaboom>"
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (BILLION_LAUGHS, "XML with a DTD is refused (<!DOCTYPE lolz> at line 2)"),
        (EXTERNAL_ENTITY, "XML with a DTD is refused (<!DOCTYPE user> at line 2)"),
        (EXTERNAL_DTD, "XML with a DTD is refused (<!DOCTYPE user> at line 2)"),
        (PARAMETER_ENTITY, "XML with a DTD is refused (<!DOCTYPE user> at line 1)"),
        (QUADRATIC_BLOWUP, "XML with a DTD is refused (<!DOCTYPE kaboom> at line 1)"),
        (
            b"<!DOCTYPE html><html/>",
            "XML with a DTD is refused (<!DOCTYPE html> at line 1)",
        ),
    ],
    ids=[
        "billion-laughs",
        "external-entity",
        "external-dtd",
        "parameter-entity",
        "quadratic-blowup",
        "harmless-doctype",
    ],
)
def test_xml_with_a_dtd_is_refused(body: bytes, message: str) -> None:
    error = _refusal(xml_to_json, body)
    assert (error.status, error.reason) == (400, "refused_construct")
    assert error.message == message


def test_deep_xml_is_refused_at_the_limit() -> None:
    deep = b"<a>" * 65 + b"</a>" * 65
    error = _refusal(xml_to_json, deep)
    assert (error.status, error.reason) == (400, "too_deep")
    assert error.message == (
        "XML document nested deeper than 64 levels at line 1, column 193"
    )
    assert xml_to_json(b"<a>" * 64 + b"</a>" * 64).count(b"{") == 64


def test_xml_far_deeper_than_any_stack_is_refused_cleanly() -> None:
    error = _refusal(xml_to_json, b"<a>" * 200_000)
    assert error.reason == "too_deep"


def test_deep_json_is_refused_at_the_limit() -> None:
    deep = b'{"a":' * 65 + b"1" + b"}" * 65
    error = _refusal(json_to_xml, deep)
    assert (error.status, error.reason) == (400, "too_deep")
    assert (
        error.message == "JSON document nested deeper than 64 levels (at element 'a')"
    )
    assert json_to_xml(b'{"a":' * 64 + b"1" + b"}" * 64).count(b"<a>") == 64


def test_json_far_deeper_than_any_stack_is_refused_cleanly() -> None:
    error = _refusal(json_to_xml, b"[" * 200_000 + b"]" * 200_000)
    assert error.message == "JSON document nested deeper than 64 levels"


def test_depth_counts_elements_so_lists_under_a_key_add_no_level() -> None:
    assert json_to_xml(b'{"a": {"b": [{"c": 1}, {"c": 2}]}}', max_depth=3) == (
        DECLARATION + b"<a><b><c>1</c></b><b><c>2</c></b></a>"
    )
    assert _refusal(json_to_xml, b'{"a": {"b": [{"c": 1}]}}', max_depth=2).message == (
        "JSON document nested deeper than 2 levels (at element 'c')"
    )
    # A top-level list and each list in a list are elements of their own.
    assert json_to_xml(b"[[1]]", max_depth=3) == (
        DECLARATION + b"<root><item><item>1</item></item></root>"
    )
    assert _refusal(json_to_xml, b"[[[1]]]", max_depth=3).reason == "too_deep"


def test_a_document_at_the_depth_limit_survives_the_round_trip() -> None:
    """One XML level can be two JSON containers; both sides must still agree."""
    body = b"<a x='1'/>"
    for _ in range(126):
        body = b"<a>" + body + b"<a/></a>"
    converted = xml_to_json(body, max_depth=127)
    assert json_nesting(converted) == 254
    assert _tree(json_to_xml(converted, max_depth=127)) == _tree(body)


@pytest.mark.parametrize("max_depth", [0, -1, 128, True, "64", 1.5])
def test_max_depth_outside_1_to_127_is_a_value_error(max_depth: Any) -> None:
    for transform in (xml_to_json, json_to_xml):
        with pytest.raises(ValueError, match=r"max_depth must be an int from 1 to 127"):
            transform(b"<a/>", max_depth=max_depth)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<a>\n<b>\n</a>", "malformed XML at line 3, column 3: mismatched tag"),
        (b"<p>&nbsp;</p>", "malformed XML at line 1, column 4: undefined entity"),
        (b"<a>", "malformed XML at line 1, column 4: no element found"),
        (b" ", "malformed XML at line 1, column 2: no element found"),
        (b"<a/><b/>", "malformed XML at line 1, column 5: junk after document element"),
        (
            b"<a x='1' x='2'/>",
            "malformed XML at line 1, column 10: duplicate attribute",
        ),
        (b"<a>\xff</a>", "malformed XML at line 1, column 4: not well-formed"),
        (b"{}", "malformed XML at line 1, column 1: not well-formed (invalid token)"),
        (
            b'<?xml version="1.0" encoding="x-unknown"?><a/>',
            "malformed XML: cannot decode the body: unknown encoding: x-unknown",
        ),
    ],
)
def test_malformed_xml_says_what_and_where(body: bytes, message: str) -> None:
    error = _refusal(xml_to_json, body)
    assert (error.status, error.reason) == (400, "malformed")
    assert error.message.startswith(message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": ', "malformed JSON at line 1, column 7: unexpected end of data"),
        (b'{\n  "a": x}', "malformed JSON at line 2, column 8: unexpected character"),
        (b"<a/>", "malformed JSON at line 1, column 1: unexpected character"),
        (b'"\xff"', "malformed JSON at line 1, column 1: str is not valid UTF-8"),
        (b"1e400", "malformed JSON at line 1, column 1: number is infinity"),
    ],
)
def test_malformed_json_says_what_and_where(body: bytes, message: str) -> None:
    error = _refusal(json_to_xml, body)
    assert (error.status, error.reason) == (400, "malformed")
    assert error.message.startswith(message)


TRICKY_TEXT = st.text(st.sampled_from('[]{}"\\ a\n\u00e9'), max_size=6)
TRICKY_JSON = st.recursive(
    st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), TRICKY_TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(TRICKY_TEXT, inner, max_size=3)
    ),
    max_leaves=15,
)


def _nesting(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_nesting, value), default=0)
    return 0


@given(TRICKY_JSON, st.booleans())
def test_json_nesting_is_measured_exactly_without_parsing(
    value: object, indent: bool
) -> None:
    """Brackets, quotes and backslashes inside strings must not fool the scan."""
    option = orjson.OPT_INDENT_2 if indent else 0
    assert json_nesting(orjson.dumps(value, option=option)) == _nesting(value)
    assert json_nesting(json.dumps(value).encode()) == _nesting(value)


def test_a_body_over_max_body_is_refused_with_413() -> None:
    check_body_size(10 * 1024 * 1024, 10 * 1024 * 1024)
    with pytest.raises(TransformError) as caught:
        check_body_size(10 * 1024 * 1024 + 1, 10 * 1024 * 1024)
    assert (caught.value.status, caught.value.reason) == (413, "too_large")
    assert caught.value.message == (
        "body is larger than the transform limit of 10485760 bytes"
    )


def test_transform_error_belongs_to_the_exception_tree() -> None:
    error = TransformError("bad", status=413, reason="too_large")
    assert isinstance(error, StranglerError)
    assert (str(error), error.message, error.status, error.reason) == (
        "bad",
        "bad",
        413,
        "too_large",
    )


# Names, content types


def test_transforms_are_found_by_their_rule_file_names() -> None:
    assert set(TRANSFORMS) == {"xml_to_json", "json_to_xml"}
    assert TRANSFORMS["json_to_xml"] is json_to_xml
    assert orjson.loads(TRANSFORMS["xml_to_json"](b"<a>1</a>")) == {"a": 1}


def test_content_type_for_names_what_each_transform_writes() -> None:
    assert content_type_for("xml_to_json") == b"application/json"
    assert content_type_for("json_to_xml") == b"application/xml"
    with pytest.raises(ValueError, match="unknown transform 'yaml', expected one of"):
        content_type_for("yaml")


@pytest.mark.parametrize(
    ("name", "content_type", "reads"),
    [
        ("xml_to_json", b"application/xml", True),
        ("xml_to_json", b"Text/XML; charset=ISO-8859-1", True),
        ("xml_to_json", b"application/soap+xml", True),
        ("xml_to_json", b"application/json", False),
        ("xml_to_json", None, False),
        ("json_to_xml", b"application/json; charset=utf-8", True),
        ("json_to_xml", b"application/problem+json", True),
        ("json_to_xml", b"text/html", False),
        ("json_to_xml", b"", False),
    ],
)
def test_reads_content_type(name: str, content_type: bytes | None, reads: bool) -> None:
    assert reads_content_type(name, content_type) is reads


# Round-trip properties over the documented subsets

NAMES = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,5}", fullmatch=True),
    st.sampled_from(["é", "Ωmega", "日本", "a-1", "n.2"]),
).filter(lambda name: not name.lower().startswith("xml"))

_NOT_XML = [chr(c) for c in range(0x20) if chr(c) not in "\t\n\r"] + [
    "\ufffe",
    "\uffff",
]
XML_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters=_NOT_XML)
ANY_TEXT = st.text(XML_CHARS, max_size=12)
NUMBER_TEXT = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "false", "042", "-0", "1.50", "1e5", " 7", "null"]),
)


@st.composite
def xml_elements(draw: Any, name: str | None = None, depth: int = 1) -> str:
    """XML in the round-trippable subset: no mixed content, namesakes adjacent."""
    name = name or draw(NAMES)
    attributes = draw(
        st.dictionaries(NAMES, st.one_of(ANY_TEXT, NUMBER_TEXT), max_size=3)
    )
    start = name + "".join(
        f' {key}="{_escape(value)}"' for key, value in attributes.items()
    )
    indent = draw(st.sampled_from(["", "\n  ", "\t"]))

    kind = draw(
        st.sampled_from(
            ["empty", "text", "children"] if depth < 4 else ["empty", "text"]
        )
    )
    if kind == "empty":
        return f"<{start}/>"
    if kind == "text":
        return f"<{start}>{_escape(draw(st.one_of(ANY_TEXT, NUMBER_TEXT)))}</{name}>"
    children = []
    for child_name in draw(st.lists(NAMES, min_size=1, max_size=3, unique=True)):
        for _ in range(draw(st.integers(1, 3))):
            children.append(indent + draw(xml_elements(child_name, depth + 1)))
    return f"<{start}>{''.join(children)}{indent}</{name}>"


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\r", "&#13;")
        .replace("\n", "&#10;")
        .replace("\t", "&#9;")
    )


@given(xml_elements())
def test_xml_in_the_subset_round_trips_to_the_same_tree(xml: str) -> None:
    body = xml.encode()
    assert _tree(json_to_xml(xml_to_json(body))) == _tree(body)


def _is_json_scalar_text(text: str) -> bool:
    try:
        return isinstance(json.loads(text), bool | int | float)
    except ValueError:
        return False


SUBSET_STRINGS = st.text(XML_CHARS, min_size=1, max_size=12).filter(
    lambda text: text.strip(XML_SPACE) != "" and not _is_json_scalar_text(text)
)
SUBSET_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**53 - 1), 2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    SUBSET_STRINGS,
)


@st.composite
def json_element_values(draw: Any, depth: int = 1) -> object:
    """The value of one element, in the round-trippable JSON subset."""
    kinds = ["scalar", "null", "object"] if depth < 4 else ["scalar", "null"]
    kind = draw(st.sampled_from(kinds))
    if kind == "scalar":
        return draw(SUBSET_SCALARS)
    if kind == "null":
        return None

    value: dict[str, object] = {}
    for name in draw(st.lists(NAMES, max_size=3, unique=True)):
        value["@" + name] = draw(st.one_of(st.none(), SUBSET_SCALARS))
    for name in draw(st.lists(NAMES, max_size=3, unique=True)):
        if draw(st.booleans()):
            value[name] = draw(
                st.lists(json_element_values(depth + 1), min_size=2, max_size=3)
            )
        else:
            value[name] = draw(json_element_values(depth + 1))
    if not value:
        value[draw(NAMES)] = draw(json_element_values(depth + 1))
    if draw(st.booleans()):
        value["#text"] = draw(SUBSET_SCALARS)
    return value


@given(NAMES, json_element_values())
def test_json_in_the_subset_round_trips_to_the_same_value(
    name: str, value: object
) -> None:
    document = {name: value}
    back = orjson.loads(xml_to_json(json_to_xml(orjson.dumps(document))))
    assert _strict(back) == _strict(document)


XMLISH = st.lists(
    st.sampled_from(
        [
            "<a>",
            "</a>",
            "<b x='1'>",
            "</b>",
            "<c/>",
            "<!DOCTYPE a>",
            "&amp;",
            "&x;",
            "<![CDATA[",
            "]]>",
            "<!--",
            "-->",
            "text",
            " ",
            "\n",
            "<?pi x?>",
            "42",
            "<p:c xmlns:p='u'>",
            "</p:c>",
            "<p:d/>",
            "\x00",
            "é",
            "<",
            ">",
            '"',
            "'",
            "<?xml version='1.0'?>",
            "&#0;",
            "&#233;",
            "<a xmlns:='u'>",
        ]
    ),
    max_size=12,
).map("".join)


@given(st.one_of(st.binary(max_size=64), XMLISH.map(str.encode)))
def test_xml_to_json_gives_json_or_a_transform_error(body: bytes) -> None:
    try:
        converted = xml_to_json(body)
    except TransformError as error:
        assert error.status == 400
        assert error.message
    else:
        assert converted == b"" or isinstance(orjson.loads(converted), dict)


ANY_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(
                NAMES,
                st.text(max_size=4),
                NAMES.map(lambda n: "@" + n),
                st.just("#text"),
            ),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=12,
)


@given(ANY_JSON)
def test_json_to_xml_gives_well_formed_xml_or_a_transform_error(value: object) -> None:
    try:
        written = json_to_xml(orjson.dumps(value))
    except TransformError as error:
        assert error.status == 400
        assert error.message
    else:
        assert written.startswith(DECLARATION)
        defused_fromstring(written, forbid_dtd=True)
        assert isinstance(orjson.loads(xml_to_json(written)), dict)


# The JSON field mapper


def test_rename_moves_a_field_into_a_nested_object_and_back() -> None:
    body_map = BodyMap([{"rename": {"from": "user_name", "to": "name.full"}}])
    mapped = body_map.apply({"user_name": "Ann"})
    assert mapped == {"name": {"full": "Ann"}}
    assert body_map.reverse().apply(mapped) == {"user_name": "Ann"}


def test_rename_keeps_siblings_and_replaces_the_target() -> None:
    body_map = BodyMap([{"rename": {"from": "a.b", "to": "c"}}])
    assert body_map.apply({"a": {"b": 1, "k": 2}, "c": 0}) == {"a": {"k": 2}, "c": 1}


def test_rename_of_an_absent_field_changes_nothing() -> None:
    body_map = BodyMap([{"rename": {"from": "a.b", "to": "c"}}])
    assert body_map.apply({"a": "text", "x": 1}) == {"a": "text", "x": 1}
    assert body_map.apply({"x": 1}) == {"x": 1}


def test_writing_through_a_non_object_is_refused() -> None:
    body_map = BodyMap([{"rename": {"from": "user_name", "to": "name.full"}}])
    with pytest.raises(TransformError) as caught:
        body_map.apply({"user_name": "Ann", "name": "Ann B"})
    assert caught.value.status == 400
    assert caught.value.message == (
        "cannot write 'name.full': 'name' holds a string, not an object"
    )


def test_the_way_back_removes_an_object_that_was_already_empty() -> None:
    """The documented limit of pruning: it cannot tell old empty objects apart."""
    body_map = BodyMap([{"rename": {"from": "user_name", "to": "name.full"}}])
    mapped = body_map.apply({"user_name": "Ann", "name": {}})
    assert body_map.reverse().apply(mapped) == {"user_name": "Ann"}


def test_drop_removes_a_field_and_the_objects_it_leaves_empty() -> None:
    body_map = BodyMap([{"drop": "meta.legacy.flag"}])
    assert body_map.apply({"meta": {"legacy": {"flag": True}}, "id": 1}) == {"id": 1}
    assert body_map.apply({"meta": {"legacy": {"flag": True}, "v": 2}}) == {
        "meta": {"v": 2}
    }
    assert body_map.apply({"id": 1}) == {"id": 1}


def test_set_writes_a_fresh_copy_of_its_constant_each_time() -> None:
    body_map = BodyMap(
        [
            {"set": {"path": "meta.tags", "value": {"env": "v2"}}},
            {"rename": {"from": "meta.tags.env", "to": "env"}},
        ]
    )
    assert body_map.apply({}) == {"env": "v2"}
    first = body_map.apply({})
    first["env"] = "changed"
    assert body_map.apply({}) == {"env": "v2"}


def test_reverse_undoes_renames_and_sets_in_the_opposite_order() -> None:
    body_map = BodyMap(
        [
            {"rename": {"from": "user_name", "to": "name.full"}},
            {"set": {"path": "meta.version", "value": 2}},
        ]
    )
    assert body_map.reversible
    reverse = body_map.reverse()
    assert reverse == BodyMap(
        [DropField(("meta", "version")), RenameField(("name", "full"), ("user_name",))]
    )
    original = {"user_name": "Ann", "id": 3}
    assert reverse.apply(body_map.apply(copy.deepcopy(original))) == original


def test_a_drop_is_skipped_on_the_way_back_and_the_renames_still_reverse() -> None:
    body_map = BodyMap([{"rename": {"from": "a", "to": "b"}}, {"drop": "legacy_flag"}])
    assert not body_map.reversible
    assert body_map.reverse() == BodyMap([RenameField(("b",), ("a",))])
    assert body_map.reverse().apply({"b": 1, "legacy_flag": True}) == {
        "a": 1,
        "legacy_flag": True,
    }


def test_a_value_moved_up_into_its_parent_keeps_the_parent_place() -> None:
    body_map = BodyMap([{"rename": {"from": "name.full", "to": "name"}}])
    mapped = body_map.apply({"id": 1, "name": {"full": "Ann"}, "email": "a@x"})
    assert list(mapped) == ["id", "name", "email"]
    assert mapped == {"id": 1, "name": "Ann", "email": "a@x"}


def test_each_maps_every_item_of_a_list_and_reverses() -> None:
    body_map = BodyMap(
        [
            {
                "each": {
                    "path": "users",
                    "map": [{"rename": {"from": "@id", "to": "id"}}],
                }
            },
            {"drop": "users.note"},
        ]
    )
    body = {"users": [{"@id": 1, "n": "a"}, {"@id": 2}], "x": 0}
    assert body_map.apply(copy.deepcopy(body)) == {
        "users": [{"n": "a", "id": 1}, {"id": 2}],
        "x": 0,
    }
    assert body_map.reverse().apply(body_map.apply(copy.deepcopy(body))) == body
    assert not body_map.reversible


def test_each_takes_a_single_object_as_a_list_of_one_and_skips_an_absent_path() -> None:
    body_map = BodyMap(
        [{"each": {"path": "a.b", "map": [{"rename": {"from": "x", "to": "y"}}]}}]
    )
    assert body_map.apply({"a": {"b": {"x": 1}}}) == {"a": {"b": {"y": 1}}}
    assert body_map.apply({"a": 1}) == {"a": 1}
    assert body_map.apply({}) == {}


def test_each_refuses_items_that_are_not_objects() -> None:
    body_map = BodyMap([{"each": {"path": "tags", "map": [{"drop": "x"}]}}])
    with pytest.raises(TransformError) as caught:
        body_map.apply({"tags": [{"x": 1}, "admin"]})
    assert caught.value.message == (
        "each 'tags' needs objects, but item 1 of 'tags' holds a string"
    )
    with pytest.raises(TransformError, match="but 'tags' holds a number"):
        body_map.apply({"tags": 3})


def test_a_top_level_list_is_mapped_item_by_item() -> None:
    body_map = BodyMap([{"rename": {"from": "name.full", "to": "name"}}])
    assert body_map.apply_body(b'[{"name":{"full":"A"}},{"name":{"full":"B"}}]') == (
        b'[{"name":"A"},{"name":"B"}]'
    )
    assert _refusal(body_map.apply_body, b'[{"name":"A"},2]').message == (
        "a body map needs JSON objects, but item 1 of the top-level list is a number"
    )


def test_body_maps_from_one_list_reverse_it_for_responses() -> None:
    maps = BodyMaps.from_rules([{"rename": {"from": "a", "to": "b"}}, {"drop": "c"}])
    assert maps.request == BodyMap([RenameField(("a",), ("b",)), DropField(("c",))])
    assert maps.response == BodyMap([RenameField(("b",), ("a",))])


def test_body_maps_per_direction_are_applied_as_written() -> None:
    maps = BodyMaps.from_rules({"response": [{"drop": "meta"}]})
    assert maps.request is None
    assert maps.response == BodyMap([DropField(("meta",))])
    assert maps.describe() == "response: drop 'meta'"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"request": "drop a"}, "request: expected a list of field operations"),
        ({"request": [{"drop": ""}]}, "request: body map op 1: expected a dotted path"),
        ({"requests": []}, "expected a list of field operations, or {request"),
        ({}, "expected a list of field operations, or {request"),
        ([{"each": {"path": "a", "map": []}}], "each map must be a list of field"),
        (
            [{"each": {"path": "a", "map": [{"move": 1}]}}],
            "body map op 1 op 1: unknown operation 'move'",
        ),
    ],
)
def test_bad_body_maps_are_refused_naming_the_direction_and_step(
    value: Any, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        BodyMaps.from_rules(value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        (
            [{"move": "a"}],
            "body map op 1: unknown operation 'move', expected rename, drop, set or each",
        ),
        ([{"drop": "a"}, "drop a"], "body map op 2: expected one of"),
        ([{"drop": "a", "set": {}}], "body map op 1: expected one of"),
        ([{"rename": {"from": "a"}}], "body map op 1: rename needs exactly the keys"),
        ([{"rename": {"from": "a", "to": "b.."}}], "path 'b..' has an empty segment"),
        (
            [{"drop": ""}],
            "body map op 1: expected a dotted path like 'name.full', got ''",
        ),
        ([{"drop": 3}], "expected a dotted path like 'name.full', got 3"),
        (
            [{"set": {"path": "a", "value": {1, 2}}}],
            "body map op 1: set value must be JSON",
        ),
        ([{"set": {"path": "a", "value": {1: "x"}}}], "set value must be JSON"),
    ],
)
def test_a_bad_operation_is_refused_naming_it(ops: list[Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        BodyMap(ops)
    assert message in str(caught.value)


def test_a_map_applies_only_to_an_object_or_a_list_of_them() -> None:
    with pytest.raises(
        TransformError, match="a body map needs a JSON object, got a string"
    ):
        BodyMap([{"drop": "a"}]).apply("a")


def test_apply_body_maps_json_bytes() -> None:
    body_map = BodyMap([{"rename": {"from": "user_name", "to": "name.full"}}])
    assert body_map.apply_body(b'{"user_name":"Ann"}') == b'{"name":{"full":"Ann"}}'
    assert body_map.apply_body(b"") == b""
    assert _refusal(body_map.apply_body, b"{").reason == "malformed"
    deep = b'{"a":' * 129 + b"1" + b"}" * 129
    assert _refusal(body_map.apply_body, deep).message == (
        "JSON document nested deeper than 128 levels"
    )
    assert body_map.apply_body(deep[5:-1]) == deep[5:-1]


def test_apply_body_refuses_a_body_the_map_pushes_past_the_json_writer() -> None:
    body_map = BodyMap([{"rename": {"from": "a", "to": "x.y.z.a"}}])
    deep = b'{"a":' + b"[" * 253 + b"]" * 253 + b"}"
    assert _refusal(body_map.apply_body, deep, max_depth=255).reason == "too_deep"


FIELD_KEYS = st.from_regex(r"[a-z]{1,4}", fullmatch=True)
FLAT_BODIES = st.dictionaries(
    FIELD_KEYS, st.one_of(st.integers(), st.text(max_size=4)), min_size=1
)


@given(
    FLAT_BODIES,
    st.lists(st.from_regex(r"[A-Z]{1,3}", fullmatch=True), min_size=1, max_size=3),
    st.data(),
)
def test_rename_to_a_fresh_path_and_back_restores_the_body(
    body: dict[str, object], target: list[str], data: Any
) -> None:
    source = data.draw(st.sampled_from(sorted(body)))
    body_map = BodyMap([{"rename": {"from": source, "to": ".".join(target)}}])
    assert body_map.reverse().apply(body_map.apply(copy.deepcopy(body))) == body


def test_a_body_map_and_json_to_xml_give_a_v2_answer_the_v1_shape() -> None:
    """The demo's case: the users service's JSON, as the monolith wrote it."""
    to_v1 = BodyMap(
        [
            {"rename": {"from": "id", "to": "user.@id"}},
            {"rename": {"from": "name.full", "to": "user.name"}},
            {"rename": {"from": "email", "to": "user.email"}},
            {"rename": {"from": "active", "to": "user.active"}},
        ]
    )
    v2 = b'{"id": 7, "name": {"full": "Ann"}, "email": "a@example.org", "active": true}'
    assert json_to_xml(to_v1.apply_body(v2)) == DECLARATION + (
        b'<user id="7"><name>Ann</name><email>a@example.org</email>'
        b"<active>true</active></user>"
    )


# What converts, in which order: the pipeline the proxy, shadow and CLI share


@pytest.mark.parametrize(
    ("name", "content_type", "converts"),
    [
        ("xml_to_json", None, True),
        ("xml_to_json", b"", True),
        ("xml_to_json", b"application/xml; charset=utf-8", True),
        ("xml_to_json", b"application/atom+xml", True),
        ("xml_to_json", b"multipart/form-data; boundary=xmlpart", False),
        (
            "xml_to_json",
            b"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            False,
        ),
        ("xml_to_json", b"application/xml-dtd", False),
        ("json_to_xml", b"application/json", True),
        ("json_to_xml", b"application/jsonlines", False),
        ("json_to_xml", b"text/plain; format=json", False),
    ],
)
def test_accepts_goes_by_the_media_type(
    name: str, content_type: bytes | None, converts: bool
) -> None:
    assert pipeline.accepts(name, content_type) is converts


def _transform(**values: Any) -> Transform:
    body = values.pop("body", None)
    maps = BodyMaps.from_rules(body) if body is not None else None
    return Transform(body=maps, **values)


def test_the_body_map_runs_on_the_json_side_of_each_conversion() -> None:
    rename = [{"rename": {"from": "user_name", "to": "user.name"}}]
    to_xml = _transform(request="json_to_xml", response="xml_to_json", body=rename)

    sent = pipeline.convert_request(to_xml, b'{"user_name": "Ann"}')
    answered = pipeline.convert_response(to_xml, b"<user><name>Bob</name></user>")

    assert sent == DECLARATION + b"<user><name>Ann</name></user>"
    assert orjson.loads(answered) == {"user_name": "Bob"}
    assert pipeline.request_content_type(to_xml) == b"application/xml"
    assert pipeline.response_content_type(to_xml) == b"application/json"


def test_a_one_way_body_map_holds_only_that_direction() -> None:
    only_back = _transform(body={"response": [{"drop": "meta"}]})

    assert not pipeline.converts_request(only_back, b"application/json")
    assert pipeline.converts_response(only_back, b"application/json")
    assert not pipeline.converts_response(only_back, b"text/html")
    assert pipeline.converts_responses(only_back)
    assert pipeline.convert_response(only_back, b'{"id":1,"meta":{}}') == b'{"id":1}'
    assert not pipeline.converts_responses(_transform(request="xml_to_json"))


# Large bodies convert in threads


@pytest_twisted.ensureDeferred
async def test_small_bodies_convert_inline_and_large_ones_in_a_thread() -> None:
    pool = ConversionPool(reactor, inline_limit=8)
    try:
        assert pool.run(bytes.upper, b"small") == b"SMALL"
        with pytest.raises(TransformError):
            pool.run(xml_to_json, b"<bad")
        converted = pool.run(bytes.upper, b"rather large")
        assert isinstance(converted, Deferred)
        assert pool.busy == 1
        assert await converted == b"RATHER LARGE"
        assert pool.busy == 0
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_a_full_pool_refuses_new_requests_but_takes_answers() -> None:
    release = threading.Event()

    def slow(body: bytes) -> bytes:
        release.wait(5)
        return body

    pool = ConversionPool(reactor, threads=1, inline_limit=0, max_waiting=1)
    try:
        first = pool.run(slow, b"one")
        with pytest.raises(TransformError) as caught:
            pool.run(slow, b"two")
        assert (caught.value.status, caught.value.reason) == (503, "busy")
        answer = pool.run(slow, b"three", may_refuse=False)
        release.set()
        assert await first == b"one"
        assert await answer == b"three"
    finally:
        release.set()
        pool.close()


@pytest_twisted.ensureDeferred
async def test_a_failing_conversion_in_a_thread_fails_its_deferred() -> None:
    pool = ConversionPool(reactor, inline_limit=0)
    try:
        failed = pool.run(xml_to_json, b"<a>")
        with pytest.raises(TransformError, match="malformed XML"):
            await failed
        assert pool.busy == 0
    finally:
        pool.close()


# Rule-file checks for transforms


@pytest.mark.parametrize(
    ("transform", "problem"),
    [
        (
            "{body: {request: [{drop: ''}]}}",
            "rules.yaml:8: routes[0].transform.body.request: body map op 1: "
            "expected a dotted path like 'name.full', got ''",
        ),
        (
            "{body: {upstream: []}}",
            "rules.yaml:8: routes[0].transform.body: expected a list of field "
            "operations, or {request: [...], response: [...]}",
        ),
    ],
)
def test_a_bad_body_map_names_file_line_and_key(
    tmp_path: Path, transform: str, problem: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(_rules_with(f"    transform: {transform}\n"))

    with pytest.raises(ConfigError) as caught:
        load_rules(path)

    assert problem in str(caught.value).replace(str(tmp_path) + "/", "")


def test_a_shadow_transform_max_body_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        _rules_with(
            "    shadow:\n"
            "      to: svc\n"
            "      transform:\n"
            "        request: xml_to_json\n"
            "        max_body: 20MiB\n"
        )
    )

    with pytest.raises(ConfigError) as caught:
        load_rules(path)

    assert (
        "rules.yaml:12: routes[0].shadow.transform.max_body: a shadow copies and "
        "converts bodies up to its own max_body; set shadow.max_body instead"
    ) in str(caught.value)


def test_location_false_is_kept_and_a_regex_rewrite_cannot_restore_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(_rules_with("    rewrite: {prefix: /a, to: /b, location: false}\n"))
    rewrite = load_rules(path).routes[0].split[0].rewrite
    assert rewrite is not None and rewrite.location is False

    path.write_text(
        _rules_with("    rewrite: {regex: '^/a', to: /b, location: true}\n")
    )
    with pytest.raises(ConfigError, match="a regex rewrite cannot be undone"):
        load_rules(path)


def _rules_with(route_lines: str) -> str:
    return (
        "listen: 127.0.0.1:0\n"
        "upstreams:\n"
        "  svc: {targets: ['http://127.0.0.1:9']}\n"
        "default: svc\n"
        "routes:\n"
        "  - name: r\n"
        "    to: svc\n" + route_lines
    )
