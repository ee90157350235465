"""The one exception tree of strangler.

Everything the gateway raises on purpose derives from `StranglerError`, so a
caller can catch the family at one boundary and translate it: the CLI turns
`ConfigError` into file:line messages and an exit code, the proxy turns
`UpstreamError` into 502 or 504 for the client.
"""

from __future__ import annotations

from dataclasses import dataclass


class StranglerError(Exception):
    """Base of every error strangler raises deliberately."""


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One problem found in a rule file, located well enough to fix it."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class ConfigError(StranglerError):
    """A rule file (or migration plan) that cannot be used, with every problem."""

    def __init__(self, problems: list[RuleProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


class UpstreamError(StranglerError):
    """An upstream could not produce a usable response."""

    status = 502
    reason = "bad_gateway"
    retry_kind = "connect"
    counts_as_failure = True


class UpstreamConnectError(UpstreamError):
    """No connection could be made to any target (refused, unreachable, DNS)."""

    reason = "upstream_unreachable"


class UpstreamTlsError(UpstreamConnectError):
    """The TLS handshake with an `https://` target failed (often verification).

    Nothing reached the upstream's application, so, like a refused connect,
    another target may be tried.
    """

    reason = "upstream_tls_error"


class UpstreamTimeout(UpstreamError):
    """The upstream took longer than the configured timeout."""

    status = 504
    reason = "upstream_timeout"
    retry_kind = "timeout"


class UpstreamBadStatus(UpstreamError):
    """The upstream answered 5xx and neither a retry nor a fallback could help."""

    reason = "upstream_error"
    retry_kind = "5xx"
    counts_as_failure = False


class UpstreamProtocolError(UpstreamError):
    """The upstream answered with bytes that are not valid HTTP/1.1."""

    reason = "upstream_protocol_error"


class UpstreamClosed(UpstreamError):
    """The upstream closed the connection before the response was complete."""

    reason = "upstream_closed"


class ResponseTransformError(UpstreamError):
    """The upstream's response could not be converted for the client."""

    reason = "response_transform_failed"
    retry_kind = "none"
    counts_as_failure = False
