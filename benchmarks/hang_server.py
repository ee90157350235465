"""A shadow target that never answers: accepts, reads, and holds every connection.

The benchmark points a 100% shadow at it to show that a shadow service that
hangs costs the client's path nothing. It listens on 127.0.0.1 only, keeps at
most `--max-connections` connections (the oldest is closed past that), and
exits on its own after `--lifetime` seconds even if nobody stops it. After
each accepted connection it rewrites `--count-file` with the number accepted
so far (0 as soon as it listens), which is how the benchmark knows it is up
and its probe sees copies arrive.

    python3 benchmarks/hang_server.py --listen 9300 --count-file /tmp/hang.count
"""

from __future__ import annotations

import argparse
import selectors
import socket
import time
from collections import OrderedDict
from pathlib import Path

READ_SIZE = 65536


def serve(
    port: int, count_file: Path | None, lifetime: float, max_connections: int
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    held: OrderedDict[socket.socket, None] = OrderedDict()
    accepted = 0
    deadline = time.monotonic() + lifetime
    if count_file is not None:
        count_file.write_text("0\n")  # also says: listening now

    def drop(conn: socket.socket) -> None:
        selector.unregister(conn)
        held.pop(conn, None)
        conn.close()

    while (remaining := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(timeout=min(remaining, 1.0)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                held[conn] = None
                accepted += 1
                if len(held) > max_connections:
                    drop(next(iter(held)))
                if count_file is not None:
                    count_file.write_text(f"{accepted}\n")
                continue
            try:
                data = sock.recv(READ_SIZE)
            except OSError:
                data = b""
            if not data:
                # The gateway gave up on this copy (its shadow timeout).
                drop(sock)
    for conn in list(held):
        drop(conn)
    listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--count-file", type=Path, help="where to write the count")
    parser.add_argument(
        "--lifetime", type=float, default=3600.0, help="exit after this many seconds"
    )
    parser.add_argument(
        "--max-connections", type=int, default=4096, help="connections held at most"
    )
    args = parser.parse_args()
    serve(args.listen, args.count_file, args.lifetime, args.max_connections)


if __name__ == "__main__":
    main()
