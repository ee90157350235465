"""Logging: structlog configured once, and a cheap access log for the hot path.

Application events (start, reload, errors) go through structlog's usual
pipeline. The access log is the one event per request, and structlog's
bound-logger dispatch (copying the fields into keyword arguments, then into
a fresh event dict, for every call) costs three times the rendering itself:
about 7 us of a request's 45. So the access log renders the record dict it
is given directly with orjson, in the same JSON-lines shape structlog's
JSON renderer produces, into a buffer that is written out once it holds
64 KiB or a few times a second, whichever comes first. A crash can lose the
last fraction of a second of access lines; `docs/limitations.md` says so.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, TextIO

import orjson
import structlog
from twisted.internet.task import LoopingCall

FLUSH_INTERVAL = 0.25


def configure_logging(stream: TextIO | None = None, json: bool | None = None) -> None:
    """Set up structlog for application events: JSON lines, or console on a tty."""
    stream = stream or sys.stdout
    if json is None:
        json = not stream.isatty()
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps_text)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def _dumps_text(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


FLUSH_BYTES = 64 * 1024
_dumps = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE


class AccessLog:
    """One JSON line per request, batched; call it with the request's fields."""

    def __init__(self, sink: IO[bytes], reactor: Any = None) -> None:
        self.sink = sink
        self._lines: list[bytes] = []
        self._size = 0
        self._flusher: LoopingCall | None = None
        if reactor is not None:
            self._flusher = LoopingCall(self.flush)
            self._flusher.clock = reactor
            self._flusher.start(FLUSH_INTERVAL, now=False)

    def __call__(self, fields: dict[str, Any]) -> None:
        fields["ts"] = round(time.time(), 3)
        line = _dumps(fields, default=str, option=_NEWLINE)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            self._size = 0
            self.sink.write(b"".join(lines))
            self.sink.flush()

    def close(self) -> None:
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self.flush()


def open_access_log(path: str, reactor: Any) -> AccessLog:
    """An access log writing to stdout (`-`) or appending to a file."""
    # The file stays open as long as the gateway runs.
    sink: IO[bytes] = sys.stdout.buffer if path == "-" else open(path, "ab")  # noqa: SIM115
    return AccessLog(sink, reactor)
