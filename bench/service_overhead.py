"""Service overhead: one audit through CLI + server + worker + MLflow vs the in-process pipeline.

A real ``cnp-server`` (default engine, SQLite job store, MLflow tracking in its data
directory, one worker process per job, pre-warmed unless ``CNP_PREWARM_WORKERS=false``)
is started once; its start-up (process start to health SERVING, then until its
background warm-up imports, its own and its spare worker's, have settled) is measured on
its own. Then, alternating round by round, the same small job (``bench.audits.SMALL`` on
the watermark benchmark) runs

- in-process: ``cnp_core.pipeline.run_audit`` called in this process (warmed up once);
- through the service: the ``cnp audit`` console script as a subprocess, timed from
  spawn to exit (CLI start-up, submit, handing the job to a worker, the audit, watching,
  fetching the report and writing it); before the next round the server (and the next
  spare worker's imports) is left to settle, untimed, as at start-up;
- for the breakdown only: in a fresh process (``python -m bench.audit_job``), what a
  worker pays without the service around it (imports, cold kernels).

Target: service <= 1.15 x in-process + 2 s (medians). The job store's timestamps split
the service time into queueing, the worker's run and the client's share, and the time
until the job's MLflow record is written (in the background, after the job ends) is
reported beside it.

    python -m bench.service_overhead [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import audits, common

FACTOR, ALLOWANCE = 1.15, 2.0
BIN = Path(sys.executable).parent


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live children, in seconds (Linux /proc).

    The children count because the server's pre-warmed worker imports torch there.
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(int(entry.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _wait_serving(address: str, deadline: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


class Server:
    """``cnp-server`` on a free loopback port with its own data directory."""

    def __init__(self, data_dir: Path, roots: list[Path]) -> None:
        self.data_dir, self.roots = data_dir, roots
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout: float = 120.0) -> dict[str, float]:
        """Start it; return seconds to SERVING and to settled (warm-up import done)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(BIN / "cnp-server"),
            "--listen", "127.0.0.1:0",
            "--data-dir", str(self.data_dir),
            *[arg for root in self.roots for arg in ("--allow-root", str(root))],
        ]  # fmt: skip
        log = (self.data_dir / "server.log").open("a")
        began = time.perf_counter()
        deadline = time.monotonic() + timeout
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=common.REPO
        )
        info = self.data_dir / "server.json"
        while not self.address:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"cnp-server exited: {(self.data_dir / 'server.log').read_text()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("cnp-server did not write server.json")
            try:
                data = json.loads(info.read_text())
            except (FileNotFoundError, json.JSONDecodeError):  # not (fully) written yet
                data = {}
            if data.get("pid") == self.process.pid:
                self.address = data["address"]
            time.sleep(0.05)
        _wait_serving(self.address, deadline)
        serving = time.perf_counter() - began
        # The server imports the pipeline in the background after it starts serving (and
        # its pre-warmed worker does too): wait until they are idle so jobs find it settled.
        self.settle(deadline)
        return {"serving": serving, "settled": time.perf_counter() - began - 1.0}

    def settle(self, deadline: float) -> None:
        """Wait until the server and its workers use < 5 % of a core over 1 s."""
        assert self.process is not None
        last = _cpu_seconds(self.process.pid)
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = _cpu_seconds(self.process.pid)
            if now - last < 0.05:
                break
            last = now

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def job(self, audit_id: str) -> dict[str, Any]:
        """The job row's timestamps and tracking state, read-only from the SQLite store."""
        uri = f"file:{self.data_dir / 'jobs.db'}?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=10) as db:
            row = db.execute(
                "SELECT state, created_at, started_at, finished_at, tracking_state "
                "FROM jobs WHERE id = ?",
                (audit_id,),
            ).fetchone()
        keys = ("state", "created_at", "started_at", "finished_at", "tracking_state")
        return dict(zip(keys, row, strict=True)) if row else {}

    def wait_tracked(self, audit_id: str, timeout: float = 120.0) -> float:
        """Seconds until the job's MLflow record is written (NaN if not in time)."""
        began = time.perf_counter()
        while time.perf_counter() - began < timeout:
            if self.job(audit_id).get("tracking_state") == "done":
                return time.perf_counter() - began
            time.sleep(0.1)
        return float("nan")


