"""Comparing answers, JSONPath and noise learning, without sockets."""

from __future__ import annotations

import gzip
import json
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strangler.shadow.compare import (
    Answer,
    Capture,
    CompareSpec,
    compare,
)
from strangler.shadow.jsonpath import (
    JsonPathError,
    PathSet,
    format_path,
    generalize,
    parse_path,
)
from strangler.shadow.noise import NoiseLearner

JSON = [(b"Content-Type", b"application/json")]
XML = [(b"Content-Type", b"application/xml")]


def answer(data: object, status: int = 200, headers=None) -> Answer:  # type: ignore[no-untyped-def]
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return Answer(status, JSON if headers is None else headers, body)


def spec(*ignore: str, headers: tuple[bytes, ...] = (b"content-type",)) -> CompareSpec:
    return CompareSpec(headers=headers, ignore=PathSet.of(ignore, "ignore"))


def fields(outcome) -> list[str]:  # type: ignore[no-untyped-def]
    return [d.field for d in outcome.differences]


# -- JSONPath -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "covered"),
    [
        ("$.a.b", ("a", "b"), True),
        ("$.a.b", ("a", "b", "c"), True),
        ("$.a.b", ("a",), False),
        ("$.a.b", ("a", "c"), False),
        ("$.a[*].b", ("a", 3, "b"), True),
        ("$.a[*].b", ("a", "x", "b"), True),
        ("$.a[1].b", ("a", 2, "b"), False),
        ("$.a[1].b", ("a", 1, "b"), True),
        ("$..b", ("b",), True),
        ("$..b", ("x", 0, "y", "b"), True),
        ("$..b", ("x", "bb"), False),
        ("$..*", ("x",), True),
        ("$.*", ("anything",), True),
        ("$", (), True),
        ("$['a b'].c", ("a b", "c"), True),
        ('$["a.b"]', ("a.b",), True),
        ("$.a", (0,), False),
    ],
)
def test_path_set_covers_paths_and_their_subtrees(text, path, covered):
    found = PathSet.of([text], "ignore").label_for(path)
    assert (found == "ignore") is covered


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("meta.id", "starts with $"),
        ("$.", "field name or * after ."),
        ("$..", "field name or * after .."),
        ("$[?(@.a)]", "filters, slices and unions are not supported"),
        ("$[1:3]", "filters, slices and unions are not supported"),
        ("$['a'", "closed by ']"),
        ("$a", "expected ., .. or ["),
    ],
)
def test_bad_json_paths_are_refused_with_the_problem(text, problem):
    with pytest.raises(JsonPathError) as caught:
        parse_path(text)
    assert problem in str(caught.value)
    assert repr(text) in str(caught.value)


def test_formatted_paths_parse_back_to_the_same_steps():
    path = ("user", "first name", 3, "it's", "@id", "back\\slash")
    text = format_path(path)
    assert text == "$.user['first name'][3]['it\\'s'].@id['back\\\\slash']"
    assert PathSet.of([text], "x").label_for(path) == "x"
    assert generalize(path) == "$.user['first name'][*]['it\\'s'].@id['back\\\\slash']"


def test_first_matching_label_wins():
    paths = PathSet([(parse_path("$.a"), "ignore"), (parse_path("$..a"), "noise")])
    assert paths.label_for(("a",)) == "ignore"
    assert paths.label_for(("x", "a")) == "noise"


# -- JSON -------------------------------------------------------------------------


def test_key_order_and_whitespace_do_not_matter():
    ours = answer(b'{"a": 1, "b": [1, 2, {"c": null}]}')
    theirs = answer(b'{\n  "b": [1,2,{"c":null}],\n  "a": 1\n}')
    outcome = compare(ours, theirs, spec())
    assert outcome.agreed and outcome.body_mode == "json"


def test_a_changed_leaf_is_reported_at_its_exact_path():
    ours = answer({"user": {"emails": ["a@x", "b@x"], "id": 1}})
    theirs = answer({"user": {"emails": ["a@x", "B@x"], "id": 1}})
    outcome = compare(ours, theirs, spec())
    (difference,) = outcome.differences
    assert difference.kind == "body"
    assert difference.where == "$.user.emails[1]"
    assert difference.field == "$.user.emails[*]"
    assert (difference.primary, difference.shadow) == ('"b@x"', '"B@x"')


def test_missing_and_extra_fields_are_differences():
    outcome = compare(answer({"a": 1, "b": 2}), answer({"a": 1, "c": 3}), spec())
    assert {(d.where, d.primary, d.shadow) for d in outcome.differences} == {
        ("$.b", "2", "(missing)"),
        ("$.c", "(missing)", "3"),
    }


