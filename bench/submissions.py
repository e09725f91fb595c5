"""Submissions are cheap and bounded: CreateAudit's latency on a large dataset, and the
server's memory under concurrent hostile submissions.

A real ``cnp-server`` (default engine) on loopback. CreateAudit checks the spec, the
paths, the weights file's size and header and labels.csv, and builds, imports, loads
and decodes nothing (the worker does, when the job runs). Measured:

- CreateAudit latency for a dataset of 10,000 images (median of 5 submissions, each
  cancelled at once): target below 1 s;
- the server's resident memory growth (its own process, peak over the burst) while 8
  clients submit at once a spec whose weights file is a 1 MB zip bomb that would expand
  to 1 GiB: target below 150 MB, and every one refused with INVALID_ARGUMENT.

    python -m bench.submissions [--quick]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from . import common
from .service_overhead import Server

IMAGES, QUICK_IMAGES = 10_000, 1_000
BOMBS = 8
LATENCY_LIMIT, RSS_LIMIT_MB = 1.0, 150.0


def _dataset(root: Path, count: int) -> Path:
    """``count`` real 32 px PNGs (one encoded image, written under every name) and a
    labels.csv in the real format, two classes and a binary watermark column."""
    import numpy as np
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "0.png")
    encoded = (images / "0.png").read_bytes()
    splits = ("train", "val", "test")
    lines = ["path,label,split,watermark"]
    for n in range(count):
        (images / f"{n}.png").write_bytes(encoded)
        lines.append(f"images/{n}.png,{n % 2},{splits[n % 3]},{(n // 2) % 2}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _weights(root: Path) -> Path:
    import torchvision

    from cnp_core.models import save_weights

    return save_weights(torchvision.models.resnet18(num_classes=2), root / "resnet18.safetensors")


def zip_bomb(path: Path, expanded: int = 1 << 30) -> Path:
    """A ``.pt``-named zip whose one deflated member expands to ``expanded`` zero bytes
    (a multiple of 1 MiB; 1 GiB fits in a 1 MB file)."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("archive/data.pkl", "w", force_zip64=True) as member,
    ):
        chunk = bytes(1 << 20)
        for _ in range(expanded >> 20):
            member.write(chunk)
    return path


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _spec(root: Path, weights: Path):
    from cnp_core.spec import AuditSpec, DatasetRef, ModelRef

    return AuditSpec(
        model=ModelRef(architecture="resnet18", weights=str(weights)),
        dataset=DatasetRef(root=str(root), input_size=32),
        attributes=["watermark"],
    )


def _measure(quick: bool = False) -> common.BenchResult:
    from cnp_client import AuditClient, ServiceError

    tmp = Path(tempfile.mkdtemp(prefix="cnp-bench-submissions-"))
    count = QUICK_IMAGES if quick else IMAGES
    data = _dataset(tmp / "data", count)
    good = _spec(data, _weights(tmp / "data"))
    bomb = _spec(data, zip_bomb(tmp / "data" / "bomb.pt"))
    server = Server(tmp / "server", [tmp / "data"])
    server.start()
    assert server.process is not None
    latencies: list[float] = []
    refusals: list[str] = []
    try:
        with AuditClient(server.address, token_file=server.data_dir / "token") as client:
            for _ in range(5):
                began = time.perf_counter()
                job = client.submit(good)
                latencies.append(time.perf_counter() - began)
                client.cancel(job.id)

            def submit_bomb() -> None:
                try:
                    client.submit(bomb)
                    refusals.append("accepted")
                except ServiceError as err:
                    refusals.append(err.code)

            baseline = peak = _rss_mb(server.process.pid)
            threads = [threading.Thread(target=submit_bomb) for _ in range(BOMBS)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                peak = max(peak, _rss_mb(server.process.pid))
                time.sleep(0.005)
            peak = max(peak, _rss_mb(server.process.pid))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    latency = statistics.median(latencies)
    growth = peak - baseline
    checks = [
        common.Check(
            f"CreateAudit latency, {count} images",
            latency,
            "<=",
            LATENCY_LIMIT,
            " s",
            "median of 5",
        ),
        common.Check(
            f"server RSS growth, {BOMBS} concurrent zip bombs",
            growth,
            "<=",
            RSS_LIMIT_MB,
            " MB",
            f"{baseline:.0f} -> {peak:.0f} MB",
        ),
        common.Check(
            "zip bombs refused with INVALID_ARGUMENT",
            refusals.count("INVALID_ARGUMENT") / BOMBS,
            ">=",
            1.0,
            "",
            ", ".join(sorted(set(refusals))),
        ),
    ]
    details: dict[str, Any] = {
        "images": count,
        "latency_seconds": latencies,
        "rss_mb": {"baseline": baseline, "peak": peak},
        "refusals": refusals,
    }
    title = "Submissions: CreateAudit latency and memory under hostile weights"
    return common.BenchResult("submissions", title, checks, details)


def run(quick: bool = False, write: bool = True) -> dict[str, Any]:
    """Measure, print the table, write ``bench/results/submissions.json``."""
    return common.report(common.timed(_measure, quick=quick), write)


def main(argv: list[str] | None = None) -> int:
    return common.main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
