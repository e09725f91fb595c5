"""Memory: peak RSS of an audit over 8x more images vs the same audit over 1x.

Both audits run the same small job (``bench.audits.SMALL``) in fresh processes; the peak
is the process's own resident high-water mark (``VmHWM``, reported by ``bench.audit_job``;
not ru_maxrss, which Linux carries over from the parent), so one run cannot mask another. The collection pass keeps at most
``fit_images x positions_per_image`` instance rows and the scoring pass K numbers per
image, so the peak should not grow with the dataset. Target: ratio <= 1.25. Beside it,
the audit's own increment above the process's size after its imports (torch alone is
about 0.5 GiB resident here).

    python -m bench.memory [--quick]
"""

from __future__ import annotations

from typing import Any

from . import audits, common

TARGET = 1.25


def _measure(quick: bool = False, *, factor: int | None = None) -> common.BenchResult:
    factor = factor or (2 if quick else 8)
    small, large = audits.scaled_audit(1, quick), audits.scaled_audit(factor, quick)
    if not small["peak_rss_mib"] > small["baseline_rss_mib"] > 0:
        raise RuntimeError(f"implausible RSS figures: {small}")
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    growth = {
        name: run["peak_rss_mib"] - run["baseline_rss_mib"]
        for name, run in (("1x", small), (f"{factor}x", large))
    }
    checks = [
        common.Check(
            f"peak RSS {factor}x / 1x images",
            ratio,
            "<=",
            TARGET,
            note=f"{large['peak_rss_mib']:.0f} vs {small['peak_rss_mib']:.0f} MiB "
            f"({large['images']} vs {small['images']} images); above imports "
            f"{growth[f'{factor}x']:.0f} vs {growth['1x']:.0f} MiB",
        )
    ]
    details: dict[str, Any] = {
        "runs": {"1x": small, f"{factor}x": large},
        "audit_increment_mib": growth,
        "spec": audits.QUICK if quick else audits.SMALL,
    }
    title = f"Memory: peak RSS of an audit, {factor}x vs 1x images"
    return common.BenchResult("memory", title, checks, details)


def run(quick: bool = False, write: bool = True, **options: Any) -> dict[str, Any]:
    """Measure, print the table, write ``bench/results/memory.json``."""
    return common.report(common.timed(_measure, quick=quick, **options), write)


def main(argv: list[str] | None = None) -> int:
    return common.main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
