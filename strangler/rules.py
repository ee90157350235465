"""Load a rule file and check all of it before any of it is used.

Every problem in the file is collected, each with its file, line and key
path, and raised together as one `ConfigError`; a rule file either becomes
a whole `strangler.model.Rules` or nothing. Each section of the file has one
reader function here. A reader takes the raw value and its key path, reports
what is wrong with it and returns the model value, or None when it reported
a problem.

Readers of a mapping are declared as a table of key -> reader: the table is
at once the list of allowed keys and, because model field names follow the
rule file's keys, the keyword arguments of the model class.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, cast, get_args
from urllib.parse import urlsplit

from strangler.balancing import RING_MAX_WEIGHT
from strangler.errors import ConfigError, RuleProblem
from strangler.model import (
    AccessLog,
    Address,
    Admin,
    ApiKeyAuth,
    Auth,
    AuthMode,
    BalanceName,
    Compare,
    Consumer,
    HeaderEdits,
    HeaderMatch,
    HeaderRules,
    HealthCheck,
    IdentityHeaders,
    JwtAuth,
    JwtIssuer,
    JwtKey,
    Limits,
    Match,
    Outlier,
    Override,
    RateLimit,
    Require,
    Retries,
    Rewrite,
    Route,
    Rules,
    Shadow,
    SharedState,
    SplitEntry,
    Sticky,
    StickyBy,
    Target,
    Tls,
    Transform,
    TransformName,
    Upstream,
    UpstreamTls,
)
from strangler.proxy.headers import gateway_managed
from strangler.security.api_keys import digest_of_entry, keys_in_file
from strangler.security.jwt_keys import (
    ALGORITHM_FAMILY,
    key_from_pem,
    keys_from_jwks,
    secret_key,
)
from strangler.security.tls import ca_problem, check_tls_pair
from strangler.units import parse_duration, parse_size
from strangler.yaml_source import Document, KeyPath, format_key, load_yaml

__all__ = ["load_rules", "parse_rules"]

DEFAULT_LISTEN = Address("127.0.0.1", 8080)
DEFAULT_ADMIN_LISTEN = Address("127.0.0.1", 8081)

BALANCE_NAMES: tuple[str, ...] = get_args(BalanceName)
STICKY_BY: tuple[str, ...] = get_args(StickyBy)
TRANSFORM_NAMES: tuple[str, ...] = get_args(TransformName)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+")
_ADDRESS = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)")
_GROUP_REF = re.compile(r"\\(?:g<([^>]*)>|(\d+))")

# Route keys that apply to every split entry that does not set its own.
_FOLDED = (
    "rewrite",
    "transform",
    "timeout",
    "connect_timeout",
    "idle_timeout",
    "headers",
)

Reader = Callable[["_Checker", Any, KeyPath], Any]


def load_rules(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> Rules:
    """Read and check the rule file at `path`; `${VAR}` comes from `environ`."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [RuleProblem(source, 1, "", f"cannot read the rule file: {reason}")]
        ) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = RuleProblem(source, line, "", "the rule file is not valid UTF-8")
        raise ConfigError([problem]) from exc
    return parse_rules(text, source, environ)


def parse_rules(
    text: str, source_name: str, environ: Mapping[str, str] | None = None
) -> Rules:
    """Check rule-file `text`; `source_name` is the file name used in problems."""
    env = os.environ if environ is None else environ
    document = load_yaml(text, source_name, env)
    checker = _Checker(document)
    if document.syntax_error:
        raise ConfigError(list(document.problems))

    rules = _rules(checker, document.value)
    if checker.problems or rules is None:
        raise ConfigError(sorted(checker.problems, key=lambda problem: problem.line))
    return rules


class _Checker:
    """Collects problems for one document and reads mappings against tables."""

    def __init__(self, document: Document) -> None:
        self.document = document
        self.problems: list[RuleProblem] = list(document.problems)
        self.failures = 0
        self.upstreams: tuple[str, ...] = ()

    def report(self, path: KeyPath, message: str, line: int | None = None) -> None:
        """Record a problem, unless the YAML reader already reported this key.

        `line` points elsewhere than `path` when the key at fault is missing.
        """
        self.failures += 1
        if path in self.document.bad_paths:
            return
        if line is None:
            line = self.document.line_of(path)
        self.problems.append(
            RuleProblem(self.document.source, line, format_key(path), message)
        )

    def fields(
        self,
        value: Any,
        path: KeyPath,
        readers: Mapping[str, Reader],
        required: Iterable[str] = (),
    ) -> dict[str, Any] | None:
        """Read a mapping with one reader per allowed key.

        Returns the values of the keys present, or None when anything in the
        mapping (or below it) was reported, so a caller that gets a dict can
        build its model object from it directly.
        """
        if not isinstance(value, dict):
            self.report(path, f"expected a mapping of keys, got {_show(value)}")
            return None
        before = self.failures
        for key in value:
            if key not in readers:
                self.report((*path, key), _unknown_key(key, readers))
        for key in required:
            if key not in value:
                self.report(path, f"missing required key {key!r}")

        values: dict[str, Any] = {}
        for key, reader in readers.items():
            if key in value:
                values[key] = reader(self, value[key], (*path, key))
        return values if self.failures == before else None


