"""Pruned model latency: the compact model at 30 % and 50 % of filters removed vs unpruned.

The models are pruned through the public path, ``cnp_core.pruning.schedule.prune`` with vanilla
LRP scores (``PruneSpec(method="lrp")``, one-shot, global ranking, coupled channels
removed together by Torch-Pruning's dependency graph; the hidden neurons of the fully
connected layers, e.g. VGG's classifier, go at the same rate, ranked apart from the
filters), and the ``compact`` model it returns is timed on the CPU (or ``--device cuda``)
at batch 1 and batch 32 against the unpruned model, all models interleaved round by round, medians compared.
Random-init torchvision models (seeded) scored on generated reference images: latency
does not depend on the weights, only on which channels go.

Two baselines. The compact model cnp ships is inference-ready (BatchNorms folded into
their convolutions, channels-last weights: ``cnp_core.export.for_inference``), so the
headline ratio compares it with the unpruned model as the user gave it (what a user sees
when swapping one for the other). The note beside it gives the ratio against the unpruned
model optimised the same way (what the removed channels alone buy), the CPU-time ratio
(this process, all threads; other programs disturb it less) and the multiply-accumulates;
the JSON holds every ratio under ``details.<arch>.ratios``.

Targets: latency ratio <= 0.75 at 30 % removed and <= 0.55 at 50 %.

    python -m bench.pruned_latency [--quick] [--device cuda] [--arch resnet18:128 --arch vgg11:64]
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
OPTIMISED = "unpruned optimised"


def _latencies(
    models: dict[str, nn.Module], x: torch.Tensor, calls: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU milliseconds per forward pass of each model on ``x``, per round
    (interleaved)."""

    def contender(model: nn.Module):
        def go() -> None:
            for _ in range(calls):
                model(x)
            if x.is_cuda:  # kernels run asynchronously: time them, not their launch
                torch.cuda.synchronize(x.device)

        return go

    cpu: dict[str, list[float]] = {}
    with torch.inference_mode():
        seconds = common.interleaved(
            {name: contender(m) for name, m in models.items()}, rounds, warmup=1, cpu=cpu
        )

    def per_call(table: dict[str, list[float]]) -> dict[str, list[float]]:
        return {name: [1e3 * s / calls for s in t] for name, t in table.items()}

    return per_call(seconds), per_call(cpu)


def _one(
    arch: str, size: int, quick: bool, device: str
) -> tuple[list[common.Check], dict[str, Any]]:
    import torch_pruning as tp

    from cnp_core.export import for_inference
    from cnp_core.pruning.schedule import prune
    from cnp_core.spec import PruneSpec

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=2).eval()
    g = torch.Generator().manual_seed(1)
    per_class = 2 if quick else 8
    reference = (
        torch.randn(2 * per_class, 3, size, size, generator=g),
        torch.arange(2 * per_class) % 2,
    )
    models: dict[str, nn.Module] = {"unpruned": model, OPTIMISED: for_inference(model)}
    pruning: dict[str, Any] = {}
    for rate in TARGETS:
        out = prune(model, PruneSpec(method="lrp", rate=rate), reference, batch_size=8)
        models[f"{rate:.0%}"] = out.compact.eval()
        pruning[f"{rate:.0%}"] = {
            "filters_removed": out.summary.filters_removed,
            "filters_total": out.summary.filters_total,
            "neurons_removed": out.summary.neurons_removed,
            "neurons_total": out.summary.neurons_total,
            "seconds": out.history[0].seconds,
        }
    example = reference[0][:1]
    for name, m in models.items():
        macs, params = tp.utils.count_ops_and_params(m, example)
        pruning.setdefault(name, {}).update(macs=int(macs), parameters=int(params))
    models = {name: m.to(device) for name, m in models.items()}
    batch = torch.randn(32, 3, size, size, generator=g)
    rounds = 2 if quick else 7
    measured = {
        1: _latencies(models, example.to(device), calls=3 if quick else 20, rounds=rounds),
        32: _latencies(models, batch.to(device), calls=1, rounds=rounds),
    }
    checks, ratios = [], {}
    for batch, (wall, cpu) in measured.items():
        ms = {name: common.median(t) for name, t in wall.items()}
        cpu_ms = {name: common.median(t) for name, t in cpu.items()}
        for rate, target in TARGETS.items():
            name = f"{rate:.0%}"
            ratio = {
                "vs_unpruned": ms[name] / ms["unpruned"],
                "vs_unpruned_optimised": ms[name] / ms[OPTIMISED],
                "cpu_vs_unpruned": cpu_ms[name] / cpu_ms["unpruned"],
                "cpu_vs_unpruned_optimised": cpu_ms[name] / cpu_ms[OPTIMISED],
                "macs": pruning[name]["macs"] / pruning["unpruned"]["macs"],
            }
            ratios.setdefault(str(batch), {})[name] = ratio
            checks.append(
                common.Check(
                    f"{arch}@{size} {name} removed, batch {batch}",
                    ratio["vs_unpruned"],
                    "<=",
                    target,
                    note=f"{ms[name]:.1f} vs {ms['unpruned']:.1f} ms; "
                    f"vs unpruned optimised alike {ratio['vs_unpruned_optimised']:.2f}x; "
                    f"CPU time {ratio['cpu_vs_unpruned']:.2f}x; MACs {ratio['macs']:.2f}x",
                )
            )
    details = {
        "size": size,
        "baselines": {
            "unpruned": "the model as the user gave it (BatchNorm, contiguous weights)",
            OPTIMISED: "the unpruned model made inference-ready like the compact ones "
            "(BatchNorm folded, channels-last)",
            "compact": "30% and 50%: the compact models as cnp.prune ships them",
        },
        "ratios": ratios,
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


def _measure(
    quick: bool = False, *, archs: list[str] | None = None, device: str = "cpu"
) -> common.BenchResult:
    archs = list(archs or (QUICK_ARCHS if quick else DEFAULT_ARCHS))
    checks: list[common.Check] = []
    details: dict[str, Any] = {"threads": torch.get_num_threads()}
    for item in archs:
        arch, _, size = item.partition(":")
        size_px = int(size or 64)
        more, info = _one(arch, size_px, quick, device)
        checks += more
        details[f"{arch}@{size_px}"] = info
    where = "CPU" if device == "cpu" else device
    title = f"Pruned model {where} latency (compact / unpruned): " + ", ".join(archs)
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
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    run(args.quick, not args.no_write, archs=args.arch, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
