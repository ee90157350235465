"""Logging: structlog configured once, and a cheap access log for the hot path.

Application events (start, reload, errors) go through structlog's usual
pipeline. The access log is the one event per request, so it takes the
shortest path structlog allows: a bound logger whose only processors are a
timestamp and orjson, writing into a buffer that is flushed a few times a
second rather than once per line. A crash can lose the last fraction of a
second of access lines; `docs/limitations.md` says so.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

import orjson
import structlog
from twisted.internet.task import LoopingCall

FLUSH_INTERVAL = 0.25


def configure_logging(stream: IO[str] | None = None, json: bool | None = None) -> None:
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


def _add_time(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["ts"] = round(time.time(), 3)
    return event


def _render(_logger: Any, _method: str, event: dict[str, Any]) -> bytes:
    return orjson.dumps(event, default=str, option=orjson.OPT_APPEND_NEWLINE)


class _BufferedLines:
    """Collects rendered lines and writes them out in batches."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.lines: list[bytes] = []

    def msg(self, line: bytes) -> None:
        self.lines.append(line)

    info = msg

    def flush(self) -> None:
        if self.lines:
            lines, self.lines = self.lines, []
            self.sink.write(b"".join(lines))
            self.sink.flush()


class AccessLog:
    """One JSON line per request, batched; call it with the request's fields."""

    def __init__(self, sink: IO[bytes], reactor: Any = None) -> None:
        self._buffer = _BufferedLines(sink)
        self._logger = structlog.wrap_logger(
            self._buffer,
            processors=[_add_time, _render],
            wrapper_class=structlog.make_filtering_bound_logger(0),
            cache_logger_on_first_use=True,
        )
        self._info: Callable[..., Any] = self._logger.info
        self._flusher: LoopingCall | None = None
        if reactor is not None:
            self._flusher = LoopingCall(self._buffer.flush)
            self._flusher.clock = reactor
            self._flusher.start(FLUSH_INTERVAL, now=False)

    def __call__(self, fields: dict[str, Any]) -> None:
        self._info(fields.pop("event"), **fields)

    def flush(self) -> None:
        self._buffer.flush()

    def close(self) -> None:
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self.flush()


def open_access_log(path: str, reactor: Any) -> AccessLog:
    """An access log writing to stdout (`-`) or appending to a file."""
    # The file stays open as long as the gateway runs.
    sink: IO[bytes] = sys.stdout.buffer if path == "-" else open(path, "ab")  # noqa: SIM115
    return AccessLog(sink, reactor)
