"""Hold many idle keep-alive connections open against a server on 127.0.0.1.

Each connection sends one GET and reads the full answer, so the server has
done the per-connection work of a real client, then stays open and silent.
When all are open the script prints one JSON line (`{"open": N, ...}`) and
holds them until its standard input closes or `--hold` seconds pass, then
prints how many the server had closed meanwhile and exits.

    python3 benchmarks/idle_conns.py --port 8080 --count 5000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import threading
import time

BATCH = 200


def raise_fd_limit(needed: int) -> int:
    """Raise the soft open-file limit towards `needed`; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


async def open_one(
    port: int, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout=10
        )
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await asyncio.wait_for(reader.readexactly(length), timeout=10)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
        return None
    return reader, writer


async def hold(port: int, count: int, path: str, hold_seconds: float) -> None:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-User-Id: 1\r\n\r\n"
    ).encode()
    started = time.monotonic()
    conns = []
    failed = 0
    for first in range(0, count, BATCH):
        batch = min(BATCH, count - first)
        results = await asyncio.gather(*(open_one(port, request) for _ in range(batch)))
        for result in results:
            if result is None:
                failed += 1
            else:
                conns.append(result)
    ready = {
        "open": len(conns),
        "failed": failed,
        "seconds": round(time.monotonic() - started, 2),
    }
    print(json.dumps(ready), flush=True)

    loop = asyncio.get_running_loop()
    released = asyncio.Event()

    def wait_for_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(released.set)

    threading.Thread(target=wait_for_stdin, daemon=True).start()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(released.wait(), timeout=hold_seconds)

    closed_by_server = sum(1 for reader, _ in conns if reader.at_eof())
    for _, writer in conns:
        writer.close()
    print(json.dumps({"closed_by_server": closed_by_server}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--path", default="/")
    parser.add_argument("--hold", type=float, default=60.0, help="at most this long")
    args = parser.parse_args()
    if not 1 <= args.count <= 20_000:
        parser.error(f"--count {args.count}: expected 1 to 20000")
    raise_fd_limit(args.count + 256)
    asyncio.run(hold(args.port, args.count, args.path, args.hold))


if __name__ == "__main__":
    main()
