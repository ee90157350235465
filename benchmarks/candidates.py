"""What is measured: the backend, the reference proxies and strangler's configs.

A strangler configuration is a list of features. Each `Feature` adds lines to
the rule file (or arguments to `strangler serve`) and may carry a probe that
proves it works on the running gateway. Before a candidate is measured, the
`Lab` drops every feature that `strangler check` refuses or whose probe fails,
and records why; a candidate that loses a feature it *requires* is reported
as "not available yet" instead of being measured without it. So the table
always says what each row really had, and a feature that lands later shows up
in the next run without touching this file.

To add a feature: write its `Feature` (rule-file lines, optional probe) into
`FEATURES`, and name it in the candidates that should have it.
"""

from __future__ import annotations

import os
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from procs import (
    Processes,
    Started,
    free_port,
    group_pids,
    group_rss_kib,
    http_get,
    pinned,
    wait_http,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEMPLATES = HERE / "templates"
LUA = HERE / "lua"

MEASURED_PATH = "/api/v1/users/42"
API_KEY = "bench-key-0123456789"
ADMIN_TOKEN = "bench-admin-token"  # noqa: S105 - a throwaway local gateway's
REQUEST_HEADERS = {"X-User-Id": "100007", "X-Api-Key": API_KEY}

# About 205 bytes, like a small REST answer.
BACKEND_JSON = (
    '{"id":42,"name":"Ada Lovelace","email":"ada@example.com",'
    '"roles":["admin","editor"],"active":true,"created_at":"2024-01-15T09:30:00Z",'
    '"meta":{"version":3,"source":"legacy-monolith","region":"local"},'
    '"tags":["a","b","c"]}'
)
BIG_BODY_BYTES = 1024 * 1024
# The never-answering shadow target exits on its own after this long.
HANG_LIFETIME = 3 * 3600


# -- features -------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeContext:
    """What a probe may look at: the running gateway and the lab around it."""

    port: int
    admin_port: int
    access_log: Path
    shadow_port: int
    pgid: int
    hang_count: Path | None = None


Probe = Callable[[ProbeContext], str | None]


@dataclass(frozen=True)
class Feature:
    """A piece of gateway configuration and how to tell that it works.

    `top` is rule-file YAML added at the top level, `route` is YAML added to
    the route every measured request takes (`routes_itself` when it says where
    that route goes, so no `to:` is added), `serve_args` are extra arguments
    to `strangler serve`. The probe returns None when the feature works on the
    running gateway, or what it saw instead.
    """

    name: str
    top: str = ""
    route: str = ""
    serve_args: tuple[str, ...] = ()
    probe: Probe | None = None
    routes_itself: bool = False


def _requests(
    port: int, count: int, headers: dict[str, str] | None = None
) -> list[int]:
    hdrs = REQUEST_HEADERS if headers is None else headers
    return [http_get(port, MEASURED_PATH, hdrs)[0] for _ in range(count)]


def _probe_access_log(ctx: ProbeContext) -> str | None:
    _requests(ctx.port, 3)
    until = time.monotonic() + 3
    while time.monotonic() < until:
        if ctx.access_log.exists() and ctx.access_log.stat().st_size > 0:
            return None
        time.sleep(0.1)
    return f"no access-log lines reached {ctx.access_log.name}"


def _probe_metrics(ctx: ProbeContext) -> str | None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        status, _, body = http_get(ctx.admin_port, "/metrics", headers)
    except OSError as exc:
        return f"admin API /metrics did not answer ({exc})"
    if status != 200 or b"# TYPE" not in body:
        return f"admin API /metrics answered {status} without Prometheus text"
    return None


def _probe_api_key(ctx: ProbeContext) -> str | None:
    without = _requests(ctx.port, 1, {"X-User-Id": "1"})[0]
    with_key = _requests(ctx.port, 1)[0]
    if without != 401 or with_key != 200:
        return f"expected 401 without a key and 200 with it, got {without}/{with_key}"
    return None


def shadow_requests_seen(port: int) -> int:
    """Requests the shadow backend has served so far (nginx stub_status)."""
    body = http_get(port, "/__requests")[2].decode()
    return int(body.splitlines()[2].split()[2])


def _probe_shadow(ctx: ProbeContext) -> str | None:
    before = shadow_requests_seen(ctx.shadow_port)
    _requests(ctx.port, 10)
    until = time.monotonic() + 3
    copies = 0
    while time.monotonic() < until:
        # Each look at the counter is itself one request: subtract it.
        copies = shadow_requests_seen(ctx.shadow_port) - before - 1
        if copies >= 10:
            return None
        before += 1
        time.sleep(0.1)
    return f"rule accepted, but only {copies} of 10 copies reached the shadow backend"


def hang_accepted(count_file: Path) -> int:
    """Connections the never-answering shadow target has accepted so far."""
    try:
        return int(count_file.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _probe_shadow_hang(ctx: ProbeContext) -> str | None:
    if ctx.hang_count is None:
        return "the never-answering shadow target was not started"
    before = hang_accepted(ctx.hang_count)
    statuses = _requests(ctx.port, 10)
    if statuses != [200] * 10:
        return f"clients got {sorted(set(statuses))} with a hanging shadow"
    until = time.monotonic() + 3
    while time.monotonic() < until:
        if hang_accepted(ctx.hang_count) > before:
            return None
        time.sleep(0.1)
    return "rule accepted, but no copy reached the never-answering shadow target"


def _probe_workers(ctx: ProbeContext) -> str | None:
    pids = group_pids(ctx.pgid)
    if len(pids) < 2:
        return f"accepted, but only {len(pids)} gateway process is running"
    return None


FEATURES: dict[str, Feature] = {
    feature.name: feature
    for feature in (
        Feature("routing"),
        Feature(
            "access_log",
            top='access_log: {path: "${access_log}"}',
            probe=_probe_access_log,
        ),
        Feature(
            "sticky_split",
            route=(
                "    split:\n"
                "      - {to: monolith, weight: 50}\n"
                "      - {to: users, weight: 50}\n"
                "    sticky: {by: header, name: X-User-Id}"
            ),
            routes_itself=True,
        ),
        Feature(
            "metrics",
            top="admin: {listen: 127.0.0.1:${admin_port}, token: ${admin_token}}",
            probe=_probe_metrics,
        ),
        Feature(
            "api_key",
            top=(
                "consumers:\n"
                "  bench: {api_keys: [${api_key}]}\n"
                "auth:\n"
                "  api_key: {header: X-Api-Key}"
            ),
            route="    auth: api_key",
            probe=_probe_api_key,
        ),
        Feature(
            "rate_limit",
            route="    rate_limit: {rate: 1000000/s, burst: 1000000, per: ip}",
        ),
        Feature(
            "shadow",
            route="    shadow: {to: mirror, percent: 100}",
            probe=_probe_shadow,
        ),
        Feature(
            "shadow_hang",
            route="    shadow: {to: hang, percent: 100}",
            probe=_probe_shadow_hang,
        ),
        Feature("workers_2", serve_args=("--workers", "2"), probe=_probe_workers),
    )
}


# -- candidates -----------------------------------------------------------------

PROXY, ALL = "proxy", "all"


@dataclass(frozen=True)
class Candidate:
    """One thing to measure. `kind` says how to start it."""

    name: str
    kind: str
    label: str
    features: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    cpus: str = PROXY
    load_cpus: str = "load"

    @property
    def is_strangler(self) -> bool:
        return self.kind == "strangler"


DIRECT = Candidate("direct", "backend", "backend nginx, no proxy")
NGINX = Candidate("nginx", "nginx", "nginx proxy_pass, upstream keepalive, 1 worker")
HAPROXY = Candidate("haproxy", "haproxy", "HAProxy 1 thread, http-reuse always")
NAIVE = Candidate("twisted-naive", "naive", "twisted.web.proxy.ReverseProxyResource")


def _strangler(
    name: str, features: tuple[str, ...], required: tuple[str, ...] = (), **kw: str
) -> Candidate:
    return Candidate(
        name, "strangler", "strangler", ("routing", *features), required, **kw
    )


STRANGLER_BARE = _strangler("strangler-bare", ())
STRANGLER_PLAIN = _strangler("strangler-plain", ("access_log",))
STRANGLER_SPLIT = _strangler("strangler-split", ("sticky_split",), ("sticky_split",))
STRANGLER_FULL = _strangler(
    "strangler-full",
    ("sticky_split", "access_log", "metrics", "api_key", "rate_limit"),
    ("sticky_split", "access_log"),
)
STRANGLER_SHADOW = _strangler("strangler-shadow", ("access_log", "shadow"), ("shadow",))
# The same shadow, to a target that accepts and never answers: every copy
# hangs until the shadow's timeout, and the client's path must not notice.
STRANGLER_SHADOW_HANG = _strangler(
    "strangler-shadow-hang", ("access_log", "shadow_hang"), ("shadow_hang",)
)
STRANGLER_WORKERS = _strangler(
    "strangler-workers2",
    ("access_log", "workers_2"),
    ("workers_2",),
    cpus=ALL,
    load_cpus=ALL,
)

# The main table, in the order every run goes through them.
THROUGHPUT = (
    DIRECT,
    NGINX,
    HAPROXY,
    NAIVE,
    STRANGLER_BARE,
    STRANGLER_PLAIN,
    STRANGLER_SPLIT,
    STRANGLER_FULL,
    STRANGLER_SHADOW,
    STRANGLER_SHADOW_HANG,
    STRANGLER_WORKERS,
)
# Measured against strangler-plain in the same run: what a shadow costs.
SHADOW_COST = (STRANGLER_SHADOW, STRANGLER_SHADOW_HANG)
SHADOW_BASE = STRANGLER_PLAIN
# Loaded for a minute while RSS is sampled: memory must not grow.
SOAK = STRANGLER_SHADOW_HANG
SOAK_SECONDS = 60
# Added latency at one connection, against DIRECT.
LATENCY = (DIRECT, NGINX, HAPROXY, STRANGLER_PLAIN, STRANGLER_FULL)
# 1 MiB bodies each way, and 5,000 idle keep-alive connections.
LARGE_BODIES = (NGINX, HAPROXY, NAIVE, STRANGLER_PLAIN)
IDLE_CONNECTIONS = (NGINX, HAPROXY, STRANGLER_PLAIN)


# -- starting them --------------------------------------------------------------


@dataclass
class Running:
    """A started candidate: where it listens and which process group it is."""

    candidate: Candidate
    port: int
    started: Started
    features: tuple[str, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)
    access_log: Path | None = None

    @property
    def pgid(self) -> int:
        return self.started.pid

    def url(self, path: str = MEASURED_PATH) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def rss_kib(self) -> int:
        return group_rss_kib(self.pgid)


@dataclass
class Unavailable:
    """A candidate that cannot be measured with this gateway yet, and why."""

    candidate: Candidate
    missing: dict[str, str]


def render(template: str, **values: object) -> str:
    """Fill `${name}` placeholders; a missing value is an error, not a blank."""
    text = (TEMPLATES / template).read_text()
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


class Lab:
    """Starts candidates in one work directory against one shared backend."""

    def __init__(
        self, procs: Processes, workdir: Path, pin: bool, source: Path = REPO
    ) -> None:
        self.procs = procs
        self.workdir = workdir
        self.pin = pin
        self.source = source
        self.backend_port = 0
        self.shadow_port = 0
        self.hang_port = 0
        self.hang_count: Path | None = None
        self._backend: Started | None = None
        self._admin_ports: dict[str, int] = {}
        self._serve_help: str | None = None
        self._checked: dict[tuple[str, ...], str | None] = {}

    def cpus(self, role: str) -> str | None:
        """The CPU list for a role: gateway on core 0, load and backends on 1."""
        if not self.pin:
            return None
        return {"proxy": "0", "load": "1", "all": "0,1"}[role]

    def start_backends(self) -> None:
        """The backend every candidate proxies to, and a second one for shadows."""
        static = self._dir("static")
        (static / "big").write_bytes(b"b" * BIG_BODY_BYTES)
        (static / "big").chmod(0o644)
        self.backend_port = self._start_nginx("backend", "backend-nginx.conf", static)
        self.shadow_port = self._start_nginx("shadow", "backend-nginx.conf", static)
        self._start_hang_server()

    def _start_hang_server(self) -> None:
        """The shadow target that never answers, on the load core."""
        port = free_port()
        count = self.workdir / "hang.count"
        count.unlink(missing_ok=True)
        argv = [
            sys.executable, str(HERE / "hang_server.py"), "--listen", str(port),
            "--count-file", str(count), "--lifetime", str(HANG_LIFETIME),
        ]  # fmt: skip
        started = self.procs.start("hang", pinned(self.cpus("load"), argv))
        until = time.monotonic() + 15
        while not count.exists():
            if started.popen.poll() is not None or time.monotonic() > until:
                raise RuntimeError(f"hang server did not start:\n{started.log_tail()}")
            time.sleep(0.05)
        self.hang_port, self.hang_count = port, count

    def start(self, candidate: Candidate) -> Running | Unavailable:
        if candidate.kind == "backend":
            assert self._backend is not None, "start_backends() comes first"
            return Running(candidate, self.backend_port, self._backend)
        if candidate.kind == "nginx":
            port = self._start_nginx(candidate.name, "proxy-nginx.conf")
            return Running(candidate, port, self.procs.started[-1])
        if candidate.kind == "haproxy":
            return self._start_haproxy(candidate)
        if candidate.kind == "naive":
            return self._start_naive(candidate)
        return self._start_strangler(candidate)

    # -- nginx, HAProxy, the naive proxy ----------------------------------------

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(mode=0o755, exist_ok=True)
        path.chmod(0o755)
        return path

    def _start_nginx(self, name: str, template: str, static: Path | None = None) -> int:
        home = self._dir(name)
        port = free_port()
        conf = home / "nginx.conf"
        conf.write_text(
            render(
                template,
                dir=home,
                port=port,
                backend_port=self.backend_port,
                json=BACKEND_JSON,
                static=static or home,
            )
        )
        role = "load" if template.startswith("backend") else "proxy"
        argv = [
            "nginx", "-p", str(home), "-c", str(conf), "-e", str(home / "error.log"),
            "-g", "daemon off;",
        ]  # fmt: skip
        started = self.procs.start(name, pinned(self.cpus(role), argv))
        wait_http(started, port, "/")
        if name == "backend":
            self._backend = started
        return port

    def _start_haproxy(self, candidate: Candidate) -> Running:
        home = self._dir(candidate.name)
        port = free_port()
        conf = home / "haproxy.cfg"
        conf.write_text(
            render("haproxy.cfg", port=port, backend_port=self.backend_port)
        )
        argv = ["haproxy", "-db", "-f", str(conf)]
        started = self.procs.start(
            candidate.name, pinned(self.cpus(candidate.cpus), argv)
        )
        wait_http(started, port, MEASURED_PATH)
        return Running(candidate, port, started)

    def _start_naive(self, candidate: Candidate) -> Running:
        port = free_port()
        argv = [
            sys.executable, str(HERE / "naive_proxy.py"),
            "--listen", str(port), "--upstream", str(self.backend_port),
        ]  # fmt: skip
        started = self.procs.start(
            candidate.name, pinned(self.cpus(candidate.cpus), argv)
        )
        wait_http(started, port, MEASURED_PATH)
        return Running(candidate, port, started)

    # -- strangler -------------------------------------------------------------

    def _start_strangler(self, candidate: Candidate) -> Running | Unavailable:
        """Start with every feature that works; a gateway that crashes is reported."""
        try:
            return self._start_working_features(candidate)
        except RuntimeError as exc:
            return Unavailable(candidate, {"gateway": first_problem(str(exc))})

    def _start_working_features(self, candidate: Candidate) -> Running | Unavailable:
        missing: dict[str, str] = {}
        wanted = []
        for name in candidate.features:
            reason = self._cli_supports(FEATURES[name])
            if reason is None:
                wanted.append(name)
            else:
                missing[name] = reason
        wanted = self._checked_features(candidate, tuple(wanted), missing)

        for _attempt in range(2):
            if any(name in missing for name in candidate.required):
                return Unavailable(candidate, missing)
            running = self._launch_strangler(candidate, tuple(wanted))
            failed = self._probe(running)
            if not failed:
                running.missing = missing
                return running
            self.procs.stop(running.started)
            missing.update(failed)
            wanted = [name for name in wanted if name not in failed]
        raise RuntimeError(f"{candidate.name}: probes keep failing: {missing}")

    def _cli_supports(self, feature: Feature) -> str | None:
        if not feature.serve_args:
            return None
        if self._serve_help is None:
            done = self._strangler_cli(["serve", "--help"])
            self._serve_help = done.stdout + done.stderr
        flag = feature.serve_args[0]
        if flag not in self._serve_help:
            return f"`strangler serve` has no {flag} option"
        return None

    def _checked_features(
        self, candidate: Candidate, wanted: tuple[str, ...], missing: dict[str, str]
    ) -> list[str]:
        """The features `strangler check` accepts, together and one by one."""
        if self._check(candidate.name, wanted) is None:
            return list(wanted)
        kept = []
        for name in wanted:
            alone = ("routing",) if name == "routing" else ("routing", name)
            problem = self._check(candidate.name, alone)
            if problem is None:
                kept.append(name)
            else:
                missing[name] = f"`strangler check` refuses it: {problem}"
        problem = self._check(candidate.name, tuple(kept))
        if problem is not None:
            raise RuntimeError(f"{candidate.name}: rule file refused: {problem}")
        return kept

    def _check(self, name: str, features: tuple[str, ...]) -> str | None:
        if features not in self._checked:
            path = self._write_rules(f"check-{name}", features, port=free_port())
            done = self._strangler_cli(["check", str(path)])
            self._checked[features] = (
                None if done.returncode == 0 else first_problem(done.stderr)
            )
        return self._checked[features]

    def _write_rules(self, name: str, features: tuple[str, ...], port: int) -> Path:
        top, route, routes_itself = [], [], False
        for feature in (FEATURES[f] for f in features):
            if feature.top:
                top.append(feature.top)
            if feature.route:
                route.append(feature.route)
            routes_itself = routes_itself or feature.routes_itself
        if "access_log" not in features:
            top.append("access_log: false")
        route_text = ""
        if route:
            head = ["  - name: users-v1", "    match: {path: /api/v1/users}"]
            if not routes_itself:
                head.append("    to: monolith")
            route_text = "\n".join(head + route)
        values = {
            "access_log": self.workdir / f"{name}-access.log",
            "admin_port": self._admin_port(name),
            "admin_token": ADMIN_TOKEN,
            "api_key": API_KEY,
        }
        text = render(
            "strangler.yaml",
            port=port,
            backend_port=self.backend_port,
            shadow_port=self.shadow_port,
            hang_port=self.hang_port,
            top=string.Template("\n".join(top)).substitute(values),
            route=route_text,
        )
        path = self.workdir / f"{name}.yaml"
        path.write_text(text)
        return path

    def _admin_port(self, name: str) -> int:
        if name not in self._admin_ports:
            self._admin_ports[name] = free_port()
        return self._admin_ports[name]

    def _launch_strangler(
        self, candidate: Candidate, features: tuple[str, ...]
    ) -> Running:
        port = free_port()
        rules = self._write_rules(candidate.name, features, port)
        serve_args: list[str] = []
        for name in features:
            serve_args += FEATURES[name].serve_args
        argv = [
            sys.executable, "-m", "strangler.cli", "serve", str(rules),
            "--listen", f"127.0.0.1:{port}", *serve_args,
        ]  # fmt: skip
        access_log = self.workdir / f"{candidate.name}-access.log"
        access_log.unlink(missing_ok=True)
        started = self.procs.start(
            candidate.name,
            pinned(self.cpus(candidate.cpus), argv),
            cwd=self.source,
            env=self._env(),
        )
        wait_http(started, port, MEASURED_PATH, REQUEST_HEADERS)
        return Running(
            candidate,
            port,
            started,
            features=features,
            access_log=access_log if "access_log" in features else None,
        )

    def _probe(self, running: Running) -> dict[str, str]:
        ctx = ProbeContext(
            port=running.port,
            admin_port=self._admin_port(running.candidate.name),
            access_log=self.workdir / f"{running.candidate.name}-access.log",
            shadow_port=self.shadow_port,
            pgid=running.pgid,
            hang_count=self.hang_count,
        )
        failed = {}
        for name in running.features:
            probe = FEATURES[name].probe
            if probe is not None:
                problem = probe(ctx)
                if problem is not None:
                    failed[name] = problem
        return failed

    def _env(self) -> dict[str, str]:
        """Run strangler from `source`, whatever is installed."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.source), env.get("PYTHONPATH", "")) if p
        )
        return env

    def _strangler_cli(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "strangler.cli", *args]
        return subprocess.run(
            argv,
            cwd=self.source,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def first_problem(output: str) -> str:
    """The line of a failed command's output that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return "failed without a message"
    if "Traceback (most recent call last):" in lines:
        return f"crashed: {lines[-1]}"
    return lines[0]
