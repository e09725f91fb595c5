"""Verdict reliability: how often the audit flags a shortcut, over a population of models.

A gate is only as good as its verdict on the next model. For each training seed this
trains (or reuses from the cache) one shortcut model (the watermark correlated with the
positive class, rho = 0.95) and one clean model (rho = 0.5) of the watermark benchmark,
audits every model through the service's own pipeline at the given settings (the spec's
defaults unless ``--set`` says otherwise) and reports:

- the fraction of shortcut models flagged with AP_attribute >= 0.9 on the test split
  (target: >= 95 %), and of clean models flagged at all (target: 0 %);
- the spread of the best subspace's AP_attribute and AP_class in each population;
- how much each model relies on the shortcut (its worst group), so that "shortcut model"
  is a measured property, not an assumption;
- the probe ceiling: the AP of a logistic-regression probe for the attribute on the
  audited layer's pooled activations, with the labels the audit never sees, out of fold
  over the test split (5 folds; the test split is balanced, so the class cannot stand in
  for the attribute as it can in training). No linear concept of the layer predicts the attribute much better,
  so a miss under a ceiling near 0.9 says the layer barely holds the watermark, where a
  miss under a ceiling of 1.0 is the audit's own.

    python -m bench.verdicts --image-size 64 --models 5
    python -m bench.verdicts --image-size 64 --models 5 --set composite=gradient \\
        --set n_subspaces=4,8 --set drsa_restarts=1 --set drsa_max_epochs=400

Models are cached like every benchmark (``$CNP_CACHE``, default ``.cnp/cache``): a 64 px
ResNet-18 trains in about 1.5 min on 2 cores, once.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from . import common

FLAG_AP = 0.9  # a verdict a gate can rely on: the flagged subspace's test AP_attribute
SHORTCUT, CLEAN = 0.95, 0.5  # rho of the two populations


_setting = common.spec_setting  # --set FIELD=VALUE of an AuditSpec field


def audit_model(bench, settings: dict[str, Any]) -> dict[str, Any]:
    """One audit of one model: its verdict, the best subspace's APs and its group accuracies."""
    from cnp_core.pipeline import run_audit

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:  # the report files are not needed
        spec = bench.audit_spec(bootstrap=0, heatmap_samples=0, **settings)
        result = run_audit(spec, workdir=Path(workdir))
    seconds = round(time.perf_counter() - started, 1)
    (audit,) = result.attributes
    best = max(audit.subspaces, key=lambda s: s.ap_attribute.value)
    return {
        "flagged": audit.flagged_subspace >= 0,
        "k": audit.n_subspaces,
        "ap_attribute": best.ap_attribute.value,
        "ap_class": best.ap_class.value,
        # The class's own evidence should live in another subspace.
        "other_ap_class": max(
            (s.ap_class.value for s in audit.subspaces if s is not best), default=float("nan")
        ),
        "worst_group": result.before.worst_group_accuracy.value,
        "balanced_accuracy": result.before.balanced_accuracy.value,
        "probe_ceiling": probe_ceiling(spec, audit.layer),
        "seconds": seconds,
    }


def probe_ceiling(spec, layer: str) -> float:
    """Out-of-fold AP of a linear probe for the attribute on ``layer``'s activations
    averaged over positions (what a supervised concept sees), over the test split."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import cross_val_predict

    from cnp_core.data import ImageDataset, load_dataset, make_loader, split_rows
    from cnp_core.models import load_model

    model = load_model(spec.model).eval()
    table = load_dataset(spec.dataset, spec.attributes)
    splits = split_rows(table, spec.seed)
    pooled: list[torch.Tensor] = []
    hook = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: pooled.append(output.mean((2, 3)))
    )

    try:
        with torch.no_grad():
            for images, _ in make_loader(ImageDataset(table, splits.test, spec.dataset), 128):
                model(images)
    finally:
        hook.remove()
    present = table.is_present(spec.attributes[0])[splits.test]
    probe = LogisticRegression(max_iter=5000)
    scores = cross_val_predict(
        probe, torch.cat(pooled).numpy(), present, cv=5, method="decision_function"
    )
    return float(average_precision_score(present, scores))


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def _measure(
    image_size: int,
    models: int,
    settings: dict[str, Any],
    name: str,
    style: str = "watermark",
    quick: bool = False,
) -> common.BenchResult:
    from cnp_core.synthetic import ensure_benchmark

    rows: list[dict[str, Any]] = []
    for seed in range(models):
        for population, rho in (("shortcut", SHORTCUT), ("clean", CLEAN)):
            bench = ensure_benchmark(seed=seed, correlation=rho, image_size=image_size, style=style)
            row = {"population": population, "seed": seed, **audit_model(bench, settings)}
            rows.append(row)
            print(row, flush=True)
    checks, summary = [], []
    for population in ("shortcut", "clean"):
        chosen = [r for r in rows if r["population"] == population]
        if population == "shortcut":
            rate = sum(r["flagged"] and r["ap_attribute"] >= FLAG_AP for r in chosen) / len(chosen)
            checks.append(common.Check("shortcut models flagged, AP >= 0.9", rate, ">=", 0.95, ""))
        else:
            rate = sum(r["flagged"] for r in chosen) / len(chosen)
            checks.append(common.Check("clean models flagged", rate, "<=", 0.0, ""))
        summary.append(
            f"{population}: {len(chosen)} models; best AP_attribute min/median/max "
            f"{_spread([r['ap_attribute'] for r in chosen])}, its AP_class "
            f"{_spread([r['ap_class'] for r in chosen])}; worst group "
            f"{_spread([r['worst_group'] for r in chosen])}; probe ceiling "
            f"{_spread([r['probe_ceiling'] for r in chosen])}; audit "
            f"{statistics.median(r['seconds'] for r in chosen):.0f} s (median)"
        )
    print("\n".join(summary))
    title = f"Verdicts, {style} benchmark, {image_size} px, {settings or 'spec defaults'}"
    details = {
        "settings": settings,
        "style": style,
        "image_size": image_size,
        "rows": rows,
        "summary": summary,
    }
    prefix = "verdicts" if style == "watermark" else f"verdicts-{style}"
    return common.BenchResult(f"{prefix}-{image_size}px{name}", title, checks, details)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--style", default="watermark", help="benchmark: watermark (badge) or text")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--models", type=int, default=5, help="models per population (seeds)")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="F=V")
    p.add_argument("--name", default="", help="suffix of the results file, e.g. -demo")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    result = common.timed(
        _measure,
        image_size=args.image_size,
        models=2 if args.quick else args.models,
        settings=dict(args.set),
        name=args.name,
        style=args.style,
        quick=args.quick,
    )
    common.report(result, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
