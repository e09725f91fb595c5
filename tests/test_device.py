"""The server chooses the device, and a GPU pass that runs out of memory is retried once at
half its batch, then fails with RESOURCE_EXHAUSTED and advice.

This machine has no GPU. Where a test needs a GPU's behaviour it says so and mocks the one
part that needs the hardware: torch's device list (``torch.cuda.is_available`` and
``device_count``), its memory counters, or the OutOfMemoryError itself, raised by a model
above a batch size (the class CUDA raises, so the code under test cannot tell). The test
marked ``gpu`` runs a real audit and a real out-of-memory on CUDA, and is skipped where
there is none (the one allowed skip).
"""

from __future__ import annotations

import copy
import csv
import json

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from test_server_support import ServerProcess, make_spec
from torch import nn

from cnp.v1 import service_pb2, service_pb2_grpc
from cnp_core import convert, devices
from cnp_core.collect import collect_instances
from cnp_core.devices import BatchRunner, DeviceUnavailable, GpuOutOfMemory, compute_device
from cnp_core.errors import InvalidSpec
from cnp_core.evaluation import predict
from cnp_core.lrp import Explainer
from cnp_core.pipeline import run_audit
from cnp_core.pruning.relevance import filter_scores
from cnp_core.pruning.schedule import finetune
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef
from cnp_server.config import ServerConfig
from cnp_server.engine import check_device
from cnp_server.errors import describe

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _spec(**overrides) -> AuditSpec:
    spec = AuditSpec(
        model=ModelRef(architecture="resnet18"), dataset=DatasetRef(root="/d"), attributes=["wm"]
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two GPUs (a mock: this machine has none; nothing here touches them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# --- the device a job computes on ------------------------------------------------------------


def test_auto_is_the_default_and_is_this_workers_device():
    assert AuditSpec().device == "auto"
    here = torch.device("cuda", 0) if torch.cuda.is_available() else CPU
    assert compute_device("auto") == compute_device() == here
    assert compute_device("cpu") == CPU
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        _spec(device=good).validate()
    for bad in ("tpu", "CUDA", "cuda:", "cuda:-1", "cpu:0", "auto:1", "cuda:0 ", ""):
        with pytest.raises(InvalidSpec, match="device must be 'auto', 'cpu' or 'cuda") as raised:
            _spec(device=bad).validate()
        assert raised.value.field == "device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_cuda_device_is_refused_in_a_worker_without_a_gpu():
    with pytest.raises(DeviceUnavailable) as raised:
        compute_device("cuda")
    assert str(raised.value) == (
        "device 'cuda' is not available: this worker has no GPU (its devices: cpu); use "
        "device 'auto' (the server's choice) or one of those"
    )
    failure = describe(raised.value)
    assert (failure.code, failure.reason, failure.field_path) == (
        "FAILED_PRECONDITION",
        "DEVICE_UNAVAILABLE",
        "spec.device",
    )


def test_auto_takes_the_gpu_and_an_index_beyond_the_gpus_is_refused(two_gpus):
    assert compute_device("auto") == torch.device("cuda", 0)
    assert compute_device("cuda") == torch.device("cuda", 0)
    assert compute_device("cuda:1") == torch.device("cuda", 1)
    assert compute_device("cpu") == CPU
    with pytest.raises(DeviceUnavailable) as raised:
        compute_device("cuda:3")
    assert "this worker has 2 GPUs (its devices: cpu, cuda:0, cuda:1)" in str(raised.value)
    assert raised.value.field == "device"


def test_submission_checks_the_device_against_the_servers_gpus(monkeypatch, two_gpus):
    # Each job gets one GPU, cuda:0 in its worker: a higher index is refused everywhere.
    for config in (ServerConfig(), ServerConfig(gpus=[0, 1]), ServerConfig(executor="ray")):
        for device in ("auto", "cpu", "cuda", "cuda:0"):
            check_device(_spec(device=device), config)
        with pytest.raises(DeviceUnavailable) as raised:
            check_device(_spec(device="cuda:1"), config)
        assert "runs on one GPU, which it sees as cuda:0 (a job's devices: cpu, cuda:0)" in str(
            raised.value
        )
    # Without GPUs (torch sees none, none configured) a CUDA device is refused; a Ray
    # cluster's GPUs are not known to the server, so there the worker decides.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="this server has no GPU, so its jobs run on cpu"):
        check_device(_spec(device="cuda:0"), ServerConfig())
    check_device(_spec(device="cuda:0"), ServerConfig(gpus=[3]))
    check_device(_spec(device="cuda"), ServerConfig(executor="ray"))


def test_create_audit_refuses_cuda_on_a_server_without_gpu(tmp_path, refs, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the server sees no GPU, even on a GPU box
    server = ServerProcess(tmp_path / "data", [refs], args=["--no-tracking"]).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.ConceptAuditStub(channel)
            metadata = (("authorization", f"Bearer {server.token}"),)

            def create(spec: AuditSpec):
                request = service_pb2.CreateAuditRequest(spec=convert.spec_to_proto(spec))
                return stub.CreateAudit(request, metadata=metadata, timeout=60)

            with pytest.raises(grpc.RpcError) as raised:
                create(make_spec(refs, device="cuda"))
            accepted = create(make_spec(refs))  # "auto", the default
    finally:
        server.stop()
    error = raised.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith("device 'cuda': this server has no GPU")
    info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    details = rpc_status.from_call(error).details
    assert details[0].Unpack(info) and details[1].Unpack(bad_request)
    assert info.reason == "DEVICE_UNAVAILABLE"
    assert bad_request.field_violations[0].field == "spec.device"
    assert accepted.name.startswith("operations/")


# --- a GPU that runs out of memory ------------------------------------------------------------


class OutOfMemoryAbove(nn.Sequential):
    """A small CNN whose forward raises CUDA's OutOfMemoryError on batches above ``limit``
    (a mock of a full GPU: this machine has none). ``seen``: the batch sizes it was given."""

    def __init__(self, limit: int = 10**9, classes: int = 2) -> None:
        super().__init__(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, classes),
        )
        self.limit, self.seen = limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB for a batch of {len(x)}"
            )
        return super().forward(x)


def always_out_of_memory(num_classes: int) -> nn.Module:
    """A model factory for the pipeline: every batch runs out of memory."""
    return OutOfMemoryAbove(limit=0, classes=num_classes)


def _pair(limit: int) -> tuple[OutOfMemoryAbove, OutOfMemoryAbove]:
    """The same weights twice: one fails above ``limit``, one never does."""
    torch.manual_seed(0)
    plain = OutOfMemoryAbove()
    failing = copy.deepcopy(plain)
    failing.limit = limit
    return failing, plain


def test_a_batch_out_of_memory_is_run_at_half_and_gives_the_unbatched_results():
    torch.manual_seed(1)
    images, labels = torch.randn(20, 3, 12, 12), torch.arange(20) % 2
    failing, plain = _pair(limit=4)

    # Evaluation: the first batch of 8 fails and runs as 4 + 4; the pass stays at 4.
    got = predict(failing, images, batch_size=8, device="cpu")
    np.testing.assert_array_equal(got, predict(plain, images, batch_size=20))
    assert failing.seen == [8, 4, 4, 4, 4, 4]

    # Collection of activations and LRP contexts (the explainer runs a copy of the model).
    loader = [(images[i : i + 8], torch.arange(i, min(i + 8, 20))) for i in range(0, 20, 8)]
    whole = [(images, torch.arange(20))]
    failing.seen.clear()
    with Explainer(failing, ["3"]) as explainer:
        halved = collect_instances(explainer, loader, 1, per_image=3, seed=2)["3"]
        assert explainer.model.seen == [8, 4, 4, 4, 4, 4]
    with Explainer(plain, ["3"]) as explainer:
        reference = collect_instances(explainer, whole, 1, per_image=3, seed=2)["3"]
    np.testing.assert_array_equal(halved.image_ids, reference.image_ids)
    np.testing.assert_allclose(halved.activations, reference.activations, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(halved.contexts, reference.contexts, rtol=1e-5, atol=1e-7)

    # Filter scores for pruning.
    got = filter_scores(failing, images, labels, batch_size=8)
    expected = filter_scores(plain, images, labels, batch_size=20)
    assert set(got) == set(expected) == {"0", "2", "4"}
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)

    # Fine-tuning: the halves' gradients add up to the batch's, one optimiser step each.
    failing.seen.clear()
    batches = [(images[:8], labels[:8]), (images[8:16], labels[8:16])]
    losses = finetune(failing, batches, epochs=2, learning_rate=1e-2)
    assert losses == pytest.approx(finetune(plain, batches, epochs=2, learning_rate=1e-2))
    assert failing.seen == [8] + [4] * 8
    for tuned, reference_param in zip(failing.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(tuned, reference_param, rtol=1e-5, atol=1e-6)


def test_a_second_out_of_memory_fails_the_job_with_advice(tmp_path):
    spec = _tiny_spec(
        _tiny_dataset(tmp_path / "data"), f"{__name__}:always_out_of_memory", device="cpu"
    )
    with pytest.raises(GpuOutOfMemory) as raised:
        run_audit(spec, workdir=tmp_path / "job")
    # The test split's 40 images: a batch of 32 failed, and again at 16.
    assert str(raised.value) == (
        "the device (cpu) ran out of memory while evaluating the model, at 16 images per "
        "batch, after a retry at half of 32: lower batch_size, audit fewer or smaller images "
        "(fit_images, dataset.input_size), or run the job on a GPU with more memory"
    )
    failure = describe(raised.value)
    assert (failure.code, failure.reason, failure.field_path) == (
        "RESOURCE_EXHAUSTED",
        "GPU_OUT_OF_MEMORY",
        "spec.batch_size",
    )
    assert failure.metadata == {"device": "cpu", "batch_size": "16"}
    assert failure.retry_after is None  # the same job would run out again

    # Outside the batched passes (the concept fit) there is no batch to halve: advice only.
    expected = "outside the batched passes: lower fit_images"
    with pytest.raises(GpuOutOfMemory, match=expected), devices.gpu_memory_errors(CPU):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (a mock: no GPU here)")
    with pytest.raises(ValueError, match="other"), devices.gpu_memory_errors(CPU):
        raise ValueError("other errors pass")


def test_the_first_chunk_of_a_collection_pass_sizes_the_rest_to_free_memory(monkeypatch):
    # torch's CUDA memory counters, mocked (no GPU here): 1000 bytes free, 100 per image.
    memory = {"allocated": 5000, "peak": 5000}
    for name, value in {
        "reset_peak_memory_stats": lambda device: memory.update(peak=memory["allocated"]),
        "memory_allocated": lambda device: memory["allocated"],
        "max_memory_allocated": lambda device: memory["peak"],
        "memory_reserved": lambda device: memory["allocated"] + 250,
        "mem_get_info": lambda device: (750, 80_000),
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    sizes = []

    def step(items: torch.Tensor) -> torch.Tensor:
        sizes.append(len(items))
        memory["peak"] = memory["allocated"] + 100 * len(items)
        return items * 2

    runner = BatchRunner("cuda:0", "collecting", fit_memory=True)
    batch = torch.arange(20)
    torch.testing.assert_close(torch.cat(list(runner.map(step, batch))), batch * 2)
    torch.testing.assert_close(torch.cat(list(runner.map(step, batch))), batch * 2)
    # 0.8 x (750 free + 250 cached) / 100 per image = 8 per chunk, after a probe of one.
    assert sizes == [1, 8, 8, 3, 8, 8, 4]
    assert devices.batch_that_fits(10**12, 100, limit=32) == 32  # never above the batch


# --- a whole audit ----------------------------------------------------------------------------


def tiny_model(num_classes: int) -> nn.Module:
    """The pipeline's model factory (spec.model.factory)."""
    torch.manual_seed(0)
    return OutOfMemoryAbove(classes=num_classes)


def _tiny_dataset(root):
    """labels.csv and 16 px noise images: per class 12 train, 6 val, 20 test; wm on half."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for label in (0, 1):
        for split, count in (("train", 12), ("val", 6), ("test", 20)):
            for i in range(count):
                name = f"{split}-{label}-{i}.png"
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / name)
                rows.append((name, label, split, i % 2))
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split", "wm"), *rows])
    return root


def _tiny_spec(root, factory: str = f"{__name__}:tiny_model", **overrides) -> AuditSpec:
    spec = AuditSpec(
        model=ModelRef(factory=factory),
        dataset=DatasetRef(root=str(root), input_size=16),
        layers=["3"],
        attributes=["wm"],
        n_subspaces=[2],
        positions_per_image=4,
        drsa_max_epochs=10,
        bootstrap=0,
        min_group_size=1,
        heatmap_samples=1,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def _audit_on(device: str, tmp_path) -> dict:
    spec = _tiny_spec(_tiny_dataset(tmp_path / "data"), device=device)
    result = run_audit(spec, workdir=tmp_path / "job")
    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert report["spec"]["device"] == device == result.spec.device  # as asked
    return result.versions


def test_an_audit_records_the_device_it_ran_on(tmp_path):
    versions = _audit_on("auto", tmp_path)
    assert versions["device"] == str(compute_device("auto"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_cuda_job_that_slips_through_fails_in_the_worker(tmp_path):
    with pytest.raises(DeviceUnavailable, match="this worker has no GPU"):
        run_audit(_tiny_spec(tmp_path, device="cuda"), workdir=tmp_path / "job")


class _RealOutOfMemoryAbove(OutOfMemoryAbove):
    """Above ``limit`` images asks the GPU for 64 TiB: CUDA's own out-of-memory error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(len(x))
        if len(x) > self.limit:
            torch.empty(1 << 46, dtype=torch.uint8, device=x.device)
        return nn.Sequential.forward(self, x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_auto_audits_on_cuda_and_a_real_out_of_memory_is_halved(tmp_path):
    versions = _audit_on("auto", tmp_path)
    assert versions["device"] == "cuda:0" and versions["gpu"] and versions["cuda"]
    torch.manual_seed(0)
    model = _RealOutOfMemoryAbove(limit=4)
    images = torch.randn(16, 3, 16, 16)
    got = predict(model, images, batch_size=8, device="cuda:0")
    assert model.seen == [8, 4, 4, 4, 4]
    model.limit = 10**9
    np.testing.assert_array_equal(got, predict(model, images, batch_size=16, device="cuda:0"))
    model.limit = 0
    with pytest.raises(GpuOutOfMemory, match=r"the GPU \(cuda:0, .* GiB\) ran out of memory"):
        predict(model, images, batch_size=8, device="cuda:0")
