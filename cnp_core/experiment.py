"""The seed's comparison on the synthetic watermark benchmark: unpruned vs vanilla LRP
pruning vs CNP, over pruning rates and seeds (ALGORITHMS.md section 4, evaluation).

Every step is the service's own: for every seed, the concept is learned and flagged by
:func:`cnp_core.concepts.learn_concepts` from an audit spec (DRSA on positive-class
training images explaining that class, K and the subspace chosen on the validation
split; or a CAV probe), then the same model is pruned at every rate with both methods by
:func:`cnp_core.debias.debias` (same seeded reference set, same schedule) and evaluated
on the group-balanced test split.
Writes ``rows.csv`` (one row per run), ``summary.csv`` and ``summary.md`` (mean ± std over
seeds, with the best matched rate) and the seed's two plots: balanced accuracy and the
"other class + attribute" group's accuracy vs pruning rate.

    python -m cnp_core.experiment --output .cnp/experiment --seeds 5

Each seed's concept fit is kept in ``<output>/concepts/`` under a name derived from every
setting it depends on, so reruns that change only the pruning settings reuse it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .audit import format_table
from .concepts import learn_concepts
from .data import ImageDataset, ImageTable, SplitRows, load_dataset, split_rows
from .debias import debias
from .errors import NoFlaggedSubspace
from .evaluation import evaluate, find_group
from .models import load_model
from .paths import file_stem
from .pruning.projection import Projection, fold_projection
from .safe_text import csv_cell
from .spec import PRUNE_SCOPES, SCHEDULES, AuditSpec, PruneSpec

METHODS = ("lrp", "cnp")


_AUDIT, _PRUNE = AuditSpec(), PruneSpec()


@dataclass
class ExperimentConfig:
    """One comparison. Seed s is the model trained with seed s (a population of
    independently trained models) and the audit's seed. Every concept and pruning
    setting defaults to the spec's default: the table reports what a user gets."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    rates: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
    schedule: str = _PRUNE.schedule
    steps: int = _PRUNE.steps
    finetune_epochs: int = _PRUNE.finetune_epochs
    learning_rate: float = _PRUNE.learning_rate
    reference_per_class: int = _PRUNE.reference_per_class
    relearn: bool = _PRUNE.relearn_subspaces
    keep_projection: bool = _PRUNE.keep_projection  # fold P into the returned CNP model
    concept: str = _AUDIT.method  # "drsa" or "cav"
    n_subspaces: tuple[int, ...] = tuple(_AUDIT.n_subspaces)
    layer: str = ""  # "": the architecture's default audited layer
    positions_per_image: int = _AUDIT.positions_per_image
    drsa_max_epochs: int = _AUDIT.drsa_max_epochs
    flag_threshold: float = _AUDIT.flag_threshold  # CNP removes only what the audit flags
    composite: str = _PRUNE.composite  # LRP rules of the filter scores
    concept_composite: str = _AUDIT.composite  # context of the concept fit
    scope: str = _PRUNE.scope
    style: str = "watermark"  # the benchmark: "watermark" (badge) or "text"
    image_size: int = 64
    correlation: float = 0.95
    present: str = "1"  # the attribute's present value: its groups are the ones reported
    batch_size: int = _AUDIT.batch_size
    min_group_size: int = _AUDIT.min_group_size
    device: str = _AUDIT.device
    benchmark: str = ""  # the cache entry of the seed's model (filled in by run_experiment)
    unflagged: list[int] = field(default_factory=list)  # seeds whose audit flagged nothing


@dataclass
class ConceptFit:
    """The projection CNP uses, and the evidence it was chosen on."""

    projection: Projection
    ap_attribute: float  # the flagged subspace's AP for the attribute, test split
    table: str  # the audit table it was flagged from
    seconds: float

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            matrix=self.projection.matrix,
            layer=self.projection.layer,
            ap_attribute=self.ap_attribute,
            table=self.table,
        )

    @classmethod
    def load(cls, path: Path) -> ConceptFit:
        with np.load(path, allow_pickle=False) as data:
            projection = Projection(str(data["layer"]), data["matrix"])
            return cls(projection, float(data["ap_attribute"]), str(data["table"]), 0.0)


# Bump when the concept sequence changes what a fit returns: older cached fits are not reused.
CONCEPT_PATH = "learn_concepts-1"


