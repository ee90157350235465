"""Count the instructions strangler executes per proxied request (callgrind).

    python3 benchmarks/instructions.py                  # bare, plain and full
    python3 benchmarks/instructions.py --only full --requests 4000

Wall-clock figures on a shared machine drift by tens of percent between
runs; an instruction count under valgrind's callgrind does not, so it is the
measure to use while working on the hot path. The gateway runs under
`valgrind --tool=callgrind` against the benchmark's nginx backend on
127.0.0.1; after a warm-up the counters are zeroed, a fixed number of
keep-alive GETs is sent from this process (8 connections, the same request
shape as `users.lua`), the counters are dumped, and the total is divided by
the number of requests. Kernel time is not counted: a change that saves
system calls shows in `run.py`'s figures, not here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from candidates import API_KEY, MEASURED_PATH, REPO, Lab
from procs import Processes, free_port, wait_http

CONNECTIONS = 8
WARM_UP = 400
STARTUP_DEADLINE = 120.0  # python under valgrind starts slowly

UPSTREAMS = """
upstreams:
  monolith:
    targets: [http://127.0.0.1:{backend}]
  users:
    targets: [http://127.0.0.1:{backend}]
default: monolith
"""

CONFIGS = {
    "bare": """
listen: 127.0.0.1:{port}
access_log: false
{upstreams}
routes:
  - name: orders-v2
    match: {{path: /api/v2/orders}}
    to: users
""",
    "plain": """
listen: 127.0.0.1:{port}
access_log: {{path: {log}}}
{upstreams}
routes:
  - name: orders-v2
    match: {{path: /api/v2/orders}}
    to: users
""",
    "full": """
listen: 127.0.0.1:{port}
access_log: {{path: {log}}}
admin: {{listen: 127.0.0.1:{admin}, token: instructions-token}}
consumers:
  bench: {{api_keys: [{key}]}}
auth:
  api_key: {{header: X-Api-Key}}
{upstreams}
routes:
  - name: users-v1
    match: {{path: /api/v1/users}}
    auth: api_key
    rate_limit: {{rate: 1000000/s, burst: 1000000, per: ip}}
    split:
      - {{to: monolith, weight: 50}}
      - {{to: users, weight: 50}}
    sticky: {{by: header, name: X-User-Id}}
""",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="counted (2000)")
    parser.add_argument("--only", help="comma-separated: bare, plain, full")
    return parser.parse_args()


def require_tools() -> None:
    missing = [t for t in ("valgrind", "callgrind_control", "nginx") if not _has(t)]
    if missing:
        sys.exit(
            f"missing: {', '.join(missing)}; "
            "install with: apt-get install -y valgrind nginx"
        )


def _has(tool: str) -> bool:
    return shutil.which(tool) is not None or any(
        Path(folder, tool).exists() for folder in ("/usr/sbin", "/sbin")
    )


async def _one_connection(port: int, count: int, first: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        for n in range(first, first + count):
            user = 100000 + n * 7919 % 1000003
            writer.write(
                f"GET {MEASURED_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"X-User-Id: {user}\r\nX-Api-Key: {API_KEY}\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            ok += head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return ok


def drive(port: int, requests: int) -> int:
    """Send `requests` GETs over CONNECTIONS keep-alive connections; count 200s."""
    each = requests // CONNECTIONS

    async def run() -> int:
        counts = await asyncio.wait_for(
            asyncio.gather(
                *(_one_connection(port, each, k * each) for k in range(CONNECTIONS))
            ),
            timeout=600,
        )
        return sum(counts)

    return asyncio.run(run())


def count(
    procs: Processes, workdir: Path, name: str, backend: int, requests: int
) -> float:
    port, admin = free_port(), free_port()
    rules = workdir / f"{name}.yaml"
    rules.write_text(
        CONFIGS[name].format(
            port=port,
            admin=admin,
            key=API_KEY,
            log=workdir / f"{name}.access.log",
            upstreams=UPSTREAMS.format(backend=backend),
        )
    )
    out = workdir / f"callgrind.{name}"
    argv = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, "-m", "strangler", "serve", str(rules), "--no-watch",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = procs.start(f"gateway-{name}", argv, cwd=REPO, env=env)
    headers = {"X-Api-Key": API_KEY}
    wait_http(started, port, MEASURED_PATH, headers, deadline=STARTUP_DEADLINE)
    drive(port, WARM_UP)

    pid = str(started.pid)
    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
    answered = drive(port, requests)
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    procs.stop(started)
    if answered != requests // CONNECTIONS * CONNECTIONS:
        sys.exit(f"{name}: only {answered} of {requests} requests got 200")
    return _total(out) / answered


def _total(out: Path) -> int:
    """The instruction total of the dump taken after the measured requests."""
    until = time.monotonic() + 30
    while time.monotonic() < until:
        dumps = sorted(out.parent.glob(out.name + ".*"))
        for dump in dumps:
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        time.sleep(0.2)
    sys.exit(f"no callgrind dump found next to {out}")


def main() -> None:
    args = parse_args()
    require_tools()
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration(s): {', '.join(unknown)}")
    workdir = Path(tempfile.mkdtemp(prefix="strangler-instructions-"))
    procs = Processes(workdir)
    try:
        lab = Lab(procs, workdir, pin=False)
        lab.start_backends()
        print("| configuration | instructions per request |")
        print("|---|---|")
        for name in names:
            per_request = count(procs, workdir, name, lab.backend_port, args.requests)
            print(f"| {name} | {per_request:,.0f} |", flush=True)
    finally:
        procs.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
