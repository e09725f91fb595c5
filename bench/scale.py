"""Scale: audit time vs number of images (1x, 2x, 4x, 8x the watermark benchmark).

Each audit runs the same small job (``bench.audits.SMALL``) over a dataset with every
image ``factor`` times (noisy copies, real format), in a fresh process, timed from inside
(imports excluded); the factors run in turn (1x, 2x, 4x, 8x, 1x, 2x, ...) for
``repeats`` rounds and each factor's median is used. What grows with the images: the
dataset digest, evaluation, the scoring pass and the bootstrap; what does not: model
loading and the DRSA fit (at most ``fit_images`` images are fitted). "Linear or better": time(8x) / time(1x) <= 8 x 1.1.

    python -m bench.scale [--quick]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import audits, common

FACTORS = (1, 2, 4, 8)
QUICK_FACTORS = (1, 2)
SLACK = 1.1


def _measure(
    quick: bool = False, *, factors: tuple[int, ...] | None = None, repeats: int | None = None
) -> common.BenchResult:
    factors = tuple(factors or (QUICK_FACTORS if quick else FACTORS))
    repeats = repeats or (1 if quick else 2)
    rounds = [{f: audits.scaled_audit(f, quick, r) for f in factors} for r in range(repeats)]
    median = {f: common.median([one[f]["seconds"] for one in rounds]) for f in factors}
    count = {f: rounds[0][f]["images"] for f in factors}
    top, base = max(factors), min(factors)
    ratio = median[top] / median[base]
    limit = (top / base) * SLACK
    images = np.array([count[f] for f in factors], dtype=float)
    seconds = np.array([median[f] for f in factors])
    slope, intercept = np.polyfit(images, seconds, 1)
    exponent = float(np.polyfit(np.log(images), np.log(seconds), 1)[0])
    checks = [
        common.Check(
            f"time({top}x) / time({base}x)",
            ratio,
            "<=",
            limit,
            note=f"log-log slope {exponent:.2f}; "
            + ", ".join(f"{f}x {1e3 * median[f] / count[f]:.1f}" for f in factors)
            + " ms/image",
        )
    ]
    details: dict[str, Any] = {
        "repeats": repeats,
        "median_seconds": {str(f): median[f] for f in factors},
        "images": {str(f): count[f] for f in factors},
        "runs": {str(f): [one[f] for one in rounds] for f in factors},
        "ms_per_image": {str(f): 1e3 * median[f] / count[f] for f in factors},
        "linear_fit": {"fixed_seconds": float(intercept), "ms_per_image": 1e3 * float(slope)},
        "loglog_exponent": exponent if math.isfinite(exponent) else None,
        "spec": audits.QUICK if quick else audits.SMALL,
    }
    title = "Scale: audit time vs images (" + ", ".join(f"{f}x" for f in factors) + ")"
    return common.BenchResult("scale", title, checks, details)


def run(quick: bool = False, write: bool = True, **options: Any) -> dict[str, Any]:
    """Measure, print the table, write ``bench/results/scale.json``."""
    return common.report(common.timed(_measure, quick=quick, **options), write)


def main(argv: list[str] | None = None) -> int:
    return common.main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
