"""One shadow copy's trip, driven by a Clock and a stand-in pool."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from strangler.errors import UpstreamClosed, UpstreamConnectError
from strangler.shadow.fetch import Fetch


class _Pool:
    """Records what a fetch asks of its pool; connections come when a test says."""

    def __init__(self) -> None:
        self.reactor = Clock()
        self.waiting: list[Any] = []
        self.connects = 0
        self.released: list[Any] = []

    def acquire(self, user: Any, connect_timeout: float) -> None:
        self.waiting.append(user)

    def connect(self, user: Any, connect_timeout: float) -> None:
        self.connects += 1
        self.waiting.append(user)

    def release(self, conn: Any) -> None:
        self.released.append(conn)


class _Conn:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.aborted = False

    def send(
        self, user: Any, data: bytes, timeout: float, idle: float, head: bool
    ) -> None:
        self.sent.append(data)

    def abort(self) -> None:
        self.aborted = True


def _fetch(pool: _Pool, ends: list[str | None], timeout: float = 2.0) -> Fetch:
    fetch = Fetch(
        pool, b"GET / HTTP/1.1\r\n\r\n", False, timeout, lambda f, e: ends.append(e), 64
    )  # type: ignore[arg-type]
    fetch.start()
    return fetch


def test_an_answer_is_captured_and_the_fetch_ends_once():
    pool, ends = _Pool(), []
    fetch = _fetch(pool, ends)
    conn = _Conn()
    fetch.attach(conn)  # type: ignore[arg-type]
    fetch.response_head(200, b"OK", [(b"Content-Type", b"application/json")])
    fetch.response_body(b'{"a":')
    fetch.response_body(b"1}")
    fetch.response_complete()
    pool.reactor.advance(10)

    assert conn.sent == [b"GET / HTTP/1.1\r\n\r\n"]
    assert ends == [None]
    answer = fetch.answer()
    assert (answer.status, answer.body) == (200, b'{"a":1}')
    assert pool.reactor.getDelayedCalls() == []


def test_a_shadow_that_never_connects_times_out_and_a_late_connection_is_returned():
    pool, ends = _Pool(), []
    fetch = _fetch(pool, ends, timeout=1.5)
    pool.reactor.advance(1.4)
    assert ends == []
    pool.reactor.advance(0.2)
    assert ends == ["timeout"]

    late = _Conn()
    pool.waiting[0].attach(late)
    assert pool.released == [late] and late.sent == []
    fetch.upstream_failed(UpstreamClosed("gone"), False)
    assert ends == ["timeout"]


def test_a_body_that_trickles_past_the_deadline_is_cut_off():
    pool, ends = _Pool(), []
    fetch = _fetch(pool, ends, timeout=1.0)
    conn = _Conn()
    fetch.attach(conn)  # type: ignore[arg-type]
    fetch.response_head(200, b"OK", [])
    for _ in range(9):
        pool.reactor.advance(0.1)
        fetch.response_body(b"x")
    pool.reactor.advance(0.2)

    assert ends == ["timeout"]
    assert conn.aborted
    fetch.response_complete()
    assert ends == ["timeout"]


def test_a_stale_kept_alive_connection_is_retried_once_on_a_fresh_one():
    pool, ends = _Pool(), []
    fetch = _fetch(pool, ends)
    fetch.attach(_Conn())  # type: ignore[arg-type]
    fetch.upstream_failed(UpstreamClosed("closed before answering"), True)
    assert pool.connects == 1 and ends == []

    fetch.attach(_Conn())  # type: ignore[arg-type]
    fetch.upstream_failed(UpstreamClosed("closed before answering"), True)
    assert pool.connects == 1 and ends == ["closed"]


def test_a_refused_connection_is_not_retried():
    pool, ends = _Pool(), []
    fetch = _fetch(pool, ends)
    fetch.upstream_failed(UpstreamConnectError("refused"), True)
    assert pool.connects == 0 and ends == ["connect"]
    assert pool.reactor.getDelayedCalls() == []


def test_a_large_answer_keeps_only_its_hash():
    pool, ends = _Pool(), []
    fetch = _fetch(pool, ends)
    fetch.attach(_Conn())  # type: ignore[arg-type]
    fetch.response_head(200, b"OK", [])
    for _ in range(10):
        fetch.response_body(b"y" * 16)
    fetch.response_complete()

    answer = fetch.answer()
    assert answer.body is None and answer.size == 160
    assert fetch.capture.chunks == []
