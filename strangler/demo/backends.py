"""Start and stop the demo's backends: monolith instances and the users service.

`start_demo_backends` is what `strangler demo` calls before it starts the
gateway, and what tests call with port 0. It only binds loopback addresses:
the demo services trust every caller, `/admin/fail` included.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from strangler.demo.monolith import Monolith
from strangler.demo.users_service import UsersService

if TYPE_CHECKING:
    from strangler.twisted_types import ListeningPort, ReactorClock, TCPReactor

__all__ = ["DemoBackends", "DemoPorts", "start_demo_backends"]


@dataclass(frozen=True, slots=True)
class DemoPorts:
    """Where the backends listen; 0 lets the OS pick (what tests want).

    The defaults are the ports `demo.yaml` points the gateway at.
    """

    monolith: tuple[int, ...] = (9001, 9002)
    users: int = 9101

    def __post_init__(self) -> None:
        if not self.monolith:
            raise ValueError("monolith needs at least one port, got ()")
        for name, port in [("users", self.users)] + [
            (f"monolith[{index}]", port) for index, port in enumerate(self.monolith)
        ]:
            if isinstance(port, bool) or not isinstance(port, int):
                raise ValueError(f"{name} must be a port number, got {port!r}")
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be a port from 0 to 65535, got {port}")

        fixed = [port for port in (*self.monolith, self.users) if port != 0]
        if len(fixed) != len(set(fixed)):
            raise ValueError(f"each backend needs its own port, got {self}")


class DemoBackends:
    """The running backends: their service objects, bound ports and `stop`."""

    def __init__(
        self,
        interface: str,
        monoliths: tuple[Monolith, ...],
        users: UsersService,
        listening: list[tuple[ListeningPort, _ConnectionTracker]],
    ) -> None:
        self.interface = interface
        self.monoliths = monoliths
        self.users = users
        ports = tuple(port.getHost().port for port, _ in listening)
        self.monolith_ports: tuple[int, ...] = ports[:-1]
        self.users_port: int = ports[-1]
        self._listening = listening
        self._stopping: Deferred[None] | None = None
        self._stopped = False
        self._waiters: list[Deferred[None]] = []

    @property
    def monolith_urls(self) -> tuple[str, ...]:
        return tuple(self._url(port) for port in self.monolith_ports)

    @property
    def users_url(self) -> str:
        return self._url(self.users_port)

    def _url(self, port: int) -> str:
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"http://{host}:{port}"

    def stop(self) -> Deferred[None]:
        """Stop listening and drop open connections; fires once all are closed.

        Calling it again is harmless: every call's Deferred fires when the one
        shutdown is done. In-flight requests are cut, not finished.
        """
        waiter: Deferred[None] = Deferred()
        if self._stopped:
            waiter.callback(None)
            return waiter
        self._waiters.append(waiter)
        if self._stopping is None:
            steps: list[Deferred[Any]] = []
            for port, tracker in self._listening:
                steps.append(maybeDeferred(port.stopListening))
                steps.append(tracker.close_all())
            self._stopping = gatherResults(steps, consumeErrors=True).addBoth(
                self._finish_stop
            )
        return waiter

    def _finish_stop(self, result: object) -> None:
        self._stopped = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)


def start_demo_backends(
    reactor: TCPReactor,
    ports: DemoPorts | None = None,
    interface: str = "127.0.0.1",
) -> DemoBackends:
    """Listen the monolith instances and the users service on `interface`.

    `reactor` must also provide `IReactorTime`; the services use it as their
    clock. Raises `CannotListenError` when a port is taken, after closing
    the ports it had already opened.
    """
    ports = ports if ports is not None else DemoPorts()
    _check_loopback(interface)
    time_provider = IReactorTime(reactor)
    # The same provider, seen through the methods the services call on it.
    clock = cast("ReactorClock", time_provider)

    monoliths = tuple(
        Monolith(f"monolith-{number}", clock)
        for number in range(1, len(ports.monolith) + 1)
    )
    users = UsersService("users-1", clock)
    resources = [monolith.resource for monolith in monoliths] + [users.resource]
    plan = zip((*ports.monolith, ports.users), resources, strict=True)

    listening: list[tuple[ListeningPort, _ConnectionTracker]] = []
    try:
        for port, resource in plan:
            tracker = _ConnectionTracker(_DemoSite(resource, reactor=time_provider))
            listening.append(
                (reactor.listenTCP(port, tracker, interface=interface), tracker)
            )
    except Exception:
        for opened, _ in listening:
            opened.stopListening()
        raise
    return DemoBackends(interface, monoliths, users, listening)


def _check_loopback(interface: str) -> None:
    try:
        loopback = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            "the demo backends bind only to a loopback address such as 127.0.0.1"
            f" or ::1, got {interface!r}"
        )


class _DemoSite(Site):
    """A Site that keeps quiet: the gateway's access log is the one to read."""

    noisy = False
    displayTracebacks = False

    def __init__(self, resource: Resource, reactor: IReactorTime) -> None:
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)

    def log(self, request: Request) -> None:
        """Write no access log line for a backend request."""


class _ConnectionTracker(WrappingFactory):
    """Remembers a Site's open connections so that `stop` can close them.

    Without this, stopping a port leaves keep-alive connections (say, from
    the gateway's pool) open until their idle timeout, hours later.
    """

    noisy = False

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self._all_closed: list[Deferred[None]] = []

    def unregisterProtocol(self, protocol: ProtocolWrapper) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiters, self._all_closed = self._all_closed, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self) -> Deferred[None]:
        """Abort every open connection; fires when the last one is gone."""
        waiter: Deferred[None] = Deferred()
        if not self.protocols:
            waiter.callback(None)
            return waiter
        self._all_closed.append(waiter)
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()
        return waiter
