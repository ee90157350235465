"""`strangler serve --workers N`: one process per core sharing one listening socket.

The parent binds the public socket once and hands it to N worker processes,
each running its own reactor and gateway on the inherited socket, so the
kernel spreads connections across them. The parent only supervises: it
restarts a worker that dies, forwards SIGHUP (reload) and SIGTERM/SIGINT
(drain) to every worker, and exits when they have all stopped.

Only worker 0 serves the admin API. The others follow its runtime weight
changes through the state file they all watch (`docs/limitations.md` lists
what is still per worker).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from strangler.model import Rules

RESTART_PAUSE = 0.5
MAX_RESTART_PAUSE = 30.0
STABLE_AFTER = 10.0
POLL_INTERVAL = 0.1
EXTRA_STOP_TIME = 5.0


def _event(name: str, **fields: Any) -> None:
    """One JSON line on stdout, like the workers' own logs."""
    record = {"event": name, "level": "info", **fields}
    record["timestamp"] = datetime.now(UTC).isoformat()
    print(json.dumps(record), flush=True)


def bind_listener(rules: Rules, listen_override: str | None) -> socket.socket:
    """Bind and listen on the public address once, for every worker to share."""
    host, port = rules.listen.host, rules.listen.port
    if listen_override:
        text_host, _, text_port = listen_override.rpartition(":")
        host, port = text_host.strip("[]") or "127.0.0.1", int(text_port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    # Every worker waits on this socket; non-blocking so that the ones that
    # lose the race for a connection get EAGAIN instead of hanging in accept.
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def _ignore_hangup() -> None:
    """In a new worker, before it runs: a SIGHUP forwarded while it starts is moot.

    A worker reads the rule file as it starts and installs its own SIGHUP
    handler before it says it listens; until then the default action would
    kill it, so the signal is ignored instead (the disposition survives exec).
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class RestartBackoff:
    """How long to wait before starting again a worker that died.

    A worker that ran for `stable_after` seconds is restarted after `first`;
    one that dies again sooner than that waits twice as long as the last
    time, up to `limit`, so a worker that cannot start (a rule file broken
    since, a port taken) costs a log line now and then instead of a busy
    loop of processes.
    """

    __slots__ = ("first", "limit", "pause", "stable_after")

    def __init__(
        self,
        first: float = RESTART_PAUSE,
        limit: float = MAX_RESTART_PAUSE,
        stable_after: float = STABLE_AFTER,
    ) -> None:
        self.first = first
        self.limit = limit
        self.stable_after = stable_after
        self.pause = 0.0

    def after_exit(self, lived: float) -> float:
        """The pause before the next start of a worker that lived `lived` seconds."""
        if lived >= self.stable_after or not self.pause:
            self.pause = self.first
        else:
            self.pause = min(self.pause * 2, self.limit)
        return self.pause


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(
        self,
        rules_path: Path,
        rules: Rules,
        count: int,
        sock: socket.socket,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules_path = rules_path
        self.rules = rules
        self.count = count
        self.sock = sock
        self.clock = clock
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.backoff = {index: RestartBackoff() for index in range(count)}
        self.restart_due: dict[int, tuple[float, int]] = {}
        self.stopping = False
        self.restarts = 0
        self.extra_args: list[str] = []

    def command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "strangler.cli",
            "serve",
            str(self.rules_path),
            "--worker-fd",
            str(self.sock.fileno()),
            "--worker-index",
            str(index),
            *self.extra_args,
        ]

    def start_worker(self, index: int) -> None:
        self.workers[index] = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.command(index),
            pass_fds=(self.sock.fileno(),),
            preexec_fn=_ignore_hangup,  # safe here: the supervisor runs no threads
        )
        self.started_at[index] = self.clock()

    def run(self) -> int:
        signal.signal(signal.SIGHUP, lambda *_: self.forward(signal.SIGHUP))
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        for index in range(self.count):
            self.start_worker(index)
        host, port = self.sock.getsockname()[:2]
        _event("listening", address=f"{host}:{port}", workers=self.count)
        while not self.tick():
            time.sleep(POLL_INTERVAL)
        return 0

    def tick(self) -> bool:
        """One look at the workers: note the dead, restart the due; True when done."""
        now = self.clock()
        for index, process in list(self.workers.items()):
            code = process.poll()
            if code is None:
                continue
            del self.workers[index]
            if self.stopping:
                continue
            lived = now - self.started_at.get(index, now)
            pause = self.backoff[index].after_exit(lived)
            _event("worker_exited", worker=index, exit_code=code, restart_in=pause)
            self.restart_due[index] = (now + pause, code)
        for index, (due, code) in list(self.restart_due.items()):
            if self.stopping or now < due:
                continue
            del self.restart_due[index]
            self.restarts += 1
            self.start_worker(index)
            _event("worker_restarted", worker=index, exit_code=code)
        return self.stopping and not self.workers

    def forward(self, signum: int) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signum)

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.restart_due.clear()
        self.sock.close()
        self.forward(signal.SIGTERM)
        deadline = time.monotonic() + self.rules.drain_timeout + EXTRA_STOP_TIME
        for process in self.workers.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.wait(remaining)
            except subprocess.TimeoutExpired:
                process.kill()


def run_workers(
    rules_path: Path,
    rules: Rules,
    count: int,
    listen: str | None,
    watch: bool = True,
    state: str | None = None,
) -> int:
    """Entry point for `strangler serve --workers N` (N >= 2)."""
    try:
        sock = bind_listener(rules, listen)
    except OSError as exc:
        print(f"cannot listen on {rules.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    supervisor = Supervisor(rules_path, rules, count, sock)
    if not watch:
        supervisor.extra_args.append("--no-watch")
    if state is not None:
        # Every worker must follow the same state file, so each gets the path.
        supervisor.extra_args += ["--state", state]
    return supervisor.run()
