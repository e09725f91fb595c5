"""One audit in a fresh process, measured from inside: ``python -m bench.audit_job SPEC WORKDIR OUT``.

Writes OUT (JSON): ``seconds`` (wall time of ``run_audit``, imports excluded), ``import_seconds``,
``timings`` (per stage), ``peak_rss_mib`` (the process's resident high-water mark,
``VmHWM``), ``baseline_rss_mib`` (resident size after the imports, before the audit) and
``images`` (rows in the dataset). Used by the memory, scale and service benchmarks.

Why VmHWM and not ``getrusage(...).ru_maxrss``: Linux carries ru_maxrss across fork and
exec, so a child started by a large parent reports the parent's peak (measured here: a
1.2 GiB audit reported 5.2 GiB, the size of the benchmark process that started it).
VmHWM belongs to the process's own address space, which exec replaces.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    """A size field of /proc/self/status (Linux; VmRSS = now, VmHWM = peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path)
    p.add_argument("workdir", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)

    began = time.perf_counter()
    import torch

    from cnp_core.pipeline import run_audit
    from cnp_core.spec import AuditSpec

    spec = AuditSpec.from_dict(json.loads(args.spec.read_text()))
    imports = time.perf_counter() - began
    baseline = _status_mib("VmRSS")
    began = time.perf_counter()
    result = run_audit(spec, workdir=args.workdir / "audit")
    seconds = time.perf_counter() - began
    peak = _status_mib("VmHWM")
    labels = Path(spec.dataset.root) / "labels.csv"
    measured = {
        "seconds": seconds,
        "import_seconds": imports,
        "timings": result.timings,
        "peak_rss_mib": peak,
        "baseline_rss_mib": baseline,
        "images": sum(1 for _ in labels.open()) - 1,
        "threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps(measured, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
