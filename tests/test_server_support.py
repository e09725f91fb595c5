"""Shared by the server and client tests: a scripted engine and a real server process.

Why a scripted engine: the infrastructure tests (auth, queue limits, idempotency,
cancellation, restarts, MLflow retries) need jobs whose duration and outcome they
choose and that start in well under a second. The scripted engine follows the engine
contract of ``cnp_server.engine`` exactly (``validate`` checks real files,
``run_audit`` reports progress, honours ``cancelled()``, raises CnpError subclasses and
writes real artifact files, including a safetensors model) but computes no audit. The
real pipeline runs in the end-to-end tests (test_server_e2e.py).

The script is the first layer name of the spec, steps separated by ';':
``sleep:N`` N steps of 0.1 s in stage "work" (cancellable) | ``stage:NAME:N`` same in
stage NAME | ``stubborn:N`` N steps ignoring cancellation | ``hold:NAME:PATH`` stay in
stage NAME until the file PATH exists (cancellable) | ``fail:CODE`` raise a CnpError with
that status | ``crash`` raise an unexpected error | ``exit`` kill the worker process
without an outcome. An empty script succeeds at once.
"""

from __future__ import annotations

import csv
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cnp_core.errors import Cancelled, CnpError, DatasetError, ModelError
from cnp_core.results import (
    AttributeAudit,
    AuditResult,
    Evaluation,
    GroupMetric,
    Metric,
    PruningSummary,
    SubspaceScore,
)
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef, PruneSpec

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STEP = 0.1
MODEL_BYTES = 3 * 1024 * 1024  # > 2 chunks of 1 MiB: downloads are really chunked


# --- the scripted engine (runs inside the server and its workers) ---------------------


def capabilities() -> dict[str, list[str]]:
    return {"architectures": ["scripted"], "concept_methods": ["drsa"], "composites": ["none"]}


def _script(spec: AuditSpec) -> list[list[str]]:
    text = spec.layers[0] if spec.layers else ""
    return [step.split(":") for step in text.split(";") if step and step not in {"layer"}]


def validate(spec: AuditSpec, allowed_roots: Sequence[Path]) -> None:
    """Real reference checks: the weights file exists, labels.csv has the attribute columns.
    The script "exit-on-validate" makes validation itself exit, as a broken engine might."""
    if _script(spec) == [["exit-on-validate"]]:
        raise SystemExit(3)
    if not Path(spec.model.weights).is_file():
        raise ModelError(f"weights file not found: {spec.model.weights}")
    labels = Path(spec.dataset.root) / "labels.csv"
    if not labels.is_file():
        raise DatasetError(f"{labels} does not exist")
    with labels.open() as handle:
        header = next(csv.reader(handle))
    missing = [a for a in spec.attributes if a not in header]
    if missing:
        raise DatasetError(
            f"labels.csv has no column {', '.join(missing)} (columns: {', '.join(header)})"
        )


class _Failure(CnpError):
    def __init__(self, code: str) -> None:
        super().__init__(f"scripted failure with {code}")
        self.status = code


def _steps(
    stage: str, n: int, progress: Callable, cancelled: Callable | None, stubborn: bool
) -> None:
    for i in range(n):
        if not stubborn and cancelled is not None and cancelled():
            raise Cancelled("the job was cancelled")
        progress(stage, i / n, f"{stage} step {i + 1} of {n}")
        time.sleep(STEP)


def _hold(stage: str, gate: Path, progress: Callable, cancelled: Callable | None) -> None:
    while not gate.exists():
        if cancelled is not None and cancelled():
            raise Cancelled("the job was cancelled")
        progress(stage, 0.5, f"{stage}: waiting for {gate.name}")
        time.sleep(STEP)


def _metric(value: float, base: float = 0.0) -> Metric:
    return Metric(
        value=value, ci_low=max(0.0, value - 0.05), ci_high=min(1.0, value + 0.05), base_rate=base
    )


def _evaluation(attribute: str, shift: float) -> Evaluation:
    groups = [
        GroupMetric(label, attribute, value, count=25 + label, accuracy=_metric(acc - shift))
        for label, value, acc in ((0, "0", 0.95), (0, "1", 0.9), (1, "0", 0.4), (1, "1", 0.99))
    ]
    worst = min(groups, key=lambda g: g.accuracy.value)
    return Evaluation(
        balanced_accuracy=_metric(0.8 - shift),
        worst_group_accuracy=worst.accuracy,
        worst_group=f"class {worst.label} {attribute}={worst.value}",
        groups=groups,
        parameters=12345,
        flops=3_000_000_000,  # > 2**31: int64 fields must survive JSON and MLflow
        latency_ms=1.5,
    )