def test_a_longer_list_reports_the_extra_items():
    outcome = compare(answer([1, 2]), answer([1, 2, 3]), spec())
    assert [(d.where, d.shadow) for d in outcome.differences] == [("$[2]", "3")]


def test_numbers_compare_by_value_but_booleans_are_not_numbers():
    assert compare(answer(b'{"n": 1}'), answer(b'{"n": 1.0}'), spec()).agreed
    outcome = compare(answer(b'{"n": true}'), answer(b'{"n": 1}'), spec())
    assert fields(outcome) == ["$.n"]
    outcome = compare(answer(b'{"n": "1"}'), answer(b'{"n": 1}'), spec())
    assert fields(outcome) == ["$.n"]


def test_type_changes_are_reported_where_they_happen():
    outcome = compare(answer({"a": {"b": 1}}), answer({"a": [1]}), spec())
    assert [d.where for d in outcome.differences] == ["$.a"]


def test_ignored_paths_are_counted_not_reported():
    ours = answer({"items": [{"id": 1, "at": 5}, {"id": 2, "at": 6}], "meta": {"t": 1}})
    theirs = answer(
        {"items": [{"id": 1, "at": 7}, {"id": 3, "at": 8}], "meta": {"t": 2}}
    )
    outcome = compare(ours, theirs, spec("$.items[*].at", "$.meta"))
    assert [d.where for d in outcome.differences] == ["$.items[1].id"]
    assert outcome.ignored == 3


def test_a_subtree_missing_on_one_side_with_only_ignored_fields_agrees():
    ours = answer({"id": 1})
    theirs = answer({"id": 1, "meta": {"generated_at": "t"}})
    for first, second in ((ours, theirs), (theirs, ours)):
        outcome = compare(first, second, spec("$.meta.generated_at"))
        assert outcome.agreed and outcome.differences == []
        assert outcome.ignored == 1


def test_a_missing_subtree_is_reported_without_its_ignored_fields():
    ours = answer({"id": 1})
    theirs = answer({"id": 1, "meta": {"generated_at": "t-secret", "v": 2}})
    outcome = compare(ours, theirs, spec("$.meta.generated_at"))
    (difference,) = outcome.differences
    assert (difference.where, difference.primary) == ("$.meta", "(missing)")
    assert difference.shadow == '{"v":2}'
    assert outcome.ignored == 1


def test_a_missing_list_of_ignored_items_agrees_and_an_empty_one_does_not():
    theirs = answer({"id": 1, "items": [{"ts": 1}, {"ts": 2}]})
    outcome = compare(answer({"id": 1}), theirs, spec("$.items[*].ts"))
    assert outcome.agreed and outcome.ignored == 2
    outcome = compare(answer({"id": 1}), answer({"id": 1, "items": []}), spec("$.x"))
    assert fields(outcome) == ["$.items"]


def test_a_type_change_hides_the_ignored_fields_of_the_new_value():
    ours = answer({"meta": None})
    theirs = answer({"meta": {"generated_at": "t-secret"}})
    outcome = compare(ours, theirs, spec("$.meta.generated_at"))
    (difference,) = outcome.differences
    assert (difference.where, difference.primary, difference.shadow) == (
        "$.meta",
        "null",
        "{}",
    )


def test_learned_noise_inside_a_missing_subtree_is_left_out_as_noise():
    noise = PathSet.of(["$.meta.at"], "noise")
    outcome = compare(
        answer({"id": 1}), answer({"id": 1, "meta": {"at": 3}}), spec(), noise
    )
    assert outcome.agreed and outcome.noise == ["$.meta.at"]


def test_descendant_ignore_reaches_any_depth():
    ours = answer({"a": {"ts": 1, "b": [{"ts": 2}]}, "ts": 3})
    theirs = answer({"a": {"ts": 9, "b": [{"ts": 9}]}, "ts": 9})
    outcome = compare(ours, theirs, spec("$..ts"))
    assert outcome.agreed and outcome.ignored == 3


def test_an_ignored_field_equal_on_both_sides_is_not_counted():
    outcome = compare(answer({"a": 1}), answer({"a": 1, "b": 2}), spec("$.a"))
    assert fields(outcome) == ["$.b"] and outcome.ignored == 0


def test_a_body_that_does_not_parse_is_a_whole_body_difference():
    outcome = compare(answer({"a": 1}), answer(b'{"a": 1'), spec())
    (difference,) = outcome.differences
    assert difference.where == "$"
    assert difference.shadow.startswith("(does not parse)")


def test_differences_past_the_cap_are_counted():
    ours = answer({str(i): i for i in range(80)})
    theirs = answer({str(i): -i - 1 for i in range(80)})
    outcome = compare(ours, theirs, spec())
    assert len(outcome.differences) == 50 and outcome.more == 30
    assert not outcome.agreed


