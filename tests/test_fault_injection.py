"""Fault injection against real ``cnp-server`` processes: hostile model files and datasets,
bad requests, transport and auth, load, faults inside a job, kill -9 of a worker and of
the server at each stage, MLflow away and back, a full disk.

The table ``SCENARIOS`` is the suite's documentation: one row per scenario with its
group, what happens, the exact gRPC status expected and where that status shows:

- ``submit``: CreateAudit refuses with it; the refusal is stored as a FAILED job that never
  runs and has no MLflow run;
- ``job``: the job is accepted and ends with it ("OK": SUCCEEDED);
- ``call``: the call itself fails with it.

Each row also checks that every job it made ended in a final state and that each job that
ran has exactly one MLflow run. The last tests check the same over every job of every
server, and that nothing was written outside the servers' data directories.

Four servers, each on loopback with its own data directory and MLflow on:

- ``main`` (scripted engine, test_server_support): requests, transport, faults in a job,
  kills of its worker;
- ``real`` (the real engine, ``cnp_server.engine``): model files and datasets, with a real
  torchvision resnet18 and a tiny dataset of 16x16 PNGs;
- ``restarts`` (scripted): killed with SIGKILL twice and restarted on its data directory;
- ``outage`` (scripted): its MLflow is a real ``mlflow server`` that is absent, frozen and
  killed.

Timing (2 shared cores): a real-engine worker imports torch for seconds, so the real
engine's jobs are submitted by a background thread when the module starts and checked
last; the MLflow server also starts in the background. Scripted jobs stay in a stage with
``hold:STAGE:GATE`` (until a gate file exists) instead of sleeping, so every kill lands
in the stage it names without racing a clock.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from test_server_support import REPO, ServerProcess, make_references, make_spec, wait_for

from cnp.v1 import service_pb2, service_pb2_grpc
from cnp_client import AuditClient, Job, ServiceError
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef

pytestmark = [
    pytest.mark.slow,
    # Writing the TorchScript file; MLflow's store, read here.
    pytest.mark.filterwarnings("ignore:`torch.jit.(script|save)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
]

SUBMIT, JOB, CALL = "submit", "job", "call"
STAGES = ("load", "collect", "fit", "prune", "report")

SCENARIOS: list[tuple[str, str, str, str]] = [
    # group, scenario, expected status, where it shows
    # --- 1. model files (real engine) -------------------------------------------------
    ("model", "zip bomb: a .pt member that expands 16000x", "INVALID_ARGUMENT", SUBMIT),
    ("model", "pickle payload .pt that would run code", "INVALID_ARGUMENT", JOB),
    ("model", "TorchScript archive instead of a state_dict", "INVALID_ARGUMENT", JOB),
    ("model", "truncated .pt archive", "INVALID_ARGUMENT", JOB),
    ("model", "truncated safetensors file", "INVALID_ARGUMENT", SUBMIT),
    ("model", "safetensors file with a junk header", "INVALID_ARGUMENT", SUBMIT),
    ("model", "resnet18 weights for a mobilenet_v3_small", "INVALID_ARGUMENT", JOB),
    ("model", "unknown architecture", "INVALID_ARGUMENT", SUBMIT),
    ("model", "layer the model does not have", "INVALID_ARGUMENT", JOB),
    ("model", "model factory not in allow_factories", "PERMISSION_DENIED", SUBMIT),
    ("model", "weights path escaping the roots with ..", "PERMISSION_DENIED", SUBMIT),
    ("model", "weights symlink in a root leading outside", "PERMISSION_DENIED", SUBMIT),
    ("model", "weights over max_weights_bytes (sparse file)", "INVALID_ARGUMENT", SUBMIT),
    ("model", "empty weights file", "INVALID_ARGUMENT", SUBMIT),
    ("model", "weights of an unsupported type (.pkl)", "INVALID_ARGUMENT", SUBMIT),
    ("model", "relative weights path", "INVALID_ARGUMENT", SUBMIT),
    # --- 2. datasets (real engine) ----------------------------------------------------
    ("dataset", "corrupt image", "INVALID_ARGUMENT", JOB),
    ("dataset", "decompression bomb image (9000 x 9000 px)", "INVALID_ARGUMENT", JOB),
    ("dataset", "labels.csv with a NUL byte", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "labels.csv not UTF-8", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "labels.csv empty", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "labels.csv without the split column", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "attribute column missing", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "attribute with a single value", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "label out of the model's range", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "image path escaping with ..", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "absolute image path", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "image symlink leading outside the dataset", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "labels.csv symlink leading outside the dataset", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "listed image missing", "INVALID_ARGUMENT", SUBMIT),
    ("dataset", "dataset root: a symlink in a root leading outside", "PERMISSION_DENIED", SUBMIT),
    # --- 3. spec bounds and malformed requests (scripted engine) ---------------------
    ("request", "bootstrap of a million resamples", "INVALID_ARGUMENT", SUBMIT),
    ("request", "n_subspaces of 1000", "INVALID_ARGUMENT", SUBMIT),
    ("request", "input_size of 4096 px", "INVALID_ARGUMENT", SUBMIT),
    ("request", "request_id reused for another spec", "INVALID_ARGUMENT", CALL),
    ("request", "page token never issued", "INVALID_ARGUMENT", CALL),
    ("request", "ListOperations filter on an unknown field", "INVALID_ARGUMENT", CALL),
    ("request", "ReadArtifact at a negative offset", "INVALID_ARGUMENT", CALL),
    ("request", "ReadArtifact past the artifact's end", "OUT_OF_RANGE", CALL),
    ("request", "unknown audit id", "NOT_FOUND", CALL),
    ("request", "report of a refused audit", "FAILED_PRECONDITION", CALL),
    ("request", "delete of a running job", "FAILED_PRECONDITION", CALL),
    # --- 4. transport, auth and load (scripted engine) -------------------------------
    ("transport", "no bearer token", "UNAUTHENTICATED", CALL),
    ("transport", "wrong bearer token", "UNAUTHENTICATED", CALL),
    ("transport", "Basic instead of Bearer credentials", "UNAUTHENTICATED", CALL),
    ("transport", "one stream over max_streams_per_client", "RESOURCE_EXHAUSTED", CALL),
    ("transport", "CreateAudit with the queue full (max_queued)", "RESOURCE_EXHAUSTED", CALL),
    ("transport", "request over max_message_bytes", "RESOURCE_EXHAUSTED", CALL),
    # --- 5. faults inside a job (scripted engine) ------------------------------------
    ("in-job", "unexpected exception in the engine", "INTERNAL", JOB),
    ("in-job", "worker exits without an outcome", "INTERNAL", JOB),
    ("in-job", "engine error carrying its own status", "FAILED_PRECONDITION", JOB),
    ("in-job", "engine error naming no gRPC status", "INVALID_ARGUMENT", JOB),
    ("in-job", "allocation over worker_memory_bytes", "RESOURCE_EXHAUSTED", JOB),
    ("in-job", "worker killed by the kernel (OOM killer)", "RESOURCE_EXHAUSTED", JOB),
    ("in-job", "disk full (ENOSPC on every write)", "RESOURCE_EXHAUSTED", JOB),
    ("in-job", "stage over its stage_timeouts limit", "DEADLINE_EXCEEDED", JOB),
    ("in-job", "cancel of a running job", "CANCELLED", JOB),
    ("in-job", "cancel of a job that ignores it (terminated)", "CANCELLED", JOB),
    ("in-job", "cancel of a queued job", "CANCELLED", JOB),
    # --- 6. kill -9 of the worker (scripted engine) ----------------------------------
    *[
        ("worker-kill", f"kill -9 of the worker in stage {stage}", "RESOURCE_EXHAUSTED", JOB)
        for stage in STAGES
    ],
    ("worker-kill", "SIGTERM to the worker in stage fit", "INTERNAL", JOB),
    # --- 7. kill -9 of the server, restart on its data dir (scripted engine) ---------
    *[("server-kill", f"kill -9 of the server in stage {stage}", "OK", JOB) for stage in STAGES],
    ("server-kill", "kill -9 of the server while the job is queued", "OK", JOB),
    ("server-kill", "kill -9 of the server while a cancelled job runs", "CANCELLED", JOB),
    ("server-kill", "kill -9 of the server twice in one job (max_attempts 2)", "ABORTED", JOB),
    (
        "server-kill",
        "kill -9 of the server between creating a job's MLflow run and storing its id",
        "OK",
        JOB,
    ),
    # --- 8. MLflow away and back (scripted engine) -----------------------------------
    ("mlflow", "MLflow server not running as the job ends, then started", "OK", JOB),
    ("mlflow", "MLflow server frozen (SIGSTOP) as the job ends, then resumed", "OK", JOB),
    ("mlflow", "MLflow server killed -9 as the job ends, then restarted", "OK", JOB),
    ("mlflow", "a job cancelled while queued has its MLflow run", "CANCELLED", JOB),
]

_FINAL_STATE = {"OK": "SUCCEEDED", "CANCELLED": "CANCELLED"}


def _rows(group: str) -> list:
    return [
        pytest.param(
            name,
            code,
            where,
            id=re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-"),
        )
        for row_group, name, code, where in SCENARIOS
        if row_group == group
    ]


# --- processes and files --------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def _files(*roots: Path) -> set[Path]:
    return {p for root in roots if root.exists() for p in root.rglob("*") if not p.is_dir()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline(held: str, gate: Path) -> str:
    """A scripted job that goes through the pipeline's stages and stays in ``held`` until
    ``gate`` exists."""
    script = ";".join(f"hold:{s}:{gate}" if s == held else f"stage:{s}:1" for s in STAGES)
    assert len(script) <= 256, "the script is a layer name: at most 256 characters"
    return script


# --- servers --------------------------------------------------------------------------


class Service:
    """A real server of this module, a client of it, and its MLflow record."""

    def __init__(self, process: ServerProcess, tracking_uri: str = "") -> None:
        self.process = process
        self.tracking_uri = tracking_uri or f"sqlite:///{process.data_dir / 'mlflow.db'}"
        self.client: AuditClient | None = None
        self.notes: dict[str, object] = {}  # what a scenario saw that only it could see

    def start(self) -> Service:
        self.process.start()
        if self.client is not None:
            self.client.close()
        self.client = AuditClient(self.process.address, token=self.process.token, timeout=30)
        return self

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.process.stop()

    @property
    def auth(self) -> tuple:
        return (("authorization", f"Bearer {self.process.token}"),)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.process.address)

    def store(self):
        from cnp_server.store import JobStore

        return JobStore(f"sqlite:///{self.process.data_dir / 'jobs.db'}")

    def runs(self, audit_id: str | None = None) -> dict[str, list[str]]:
        """audit id -> ids of the MLflow runs tagged with it (one job's, or all)."""
        from mlflow.tracking import MlflowClient

        mlflow = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = mlflow.get_experiment_by_name("cnp-audits")
        if experiment is None:
            return {}
        query = f"tags.`cnp.audit_id` = '{audit_id}'" if audit_id else ""
        found: dict[str, list[str]] = defaultdict(list)
        for run in mlflow.search_runs(
            [experiment.experiment_id], filter_string=query, max_results=10_000
        ):
            found[run.data.tags.get("cnp.audit_id", "")].append(run.info.run_id)
        return dict(found)

    def worker_pid(self, audit_id: str, attempt: int = 1) -> int:
        """The pid of the worker process running this attempt, from the server's log."""
        line = re.compile(rf"job {audit_id} attempt {attempt} started in \S+ pid (\d+)")
        pid = int(wait_for(lambda: line.search(self.process.log), timeout=10)[1])
        assert int(_stat(pid)[1]) == self.process.process.pid, "not a worker of this server"
        return pid


def _status(job: Job) -> str:
    return "OK" if job.succeeded else job.error_code


def _finished(service: Service, audit_id: str, code: str, timeout: float = 60.0) -> Job:
    """The job once final (polled with unary calls: no stream held), checked to end with
    ``code``."""
    job = wait_for(
        lambda: (j := service.client.get(audit_id)).done and j, timeout=timeout, interval=0.05
    )
    assert (job.state, _status(job)) == (_FINAL_STATE.get(code, "FAILED"), code), job
    assert "Traceback" not in job.error_message
    assert str(service.process.data_dir) not in job.error_message
    return job


def _tracked(service: Service, audit_id: str, timeout: float = 60.0) -> Job:
    """The job once its MLflow record is written, checked to be exactly one run."""
    job = wait_for(
        lambda: (j := service.client.get(audit_id)).tracking_state in {"done", "failed"} and j,
        timeout=timeout,
        interval=0.05,
    )
    assert job.tracking_state == "done", job.tracking_error
    assert service.runs(audit_id) == {audit_id: [job.mlflow_run_id]}
    return job


def _refused(service: Service, spec: AuditSpec) -> ServiceError:
    """The error of a CreateAudit refusal, checked to be stored as a FAILED job that
    never ran."""
    with pytest.raises(ServiceError) as caught:
        service.client.submit(spec)
    err = caught.value
    stored = service.client.get(err.audit_id)
    assert (stored.state, stored.stage, stored.attempt) == ("FAILED", "validate", 0)
    assert (stored.error_code, stored.error_message) == (err.code, err.message)
    assert stored.tracking_state == ""  # nothing ran, nothing to record
    return err


def _call(action: Callable[[], object]) -> tuple[str, str]:
    """(status, message) of a call that fails, through the client or a raw stub."""
    try:
        action()
    except ServiceError as err:
        return err.code, err.message
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


def _running(service: Service, audit_id: str, stage: str = "") -> Job:
    return wait_for(
        lambda: (
            (j := service.client.get(audit_id)).state == "RUNNING"
            and (not stage or j.stage == stage)
            and j
        ),
        timeout=60,
        interval=0.05,
    )


class MlflowServer:
    """A real ``mlflow server`` in its own session, so that signals reach its workers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{_free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.root / "mlflow.log").open("a")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                self.uri.rsplit(":", 1)[1],
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def up(self) -> bool:
        try:
            with urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_up(self, timeout: float = 120.0) -> None:
        assert self.process is not None and self.process.poll() is None
        wait_for(self.up, timeout=timeout, interval=0.2)

    def signal(self, sig: int) -> None:
        os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGCONT)  # a frozen process group dies too
            self.signal(signal.SIGKILL)
            self.process.wait(30)


# --- fixtures -------------------------------------------------------------------------

MAIN_SETTINGS = {
    "tracking_retry_seconds": 1,
    "max_queued": 2,
    "max_streams_per_client": 3,
    "worker_memory_bytes": 3 << 29,  # room for the scripted worker, none for 4 GB more
    "stage_timeouts": {"default": 3600, "hang": 1.0},
    "cancel_grace_seconds": 1,
}
REAL_MAX_WEIGHTS = 64 << 20  # resnet18 (45 MB) fits; the sparse file does not


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def refs(base) -> Path:
    root = base / "refs"
    make_references(root)
    return root


@pytest.fixture(scope="module")
def gates(base) -> Path:
    (base / "gates").mkdir()
    return base / "gates"


@pytest.fixture(scope="module")
def snapshot(base, refs) -> dict[str, set]:
    """What exists before any server starts (the real engine's inputs come later)."""
    return {"repo": set(os.listdir(REPO)), "refs": _files(refs)}


@pytest.fixture(scope="module")
def main(base, refs):
    service = Service(ServerProcess(base / "main-data", [refs], settings=MAIN_SETTINGS)).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def real(base):
    for name in ("models", "datasets", "outside"):
        (base / name).mkdir()
    process = ServerProcess(
        base / "real-data",
        [base / "models", base / "datasets"],
        engine="cnp_server.engine",
        settings={
            "tracking_retry_seconds": 1,
            "max_weights_bytes": REAL_MAX_WEIGHTS,
            # Each job's worker imports torch anyway; a spare would only add one more.
            "prewarm_workers": False,
        },
    )
    jobs = RealEngineJobs(Service(process).start(), base)
    yield jobs
    jobs.join()
    jobs.service.stop()


@pytest.fixture(scope="module")
def restarts(base, refs):
    process = ServerProcess(
        base / "restart-data",
        [refs],
        settings={
            "workers": 7,  # every job of the scenario runs at once
            "prewarm_workers": False,  # no spares: seven would start with each server
            "max_attempts": 2,
            "cancel_grace_seconds": 600,  # a cancelled stubborn job still runs at the kill
            "tracking_retry_seconds": 1,
        },
    )
    service = Service(process).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def outage(base, refs):
    """A server whose MLflow is a real ``mlflow server``, not running yet: the first job
    ends while it is away; then it starts in the background (it takes seconds)."""
    mlflow = MlflowServer(base / "mlflow-server")
    process = ServerProcess(
        base / "outage-data",
        [refs],
        settings={
            "tracking_retry_seconds": 0.5,
            "tracking_http_retries": 0,
            "tracking_http_timeout": 1,
            "tracking_max_attempts": 1000,
        },
        args=["--tracking-uri", mlflow.uri],
    )
    service = Service(process, tracking_uri=mlflow.uri).start()
    service.notes["mlflow"] = mlflow
    job = service.client.submit(make_spec(refs)).id
    _finished(service, job, "OK")
    service.notes["away"] = (job, _pending(service, job))
    mlflow.start()
    yield service
    service.stop()
    mlflow.kill()


@pytest.fixture(scope="module", autouse=True)
def _slow_work_first(snapshot, real, outage):
    """The real engine's jobs and the MLflow server start before the first test."""


# --- 1 and 2. model files and datasets, through the real engine -----------------------


class _Payload:
    """Unpickling this would run code: the sentinel file would prove it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def _real_inputs(base: Path) -> dict[str, tuple[AuditSpec, str]]:
    """The hostile files, written under the real server's roots (and ``outside``), as
    scenario -> (spec, fragment the status message must contain)."""
    import torch
    import torchvision
    from PIL import Image
    from safetensors.torch import save as safetensors_bytes

    from cnp_core.models import save_weights

    models, datasets, outside = base / "models", base / "datasets", base / "outside"
    weights = save_weights(
        torchvision.models.resnet18(num_classes=2), models / "resnet18.safetensors"
    )
    good = datasets / "good"
    good.mkdir()
    head = "path,label,split,wm\n"
    rows = ""
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 255 - 30 * i, 0)).save(good / f"{i}.png")
        rows += f"{i}.png,{i % 2},{'train' if i < 4 else 'test'},{i // 2 % 2}\n"
    (good / "labels.csv").write_text(head + rows)

    def spec(weights: Path | str = weights, root: Path = good, **model: str) -> AuditSpec:
        model.setdefault("architecture", "resnet18")
        return AuditSpec(
            model=ModelRef(weights=str(weights), **model),
            dataset=DatasetRef(root=str(root), input_size=16),
            layers=["layer2"],
            attributes=["wm"],
            bootstrap=0,
        )

    def weights_file(name: str, data: bytes) -> Path:
        (models / name).write_bytes(data)
        return models / name

    def dataset(name: str, labels: str | bytes | None = None, edit=None) -> Path:
        root = datasets / name
        shutil.copytree(good, root)
        if labels is not None:
            data = labels if isinstance(labels, bytes) else labels.encode()
            (root / "labels.csv").write_bytes(data)
        if edit is not None:
            edit(root)
        return root

    bomb = models / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", bytes(16 << 20))
    scripted = models / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    saved = io.BytesIO()
    torch.save(torch.nn.Linear(64, 2).state_dict(), saved)
    small = safetensors_bytes({"w": torch.zeros(1000)})
    os.link(weights, outside / "resnet18.safetensors")
    (models / "escape.safetensors").symlink_to(outside / "resnet18.safetensors")
    with (models / "huge.safetensors").open("wb") as handle:
        handle.truncate(REAL_MAX_WEIGHTS + 1)  # sparse: nothing is written
    shutil.copy(good / "0.png", outside / "elsewhere.png")
    (outside / "labels.csv").write_text(head + rows)
    shutil.copytree(good, outside / "data")
    (datasets / "escape").symlink_to(outside / "data")

    def link_image(root: Path) -> None:
        (root / "link.png").symlink_to(outside / "elsewhere.png")

    def link_labels(root: Path) -> None:
        (root / "labels.csv").unlink()
        (root / "labels.csv").symlink_to(outside / "labels.csv")

    def corrupt(root: Path) -> None:
        (root / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 8)

    def bomb_image(root: Path) -> None:
        Image.new("1", (9000, 9000)).save(root / "7.png")

    single = "".join(r[:-2] + "1\n" for r in rows.splitlines(keepends=True))
    no_split = "path,label,wm\n" + "".join(f"{i}.png,{i % 2},{i // 2 % 2}\n" for i in range(8))
    payload = pickle.dumps({"state_dict": _Payload(outside / "pwned")})
    return {
        "zip bomb: a .pt member that expands 16000x": (spec(bomb), "decompression bomb"),
        "pickle payload .pt that would run code": (
            spec(weights_file("payload.pt", payload)),
            "cannot be loaded safely",
        ),
        "TorchScript archive instead of a state_dict": (spec(scripted), "TorchScript"),
        "truncated .pt archive": (
            spec(weights_file("truncated.pt", saved.getvalue()[: len(saved.getvalue()) // 2])),
            "corrupt",
        ),
        "truncated safetensors file": (
            spec(weights_file("truncated.safetensors", small[: len(small) // 2])),
            "not a valid safetensors file",
        ),
        "safetensors file with a junk header": (
            spec(weights_file("junk.safetensors", (1 << 40).to_bytes(8, "little") + b"{junk")),
            "not a valid safetensors file",
        ),
        "resnet18 weights for a mobilenet_v3_small": (
            spec(architecture="mobilenet_v3_small"),
            "do not fit the model",
        ),
        "unknown architecture": (spec(architecture="resnet1000"), "unknown architecture"),
        "layer the model does not have": (
            dataclasses.replace(spec(), layers=["layer9"]),
            "no layer 'layer9'",
        ),
        "model factory not in allow_factories": (
            spec(architecture="", factory="os:system"),
            "allow_factories",
        ),
        "weights path escaping the roots with ..": (
            spec(f"{models}/../outside/resnet18.safetensors"),
            "not under an allowed root",
        ),
        "weights symlink in a root leading outside": (
            spec(models / "escape.safetensors"),
            "not under an allowed root",
        ),
        "weights over max_weights_bytes (sparse file)": (
            spec(models / "huge.safetensors"),
            "max_weights_bytes",
        ),
        "empty weights file": (spec(weights_file("empty.pt", b"")), "is empty"),
        "weights of an unsupported type (.pkl)": (
            spec(weights_file("weights.pkl", pickle.dumps({}))),
            "unsupported file type",
        ),
        "relative weights path": (spec("resnet18.safetensors"), "absolute path"),
        "corrupt image": (spec(root=dataset("corrupt", edit=corrupt)), "'7.png'"),
        "decompression bomb image (9000 x 9000 px)": (
            spec(root=dataset("bomb", edit=bomb_image)),
            "decompression bomb",
        ),
        "labels.csv with a NUL byte": (
            spec(root=dataset("nul", head + rows.replace("7.png,", "7.png\0,"))),
            "U+0000",
        ),
        "labels.csv not UTF-8": (
            spec(root=dataset("latin1", (head + rows).encode() + b"caf\xe9.png,0,test,1\n")),
            "not UTF-8",
        ),
        "labels.csv empty": (spec(root=dataset("empty", "")), "labels.csv is empty"),
        "labels.csv without the split column": (
            spec(root=dataset("no-split", no_split)),
            "required column(s) split",
        ),
        "attribute column missing": (
            spec(root=dataset("no-attribute", head.replace("wm", "other") + rows)),
            "not in labels.csv",
        ),
        "attribute with a single value": (
            spec(root=dataset("single", head + single)),
            "only the value '1'",
        ),
        "label out of the model's range": (
            spec(
                root=dataset(
                    "label-5",
                    head + rows + "8.png,5,test,1\n",
                    lambda root: shutil.copy(root / "0.png", root / "8.png"),
                )
            ),
            "has label 5",
        ),
        "image path escaping with ..": (
            spec(root=dataset("dotdot", head + rows + "../good/0.png,0,test,1\n")),
            "uses '..'",
        ),
        "absolute image path": (
            spec(root=dataset("absolute", head + rows + f"{good}/0.png,0,test,1\n")),
            "is absolute",
        ),
        "image symlink leading outside the dataset": (
            spec(root=dataset("image-link", head + rows + "link.png,0,test,1\n", link_image)),
            "resolves outside the dataset root",
        ),
        "labels.csv symlink leading outside the dataset": (
            spec(root=dataset("labels-link", edit=link_labels)),
            "symlink that leads outside",
        ),
        "listed image missing": (
            spec(root=dataset("missing", head + rows + "missing.png,0,test,1\n")),
            "no such image file",
        ),
        "dataset root: a symlink in a root leading outside": (
            spec(root=datasets / "escape"),
            "not under an allowed root",
        ),
    }


class RealEngineJobs:
    """The real engine's scenarios, submitted by a background thread as the module starts
    (jobs that run first: each one's worker imports torch); the tests read the outcomes."""

    def __init__(self, service: Service, base: Path) -> None:
        self.service, self.base = service, base
        self.outcomes: dict[str, tuple[str, str, str]] = {}  # (refusal, audit id, message)
        self.fragments: dict[str, str] = {}
        self.inputs: set[Path] = set()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._submit, name="real-engine", daemon=True)
        self._thread.start()

    def _submit(self) -> None:
        try:
            specs = _real_inputs(self.base)
            table = {n for g, n, _, _ in SCENARIOS if g in {"model", "dataset"}}
            assert set(specs) == table, set(specs) ^ table
            self.inputs = _files(*(self.base / n for n in ("models", "datasets", "outside")))
            where = {name: w for _, name, _, w in SCENARIOS}
            address, token = self.service.process.address, self.service.process.token
            with AuditClient(address, token=token, timeout=300) as client:
                for name in sorted(specs, key=lambda n: where[n] != JOB):
                    spec, self.fragments[name] = specs[name]
                    try:
                        self.outcomes[name] = ("", client.submit(spec).id, "")
                    except ServiceError as err:
                        self.outcomes[name] = (err.code, err.audit_id, err.message)
        except BaseException as exc:  # handed to the tests that wait for it
            self.error = exc

    def join(self, timeout: float = 300.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the real engine's submissions hang"
        if self.error is not None:
            raise self.error

    def outcome(self, name: str) -> tuple[str, str, str]:
        wait_for(lambda: name in self.outcomes or not self._thread.is_alive(), timeout=300)
        if name not in self.outcomes:
            self.join()
        return self.outcomes[name]


def _check_real(real: RealEngineJobs, name: str, code: str, where: str) -> None:
    refused, audit_id, message = real.outcome(name)
    service = real.service
    if where == SUBMIT:
        assert refused == code, (refused, message)
        stored = service.client.get(audit_id)
        assert (stored.state, stored.stage, stored.attempt) == ("FAILED", "validate", 0)
        assert (stored.error_code, stored.error_message) == (code, message)
    else:
        assert refused == "", f"refused at submission: {refused} {message}"
        job = _finished(service, audit_id, code, timeout=300)
        assert job.attempt == 1
        message = job.error_message
        _tracked(service, audit_id)
    assert real.fragments[name] in message, message
    assert "Traceback" not in message and str(service.process.data_dir) not in message


# --- 3. spec bounds and malformed requests --------------------------------------------


@pytest.fixture(scope="module")
def finished_job(main, refs) -> str:
    job = main.client.submit(make_spec(refs)).id
    _finished(main, job, "OK")
    _tracked(main, job)
    return job


def _read_artifact(main: Service, audit_id: str, offset: int) -> tuple[str, str]:
    request = service_pb2.ReadArtifactRequest(audit_id=audit_id, name="report.json", offset=offset)
    with main.channel() as channel:
        stub = service_pb2_grpc.ConceptAuditStub(channel)
        return _call(lambda: list(stub.ReadArtifact(request, metadata=main.auth, timeout=10)))


def _list_operations(main: Service, **fields: str) -> tuple[str, str]:
    request = operations_pb2.ListOperationsRequest(name="operations", **fields)
    with main.channel() as channel:
        stub = operations_pb2_grpc.OperationsStub(channel)
        return _call(lambda: stub.ListOperations(request, metadata=main.auth, timeout=10))


def _spec_with(refs: Path, edit: Callable[[AuditSpec], None]) -> AuditSpec:
    spec = make_spec(refs)
    edit(spec)
    return spec


def _request_id_reused(main: Service, refs: Path, gates: Path, done: str) -> tuple[str, str]:
    request_id = uuid.uuid4().hex
    first = main.client.submit(make_spec(refs), request_id=request_id).id
    outcome = _call(lambda: main.client.submit(make_spec(refs, "sleep:1"), request_id=request_id))
    _finished(main, first, "OK")
    _tracked(main, first)
    return outcome


def _report_of_refused(main: Service, refs: Path, gates: Path, done: str) -> tuple[str, str]:
    refused = _refused(main, make_spec(refs, bootstrap=-1))
    return _call(lambda: main.client.report(refused.audit_id))


def _delete_running(main: Service, refs: Path, gates: Path, done: str) -> tuple[str, str]:
    job = main.client.submit(make_spec(refs, f"hold:work:{gates / 'never'}")).id
    _running(main, job, "work")
    outcome = _call(lambda: main.client.delete(job))
    main.client.cancel(job)
    _finished(main, job, "CANCELLED")
    _tracked(main, job)
    return outcome


def _refusal(edit: Callable[[AuditSpec], None]):
    def action(main: Service, refs: Path, gates: Path, done: str) -> tuple[str, str]:
        err = _refused(main, _spec_with(refs, edit))
        return err.code, err.message

    return action


REQUESTS: dict[str, tuple[Callable[..., tuple[str, str]], str]] = {
    "bootstrap of a million resamples": (
        _refusal(lambda s: setattr(s, "bootstrap", 10**6)),
        "bootstrap must lie in [0, 10000]",
    ),
    "n_subspaces of 1000": (_refusal(lambda s: setattr(s, "n_subspaces", [1000])), "n_subspaces"),
    "input_size of 4096 px": (
        _refusal(lambda s: setattr(s.dataset, "input_size", 4096)),
        "input_size must lie in [8, 1024]",
    ),
    "request_id reused for another spec": (_request_id_reused, "already used"),
    "page token never issued": (
        lambda main, *_: _list_operations(main, page_token="not-a-token"),
        "invalid page token",
    ),
    "ListOperations filter on an unknown field": (
        lambda main, *_: _list_operations(main, filter="owner=me"),
        "filter supports only",
    ),
    "ReadArtifact at a negative offset": (
        lambda main, refs, gates, done: _read_artifact(main, done, -1),
        "must be >= 0",
    ),
    "ReadArtifact past the artifact's end": (
        lambda main, refs, gates, done: _read_artifact(
            main, done, {a.name: a.size for a in main.client.artifacts(done)}["report.json"] + 1
        ),
        "lies beyond",
    ),
    "unknown audit id": (
        lambda main, *_: _call(lambda: main.client.get("aud-0000000000000000")),
        "no audit",
    ),
    "report of a refused audit": (_report_of_refused, "it has no report"),
    "delete of a running job": (_delete_running, "cancel it before deleting it"),
}


@pytest.mark.parametrize(("name", "code", "where"), _rows("request"))
def test_request(main, refs, gates, finished_job, name, code, where):
    action, fragment = REQUESTS[name]
    observed, message = action(main, refs, gates, finished_job)
    assert observed == code, message
    assert fragment in message


# --- 4. transport, auth and load ------------------------------------------------------


def _metadata_with(main: Service, metadata: tuple) -> tuple[str, str]:
    with main.channel() as channel:
        stub = service_pb2_grpc.ConceptAuditStub(channel)
        request = service_pb2.GetServerMetadataRequest()
        return _call(lambda: stub.GetServerMetadata(request, metadata=metadata, timeout=10))


def _wrong_token(main: Service, refs: Path, gates: Path) -> tuple[str, str]:
    with AuditClient(main.process.address, token="wrong", retries=0) as client:
        return _call(client.metadata)


def _stream_over_the_limit(main: Service, refs: Path, gates: Path) -> tuple[str, str]:
    job = main.client.submit(make_spec(refs, f"hold:work:{gates / 'never'}")).id
    _running(main, job, "work")
    request = service_pb2.WatchAuditRequest(audit_id=job)
    with main.channel() as channel:
        stub = service_pb2_grpc.ConceptAuditStub(channel)
        streams = [
            stub.WatchAudit(request, metadata=main.auth)
            for _ in range(MAIN_SETTINGS["max_streams_per_client"])
        ]
        try:
            for stream in streams:
                next(stream)  # open: each holds one of this client's streams
            outcome = _call(lambda: next(stub.WatchAudit(request, metadata=main.auth)))
        finally:
            for stream in streams:
                stream.cancel()
    main.client.cancel(job)
    _finished(main, job, "CANCELLED")
    _tracked(main, job)
    return outcome


def _queue_full(main: Service, refs: Path, gates: Path) -> tuple[str, str]:
    running = main.client.submit(make_spec(refs, f"hold:work:{gates / 'never'}")).id
    _running(main, running, "work")
    waiting = [main.client.submit(make_spec(refs)).id for _ in range(MAIN_SETTINGS["max_queued"])]
    try:
        outcome = _call(lambda: main.client.submit(make_spec(refs)))
    finally:
        for job in [*waiting, running]:  # the waiting ones first: none may start
            main.client.cancel(job)
    for job in waiting:
        assert _finished(main, job, "CANCELLED").attempt == 0
    _finished(main, running, "CANCELLED")
    _tracked(main, running)
    return outcome


def _oversized(main: Service, refs: Path, gates: Path) -> tuple[str, str]:
    jobs = len(main.client.list())
    spec = make_spec(refs)
    spec.layers = ["x" * (5 << 20)]
    address, token = main.process.address, main.process.token
    with AuditClient(address, token=token, retries=0, max_message_bytes=16 << 20) as big:
        outcome = _call(lambda: big.submit(spec))
    assert len(main.client.list()) == jobs  # nothing was stored
    return outcome


TRANSPORT: dict[str, tuple[Callable[..., tuple[str, str]], str]] = {
    "no bearer token": (lambda main, *_: _metadata_with(main, ()), "missing bearer token"),
    "wrong bearer token": (_wrong_token, "invalid bearer token"),
    "Basic instead of Bearer credentials": (
        lambda main, *_: _metadata_with(main, (("authorization", f"Basic {main.process.token}"),)),
        "invalid bearer token",
    ),
    "one stream over max_streams_per_client": (
        _stream_over_the_limit,
        "max_streams_per_client = 3",
    ),
    "CreateAudit with the queue full (max_queued)": (_queue_full, "queue is full"),
    "request over max_message_bytes": (_oversized, "larger than max"),
}


@pytest.mark.parametrize(("name", "code", "where"), _rows("transport"))
def test_transport(main, refs, gates, name, code, where):
    action, fragment = TRANSPORT[name]
    observed, message = action(main, refs, gates)
    assert observed == code, message
    assert fragment in message


# --- 5. faults inside a job -----------------------------------------------------------


def _cancel_running(script: str):
    def action(main: Service, refs: Path, gates: Path) -> str:
        job = main.client.submit(make_spec(refs, script)).id
        _running(main, job, "work")
        main.client.cancel(job)
        return job

    return action


def _cancel_queued(main: Service, refs: Path, gates: Path) -> str:
    running = main.client.submit(make_spec(refs, f"hold:work:{gates / 'never'}")).id
    queued = main.client.submit(make_spec(refs)).id
    _running(main, running, "work")
    assert main.client.cancel(queued).state == "CANCELLED"  # at once: it never started
    main.client.cancel(running)
    _finished(main, running, "CANCELLED")
    _tracked(main, running)
    return queued


IN_JOB: dict[str, tuple[str | Callable[..., str], str]] = {
    "unexpected exception in the engine": ("crash", "internal error (correlation id "),
    "worker exits without an outcome": ("sleep:1;exit", "exited with code 3"),
    "engine error carrying its own status": (
        "sleep:1;fail:FAILED_PRECONDITION",
        "scripted failure",
    ),
    "engine error naming no gRPC status": ("fail:NOT_A_STATUS", "scripted failure"),
    "allocation over worker_memory_bytes": ("alloc:4e9", "worker_memory_bytes"),
    "worker killed by the kernel (OOM killer)": ("sigkill", "killed by the kernel (SIGKILL)"),
    "disk full (ENOSPC on every write)": ("diskfull", "no space left on the server's disk"),
    "stage over its stage_timeouts limit": ("stage:hang:300", "'hang' exceeded its time limit"),
    "cancel of a running job": (_cancel_running("sleep:300"), "cancelled"),
    "cancel of a job that ignores it (terminated)": (
        _cancel_running("stubborn:300"),
        "cancelled (terminated)",
    ),
    "cancel of a queued job": (_cancel_queued, "cancelled before it started"),
}


@pytest.mark.parametrize(("name", "code", "where"), _rows("in-job"))
def test_fault_in_a_job(main, refs, gates, name, code, where):
    action, fragment = IN_JOB[name]
    if isinstance(action, str):
        audit_id = main.client.submit(make_spec(refs, action)).id
    else:
        audit_id = action(main, refs, gates)
    job = _finished(main, audit_id, code)
    assert fragment in job.error_message, job.error_message
    assert "/srv/internal" not in job.error_message  # the crash's details stay in the log
    if job.attempt:  # it ran: recorded once
        _tracked(main, audit_id)
    if "correlation id" in fragment:
        correlation = job.error_message.split("correlation id ")[1].rstrip(")")
        wait_for(lambda: correlation in main.process.log, timeout=10)
        assert "/srv/internal/path" in main.process.log


# --- 6. kill -9 of the worker at each stage -------------------------------------------

WORKER_KILLS = {
    **{
        f"kill -9 of the worker in stage {stage}": (stage, signal.SIGKILL, "killed by the kernel")
        for stage in STAGES
    },
    "SIGTERM to the worker in stage fit": ("fit", signal.SIGTERM, "exited with code -15"),
}


@pytest.mark.parametrize(("name", "code", "where"), _rows("worker-kill"))
def test_worker_killed(main, refs, gates, name, code, where):
    stage, sig, fragment = WORKER_KILLS[name]
    job = main.client.submit(make_spec(refs, _pipeline(stage, gates / "never"))).id
    _running(main, job, stage)
    pid = main.worker_pid(job)
    os.kill(pid, sig)
    done = _finished(main, job, code)
    assert fragment in done.error_message and done.stage == stage
    assert not _alive(pid)
    _tracked(main, job)


# --- 7. kill -9 of the server at each stage, restart on the same data dir -------------


def _write_lock(database: Path) -> sqlite3.Connection:
    """Take SQLite's write lock on ``database`` from this process, as a stalled writer
    would: the server's writers wait (their busy timeouts are long), its readers go on."""
    connection = sqlite3.connect(database, timeout=30, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    return connection


def _release(connection: sqlite3.Connection) -> None:
    try:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
    except sqlite3.ProgrammingError:  # released already
        return
    connection.close()


@pytest.fixture(scope="module")
def server_kills(restarts, refs, gates) -> dict[str, object]:
    """Kill -9 #1 while five jobs hold the five stages, a cancelled one still runs, one
    waits in the queue and one runs its first attempt of two; restart. Kill -9 #2 between
    the MLflow run of a finished job being created and its id being stored (the store's
    write lock, held here, stops the server right there), while the two-attempt job runs
    its second attempt; restart. Returns what each row checks."""
    service = restarts
    data = service.process.data_dir
    rerun, never, last_gate = (gates / n for n in ("rerun", "never-restarts", "last"))
    held = {s: service.client.submit(make_spec(refs, _pipeline(s, rerun))).id for s in STAGES}
    twice = service.client.submit(make_spec(refs, _pipeline("fit", never))).id
    stubborn = service.client.submit(make_spec(refs, "stubborn:6000")).id
    for stage, job in held.items():
        _running(service, job, stage)
    _running(service, twice, "fit")
    _running(service, stubborn, "work")
    queued = service.client.submit(make_spec(refs)).id  # every slot is busy: it waits
    service.client.cancel(stubborn)  # it ignores the request; the grace period is long
    workers = _children(service.process.process.pid)

    service.kill()  # kill -9 #1
    wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=10)  # none orphaned
    store = service.store()
    at_kill = {job: store.get(job) for job in [*held.values(), twice, stubborn, queued]}
    store.close()
    rerun.touch()  # the re-runs pass their held stage at once
    service.start()

    finishing = [*held.values(), queued]
    for job in finishing:
        _finished(service, job, "OK")
    second = _running(service, twice, "fit")
    for job in [*finishing, stubborn]:  # the tracker is idle again
        wait_for(lambda j=job: service.client.get(j).tracking_state == "done", timeout=60)

    mlflow_lock = _write_lock(data / "mlflow.db")  # the tracker cannot create a run
    try:
        last = service.client.submit(make_spec(refs, f"hold:work:{last_gate}")).id
        _running(service, last, "work")  # its run cannot open as it starts
        last_gate.touch()
        _finished(service, last, "OK")  # its outcome is stored; its record waits
        jobs_lock = _write_lock(data / "jobs.db")  # nor store the run's id
        try:
            _release(mlflow_lock)  # the run is created, then the tracker waits
            created = wait_for(lambda: service.runs(last).get(last), timeout=30)
            service.kill()  # kill -9 #2
        finally:
            _release(jobs_lock)
    finally:
        _release(mlflow_lock)
    store = service.store()
    orphan = store.get(last)
    store.close()
    service.start()
    return {
        "held": held,
        "twice": twice,
        "stubborn": stubborn,
        "queued": queued,
        "at_kill": at_kill,
        "second": second,
        "last": last,
        "created": created,
        "orphan": orphan,
    }


@pytest.mark.parametrize(("name", "code", "where"), _rows("server-kill"))
def test_server_killed(restarts, server_kills, name, code, where):
    seen = server_kills
    at_kill = seen["at_kill"]
    if name.startswith("kill -9 of the server in stage"):
        stage = name.rsplit(" ", 1)[1]
        job = seen["held"][stage]
        before = at_kill[job]
        assert (before.state, before.stage, before.attempts) == ("RUNNING", stage, 1)
        assert _finished(restarts, job, code).attempt == 2  # re-queued, run again
    elif "queued" in name:
        job = seen["queued"]
        assert (at_kill[job].state, at_kill[job].attempts) == ("QUEUED", 0)
        assert _finished(restarts, job, code).attempt == 1
    elif "cancelled" in name:
        job = seen["stubborn"]
        assert (at_kill[job].state, at_kill[job].cancel_requested) == ("RUNNING", True)
        done = _finished(restarts, job, code)
        assert "the server stopped while it ran" in done.error_message
    elif "twice" in name:
        job = seen["twice"]
        assert (at_kill[job].state, at_kill[job].attempts) == ("RUNNING", 1)
        assert (seen["second"].state, seen["second"].attempt) == ("RUNNING", 2)
        done = _finished(restarts, job, code)
        assert "stopped 2 times" in done.error_message and done.attempt == 2
    else:  # between the run's creation and its id's storing
        job = seen["last"]
        orphan = seen["orphan"]
        assert (orphan.state, orphan.tracking_state, orphan.mlflow_run_id) == (
            "SUCCEEDED",
            "pending",
            "",
        )
        assert len(seen["created"]) == 1
        _finished(restarts, job, code)
        assert _tracked(restarts, job).mlflow_run_id == seen["created"][0]  # found again
    _tracked(restarts, job)


# --- 8. MLflow away and back ----------------------------------------------------------


def _pending(service: Service, audit_id: str) -> Job:
    """The finished job as a client sees it once MLflow refused its record."""
    job = wait_for(
        lambda: (j := service.client.get(audit_id)).tracking_error and j, timeout=60, interval=0.05
    )
    assert job.tracking_state == "pending" and job.succeeded
    return job


def _mlflow_not_running(outage: Service, main: Service, refs: Path, gates: Path):
    job, seen = outage.notes["away"]
    assert "Connection refused" in seen.tracking_error, seen.tracking_error
    outage.notes["mlflow"].wait_up()
    return outage, _finished(outage, job, "OK")


def _mlflow_frozen(outage: Service, main: Service, refs: Path, gates: Path):
    mlflow = outage.notes["mlflow"]
    mlflow.wait_up()
    mlflow.signal(signal.SIGSTOP)
    try:
        job = outage.client.submit(make_spec(refs)).id
        _finished(outage, job, "OK")
        seen = _pending(outage, job)
        assert "timed out" in seen.tracking_error.lower(), seen.tracking_error
    finally:
        mlflow.signal(signal.SIGCONT)
    return outage, _finished(outage, job, "OK")


def _mlflow_killed(outage: Service, main: Service, refs: Path, gates: Path):
    mlflow = outage.notes["mlflow"]
    mlflow.wait_up()
    mlflow.kill()
    job = outage.client.submit(make_spec(refs)).id
    _finished(outage, job, "OK")
    _pending(outage, job)
    mlflow.start()
    mlflow.wait_up()
    return outage, _finished(outage, job, "OK")


def _cancelled_in_queue(outage: Service, main: Service, refs: Path, gates: Path):
    queued = _cancel_queued(main, refs, gates)
    job = _finished(main, queued, "CANCELLED")
    assert job.attempt == 0  # it never ran, and still gets its (KILLED) run
    return main, _tracked(main, job.id)


MLFLOW = {
    "MLflow server not running as the job ends, then started": _mlflow_not_running,
    "MLflow server frozen (SIGSTOP) as the job ends, then resumed": _mlflow_frozen,
    "MLflow server killed -9 as the job ends, then restarted": _mlflow_killed,
    "a job cancelled while queued has its MLflow run": _cancelled_in_queue,
}


@pytest.mark.parametrize(("name", "code", "where"), _rows("mlflow"))
def test_mlflow_away_and_back(outage, main, refs, gates, name, code, where):
    service, job = MLFLOW[name](outage, main, refs, gates)
    assert _status(job) == code
    _tracked(service, job.id)


# --- 1 and 2, checked last: the real engine's jobs ran in the background --------------


@pytest.mark.parametrize(("name", "code", "where"), _rows("model"))
def test_hostile_model_file(real, name, code, where):
    _check_real(real, name, code, where)
    assert not (real.base / "outside" / "pwned").exists(), "the pickle payload ran"


@pytest.mark.parametrize(("name", "code", "where"), _rows("dataset"))
def test_hostile_dataset(real, name, code, where):
    _check_real(real, name, code, where)


# --- invariants over every server -----------------------------------------------------


def _service(request, which: str) -> Service:
    value = request.getfixturevalue(which)
    return value.service if isinstance(value, RealEngineJobs) else value


@pytest.mark.parametrize("which", ["main", "real", "restarts", "outage"])
def test_every_job_is_final_and_each_that_ran_has_one_mlflow_run(request, which):
    service = _service(request, which)
    if which == "real":
        request.getfixturevalue("real").join()
    jobs = service.client.list()
    assert jobs
    final = [  # every accepted job reaches a final state
        wait_for(lambda a=job.id: (j := service.client.get(a)).done and j, timeout=300)
        for job in jobs
    ]
    # Refusals at submission were never accepted; every accepted job has its run, also
    # one cancelled before it started.
    accepted = [j for j in final if j.stage != "validate"]
    assert all(j.attempt > 0 or j.state == "CANCELLED" for j in accepted)
    recorded = [_tracked(service, j.id, timeout=120) for j in accepted]
    runs = service.runs()
    assert runs == {j.id: [j.mlflow_run_id] for j in recorded}  # none missing, none twice


_SERVER_FILES = re.compile(
    r"^(jobs\.db|mlflow\.db)(-wal|-shm|-journal)?$|^server\.(log|lock|json|json\.tmp)$|^token$"
)


def test_no_file_written_outside_the_data_dirs(base, refs, snapshot, real, main, restarts, outage):
    real.join()
    assert _files(refs) == snapshot["refs"]
    roots = [base / n for n in ("models", "datasets", "outside")]
    assert _files(*roots) == real.inputs
    assert not (base / "outside" / "pwned").exists()
    left = set(os.listdir(REPO)) - snapshot["repo"]
    assert not left & {"mlruns", "mlartifacts", "mlflow.db", "jobs", "jobs.db", ".cnp"}, left
    for service in (main, real.service, restarts, outage):
        data = service.process.data_dir
        ids = {j.id for j in service.client.list()}
        for path in _files(data):
            relative = path.relative_to(data)
            top = relative.parts[0]
            if top == "jobs":
                assert relative.parts[1] in ids, path
            elif top != "mlartifacts":
                assert len(relative.parts) == 1 and _SERVER_FILES.match(top), path


_BY_GROUP = {
    "request": REQUESTS,
    "transport": TRANSPORT,
    "in-job": IN_JOB,
    "worker-kill": WORKER_KILLS,
    "mlflow": MLFLOW,
}

# Every row of the table has its implementation (the real engine's rows: _real_inputs).
assert {(g, n) for g, n, _, _ in SCENARIOS if g in _BY_GROUP} == {
    (g, n) for g, table in _BY_GROUP.items() for n in table
}
