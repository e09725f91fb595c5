"""Ray executor overhead: the same audit through a server on the local executor and through
one on the Ray executor (a Ray head on this machine), per job, side by side.

A Ray head is started here (``ray start --head --block``, its own short temporary
directory, free ports, all of this machine's CPUs), then two ``cnp-server`` processes
(default engine, SQLite job store, MLflow tracking, pre-warmed workers): one with
``executor = "local"``, one with ``executor = "ray"`` on that head, whose job actors ask
for the cluster's CPUs as the local worker uses the machine's. Rounds alternate: the
small job (``bench.audits.SMALL`` on the watermark benchmark, or ``QUICK`` with
``--quick``) through the local server, then through the Ray server, each timed as
``cnp audit`` from spawn to exit; before each run the servers, their workers and the Ray
head are left to settle (untimed), so the next pre-warmed worker's imports and the last
job's MLflow record do not compete with it.

Target: Ray <= 1.1 x local + 1 s (medians). The job store's timestamps split each run
into queueing, the worker's run beyond the pipeline and the client's share. Ray's own
defaults stand: its workers run at nice 15 (``RAY_worker_niceness``), so on a shared
machine other programs take CPU from the Ray job before the local worker (measured:
with niceness 0 the quick job took as long on either).

``RayHead`` is also what the Ray executor's tests start.

    python -m bench.ray_overhead [--quick] [--rounds N]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import audits, common

FACTOR, ALLOWANCE = 1.1, 1.0
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A Ray head on this machine: ``ray start --head --block`` in its own temporary
    directory (short: Ray's unix socket paths must fit 107 bytes) on free loopback ports,
    without dashboard or usage stats. ``stop()`` ends it (SIGTERM to the blocking
    ``ray start``, which stops what it started) and removes the directory."""

    def __init__(self, num_cpus: int, pythonpath: Sequence[Path] = ()) -> None:
        self.num_cpus = num_cpus
        self.pythonpath = [str(p) for p in pythonpath]
        self.temp_dir = Path(tempfile.mkdtemp(prefix="cnp-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def log(self) -> str:
        path = self.temp_dir / "head.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 90.0) -> RayHead:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, env.get("PYTHONPATH", "")])
        command = [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            # Ray's fixed default ports (10001, 8265, 52365) would clash with another head.
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]  # fmt: skip
        log = (self.temp_dir / "head.log").open("a")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=common.REPO
        )
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not start:\n{self.log[-3000:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# ------------------------------------------------------------------ settling


def _tree_cpu_seconds(roots: Sequence[int]) -> float:
    """utime + stime of the processes ``roots`` and all their live descendants (Linux /proc)."""
    from .service_overhead import _stat

    cpu: dict[int, int] = {}
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(int(entry.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
        cpu[int(entry.name)] = int(fields[11]) + int(fields[12])
        children[int(fields[1])].append(int(entry.name))
    total, stack = 0, list(roots)
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def settle(roots: Sequence[int], timeout: float = 120.0, busy: float = 0.15) -> float:
    """Wait until the process trees ``roots`` use < ``busy`` of a core over 1 s (Ray's own
    processes tick along below that); the seconds waited."""
    began = time.monotonic()
    last = _tree_cpu_seconds(roots)
    while time.monotonic() - began < timeout:
        time.sleep(1.0)
        now = _tree_cpu_seconds(roots)
        if now - last < busy:
            break
        last = now
    return time.monotonic() - began


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` (a server started inside inherits them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------ the measurement


def _measure(quick: bool = False, *, rounds: int | None = None) -> common.BenchResult:
    from .service_overhead import Server, cnp_audit

    rounds = rounds or (1 if quick else 3)
    bench = audits.benchmark()
    spec = audits.job_spec(bench, quick)
    root = Path(bench.dataset).parent
    tmp = Path(tempfile.mkdtemp(prefix="cnp-bench-ray-"))
    head = RayHead(num_cpus=os.cpu_count() or 1)
    servers = {"local": Server(tmp / "local", [root]), "ray": Server(tmp / "ray", [root])}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    startup: dict[str, Any] = {}
    try:
        began = time.perf_counter()
        head.start()
        startup["ray_head"] = time.perf_counter() - began
        startup["local"] = servers["local"].start()
        with _environment(CNP_EXECUTOR="ray", CNP_RAY_ADDRESS=head.address):
            startup["ray"] = servers["ray"].start()
        assert head.process is not None
        roots = [s.process.pid for s in servers.values() if s.process] + [head.process.pid]
        startup["settled_all"] = settle(roots)
        counter = iter(range(1_000))
        for _ in range(rounds):
            for name, server in servers.items():
                n = next(counter)
                arguments = [
                    *audits.cli_arguments(spec),
                    "--request-id", f"bench-ray-{os.getpid()}-{n}",
                ]  # fmt: skip
                wall, report = cnp_audit(server, arguments, tmp / f"{name}-{n}.json")
                job = server.job(report["audit_id"])
                pipeline = sum(report.get("timings", {}).values())
                runs[name].append(
                    {
                        "wall": wall,
                        "audit_id": report["audit_id"],
                        "queued": job["started_at"] - job["created_at"],
                        "worker": job["finished_at"] - job["started_at"],
                        "pipeline": pipeline,
                        "client": wall - (job["finished_at"] - job["created_at"]),
                    }
                )
                settle(roots)  # untimed: the next spare's imports, the MLflow record
        ray_log = servers["ray"].data_dir / "server.log"
        in_ray = ray_log.read_text().count("started in a pre-warmed Ray actor")
    finally:
        for server in servers.values():
            server.stop()
        head.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    local = common.median([r["wall"] for r in runs["local"]])
    on_ray = common.median([r["wall"] for r in runs["ray"]])
    limit = FACTOR * local + ALLOWANCE

    def beyond(name: str) -> float:
        return common.median([r["queued"] + r["worker"] - r["pipeline"] for r in runs[name]])

    checks = [
        common.Check(
            "Ray / local executor, per job",
            on_ray / local,
            "<=",
            limit / local,
            note=f"{on_ray:.1f} vs {local:.1f} s; target = 1.1x + 1 s; beyond the pipeline "
            f"{beyond('ray'):.2f} vs {beyond('local'):.2f} s",
        )
    ]
    details: dict[str, Any] = {
        "seconds": {name: common.spread([r["wall"] for r in rs]) for name, rs in runs.items()},
        "overhead_seconds": on_ray - local,
        "limit_seconds": limit,
        "beyond_pipeline_median_seconds": {name: beyond(name) for name in runs},
        "startup_seconds": startup,
        "runs": runs,
        "ray_jobs_in_prewarmed_actors": in_ray,
        "rounds": rounds,
        "spec": audits.QUICK if quick else audits.SMALL,
    }
    title = "Ray executor overhead: cnp audit -> cnp-server -> Ray actor vs local worker"
    return common.BenchResult("ray_overhead", title, checks, details)


def run(quick: bool = False, write: bool = True, **options: Any) -> dict[str, Any]:
    """Measure, print the table, write ``bench/results/ray_overhead.json``."""
    return common.report(common.timed(_measure, quick=quick, **options), write)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (3)")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    run(args.quick, not args.no_write, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
