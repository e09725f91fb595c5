"""The seed's ImageNet experiment as a recipe: VGG-16, carton vs dugong (and crate vs packet).

For a user who has ImageNet and torchvision's VGG-16 weights on disk. The recipe turns
two ImageNet classes into a cnp dataset (images + ``labels.csv`` with a ``watermark``
column) and prints, or runs, the ``cnp audit`` command of the seed's experiment: DRSA with
K = 4 at VGG-16's conv4_3 (``features.22``, the output of its ReLU), explaining the first
class of the pair, optionally followed by CNP pruning.

Input: the standard ImageNet layout, as torchvision's ``ImageFolder`` reads it::

    <imagenet>/train/<wnid>/*.JPEG     the training images of each class
    <imagenet>/val/<wnid>/*.JPEG       the 50 validation images, sorted into wnid folders

Only the two class folders of the pair are read. The pairs (wnid, torchvision output
index, which is the index of the wnid in sorted order):

    carton-dugong   carton n02971356 (478)  vs  dugong n02074367 (149)
    crate-packet    crate  n03127925 (519)  vs  packet n03871628 (692)

Watermark labels come from the user, in one or both of two ways:

- ``--watermarks labels.csv``: columns ``path,watermark`` (0/1), paths relative to the
  ImageNet root (``train/n02971356/n02971356_1234.JPEG``); images it does not list are 0.
- ``--overlay logo.png``: an RGBA image stamped (seeded corner and scale) onto a seeded
  ``--overlay-fraction`` (default half) of the val and test images of *both* classes,
  written as new files under ``<out>/overlay/``; those rows get watermark 1, so the val
  and test splits have balanced (class, watermark) groups, the seed's "Dugong + WM".
  Val is stamped too because the audit chooses the flagged subspace on val.

Output (``--out DIR``, new or empty): ImageNet's images at their ImageNet paths, hard
links where the file system allows, else copies (never symlinks: the dataset loader
refuses links that leave the root), and ``labels.csv`` (``path,label,split,watermark``).
Labels are the ImageNet indices, because the model is the 1000-class VGG-16. Splits:
ImageNet train -> train, less a seeded ``--val-fraction`` (default 10 %) -> val; ImageNet
val -> test.

    python -m bench.imagenet --imagenet /data/imagenet --pair carton-dugong \\
        --out /data/cnp/carton-dugong --overlay watermark.png \\
        --weights ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth

prints (paths made absolute)::

    cnp audit --model vgg16 --weights .../vgg16-397923af.pth --num-classes 1000 \\
        --dataset /data/cnp/carton-dugong --input-size 224 --mean 0.485,0.456,0.406 \\
        --std 0.229,0.224,0.225 --layer features.22 --attribute watermark \\
        --positive-class 478 --negative-class 149 --subspaces 4 --composite gradient \
        --json /data/cnp/carton-dugong/report.json

(``--composite`` is the spec's default, written out so the command says what ran.) Add
``--prune cnp`` for the pruning stage (``--prune-rate 0.1 --prune-scope upstream
--no-keep-projection``: one-shot, the filters that feed the audited layer, the projection
only in the attribution copy as in the seed's CNP, because it cannot be folded through
the max pool after ``features.22``; pruning needs the audit to flag a subspace, else the
job fails and says so), ``--device cuda`` for a GPU, ``--set
FIELD=VALUE`` for any other AuditSpec field (``--set drsa_restarts=1``, ``--set
prune.finetune_epochs=1``), ``--run HOST:PORT`` to submit it at once, and
``--no-prepare`` to skip writing a dataset that exists. The server must allow both paths:
``cnp-server --allow-root /data/cnp --allow-root ~/.cache/torch/hub/checkpoints``.
crate-packet works alike (``--pair crate-packet``).

What the accuracies mean: the pipeline takes the argmax over all 1000 logits, so every
accuracy in the report is 1000-way top-1 accuracy on the pair's test images (a carton
called "crate" counts as wrong, like one called "dugong"), and balanced accuracy is the
mean of the two classes' 1000-way recalls, not a two-class accuracy. Images are resized
to ``--input-size`` squared without cropping (not torchvision's resize-256 + crop-224).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import os
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from cnp_client.spec_flags import _int_list, spec_arguments
from cnp_core.errors import InvalidSpec
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef, PruneSpec

from .common import spec_setting


@dataclass(frozen=True)
class ImageNetClass:
    wnid: str
    index: int  # torchvision's output index: the wnid's position in sorted order
    name: str


@dataclass(frozen=True)
class Pair:
    positive: ImageNetClass  # the class explained: suspected of relying on the watermark
    negative: ImageNetClass


PAIRS = {
    "carton-dugong": Pair(
        ImageNetClass("n02971356", 478, "carton"), ImageNetClass("n02074367", 149, "dugong")
    ),
    "crate-packet": Pair(
        ImageNetClass("n03127925", 519, "crate"), ImageNetClass("n03871628", 692, "packet")
    ),
}

ARCHITECTURE = "vgg16"
WEIGHTS = Path("~/.cache/torch/hub/checkpoints/vgg16-397923af.pth")  # torchvision's file
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# conv4_3 after its ReLU (ALGORITHMS.md section 1). The convolution's own output
# (features.21) cannot be audited: it reaches the next LRP rule through the ReLU.
LAYER = "features.22"
ATTRIBUTE = "watermark"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
OVERLAY_WIDTH = (0.25, 0.5)  # stamped logo width, as a fraction of the image width
OVERLAY_MARGIN = 0.03  # gap to the image border, as a fraction of the shorter side
STAMPED = "overlay"  # folder of the stamped images inside the output
SPLITS = ("train", "val", "test")


class RecipeError(Exception):
    """Bad input: the message says what to fix."""


# ------------------------------------------------------------------ reading ImageNet


def class_images(imagenet: Path, part: str, cls: ImageNetClass) -> list[str]:
    """The images of one class in ``train`` or ``val``, relative to the ImageNet root."""
    folder = imagenet / part / cls.wnid
    if not folder.is_dir():
        hint = " (val sorted into wnid folders, as ImageFolder expects)" if part == "val" else ""
        raise RecipeError(
            f"{part}/{cls.wnid} ({cls.name}) is missing under {imagenet}: expected the "
            f"standard layout <imagenet>/{part}/<wnid>/*.JPEG{hint}"
        )
    names = sorted(
        p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not names:
        raise RecipeError(f"{part}/{cls.wnid} ({cls.name}) under {imagenet} holds no images")
    return [f"{part}/{cls.wnid}/{name}" for name in names]


def _inside_path(text: str, where: str) -> str:
    """A path relative to the ImageNet root, normalised; refused when it could leave it."""
    cleaned = text.strip().replace("\\", "/")
    if not cleaned:
        raise RecipeError(f"{where}: empty path")
    if PurePosixPath(cleaned).is_absolute() or PureWindowsPath(text.strip()).anchor:
        raise RecipeError(f"{where}: path {text!r} is absolute; give it relative to the root")
    if ".." in PurePosixPath(cleaned).parts:
        raise RecipeError(f"{where}: path {text!r} uses '..' to leave the ImageNet root")
    return str(PurePosixPath(cleaned))


def read_watermarks(csv_path: Path, imagenet: Path) -> dict[str, int]:
    """``path -> 0/1`` from a user CSV with columns path,watermark (paths under the root)."""
    marks: dict[str, int] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns or ATTRIBUTE not in columns:
            raise RecipeError(
                f"{csv_path.name}: needs the columns path,{ATTRIBUTE}; found: "
                f"{', '.join(columns) or 'none'}"
            )
        reader.fieldnames = columns
        for row in reader:
            where = f"{csv_path.name} line {reader.line_num}"
            if not any(str(v or "").strip() for v in row.values()):
                continue
            path = _inside_path(row["path"] or "", where)
            value = (row[ATTRIBUTE] or "").strip().lower()
            if value not in ("0", "1"):
                raise RecipeError(f"{where}: {ATTRIBUTE} must be 0 or 1, got {value!r}")
            if path in marks:
                raise RecipeError(f"{where}: {path!r} is listed twice")
            if not (imagenet / path).is_file():
                raise RecipeError(f"{where}: no image {path!r} under the ImageNet root")
            marks[path] = int(value)
    return marks


# ------------------------------------------------------------------ writing the dataset


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """One generator per purpose and class, so one option does not shift another's draws."""
    return np.random.default_rng([seed, *keys])


