"""The new users service of the demo: the same people as the monolith, in JSON.

Its `/api/v2` contract differs from the monolith's `/api/v1` on purpose: the
name is nested (`{"name": {"full": ...}}`) and every answer carries
`meta.generated_at`, a field that changes on every call. That gives the
gateway's transforms and shadow comparison something real to do.

`/admin/fail?rate=R` makes a share of API requests fail with 500, so a demo
can show a ramp rolling back. Health checks never fail on purpose: the point
is a service that is up but answering badly.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from twisted.web.resource import Resource
from twisted.web.server import Request

from strangler.demo import (
    DEMO_USERS,
    MAX_BODY,
    DemoUser,
    Handler,
    Router,
    query_arg,
    read_body,
)

if TYPE_CHECKING:
    from strangler.twisted_types import ReactorClock

__all__ = ["MAX_USERS", "UsersService"]

MAX_USERS = 10_000
"""Users one instance keeps before refusing to create more."""

_JSON = b"application/json"
_ID = r"(?P<id>[0-9]{1,9})"


class UsersService:
    """One instance of the new users service; its state lives in this object.

    `clock` dates `meta.generated_at`; `rng` decides which requests fail while
    a fail rate is set (pass a seeded `random.Random` to make that repeatable).
    """

    def __init__(
        self,
        instance: str,
        clock: ReactorClock,
        rng: random.Random | None = None,
    ) -> None:
        self.instance = instance
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._users: dict[int, DemoUser] = {user.id: user for user in DEMO_USERS}
        self.fail_rate = 0.0

        router = Router(instance, _json_error)
        router.add("GET", r"/health", self._health)
        router.add("GET", r"/api/v2/users/?", self._may_fail(self._list_users))
        router.add("POST", r"/api/v2/users/?", self._may_fail(self._create_user))
        router.add("GET", rf"/api/v2/users/{_ID}", self._may_fail(self._get_user))
        router.add("GET POST", r"/admin/fail", self._fail_switch)
        self.resource: Resource = router

    def _may_fail(self, handler: Handler) -> Handler:
        """Wrap an API endpoint so it answers 500 for a `fail_rate` share of calls."""

        def maybe_failing(request: Request, params: dict[str, str]) -> bytes | int:
            if self._rng.random() < self.fail_rate:
                message = f"failing on purpose (fail rate {self.fail_rate})"
                return _json_error(request, 500, message)
            return handler(request, params)

        return maybe_failing

    def _health(self, request: Request, params: dict[str, str]) -> bytes:
        return _json(request, {"status": "ok"})

    def _list_users(self, request: Request, params: dict[str, str]) -> bytes:
        users = [_user_json(user) for user in self._users.values()]
        return _json(request, {"users": users, "meta": self._meta()})

    def _get_user(self, request: Request, params: dict[str, str]) -> bytes:
        user = self._users.get(int(params["id"]))
        if user is None:
            return _json_error(request, 404, f"no user with id {params['id']}")
        return _json(request, {**_user_json(user), "meta": self._meta()})

    def _create_user(self, request: Request, params: dict[str, str]) -> bytes:
        body = read_body(request)
        if body is None:
            return _json_error(request, 413, f"body is larger than {MAX_BODY} bytes")
        if len(self._users) >= MAX_USERS:
            return _json_error(request, 507, f"this instance holds {MAX_USERS} users")
        try:
            user = _user_from_json(body, max(self._users) + 1)
        except ValueError as exc:
            return _json_error(request, 400, str(exc))

        self._users[user.id] = user
        request.setHeader(b"Location", f"/api/v2/users/{user.id}".encode("ascii"))
        return _json(request, {**_user_json(user), "meta": self._meta()}, status=201)

    def _fail_switch(self, request: Request, params: dict[str, str]) -> bytes:
        if request.method == b"POST":
            text = query_arg(request, "rate")
            rate = _parse_rate(text)
            if rate is None:
                message = f"rate must be a number from 0 to 1, got {text!r}"
                return _json_error(request, 400, message)
            self.fail_rate = rate
        return _json(request, {"fail_rate": self.fail_rate})

    def _meta(self) -> dict[str, str]:
        moment = datetime.fromtimestamp(self._clock.seconds(), tz=UTC)
        stamp = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"generated_at": stamp}


def _parse_rate(text: str | None) -> float | None:
    try:
        rate = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return rate if 0.0 <= rate <= 1.0 else None


def _user_json(user: DemoUser) -> dict[str, Any]:
    return {
        "id": user.id,
        "name": {"full": user.name},
        "email": user.email,
        "active": user.active,
    }


def _user_from_json(body: bytes, user_id: int) -> DemoUser:
    """A new user from a v2 JSON body; ValueError says what is wrong with it.

    Only the v2 shape is accepted: `{"name": {"full": ...}, "email": ...,
    "active": true}`, with `active` optional. A v1-shaped body (a plain
    string name, a `{"user": ...}` wrapper) is refused, as a real v2 service
    would: fitting old clients to the new contract is the gateway's job.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body must be JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"body must be a JSON object, got {type(data).__name__}")

    raw_name = data.get("name")
    name = raw_name.get("full") if isinstance(raw_name, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f'name must be {{"full": "..."}}, got {raw_name!r}')
    email = data.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise ValueError(f"email must be an e-mail address, got {email!r}")
    active = data.get("active", True)
    if not isinstance(active, bool):
        raise ValueError(f"active must be true or false, got {active!r}")
    return DemoUser(user_id, name.strip(), email.strip(), active)


def _json(request: Request, payload: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", _JSON)
    return orjson.dumps(payload)


def _json_error(request: Request, status: int, message: str) -> bytes:
    return _json(request, {"error": {"status": status, "message": message}}, status)
