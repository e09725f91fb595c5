"""The MNIST watermark benchmark: file format, correlations, determinism, caching, reliance."""

from __future__ import annotations

import colorsys
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cnp_core import synthetic
from cnp_core.architectures import build
from cnp_core.synthetic import (
    GenerationParams,
    ensure_benchmark,
    evaluate_groups,
    generate_dataset,
    read_labels,
)

SMALL = {"train_sizes": (100, 200), "val_per_class": 20, "test_per_class": 24}


def _rows(root: Path, split: str) -> list[dict[str, str]]:
    return [row for row in read_labels(root) if row["split"] == split]


def _rate(rows, label: str, attribute: str = "watermark", value: str = "1") -> float:
    members = [row for row in rows if row["label"] == label]
    return sum(row[attribute] == value for row in members) / len(members)


@pytest.fixture(scope="module", params=["watermark", "text"])
def small_dataset(tmp_path_factory, request) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    return generate_dataset(root, GenerationParams(correlation=0.9, style=request.param, **SMALL))


def test_labels_csv_has_the_columns_and_the_requested_correlation(small_dataset):
    with open(small_dataset / "labels.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["path", "label", "split", "watermark"]
    rows = read_labels(small_dataset)
    assert Counter(row["split"] for row in rows) == {"train": 300, "val": 40, "test": 48}
    for split in ("train", "val"):
        part = _rows(small_dataset, split)
        # q = p1 = P(wm | class 1) = 0.5; p0 = P(wm | class 0) = q (1 - rho) / rho = 0.0556
        p1, p0 = _rate(part, "1"), _rate(part, "0")
        assert p1 == pytest.approx(0.5, abs=0.03)
        assert p0 == pytest.approx(0.5 * 0.1 / 0.9, abs=0.03)
    assert p1 / (p0 + p1) == pytest.approx(0.9, abs=0.01)  # rho, on the train split
    groups = Counter((row["label"], row["watermark"]) for row in _rows(small_dataset, "test"))
    assert groups == {("0", "0"): 12, ("0", "1"): 12, ("1", "0"): 12, ("1", "1"): 12}
    assert all(row["path"] == f"images/{row['split']}/{Path(row['path']).stem}.png" for row in rows)


def test_correlation_one_half_makes_attribute_and_class_independent(tmp_path):
    root = generate_dataset(tmp_path, GenerationParams(correlation=0.5, **SMALL))
    train = _rows(root, "train")
    assert _rate(train, "0") == _rate(train, "1") == 0.5


@pytest.mark.parametrize("size", [32, 64])
def test_images_are_rgb_pngs_of_the_requested_size_with_a_visible_watermark(tmp_path, size):
    sizes = {"train_sizes": (4, 4), "val_per_class": 2, "test_per_class": 20}
    root = generate_dataset(tmp_path, GenerationParams(image_size=size, **sizes))
    contrast = {"0": [], "1": []}
    for row in _rows(root, "test"):
        with Image.open(root / row["path"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (size, size))
            pixels = np.asarray(image, dtype=np.float64) / 255.0
        # natural-looking, not flat binary: many distinct colours, the digit drawn in
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > size * size // 4
        contrast[row["watermark"]].append(_glyph_contrast(pixels.mean(2)))
    # white "WM" strokes on a dark badge in the corner, and only where labelled
    assert min(contrast["1"]) > 0.5 > 0.2 > max(contrast["0"])


def _glyph_contrast(gray: np.ndarray) -> float:
    """Brightness of the "WM" strokes minus that of the badge between them, in the corner."""
    scale = max(1, gray.shape[0] // 32)
    glyph = np.array([[c == "X" for c in row] for row in synthetic._WM_GLYPH])
    glyph = np.pad(glyph, 1).repeat(scale, 0).repeat(scale, 1)
    h, w = glyph.shape
    best = -1.0
    for offset in range(scale + 1):  # the stamp's jitter
        patch = gray[gray.shape[0] - h - offset :, gray.shape[1] - w - offset :][:h, :w]
        best = max(best, patch[glyph].mean() - patch[~glyph].mean())
    return best


@pytest.mark.parametrize("style", ["watermark", "text"])
def test_generation_is_deterministic_per_seed(tmp_path, style):
    sizes = {"train_sizes": (6, 6), "val_per_class": 2, "test_per_class": 4, "style": style}
    first = generate_dataset(tmp_path / "a", GenerationParams(seed=3, **sizes))
    again = generate_dataset(tmp_path / "b", GenerationParams(seed=3, **sizes))
    other = generate_dataset(tmp_path / "c", GenerationParams(seed=4, **sizes))
    # a different correlation or train size keeps the same test images
    shared = generate_dataset(
        tmp_path / "d",
        GenerationParams(seed=3, correlation=0.5, **{**sizes, "train_sizes": (9, 7)}),
    )
    assert (first / "labels.csv").read_bytes() == (again / "labels.csv").read_bytes()

    def pixels(root: Path, split: str) -> np.ndarray:
        return np.stack([np.asarray(Image.open(root / r["path"])) for r in _rows(root, split)])

    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(pixels(first, split), pixels(again, split))
    assert not np.array_equal(pixels(first, "train"), pixels(other, "train"))
    np.testing.assert_array_equal(pixels(first, "test"), pixels(shared, "test"))


def _text_stamp(size: int, seed: int, monkeypatch) -> dict:
    """One text-style image rendered without, with and with opaque lettering: the render
    draws the lettering last, so the three differ only where it lies."""
    digit = synthetic._mnist_digits(4)[seed]

    def draw(value: str) -> np.ndarray:
        rng = np.random.default_rng([seed, size])
        return synthetic.render(digit, value, "text", size, rng).astype(np.float64) / 255.0

    plain, faint = draw("0"), draw("1")
    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "_TEXT_ALPHA", (1.0, 1.0))  # same draws, opaque
        opaque = draw("1")
    changed = np.abs(opaque - plain).max(2) > 2.5 / 255  # beyond rounding
    ys, xs = np.nonzero(changed)
    box = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    return {"plain": plain, "faint": faint, "opaque": opaque, "changed": changed, "box": box}


@pytest.mark.parametrize("size", [32, 64])
def test_text_watermark_is_small_semi_transparent_and_moves(size, monkeypatch):
    stamps = [_text_stamp(size, seed, monkeypatch) for seed in range(12)]
    corners = set()
    for stamp in stamps:
        top, left, bottom, right = stamp["box"]
        corners.add((top, left))
        # small: 9/16 of the width, a few pixels tall (the badge: 13 x 7 of 32 x 32)
        assert 1 / 3 <= (right - left) / size <= 0.6
        assert (bottom - top) * (right - left) / size**2 < 0.08
        # the lettering changes nothing outside its box
        outside = np.ones((size, size), bool)
        outside[top:bottom, left:right] = False
        assert np.abs(stamp["faint"] - stamp["plain"])[outside].max() <= 1.5 / 255
        # semi-transparent: under the lettering, pixels move 0.7-0.9 of the way an opaque
        # stamp moves them, and the photo shows through
        moved = np.abs(stamp["faint"] - stamp["plain"])[stamp["changed"]].sum()
        opaque = np.abs(stamp["opaque"] - stamp["plain"])[stamp["changed"]].sum()
        assert 0.65 <= moved / opaque <= 0.92
        assert opaque / stamp["changed"].sum() > 0.15  # and the opaque stamp is visible
    # a random place each time, not a fixed corner
    assert len(corners) >= 10
    assert len({top for top, _ in corners}) >= 4 and len({left for _, left in corners}) >= 4


def test_text_style_has_its_own_digits_and_a_photo_background(tmp_path):
    assert GenerationParams(style="text").digits == (4, 9)
    assert GenerationParams().digits == (3, 8)  # the badge style's pair, as before
    assert GenerationParams(style="text", digits=(1, 7)).digits == (1, 7)
    sizes = {"train_sizes": (4, 4), "val_per_class": 2, "test_per_class": 8}
    root = generate_dataset(tmp_path, GenerationParams(style="text", image_size=32, **sizes))
    for row in _rows(root, "test"):
        with Image.open(root / row["path"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
            pixels = np.asarray(image, dtype=np.float64) / 255.0
        # a textured photograph, not a gradient: many colours, strong local detail
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 32 * 32 // 2
        assert np.abs(np.diff(pixels.mean(2), axis=1)).mean() > 0.03


def test_tint_variant_is_a_four_valued_background_attribute(tmp_path):
    params = GenerationParams(
        style="tint", attribute="group", correlation=0.8, attribute_rate=0.6, **SMALL
    )
    root = generate_dataset(tmp_path, params)
    assert list(read_labels(root)[0]) == ["path", "label", "split", "group"]
    train = _rows(root, "train")
    assert _rate(train, "1", "group", "a") == pytest.approx(0.6, abs=0.02)
    assert _rate(train, "0", "group", "a") == pytest.approx(0.6 * 0.2 / 0.8, abs=0.02)
    # the rest of each class is shared equally by b, c and d
    rest = Counter(row["group"] for row in train if row["label"] == "0" and row["group"] != "a")
    assert set(rest) == {"b", "c", "d"} and max(rest.values()) - min(rest.values()) <= 1
    test = Counter((row["label"], row["group"]) for row in _rows(root, "test"))
    assert set(test.values()) == {6} and len(test) == 8  # balanced: 24 per class over 4 values
    # the background's hue (read in a corner, away from the digit) is nearest its value's
    # own for most images: jitter, gradient and pixel noise move some
    hues = {"a": 0.03, "b": 0.33, "c": 0.61, "d": 0.83}
    for value in hues:
        nearest = []
        for row in [r for r in train if r["group"] == value][:10]:
            corner = np.asarray(Image.open(root / row["path"]), dtype=float)[:4, :4].mean((0, 1))
            found = colorsys.rgb_to_hsv(*(corner / 255.0))[0]
            nearest.append(
                min(hues, key=lambda v: min(abs(found - hues[v]), 1 - abs(found - hues[v])))
            )
        assert nearest.count(value) >= 8, (value, nearest)


def test_tint_values_set_how_many_values_and_stay_out_of_other_cache_keys(tmp_path):
    sizes = {"train_sizes": (8, 16), "val_per_class": 4, "test_per_class": 6}
    three = GenerationParams(style="tint", attribute="group", tint_values=3, **sizes)
    values = {row["group"] for row in read_labels(generate_dataset(tmp_path, three))}
    assert values == {"a", "b", "c"}
    training = synthetic.TrainingParams()
    tint = [
        synthetic.cache_key(GenerationParams(style="tint", tint_values=n), training) for n in (3, 4)
    ]
    assert tint[0] != tint[1]
    # the badge styles have no tint: the field leaves their keys (and caches) as they were
    for style in ("watermark", "text"):
        keys = {
            synthetic.cache_key(GenerationParams(style=style, tint_values=n), training)
            for n in (3, 5)
        }
        assert len(keys) == 1
    for bad in (1, 7):
        with pytest.raises(ValueError, match="tint_values"):
            GenerationParams(style="tint", tint_values=bad).validate()


@pytest.mark.parametrize(
    "bad",
    [
        {"correlation": 0.0},
        {"correlation": 0.2, "attribute_rate": 0.5},  # P(wm | class 0) would exceed 1
        {"attribute_rate": 0.0},
        {"digits": (3, 3)},
        {"style": "stripes"},
        {"attribute": "label"},
        {"train_sizes": (100, 400)},  # 400 + 50 + 120 > the 500 digits of a class
    ],
)
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        GenerationParams(**bad).validate()


TINY = {"train_sizes": (8, 16), "val_per_class": 4, "test_per_class": 8, "epochs": 1}


def test_cache_builds_once_and_reuses_the_files(tmp_path):
    bench = ensure_benchmark(tmp_path, **TINY)
    assert bench.dataset.parent.parent == tmp_path
    assert (bench.dataset / "labels.csv").is_file() and bench.weights.is_file()
    assert (bench.input_size, bench.positive_class, bench.attribute) == (32, 1, "watermark")
    assert bench.layer == "layer2"  # resnet18 at 32 px: layer3 would hold only 2x2 positions
    model = build(bench.architecture, bench.num_classes)
    model.load_state_dict(load_file(str(bench.weights)))  # strict: every tensor fits
    files = sorted(p for p in bench.dataset.parent.rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]

    again = ensure_benchmark(tmp_path, **TINY)
    assert again == bench
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert sorted(p for p in bench.dataset.parent.rglob("*") if p.is_file()) == files

    other = ensure_benchmark(tmp_path, correlation=0.5, **TINY)
    assert other.dataset != bench.dataset
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]


def test_text_benchmark_at_64_px_gives_an_audit_spec(tmp_path):
    bench = ensure_benchmark(tmp_path, style="text", image_size=64, **TINY)
    assert (bench.input_size, bench.attribute, bench.layer) == (64, "watermark", "layer2")
    assert list(read_labels(bench.dataset)[0]) == ["path", "label", "split", "watermark"]
    info = json.loads(bench.info.read_text())
    assert info["generation"]["digits"] == [4, 9] and info["generation"]["style"] == "text"
    spec = bench.audit_spec(n_subspaces=[4])
    assert spec.attributes == ["watermark"] and spec.dataset.input_size == 64
    assert spec.model.weights == str(bench.weights)
    assert ensure_benchmark(tmp_path, style="text", image_size=64, **TINY) == bench


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "train_model", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_benchmark(tmp_path, **TINY)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_cli_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [str(out), "--style", "tint", "--train-sizes", "4", "6", "--image-size", "24"]
    assert synthetic.main(argv) == 0
    assert list(read_labels(out)[0]) == ["path", "label", "split", "group"]
    with pytest.raises(SystemExit):  # refuses to overwrite
        synthetic.main(argv)


def _evaluate(bench) -> dict:
    model = build(bench.architecture, bench.num_classes)
    model.load_state_dict(load_file(str(bench.weights)))
    with torch.no_grad():
        result = evaluate_groups(
            model, bench.dataset, "test", attribute=bench.attribute, mean=bench.mean, std=bench.std
        )
    groups = result["groups"]
    # test groups are equally large, so clean accuracy is the mean of the two clean groups
    result["clean"] = (groups[(0, "0")] + groups[(1, "0")]) / 2
    return result


# The bounds hold over a population, not one lucky model: seeds 0-4 of the 32 px
# benchmark, trained on a 2-core Xeon (the kind CI runs on), gave for the shortcut models
# (rho 0.95) clean accuracy 0.85-0.94, worst group ("other class + watermark") 0.40-0.58,
# "positive class + watermark" 1.00, clean minus worst 0.29-0.53; for the models trained
# without the correlation (rho 0.5) clean accuracy 0.86-0.95, worst group at most 0.12
# below clean, and "other class + watermark" 0.27-0.43 above the shortcut model's of the
# same seed. Another machine's seed 0 gave clean 0.908 and worst 0.433.


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_a_model_trained_with_the_shortcut_relies_on_the_watermark():
    result = _evaluate(ensure_benchmark())  # default cache: trained once, then reused
    groups = result["groups"]
    assert result["clean"] >= 0.80
    assert groups[(0, "1")] == result["worst"] <= 0.65  # "other class + watermark"
    assert groups[(1, "1")] >= 0.95  # the watermark helps its own class
    assert result["clean"] - result["worst"] >= 0.25


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_a_model_trained_without_correlation_ignores_the_watermark():
    result = _evaluate(ensure_benchmark(correlation=0.5))
    assert result["clean"] >= 0.80
    assert result["worst"] >= result["clean"] - 0.15  # groups of 60: +-0.05 noise each
    reliant = _evaluate(ensure_benchmark())
    assert result["groups"][(0, "1")] >= reliant["groups"][(0, "1")] + 0.2


# The text style (semi-transparent "(c)stock" lettering on photographs, digits 4 vs 9): seeds 0-4 of
# the 32 px benchmark, trained on this 2-core machine, gave clean accuracy 0.83-0.94,
# worst group ("4 + text") 0.57-0.68, clean minus worst 0.23-0.35 and "9 + text"
# 0.97-1.00; models trained without the correlation (rho 0.5, seeds 0-1) had "4 + text"
# at 0.75-0.77 and clean minus worst 0.14-0.17 (the lettering is a mild nuisance by
# itself). Seed 0, the one asserted here: clean 0.933, worst 0.583.


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_a_model_trained_with_the_text_shortcut_relies_on_it():
    result = _evaluate(ensure_benchmark(style="text"))
    groups = result["groups"]
    assert result["clean"] >= 0.80
    assert groups[(0, "1")] == result["worst"] <= 0.72  # "4 + text", read as a 9
    assert groups[(1, "1")] >= 0.93
    assert result["clean"] - result["worst"] >= 0.2
