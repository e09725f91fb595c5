"""One audit in a fresh process, measured from inside: ``python -m bench.audit_job SPEC WORKDIR OUT``.

Writes OUT (JSON): ``seconds`` (wall time of ``run_audit``, imports excluded), ``timings``
(per stage), ``peak_rss_mib`` (the process's high-water mark, ``getrusage`` ru_maxrss),
``baseline_rss_mib`` (resident size after the imports, before the audit) and ``images``
(rows in the dataset). Used by the memory and scale benchmarks.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def _rss_mib() -> float:
    """Current resident set size, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path)
    p.add_argument("workdir", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)

    import torch

    from cnp_core.pipeline import run_audit
    from cnp_core.spec import AuditSpec

    spec = AuditSpec.from_dict(json.loads(args.spec.read_text()))
    baseline = _rss_mib()
    began = time.perf_counter()
    result = run_audit(spec, workdir=args.workdir / "audit")
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    labels = Path(spec.dataset.root) / "labels.csv"
    measured = {
        "seconds": seconds,
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
