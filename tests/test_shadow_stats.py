"""Per-route shadow counts, their bounds and what samples may show."""

from __future__ import annotations

from strangler.shadow.compare import Answer, Difference, Outcome
from strangler.shadow.stats import (
    MAX_FIELDS,
    MAX_SAMPLES,
    SAMPLE_BODY,
    Redactor,
    RouteStats,
    SampleRequest,
)

JSON = [(b"Content-Type", b"application/json")]


def _request() -> SampleRequest:
    return SampleRequest("id-1", "GET", "/x", [["Accept", "*/*"]])


def _differ(*fields: tuple[str, str]) -> Outcome:
    return Outcome(
        differences=[Difference(kind, name, name, "1", "2") for kind, name in fields]
    )


def test_an_agreeing_pair_builds_no_sample():
    stats = RouteStats("r")
    built = []

    def describe() -> SampleRequest:
        built.append(1)
        return _request()

    answer = Answer(200, JSON, b"{}")
    stats.record(Outcome(ignored=2), describe, answer, answer, Redactor())

    assert (stats.compared, stats.agreed, stats.ignored) == (1, 1, 2)
    assert built == [] and not stats.samples


def test_kinds_count_pairs_and_fields_count_each_field_once_per_pair():
    stats = RouteStats("r")
    answer = Answer(200, JSON, b"{}")
    outcome = _differ(("body", "$.a[*]"), ("body", "$.a[*]"), ("body", "$.b"))
    outcome.differences.append(Difference("header", "etag", "etag", "1", "2"))

    stats.record(outcome, _request, answer, answer, Redactor())

    assert stats.kinds == {"status": 0, "header": 1, "body": 1}
    assert {key: s.count for key, s in stats.fields.items()} == {
        ("body", "$.a[*]"): 1,
        ("body", "$.b"): 1,
        ("header", "etag"): 1,
    }
    assert stats.differed == 1 and stats.agreement() == 0.0


def test_distinct_fields_and_samples_are_bounded():
    stats = RouteStats("r")
    answer = Answer(200, JSON, b"{}")
    for i in range(MAX_FIELDS + 30):
        stats.record(_differ(("body", f"$.f{i}")), _request, answer, answer, Redactor())

    assert len(stats.fields) == MAX_FIELDS
    assert stats.other_fields == 30
    assert len(stats.samples) == MAX_SAMPLES
    assert stats.top_fields()[-1] == {
        "kind": "body",
        "field": "(other fields)",
        "count": 30,
        "example": None,
    }


def test_sample_bodies_are_cut_and_secret_headers_redacted():
    stats = RouteStats("r")
    primary = Answer(200, [*JSON, (b"Set-Cookie", b"s=1")], b"p" * (SAMPLE_BODY + 10))
    shadow = Answer(200, [*JSON, (b"X-Session-Id", b"abc")], b"s")

    stats.record(_differ(("body", "$")), _request, primary, shadow, Redactor())

    sample = stats.samples[0]
    assert sample["primary"]["body"] == "p" * SAMPLE_BODY
    assert sample["primary"]["truncated"] is True
    assert sample["primary"]["body_bytes"] == SAMPLE_BODY + 10
    assert ["Set-Cookie", "[redacted]"] in sample["primary"]["headers"]
    assert ["X-Session-Id", "[redacted]"] in sample["shadow"]["headers"]


def test_redaction_covers_named_credentials_configured_names_and_query():
    redactor = Redactor(frozenset({"X-Tenant"}))
    pairs = [
        (b"Authorization", b"Bearer t"),
        (b"cookie", b"a=b"),
        (b"X-Api-Key", b"k"),
        (b"X-Auth-Token", b"t"),
        (b"X-Tenant", b"acme"),
        (b"Accept", b"*/*"),
    ]
    shown = dict(map(tuple, redactor.headers(pairs)))
    assert shown == {
        "Authorization": "[redacted]",
        "cookie": "[redacted]",
        "X-Api-Key": "[redacted]",
        "X-Auth-Token": "[redacted]",
        "X-Tenant": "[redacted]",
        "Accept": "*/*",
    }
    target = redactor.target("/p", b"page=2&access_token=abc&password=x")
    assert target == "/p?page=2&access_token=[redacted]&password=[redacted]"
