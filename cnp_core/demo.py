"""``make demo`` in-process: generate (or reuse) the watermark benchmark and audit it.

python -m cnp_core.demo [--workdir .cnp/demo] [--prune cnp|lrp] [--rate 0.3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .pipeline import run_audit, summary
from .spec import AuditSpec, DatasetRef, ModelRef, PruneSpec
from .synthetic import ensure_benchmark


def benchmark_spec(bench, **overrides) -> AuditSpec:
    """An audit spec for a generated benchmark (the defaults the demo and tests share)."""
    spec = AuditSpec(
        model=ModelRef(
            architecture=bench.architecture,
            weights=str(bench.weights),
            num_classes=bench.num_classes,
        ),
        dataset=DatasetRef(
            root=str(bench.dataset),
            input_size=bench.input_size,
            mean=tuple(bench.mean),
            std=tuple(bench.std),
        ),
        layers=[bench.layer],
        attributes=[bench.attribute],
        positive_class=bench.positive_class,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec.validate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path(".cnp/demo"))
    parser.add_argument("--prune", choices=["cnp", "lrp"], default=None)
    parser.add_argument("--rate", type=float, default=0.3)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    print("Preparing the watermark benchmark (generated and trained once, then cached)...")
    bench = ensure_benchmark()
    print(f"  dataset: {bench.dataset}\n  weights: {bench.weights}")
    prune = PruneSpec(method=args.prune, rate=args.rate) if args.prune else None
    spec = benchmark_spec(bench, prune=prune)

    def progress(stage: str, fraction: float, message: str) -> None:
        print(f"  [{fraction:5.0%}] {message}", file=sys.stderr)

    result = run_audit(spec, workdir=args.workdir, progress=progress)
    print()
    print(summary(result))
    print(f"\nArtifacts in {args.workdir.resolve()}:")
    for name, path in sorted(result.artifacts.items()):
        print(f"  {name}: {path}")
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
