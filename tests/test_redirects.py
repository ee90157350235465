"""Undoing a prefix rewrite on `Location` (strangler.proxy.redirects), without sockets."""

from __future__ import annotations

import pytest

from strangler.model import Rewrite, Target
from strangler.proxy.redirects import restore_location, restore_prefix

TARGET = Target("http://127.0.0.1:9101", "http", "127.0.0.1", 9101)


@pytest.mark.parametrize(
    ("prefix", "to", "upstream_path", "client_path"),
    [
        ("/api/v1/users", "/api/v2/users", "/api/v2/users/6", "/api/v1/users/6"),
        ("/api/v1/users", "/api/v2/users", "/api/v2/users", "/api/v1/users"),
        ("/api/v1/users", "/api/v2/users", "/api/v2/usersearch", None),
        ("/api/v1/users", "/api/v2/users", "/elsewhere", None),
        ("/legacy", "", "/orders/5", "/legacy/orders/5"),
        ("/api", "/", "/x", "/api/x"),
        ("/api/v1/", "/api/v2/", "/api/v2/users", "/api/v1/users"),
    ],
)
def test_restore_prefix_inverts_the_rewrite(
    prefix: str, to: str, upstream_path: str, client_path: str | None
) -> None:
    rewrite = Rewrite(to=to, prefix=prefix)
    assert restore_prefix(rewrite, upstream_path) == client_path
    if client_path is not None and upstream_path != "/x":
        assert rewrite.apply(client_path) == upstream_path


@pytest.mark.parametrize(
    ("location", "restored"),
    [
        (b"/api/v2/users/6", b"/api/v1/users/6"),
        (b"/api/v2/users/6?tab=1#top", b"/api/v1/users/6?tab=1#top"),
        (b"http://shop.example/api/v2/users/6", b"http://shop.example/api/v1/users/6"),
        (b"https://SHOP.example/api/v2/users", b"https://SHOP.example/api/v1/users"),
        (b"http://127.0.0.1:9101/api/v2/users/6", b"/api/v1/users/6"),
        (
            b"http://other.example/api/v2/users/6",
            b"http://other.example/api/v2/users/6",
        ),
        (b"//shop.example/api/v2/users/6", b"//shop.example/api/v2/users/6"),
        (b"/orders/1", b"/orders/1"),
        (b"users/6", b"users/6"),
    ],
)
def test_restore_location_maps_paths_and_known_hosts_only(
    location: bytes, restored: bytes
) -> None:
    rewrite = Rewrite(to="/api/v2/users", prefix="/api/v1/users")
    headers = [(b"Content-Type", b"text/plain"), (b"Location", location)]

    result = restore_location(headers, rewrite, b"shop.example", TARGET)

    assert result == [(b"Content-Type", b"text/plain"), (b"Location", restored)]
    assert headers[1] == (b"Location", location)  # the input list is not changed


def test_headers_without_location_come_back_as_they_were() -> None:
    rewrite = Rewrite(to="/api/v2", prefix="/api/v1")
    headers = [(b"Content-Location", b"/api/v2/x")]
    assert restore_location(headers, rewrite, None, TARGET) is headers