def _show(value: Any) -> str:
    """Name a value from the file the way the user wrote it."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _suggest(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest choice, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(key: str, readers: Mapping[str, Reader]) -> str:
    allowed = ", ".join(readers)
    return f"unknown key {key!r}{_suggest(key, readers)}; allowed keys: {allowed}"


# Scalar readers.


def _string(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    """Any string, including an empty one."""
    if isinstance(value, str):
        return value
    checker.report(path, f"expected a string, got {_show(value)}")
    return None


def _text(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    """A string with something in it."""
    text = _string(checker, value, path)
    if text == "":
        checker.report(path, "must not be empty")
        return None
    return text


def _name(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    text = _text(checker, value, path)
    if text is not None and not _NAME.fullmatch(text):
        checker.report(
            path,
            f"expected a name of letters, digits, '_', '.' and '-', got {text!r}",
        )
        return None
    return text


def _token(
    checker: _Checker, value: Any, path: KeyPath, what: str = "an HTTP header name"
) -> str | None:
    """An HTTP token: a header or cookie name, or a method."""
    text = _text(checker, value, path)
    if text is not None and not _TOKEN.fullmatch(text):
        checker.report(path, f"expected {what} (no spaces or separators), got {text!r}")
        return None
    return text


def _header_name(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    name = _token(checker, value, path)
    return name.lower() if name is not None else None


def _method(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    method = _token(checker, value, path, "an HTTP method like GET")
    return method.upper() if method is not None else None


def _path(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    """A URL path as the client sends it."""
    text = _text(checker, value, path)
    if text is not None and not text.startswith("/"):
        checker.report(path, f"expected a path starting with '/', got {text!r}")
        return None
    return text


def _bool(checker: _Checker, value: Any, path: KeyPath) -> bool | None:
    if isinstance(value, bool):
        return value
    checker.report(path, f"expected true or false, got {_show(value)}")
    return None


def _whole_number(lowest: int) -> Reader:
    def read(checker: _Checker, value: Any, path: KeyPath) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= lowest:
            return value
        checker.report(
            path, f"expected a whole number of at least {lowest}, got {_show(value)}"
        )
        return None

    return read


def _percent(checker: _Checker, value: Any, path: KeyPath) -> float | None:
    """A share from 0 to 100 with at most two decimals, so sums are exact."""
    ok_type = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok_type or not math.isfinite(value) or not 0 <= value <= 100:
        checker.report(path, f"expected a percentage from 0 to 100, got {_show(value)}")
        return None
    if _decimal(value).as_tuple().exponent < -2:  # type: ignore[operator]
        checker.report(path, f"use at most two decimals, got {value}")
        return None
    return float(value)


def _decimal(value: float) -> Decimal:
    return Decimal(str(value))


def _duration_reader(*, allow_zero: bool) -> Reader:
    def read(checker: _Checker, value: Any, path: KeyPath) -> float | None:
        if not isinstance(value, str | int | float):
            checker.report(
                path, f"expected a duration like 250ms or 10s, got {_show(value)}"
            )
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            checker.report(path, str(exc))
            return None
        if not math.isfinite(seconds) or (seconds == 0 and not allow_zero):
            expected = "a finite duration" if seconds else "more than 0"
            checker.report(path, f"must be {expected}, got {_show(value)}")
            return None
        return seconds

    return read


_duration = _duration_reader(allow_zero=False)
_duration_or_zero = _duration_reader(allow_zero=True)


def _size_at_least(lowest: int) -> Reader:
    def read(checker: _Checker, value: Any, path: KeyPath) -> int | None:
        if not isinstance(value, str | int | float):
            checker.report(
                path, f"expected a size like 64KiB or 10MiB, got {_show(value)}"
            )
            return None
        try:
            size = parse_size(value)  # type: ignore[arg-type]
        except ValueError as exc:
            checker.report(path, str(exc))
            return None
        if size < lowest:
            checker.report(path, f"must be at least {lowest} bytes, got {_show(value)}")
            return None
        return size

    return read


_size = _size_at_least(0)
_positive_size = _size_at_least(1)


def _regex(checker: _Checker, value: Any, path: KeyPath) -> re.Pattern[str] | None:
    text = _text(checker, value, path)
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        checker.report(path, f"bad regular expression {text!r}: {exc}")
        return None


def _choice(options: tuple[str, ...]) -> Reader:
    def read(checker: _Checker, value: Any, path: KeyPath) -> str | None:
        if isinstance(value, str) and value in options:
            return value
        hint = _suggest(value, options) if isinstance(value, str) else ""
        checker.report(
            path, f"expected one of {', '.join(options)}, got {_show(value)}{hint}"
        )
        return None

    return read


def _upstream_ref(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    """The name of an upstream defined under `upstreams`."""
    name = _text(checker, value, path)
    if name is None or name in checker.upstreams:
        return name
    defined = ", ".join(checker.upstreams) or "none"
    hint = _suggest(name, checker.upstreams)
    checker.report(
        path, f"unknown upstream {name!r}{hint}; defined upstreams: {defined}"
    )
    return None


def _list_of(reader: Reader, *, non_empty: bool = False) -> Reader:
    """A list whose items all pass `reader`, returned as a tuple."""

    def read(checker: _Checker, value: Any, path: KeyPath) -> tuple[Any, ...] | None:
        if not isinstance(value, list):
            checker.report(path, f"expected a list, got {_show(value)}")
            return None
        if non_empty and not value:
            checker.report(path, "expected at least one item, got an empty list")
            return None
        items = [reader(checker, item, (*path, i)) for i, item in enumerate(value)]
        return None if any(item is None for item in items) else tuple(items)

    return read


# Addresses and URLs.


def _address(checker: _Checker, value: Any, path: KeyPath) -> Address | None:
    """`host:port` or `[v6]:port` to listen on."""
    found = _ADDRESS.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        checker.report(
            path,
            f"expected host:port like 127.0.0.1:8080 or [::1]:8080, got {_show(value)}",
        )
        return None
    host = found.group("host") or found.group("v6")
    port = int(found.group("port"))
    if found.group("v6") is not None and not _is_ipv6(host):
        checker.report(path, f"{host!r} in brackets is not an IPv6 address")
        return None
    if port > 65535:
        checker.report(path, f"port must be from 0 to 65535, got {port}")
        return None
    return Address(host, port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _url_problem(url: str) -> str | None:
    """What is wrong with an upstream target URL, if anything."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        text = str(exc)
        return "the port must be a number up to 65535" if "Port" in text else text
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        return "the scheme must be http:// or https://"
    if not host or not (_HOSTNAME.fullmatch(host) or _is_ipv6(host)):
        return "it has no valid host"
    if port == 0:
        return "port 0 cannot be connected to"
    if parts.username is not None:
        return "credentials do not belong in a target URL"
    if parts.path not in ("", "/"):
        return f"a target has no path (got {parts.path!r}); use a rewrite for paths"
    if "?" in url or "#" in url:
        return "a target has no query string or fragment"
    return None


def _target_url(checker: _Checker, value: Any, path: KeyPath) -> Target | None:
    url = _text(checker, value, path)
    if url is None:
        return None
    problem = _url_problem(url)
    if problem is not None:
        checker.report(
            path, f"bad target URL {url!r}: {problem}; expected http://host:port"
        )
        return None
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    return Target(
        url=url.rstrip("/"),
        scheme=parts.scheme,
        host=(parts.hostname or "").lower(),
        port=parts.port or default_port,
    )


