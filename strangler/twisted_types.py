"""Typed views of the Twisted objects the gateway calls, for the type checker.

Twisted describes its reactor, transports and timers with zope interfaces
(`IReactorTime`, `ITransport`, `IDelayedCall`). Without a zope plugin, mypy
reads an interface's methods as functions that take no `self`, and
`Protocol.transport` is typed `ITransport`, which has neither producer
registration nor `abortConnection` nor `setTcpNoDelay`. These protocols name
only the methods strangler actually uses, with the signatures Twisted's
implementations have. They exist for annotations alone: nothing here is
called, wrapped or checked at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Factory


class Timer(Protocol):
    """A call scheduled with `callLater` (Twisted's `IDelayedCall`)."""

    def active(self) -> bool: ...
    def cancel(self) -> None: ...
    def reset(self, seconds_from_now: float, /) -> None: ...


class ReactorClock(Protocol):
    """The time half of a reactor, or a `twisted.internet.task.Clock`."""

    def seconds(self) -> float: ...
    def callLater(
        self, delay: float, f: Callable[..., object], /, *args: Any, **kwargs: Any
    ) -> Timer: ...


class UpstreamReactor(ReactorClock, Protocol):
    """What an upstream pool needs: timers, and TLS connections to targets.

    Plain TCP connections go through `strangler.proxy.transports.connect_tcp`.
    """

    def connectSSL(
        self,
        host: str,
        port: int,
        factory: Factory[Any],
        context_factory: Any,
        timeout: float,
        /,
    ) -> object: ...


class Address(Protocol):
    """A TCP endpoint address (`IPv4Address` or `IPv6Address`)."""

    host: str
    port: int


class Producer(Protocol):
    """A streaming producer a transport can pause while its buffer is full."""

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


class ProxyTransport(Protocol):
    """The TCP or TLS transport under either side of a proxied exchange.

    That is a Twisted TCP transport (or a send-at-once one from
    `strangler.proxy.transports`), or the TLS protocol wrapped around one,
    which passes what it does not implement itself to the TCP transport.
    """

    connected: int
    producer: Producer | None

    def write(self, data: bytes, /) -> None: ...
    def writeSequence(self, data: Iterable[bytes], /) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: Producer, streaming: bool, /) -> None: ...
    def unregisterProducer(self) -> None: ...
    def setTcpNoDelay(self, enabled: bool, /) -> None: ...
    def getPeer(self) -> Address: ...


class ListeningPort(Protocol):
    """A bound TCP port (Twisted's `IListeningPort`)."""

    def getHost(self) -> Address: ...
    def stopListening(self) -> Deferred[None] | None: ...


class TCPReactor(Protocol):
    """A reactor's TCP listening half (Twisted's `IReactorTCP`)."""

    def listenTCP(
        self,
        port: int,
        factory: Factory[Any],
        backlog: int = ...,
        interface: str = ...,
    ) -> ListeningPort: ...
