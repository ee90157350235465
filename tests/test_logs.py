"""The access log: one JSON line per request, written in batches."""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock

from strangler.logs import FLUSH_BYTES, FLUSH_INTERVAL, AccessLog


def record(n: int) -> dict:
    return {"event": "request", "request_id": f"id-{n}", "path": '/a"b', "status": 200}


def test_each_record_is_one_json_line_with_a_timestamp() -> None:
    sink = io.BytesIO()
    log = AccessLog(sink)
    log(record(1))
    log(record(2))
    log.close()

    lines = sink.getvalue().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["id-1", "id-2"]
    first = json.loads(lines[0])
    assert first["path"] == '/a"b' and first["status"] == 200
    assert isinstance(first["ts"], float)


def test_lines_wait_for_the_flush_timer() -> None:
    sink, clock = io.BytesIO(), Clock()
    log = AccessLog(sink, clock)
    log(record(1))
    assert sink.getvalue() == b""

    clock.advance(FLUSH_INTERVAL)
    assert json.loads(sink.getvalue())["request_id"] == "id-1"
    log.close()


def test_a_full_buffer_is_written_without_waiting() -> None:
    sink, clock = io.BytesIO(), Clock()
    log = AccessLog(sink, clock)
    n = 0
    while not sink.getvalue():
        n += 1
        log(record(n))
        assert n < FLUSH_BYTES, "the buffer never flushed by size"

    written = sink.getvalue().splitlines()
    assert len(written) == n
    assert len(sink.getvalue()) >= FLUSH_BYTES
    log.close()