def concept_cache(config: ExperimentConfig, seed: int) -> str:
    """File name of a seed's concept fit: every setting the fit depends on is in it."""
    key = json.dumps(
        [
            CONCEPT_PATH,
            config.benchmark,
            config.layer,
            config.concept,
            config.n_subspaces,
            config.concept_composite,
            config.positions_per_image,
            config.drsa_max_epochs,
            config.flag_threshold,
            config.present,
            seed,
        ]
    )
    return f"concept-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


@dataclass
class Row:
    seed: int
    method: str  # "none" (unpruned), "projected" (unpruned, P folded in), "lrp" or "cnp"
    rate: float
    balanced_accuracy: float
    other_attribute: float  # accuracy of the other class with the attribute (seed's "Dugong + WM")
    positive_without: float  # accuracy of the positive class without the attribute
    worst_group: float
    filters_removed: int = 0
    parameters: int = 0
    macs: int = 0
    flagged_ap: float = float("nan")
    seconds: float = 0.0


def load_benchmark(config: ExperimentConfig, seed: int):
    """The cached benchmark model of training seed ``seed`` and its dataset, through the
    real loading paths (:mod:`cnp_core.models`, :mod:`cnp_core.data`)."""
    from .synthetic import ensure_benchmark

    bench = ensure_benchmark(
        seed=seed,
        correlation=config.correlation,
        image_size=config.image_size,
        style=config.style,
    )
    spec = bench.audit_spec()
    model = load_model(spec.model)
    table = load_dataset(spec.dataset, spec.attributes, classes=spec.model.classes)
    return bench, model, table, split_rows(table, spec.seed)


def concept_spec(bench, config: ExperimentConfig, seed: int) -> AuditSpec:
    """The audit spec of one seed's concept fit: the service's own settings, as configured."""
    return bench.audit_spec(
        layers=[config.layer or bench.layer],
        method=config.concept,
        n_subspaces=list(config.n_subspaces),
        composite=config.concept_composite,
        positions_per_image=config.positions_per_image,
        drsa_max_epochs=config.drsa_max_epochs,
        flag_threshold=config.flag_threshold,
        bootstrap=0,
        heatmap_samples=0,
        min_group_size=config.min_group_size,
        batch_size=config.batch_size,
        device=config.device,
        seed=seed,
    )


def learn_projection(
    model: nn.Module, table: ImageTable, splits: SplitRows, spec: AuditSpec
) -> ConceptFit:
    """P = I - U_s U_s^T for the subspace the audit flags for the spec's attribute, learned
    by the service's concept sequence (:func:`cnp_core.concepts.learn_concepts`)."""
    began = time.perf_counter()
    attribute = spec.attributes[0]
    concepts = learn_concepts(model, table, splits, spec)
    projection = concepts.projection(attribute)
    if projection is None:
        best = max(a.selection_ap for a in concepts.audits)
        raise NoFlaggedSubspace(
            f"no subspace predicts {attribute} at {spec.layers[0]} at the flag level "
            f"(flag_threshold {spec.flag_threshold} at base rate 0.5; best on validation: "
            f"{best:.3f})"
        )
    audit = concepts.flagged(attribute)[0]
    ap = audit.subspaces[audit.flagged_subspace].ap_attribute.value
    return ConceptFit(projection, ap, format_table(audit), round(time.perf_counter() - began, 2))


@dataclass
class TestSet:
    """The test split in memory, decoded once: every run of a seed is evaluated on it."""

    images: torch.Tensor
    labels: np.ndarray
    attribute: np.ndarray  # str values as in labels.csv

    @classmethod
    def of(cls, table: ImageTable, splits: SplitRows, spec: AuditSpec) -> TestSet:
        rows = splits.test
        images = ImageDataset(table, rows, spec.dataset).stack()
        return cls(images, table.labels[rows], table.attributes[spec.attributes[0]][rows])


def _row(seed, method, rate, model, test: TestSet, attribute, config, **extra) -> Row:
    ev = evaluate(
        model,
        test.images,
        test.labels,
        {attribute: test.attribute},
        example_input=test.images[:1],
        resamples=0,
        min_group_size=config.min_group_size,
        latency_repeats=0,
    )
    absent = next(v for v in np.unique(test.attribute) if v != config.present)
    return Row(
        seed=seed,
        method=method,
        rate=rate,
        balanced_accuracy=ev.balanced_accuracy.value,
        other_attribute=find_group(ev, 0, attribute, config.present).accuracy.value,
        positive_without=find_group(ev, 1, attribute, absent).accuracy.value,
        worst_group=ev.worst_group_accuracy.value,
        parameters=ev.parameters,
        macs=ev.flops,
        **extra,
    )


