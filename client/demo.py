"""``make demo``: the whole service on one machine, the way a CI job would use it.

Starts ``cnp-server`` on loopback (data in ``.cnp/demo/server``, reused between runs),
runs ``cnp audit`` with CNP pruning and two gates on the synthetic watermark benchmark,
shows where the MLflow run, the reports and the pruned model are, and stops the server
(SIGTERM) whatever happens. A failing gate is the expected outcome: the benchmark's
model relies on the watermark. Flags this module does not know go to ``cnp audit``,
e.g. ``python -m cnp_client.demo --method cav --bootstrap 50``.

It needs the server extra (``pip install 'cnp-audit[server]'``: the ``cnp-server``
command, the benchmark generator, MLflow); those are imported inside the functions that
use them, so the client package itself stays torch-free.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import AuditClient
from .gates import as_number, evaluate, metric_value, parse_rules

GATES = ("max_ap_attribute<=0.8", "worst_group_accuracy>=0.7")
MODEL_FILE = "pruned_model.pt2"  # the CLI fetches the torch.export program when there is one


def shown(path: Path | str) -> str:
    """``path`` relative to the working directory when inside it (shorter to read and paste)."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def tool(name: str, module: str | None = None) -> list[str]:
    """The console script installed beside this interpreter; else ``python -m module``
    when one is given, else the script on PATH."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    if module:
        return [sys.executable, "-m", module]
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (pip install 'cnp-audit[server]')")
    return [found]


@dataclass(frozen=True)
class ServerFiles:
    """Where ``cnp-server --data-dir DIR`` keeps its files: the server's defaults for a
    data directory, which the demo does not override."""

    data_dir: Path

    @property
    def token(self) -> Path:
        return self.data_dir / "token"

    @property
    def log(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.data_dir / 'mlflow.db'}"


def audit_args(
    bench: Any, address: str, token: Path, out: Path, args: argparse.Namespace
) -> list[str]:
    """The ``cnp audit`` arguments of the demo (the benchmark's spec, CNP, gates, files)."""
    argv = ["audit", "--server", address, "--token-file", shown(token)]
    argv += ["--model", bench.architecture, "--weights", shown(bench.weights)]
    argv += ["--num-classes", str(bench.num_classes), "--dataset", shown(bench.dataset)]
    argv += ["--input-size", str(bench.input_size), "--mean", ",".join(map(str, bench.mean))]
    argv += ["--std", ",".join(map(str, bench.std))]
    argv += ["--attribute", bench.attribute, "--positive-class", str(bench.positive_class)]
    argv += ["--method", args.method] if args.method else []
    # Every audit and pruning setting is the library's default: what a user gets.
    argv += ["--prune", "cnp"]
    argv += [part for rule in args.gate or GATES for part in ("--gate", rule)]
    argv += ["--json", shown(out / "report.json"), "--junit", shown(out / "junit.xml")]
    argv += ["--summary", shown(out / "summary.md"), "--download-model", shown(out / MODEL_FILE)]
    return argv + list(args.extra)


def command_lines(argv: Sequence[str]) -> str:
    """A shell command with one ``--flag value`` per line, for reading and pasting."""
    lines: list[str] = []
    for part in argv:
        if part.startswith("--") or not lines:
            lines.append(shlex.quote(part))
        else:
            lines[-1] += " " + shlex.quote(part)
    return " \\\n      ".join(lines)


def explain(report: dict[str, Any], gates: Sequence[str]) -> str:
    """One line: the gates that failed and the evidence that the model uses the attribute."""
    failed = [c.name for c in evaluate(parse_rules(gates), report) if not c.passed]
    if not failed:
        return "Every gate passed."
    evidence = []
    for audit in report.get("attributes") or []:
        flagged = int(as_number(audit.get("flagged_subspace", 0)) or 0)  # proto JSON omits 0
        for position, subspace in enumerate(audit.get("subspaces") or []):
            if int(as_number(subspace.get("index", position)) or 0) == flagged:
                ap = subspace.get("ap_attribute") or {}
                evidence.append(
                    f"subspace S{flagged + 1} of {audit.get('layer')} detects {audit.get('attribute')}"
                    f"={audit.get('value')} with AP {metric_value(ap):.2f} vs. base rate "
                    f"{as_number(ap.get('base_rate', 0)) or 0.0:.2f}"
                )
    worst = []
    for when, e in (("before pruning:", report.get("before")), ("after:", report.get("after"))):
        if e:
            accuracy = metric_value(e.get("worst_group_accuracy")) or 0.0
            worst.append(f"{when} {e.get('worst_group', '?')} at {accuracy:.2f}")
    evidence.append("worst group " + ", ".join(worst))
    attribute = (report.get("attributes") or [{}])[0].get("attribute", "the attribute")
    return (
        f"Gate failed, as expected: the model uses {attribute} as a shortcut "
        f"({'; '.join(evidence)}). Failed: {', '.join(failed)}."
    )


def start_server(data_dir: Path, allow_root: Path) -> tuple[subprocess.Popen, str]:
    """``cnp-server`` on a free loopback port, in its own session (Ctrl-C is ours to handle)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    command = tool("cnp-server") + [
        "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--allow-root", str(allow_root),
    ]  # fmt: skip
    with (data_dir / "server.log").open("a") as log:
        server = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    try:
        return server, wait_serving(server, data_dir)
    except BaseException:
        stop_server(server)
        raise


def wait_serving(server: subprocess.Popen, data_dir: Path, timeout: float = 120.0) -> str:
    """The server's address once its health service answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline, info, address = time.monotonic() + timeout, data_dir / "server.json", ""
    while time.monotonic() < deadline and server.poll() is None:
        if not address and info.is_file():  # written once bound; a stale one names another pid
            data = json.loads(info.read_text() or "{}")
            address = data.get("address", "") if data.get("pid") == server.pid else ""
        if address:
            with grpc.insecure_channel(address) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                try:
                    status = check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return address
                except grpc.RpcError:
                    pass
        time.sleep(0.2)
    tail = "\n".join((data_dir / "server.log").read_text().splitlines()[-15:])
    raise RuntimeError(f"cnp-server did not become SERVING (exit {server.poll()}):\n{tail}")


def stop_server(server: Any, timeout: float = 60.0) -> int:
    """Graceful stop: SIGTERM (health NOT_SERVING, drain), then SIGKILL if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            return server.wait(timeout)
        except subprocess.TimeoutExpired:
            server.kill()
    return server.wait()


def run_cli(argv: list[str]) -> int:
    """Run ``cnp`` in its own session; on our Ctrl-C/SIGTERM it gets one SIGTERM and cancels."""
    cli = subprocess.Popen(tool("cnp", "cnp_client.cli") + argv, start_new_session=True)
    try:
        return cli.wait()
    except KeyboardInterrupt:
        cli.send_signal(signal.SIGTERM)  # the CLI cancels the job, then exits 130
        try:
            return cli.wait(30)
        except subprocess.TimeoutExpired:
            cli.kill()
            return cli.wait()


def mlflow_run(files: ServerFiles, address: str, audit_id: str) -> Any | None:
    """The job's MLflow run once the server has finished logging it (None after a minute)."""
    from mlflow.tracking import MlflowClient

    deadline = time.monotonic() + 60
    with AuditClient(address, token_file=files.token) as client:
        while time.monotonic() < deadline:
            run_id = client.get(audit_id).mlflow_run_id  # set once the run exists in the store
            if run_id:
                run = MlflowClient(files.tracking_uri).get_run(run_id)
                if run.info.status != "RUNNING":
                    return run
            time.sleep(0.5)
    return None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--data-dir", type=Path, default=Path(".cnp/demo/server"))
    parser.add_argument("--out", type=Path, default=Path(".cnp/demo/reports"))
    parser.add_argument("--method", help="concept method (default: the spec's, DRSA)")
    parser.add_argument("--gate", action="append", help=f"gate rules (default: {' '.join(GATES)})")
    args, args.extra = parser.parse_known_args(argv)
    # Ctrl-C, SIGTERM and closing the terminal all stop the server; SIGINT explicitly too,
    # since a shell starts background jobs with it ignored and Python then keeps it so.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    started = time.monotonic()
    print("[1/4] The watermark benchmark (generated and trained once, then cached)", flush=True)
    from cnp_core.synthetic import ensure_benchmark

    # 64 px: the size the README's measurements use.
    bench = ensure_benchmark(image_size=64)
    test = json.loads(bench.info.read_text()).get("test", {})
    print(f"      {bench.architecture} on {shown(bench.dataset)}: test accuracy "
          f"{test.get('overall', 0):.2f}, worst group {test.get('worst', 0):.2f}")  # fmt: skip
    print("[2/4] Starting cnp-server on loopback", flush=True)
    files = ServerFiles(args.data_dir.expanduser().resolve())
    try:
        server, address = start_server(files.data_dir, bench.dataset.parent)
    except RuntimeError as err:  # e.g. another demo holds the data directory: see its log
        print(f"demo: {err}", file=sys.stderr)
        return 3
    try:
        print(f"      pid {server.pid} SERVING on {address}; data in {shown(files.data_dir)}, "
              f"log {shown(files.log)}")  # fmt: skip
        cli_args = audit_args(bench, address, files.token, args.out, args)
        print(f"[3/4] Auditing and pruning through the CLI:\n  $ cnp {command_lines(cli_args)}")
        sys.stdout.flush()
        code = run_cli(cli_args)
        if code not in (0, 1):  # 1 is a failed gate, which the demo expects
            print(f"demo: cnp audit exited with {code} (its message is above)", file=sys.stderr)
            return code
        report = json.loads((args.out / "report.json").read_text())
        print(f"\n[4/4] {explain(report, args.gate or GATES)}")
        where(files, address, report, args.out)
        return 0
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    finally:
        print(f"Stopping cnp-server (pid {server.pid}, SIGTERM)...", end=" ", flush=True)
        code = stop_server(server)
        print(f"stopped (exit {code}). Demo took {time.monotonic() - started:.0f} s.")


def where(files: ServerFiles, address: str, report: dict[str, Any], out: Path) -> None:
    """Print where the MLflow run (and how to open it), the reports and the model are."""
    run = mlflow_run(files, address, report["audit_id"])
    if run is None:
        print(f"MLflow: the run is not recorded yet; see {shown(files.log)}")
    else:
        uri, ui = files.tracking_uri, Path(sys.executable).parent / "mlflow"
        print(f"MLflow run {run.info.run_id} (name {run.info.run_name}) in {uri}")
        print(f"  open it:  {shown(ui) if ui.is_file() else 'mlflow'} ui --backend-store-uri {uri}")
        print(f"  then:     http://127.0.0.1:5000/#/experiments/"
              f"{run.info.experiment_id}/runs/{run.info.run_id}")  # fmt: skip
    files = ", ".join(shown(out / name) for name in ("report.json", "junit.xml", "summary.md"))
    model = out / MODEL_FILE
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    names = [a["name"] for a in report.get("artifacts") or [] if a.get("sha256") == digest]
    print(f"Reports:  {files}")
    print(f"Pruned model: {shown(model)} (artifact {', '.join(names) or '?'} of the audit)")


if __name__ == "__main__":
    sys.exit(main())