def run_audit(
    spec: AuditSpec,
    *,
    workdir: Path,
    progress: Callable[[str, float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    allowed_roots: Sequence[Path] | None = None,
) -> AuditResult:
    progress = progress or (lambda *a: None)
    for step in _script(spec):
        kind = step[0]
        if kind == "sleep":
            _steps("work", int(step[1]), progress, cancelled, stubborn=False)
        elif kind == "stage":
            _steps(step[1], int(step[2]), progress, cancelled, stubborn=False)
        elif kind == "stubborn":
            _steps("work", int(step[1]), progress, cancelled, stubborn=True)
        elif kind == "hold":  # a stage that lasts until the test says so (a gate file)
            _hold(step[1], Path(":".join(step[2:])), progress, cancelled)
        elif kind == "fail":
            raise _Failure(step[1])
        elif kind == "crash":
            raise RuntimeError("secret detail at /srv/internal/path")
        elif kind == "exit":
            os._exit(3)
        elif kind == "alloc":  # a job that needs more memory than it may have
            bytearray(int(float(step[1])))
        elif kind == "sigkill":  # what the kernel's OOM killer does
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "diskfull":  # the kernel's own ENOSPC: /dev/full refuses every write
            with open("/dev/full", "wb") as handle:
                handle.write(b"report")
    progress("report", 0.9, "writing artifacts")
    attribute = spec.attributes[0]
    subspaces = [
        SubspaceScore(
            index=k,
            mean_relevance=0.5 - 0.1 * k,
            ap_attribute=_metric(0.95 if k == 1 else 0.3, 0.5),
            ap_attribute_pos=_metric(0.9, 0.5),
            ap_attribute_neg=_metric(0.2, 0.5),
            ap_class=_metric(0.55 if k == 1 else 0.97, 0.5),
            ap_class_attr=_metric(0.5, 0.5),
            ap_class_no_attr=_metric(0.6, 0.5),
        )
        for k in range(3)
    ]
    audits = [
        AttributeAudit(
            attribute, "1", "layer", 3, subspaces, flagged_subspace=1, selection_ap=0.93
        ),
        AttributeAudit(
            attribute, "0", "layer", 3, subspaces, flagged_subspace=-1, selection_ap=0.4
        ),
    ]
    table = workdir / "audit_table.csv"
    table.write_text("attribute,value,subspace,ap_attribute\nwm,1,1,0.95\n")
    engine_report = workdir / "report.json"
    engine_report.write_text(json.dumps({"engine": "scripted", "path": str(workdir)}))
    heatmap = workdir / "heatmaps" / "wm=1_layer.png"
    heatmap.parent.mkdir(parents=True, exist_ok=True)
    heatmap.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    artifacts = {
        "report": str(engine_report),
        "audit_table": str(table),
        "heatmap:wm=1:layer": str(heatmap),
    }
    result = AuditResult(
        spec=spec,
        model_sha256="ab" * 32,
        dataset_digest="cd" * 32,
        attributes=audits,
        before=_evaluation(attribute, 0.0),
        timings={"work": 0.1, "report": 0.01},
        versions={"cnp": "test"},
        artifacts=artifacts,
    )
    if spec.prune is not None:
        from safetensors.numpy import save_file

        weights = (
            np.random.default_rng(spec.seed).standard_normal(MODEL_BYTES // 4).astype(np.float32)
        )
        model = workdir / "model_compact.safetensors"
        save_file({"conv.weight": weights}, str(model))
        artifacts["model_compact"] = str(model)
        result.after = _evaluation(attribute, -0.05)
        result.pruning = PruningSummary(
            spec.prune.method, spec.prune.rate, 64, 19, {"conv": [1, 5, 7]}
        )
    progress("report", 1.0, "done")
    return result


# --- fixtures the tests share ---------------------------------------------------------


def make_references(root: Path) -> tuple[Path, Path]:
    """A weights file and a dataset directory with labels.csv under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    weights = root / "model.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(4, dtype=np.float32)}, str(weights))
    dataset = root / "data"
    dataset.mkdir(exist_ok=True)
    (dataset / "labels.csv").write_text("path,label,split,wm\na.png,0,train,1\n")
    return weights, dataset


def make_spec(root: Path, script: str = "", **overrides) -> AuditSpec:
    """A valid spec over the references in ``root`` whose job plays ``script``."""
    spec = AuditSpec(
        model=ModelRef(architecture="scripted", weights=str(root / "model.safetensors")),
        dataset=DatasetRef(root=str(root / "data"), input_size=28),
        layers=[script or "layer"],
        attributes=["wm"],
        bootstrap=0,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def prune_spec() -> PruneSpec:
    return PruneSpec(method="cnp", rate=0.3)


class ServerProcess:
    """``cnp-server`` in a subprocess on a free loopback port, with its own data dir."""

    def __init__(
        self,
        data_dir: Path,
        allow_roots: Sequence[Path],
        *,
        engine: str = "test_server_support",
        settings: dict[str, object] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.allow_roots = list(allow_roots)
        self.engine = engine
        self.settings = {
            "poll_seconds": 0.1,
            "heartbeat_seconds": 1,
            "lease_seconds": 5,
            "cancel_grace_seconds": 2,
            "drain_seconds": 5,
            "tracking_retry_seconds": 2,
            **(settings or {}),
        }
        self.args = list(args)
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.health_address = ""  # the health-only port, never starved by streams

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    @property
    def log(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text() if path.exists() else ""

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).parent / "cnp-server"),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.data_dir),
            "--engine",
            self.engine,
            *[arg for root in self.allow_roots for arg in ("--allow-root", str(root))],
            *[arg for k, v in self.settings.items() for arg in ("--set", f"{k}={_text(v)}")],
            *self.args,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
        log = (self.data_dir / "server.log").open("a")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
        deadline = time.monotonic() + timeout
        info = self.data_dir / "server.json"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cnp-server exited with {self.process.returncode}:\n{self.log}")
            if info.exists():
                data = json.loads(info.read_text())
                if data["pid"] == self.process.pid:
                    self.address = data["address"]
                    self.health_address = data["health_address"]
                    # The health-only port speaks plaintext whatever the main port
                    # asks of clients (TLS, client certificates).
                    wait_serving(self.health_address, deadline - time.monotonic())
                    return self
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"cnp-server did not start in {timeout} s:\n{self.log}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _text(value: object) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def wait_serving(address: str, timeout: float) -> None:
    """Block until the health service says SERVING (no token needed)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + max(timeout, 1.0)
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


def wait_for(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.1
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate for localhost and 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