def run_seed(
    bench,
    model: nn.Module,
    table: ImageTable,
    splits: SplitRows,
    config: ExperimentConfig,
    seed: int,
    *,
    log: Callable[[str], None] = print,
    cache: Path | None = None,
) -> list[Row]:
    """Unpruned, then vanilla and CNP at every rate, for one seed, through the service's
    own path: the concept from :func:`learn_projection`, each pruning run from
    :func:`cnp_core.debias.debias`. With ``cache`` (a directory), the seed's concept fit is
    reused from there when one with the same settings exists, and saved there otherwise."""
    torch.manual_seed(seed)
    spec = concept_spec(bench, config, seed)
    attribute = spec.attributes[0]
    test = TestSet.of(table, splits, spec)
    cached = cache / concept_cache(config, seed) if cache else None
    if cached and cached.exists():
        fit = ConceptFit.load(cached)
        log(f"seed {seed}: concept fit reused from {cached}\n{fit.table}")
    else:
        fit = learn_projection(model, table, splits, spec)
        log(f"seed {seed}: concept fit in {fit.seconds}s\n{fit.table}")
        if cached:
            fit.save(cached)
    rows = [_row(seed, "none", 0.0, model, test, attribute, config)]
    # Control: the projection alone, without pruning, so that CNP's gain can be told
    # apart from what removing the subspace does by itself.
    projected = fold_projection(model, fit.projection)
    rows.append(
        _row(
            seed, "projected", 0.0, projected, test, attribute, config, flagged_ap=fit.ap_attribute
        )
    )
    for rate in config.rates:
        for method in METHODS:
            spec.prune = PruneSpec(
                method=method,
                rate=rate,
                schedule=config.schedule,
                steps=config.steps,
                finetune_epochs=config.finetune_epochs,
                learning_rate=config.learning_rate,
                reference_per_class=config.reference_per_class,
                relearn_subspaces=config.relearn,
                scope=config.scope,
                composite=config.composite,
                keep_projection=config.keep_projection,
            )
            began = time.perf_counter()
            out = debias(model, table, splits, spec, fit.projection)
            seconds = round(time.perf_counter() - began, 2)
            row = _row(
                seed,
                method,
                rate,
                out.compact,
                test,
                attribute,
                config,
                filters_removed=out.summary.filters_removed,
                flagged_ap=fit.ap_attribute if method == "cnp" else float("nan"),
                seconds=seconds,
            )
            rows.append(row)
            log(
                f"seed {seed} {method} rate {rate:.2f}: balanced acc {row.balanced_accuracy:.3f}, "
                f"other class + {attribute} {row.other_attribute:.3f} ({seconds}s)"
            )
    return rows


# ------------------------------------------------------------------ tables and plots

METRICS = ("balanced_accuracy", "other_attribute", "positive_without", "worst_group")


@dataclass
class Summary:
    method: str
    rate: float
    n: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    parameters: int = 0
    macs: int = 0