def test_gzip_bodies_are_compared_after_decoding():
    data = orjson.dumps({"a": 1, "b": 2})
    zipped = Answer(200, [*JSON, (b"Content-Encoding", b"gzip")], gzip.compress(data))
    assert compare(zipped, answer(b'{"b":2,"a":1}'), spec()).agreed


# -- status and headers ----------------------------------------------------------------


def test_a_status_difference_stands_alone():
    outcome = compare(answer({"a": 1}), answer({"error": "x"}, status=500), spec())
    assert [(d.kind, d.primary, d.shadow) for d in outcome.differences] == [
        ("status", "200", "500")
    ]


def test_content_type_parameters_case_and_spacing_do_not_matter_but_type_does():
    charset = [(b"content-type", b"Application/JSON ; charset=utf-8")]
    assert compare(answer({"a": 1}), answer({"a": 1}, headers=charset), spec()).agreed
    text = [(b"Content-Type", b"text/plain")]
    outcome = compare(answer({"a": 1}), answer({"a": 1}, headers=text), spec())
    assert [(d.kind, d.field) for d in outcome.differences] == [
        ("header", "content-type")
    ]


def test_only_named_headers_are_compared():
    ours = answer({"a": 1}, headers=[*JSON, (b"X-V", b"1"), (b"Date", b"x")])
    theirs = answer({"a": 1}, headers=[*JSON, (b"X-V", b"2"), (b"Date", b"y")])
    assert compare(ours, theirs, spec()).agreed
    outcome = compare(ours, theirs, spec(headers=(b"content-type", b"x-v")))
    assert [(d.field, d.primary, d.shadow) for d in outcome.differences] == [
        ("x-v", "1", "2")
    ]


# -- XML and other bodies ---------------------------------------------------------


def test_xml_is_compared_in_canonical_form():
    ours = Answer(200, XML, b'<?xml version="1.0"?><a y="2" x="1">\n  <b>t</b>\n</a>')
    theirs = Answer(200, XML, b"<a x='1' y='2'><b>t</b><!-- note --></a>")
    outcome = compare(ours, theirs, spec())
    assert outcome.agreed and outcome.body_mode == "xml"


def test_xml_differences_get_a_field_path():
    ours = Answer(200, XML, b"<user><id>1</id><name>Ann</name></user>")
    theirs = Answer(200, XML, b"<user><id>1</id><name>Bob</name></user>")
    outcome = compare(ours, theirs, spec())
    assert [(d.where, d.primary, d.shadow) for d in outcome.differences] == [
        ("$.user.name", '"Ann"', '"Bob"')
    ]
    assert compare(ours, theirs, spec("$.user.name")).agreed


def test_xml_with_a_dtd_is_not_expanded():
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxxxx">'
        b'<!ENTITY y "&x;&x;&x;&x;&x;&x;&x;&x;">]><a>&y;</a>'
    )
    outcome = compare(Answer(200, XML, bomb), Answer(200, XML, b"<a>x</a>"), spec())
    (difference,) = outcome.differences
    assert difference.where == "$" and "xxxxxxxxxx" * 8 not in difference.primary


def test_legacy_xml_is_compared_with_json_through_the_xml_mapping():
    legacy = Answer(
        200, XML, b"<user><id>7</id><tags><tag>a</tag><tag>b</tag></tags></user>"
    )
    new = answer({"user": {"id": 7, "tags": {"tag": ["a", "b"]}}})
    outcome = compare(legacy, new, spec())
    assert outcome.agreed and outcome.body_mode == "xml-as-json"
    changed = answer({"user": {"id": 8, "tags": {"tag": ["a", "b"]}}})
    assert fields(compare(legacy, changed, spec())) == ["$.user.id"]


def test_other_bodies_are_compared_byte_for_byte():
    text = [(b"Content-Type", b"text/plain")]
    assert compare(Answer(200, text, b"abc"), Answer(200, text, b"abc"), spec()).agreed
    outcome = compare(Answer(200, text, b"abc"), Answer(200, text, b"abd"), spec())
    assert [(d.where, d.kind) for d in outcome.differences] == [("$", "body")]


def test_bodies_over_the_capture_limit_are_compared_by_hash():
    ours, same, other = Capture(limit=8), Capture(limit=8), Capture(limit=8)
    for capture, tail in ((ours, b"x"), (same, b"x"), (other, b"y")):
        capture.add(b"0123456789")
        capture.add(tail)
    first = ours.answer(200, JSON)
    assert first.body is None and first.size == 11
    assert compare(first, same.answer(200, JSON), spec()).agreed
    outcome = compare(first, other.answer(200, JSON), spec())
    assert outcome.body_mode == "hash" and [d.where for d in outcome.differences] == [
        "$"
    ]


# -- noise ------------------------------------------------------------------------


