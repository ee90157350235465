"""Running the real `strangler` command as a subprocess, the way a user does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

COMMAND = [sys.executable, "-m", "strangler.cli"]
START_LIMIT = 20.0


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run one short strangler command and capture its output."""
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


class ServeProcess:
    """`strangler serve RULES` in the background; knows its port once it listens."""

    def __init__(
        self, rules: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.process = subprocess.Popen(
            [*COMMAND, "serve", str(rules), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self.wants_admin = "admin:" in rules.read_text() and "--workers" not in args
        self.port = self._wait_for_listening()

    def _wait_for_listening(self) -> int:
        """Read the log until the gateway (and its admin API, if any) listens."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_LIMIT
        port = None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            self.events.append(event)
            if event.get("event") == "listening":
                port = int(event["address"].rsplit(":", 1)[1])
            admin_ready = not self.wants_admin or any(
                e.get("event") == "admin_listening" for e in self.events
            )
            if port is not None and admin_ready:
                return port
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        stderr = self.process.stderr.read().decode() if self.process.stderr else ""
        self.stop()
        raise RuntimeError(f"strangler serve did not start: {stderr}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_bytes(self) -> int:
        """The highest resident memory the process has had (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return self.process.returncode


class EventTail:
    """Keeps reading a `ServeProcess`'s JSON log lines after start-up, in a thread.

    Every process of `serve --workers N` writes to the same stdout, so this
    sees the events of all workers; reading also keeps the pipe from filling.
    """

    def __init__(self, serve: ServeProcess) -> None:
        self.events: list[dict[str, Any]] = list(serve.events)
        self._thread = threading.Thread(
            target=self._read, args=(serve.process.stdout,), daemon=True
        )
        self._thread.start()

    def _read(self, stream: Any) -> None:
        try:
            for line in iter(stream.readline, b""):
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    continue
        except (OSError, ValueError):
            return  # the stream was closed by `ServeProcess.stop`

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == name]