def cnp_audit(server: Server, arguments: list[str], out: Path) -> tuple[float, dict[str, Any]]:
    """``cnp audit ARGUMENTS`` against ``server``, timed from the CLI's spawn to its exit;
    the wall seconds and the JSON report it wrote to ``out``."""
    command = [
        str(BIN / "cnp"), "audit", "--server", server.address,
        "--token-file", str(server.data_dir / "token"), *arguments,
        "--no-progress", "--quiet", "--json", str(out),
    ]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"cnp audit exited {done.returncode}: {done.stderr[-3000:]}")
    return wall, json.loads(out.read_text())


def _measure(quick: bool = False, *, rounds: int | None = None) -> common.BenchResult:
    from cnp_core.pipeline import run_audit

    rounds = rounds or (1 if quick else 2)
    bench = audits.benchmark()
    spec = audits.job_spec(bench, quick)
    root = Path(bench.dataset).parent
    tmp = Path(tempfile.mkdtemp(prefix="cnp-bench-service-"))
    server = Server(tmp / "server", [root])
    startup = server.start()
    service_runs: list[dict[str, Any]] = []
    fresh_runs: list[dict[str, Any]] = []
    inproc_times: list[float] = []
    try:
        counter = iter(range(1_000))

        def in_process() -> None:
            run_audit(spec, workdir=tmp / f"inproc-{next(counter)}")

        def through_service() -> None:
            n = next(counter)
            out = tmp / f"service-{n}.json"
            arguments = [*audits.cli_arguments(spec), "--request-id", f"bench-{os.getpid()}-{n}"]
            wall, report = cnp_audit(server, arguments, out)
            job = server.job(report["audit_id"])
            service_runs.append(
                {
                    "wall": wall,
                    "audit_id": report["audit_id"],
                    "queued": job["started_at"] - job["created_at"],
                    "worker": job["finished_at"] - job["started_at"],
                    "pipeline": sum(report.get("timings", {}).values()),
                    "client": wall - (job["finished_at"] - job["created_at"]),
                    "mlflow_after_exit": server.wait_tracked(report["audit_id"]),
                }
            )
            # Untimed: the next worker's warm-up must not slow the next in-process run.
            server.settle(time.monotonic() + 120)

        in_process()  # warm-up: lazy imports of the pipeline's stages, untimed
        for _ in range(rounds):  # in turn: in-process, fresh process, service, in-process...
            began = time.perf_counter()
            in_process()
            inproc_times.append(time.perf_counter() - began)
            fresh_runs.append(audits.audit_in_subprocess(spec, tmp / f"fresh-{next(counter)}"))
            through_service()  # times itself: CLI spawn to exit, MLflow wait excluded
    finally:
        server.stop()
    shutil.rmtree(tmp, ignore_errors=True)  # kept only when a run failed, for its logs
    service_times = [r["wall"] for r in service_runs]
    inproc, service = common.median(inproc_times), common.median(service_times)
    limit = FACTOR * inproc + ALLOWANCE
    checks = [
        common.Check(
            "service / in-process wall time",
            service / inproc,
            "<=",
            limit / inproc,
            note=f"{service:.1f} vs {inproc:.1f} s; target = 1.15x + 2 s; worker start-up "
            f"{common.median([r['worker'] - r['pipeline'] for r in service_runs]):.1f} s",
        )
    ]
    details: dict[str, Any] = {
        "seconds": {
            "in-process": common.spread(inproc_times),
            "service": common.spread(service_times),
        },
        "overhead_seconds": service - inproc,
        "limit_seconds": limit,
        "server_startup_seconds": startup,
        "fresh_process": {
            "process_seconds": common.spread([r["process_seconds"] for r in fresh_runs]),
            "import_seconds": common.spread([r["import_seconds"] for r in fresh_runs]),
            "audit_seconds": common.spread([r["seconds"] for r in fresh_runs]),
        },
        "service_runs": service_runs,
        "breakdown_median_seconds": {
            "queued": common.median([r["queued"] for r in service_runs]),
            "worker_beyond_pipeline": common.median(
                [r["worker"] - r["pipeline"] for r in service_runs]
            ),
            "client": common.median([r["client"] for r in service_runs]),
            "mlflow_after_exit": common.median([r["mlflow_after_exit"] for r in service_runs]),
        },
        "rounds": rounds,
        "spec": audits.QUICK if quick else audits.SMALL,
    }
    title = "Service overhead: cnp audit -> cnp-server -> worker -> MLflow vs run_audit"
    return common.BenchResult("service_overhead", title, checks, details)


def run(quick: bool = False, write: bool = True, **options: Any) -> dict[str, Any]:
    """Measure, print the table, write ``bench/results/service_overhead.json``."""
    return common.report(common.timed(_measure, quick=quick, **options), write)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (2)")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    run(args.quick, not args.no_write, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