def test_noise_is_learned_from_two_primary_answers_and_then_left_out():
    learner = NoiseLearner(sample_size=2)
    first = answer({"id": 1, "meta": {"at": 1, "req": "a"}, "items": [{"ts": 1}]})
    second = answer({"id": 1, "meta": {"at": 2, "req": "b"}, "items": [{"ts": 3}]})

    new = learner.learn(first, second, spec("$.meta.req"))

    assert sorted(new) == ["$.items[*].ts", "$.meta.at"]
    shadow = answer({"id": 2, "meta": {"at": 9, "req": "z"}, "items": [{"ts": 9}]})
    outcome = compare(first, shadow, spec("$.meta.req"), learner.paths)
    assert fields(outcome) == ["$.id"]
    assert sorted(outcome.noise) == ["$.items[*].ts", "$.meta.at"]
    assert outcome.ignored == 1


def test_noise_is_not_learned_from_answers_with_different_statuses():
    learner = NoiseLearner()
    assert learner.learn(answer({"a": 1}), answer({"a": 2}, status=503), spec()) == []
    assert learner.fields == {} and learner.unusable == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (Answer(200, [(b"Content-Type", b"text/plain")], b"at 1"), b"at 2"),
        (Answer(200, JSON, b'{"a": 1'), b'{"a": 2'),
        (Answer(200, JSON, b"1"), b"2"),
    ],
)
def test_the_whole_body_is_never_learned_as_noise(first, second):
    learner = NoiseLearner()
    repeat = Answer(200, first.headers, second)
    assert learner.learn(first, repeat, spec()) == []
    assert learner.fields == {} and not learner.paths
    assert learner.whole_body == 1 and learner.report("auto")["whole_body"] == 1
    outcome = compare(
        answer({"email": "a"}), answer({"email": "b"}), spec(), learner.paths
    )
    assert fields(outcome) == ["$.email"]


def test_learned_header_noise_is_left_out():
    learner = NoiseLearner()
    names = (b"content-type", b"etag")
    first = answer({"a": 1}, headers=[*JSON, (b"ETag", b"1")])
    second = answer({"a": 1}, headers=[*JSON, (b"ETag", b"2")])
    learner.learn(first, second, spec(headers=names))
    shadow = answer({"a": 1}, headers=[*JSON, (b"ETag", b"3")])
    outcome = compare(
        first, shadow, spec(headers=names), learner.paths, learner.header_names
    )
    assert outcome.agreed and outcome.noise == ["etag"]


def test_the_noise_sample_is_bounded():
    learner = NoiseLearner(sample_size=3)
    wanted = 0
    for _ in range(10):
        if learner.wants_probe():
            learner.probe_started()
            wanted += 1
    assert wanted == 3


# -- properties ---------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=25,
)


def _shuffled(value: object, rng: random.Random) -> object:
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {key: _shuffled(value[key], rng) for key in keys}
    if isinstance(value, list):
        return [_shuffled(item, rng) for item in value]
    return value


@settings(max_examples=300, deadline=None)
@given(documents, st.randoms(use_true_random=False), st.sampled_from([None, 1, 4]))
def test_key_order_and_whitespace_never_matter(document, rng, indent):
    ours = orjson.dumps(document)
    theirs = json.dumps(_shuffled(document, rng), indent=indent).encode()
    assert compare(answer(ours), answer(theirs), spec()).agreed


@settings(max_examples=300, deadline=None)
@given(documents, st.data())
def test_a_changed_leaf_is_found_at_exactly_its_path(document, data):
    leaves: list[tuple[tuple[object, ...], object]] = []
    stack: list[tuple[tuple[object, ...], object]] = [((), document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict) and value:
            stack += [((*path, k), v) for k, v in value.items()]
        elif isinstance(value, list) and value:
            stack += [((*path, i), v) for i, v in enumerate(value)]
        else:
            leaves.append((path, value))
    path, _ = data.draw(st.sampled_from(leaves))
    # Longer than any generated text, so never equal to the leaf it replaces.
    changed = _replace(document, list(path), "changed by the test")

    outcome = compare(answer(document), answer(changed), spec())

    assert [d.where for d in outcome.differences] == [format_path(path)]  # type: ignore[arg-type]
    assert compare(answer(document), answer(changed), spec(format_path(path))).agreed  # type: ignore[arg-type]


def _replace(value: object, path: list[object], new: object) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: _replace(v, rest, new) if k == head else v for k, v in value.items()}
    assert isinstance(value, list)
    return [_replace(v, rest, new) if i == head else v for i, v in enumerate(value)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=8) | st.integers(0, 50), max_size=6))
def test_every_formatted_path_parses_and_covers_itself(path):
    text = format_path(path)
    assert PathSet.of([text], "x").label_for(path) == "x"
