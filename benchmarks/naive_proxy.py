"""The naive baseline: `twisted.web.proxy.ReverseProxyResource` and nothing else.

This is what a Twisted reverse proxy costs when written the obvious way: a
`twisted.web` server whose resource opens a fresh HTTP/1.0 connection upstream
for every request. The benchmark runs it to show how far strangler is from it.

    python3 benchmarks/naive_proxy.py --listen 8000 --upstream 9000
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.web import proxy, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--upstream", type=int, required=True, help="port on 127.0.0.1")
    args = parser.parse_args()

    reactor: Any = global_reactor
    resource = proxy.ReverseProxyResource("127.0.0.1", args.upstream, b"")
    site = server.Site(resource)
    reactor.listenTCP(args.listen, site, backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
