"""The ImageNet recipe (``python -m bench.imagenet``) end to end on a tiny generated folder
with ImageNet's layout: the dataset it writes, the audit it describes (run in-process on a
randomly initialised 1000-class VGG-16), the command it prints (read back by the real
``cnp`` parser) and its input checks."""

from __future__ import annotations

import csv
import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cnp_client.cli import build_parser, spec_from_args
from cnp_core.data import load_dataset
from cnp_core.pipeline import run_audit

# bench/ is a top-level folder of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import imagenet as recipe  # noqa: E402
from bench.imagenet import PAIRS, RecipeError  # noqa: E402

PAIR = PAIRS["carton-dugong"]
WNIDS = (PAIR.positive.wnid, PAIR.negative.wnid)
OTHER_WNID = "n03127925"  # a class of ImageNet outside the pair: must be ignored
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 8
VAL_FRACTION = 0.25  # 2 of 8 training images per class


def _jpeg(path: Path, seed: int) -> None:
    """A small real JPEG: a seeded gradient and stripes, 56 x 48 (not square)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:56]
    base = rng.uniform(0, 255, size=3)
    stripes = 60 * np.sin(x / rng.uniform(2, 8) + y / rng.uniform(2, 8))[..., None]
    pixels = np.clip(base + stripes + rng.normal(0, 10, (48, 56, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=90)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """train/<wnid>/<wnid>_<n>.JPEG and val/<wnid>/ILSVRC2012_val_<n>.JPEG, as ImageNet."""
    root = tmp_path_factory.mktemp("imagenet")
    for c, wnid in enumerate((*WNIDS, OTHER_WNID)):
        for n in range(TRAIN_PER_CLASS):
            _jpeg(root / "train" / wnid / f"{wnid}_{n + 1}.JPEG", seed=100 * c + n)
        for n in range(VAL_PER_CLASS):
            name = f"ILSVRC2012_val_{1000 * c + n + 1:08d}.JPEG"
            _jpeg(root / "val" / wnid / name, seed=100 * c + 50 + n)
    return root


@pytest.fixture(scope="module")
def logo(tmp_path_factory) -> Path:
    """An RGBA "watermark": a light bar with two dark blocks, transparent around them."""
    pixels = np.zeros((16, 40, 4), dtype=np.uint8)
    pixels[3:13, 2:38] = (240, 240, 240, 200)
    pixels[5:11, 6:16] = pixels[5:11, 22:32] = (20, 20, 20, 255)
    path = tmp_path_factory.mktemp("logo") / "logo.png"
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("path", "watermark")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def marks(imagenet) -> Path:
    """User labels: a few training images of each class, an explicit 0 and a row of a
    class outside the pair (ignored)."""
    carton, dugong = WNIDS
    rows = [(f"train/{carton}/{carton}_{n}.JPEG", "1") for n in (1, 2, 3, 4)]
    rows += [(f"train/{dugong}/{dugong}_1.JPEG", "1"), (f"train/{dugong}/{dugong}_2.JPEG", "0")]
    rows += [(f"./train/{OTHER_WNID}/{OTHER_WNID}_1.JPEG", "1")]
    return _write_csv(imagenet.parent / "marks.csv", rows)


@pytest.fixture(scope="module")
def prepared(imagenet, marks, logo, tmp_path_factory) -> recipe.Prepared:
    out = tmp_path_factory.mktemp("datasets") / "carton-dugong"
    return recipe.prepare(
        imagenet, out, PAIR, watermarks=marks, overlay=logo, val_fraction=VAL_FRACTION, seed=3
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A seeded, randomly initialised torchvision VGG-16 (1000 classes) as a state_dict
    .pth, the format of torchvision's vgg16-397923af.pth (553 MB, about 3 s to write)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vgg16-random.pth"
    torch.save(torchvision.models.vgg16(num_classes=1000).state_dict(), path)
    return path


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


# ------------------------------------------------------------------ the dataset


def test_the_pairs_are_imagenets_classes():
    from torchvision.models._meta import _IMAGENET_CATEGORIES as names

    for pair in PAIRS.values():
        for cls in (pair.positive, pair.negative):
            assert names[cls.index] == cls.name
    # torchvision's indices follow the sorted wnids
    classes = sorted((c for p in PAIRS.values() for c in (p.positive, p.negative)),
                     key=lambda c: c.wnid)  # fmt: skip
    assert [c.index for c in classes] == sorted(c.index for c in classes)


def test_prepare_writes_splits_labels_and_watermarks(prepared, imagenet, marks):
    rows = _labels(prepared.root)
    assert list(rows[0]) == ["path", "label", "split", "watermark"]
    assert {r["label"] for r in rows} == {"478", "149"}
    assert not any(OTHER_WNID in r["path"] for r in rows)
    count = {}
    for r in rows:
        key = (r["split"], int(r["label"]))
        count[key] = count.get(key, 0) + 1
    for label in (478, 149):  # ImageNet train -> train + val (25 %), ImageNet val -> test
        assert (count[("train", label)], count[("val", label)]) == (6, 2)
        assert count[("test", label)] == VAL_PER_CLASS
    for r in rows:
        origin = "val/" if r["split"] == "test" else "train/"
        assert r["path"].removeprefix("overlay/").startswith(origin)

    # The overlay: half of val and test of both classes, as new files, watermark 1; the
    # user's labels everywhere else (missing rows are 0).
    user = {r["path"]: r["watermark"] for r in csv.DictReader(marks.read_text().splitlines())}
    for r in rows:
        if r["path"].startswith("overlay/"):
            assert r["split"] != "train" and r["watermark"] == "1"
        else:
            assert r["watermark"] == user.get(r["path"], "0")
    assert sum(r["watermark"] == "1" for r in rows if r["split"] == "train") >= 2
    for label in ("478", "149"):
        for mark in ("0", "1"):  # balanced test groups (the user's CSV marks no test image)
            group = [r for r in rows if (r["split"], r["label"], r["watermark"]) == ("test", label, mark)]  # fmt: skip
            assert len(group) == VAL_PER_CLASS // 2, (label, mark)
        stamped_val = [r for r in rows if r["split"] == "val" and r["label"] == label and r["path"].startswith("overlay/")]  # fmt: skip
        assert len(stamped_val) == 1
    assert prepared.stamped == 2 * (4 + 1)

    # Files: every listed image is a regular file inside the root (a hard link or a copy
    # of the ImageNet file, or a stamped JPEG), nothing else is written, no symlinks.
    assert _files(prepared.root) == {"labels.csv"} | {r["path"] for r in rows}
    assert not any(p.is_symlink() for p in prepared.root.rglob("*"))
    for r in rows:
        image = prepared.root / r["path"]
        assert image.resolve().is_relative_to(prepared.root)
        if r["path"].startswith("overlay/"):
            source = imagenet / Path(r["path"]).relative_to("overlay")
            with Image.open(image) as stamped, Image.open(source) as original:
                assert stamped.format == "JPEG" and stamped.size == original.size
                difference = np.abs(np.asarray(stamped, float) - np.asarray(original, float))
                assert difference.max() > 100  # the logo is there
        else:
            source = imagenet / r["path"]
            assert os.path.samefile(image, source) or image.read_bytes() == source.read_bytes()
    assert prepared.linked + prepared.copied == len(rows) - prepared.stamped

    # The project's own loader accepts it.
    table = load_dataset(recipe.audit_spec(prepared.root, "w.pth", PAIR).dataset, ["watermark"])
    assert len(table) == len(rows) and table.is_binary("watermark")


def test_prepare_is_seeded(prepared, imagenet, marks, logo, tmp_path):
    again = recipe.prepare(
        imagenet, tmp_path / "d", PAIR, watermarks=marks, overlay=logo, val_fraction=0.25, seed=3
    )
    assert again.rows == prepared.rows
    other = recipe.prepare(imagenet, tmp_path / "e", PAIR, overlay=logo, val_fraction=0.25, seed=4)
    assert other.rows != prepared.rows


def test_a_file_system_without_hard_links_gets_copies(imagenet, logo, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    done = recipe.prepare(imagenet, tmp_path / "d", PAIR, overlay=logo, val_fraction=0.25)
    assert done.linked == 0 and done.copied == len(done.rows) - done.stamped
    for path, *_ in done.rows:
        image = done.root / path
        assert image.is_file() and not image.is_symlink()
        if not path.startswith("overlay/"):
            assert not os.path.samefile(image, imagenet / path)


# ------------------------------------------------------------------ the audit


def test_the_audit_runs_in_process(prepared, weights, tmp_path):
    spec = recipe.audit_spec(
        prepared.root,
        weights,
        PAIR,
        input_size=64,  # features.22 keeps 8 x 8 positions
        bootstrap=0,
        heatmap_samples=0,
        drsa_max_epochs=20,
        drsa_restarts=1,
        fit_images=6,
        positions_per_image=5,
        min_group_size=2,
        batch_size=16,
    )
    assert (spec.model.architecture, spec.model.num_classes, spec.layers) == (
        "vgg16",
        1000,
        ["features.22"],
    )
    result = run_audit(spec, workdir=tmp_path / "work")
    (audit,) = [a for a in result.attributes if a.attribute == "watermark"]
    assert (audit.layer, audit.n_subspaces, len(audit.subspaces)) == ("features.22", 4, 4)
    assert all(0 <= s.ap_attribute.value <= 1 for s in audit.subspaces)
    groups = {(g.label, g.value): g.count for g in result.before.groups}
    assert groups == {(478, "0"): 4, (478, "1"): 4, (149, "0"): 4, (149, "1"): 4}
    assert (tmp_path / "work" / "report.json").is_file()


# ------------------------------------------------------------------ the command


def _parsed(command: list[str]):
    assert command[:2] == ["cnp", "audit"]
    return spec_from_args(build_parser().parse_args(command[1:]))


def test_the_printed_command_is_the_spec(prepared, weights):
    plain = recipe.audit_spec(prepared.root, weights, PAIR)
    command = recipe.audit_command(plain)
    for flag, value in [
        ("--model", "vgg16"),
        ("--num-classes", "1000"),
        ("--input-size", "224"),
        ("--mean", "0.485,0.456,0.406"),
        ("--std", "0.229,0.224,0.225"),
        ("--layer", "features.22"),
        ("--attribute", "watermark"),
        ("--positive-class", "478"),
        ("--negative-class", "149"),
        ("--subspaces", "4"),
    ]:
        assert command[command.index(flag) + 1] == value
    assert _parsed(command) == plain

    tuned = recipe.audit_spec(
        prepared.root,
        weights,
        PAIRS["crate-packet"],
        layer="features.23",  # pool4: the projection folds into conv5_1 after it
        subspaces=(2, 4, 8),
        device="cuda",
        prune=dataclasses.replace(recipe.recipe_prune("cnp", 0.2), keep_projection=True),
        drsa_restarts=2,
        fit_images=100,
        composite="epsilon_plus",
    )
    command = recipe.audit_command(tuned, server="gpu-box:50051", report=Path("r.json"))
    assert command[command.index("--prune") + 1] == "cnp" and "--keep-projection" in command
    assert command[command.index("--prune-scope") + 1] == "upstream"
    assert _parsed(command) == tuned
    # The recipe's own pruning (the seed's CNP) keeps the projection out of the model:
    # after features.22 comes a max pool, which a projection cannot be folded through.
    seed_cnp = recipe.audit_spec(prepared.root, weights, PAIR, prune=recipe.recipe_prune("cnp"))
    command = recipe.audit_command(seed_cnp)
    assert "--keep-projection" not in command and not _parsed(command).prune.keep_projection


def test_main_prepares_and_prints_the_command(imagenet, logo, weights, tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["--imagenet", str(imagenet), "--out", str(out), "--overlay", str(logo)]
    argv += ["--weights", str(weights), "--prune", "cnp", "--set", "prune.finetune_epochs=1"]
    argv += ["--subspaces", "4,8", "--set", "drsa_restarts=3", "--device", "cuda"]
    assert recipe.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith(f"dataset written to {out.resolve()}")
    spec = _parsed(shlex.split(printed[-1]))
    expected = recipe.audit_spec(
        out,
        weights,
        PAIR,
        subspaces=(4, 8),
        device="cuda",
        prune=recipe.recipe_prune("cnp", 0.1),
        drsa_restarts=3,
    )
    expected.prune.finetune_epochs = 1
    assert spec == expected
    assert (out / "labels.csv").is_file() and not (out / "report.json").exists()


def test_run_submits_the_printed_command(prepared, weights, monkeypatch, capsys):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(recipe.subprocess, "run", fake_run)
    argv = ["--imagenet", "unused", "--out", str(prepared.root), "--no-prepare"]
    assert recipe.main([*argv, "--weights", str(weights), "--run", "host:7"]) == 0
    printed = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    (command,) = calls
    assert command[:3] == [sys.executable, "-m", "cnp_client.cli"]
    assert command[3:] == printed[1:] and printed[2:4] == ["--server", "host:7"]


# ------------------------------------------------------------------ input checks


def test_a_missing_class_folder_is_named(imagenet, logo, tmp_path, capsys):
    partial = tmp_path / "imagenet"
    for part in ("train", "val"):
        for wnid in WNIDS:
            if (part, wnid) != ("val", PAIR.negative.wnid):
                (partial / part / wnid).mkdir(parents=True)
                _jpeg(partial / part / wnid / "a.JPEG", seed=1)
    with pytest.raises(RecipeError, match=r"val/n02074367 \(dugong\) is missing .*wnid folders"):
        recipe.prepare(partial, tmp_path / "out", PAIR, overlay=logo)
    argv = ["--imagenet", str(partial), "--out", str(tmp_path / "o2"), "--overlay", str(logo)]
    assert recipe.main(argv) == 2
    assert "val/n02074367 (dugong) is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.parametrize(
    "rows,header,message",
    [
        ([("../outside.JPEG", "1")], None, "uses '..' to leave the ImageNet root"),
        ([("train/../../outside.JPEG", "1")], None, "uses '..' to leave"),
        ([("/etc/passwd", "1")], None, "is absolute"),
        ([("train/n02971356/n02971356_1.JPEG", "2")], None, "must be 0 or 1"),
        ([("train/n02971356/nope.JPEG", "1")], None, "line 2: no image"),
        ([("train/n02971356/n02971356_1.JPEG", "1")] * 2, None, "line 3: .* listed twice"),
        ([("x", "1")], ("file", "watermark"), "needs the columns path,watermark"),
    ],
)
def test_bad_watermark_csv_rows_are_refused(imagenet, tmp_path, rows, header, message):
    path = _write_csv(tmp_path / "marks.csv", rows, header or ("path", "watermark"))
    with pytest.raises(RecipeError, match=message):
        recipe.prepare(imagenet, tmp_path / "out", PAIR, watermarks=path)
    assert not (tmp_path / "out").exists()


def test_labels_that_leave_val_and_test_clean_are_warned_about(imagenet, marks, tmp_path):
    done = recipe.prepare(imagenet, tmp_path / "d", PAIR, watermarks=marks, val_fraction=0)
    assert len(done.warnings) == 2 and "test split lacks" in done.warnings[1]
    assert "warning: the val split lacks" in done.summary()


def test_other_bad_inputs_are_refused(imagenet, prepared, logo, tmp_path):
    with pytest.raises(RecipeError, match="give --watermarks"):
        recipe.prepare(imagenet, tmp_path / "out", PAIR)
    with pytest.raises(RecipeError, match="not an empty directory"):
        recipe.prepare(imagenet, prepared.root, PAIR, overlay=logo)
    with pytest.raises(RecipeError, match="overlay .*not an image"):
        recipe.prepare(imagenet, tmp_path / "out", PAIR, overlay=imagenet.parent / "marks.csv")
    with pytest.raises(RecipeError, match="needs --prune"):
        argv = ["--imagenet", "x", "--out", "y", "--set", "prune.rate=0.2"]
        recipe.spec_from_options(recipe.parser().parse_args(argv), PAIR)
