"""TCP transports that send at once, for the proxy's two sides.

Twisted's TCP transport queues every `write` and sends it on the next turn
of the reactor loop: it registers the socket for writability, waits for the
event, sends, and unregisters. For a proxy that writes one small head per
request on each side, that is two `epoll_ctl` calls, one more loop turn and
one more event dispatch per write, about a sixth of the gateway's time. These
transports try `send` first when nothing is queued ahead of the data, and
hand Twisted only what the kernel did not take, so ordering, back-pressure
and error handling stay Twisted's own.

TLS connections keep Twisted's path untouched: their bytes must pass through
the TLS layer first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp
from twisted.internet.posixbase import PosixReactorBase


class _WriteHold:
    """Writes made while one read is being parsed, sent when the parse ends.

    A client's read can carry a request head and then bytes that turn out to
    be malformed; holding the writes until the whole read is parsed means a
    request refused by that parse never reaches the upstream, and the head
    and body that arrived together leave in one `send`. The reactor runs one
    callback at a time, so one hold serves the whole process.
    """

    depth = 0
    held: list[_SendAtOnce] = []


def hold_writes() -> None:
    """Start holding writes of send-at-once transports (nests)."""
    _WriteHold.depth += 1


def release_writes() -> None:
    """Stop holding; at the outermost release, send what was held, in order."""
    _WriteHold.depth -= 1
    if _WriteHold.depth or not _WriteHold.held:
        return
    held, _WriteHold.held = _WriteHold.held, []
    for transport in held:
        transport.send_held()


class _SendAtOnce:
    """Mixed into a Twisted TCP transport: `write` tries the socket first."""

    TLS: bool
    connected: int
    disconnecting: int
    disconnected: int
    dataBuffer: bytes
    _tempDataLen: int
    _writeDisconnected: bool
    _aborting: bool
    socket: Any
    _held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if _WriteHold.depth and not self.TLS:
            held = self._held
            if held is None:
                self._held = [data]
                _WriteHold.held.append(self)
            else:
                held.append(data)
            return
        self._send(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))

    def send_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self._send(held[0] if len(held) == 1 else b"".join(held))

    def _send(self, data: bytes) -> None:
        if (
            self.dataBuffer
            or self._tempDataLen
            or self.TLS
            or not self.connected
            or self.disconnecting
            or self._writeDisconnected
            or self._aborting
        ):
            super().write(data)  # type: ignore[misc]
            return
        try:
            sent = self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted's own write path meet the error and close the
            # connection the usual way.
            sent = 0
        if sent < len(data):
            super().write(data[sent:] if sent else data)  # type: ignore[misc]


class _Server(_SendAtOnce, tcp.Server):
    """An accepted client connection that sends at once."""


class _Client(_SendAtOnce, tcp.Client):
    """A connection to an upstream target that sends at once."""


class _Port(tcp.Port):
    transport = _Server


class _Connector(tcp.Connector):
    def _makeTransport(self) -> _Client:
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


def _is_posix(reactor: Any) -> bool:
    return isinstance(reactor, PosixReactorBase)


def listen_tcp(
    reactor: Any, port: int, factory: Any, backlog: int, interface: str
) -> Any:
    """`reactor.listenTCP`, with send-at-once transports on a real reactor."""
    if not _is_posix(reactor):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = _Port(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def adopt_stream_port(reactor: Any, fd: int, family: Any, factory: Any) -> Any:
    """`reactor.adoptStreamPort`, with send-at-once transports on a real reactor."""
    if not _is_posix(reactor):
        return reactor.adoptStreamPort(fd, family, factory)
    listening = _Port._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    return listening


def connect_tcp(
    reactor: Any, host: str, port: int, factory: Any, timeout: float
) -> Any:
    """`reactor.connectTCP`, with a send-at-once transport on a real reactor."""
    if not _is_posix(reactor):
        return reactor.connectTCP(host, port, factory, timeout)
    connector = _Connector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector
