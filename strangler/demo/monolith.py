"""The legacy monolith of the demo: users and orders in XML under `/api/v1`.

It behaves like the old applications strangler is meant to wrap: XML bodies,
a session cookie at `/login`, a redirect left over from an old URL scheme and
a report slow enough to show the gateway's timeouts. Several instances run
side by side; each keeps its own users in memory, so a user created on
`monolith-1` is unknown to `monolith-2`, as with a cache nobody shares.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as parse_xml
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from strangler.demo import DEMO_USERS, MAX_BODY, DemoUser, Router, query_arg, read_body

if TYPE_CHECKING:
    from strangler.twisted_types import ReactorClock, Timer

__all__ = ["DEMO_ORDERS", "MAX_DELAY_MS", "MAX_USERS", "DemoOrder", "Monolith"]

MAX_DELAY_MS = 60_000
"""The longest delay `/api/v1/reports/slow` agrees to; longer asks get 400."""

MAX_USERS = 10_000
"""Users one instance keeps before refusing to create more."""

_XML = b"application/xml"
_ID = r"(?P<id>[0-9]{1,9})"


@dataclass(frozen=True, slots=True)
class DemoOrder:
    """An order; orders stay with the monolith for the whole demo."""

    id: int
    user_id: int
    status: str
    total_cents: int
    currency: str = "EUR"


DEMO_ORDERS: tuple[DemoOrder, ...] = (
    DemoOrder(1001, 1, "shipped", 4250),
    DemoOrder(1002, 2, "paid", 1999),
    DemoOrder(1003, 1, "cancelled", 700),
    DemoOrder(1004, 5, "shipped", 12000),
)


class Monolith:
    """One instance of the legacy application.

    `resource` is what a `Site` serves. Every response names the instance in
    `X-Served-By`, so a demo can show which instance the gateway picked.
    """

    def __init__(self, instance: str, clock: ReactorClock) -> None:
        self.instance = instance
        self._clock = clock
        self._users: dict[int, DemoUser] = {user.id: user for user in DEMO_USERS}
        self._orders: dict[int, DemoOrder] = {order.id: order for order in DEMO_ORDERS}
        self._logins = 0

        router = Router(instance, _xml_error)
        router.add("GET", r"/health", self._health)
        router.add("GET", r"/", self._home)
        router.add("GET", r"/old-home", self._old_home)
        router.add("GET POST", r"/login", self._login)
        router.add("GET", r"/api/v1/users/?", self._list_users)
        router.add("POST", r"/api/v1/users/?", self._create_user)
        router.add("GET", rf"/api/v1/users/{_ID}", self._get_user)
        router.add("GET", r"/api/v1/orders/?", self._list_orders)
        router.add("GET", rf"/api/v1/orders/{_ID}", self._get_order)
        router.add("GET", r"/api/v1/reports/slow", self._slow_report)
        self.resource: Resource = router

    def _health(self, request: Request, params: dict[str, str]) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok"

    def _home(self, request: Request, params: dict[str, str]) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        page = (
            "<!DOCTYPE html>\n<html><head><title>Legacy Monolith</title></head>\n"
            f"<body><h1>Legacy Monolith</h1><p>Served by {html.escape(self.instance)}"
            '.</p>\n<ul><li><a href="/api/v1/users">users</a></li>'
            '<li><a href="/api/v1/orders">orders</a></li>'
            '<li><a href="/login">log in</a></li></ul></body></html>\n'
        )
        return page.encode("utf-8")

    def _old_home(self, request: Request, params: dict[str, str]) -> bytes:
        request.redirect(b"/")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return b'<a href="/">moved to /</a>\n'

    def _login(self, request: Request, params: dict[str, str]) -> bytes:
        self._logins += 1
        session = f"{self.instance}.{self._logins}"
        request.addCookie(b"session", session.encode("ascii"), path=b"/", httpOnly=True)
        request.addCookie(b"theme", b"classic", path=b"/", max_age=b"86400")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return b"<p>Welcome back.</p>\n"

    def _list_users(self, request: Request, params: dict[str, str]) -> bytes:
        root = ET.Element("users")
        root.extend(_user_element(user) for user in self._users.values())
        return _xml(request, root)

    def _get_user(self, request: Request, params: dict[str, str]) -> bytes:
        user = self._users.get(int(params["id"]))
        if user is None:
            return _xml_error(request, 404, f"no user with id {params['id']}")
        return _xml(request, _user_element(user))

    def _create_user(self, request: Request, params: dict[str, str]) -> bytes:
        body = read_body(request)
        if body is None:
            return _xml_error(request, 413, f"body is larger than {MAX_BODY} bytes")
        if len(self._users) >= MAX_USERS:
            return _xml_error(request, 507, f"this instance holds {MAX_USERS} users")
        try:
            user = _user_from_xml(body, max(self._users) + 1)
        except ValueError as exc:
            return _xml_error(request, 400, str(exc))

        self._users[user.id] = user
        request.setHeader(b"Location", f"/api/v1/users/{user.id}".encode("ascii"))
        return _xml(request, _user_element(user), status=201)

    def _list_orders(self, request: Request, params: dict[str, str]) -> bytes:
        root = ET.Element("orders")
        root.extend(_order_element(order) for order in self._orders.values())
        return _xml(request, root)

    def _get_order(self, request: Request, params: dict[str, str]) -> bytes:
        order = self._orders.get(int(params["id"]))
        if order is None:
            return _xml_error(request, 404, f"no order with id {params['id']}")
        return _xml(request, _order_element(order))

    def _slow_report(self, request: Request, params: dict[str, str]) -> bytes | int:
        text = query_arg(request, "ms")
        delay_ms = _parse_delay_ms("200" if text is None else text)
        if delay_ms is None:
            expected = f"a whole number of milliseconds from 0 to {MAX_DELAY_MS}"
            return _xml_error(request, 400, f"ms must be {expected}, got {text!r}")

        call = self._clock.callLater(
            delay_ms / 1000, self._finish_slow_report, request, delay_ms
        )
        request.notifyFinish().addErrback(_cancel_when_gone, call)
        return NOT_DONE_YET

    def _finish_slow_report(self, request: Request, delay_ms: int) -> None:
        root = ET.Element("report", name="slow")
        ET.SubElement(root, "delay_ms").text = str(delay_ms)
        ET.SubElement(root, "served_by").text = self.instance
        request.write(_xml(request, root))
        request.finish()


def _cancel_when_gone(reason: Failure, call: Timer) -> None:
    """The client left before the report was ready: nobody needs it any more."""
    if call.active():
        call.cancel()


def _parse_delay_ms(text: str) -> int | None:
    if not text.isdigit() or len(text) > len(str(MAX_DELAY_MS)):
        return None
    delay_ms = int(text)
    return delay_ms if delay_ms <= MAX_DELAY_MS else None


def _user_element(user: DemoUser) -> ET.Element:
    element = ET.Element("user", id=str(user.id))
    ET.SubElement(element, "name").text = user.name
    ET.SubElement(element, "email").text = user.email
    ET.SubElement(element, "active").text = "true" if user.active else "false"
    return element


def _order_element(order: DemoOrder) -> ET.Element:
    element = ET.Element("order", id=str(order.id))
    ET.SubElement(element, "user_id").text = str(order.user_id)
    ET.SubElement(element, "status").text = order.status
    total = ET.SubElement(element, "total", currency=order.currency)
    total.text = f"{order.total_cents // 100}.{order.total_cents % 100:02d}"
    return element


def _user_from_xml(body: bytes, user_id: int) -> DemoUser:
    """A user from `<user><name/><email/><active/></user>`; ValueError says why not."""
    try:
        root = parse_xml(body, forbid_dtd=True)
    except (ET.ParseError, DefusedXmlException) as exc:
        raise ValueError(
            f"body must be well-formed XML without DTD or entities: {exc}"
        ) from exc
    if root.tag != "user":
        raise ValueError(f"expected a <user> element, got <{root.tag}>")

    name = (root.findtext("name") or "").strip()
    if not name:
        raise ValueError("<user> needs a non-empty <name>")
    email = (root.findtext("email") or "").strip()
    if "@" not in email:
        raise ValueError(f"<email> must be an e-mail address, got {email!r}")
    active = (root.findtext("active") or "true").strip().lower()
    if active not in ("true", "false"):
        raise ValueError(f"<active> must be true or false, got {active!r}")
    return DemoUser(user_id, name, email, active == "true")


def _xml(request: Request, element: ET.Element, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", _XML)
    return ET.tostring(element, encoding="utf-8", xml_declaration=True)


def _xml_error(request: Request, status: int, message: str) -> bytes:
    root = ET.Element("error")
    ET.SubElement(root, "status").text = str(status)
    ET.SubElement(root, "message").text = message
    return _xml(request, root, status=status)
