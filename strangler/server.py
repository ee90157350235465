"""Running a gateway: listen, reload on change, drain on shutdown.

`GatewayServer` owns one `Gateway` and its listening port. It is given the
reactor and a rule loader, so tests start it on port 0 inside the test's
reactor and the CLI starts it on the global one. Reloads are atomic: a new
state is built from a file that validated, or nothing changes at all.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater

from strangler.errors import ConfigError, RuleProblem
from strangler.gateway import Gateway
from strangler.logs import AccessLog, open_access_log
from strangler.model import Address, Rules
from strangler.proxy import transports
from strangler.proxy.downstream import GatewayFactory
from strangler.rules import admin_token_required
from strangler.runtime_weights import RuntimeWeights, default_state_path

log = structlog.get_logger("strangler")

WATCH_INTERVAL = 1.0
# After the drain, the longest wait for closing connections to send what they
# still hold (a client that stopped reading does not hold up the exit longer).
FLUSH_LIMIT = 1.0


@dataclass
class ReloadResult:
    """What the last reload attempt did, for the log and the admin API."""

    ok: bool
    at: float
    errors: list[str]
    source: str


def listen_tcp(
    reactor: Any, address: Address, factory: Any, backlog: int = 1024
) -> Any:
    """Listen on `address`, IPv4 or IPv6."""
    return transports.listen_tcp(
        reactor, address.port, factory, backlog=backlog, interface=address.host
    )


class GatewayServer:
    """A gateway bound to a port, with live reload and graceful drain."""

    def __init__(
        self,
        rules: Rules,
        reactor: Any,
        loader: Callable[[Path], Rules],
        access_log: AccessLog | None = None,
        listen_override: Address | None = None,
        state_path: Path | None = None,
        admin_override: Address | None = None,
    ) -> None:
        self.reactor = reactor
        self.loader = loader
        self.listen_override = listen_override
        if listen_override is not None:
            rules = replace(rules, listen=listen_override)
        if access_log is None and rules.access_log.enabled:
            access_log = open_access_log(rules.access_log.path, reactor)
        self.access_log = access_log
        self.admin_override = admin_override
        self.state_path = state_path or default_state_path(rules.source)
        self.runtime = RuntimeWeights(self.state_path)
        self._state_fingerprint = _fingerprint(self.state_path)
        self.gateway = Gateway(
            rules, reactor, access_log=access_log, runtime=self.runtime
        )
        self.port: Any = None
        self.admin_port: Any = None
        self.migrations: Any = None  # a MigrationRunner once the admin API starts
        self.last_reload = ReloadResult(True, reactor.seconds(), [], str(rules.source))
        self._fingerprint = _fingerprint(rules.source)
        self._watcher: LoopingCall | None = None
        self._state_watcher: LoopingCall | None = None
        self._stopping: defer.Deferred[None] | None = None

    @property
    def rules(self) -> Rules:
        return self.gateway.rules

    def start(self, inherited_fd: int | None = None) -> Address:
        """Listen (or serve a socket a supervisor bound); returns the address."""
        tls = self.rules.tls
        factory: Any = GatewayFactory(self.gateway, b"https" if tls else b"http")
        if tls is not None:
            from strangler.security.tls import tls_factory

            factory = tls_factory(tls, factory)
        if inherited_fd is not None:
            import socket

            family = socket.socket(fileno=socket.dup(inherited_fd)).family
            self.port = transports.adopt_stream_port(
                self.reactor, inherited_fd, family, factory
            )
        else:
            self.port = listen_tcp(self.reactor, self.rules.listen, factory)
        bound = self.port.getHost()
        log.info("listening", address=f"{bound.host}:{bound.port}")
        _warn_inactive(self.rules)
        return Address(bound.host, bound.port)

    def start_admin(self) -> Address | None:
        """Start the admin API if the rules configure one; returns its address."""
        admin = self.rules.admin
        if admin is None:
            return None
        address = self.admin_override or admin.listen
        if admin.token is None and not address.is_loopback:
            # `strangler check` refuses this already; an override can still get here.
            problem = RuleProblem(
                str(self.rules.source),
                admin.line,
                "admin.token",
                admin_token_required(address),
            )
            raise ConfigError([problem])
        from strangler.admin.api import build_admin_site

        self.admin_port = listen_tcp(self.reactor, address, build_admin_site(self))
        self.start_migrations()
        bound = self.admin_port.getHost()
        log.info("admin_listening", address=f"{bound.host}:{bound.port}")
        return Address(bound.host, bound.port)

    def start_migrations(self) -> None:
        """Run migration plans in this process (the one serving the admin API).

        Plans saved beside the runtime weights are taken up where they were.
        """
        from strangler.migration.runner import MigrationRunner
        from strangler.migration.state import MigrationStore, migrations_path

        store = MigrationStore(migrations_path(self.state_path))
        self.migrations = MigrationRunner(self.gateway, self.reactor, store)
        self.migrations.run()

    def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Poll the rule file for changes and reload when its content changes."""
        self._watcher = self._poll(self._check_file, interval)

    def follow_state(self, interval: float = WATCH_INTERVAL) -> None:
        """Poll the runtime state file and apply weights other processes wrote.

        Independent of `watch`: under `--no-watch` the rule file changes only
        on SIGHUP, but a `strangler shift` answered by worker 0 or a migration
        plan step must still reach every worker.
        """
        self._state_watcher = self._poll(self._check_state_file, interval)

    def _poll(self, check: Callable[[], None], interval: float) -> LoopingCall:
        def guarded() -> None:
            # An exception would stop the LoopingCall, and the polling, for good.
            try:
                check()
            except Exception:
                log.exception("watch_failed", check=check.__name__)

        call = LoopingCall(guarded)
        call.clock = self.reactor
        call.start(interval, now=False)
        return call

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads; SIGTERM and SIGINT drain and stop the reactor."""

        def on_hup(_signum: int, _frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        def on_term(_signum: int, _frame: Any) -> None:
            self.reactor.callFromThread(self._drain_and_stop)

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)

    def reload(self) -> ReloadResult:
        """Load the rule file again; keep the current rules if it is not valid.

        Anything that goes wrong, in checking the file or in building the
        new state from it, refuses the reload and leaves the running rules
        alone. The runtime state file is read again too, so SIGHUP brings a
        process up to date on both.
        """
        source = self.rules.source
        self._fingerprint = _fingerprint(source)
        self._check_state_file()
        try:
            rules = self.loader(source)
        except ConfigError as exc:
            return self._refused([str(problem) for problem in exc.problems])
        except OSError as exc:
            return self._refused([f"{source}: cannot read rule file: {exc.strerror}"])
        except Exception as exc:
            return self._refused([f"{source}: cannot load the rules: {exc}"], exc)
        if self.listen_override is not None:
            rules = replace(rules, listen=self.listen_override)
        if rules.listen != self.rules.listen:
            log.warning(
                "listen_change_ignored",
                current=str(self.rules.listen),
                requested=str(rules.listen),
                hint="restart the gateway to change the listening address",
            )
            rules = replace(rules, listen=self.rules.listen)
        try:
            self.gateway.apply(rules)
        except Exception as exc:
            return self._refused(
                [f"{source}: cannot put the rules in force: {exc}"], exc
            )
        _warn_inactive(rules)
        self.gateway.metrics.reloads["ok"] += 1
        self.last_reload = ReloadResult(True, self.reactor.seconds(), [], str(source))
        log.info("reloaded", source=str(source), routes=len(rules.routes))
        return self.last_reload

    def _refused(
        self, errors: list[str], exc: BaseException | None = None
    ) -> ReloadResult:
        """Record a refused reload; `exc` is a failure of the gateway's own."""
        source = str(self.rules.source)
        self.gateway.metrics.reloads["error"] += 1
        self.last_reload = ReloadResult(False, self.reactor.seconds(), errors, source)
        log.error("reload_refused", source=source, errors=errors, exc_info=exc)
        return self.last_reload

    def _check_file(self) -> None:
        current = _fingerprint(self.rules.source)
        if current != self._fingerprint:
            self.reload()

    def _check_state_file(self) -> None:
        state = _fingerprint(self.state_path)
        if state != self._state_fingerprint:
            self._state_fingerprint = state
            self._follow_state_file()

    def _follow_state_file(self) -> None:
        """Pick up runtime weights another process (worker 0, a plan) wrote."""
        fresh = RuntimeWeights(self.state_path)
        if fresh.overrides == self.runtime.overrides:
            return
        kept, self.runtime.overrides = self.runtime.overrides, fresh.overrides
        try:
            self.gateway.apply(self.rules)
        except Exception:
            self.runtime.overrides = kept
            log.exception("runtime_weights_not_followed", path=str(self.state_path))
            return
        log.info("runtime_weights_followed", path=str(self.state_path))

    def stop(self, drain_timeout: float | None = None) -> defer.Deferred[None]:
        """Stop accepting, let requests in flight finish (bounded), then close."""
        if self._stopping is not None:
            return self._stopping
        for watcher in (self._watcher, self._state_watcher):
            if watcher is not None and watcher.running:
                watcher.stop()
        if self.migrations is not None:
            self.migrations.stop()
        timeout = self.rules.drain_timeout if drain_timeout is None else drain_timeout
        self._stopping = defer.ensureDeferred(self._drain(timeout))
        return self._stopping

    async def _drain(self, timeout: float) -> None:
        self.gateway.draining = True
        if self.port is not None:
            await self.port.stopListening()
        connections = self.gateway.connections
        for conn in list(connections):
            if conn.current is None and conn.incoming is None:
                conn.transport.loseConnection()
        deadline = self.reactor.seconds() + timeout
        while any(c.current is not None for c in connections):
            if self.reactor.seconds() >= deadline:
                log.warning("drain_timeout", open_requests=len(connections))
                break
            await _sleep(self.reactor, 0.05)
        for conn in list(connections):
            conn.transport.loseConnection()
        # A closing connection first sends what is still buffered, the end of
        # answers already given; stopping the reactor now would drop it.
        flushed_by = self.reactor.seconds() + FLUSH_LIMIT
        while connections and self.reactor.seconds() < flushed_by:
            await _sleep(self.reactor, 0.01)
        # The admin API stays up until here so load balancers see 503 on /health.
        if self.admin_port is not None:
            await self.admin_port.stopListening()
        self.gateway.close()
        if self.access_log is not None:
            self.access_log.close()

    def _drain_and_stop(self) -> None:
        log.info("draining", timeout=self.rules.drain_timeout)
        done = self.stop()
        done.addBoth(lambda _: self.reactor.stop())


def _sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def inactive_features(rules: Rules) -> list[tuple[str, str]]:
    """(route, key) pairs the rules use that this version parses but does not act on."""
    found: list[tuple[str, str]] = []
    return found


def _warn_inactive(rules: Rules) -> None:
    for route, key in inactive_features(rules):
        log.warning(
            "feature_not_active",
            route=route,
            key=key,
            detail="accepted by the rule file but not acted on yet; "
            "see docs/limitations.md",
        )


def _fingerprint(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None
