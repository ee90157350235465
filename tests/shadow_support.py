"""Scriptable primary and shadow services for the shadow tests (127.0.0.1 only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from support import sleep
from twisted.internet import defer, reactor
from twisted.web import resource, server

Seen = dict[str, Any]
Answer = tuple[int, dict[str, str], bytes]
Reply = Answer | tuple[float, Answer] | str
"""An answer: (status, headers, body), (seconds, answer) to answer later, or
"hang", "reset" or "trickle"."""


def json_reply(data: object, status: int = 200, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, orjson.dumps(data)


class _Scripted(resource.Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[Seen], Reply]) -> None:
        super().__init__()
        self.answer = answer
        self.seen: list[Seen] = []
        self.held: list[server.Request] = []

    def render(self, request: server.Request) -> Any:
        body = request.content.read()
        seen = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": {
                k.decode("latin-1").lower(): v[0].decode("latin-1")
                for k, v in request.requestHeaders.getAllRawHeaders()
            },
            "body": body,
        }
        self.seen.append(seen)
        reply = self.answer(seen)
        if reply == "hang":
            self.held.append(request)
            return server.NOT_DONE_YET
        if reply == "reset":
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        if reply == "trickle":
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"1000")
            request.write(b'{"partial": ')
            self.held.append(request)
            return server.NOT_DONE_YET
        assert not isinstance(reply, str)
        if len(reply) == 2:
            delay, later = reply
            reactor.callLater(delay, self._answer, request, later)
            self.held.append(request)
            return server.NOT_DONE_YET
        status, headers, payload = reply
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name.encode(), value.encode())
        return payload

    def _answer(self, request: server.Request, reply: Any) -> None:
        if request.finished or request._disconnected:
            return
        self.held.remove(request)
        status, headers, payload = reply
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name.encode(), value.encode())
        request.write(payload)
        request.finish()


class Service:
    """A loopback HTTP service whose every answer comes from `answer(seen)`."""

    def __init__(self, answer: Callable[[Seen], Reply]) -> None:
        self.resource = _Scripted(answer)
        site = server.Site(self.resource)
        site.noisy = False
        site.log = lambda _request: None  # type: ignore[method-assign]
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    @property
    def seen(self) -> list[Seen]:
        return self.resource.seen

    def copies(self) -> list[Seen]:
        """Requests that carried the gateway's shadow marker."""
        return [s for s in self.seen if s["headers"].get("x-strangler-shadow") == "1"]

    def originals(self) -> list[Seen]:
        return [s for s in self.seen if "x-strangler-shadow" not in s["headers"]]

    def stop(self) -> defer.Deferred[None]:
        for request in self.resource.held:
            request.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)


async def wait_until(check: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll a condition every 10 ms, up to `limit` seconds (then fail)."""
    for _ in range(int(limit / 0.01)):
        if check():
            return
        await sleep(0.01)
    raise AssertionError(f"condition not reached within {limit}s")


def services_fixture() -> Any:
    """A `services` fixture: start scripted services; all are stopped after the test."""

    @pytest.fixture
    def services() -> Iterator[Callable[[Callable[[Seen], Reply]], Service]]:
        started: list[Service] = []

        def start(answer: Callable[[Seen], Reply]) -> Service:
            service = Service(answer)
            started.append(service)
            return service

        yield start
        for service in started:
            pytest_twisted.blockon(service.stop())

    return services


def rules(primary: Service, shadow: Service, shadow_block: str) -> str:
    """Rule-file text: route `users-v1` to `monolith`, shadowed to `users`."""
    return f"""
listen: 127.0.0.1:0
upstreams:
  monolith:
    targets: [{primary.url}]
  users:
    targets: [{shadow.url}]
default: monolith
routes:
  - name: users-v1
    match: {{path: /api/v1/users}}
    to: monolith
    shadow:
      to: users
{shadow_block}
"""
