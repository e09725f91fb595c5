"""The audit job the service, memory and scale benchmarks share, and scaled copies of its data.

The job is the watermark benchmark (``cnp_core.synthetic.ensure_benchmark``: real MNIST
digits, a ResNet-18 trained to rely on the watermark; built once and cached) audited
with DRSA at the benchmark's default layer, with small settings so that one job takes
seconds, not minutes: ``SMALL`` below.

Scaled datasets (for "over 8x more images") are written in the real format: every row of
the benchmark's ``labels.csv`` appears ``factor`` times, copy 0 the original PNG, copy j
the same image with seeded noise of +-2 grey levels (so no two files are identical and
the dataset digest and decoding do real work), with the row's label, split and attribute.
They are cached next to the benchmark (``<cache>/bench-scaled-<key>/x<factor>``), built in
a temporary directory and renamed into place.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import REPO

# Small settings: DRSA capped at 100 epochs, 50 bootstrap resamples, 2 heatmap images.
SMALL: dict[str, Any] = {"drsa_max_epochs": 100, "bootstrap": 50, "heatmap_samples": 2}
QUICK: dict[str, Any] = {
    "drsa_max_epochs": 10,
    "drsa_restarts": 1,
    "bootstrap": 10,
    "heatmap_samples": 0,
    "fit_images": 32,
    "positions_per_image": 5,
}
NOISE_LEVELS = 2  # +- grey levels added to the copies


def benchmark():
    """The cached watermark benchmark (built on first use: about a minute on 2 cores)."""
    from cnp_core.synthetic import ensure_benchmark

    return ensure_benchmark()


def job_spec(bench, quick: bool = False, dataset: Path | None = None, **overrides: Any):
    """The benchmark job as an AuditSpec, optionally over another (scaled) dataset root."""

    spec = bench.audit_spec(**{**(QUICK if quick else SMALL), **overrides})
    if dataset is not None:
        spec.dataset.root = str(dataset)
    return spec.validate()


def cli_arguments(spec) -> list[str]:
    """``cnp audit`` flags that ask for exactly ``spec`` (no pruning)."""
    from cnp_client.spec_flags import spec_arguments

    return spec_arguments(spec)


# ------------------------------------------------------------------ scaled datasets


def _noisy_copy(source: Path, target: Path, seed: list[int]) -> None:
    from PIL import Image

    with Image.open(source) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    rng = np.random.default_rng(seed)
    pixels = pixels + rng.integers(-NOISE_LEVELS, NOISE_LEVELS + 1, size=pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(target)


def _write_scaled(source: Path, target: Path, factor: int) -> None:
    with open(source / "labels.csv", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    out_rows = []
    for copy in range(factor):
        for n, row in enumerate(rows):
            rel = Path(row[0])
            name = rel if copy == 0 else rel.with_name(f"{rel.stem}_c{copy}{rel.suffix}")
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            if copy == 0:
                shutil.copyfile(source / rel, target / name)
            else:
                _noisy_copy(source / rel, target / name, [copy, n])
            out_rows.append([str(name), *row[1:]])
    with open(target / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(out_rows)


def scaled_dataset(bench, factor: int) -> Path:
    """The benchmark's dataset with every image ``factor`` times (factor 1: the original)."""
    if factor == 1:
        return Path(bench.dataset)
    base = Path(bench.dataset).parent
    cache = base.parent / f"{base.name.replace('bench-', 'bench-scaled-')}"
    final = cache / f"x{factor}"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".x{factor}-", dir=cache))
    try:
        _write_scaled(Path(bench.dataset), temporary, factor)
        temporary.chmod(0o755)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if not final.is_dir():
            raise
    return final


# ------------------------------------------------------------------ one audit, fresh process


def audit_in_subprocess(spec, workdir: Path) -> dict[str, Any]:
    """Run ``spec`` with ``cnp_core.pipeline.run_audit`` in a fresh interpreter
    (``python -m bench.audit_job``) and return what it measured: the audit's wall
    seconds (imports excluded), its stage timings, and the process's peak RSS (MiB) and
    its RSS after the imports, before the audit."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = workdir / "spec.json", workdir / "measured.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    command = [sys.executable, "-m", "bench.audit_job", str(spec_file), str(workdir), str(out_file)]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"audit job failed ({done.returncode}):\n{done.stderr[-4000:]}")
    measured = json.loads(out_file.read_text())
    measured["process_seconds"] = time.perf_counter() - began
    return measured


# Audits measured in this process tree, by (factor, quick, repeat): the scale and memory
# benchmarks share the runs when run_all runs both.
_MEASURED: dict[tuple[int, bool, int], dict[str, Any]] = {}


def scaled_audit(factor: int, quick: bool = False, repeat: int = 0) -> dict[str, Any]:
    """The benchmark job over the ``factor``-times dataset in a fresh process; the
    ``repeat``-th such run of this process tree (measured once, then reused)."""
    key = (factor, quick, repeat)
    if key in _MEASURED:
        return {**_MEASURED[key], "reused": True}
    bench = benchmark()
    spec = job_spec(bench, quick, dataset=scaled_dataset(bench, factor))
    with tempfile.TemporaryDirectory(prefix=f"cnp-bench-x{factor}-") as tmp:
        measured = audit_in_subprocess(spec, Path(tmp))
    measured.update(factor=factor, repeat=repeat)
    _MEASURED[key] = measured
    return measured
