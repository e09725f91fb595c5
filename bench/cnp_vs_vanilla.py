"""CNP vs vanilla LRP pruning through the service path, at the defaults, over populations.

For each benchmark (``watermark``: the badge; ``text``: stock-photo lettering; 64 px),
concept method (DRSA, the default; CAV, the supervised alternative) and schedule
(one-shot; iterative with fine-tuning; the same with the subspace re-learned after each
fine-tuning round), ``cnp_core.experiment`` audits the shortcut models of training seeds
0 to 4 with the service's own concept sequence, prunes each flagged model with CNP and
with vanilla LRP pruning (the service's prune stage, every other setting the default)
and evaluates both on the group-balanced test split. A model the audit does not flag is
left out (the service refuses ``--prune cnp`` then) and counted.

Reported per configuration, at the default rate (``PruneSpec().rate``) and at the best
matched rate (the seed's claim: CNP's gain on the "other class + watermark" group over
vanilla pruning where CNP's balanced accuracy stays within 1 point of the unpruned
model's): the gain, and balanced accuracy against the unpruned model's. Each run's
``summary.md``, ``rows.csv`` and plots stay in ``--output/<benchmark>-<concept>-<schedule>``;
a rerun reuses a configuration that finished there.

    python -m bench.cnp_vs_vanilla [--output .cnp/cnp-vs-vanilla]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import common

SCHEDULES = {  # name: (rates, ExperimentConfig overrides)
    "oneshot": ((0.05, 0.1, 0.2, 0.3), {}),
    "iter-ft": ((0.1, 0.2), {"schedule": "iterative", "steps": 2, "finetune_epochs": 1}),
    "iter-ft-relearn": (
        (0.1, 0.2),
        {"schedule": "iterative", "steps": 2, "finetune_epochs": 1, "relearn": True},
    ),
}
CONCEPTS = ("drsa", "cav")
STYLES = ("watermark", "text")
TOLERANCE = 0.01  # balanced accuracy within 1 point of the unpruned model's


def _name(style: str, concept: str, schedule: str) -> str:
    return f"{style}-{'' if concept == 'drsa' else concept + '-'}{schedule}"


def run_config(style: str, concept: str, schedule: str, seeds: int, output: Path) -> Path:
    """One configuration's experiment, unless it finished in ``output`` before."""
    from cnp_core.experiment import ExperimentConfig, run_experiment

    folder = output / _name(style, concept, schedule)
    if not (folder / "config.json").exists():
        rates, overrides = SCHEDULES[schedule]
        config = ExperimentConfig(
            seeds=tuple(range(seeds)), rates=rates, style=style, concept=concept, **overrides
        )
        run_experiment(config, folder, log=lambda message: print(message, flush=True))
    return folder


def compare(folder: Path, default_rate: float) -> dict[str, Any]:
    """The configuration's verdict counts and CNP vs LRP at the default and best matched
    rates (:func:`cnp_core.experiment.best_matched`, from its ``rows.csv``)."""
    from cnp_core.experiment import best_matched, read_rows, summarise

    config = json.loads((folder / "config.json").read_text())
    flagged = len(config["seeds"]) - len(config["unflagged"])
    out: dict[str, Any] = {"models": len(config["seeds"]), "flagged": flagged}
    if not (folder / "rows.csv").exists():
        return out
    summary = summarise(read_rows(folder / "rows.csv"))
    by = {(s.method, s.rate): s.mean for s in summary}
    at = {
        rate: {
            "cnp": by["cnp", rate]["other_attribute"],
            "lrp": by["lrp", rate]["other_attribute"],
            "gain": by["cnp", rate]["other_attribute"] - by["lrp", rate]["other_attribute"],
            "cnp_balanced": by["cnp", rate]["balanced_accuracy"],
            "lrp_balanced": by["lrp", rate]["balanced_accuracy"],
        }
        for method, rate in by
        if method == "cnp"
    }
    out.update(
        unpruned_balanced=by["none", 0.0]["balanced_accuracy"],
        unpruned_other=by["none", 0.0]["other_attribute"],
        rates=at,
        default_rate=default_rate if default_rate in at else None,
        best_rate=best_matched(summary, TOLERANCE)["rate"],
    )
    return out


def _row(name: str, r: dict[str, Any]) -> str:
    head = f"| {name} | {r['flagged']} of {r['models']} |"
    if "rates" not in r:
        return head + " no model flagged: CNP has nothing to remove | | |"
    cells = []
    for rate in (r["default_rate"], r["best_rate"]):
        if rate is None:
            cells.append("–")
            continue
        x = r["rates"][rate]
        cells.append(
            f"{rate:.2f}: {x['cnp']:.2f} vs {x['lrp']:.2f} ({100 * x['gain']:+.0f}); "
            f"bal. acc. {x['cnp_balanced']:.3f} vs {x['lrp_balanced']:.3f}"
        )
    return (
        head
        + f" {r['unpruned_other']:.2f}, {r['unpruned_balanced']:.3f} | "
        + " | ".join(cells)
        + " |"
    )


def _measure(output: Path, seeds: int, quick: bool = False) -> common.BenchResult:
    from cnp_core.spec import PruneSpec

    default_rate = PruneSpec().rate
    results: dict[str, dict[str, Any]] = {}
    for style in STYLES[:1] if quick else STYLES:
        for concept in CONCEPTS:
            for schedule in SCHEDULES:
                name = _name(style, concept, schedule)
                result = compare(run_config(style, concept, schedule, seeds, output), default_rate)
                results[name] = result
                if schedule == "oneshot" and "rates" not in result:
                    break  # no model flagged: no schedule has anything to prune
    lines = [
        "| configuration | models flagged | unpruned: other class + wm, bal. acc. | "
        "default rate: CNP vs LRP on other class + wm (gain, points); bal. acc. | "
        "best matched rate: the same |",
        "| --- | --- | --- | --- | --- |",
        *[_row(name, r) for name, r in results.items()],
    ]
    table = "\n".join(lines)
    print(table)
    headline = results.get(_name("watermark", "drsa", "oneshot"), {})
    gain = headline.get("rates", {}).get(default_rate, {}).get("gain", float("nan"))
    checks = [
        common.Check(
            "CNP - LRP, other class + watermark, one-shot DRSA, default rate", gain, ">=", 0.15, ""
        )
    ]
    details = {"results": results, "table": table, "default_rate": default_rate, "seeds": seeds}
    return common.BenchResult(
        "cnp_vs_vanilla", "CNP vs vanilla LRP pruning at the defaults", checks, details
    )


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path(".cnp/cnp-vs-vanilla"))
    p.add_argument("--seeds", type=int, default=5, help="models per benchmark: seeds 0..n-1")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    result = common.timed(
        _measure, output=args.output, seeds=2 if args.quick else args.seeds, quick=args.quick
    )
    common.report(result, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