def summarise(rows: list[Row]) -> list[Summary]:
    """Mean and (sample) standard deviation over seeds per (method, rate)."""
    order = {"none": 0, "projected": 1, "lrp": 2, "cnp": 3}
    keys = sorted({(r.method, r.rate) for r in rows}, key=lambda k: (k[1], order.get(k[0], 9)))
    out = []
    for method, rate in keys:
        chosen = [r for r in rows if (r.method, r.rate) == (method, rate)]
        values = {m: np.array([getattr(r, m) for r in chosen]) for m in METRICS}
        out.append(
            Summary(
                method=method,
                rate=rate,
                n=len(chosen),
                mean={m: float(v.mean()) for m, v in values.items()},
                std={m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
                parameters=int(np.mean([r.parameters for r in chosen])),
                macs=int(np.mean([r.macs for r in chosen])),
            )
        )
    return out


def best_matched(summary: list[Summary], tolerance: float = 0.01) -> dict:
    """The rate where CNP's "other class + attribute" accuracy most exceeds vanilla's,
    among rates where CNP's balanced accuracy is within ``tolerance`` of the unpruned
    model's or better (all rates when none qualifies; ``qualified`` says which)."""
    base = next(s for s in summary if s.method == "none")
    by = {(s.method, s.rate): s for s in summary}
    rates = sorted({s.rate for s in summary if s.method == "cnp"})
    candidates = []
    for rate in rates:
        cnp, lrp = by[("cnp", rate)], by.get(("lrp", rate))
        if lrp is None:
            continue
        gap = cnp.mean["other_attribute"] - lrp.mean["other_attribute"]
        ok = cnp.mean["balanced_accuracy"] >= base.mean["balanced_accuracy"] - tolerance
        candidates.append((ok, gap, rate))
    if not candidates:
        return {}
    qualified = [c for c in candidates if c[0]]
    ok, gap, rate = max(qualified or candidates, key=lambda c: c[1])
    cnp, lrp = by[("cnp", rate)], by[("lrp", rate)]
    return {
        "rate": rate,
        "qualified": ok,
        "gap_other_attribute": gap,
        "cnp_other_attribute": cnp.mean["other_attribute"],
        "lrp_other_attribute": lrp.mean["other_attribute"],
        "cnp_balanced_accuracy": cnp.mean["balanced_accuracy"],
        "unpruned_balanced_accuracy": base.mean["balanced_accuracy"],
        "target_met": bool(ok and gap >= 0.15),
    }


def markdown(summary: list[Summary], best: dict, attribute: str, config: ExperimentConfig) -> str:
    names = {
        "none": "unpruned",
        "projected": "unpruned, subspace projected out",
        "lrp": "LRP (vanilla)",
        "cnp": "CNP" + (" (projection kept)" if config.keep_projection else ""),
    }
    head = (
        f"| method | rate | balanced acc. | other class + {attribute} | "
        f"positive class, no {attribute} | worst group | parameters | MACs |"
    )
    lines = [
        f"{config.style.capitalize()} benchmark, {config.image_size} px: "
        f"{len(config.seeds) - len(config.unflagged)} of {len(config.seeds)} models flagged "
        f"and compared, {config.concept} concept at "
        f"`{config.layer}`, schedule {config.schedule} (steps {config.steps}, fine-tuning "
        f"{config.finetune_epochs} epochs{', re-learned subspaces' if config.relearn else ''}). "
        "Mean ± std over seeds.",
        "",
        head,
        "|" + " --- |" * 8,
    ]
    for s in summary:
        cells = [f"{s.mean[m]:.3f} ± {s.std[m]:.3f}" for m in METRICS]
        lines.append(
            f"| {names[s.method]} | {s.rate:.2f} | "
            + " | ".join(cells)
            + f" | {s.parameters:,} | {s.macs:,} |"
        )
    if best:
        lines += [
            "",
            f"Best matched rate {best['rate']:.2f}: CNP {best['cnp_other_attribute']:.3f} vs "
            f"LRP {best['lrp_other_attribute']:.3f} on other class + {attribute} "
            f"({100 * best['gap_other_attribute']:+.1f} points); CNP balanced accuracy "
            f"{best['cnp_balanced_accuracy']:.3f} vs unpruned {best['unpruned_balanced_accuracy']:.3f}. "
            f"Target (+15 points, balanced accuracy within 1 point): "
            f"{'met' if best['target_met'] else 'not met'}.",
        ]
    return "\n".join(lines) + "\n"


def plot(summary: list[Summary], metric: str, ylabel: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    base = next(s for s in summary if s.method == "none")
    ax.axhline(base.mean[metric], color="0.4", linestyle="--", label="unpruned")
    control = [s for s in summary if s.method == "projected"]
    if control:
        ax.axhline(control[0].mean[metric], color="0.6", linestyle=":", label="projected, unpruned")
    for method, label, colour in (("lrp", "LRP pruning", "tab:blue"), ("cnp", "CNP", "tab:red")):
        points = [s for s in summary if s.method == method]
        rates = [s.rate for s in points]
        means = np.array([s.mean[metric] for s in points])
        stds = np.array([s.std[metric] for s in points])
        ax.plot(rates, means, marker="o", color=colour, label=label)
        ax.fill_between(rates, means - stds, means + stds, color=colour, alpha=0.2)
    ax.set_xlabel("pruning rate (fraction of filters)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def read_rows(path: Path) -> list[Row]:
    """The rows :func:`write_outputs` wrote to ``rows.csv``, typed again."""
    cast = {f.name: {"int": int, "str": str}.get(f.type, float) for f in fields(Row)}
    with open(path, newline="") as handle:
        return [Row(**{k: cast[k](v) for k, v in r.items()}) for r in csv.DictReader(handle)]


def write_outputs(
    rows: list[Row], config: ExperimentConfig, attribute: str, output: Path
) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "rows": output / "rows.csv",
        "summary_csv": output / "summary.csv",
        "summary_md": output / "summary.md",
        "config": output / "config.json",
        "balanced_accuracy": output / "balanced_accuracy.png",
        "other_attribute": output / f"other_class_{file_stem(attribute)}.png",
    }
    # Every CSV cell goes through csv_cell: a spreadsheet must not run one as a formula.
    with open(paths["rows"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in asdict(r).items()} for r in rows)
    summary = summarise(rows)
    with open(paths["summary_csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "rate",
                "n",
                *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
                "parameters",
                "macs",
            ]
        )
        for s in summary:
            stats = [v for m in METRICS for v in (s.mean[m], s.std[m])]
            writer.writerow(map(csv_cell, [s.method, s.rate, s.n, *stats, s.parameters, s.macs]))
    best = best_matched(summary)
    paths["summary_md"].write_text(markdown(summary, best, attribute, config))
    paths["config"].write_text(json.dumps({**asdict(config), "best_matched": best}, indent=2))
    plot(summary, "balanced_accuracy", "balanced accuracy", paths["balanced_accuracy"])
    plot(
        summary, "other_attribute", f"accuracy, other class + {attribute}", paths["other_attribute"]
    )
    return paths


def run_experiment(
    config: ExperimentConfig, output: Path, log: Callable[[str], None] = print
) -> list[Row]:
    """Every seed's model in turn. A model whose audit flags nothing has no concept to
    prune (the service refuses ``--prune cnp`` then): it is logged, counted in the
    summary and left out of the comparison, which stays paired."""
    rows: list[Row] = []
    config.unflagged = []
    for seed in config.seeds:
        bench, model, table, splits = load_benchmark(config, seed)
        config.benchmark = bench.dataset.parent.name
        config.layer = config.layer or bench.layer
        try:
            rows += run_seed(
                bench, model, table, splits, config, seed, log=log, cache=output / "concepts"
            )
        except NoFlaggedSubspace as err:
            log(f"seed {seed}: not flagged, left out: {err}")
            config.unflagged.append(seed)
        if rows:
            write_outputs(rows, config, bench.attribute, output)  # partial results survive
    if not rows:  # no model flagged: the configuration says so
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(asdict(config), indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnp_core.experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=Path(".cnp/experiment"))
    parser.add_argument(
        "--seeds", type=int, default=5, help="number of models: training seeds 0..n-1"
    )
    parser.add_argument("--rates", type=float, nargs="+", default=list(ExperimentConfig.rates))
    defaults = ExperimentConfig()
    parser.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--reference-per-class", type=int, default=defaults.reference_per_class)
    parser.add_argument(
        "--relearn", action="store_true", help="re-learn the subspace after fine-tuning"
    )
    parser.add_argument(
        "--keep-projection",
        action=argparse.BooleanOptionalAction,
        default=defaults.keep_projection,
        help="fold P into the CNP model itself",
    )
    parser.add_argument("--concept", choices=["drsa", "cav"], default=defaults.concept)
    parser.add_argument(
        "--k", type=int, nargs="+", default=list(defaults.n_subspaces), help="DRSA Ks"
    )
    parser.add_argument("--layer", default=defaults.layer, help="'' for the benchmark's")
    parser.add_argument("--drsa-max-epochs", type=int, default=defaults.drsa_max_epochs)
    parser.add_argument(
        "--concept-composite", default=defaults.concept_composite, help="context of the fit"
    )
    parser.add_argument("--scope", choices=PRUNE_SCOPES, default=defaults.scope)
    parser.add_argument("--style", choices=["watermark", "text"], default=defaults.style)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default=defaults.device)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ExperimentConfig(
        seeds=tuple(range(args.seeds)),
        rates=tuple(args.rates),
        schedule=args.schedule,
        steps=args.steps,
        finetune_epochs=args.finetune_epochs,
        learning_rate=args.learning_rate,
        reference_per_class=args.reference_per_class,
        relearn=args.relearn,
        keep_projection=args.keep_projection,
        concept=args.concept,
        n_subspaces=tuple(args.k),
        layer=args.layer,
        drsa_max_epochs=args.drsa_max_epochs,
        concept_composite=args.concept_composite,
        scope=args.scope,
        style=args.style,
        image_size=args.image_size,
        device=args.device,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if not run_experiment(config, args.output, log):
        print(f"no model was flagged (seeds {config.unflagged}): CNP has nothing to remove")
        return 1
    print((args.output / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
