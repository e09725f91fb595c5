"""LRP collection throughput: cnp's activation + context collection at a layer vs autograd.

Images per second of ``cnp_core.collect.collect_instances`` (LRP through zennit with the
context tap at one layer, plus sampling the instance rows) against a plain autograd
forward + backward of the same model on the same batches and device. Two baselines:

- ``autograd``: the model as built (parameters require grad), ``logits.backward(start)``
  with the same start relevance as LRP: what "a forward and a backward pass" costs when
  training. The target (ratio >= 0.85) is taken against this one.
- ``input-grad``: parameters frozen, gradient w.r.t. the input only (the cheapest
  backward there is), reported beside it.

Random-init torchvision models on generated images; the weights do not change the cost.

    python -m bench.lrp_collection [--quick] [--device cuda] [--arch vgg16 --size 224 --images 2000]
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torchvision

from . import common

TARGET = 0.85
DEFAULT_LAYERS = {"resnet18": "layer3", "vgg16": "features.22", "vgg11": "features.15"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(
    quick: bool = False,
    *,
    device: str = "cpu",
    arch: str = "resnet18",
    size: int | None = None,
    images: int | None = None,
    batch: int | None = None,
    layer: str | None = None,
    repeats: int | None = None,
) -> common.BenchResult:
    from cnp_core.collect import collect_instances
    from cnp_core.lrp import Explainer

    size = size or (32 if quick else 64)
    images = images or (16 if quick else 128)
    batch = batch or (8 if quick else 32)
    repeats = repeats or (2 if quick else 5)
    layer = layer or DEFAULT_LAYERS.get(arch, "layer3")
    dev = torch.device(device)

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=2).eval().to(dev)
    frozen = torchvision.models.get_model(arch, weights=None, num_classes=2).eval().to(dev)
    frozen.load_state_dict(model.state_dict())
    frozen.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(min(batch, images - s), 3, size, size, generator=g).to(dev),
            torch.arange(s, min(s + batch, images)),
        )
        for s in range(0, images, batch)
    ]
    target = 1

    def start_of(logits: torch.Tensor) -> torch.Tensor:
        # The same initial relevance as Explainer.explain: the target logit itself.
        start = torch.zeros_like(logits)
        start[:, target] = logits.detach()[:, target]
        return start

    def autograd() -> None:
        for x, _ in data:
            model.zero_grad(set_to_none=True)
            x = x.detach().requires_grad_(True)
            logits = model(x)
            logits.backward(start_of(logits))
        _sync(dev)

    def input_grad() -> None:
        for x, _ in data:
            x = x.detach().requires_grad_(True)
            logits = frozen(x)
            torch.autograd.grad(logits, x, start_of(logits))
        _sync(dev)

    began = time.perf_counter()
    explainer = Explainer(model, [layer], device=dev).__enter__()
    setup = time.perf_counter() - began
    rows = [0]

    def cnp() -> None:
        out = collect_instances(explainer, data, target, per_image=20, seed=1)
        rows[0] = out[layer].activations.shape[0]
        _sync(dev)

    cpu: dict[str, list[float]] = {}
    try:
        times = common.interleaved(
            {"cnp": cnp, "autograd": autograd, "input-grad": input_grad}, repeats, cpu=cpu
        )
    finally:
        explainer.__exit__(None, None, None)
    med = {name: common.median(t) for name, t in times.items()}
    rate = {name: images / m for name, m in med.items()}
    ratio = rate["cnp"] / rate["autograd"]
    strict = rate["cnp"] / rate["input-grad"]
    cpu_ratio = common.median(cpu["autograd"]) / common.median(cpu["cnp"])
    checks = [
        common.Check(
            "cnp / autograd images/s",
            ratio,
            ">=",
            TARGET,
            note=f"{rate['cnp']:.1f} vs {rate['autograd']:.1f} img/s; "
            f"vs input-grad only ({rate['input-grad']:.1f} img/s): {strict:.2f}x; "
            f"in CPU time {cpu_ratio:.2f}x",
        ),
    ]
    details: dict[str, Any] = {
        "arch": arch,
        "layer": layer,
        "image_size": size,
        "images": images,
        "batch": batch,
        "repeats": repeats,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "images_per_second": rate,
        "ratio_vs_autograd": ratio,
        "ratio_vs_input_grad": strict,
        "seconds": {name: common.spread(t) for name, t in times.items()},
        "cpu_seconds": {name: common.spread(t) for name, t in cpu.items()},
        "ratio_vs_autograd_cpu_time": cpu_ratio,
        "explainer_setup_seconds": setup,
        "instance_rows": rows[0],
    }
    title = f"LRP collection: {arch} {size}px, {images} images, batch {batch}, {dev}"
    return common.BenchResult("lrp_collection", title, checks, details)


def run(quick: bool = False, write: bool = True, **options: Any) -> dict[str, Any]:
    """Measure, print the table, write ``bench/results/lrp_collection.json``."""
    return common.report(common.timed(_measure, quick=quick, **options), write)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet18", help="torchvision architecture")
    p.add_argument("--size", type=int, default=None, help="image side in pixels")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--layer", default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    opts = {k: getattr(args, k) for k in ("device", "arch", "size", "images", "batch", "layer")}
    run(args.quick, not args.no_write, repeats=args.repeats, **opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