def _pick(count: int, fraction: float, rng: np.random.Generator) -> set[int]:
    """A seeded ``fraction`` of ``range(count)``; at least one and one left when possible."""
    chosen = int(round(fraction * count))
    if fraction > 0 and count >= 2:
        chosen = min(max(chosen, 1), count - 1)
    return {int(i) for i in rng.permutation(count)[:chosen]}


def link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` at ``target`` (True), or copy it where links fail (False).

    A hard link is a real file in the dataset, unlike a symlink, which the loader would
    refuse; copying is the fallback across file systems.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copyfile(source, target)
        return False


def stamp(image, logo, rng: np.random.Generator):
    """``image`` (RGB) with ``logo`` (RGBA) pasted at a seeded corner and width."""
    from PIL import Image

    width = max(1, round(rng.uniform(*OVERLAY_WIDTH) * image.width))
    height = max(1, min(round(width * logo.height / logo.width), image.height))
    mark = logo.resize((width, height), Image.Resampling.LANCZOS)
    margin = round(OVERLAY_MARGIN * min(image.size))
    corner = int(rng.integers(4))
    x = margin if corner % 2 == 0 else image.width - width - margin
    y = margin if corner < 2 else image.height - height - margin
    out = image.copy()
    out.paste(mark, (max(x, 0), max(y, 0)), mark)  # the alpha channel is the paste mask
    return out


def _write_stamped(source: Path, target: Path, logo, rng: np.random.Generator) -> None:
    from PIL import Image

    with Image.open(source) as image:
        stamped = stamp(image.convert("RGB"), logo, rng)
    target.parent.mkdir(parents=True, exist_ok=True)
    stamped.save(target, "JPEG", quality=95)


def _load_logo(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as logo:
            return logo.convert("RGBA")
    except (OSError, UnidentifiedImageError) as err:
        raise RecipeError(f"overlay {path}: not an image PIL can read ({err})") from None


@dataclass
class Prepared:
    """What :func:`prepare` wrote."""

    root: Path
    rows: list[tuple[str, int, str, int]]  # path, label, split, watermark
    linked: int = 0
    copied: int = 0
    stamped: int = 0
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> Counter:
        """Images per (split, label, watermark)."""
        return Counter((split, label, mark) for _, label, split, mark in self.rows)

    def summary(self) -> str:
        lines = [f"dataset written to {self.root}: {len(self.rows)} images"]
        for (split, label, mark), n in sorted(self.counts().items()):
            lines.append(f"  {split:<5} class {label:<4} {ATTRIBUTE}={mark}  {n}")
        lines.append(f"  {self.linked} hard-linked, {self.copied} copied, {self.stamped} stamped")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def _empty_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecipeError(f"output {out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)


def _split_class(
    imagenet: Path, cls: ImageNetClass, val_fraction: float, train_per_class: int, seed: int
) -> list[tuple[str, str]]:
    """(ImageNet path, split) of one class: train -> train and val, val -> test."""
    train = class_images(imagenet, "train", cls)
    if 0 < train_per_class < len(train):
        keep = sorted(_rng(seed, cls.index, 0).permutation(len(train))[:train_per_class])
        train = [train[i] for i in keep]
    held = _pick(len(train), val_fraction, _rng(seed, cls.index, 1))
    rows = [(p, "val" if i in held else "train") for i, p in enumerate(train)]
    return rows + [(p, "test") for p in class_images(imagenet, "val", cls)]


def prepare(
    imagenet: Path,
    out: Path,
    pair: Pair,
    *,
    watermarks: Path | None = None,
    overlay: Path | None = None,
    overlay_fraction: float = 0.5,
    val_fraction: float = 0.1,
    train_per_class: int = 0,
    seed: int = 0,
) -> Prepared:
    """Write the cnp dataset of ``pair`` into ``out`` (new or empty); see the module doc."""
    if watermarks is None and overlay is None:
        raise RecipeError("give --watermarks FILE.csv, --overlay LOGO.png, or both")
    if not 0 <= val_fraction < 1 or not 0 < overlay_fraction < 1:
        raise RecipeError("val fraction must lie in [0, 1) and overlay fraction in (0, 1)")
    imagenet = Path(imagenet).expanduser()
    if not imagenet.is_dir():
        raise RecipeError(f"ImageNet root {imagenet} is not a directory")
    plan = {
        cls: _split_class(imagenet, cls, val_fraction, train_per_class, seed)
        for cls in (pair.positive, pair.negative)
    }
    marks = read_watermarks(Path(watermarks), imagenet) if watermarks else {}
    logo = _load_logo(Path(overlay)) if overlay else None
    out = Path(out).expanduser()
    _empty_output(out)
    done = Prepared(root=out.resolve(), rows=[])
    for cls, rows in plan.items():
        for n, split in enumerate(SPLITS):
            paths = [p for p, s in rows if s == split]
            stamped = set()
            if logo is not None and split != "train":  # val chooses the flag, test reports
                stamped = _pick(len(paths), overlay_fraction, _rng(seed, cls.index, 2, n))
            for i, path in enumerate(paths):
                if i in stamped:
                    name = str(PurePosixPath(STAMPED, path).with_suffix(".JPEG"))
                    _write_stamped(imagenet / path, out / name, logo, _rng(seed, cls.index, 3, i))
                    done.stamped += 1
                    done.rows.append((name, cls.index, split, 1))
                    continue
                if link_or_copy(imagenet / path, out / path):
                    done.linked += 1
                else:
                    done.copied += 1
                done.rows.append((path, cls.index, split, marks.get(path, 0)))
    _check_attribute(done)
    _write_labels(out, done.rows)
    return done


def _check_attribute(done: Prepared) -> None:
    """Warn where the audit will have nothing to choose or report on."""
    for split, use in (("val", "choose the flagged subspace"), ("test", "report an AP")):
        values = {mark for _, _, s, mark in done.rows if s == split}
        if values != {0, 1}:
            done.warnings.append(
                f"the {split} split lacks images with and without a {ATTRIBUTE}: the audit "
                f"cannot {use}"
            )


def _write_labels(out: Path, rows: list[tuple[str, int, str, int]]) -> None:
    """labels.csv, written last and renamed into place: its presence means complete."""
    temporary = out / "labels.csv.tmp"
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", ATTRIBUTE])
        writer.writerows(rows)
    os.replace(temporary, out / "labels.csv")


# ------------------------------------------------------------------ the audit


def audit_spec(
    dataset: str | Path,
    weights: str | Path,
    pair: Pair,
    *,
    input_size: int = 224,
    layer: str = LAYER,
    subspaces: tuple[int, ...] = (4,),
    device: str = "cpu",
    prune: PruneSpec | None = None,
    **fields: Any,
) -> AuditSpec:
    """The seed's audit of ``pair`` as a spec; ``fields`` set any other AuditSpec field.

    Paths are made absolute as the ``cnp`` CLI makes them, so the printed command and this
    spec describe the same job.
    """

    def absolute(path: str | Path) -> str:
        return str(Path(path).expanduser().absolute())

    return AuditSpec(
        model=ModelRef(architecture=ARCHITECTURE, weights=absolute(weights), num_classes=1000),
        dataset=DatasetRef(
            root=absolute(dataset), input_size=input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        layers=[layer],
        attributes=[ATTRIBUTE],
        positive_class=pair.positive.index,
        negative_class=pair.negative.index,
        n_subspaces=list(subspaces),
        device=device,
        prune=prune,
        **fields,
    ).validate()


def recipe_prune(method: str, rate: float = 0.1) -> PruneSpec:
    """One-shot pruning of the filters that feed the audited layer, as in the README's CNP
    comparison, but with the projection only in the attribution copy (the seed's CNP): it
    cannot be folded into VGG-16 after ``features.22``, whose next layer is a max pool
    (``--set prune.keep_projection=true`` with ``--layer features.23`` can)."""
    return PruneSpec(method=method, rate=rate, scope="upstream", keep_projection=False)


# Written even when they equal the spec defaults: they are the experiment, and the
# printed command should still describe it when a default changes.
_ALWAYS = {
    "model.architecture",
    "model.weights",
    "model.num_classes",
    "dataset.root",
    "dataset.input_size",
    "dataset.mean",
    "dataset.std",
    "layers",
    "attributes",
    "positive_class",
    "negative_class",
    "n_subspaces",
    "composite",
    "prune.method",
    "prune.rate",
    "prune.scope",
    "prune.keep_projection",
}


def cli_arguments(spec: AuditSpec) -> list[str]:
    """The ``cnp audit`` flags that ask for ``spec``: the experiment's fields and every
    field that differs from the defaults, read from the CLI's own flag table."""
    return spec_arguments(spec, _ALWAYS)


def audit_command(spec: AuditSpec, *, server: str = "", report: Path | None = None) -> list[str]:
    """``cnp audit ...`` for ``spec``, against ``server`` when given, writing ``report``."""
    command = ["cnp", "audit"] + (["--server", server] if server else [])
    command += cli_arguments(spec)
    return command + (["--json", str(Path(report).absolute())] if report else [])


# ------------------------------------------------------------------ command line


# --set FIELD=VALUE of an AuditSpec field or prune.FIELD
_setting = functools.partial(spec_setting, prune=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.imagenet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--imagenet", type=Path, required=True, help="ImageNet root (train/, val/)")
    p.add_argument("--pair", choices=sorted(PAIRS), default="carton-dugong")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    p.add_argument("--watermarks", type=Path, help="CSV path,watermark (paths under ImageNet)")
    p.add_argument("--overlay", type=Path, help="RGBA logo stamped on val and test images")
    p.add_argument("--overlay-fraction", type=float, default=0.5, metavar="F")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F")
    p.add_argument("--train-per-class", type=int, default=0, metavar="N", help="0: all")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and the overlay")
    p.add_argument("--no-prepare", action="store_true", help="use the dataset in --out as is")
    audit = p.add_argument_group("the audit")
    audit.add_argument("--weights", type=Path, default=WEIGHTS, help="default: %(default)s")
    audit.add_argument("--input-size", type=int, default=224, metavar="N")
    audit.add_argument("--layer", default=LAYER)
    audit.add_argument("--subspaces", type=_int_list, default=[4], metavar="K", help="e.g. 2,4,8")
    audit.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]")
    audit.add_argument("--prune", choices=("cnp", "lrp"), help="prune after the audit")
    audit.add_argument("--prune-rate", type=float, default=0.1, metavar="R")
    audit.add_argument("--set", type=_setting, action="append", default=[], metavar="F=V")
    audit.add_argument("--run", metavar="HOST:PORT", help="submit the audit to this server")
    return p


def spec_from_options(args: argparse.Namespace, pair: Pair) -> AuditSpec:
    """The audit spec the recipe's options describe."""
    settings = dict(args.set)
    prune = recipe_prune(args.prune, args.prune_rate) if args.prune else None
    prune_fields = {k[6:]: v for k, v in settings.items() if k.startswith("prune.")}
    if prune_fields and prune is None:
        raise RecipeError("--set prune.*: needs --prune cnp|lrp")
    if prune is not None:
        prune = dataclasses.replace(prune, **prune_fields)
    return audit_spec(
        args.out,
        args.weights,
        pair,
        input_size=args.input_size,
        layer=args.layer,
        subspaces=tuple(args.subspaces),
        device=args.device,
        prune=prune,
        **{k: v for k, v in settings.items() if not k.startswith("prune.")},
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    pair = PAIRS[args.pair]
    try:
        if args.no_prepare:
            if not (args.out / "labels.csv").is_file():
                raise RecipeError(f"--no-prepare: {args.out} has no labels.csv")
        else:
            print(
                prepare(
                    args.imagenet,
                    args.out,
                    pair,
                    watermarks=args.watermarks,
                    overlay=args.overlay,
                    overlay_fraction=args.overlay_fraction,
                    val_fraction=args.val_fraction,
                    train_per_class=args.train_per_class,
                    seed=args.seed,
                ).summary()
            )
        spec = spec_from_options(args, pair)
    except (RecipeError, InvalidSpec, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not Path(spec.model.weights).is_file():
        print(f"note: no weights file {spec.model.weights} here; the server must have it")
    command = audit_command(spec, server=args.run or "", report=args.out / "report.json")
    print(shlex.join(command))
    if not args.run:
        return 0
    # The same command through this interpreter, where cnp_client is installed.
    return subprocess.run([sys.executable, "-m", "cnp_client.cli", *command[1:]]).returncode


if __name__ == "__main__":
    sys.exit(main())
