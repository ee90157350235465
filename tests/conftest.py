"""Shared fixtures: real echo backends and a real in-process gateway."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted

from strangler.reactor import install

# The gateway's own reactor, so in-process tests run the event loop that
# `strangler serve` runs (pytest-twisted accepts it: it is an epoll reactor).
# It must be installed before anything imports the global reactor.
install()

from support import Backend, RunningGateway, new_client, write_rules  # noqa: E402


@pytest.fixture
def backends() -> Iterator[Callable[[str], Backend]]:
    """Start named echo backends on demand; all are stopped after the test."""
    started: list[Backend] = []

    def start(name: str) -> Backend:
        backend = Backend(name)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        pytest_twisted.blockon(backend.stop())


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[[str], RunningGateway]]:
    """Start a gateway from rule-file text; it is drained and stopped after the test."""
    started: list[RunningGateway] = []

    def start(text: str) -> RunningGateway:
        running = RunningGateway(write_rules(tmp_path, text))
        started.append(running)
        return running

    yield start
    for running in started:
        pytest_twisted.blockon(running.stop())


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    """A treq client whose connections are closed after the test."""
    http, pool = new_client()
    yield http
    pytest_twisted.blockon(pool.closeCachedConnections())
