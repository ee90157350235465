"""Benchmark strangler side by side with nginx, HAProxy and a naive Twisted proxy.

    python3 benchmarks/run.py            # full run, a few minutes
    python3 benchmarks/run.py --quick    # smoke run, about a minute

Everything runs on 127.0.0.1 and is started and ended by this script: a fast
nginx backend, the reference proxies, and strangler in several rule-file
configurations (see `candidates.py`). The gateway under test is pinned to
core 0; wrk, the backends and this script share core 1. Candidates are
interleaved (A, B, C, then A, B, C again) and each figure is the median of
the runs. Ratios are to nginx `proxy_pass` measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import candidates as cands
import pyspy
import report
from procs import GroupSampler, OtherLoad, Processes, read_line
from wrk import WrkError, run_wrk

RESULTS = cands.HERE / "results"
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "taskset": "util-linux"}
SBIN = ("/usr/sbin", "/sbin")
LARGE_BODY_CONNECTIONS = 8
# Before each measurement, wait for other processes on the machine to use less
# than this share of one core (percent), for at most --quiet-wait seconds.
QUIET_LIMIT = 10.0
# A measurement during which they used more than this is taken again, up to
# ATTEMPTS times in all.
RETRY_LIMIT = 25.0
ATTEMPTS = 3


# -- settings -------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark strangler against nginx, HAProxy and twisted.web.proxy."
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--duration", type=int, help="seconds per measurement (10)")
    parser.add_argument("--runs", type=int, help="runs per candidate, median kept (3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (32)")
    parser.add_argument("--json", type=Path, help="raw results file")
    parser.add_argument(
        "--idle-connections", type=int, help="idle keep-alive connections (5000)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile strangler-plain with py-spy",
    )
    parser.add_argument(
        "--only", help="comma-separated candidate names for the main table"
    )
    parser.add_argument(
        "--soak",
        type=int,
        help=f"seconds of load on {cands.SOAK.name} while its memory is sampled "
        f"({cands.SOAK_SECONDS}; 10 with --quick; 0 to skip)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait for other processes to go quiet before each "
        "measurement (60; 0 to never wait)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=cands.REPO,
        help="run strangler from this checkout (default: the one holding benchmarks/)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never run apt-get; just say what"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs)"
    )
    args = parser.parse_args(argv)

    quick = args.quick
    args.duration = args.duration or (2 if quick else 10)
    args.runs = args.runs or (1 if quick else 3)
    args.side_duration = max(1, args.duration // 2)
    args.warmup = 1 if quick else 2
    args.idle_connections = args.idle_connections or (1000 if quick else 5000)
    if args.soak is None:
        args.soak = 10 if quick else cands.SOAK_SECONDS
    if not 0 <= args.soak <= 600:
        parser.error(f"--soak {args.soak}: expected 0 to 600 seconds")
    for name in ("duration", "runs", "connections", "idle_connections"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: expected at least 1")
    if args.duration > 120:
        parser.error(f"--duration {args.duration}: expected at most 120 seconds")
    if args.idle_connections > 10_000:
        parser.error(f"--idle-connections {args.idle_connections}: at most 10000")
    return args


# -- the machine ----------------------------------------------------------------


def ensure_tools(no_install: bool) -> None:
    """Install nginx, HAProxy and wrk with apt when missing (as root), or say how."""
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([path, *SBIN])
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    packages = sorted({TOOLS[tool] for tool in missing})
    command = "apt-get update && apt-get install -y " + " ".join(packages)
    if no_install or os.geteuid() != 0:
        sys.exit(f"missing {', '.join(missing)}; install them with:\n  sudo {command}")
    print(f"installing {', '.join(packages)} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)
    still = [tool for tool in TOOLS if shutil.which(tool) is None]
    if still:
        sys.exit(f"still missing after apt-get: {', '.join(still)}")


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": {tool: _version(tool) for tool in ("nginx", "haproxy", "wrk")},
    }


def _version(tool: str) -> str:
    flag = {"nginx": "-v", "haproxy": "-v", "wrk": "--version"}[tool]
    done = subprocess.run(
        [tool, flag], capture_output=True, text=True, timeout=10, check=False
    )
    return (done.stdout + done.stderr).strip().splitlines()[0]


def git_commit(source: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes to the gateway itself make the commit inexact.
        "strangler_dirty": bool(git("status", "--porcelain", "--", "strangler")),
    }


def raise_fd_limit() -> int:
    """Let this process and its children hold 5,000 connections and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return max(soft, wanted)


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT unwind as Ctrl-C, so every started process is ended.

    SIGINT is set explicitly because a shell starting this script in the
    background leaves it ignored.
    """

    def on_signal(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- measurements ---------------------------------------------------------------


class Bench:
    """One benchmark run: the lab, the settings and the results so far."""

    def __init__(self, args: argparse.Namespace, lab: cands.Lab, procs: Processes):
        self.args = args
        self.lab = lab
        self.procs = procs
        self.running: dict[str, cands.Running] = {}
        self.unavailable: dict[str, cands.Unavailable] = {}
        self.results: dict[str, Any] = {}
        self.others = OtherLoad(procs)

    def start_all(self, wanted: list[cands.Candidate]) -> None:
        for candidate in wanted:
            if candidate.name in self.running or candidate.name in self.unavailable:
                continue
            print(f"starting {candidate.name}", flush=True)
            started = self.lab.start(candidate)
            if isinstance(started, cands.Unavailable):
                self.unavailable[candidate.name] = started
                for feature, reason in started.missing.items():
                    print(f"  not available yet: {feature}: {reason}", flush=True)
            else:
                self.running[candidate.name] = started
                for feature, reason in started.missing.items():
                    print(f"  without {feature}: {reason}", flush=True)

    def wrk(
        self,
        running: cands.Running,
        label: str,
        *,
        duration: int,
        connections: int,
        path: str = cands.MEASURED_PATH,
        script: str = "users.lua",
    ) -> dict[str, Any]:
        """One measurement, repeated (a bounded number of times) if others interfered.

        A measurement during which other processes used more than
        `RETRY_LIMIT` percent of a core is taken again, up to `ATTEMPTS` times
        in all; the record keeps how busy the others were, so a figure that
        stayed noisy is visible in the table.
        """
        for attempt in range(1, ATTEMPTS + 1):
            record = self._measure(
                running,
                label,
                duration=duration,
                connections=connections,
                path=path,
                script=script,
            )
            record["attempt"] = attempt
            if record["other_cpu_percent"] <= RETRY_LIMIT:
                break
        return record

    def _measure(
        self,
        running: cands.Running,
        label: str,
        *,
        duration: int,
        connections: int,
        path: str,
        script: str,
    ) -> dict[str, Any]:
        """One wrk run, with the candidate's RSS and CPU and the others' CPU."""
        cpus = self.lab.cpus(running.candidate.load_cpus)
        before = self.others.wait_for_quiet(QUIET_LIMIT, self.args.quiet_wait)
        self.others.start()
        with GroupSampler(running.pgid) as usage:
            result = run_wrk(
                self.procs,
                running.url(path),
                connections=connections,
                duration=duration,
                cpus=cpus,
                script=cands.LUA / script,
            )
        others = self.others.percent()
        if running.access_log is not None and running.access_log.exists():
            # Bounded disk use: the gateway appends, so truncating is safe.
            os.truncate(running.access_log, 0)
        print(
            report.progress(label, running.candidate.name, result, others), flush=True
        )
        return {
            **result.as_dict(),
            "rss_kib_max": max(usage.rss_kib, default=0),
            "cpu_percent": round(usage.cpu_percent, 1),
            "other_cpu_percent": round(others, 1),
            "other_cpu_before_percent": round(before, 1),
        }

    def interleaved(
        self, names: list[str], step: str, **wrk_args: Any
    ) -> dict[str, Any]:
        """Every run goes through all candidates in turn: A, B, C, A, B, C..."""
        table: dict[str, Any] = {name: {"runs": []} for name in names}
        for run in range(self.args.runs):
            for name in names:
                label = f"{step} {run + 1}/{self.args.runs}"
                record = self.wrk(self.running[name], label, **wrk_args)
                table[name]["runs"].append(record)
        return table

    def throughput(self, wanted: list[cands.Candidate]) -> None:
        args = self.args
        names = [c.name for c in wanted if c.name in self.running]
        self.results["idle_rss_kib"] = {
            name: self.running[name].rss_kib() for name in names
        }
        for name in names:
            # A warm-up is thrown away, so interference does not matter here.
            self._measure(
                self.running[name],
                "warm-up",
                duration=args.warmup,
                connections=args.connections,
                path=cands.MEASURED_PATH,
                script="users.lua",
            )
        self.results["throughput"] = self.interleaved(
            names, "run", duration=args.duration, connections=args.connections
        )

    def latency(self) -> None:
        names = [c.name for c in cands.LATENCY if c.name in self.running]
        self.results["latency_c1"] = self.interleaved(
            names, "c1", duration=self.args.side_duration, connections=1
        )

    def large_bodies(self) -> None:
        names = [c.name for c in cands.LARGE_BODIES if c.name in self.running]
        cases = {
            "post_1mib": ("/upload", "post_1mib.lua"),
            "get_1mib": ("/big", "users.lua"),
        }
        self.results["large_bodies"] = {
            case: self.interleaved(
                names,
                case,
                duration=self.args.side_duration,
                connections=LARGE_BODY_CONNECTIONS,
                path=path,
                script=script,
            )
            for case, (path, script) in cases.items()
        }

    def soak(self) -> None:
        """Load the hanging-shadow gateway for a while; its RSS, second by second.

        Every copy it makes hangs until the shadow's timeout, so anything a
        copy leaves behind would show as memory that keeps growing.
        """
        running = self.running.get(cands.SOAK.name)
        seconds = self.args.soak
        if running is None or not seconds:
            return
        self.others.wait_for_quiet(QUIET_LIMIT, self.args.quiet_wait)
        self.others.start()
        with GroupSampler(running.pgid, interval=1.0) as usage:
            result = run_wrk(
                self.procs,
                running.url(),
                connections=self.args.connections,
                duration=seconds,
                cpus=self.lab.cpus(running.candidate.load_cpus),
                script=cands.LUA / "users.lua",
            )
        others = self.others.percent()
        if running.access_log is not None and running.access_log.exists():
            os.truncate(running.access_log, 0)
        print(report.progress("soak", running.candidate.name, result, others))
        self.results["soak"] = {
            "candidate": running.candidate.name,
            "seconds": seconds,
            **result.as_dict(),
            "rss_kib": usage.rss_kib,
            "cpu_percent": round(usage.cpu_percent, 1),
            "other_cpu_percent": round(others, 1),
        }

    def idle_connections(self) -> None:
        count = self.args.idle_connections
        table: dict[str, Any] = {}
        for candidate in cands.IDLE_CONNECTIONS:
            running = self.running.get(candidate.name)
            if running is None:
                continue
            before = running.rss_kib()
            argv = [
                sys.executable, str(cands.HERE / "idle_conns.py"),
                "--port", str(running.port), "--count", str(count),
                "--path", cands.MEASURED_PATH, "--hold", "120",
            ]  # fmt: skip
            holder = self.procs.start(
                f"idle-{candidate.name}",
                argv,
                stdin=subprocess.PIPE,
                capture_stdout=True,
            )
            ready: dict[str, Any] = {}
            try:
                ready.update(json.loads(read_line(holder, timeout=120)))
                time.sleep(1.0)
                held = running.rss_kib()
            finally:
                assert holder.popen.stdin is not None
                holder.popen.stdin.close()
                with contextlib.suppress(TimeoutError, RuntimeError, ValueError):
                    ready.update(json.loads(read_line(holder, timeout=30)))
                self.procs.stop(holder)
            table[candidate.name] = {
                "rss_before_kib": before,
                "rss_held_kib": held,
                **ready,
            }
            print(
                f"idle {candidate.name}: {ready['open']} open, RSS "
                f"{before / 1024:.1f} -> {held / 1024:.1f} MiB",
                flush=True,
            )
        self.results["idle_connections"] = {"count": count, "candidates": table}

    def profile(self, stamp: str) -> None:
        running = self.running.get(cands.STRANGLER_PLAIN.name)
        if running is None:
            return
        seconds = max(5, self.args.duration)
        outputs = {}
        try:
            for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
                out = RESULTS / f"{stamp}-profile.{suffix}"
                outputs[fmt] = self._profile_once(running, seconds, out, fmt)
            summary = pyspy.summarise(outputs["raw"])
        except RuntimeError as exc:
            # The measurements are done; a profiler problem must not lose them.
            print(f"profile skipped: {exc}", file=sys.stderr)
            self.results["profile_error"] = str(exc)
            return
        self.results["profile"] = {
            "candidate": running.candidate.name,
            "seconds": seconds,
            "collapsed": str(outputs["raw"]),
            "flamegraph": str(outputs["flamegraph"]),
            "samples": summary.samples,
            "self_time": summary.self_time,
            "inclusive": summary.inclusive,
            "by_file": summary.by_file,
            "by_line": summary.by_line,
        }

    def _profile_once(
        self, running: cands.Running, seconds: int, out: Path, fmt: str
    ) -> Path:
        """py-spy records while wrk loads the gateway for a little longer."""
        self.others.wait_for_quiet(QUIET_LIMIT, self.args.quiet_wait)
        load_cpus = self.lab.cpus("load")
        argv = [
            "wrk", "-t1", f"-c{self.args.connections}", f"-d{seconds + 4}s",
            "-s", str(cands.LUA / "users.lua"), running.url(),
        ]  # fmt: skip
        if load_cpus is not None:
            argv = ["taskset", "-c", load_cpus, *argv]
        load = self.procs.start(f"profile-load-{fmt}", argv)
        try:
            time.sleep(1.0)
            return pyspy.record(self.procs, running.pgid, seconds, out, fmt, load_cpus)
        finally:
            self.procs.stop(load)


# -- the run --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools(args.no_install)
    fd_limit = raise_fd_limit()
    pin = (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    else:
        print("fewer than 2 CPUs: nothing is pinned, figures are not comparable")

    # The gateway code is read when the candidates start: record it then.
    commit = git_commit(args.source)
    started_at = dt.datetime.now(dt.UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    json_path = args.json or RESULTS / f"{stamp}.json"
    workdir = Path(tempfile.mkdtemp(prefix="strangler-bench-"))
    workdir.chmod(0o755)
    procs = Processes(workdir)
    lab = cands.Lab(procs, workdir, pin, source=args.source.resolve())

    main_table = list(cands.THROUGHPUT)
    if args.only:
        names = {name.strip() for name in args.only.split(",")}
        unknown = names - {c.name for c in main_table}
        if unknown:
            known = ", ".join(c.name for c in main_table)
            sys.exit(f"--only: unknown candidate(s) {sorted(unknown)}; known: {known}")
        main_table = [c for c in main_table if c.name in names or c is cands.NGINX]

    bench = Bench(args, lab, procs)
    try:
        with terminated_as_interrupt():
            lab.start_backends()
            side = [*cands.LATENCY, *cands.LARGE_BODIES, *cands.IDLE_CONNECTIONS]
            bench.start_all(main_table + ([] if args.only else side))
            bench.throughput(main_table)
            bench.soak()
            if not args.only:
                bench.latency()
                bench.large_bodies()
                bench.idle_connections()
            if args.profile:
                bench.profile(stamp)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except (WrkError, RuntimeError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"logs kept in {workdir}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        procs.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    results = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python3", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "source": str(args.source.resolve()),
        **commit,
        "machine": machine(),
        "pinning": report.pinning(pin),
        "settings": {
            "duration_s": args.duration,
            "side_duration_s": args.side_duration,
            "warmup_s": args.warmup,
            "runs": args.runs,
            "connections": args.connections,
            "idle_connections": args.idle_connections,
            "soak_s": args.soak,
            "quiet_limit_percent": QUIET_LIMIT,
            "quiet_wait_s": args.quiet_wait,
            "retry_limit_percent": RETRY_LIMIT,
            "attempts": ATTEMPTS,
            "fd_limit": fd_limit,
        },
        "large_body_connections": LARGE_BODY_CONNECTIONS,
        "candidates": report.describe(main_table, bench.running, bench.unavailable),
        **bench.results,
    }
    results["summary"] = report.summary(results)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(report.render(results))
    print(f"\nraw results: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
