"""Pruned model latency: the compact model at 30 % and 50 % of filters removed vs unpruned.

The models are pruned through the public path, ``cnp_core.pruning.prune`` with vanilla
LRP scores (``PruneSpec(method="lrp")``, one-shot, global ranking, coupled channels
removed together by Torch-Pruning's dependency graph), and the ``compact`` model it
returns is timed on the CPU at batch 1 and batch 32 against the unpruned model, all
models interleaved round by round, medians compared. Random-init torchvision models
(seeded) scored on generated reference images: latency does not depend on the weights,
only on which channels go. The note beside each ratio gives the same ratio in CPU time
(this process, all threads), which other programs on the machine disturb less, and in
multiply-accumulates.

Targets: latency ratio <= 0.75 at 30 % removed and <= 0.55 at 50 %.

    python -m bench.pruned_latency [--quick] [--arch resnet18:128 --arch vgg11:64]
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from . import common

TARGETS = {0.3: 0.75, 0.5: 0.55}
DEFAULT_ARCHS = ("resnet18:128", "vgg11:64")
QUICK_ARCHS = ("resnet18:32",)


def _latencies(
    models: dict[str, nn.Module], x: torch.Tensor, calls: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU milliseconds per forward pass of each model on ``x``, per round
    (interleaved)."""

    def contender(model: nn.Module):
        def go() -> None:
            for _ in range(calls):
                model(x)

        return go

    cpu: dict[str, list[float]] = {}
    with torch.inference_mode():
        seconds = common.interleaved(
            {name: contender(m) for name, m in models.items()}, rounds, warmup=1, cpu=cpu
        )

    def per_call(table: dict[str, list[float]]) -> dict[str, list[float]]:
        return {name: [1e3 * s / calls for s in t] for name, t in table.items()}

    return per_call(seconds), per_call(cpu)


def _one(arch: str, size: int, quick: bool) -> tuple[list[common.Check], dict[str, Any]]:
    import torch_pruning as tp

    from cnp_core.pruning import prune
    from cnp_core.spec import PruneSpec

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=2).eval()
    g = torch.Generator().manual_seed(1)
    per_class = 2 if quick else 8
    reference = (
        torch.randn(2 * per_class, 3, size, size, generator=g),
        torch.arange(2 * per_class) % 2,
    )
    models: dict[str, nn.Module] = {"unpruned": model}
    pruning: dict[str, Any] = {}
    for rate in TARGETS:
        out = prune(model, PruneSpec(method="lrp", rate=rate), reference, batch_size=8)
        models[f"{rate:.0%}"] = out.compact.eval()
        pruning[f"{rate:.0%}"] = {
            "filters_removed": out.summary.filters_removed,
            "filters_total": out.summary.filters_total,
            "seconds": out.history[0].seconds,
        }
    example = reference[0][:1]
    for name, m in models.items():
        macs, params = tp.utils.count_ops_and_params(m, example)
        pruning.setdefault(name, {}).update(macs=int(macs), parameters=int(params))
    rounds = 2 if quick else 7
    measured = {
        1: _latencies(models, example, calls=3 if quick else 20, rounds=rounds),
        32: _latencies(models, torch.randn(32, 3, size, size, generator=g), calls=1, rounds=rounds),
    }
    checks = []
    for batch, (wall, cpu) in measured.items():
        base, base_cpu = common.median(wall["unpruned"]), common.median(cpu["unpruned"])
        for rate, target in TARGETS.items():
            name = f"{rate:.0%}"
            ratio = common.median(wall[name]) / base
            macs = pruning[name]["macs"] / pruning["unpruned"]["macs"]
            cpu_ratio = common.median(cpu[name]) / base_cpu
            checks.append(
                common.Check(
                    f"{arch}@{size} {name} removed, batch {batch}",
                    ratio,
                    "<=",
                    target,
                    note=f"{common.median(wall[name]):.1f} vs {base:.1f} ms; "
                    f"CPU time {cpu_ratio:.2f}x; MACs {macs:.2f}x",
                )
            )
    details = {
        "size": size,
        "models": pruning,
        "latency_ms": {
            str(batch): {name: common.spread(t) for name, t in wall.items()}
            for batch, (wall, _) in measured.items()
        },
        "cpu_ms": {
            str(batch): {name: common.spread(t) for name, t in cpu.items()}
            for batch, (_, cpu) in measured.items()
        },
    }
    return checks, details


def _measure(quick: bool = False, *, archs: list[str] | None = None) -> common.BenchResult:
    archs = list(archs or (QUICK_ARCHS if quick else DEFAULT_ARCHS))
    checks: list[common.Check] = []
    details: dict[str, Any] = {"threads": torch.get_num_threads()}
    for item in archs:
        arch, _, size = item.partition(":")
        size_px = int(size or 64)
        more, info = _one(arch, size_px, quick)
        checks += more
        details[f"{arch}@{size_px}"] = info
    title = "Pruned model CPU latency (compact / unpruned): " + ", ".join(archs)
    return common.BenchResult("pruned_latency", title, checks, details)


def run(quick: bool = False, write: bool = True, **options: Any) -> dict[str, Any]:
    """Measure, print the table, write ``bench/results/pruned_latency.json``."""
    return common.report(common.timed(_measure, quick=quick, **options), write)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--arch",
        action="append",
        default=None,
        help="torchvision architecture and input size, e.g. resnet18:128 (repeatable)",
    )
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    run(args.quick, not args.no_write, archs=args.arch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