_TARGET = {"url": _target_url, "weight": _whole_number(1)}


def _target(checker: _Checker, value: Any, path: KeyPath) -> Target | None:
    """A URL string, or `{url, weight}`."""
    if isinstance(value, str):
        return _target_url(checker, value, path)
    values = checker.fields(value, path, _TARGET, required=("url",))
    if values is None:
        return None
    return dataclasses.replace(values["url"], weight=values.get("weight", 1))


def _network(
    checker: _Checker, value: Any, path: KeyPath
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    text = _text(checker, value, path)
    if text is None:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        checker.report(
            path, f"expected an IP address or CIDR like 10.0.0.0/8, got {text!r}"
        )
        return None


# Upstreams.


def _expect_status(
    checker: _Checker, value: Any, path: KeyPath
) -> tuple[int, int] | None:
    """A status code, or an inclusive `[lowest, highest]` range of them."""
    codes = value if isinstance(value, list) else [value]
    valid = all(
        isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599
        for code in codes
    )
    if not valid or len(codes) not in (1, 2) or codes[0] > codes[-1]:
        checker.report(
            path,
            "expected a status code or a [lowest, highest] range like [200, 399], "
            f"got {value if isinstance(value, list) else _show(value)}",
        )
        return None
    return (codes[0], codes[-1])


_HEALTH = {
    "path": _path,
    "interval": _duration,
    "timeout": _duration,
    "expect_status": _expect_status,
    "healthy_after": _whole_number(1),
    "unhealthy_after": _whole_number(1),
}


def _health(checker: _Checker, value: Any, path: KeyPath) -> HealthCheck | None:
    values = checker.fields(value, path, _HEALTH)
    return HealthCheck(**values) if values is not None else None


_OUTLIER = {
    "consecutive_failures": _whole_number(1),
    "base_ejection": _duration,
    "max_ejection_percent": _percent,
}


def _outlier(checker: _Checker, value: Any, path: KeyPath) -> Outlier | None:
    values = checker.fields(value, path, _OUTLIER)
    return Outlier(**values) if values is not None else None


def _upstream_tls(checker: _Checker, value: Any, path: KeyPath) -> UpstreamTls | None:
    """`{ca: FILE}`: PEM certificates that `https://` targets must chain to."""
    values = checker.fields(value, path, {"ca": _text}, required=("ca",))
    if values is None:
        return None
    found = _read_beside(checker, values["ca"], (*path, "ca"))
    if found is None:
        return None
    problem = ca_problem(found[1])
    if problem is not None:
        checker.report((*path, "ca"), problem)
        return None
    return UpstreamTls(ca=found[0].resolve(), ca_pem=found[1])


_UPSTREAM = {
    "targets": _list_of(_target, non_empty=True),
    "balance": _choice(BALANCE_NAMES),
    "health": _health,
    "timeout": _duration,
    "connect_timeout": _duration,
    "idle_timeout": _duration,
    "outlier": _outlier,
    "max_connections": _whole_number(1),
    "max_pending": _whole_number(0),
    "tls": _upstream_tls,
}


def _upstreams(
    checker: _Checker, value: Any, path: KeyPath
) -> dict[str, Upstream] | None:
    if not isinstance(value, dict):
        checker.report(
            path,
            f"expected a mapping of upstream names to upstreams, got {_show(value)}",
        )
        return None
    if not value:
        checker.report(path, "define at least one upstream")
        return None
    upstreams: dict[str, Upstream] = {}
    for name, raw in value.items():
        where = (*path, name)
        valid_name = _name(checker, name, where)
        values = checker.fields(raw, where, _UPSTREAM, required=("targets",))
        if values is not None and not _ring_fits(checker, values, where):
            values = None
        if (
            values is not None
            and values.get("tls") is not None
            and not any(t.scheme == "https" for t in values.get("targets", ()))
        ):
            checker.report(
                (*where, "tls"),
                "tls applies to https:// targets and this upstream has none",
            )
            values = None
        if valid_name is not None and values is not None:
            upstreams[name] = Upstream(name=name, **values)
    return upstreams if len(upstreams) == len(value) else None


def _ring_fits(checker: _Checker, values: dict[str, Any], path: KeyPath) -> bool:
    """An `ip_hash` ring costs points per unit of weight, so the sum is bounded."""
    if values.get("balance") != "ip_hash":
        return True
    total = sum(target.weight for target in values["targets"])
    if total <= RING_MAX_WEIGHT:
        return True
    checker.report(
        (*path, "targets"),
        f"ip_hash target weights must sum to at most {RING_MAX_WEIGHT}, got {total}",
    )
    return False


# Rewrites, transforms and the parts of a route.


def _template_problem(pattern: re.Pattern[str], template: str) -> str | None:
    """A group reference in a substitution that the regex does not define."""
    for found in _GROUP_REF.finditer(template):
        ref = found.group(1) if found.group(1) is not None else found.group(2)
        if ref.isdigit():
            if int(ref) > pattern.groups:
                return f"refers to group {ref} but the regex has {pattern.groups}"
        elif ref not in pattern.groupindex:
            return f"refers to group {ref!r} which the regex does not define"
    return None


_REWRITE = {"prefix": _path, "regex": _regex, "to": _string, "location": _bool}


def _rewrite(checker: _Checker, value: Any, path: KeyPath) -> Rewrite | None:
    values = checker.fields(value, path, _REWRITE, required=("to",))
    if isinstance(value, dict) and ("prefix" in value) == ("regex" in value):
        checker.report(path, "give exactly one of 'prefix' or 'regex', with 'to'")
        return None
    if values is None:
        return None
    if values.get("location") and "regex" in values:
        checker.report(
            (*path, "location"),
            "a regex rewrite cannot be undone on Location; only prefix rewrites can",
        )
        return None
    if "regex" in values:
        problem = _template_problem(values["regex"], values["to"])
        if problem is not None:
            checker.report((*path, "to"), problem)
            return None
    return Rewrite(**values)


def _body_map(checker: _Checker, value: Any, path: KeyPath) -> Any:
    from strangler.transforms.body_map import BodyMapError, BodyMaps

    if not isinstance(value, list | dict) or not value:
        checker.report(
            path,
            "expected a list of field operations, or {request: [...], response: "
            f"[...]}}, got {_show(value)}",
        )
        return None
    try:
        return BodyMaps.from_rules(value)
    except BodyMapError as exc:
        where = path if exc.direction is None else (*path, exc.direction)
        checker.report(where, exc.message)
        return None
    except ValueError as exc:
        checker.report(path, str(exc))
        return None


_TRANSFORM = {
    "request": _choice(TRANSFORM_NAMES),
    "response": _choice(TRANSFORM_NAMES),
    "max_body": _positive_size,
    "body": _body_map,
}


def _transform(checker: _Checker, value: Any, path: KeyPath) -> Transform | None:
    values = checker.fields(value, path, _TRANSFORM)
    if isinstance(value, dict) and not ({"request", "response", "body"} & value.keys()):
        checker.report(path, "give 'request', 'response', 'body' or a combination")
        return None
    return Transform(**values) if values is not None else None


_TEMPLATE = re.compile(r"\$\{([^}]*)\}")
_TEMPLATE_NAMES = ("route", "upstream")


def _header_template(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    text = _string(checker, value, path)
    if text is None:
        return None
    for found in _TEMPLATE.finditer(text):
        name = found.group(1)
        if name in _TEMPLATE_NAMES or name.startswith("request.header."):
            continue
        checker.report(
            path,
            f"unknown reference ${{{name}}}; use ${{route}}, ${{upstream}} "
            "or ${request.header.NAME}",
        )
        return None
    if "\r" in text or "\n" in text:
        checker.report(path, "a header value cannot contain a line break")
        return None
    if not text.isascii() or any(ord(char) < 32 and char != "\t" for char in text):
        # Header values cross the wire as bytes; outside printable ASCII there
        # is no spelling every upstream and client reads the same way.
        checker.report(path, "a header value must be printable ASCII")
        return None
    return text


def _header_pairs(
    checker: _Checker, value: Any, path: KeyPath
) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, dict):
        checker.report(
            path, f"expected a mapping of header names to values, got {_show(value)}"
        )
        return None
    pairs = []
    complete = True
    for name, raw in value.items():
        header = _editable_header(checker, name, (*path, name))
        text = _header_template(checker, raw, (*path, name))
        if header is None or text is None:
            complete = False
        else:
            pairs.append((header, text))
    return tuple(pairs) if complete else None


def _editable_header(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    """A header name a `headers` rule may change: not framing, hop-by-hop or ours."""
    name = _token(checker, value, path)
    if name is not None and gateway_managed(name.lower().encode("latin-1")):
        checker.report(
            path,
            f"{name!r} is a framing or hop-by-hop header, or one the gateway "
            "writes itself; a header rule cannot change it",
        )
        return None
    return name


def _editable_header_name(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    name = _editable_header(checker, value, path)
    return name.lower() if name is not None else None


_HEADER_EDITS = {
    "set": _header_pairs,
    "add": _header_pairs,
    "remove": _list_of(_editable_header_name),
}


def _header_edits(checker: _Checker, value: Any, path: KeyPath) -> HeaderEdits | None:
    values = checker.fields(value, path, _HEADER_EDITS)
    return HeaderEdits(**values) if values is not None else None


def _header_rules(checker: _Checker, value: Any, path: KeyPath) -> HeaderRules | None:
    values = checker.fields(
        value, path, {"request": _header_edits, "response": _header_edits}
    )
    return HeaderRules(**values) if values is not None else None


def _header_matches(
    checker: _Checker, value: Any, path: KeyPath
) -> tuple[HeaderMatch, ...] | None:
    """`{Header-Name: regex}`; a header with no value only has to be present."""
    if not isinstance(value, dict):
        checker.report(
            path, f"expected a mapping of header names to regexes, got {_show(value)}"
        )
        return None
    matches: dict[str, HeaderMatch] = {}
    before = checker.failures
    for raw_name, raw_pattern in value.items():
        where = (*path, raw_name)
        name = _header_name(checker, raw_name, where)
        pattern = None if raw_pattern is None else _regex(checker, raw_pattern, where)
        if name in matches:
            checker.report(where, f"header {raw_name!r} is listed twice")
        elif name is not None:
            matches[name] = HeaderMatch(name, pattern)
    return tuple(matches.values()) if checker.failures == before else None


def _host(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    text = _text(checker, value, path)
    bare = text[2:] if text is not None and text.startswith("*.") else text
    if bare is not None and not _HOSTNAME.fullmatch(bare):
        checker.report(
            path, f"expected a host like api.example.com or *.example.com, got {text!r}"
        )
        return None
    return text.lower() if text is not None else None


def _methods(checker: _Checker, value: Any, path: KeyPath) -> frozenset[str] | None:
    methods = _list_of(_method, non_empty=True)(checker, value, path)
    return frozenset(methods) if methods is not None else None


_MATCH = {
    "path": _path,
    "path_regex": _regex,
    "methods": _methods,
    "headers": _header_matches,
    "host": _host,
}


def _match(checker: _Checker, value: Any, path: KeyPath) -> Match | None:
    values = checker.fields(value, path, _MATCH)
    return Match(**values) if values is not None else None


_SPLIT_ENTRY = {
    "to": _upstream_ref,
    "weight": _percent,
    "rewrite": _rewrite,
    "transform": _transform,
    "timeout": _duration,
    "connect_timeout": _duration,
    "fallback": _upstream_ref,
    "idle_timeout": _duration,
    "headers": _header_rules,
}


def _split_entry(checker: _Checker, value: Any, path: KeyPath) -> SplitEntry | None:
    values = checker.fields(value, path, _SPLIT_ENTRY, required=("to", "weight"))
    if values is None:
        return None
    if values.get("fallback") == values["to"]:
        checker.report((*path, "fallback"), "must name another upstream than 'to'")
        return None
    return SplitEntry(**values)


def _split(
    checker: _Checker, value: Any, path: KeyPath
) -> tuple[SplitEntry, ...] | None:
    entries = _list_of(_split_entry, non_empty=True)(checker, value, path)
    if entries is None:
        _check_raw_total(checker, value, path)
        return None
    first_index: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.to in first_index:
            checker.report(
                (*path, i, "to"),
                f"upstream {entry.to!r} already has a branch in this split "
                f"(entry {first_index[entry.to]}); branches are told apart by upstream",
            )
            return None
        first_index[entry.to] = i
    total = sum((_decimal(entry.weight) for entry in entries), Decimal(0))
    if total != 100:
        checker.report(path, f"weights must sum to 100, got {total.normalize():f}")
        return None
    return entries


def _check_raw_total(checker: _Checker, value: Any, path: KeyPath) -> None:
    """Report a bad weight sum even when another entry of the split is invalid."""
    if not isinstance(value, list) or not value:
        return
    weights = [
        entry.get("weight") if isinstance(entry, dict) else None for entry in value
    ]
    if not all(
        isinstance(w, int | float) and not isinstance(w, bool) and 0 <= w <= 100
        for w in weights
    ):
        return
    numbers = cast("list[float]", weights)  # each one checked just above
    if any(
        _decimal(float(w)) != _decimal(float(w)).quantize(Decimal("0.01"))
        for w in numbers
    ):
        return
    total = sum((_decimal(float(w)) for w in numbers), Decimal(0))
    if total != 100:
        checker.report(path, f"weights must sum to 100, got {total.normalize():f}")


_STICKY = {"by": _choice(STICKY_BY), "name": _text, "cookie_ttl": _duration}
_STICKY_NAME = {
    "header": "the header that carries the key",
    "cookie": "the cookie that carries the key",
    "jwt_claim": "the token claim that carries the key",
}


def _sticky(checker: _Checker, value: Any, path: KeyPath) -> Sticky | None:
    values = checker.fields(value, path, _STICKY, required=("by",))
    if values is None:
        return None
    by, name = values["by"], values.get("name")
    if by == "ip" and name is not None:
        checker.report((*path, "name"), "not used with by: ip; remove it")
        return None
    if by != "ip" and name is None:
        checker.report(path, f"missing required key 'name' ({_STICKY_NAME[by]})")
        return None
    what = "a cookie name" if by == "cookie" else "an HTTP header name"
    if by in ("header", "cookie") and not _token(checker, name, (*path, "name"), what):
        return None
    if by != "cookie" and "cookie_ttl" in values:
        checker.report((*path, "cookie_ttl"), "only used with by: cookie; remove it")
        return None
    return Sticky(**values)


def _override(checker: _Checker, value: Any, path: KeyPath) -> Override | None:
    values = checker.fields(value, path, {"header": _header_name}, required=("header",))
    return Override(**values) if values is not None else None


def _json_path(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    from strangler.shadow.jsonpath import JsonPathError, parse_path

    text = _text(checker, value, path)
    if text is not None and not text.startswith("$"):
        checker.report(
            path, f"expected a JSON path like $.meta.generated_at, got {text!r}"
        )
        return None
    if text is not None:
        try:
            parse_path(text)
        except JsonPathError as exc:
            checker.report(path, str(exc))
            return None
    return text


_COMPARE = {
    "ignore": _list_of(_json_path),
    "headers": _list_of(_header_name),
    "noise": _choice(("auto", "off")),
}


def _compare(checker: _Checker, value: Any, path: KeyPath) -> Compare | None:
    values = checker.fields(value, path, _COMPARE)
    return Compare(**values) if values is not None else None


_SHADOW = {
    "to": _upstream_ref,
    "percent": _percent,
    "methods": _methods,
    "rewrite": _rewrite,
    "transform": _transform,
    "timeout": _duration,
    "max_body": _size,
    "max_in_flight": _whole_number(1),
    "compare": _compare,
    "redact": _list_of(_header_name),
}


def _shadow(checker: _Checker, value: Any, path: KeyPath) -> Shadow | None:
    values = checker.fields(value, path, _SHADOW, required=("to",))
    transform = value.get("transform") if isinstance(value, dict) else None
    if isinstance(transform, dict) and "max_body" in transform:
        checker.report(
            (*path, "transform", "max_body"),
            "a shadow copies and converts bodies up to its own max_body; "
            "set shadow.max_body instead",
        )
        return None
    return Shadow(**values) if values is not None else None


_RETRY_ON = ("connect", "5xx", "timeout")
_RETRIES = {
    "attempts": _whole_number(0),
    "retry_on": _list_of(_choice(_RETRY_ON), non_empty=True),
}


def _retries(checker: _Checker, value: Any, path: KeyPath) -> Retries | None:
    values = checker.fields(value, path, _RETRIES)
    return Retries(**values) if values is not None else None


# Security: consumers, authentication, rate limits, shared state and TLS.

AUTH_MODES: tuple[str, ...] = get_args(AuthMode)
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\S+)\s*")
_RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
# Headers the gateway writes or that frame the request: never identity headers.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "authorization",
        "cookie",
    }
)


def _rule_dir(checker: _Checker) -> Path:
    return Path(checker.document.source).parent


def _read_beside(
    checker: _Checker, value: Any, path: KeyPath
) -> tuple[Path, bytes] | None:
    """A file named relative to the rule file, and its bytes."""
    name = _text(checker, value, path)
    if name is None:
        return None
    where = _rule_dir(checker) / name
    try:
        return where, where.read_bytes()
    except OSError as exc:
        checker.report(path, f"cannot read {name!r}: {exc.strerror or exc}")
        return None


def _rate(checker: _Checker, value: Any, path: KeyPath) -> tuple[float, int] | None:
    """`100/s`, `10/m`, `5000/h` or `N/<duration>`: tokens a second, and N."""
    found = _RATE.fullmatch(value) if isinstance(value, str) else None
    period = None
    if found is not None:
        period = _RATE_PERIODS.get(found.group(2))
        if period is None:
            try:
                period = parse_duration(found.group(2))
            except ValueError:
                period = None
    if found is None or not period or int(found.group(1)) < 1:
        checker.report(
            path, f"expected a rate like 100/s, 10/m or 50/10s, got {_show(value)}"
        )
        return None
    count = int(found.group(1))
    return count / period, count


def _per(checker: _Checker, value: Any, path: KeyPath) -> tuple[str, str | None] | None:
    """`consumer`, `ip`, `route` or `header:NAME`."""
    if isinstance(value, str) and value.startswith("header:"):
        name = _header_name(checker, value[len("header:") :], path)
        return ("header", name) if name is not None else None
    kind = _choice(("consumer", "ip", "route", "header:NAME"))(checker, value, path)
    if kind == "header:NAME":
        checker.report(path, "name the header: header:X-Tenant-Id")
        return None
    return (kind, None) if kind is not None else None


_RATE_LIMIT = {"rate": _rate, "burst": _whole_number(1), "per": _per}
_CONSUMER_RATE_LIMIT = {"rate": _rate, "burst": _whole_number(1)}


def _rate_limit_reader(table: Mapping[str, Reader]) -> Reader:
    def read(checker: _Checker, value: Any, path: KeyPath) -> RateLimit | None:
        values = checker.fields(value, path, table, required=("rate",))
        if values is None:
            return None
        rate, count = values["rate"]
        per, header = values.get("per", ("consumer", None))
        return RateLimit(rate, values.get("burst", count), per, header)

    return read


_rate_limit = _rate_limit_reader(_RATE_LIMIT)


def _scope(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    text = _text(checker, value, path)
    if text is not None and not _SCOPE.fullmatch(text):
        checker.report(path, f"expected a scope or role without spaces, got {text!r}")
        return None
    return text


def _grants(checker: _Checker, value: Any, path: KeyPath) -> frozenset[str] | None:
    found = _list_of(_scope)(checker, value, path)
    return frozenset(found) if found is not None else None


def _api_key(checker: _Checker, value: Any, path: KeyPath) -> bytes | None:
    """A key (usually `${VAR}`) or `sha256:HEX`, kept only as its digest."""
    if not isinstance(value, str):
        checker.report(path, f"expected an API key as text, got {_show(value)}")
        return None
    try:
        return digest_of_entry(value)
    except ValueError as exc:
        checker.report(path, str(exc))
        return None


def _api_key_file(
    checker: _Checker, value: Any, path: KeyPath
) -> tuple[bytes, ...] | None:
    """A file of keys, one a line (`#` comments); each becomes a digest."""
    found = _read_beside(checker, value, path)
    if found is None:
        return None
    where, data = found
    digests = []
    for line, entry in keys_in_file(data.decode("utf-8", "replace")):
        try:
            digests.append(digest_of_entry(entry))
        except ValueError as exc:
            checker.report(path, f"{where.name} line {line}: {exc}")
            return None
    if not digests:
        checker.report(path, f"{where.name} holds no keys")
        return None
    return tuple(digests)


_CONSUMER = {
    "api_keys": _list_of(_api_key),
    "api_keys_file": _api_key_file,
    "scopes": _grants,
    "roles": _grants,
    "rate_limit": _rate_limit_reader(_CONSUMER_RATE_LIMIT),
}


def _consumers(
    checker: _Checker, value: Any, path: KeyPath
) -> dict[str, Consumer] | None:
    if not isinstance(value, dict):
        checker.report(
            path,
            f"expected a mapping of consumer names to consumers, got {_show(value)}",
        )
        return None
    consumers: dict[str, Consumer] = {}
    owners: dict[bytes, str] = {}
    for name, raw in value.items():
        where = (*path, name)
        valid_name = _name(checker, name, where)
        values = checker.fields(raw if raw is not None else {}, where, _CONSUMER)
        if valid_name is None or values is None:
            continue
        digests = values.pop("api_keys", ()) + values.pop("api_keys_file", ())
        for digest in digests:
            other = owners.setdefault(digest, name)
            if other != name:
                checker.report(
                    (*where, "api_keys"),
                    f"a key of {name!r} is also a key of consumer {other!r}",
                )
        consumers[name] = Consumer(name=name, key_hashes=tuple(digests), **values)
    return consumers if len(consumers) == len(value) else None


def _api_key_auth(checker: _Checker, value: Any, path: KeyPath) -> ApiKeyAuth | None:
    values = checker.fields(value, path, {"header": _header_name, "query": _token})
    return ApiKeyAuth(**values) if values is not None else None


def _algorithm(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    if isinstance(value, str) and value.lower() == "none":
        checker.report(path, "alg none is never accepted; name a signing algorithm")
        return None
    return _choice(tuple(ALGORITHM_FAMILY))(checker, value, path)


def _text_list(checker: _Checker, value: Any, path: KeyPath) -> tuple[str, ...] | None:
    """One text or a list of them."""
    if isinstance(value, list):
        return _list_of(_text, non_empty=True)(checker, value, path)
    text = _text(checker, value, path)
    return (text,) if text is not None else None


def _jwks_url(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    """An https URL (plain http only on a loopback address)."""
    url = _text(checker, value, path)
    if url is None:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    loopback = host == "localhost" or (
        _is_ip(host) and ipaddress.ip_address(host).is_loopback
    )
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        checker.report(
            path, f"expected an https:// URL (http only on loopback), got {url!r}"
        )
        return None
    return url


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_JWT_ISSUER = {
    "issuer": _text,
    "audience": _text_list,
    "algorithms": _list_of(_algorithm, non_empty=True),
    "jwks_file": _text,
    "jwks_url": _jwks_url,
    "public_key": _text,
    "secret": _text,
    "consumer_claim": _text,
}
_KEY_SOURCES = ("jwks_file", "jwks_url", "public_key", "secret")


def _jwt_issuer(checker: _Checker, value: Any, path: KeyPath) -> JwtIssuer | None:
    values = checker.fields(value, path, _JWT_ISSUER, required=("issuer", "algorithms"))
    if values is None:
        return None
    sources = [key for key in _KEY_SOURCES if key in values]
    if len(sources) != 1:
        checker.report(
            path,
            "give exactly one of jwks_file, jwks_url, public_key or secret"
            + (f", got {', '.join(sources)}" if sources else ""),
        )
        return None
    source = sources[0]
    families = {ALGORITHM_FAMILY[alg] for alg in values["algorithms"]}
    where = (*path, source)
    if (source == "secret") != (families == {"oct"}):
        checker.report(
            (*path, "algorithms"),
            "HS* algorithms go with a secret and only with a secret; "
            "never mix them with public keys",
        )
        return None

    keys: tuple[JwtKey, ...] = ()
    try:
        if source == "secret":
            keys = (secret_key(values.pop("secret")),)
        elif source in ("public_key", "jwks_file"):
            found = _read_beside(checker, values.pop(source), where)
            if found is None:
                return None
            loader = key_from_pem if source == "public_key" else keys_from_jwks
            loaded = loader(found[1])
            keys = loaded if isinstance(loaded, tuple) else (loaded,)
    except ValueError as exc:
        checker.report(where, str(exc))
        return None
    missing = sorted(families - {key.family for key in keys})
    if keys and missing:
        checker.report(
            where,
            f"no key for the {', '.join(missing)} algorithms listed in algorithms",
        )
        return None
    return JwtIssuer(
        issuer=values["issuer"],
        algorithms=values["algorithms"],
        audience=values.get("audience", ()),
        keys=keys,
        jwks_url=values.get("jwks_url"),
        consumer_claim=values.get("consumer_claim"),
    )


def _jwt_issuers(
    checker: _Checker, value: Any, path: KeyPath
) -> tuple[JwtIssuer, ...] | None:
    issuers = _list_of(_jwt_issuer, non_empty=True)(checker, value, path)
    if issuers is None:
        return None
    seen: set[str] = set()
    for i, issuer in enumerate(issuers):
        if issuer.issuer in seen:
            checker.report(
                (*path, i, "issuer"), f"issuer {issuer.issuer!r} is listed twice"
            )
            return None
        seen.add(issuer.issuer)
    return issuers


_JWT = {
    "issuers": _jwt_issuers,
    "leeway": _duration_or_zero,
    "consumer_claim": _text,
    "scopes_claim": _text,
    "roles_claim": _text,
    "require_exp": _bool,
    "jwks_refresh": _duration,
    "jwks_max_age": _duration,
}


def _jwt(checker: _Checker, value: Any, path: KeyPath) -> JwtAuth | None:
    values = checker.fields(value, path, _JWT, required=("issuers",))
    return JwtAuth(**values) if values is not None else None


def _identity_header(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    name = _token(checker, value, path)
    if name is not None and name.lower() in _RESERVED_HEADERS:
        checker.report(path, f"{name!r} is managed by the gateway; pick another header")
        return None
    return name


def _claim_headers(
    checker: _Checker, value: Any, path: KeyPath
) -> tuple[tuple[str, str], ...] | None:
    """`{claim: Header-Name}`."""
    if not isinstance(value, dict):
        checker.report(
            path, f"expected a mapping of claim names to headers, got {_show(value)}"
        )
        return None
    pairs = []
    for claim, header in value.items():
        name = _identity_header(checker, header, (*path, claim))
        if name is None:
            return None
        pairs.append((str(claim), name))
    return tuple(pairs)


def _identity_headers(
    checker: _Checker, value: Any, path: KeyPath
) -> IdentityHeaders | None:
    values = checker.fields(
        value, path, {"consumer": _identity_header, "claims": _claim_headers}
    )
    return IdentityHeaders(**values) if values is not None else None


def _realm(checker: _Checker, value: Any, path: KeyPath) -> str | None:
    text = _text(checker, value, path)
    if text is not None and not _SCOPE.fullmatch(text.replace(" ", "_")):
        checker.report(
            path, f"expected a realm without quotes or backslashes, got {text!r}"
        )
        return None
    return text


_AUTH = {
    "default": _choice(AUTH_MODES),
    "api_key": _api_key_auth,
    "jwt": _jwt,
    "identity_headers": _identity_headers,
    "realm": _realm,
}


def _auth(checker: _Checker, value: Any, path: KeyPath) -> Auth | None:
    values = checker.fields(value, path, _AUTH)
    return Auth(**values) if values is not None else None


def _require(checker: _Checker, value: Any, path: KeyPath) -> Require | None:
    values = checker.fields(value, path, {"scopes": _grants, "roles": _grants})
    if values is not None and not any(values.values()):
        checker.report(path, "give the scopes or roles a consumer must hold")
        return None
    return Require(**values) if values is not None else None


def _redis_url(checker: _Checker, value: Any, path: KeyPath) -> dict[str, Any] | None:
    """`redis://[:password@]host[:port][/db]`."""
    url = _text(checker, value, path)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
        db_text = parts.path.lstrip("/") or "0"
        db = int(db_text)
    except ValueError:
        parts, port, db = None, 0, -1
    if parts is None or parts.scheme != "redis" or not parts.hostname or db < 0:
        checker.report(
            path,
            "expected a Redis URL like redis://127.0.0.1:6379/0, "
            f"got {url.rpartition('@')[2]!r}",
        )
        return None
    return {
        "redis": f"redis://{parts.hostname}:{port}/{db}",
        "host": parts.hostname,
        "port": port,
        "db": db,
        "password": parts.password,
    }


_STATE = {
    "redis": _redis_url,
    "on_state_error": _choice(("open", "deny")),
    "timeout": _duration,
    "prefix": _name,
}


def _state(checker: _Checker, value: Any, path: KeyPath) -> SharedState | None:
    values = checker.fields(value, path, _STATE, required=("redis",))
    if values is None:
        return None
    return SharedState(**values.pop("redis"), **values)


def _tls(checker: _Checker, value: Any, path: KeyPath) -> Tls | None:
    values = checker.fields(
        value, path, {"cert": _text, "key": _text}, required=("cert", "key")
    )
    if values is None:
        return None
    cert = _read_beside(checker, values["cert"], (*path, "cert"))
    key = _read_beside(checker, values["key"], (*path, "key"))
    if cert is None or key is None:
        return None
    try:
        check_tls_pair(cert[1], key[1])
    except ValueError as exc:
        checker.report(path, str(exc))
        return None
    return Tls(cert=cert[0].resolve(), key=key[0].resolve())


def _security_consistent(checker: _Checker, values: dict[str, Any]) -> bool:
    """Route auth, require and per-consumer limits need identities to exist."""
    before = checker.failures
    auth: Auth = values.get("auth") or Auth()
    consumers: dict[str, Consumer] = values.get("consumers", {})
    has_keys = any(consumer.key_hashes for consumer in consumers.values())
    checks: list[tuple[KeyPath, Route | None]] = [(("auth", "default"), None)]
    checks += [
        (("routes", i), route) for i, route in enumerate(values.get("routes", ()))
    ]
    for where, route in checks:
        mode = (route.auth if route is not None else None) or auth.default
        at = (*where, "auth") if route is not None else where
        if (
            mode in ("api_key", "any")
            and not has_keys
            and (mode == "api_key" or auth.jwt is None)
        ):
            checker.report(
                at, f"auth {mode} needs consumers with api_keys; none have any"
            )
        if (
            mode in ("jwt", "any")
            and auth.jwt is None
            and (mode == "jwt" or not has_keys)
        ):
            checker.report(at, f"auth {mode} needs auth.jwt with at least one issuer")
        if route is None:
            continue
        if route.require is not None and mode == "none":
            checker.report(
                (*where, "require"), "require needs the route to authenticate; set auth"
            )
        limit = route.rate_limit
        if limit is not None and limit.per == "consumer" and mode == "none":
            checker.report(
                (*where, "rate_limit"),
                "per: consumer needs the route to authenticate; set auth, or per: ip",
            )
    return checker.failures == before


# Routes.

_ROUTE = {
    "name": _name,
    "match": _match,
    "to": _upstream_ref,
    "split": _split,
    "sticky": _sticky,
    "override": _override,
    "shadow": _shadow,
    "rewrite": _rewrite,
    "transform": _transform,
    "timeout": _duration,
    "connect_timeout": _duration,
    "idle_timeout": _duration,
    "retries": _retries,
    "headers": _header_rules,
    "auth": _choice(AUTH_MODES),
    "require": _require,
    "rate_limit": _rate_limit,
    "max_body": _size,
}


def _route(checker: _Checker, value: Any, path: KeyPath) -> Route | None:
    values = checker.fields(value, path, _ROUTE, required=("name",))
    if isinstance(value, dict) and ("to" in value) == ("split" in value):
        both = "to" in value
        checker.report(
            path,
            "give either 'to' or 'split', not both"
            if both
            else "missing 'to' or 'split': where should matching requests go?",
        )
        return None
    if values is None:
        return None

    shared = {key: values.pop(key) for key in _FOLDED if key in values}
    entries = values.pop("split", None) or (SplitEntry(to=values.pop("to")),)
    return Route(
        match=values.pop("match", Match()),
        split=tuple(_fold(entry, shared) for entry in entries),
        line=checker.document.line_of(path),
        timeout=shared.get("timeout"),
        connect_timeout=shared.get("connect_timeout"),
        idle_timeout=shared.get("idle_timeout"),
        **values,
    )


def _fold(entry: SplitEntry, shared: Mapping[str, Any]) -> SplitEntry:
    """Give a split entry the route-level settings it does not set itself."""
    missing = {
        key: value for key, value in shared.items() if getattr(entry, key) is None
    }
    return dataclasses.replace(entry, **missing)


def _routes(checker: _Checker, value: Any, path: KeyPath) -> tuple[Route, ...] | None:
    routes = _list_of(_route)(checker, value, path)
    if not isinstance(value, list):
        return None

    first_line: dict[str, int] = {}
    for i, raw in enumerate(value):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            continue
        where = (*path, i, "name")
        if name == "default":
            checker.report(
                where, "'default' names the catch-all route; choose another name"
            )
            continue
        if name in first_line:
            first = first_line[name]
            checker.report(
                where, f"duplicate route name {name!r} (first used on line {first})"
            )
        else:
            first_line[name] = checker.document.line_of(where)
    return routes


# The top level.


def _admin(checker: _Checker, value: Any, path: KeyPath) -> Admin | None:
    values = checker.fields(value, path, {"listen": _address, "token": _text})
    if values is None:
        return None
    listen = values.get("listen", DEFAULT_ADMIN_LISTEN)
    line = checker.document.line_of((*path, "listen"))
    token = values.get("token")
    if token is None and not listen.is_loopback:
        checker.report((*path, "token"), admin_token_required(listen), line=line)
        return None
    return Admin(listen=listen, token=token, line=line)


def admin_token_required(listen: Address) -> str:
    """Why an admin API reachable from other machines is refused without a token."""
    return (
        f"the admin API on non-loopback {listen} needs a token "
        "(token: ${STRANGLER_ADMIN_TOKEN}), or listen on 127.0.0.1"
    )


_LIMITS = {
    "client_header_timeout": _duration,
    "client_body_timeout": _duration,
    "max_header_bytes": _positive_size,
    "max_headers": _whole_number(1),
    "max_body": _size,
}


def _limits(checker: _Checker, value: Any, path: KeyPath) -> Limits | None:
    values = checker.fields(value, path, _LIMITS)
    return Limits(**values) if values is not None else None


def _access_log(checker: _Checker, value: Any, path: KeyPath) -> AccessLog | None:
    """`false`, `true`, or `{enabled, path}`."""
    if isinstance(value, bool):
        return AccessLog(enabled=value)
    if not isinstance(value, dict):
        checker.report(
            path, f"expected true, false or {{enabled, path}}, got {_show(value)}"
        )
        return None
    values = checker.fields(value, path, {"enabled": _bool, "path": _text})
    return AccessLog(**values) if values is not None else None


_RULES = {
    "listen": _address,
    "admin": _admin,
    "upstreams": _upstreams,
    "default": _upstream_ref,
    "routes": _routes,
    "trusted_proxies": _list_of(_network),
    "expose_decision": _bool,
    "limits": _limits,
    "access_log": _access_log,
    "timeout": _duration,
    "connect_timeout": _duration,
    "drain_timeout": _duration_or_zero,
    "consumers": _consumers,
    "auth": _auth,
    "state": _state,
    "tls": _tls,
}


def _rules(checker: _Checker, value: Any) -> Rules | None:
    if value is None:
        checker.report(
            (), "the rule file is empty; it needs at least upstreams and default"
        )
        return None
    if isinstance(value, dict) and isinstance(value.get("upstreams"), dict):
        checker.upstreams = tuple(str(name) for name in value["upstreams"])

    values = checker.fields(value, (), _RULES, required=("upstreams", "default"))
    if values is None or not _security_consistent(checker, values):
        return None
    return Rules(
        source=Path(checker.document.source),
        listen=values.pop("listen", DEFAULT_LISTEN),
        **values,
    )
