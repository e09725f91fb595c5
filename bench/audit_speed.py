"""Audit speed: a default ``cnp audit`` of a 3,160-image 64 px dataset vs one gradient pass.

The dataset is the 64 px watermark benchmark with every image 4 times (``bench.audits``:
noisy copies in the real format, 3,160 images); the model its ResNet-18. Measured in one
run, in turn:

- the yardstick: one plain forward and backward pass (cross-entropy, parameter
  gradients) over every image of the dataset, through the audit's own data loader
  (decoding included), in this process. It bounds the audit's gradient work from above:
  an audit explains a subset of the images (fit and audited splits) and only evaluates
  the rest;
- ``cnp audit`` with nothing but the model, the dataset and the attribute named (every
  other setting the default), through a real ``cnp-server`` on loopback, timed from the
  CLI's spawn to its exit;
- the same with ``--prune cnp`` (default pruning settings).

Targets (2 CPU cores): audit <= 60 s and <= 1.25 x the yardstick; with CNP <= 90 s.

    python -m bench.audit_speed [--quick] [--device cuda]

On a GPU machine the server runs the audits on its GPU (the spec's device is "auto");
``--device cuda`` runs the yardstick there too, so the ratio compares like with like.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import audits, common
from .service_overhead import Server, cnp_audit

FACTOR = 4  # copies of each image: 790 x 4 = 3,160 images
AUDIT_SECONDS, PRUNED_SECONDS, RATIO = 60.0, 90.0, 1.25


def gradient_pass(spec, device: str = "cpu") -> tuple[float, int]:
    """Seconds of one forward and backward pass over every image, and the image count."""
    import torch
    import torch.nn.functional as F

    from cnp_core.data import load_dataset, make_loader
    from cnp_core.models import load_model

    model = load_model(spec.model).to(device)
    table = load_dataset(spec.dataset, spec.attributes)
    rows = torch.arange(len(table.labels)).numpy()
    began = time.perf_counter()
    for images, labels in make_loader(table.labelled(rows, spec.dataset), spec.batch_size):
        F.cross_entropy(model(images.to(device)), labels.to(device)).backward()
        model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - began, len(rows)


def cli_audit(server: Server, spec, workdir: Path, *extra: str) -> dict[str, Any]:
    """``cnp audit`` naming only model, dataset and attribute; wall seconds and timings."""
    m, d = spec.model, spec.dataset
    out = workdir / f"report-{len(list(workdir.glob('report-*')))}.json"
    arguments = [
        "--model", m.architecture, "--weights", m.weights, "--num-classes", str(m.num_classes),
        "--dataset", d.root, "--input-size", str(d.input_size),
        "--attribute", spec.attributes[0], *extra,
    ]  # fmt: skip
    wall, report = cnp_audit(server, arguments, out)
    (audit,) = report["attributes"]
    return {
        "wall": wall,
        "timings": report.get("timings", {}),
        "flagged_subspace": int(audit.get("flagged_subspace", 0)),  # proto3 JSON omits 0
        "n_subspaces": audit.get("n_subspaces"),
    }


def _measure(quick: bool = False, device: str = "cpu") -> common.BenchResult:
    """``device``: where the yardstick runs; the server picks its own (a GPU when it has one)."""
    from cnp_core.synthetic import ensure_benchmark

    bench = ensure_benchmark(image_size=32 if quick else 64)
    dataset = audits.scaled_dataset(bench, 1 if quick else FACTOR)
    spec = bench.audit_spec()
    spec.dataset.root = str(dataset)
    tmp = Path(tempfile.mkdtemp(prefix="cnp-bench-speed-"))
    server = Server(tmp / "server", [Path(bench.dataset).parent.parent])
    server.start()
    try:
        yardstick, images = gradient_pass(spec, device)
        audit = cli_audit(server, spec, tmp)
        server.settle(time.monotonic() + 120)
        pruned = cli_audit(server, spec, tmp, "--prune", "cnp")
    finally:
        server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    ratio = audit["wall"] / yardstick
    checks = [
        common.Check("default audit, seconds", audit["wall"], "<=", AUDIT_SECONDS, ""),
        common.Check(
            "audit / one forward+backward pass",
            ratio,
            "<=",
            RATIO,
            note=f"{audit['wall']:.1f} s vs {yardstick:.1f} s over {images} images",
        ),
        common.Check("default audit + CNP, seconds", pruned["wall"], "<=", PRUNED_SECONDS, ""),
    ]
    details = {
        "images": images,
        "yardstick_seconds": yardstick,
        "audit": audit,
        "audit_with_cnp": pruned,
    }
    title = f"Audit speed: default cnp audit of {images} images vs one gradient pass"
    return common.BenchResult("audit_speed", title, checks, details)


def run(quick: bool = False, write: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Measure, print the table, write ``bench/results/audit_speed[.cuda].json``."""
    return common.report(common.timed(_measure, quick=quick, device=device), write)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="where the yardstick pass runs")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    run(args.quick, not args.no_write, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
