"""Processes the benchmark starts: each in its own group, pinned, always ended.

Every server and load generator is started through a `Processes` registry so
that one `close()` (called on normal exit, on error and on Ctrl-C) ends every
process group it ever started, whatever state the run was left in.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KILL_GRACE = 3.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpus: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` run under `taskset -c cpus`, or as is when pinning is off."""
    if cpus is None:
        return list(argv)
    return ["taskset", "-c", cpus, *argv]


@dataclass
class Started:
    """A process group leader the registry owns, with where its output went."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, limit: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-limit:]


@dataclass
class Processes:
    """Starts process groups and guarantees they are all ended."""

    workdir: Path
    started: list[Started] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        capture_stdout: bool = False,
    ) -> Started:
        """Start `argv` in a new session; its output goes to `<name>.log`.

        With `capture_stdout`, standard output is a pipe for the caller to read
        (see `read_line`) and only standard error goes to the log.
        """
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=stdin,
                stdout=subprocess.PIPE if capture_stdout else log,
                stderr=log if capture_stdout else subprocess.STDOUT,
                start_new_session=True,
            )
        started = Started(name, popen, log_path)
        self.started.append(started)
        return started

    def run(
        self, argv: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a bounded command to completion, killing its group on timeout."""
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started = Started(argv[0], popen, None)  # type: ignore[arg-type]
        self.started.append(started)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(started)
            out, err = popen.communicate()
            err += f"\n(killed after {timeout:.0f}s)"
        finally:
            if started in self.started:
                self.started.remove(started)
        return subprocess.CompletedProcess(list(argv), popen.returncode, out, err)

    def stop(self, started: Started) -> None:
        """End one process group: SIGTERM, then SIGKILL after a short grace."""
        _end_group(started.popen)
        if started in self.started:
            self.started.remove(started)

    def close(self) -> None:
        """End every group still running, newest first."""
        while self.started:
            self.stop(self.started[-1])


def _end_group(popen: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if popen.poll() is not None:
        # The leader is gone; children it left in the group must go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=KILL_GRACE)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=KILL_GRACE)


def wait_http(
    started: Started,
    port: int,
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    deadline: float = 15.0,
) -> None:
    """Block until `GET path` on 127.0.0.1:port answers, or raise with the log."""
    until = time.monotonic() + deadline
    last_error = "no answer"
    while time.monotonic() < until:
        if started.popen.poll() is not None:
            raise RuntimeError(
                f"{started.name} exited with {started.popen.returncode} "
                f"before answering:\n{started.log_tail()}"
            )
        try:
            status = http_get(port, path, headers)[0]
        except OSError as exc:
            last_error = str(exc)
        else:
            if status < 500:
                return
            last_error = f"status {status}"
        time.sleep(0.1)
    raise RuntimeError(
        f"{started.name} did not answer on 127.0.0.1:{port}{path} within "
        f"{deadline:.0f}s ({last_error}):\n{started.log_tail()}"
    )


def http_get(
    port: int, path: str = "/", headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET to 127.0.0.1:port; returns status, headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def group_usage(pgid: int) -> tuple[int, float]:
    """Resident memory (KiB) and CPU time used so far (s) by group `pgid`."""
    rss = 0
    ticks = 0
    for pid in group_pids(pgid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        # After the command name: state(0) ... utime(11) stime(12).
        fields = stat.rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
                break
    return rss, ticks / CLOCK_TICKS


def group_rss_kib(pgid: int) -> int:
    """Resident memory of every process in group `pgid`, in KiB."""
    return group_usage(pgid)[0]


class GroupSampler:
    """Samples a process group's RSS, and its CPU use, while a measurement runs."""

    def __init__(self, pgid: int, interval: float = 0.25) -> None:
        self.pgid = pgid
        self.interval = interval
        self.rss_kib: list[int] = []
        self.cpu_percent = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> GroupSampler:
        self._started = time.monotonic()
        self._cpu_start = group_usage(self.pgid)[1]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        elapsed = time.monotonic() - self._started
        cpu = group_usage(self.pgid)[1] - self._cpu_start
        self.cpu_percent = 100.0 * cpu / elapsed if elapsed > 0 else 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.rss_kib.append(group_usage(self.pgid)[0])
            self._stop.wait(self.interval)


class OtherLoad:
    """CPU used by processes this benchmark did not start (other people's tests).

    The machine may be shared: a test suite running beside the benchmark takes
    CPU from the candidates and makes them look slower. This measures it as
    all user and system CPU time of the machine minus what the benchmark's own
    processes used, in percent of one core. Kernel time spent in interrupts
    is left out on both sides.
    """

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self._at = 0.0
        self._machine = 0.0
        self._ours = 0.0

    def start(self) -> None:
        self._at = time.monotonic()
        self._machine = _machine_cpu_seconds()
        self._ours = self._our_cpu_seconds()

    def percent(self) -> float:
        """Other processes' CPU since `start()`, as percent of one core."""
        elapsed = time.monotonic() - self._at
        if elapsed <= 0:
            return 0.0
        machine = _machine_cpu_seconds() - self._machine
        ours = self._our_cpu_seconds() - self._ours
        return max(0.0, 100.0 * (machine - ours) / elapsed)

    def wait_for_quiet(self, limit: float, timeout: float, probe: float = 0.5) -> float:
        """Wait (at most `timeout` s) until others use under `limit` %; return it."""
        until = time.monotonic() + timeout
        while True:
            self.start()
            time.sleep(probe)
            load = self.percent()
            if load < limit or time.monotonic() >= until:
                return load

    def _our_cpu_seconds(self) -> float:
        total = sum(group_usage(s.pid)[1] for s in list(self.procs.started))
        own = os.times()
        # This script, plus children it has already reaped (finished wrk runs).
        return total + own.user + own.system + own.children_user + own.children_system


def _machine_cpu_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system = (int(v) for v in fields[1:4])
    return (user + nice + system) / CLOCK_TICKS


def read_line(started: Started, timeout: float) -> str:
    """The next line `started` prints on its captured stdout, within `timeout`."""
    stdout = started.popen.stdout
    assert stdout is not None, f"{started.name} was not started with capture_stdout"
    until = time.monotonic() + timeout
    buffer = b""
    while not buffer.endswith(b"\n"):
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{started.name} printed nothing within {timeout:.0f}s")
        ready, _, _ = select.select([stdout], [], [], remaining)
        if ready:
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"{started.name} exited:\n{started.log_tail()}")
            buffer += chunk
    return buffer.decode()
