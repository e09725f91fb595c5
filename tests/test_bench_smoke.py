"""The benchmark plumbing (bench/): checks and verdicts, interleaving, result files, the
CLI flags the service benchmark sends, and scaled datasets in the real format. The
benchmarks themselves are measurements, run by ``make bench``, not here."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cnp_client.cli import build_parser, spec_from_args
from cnp_core.data import load_dataset
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef

# bench/ is a top-level folder of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import audits, cnp_vs_vanilla, common, run_all, verdicts  # noqa: E402


def test_checks_compare_against_their_target():
    assert common.Check("a", 0.86, ">=", 0.85).verdict == "PASS"
    assert common.Check("a", 0.84, ">=", 0.85).verdict == "MISS"
    assert common.Check("b", 0.75, "<=", 0.75).passed
    assert not common.Check("b", 0.76, "<=", 0.75).passed
    with pytest.raises(ValueError):
        common.Check("c", 1.0, "==", 1.0)
    table = common.format_table("T", [common.Check("ratio", 0.5, ">=", 0.85, note="slow")])
    assert "0.500x" in table and ">= 0.85x" in table and "MISS" in table and "slow" in table


def test_interleaved_alternates_after_warmup():
    calls: list[str] = []
    times = common.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert calls == ["a", "b"] * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_result_files_never_overwrite_the_cpu_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("CNP_BENCH_RESULTS", str(tmp_path))
    result = common.BenchResult("demo", "Demo", [common.Check("x", 2.0, ">=", 1.0)], {"n": 3})
    result.machine = common.machine_info()
    cpu = common.write_result(result)
    result.quick = True
    quick = common.write_result(result)
    result.quick, result.machine = False, {**result.machine, "device": "cuda"}
    gpu = common.write_result(result)
    assert [p.name for p in (cpu, quick, gpu)] == ["demo.json", "demo.quick.json", "demo.cuda.json"]
    record = json.loads(cpu.read_text())
    assert record["passed"] and record["checks"][0]["verdict"] == "PASS"
    assert record["details"] == {"n": 3}
    for key in ("cpu", "cores", "torch", "torch_threads", "date"):
        assert record["machine"][key], key
    assert not list(tmp_path.glob("*.tmp"))


def test_summary_table_lists_every_check_and_errors():
    records = {
        "drsa": {
            "seconds": 12.0,
            "checks": [
                {"name": "speed", "value": 7.0, "op": ">=", "target": 5.0, "unit": "x",
                 "verdict": "PASS", "passed": True},
                {"name": "J", "value": 1.0, "op": ">=", "target": 1.0, "unit": "",
                 "verdict": "PASS", "passed": True},
            ],
        },
        "memory": {"error": "RuntimeError: boom", "seconds": 1.0},
    }  # fmt: skip
    table = run_all.summary_table(records, 90.0)
    assert "2/2 targets met, 1 errors" in table and "1.5 min" in table
    assert "7.000x" in table and "ERROR" in table and "boom" in table


def test_cli_arguments_ask_for_exactly_the_spec(tmp_path):
    spec = AuditSpec(
        model=ModelRef(architecture="resnet18", weights=str(tmp_path / "w.safetensors")),
        dataset=DatasetRef(root=str(tmp_path), input_size=32, mean=(0.1, 0.2, 0.3)),
        layers=["layer2"],
        attributes=["watermark"],
        n_subspaces=[2, 4],
        **audits.SMALL,
    ).validate()
    args = build_parser().parse_args(["audit", *audits.cli_arguments(spec)])
    assert spec_from_args(args).to_dict() == spec.to_dict()


def _tiny_dataset(root):
    """Four 8x8 PNGs and a labels.csv in the real format."""
    rows = []
    for i, (label, split, wm) in enumerate(
        [(0, "train", 0), (1, "train", 1), (0, "test", 1), (1, "test", 0)]
    ):
        rel = f"images/{split}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.full((8, 8, 3), 40 * i + 20, dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(root / rel)
        rows.append([rel, label, split, wm])
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "split", "watermark"], *rows])
    return rows


def test_scaled_dataset_repeats_every_row_with_noisy_copies(tmp_path):
    base = tmp_path / "bench-abc"
    (base / "dataset").mkdir(parents=True)
    rows = _tiny_dataset(base / "dataset")
    bench = SimpleNamespace(dataset=base / "dataset")
    assert audits.scaled_dataset(bench, 1) == base / "dataset"
    root = audits.scaled_dataset(bench, 3)
    assert root == tmp_path / "bench-scaled-abc" / "x3"
    assert audits.scaled_dataset(bench, 3) == root  # cached
    table = load_dataset(DatasetRef(root=str(root)), ["watermark"])  # the real loader
    assert len(table) == 3 * len(rows)
    for n, (rel, label, split, wm) in enumerate(rows):
        copies = [i for i in range(len(table)) if table.paths[i].startswith(rel[:-4])]
        assert len(copies) == 3
        assert {int(table.labels[i]) for i in copies} == {label}
        assert {str(table.splits[i]) for i in copies} == {split}
        assert {str(table.attributes["watermark"][i]) for i in copies} == {str(wm)}
        original = np.asarray(Image.open(base / "dataset" / rel), dtype=int)
        for i in copies:
            pixels = np.asarray(Image.open(root / table.paths[i]), dtype=int)
            assert np.abs(pixels - original).max() <= audits.NOISE_LEVELS
        first_copy = np.asarray(Image.open(root / table.paths[copies[1]]), dtype=int)
        assert (first_copy != original).any(), n


def test_verdict_settings_parse_as_the_spec_fields_they_name():
    assert verdicts._setting("n_subspaces=4,8,16") == ("n_subspaces", [4, 8, 16])
    assert verdicts._setting("layers=layer2,layer3") == ("layers", ["layer2", "layer3"])
    assert verdicts._setting("drsa_restarts=1") == ("drsa_restarts", 1)
    assert verdicts._setting("flag_threshold=0.85") == ("flag_threshold", 0.85)
    assert verdicts._setting("composite=gradient") == ("composite", "gradient")
    spec = AuditSpec(**dict([verdicts._setting("n_subspaces=4,8")]))
    assert spec.n_subspaces == [4, 8]
    for bad in ("unknown=1", "n_subspaces=", "seed"):
        with pytest.raises(Exception, match="FIELD=VALUE"):
            verdicts._setting(bad)


def test_cnp_vs_vanilla_reads_each_configuration_at_the_default_and_best_rates(tmp_path):
    from cnp_core.experiment import ExperimentConfig, Row, write_outputs

    rows = []
    for seed in range(2):
        rows += [Row(seed, "none", 0.0, 0.80, 0.30, 0.9, 0.30)]
        for rate, cnp, lrp, balanced in ((0.1, 0.60, 0.40, 0.81), (0.2, 0.90, 0.50, 0.70)):
            rows += [Row(seed, "lrp", rate, 0.80, lrp, 0.9, lrp)]
            rows += [Row(seed, "cnp", rate, balanced, cnp, 0.9, cnp)]
    config = ExperimentConfig(seeds=(0, 1, 2), unflagged=[2])
    write_outputs(rows, config, "watermark", tmp_path / "a")
    result = cnp_vs_vanilla.compare(tmp_path / "a", default_rate=0.1)
    assert (result["flagged"], result["models"], result["default_rate"]) == (2, 3, 0.1)
    # 0.2 gains more but loses 10 points of balanced accuracy: 0.1 is the best matched.
    assert result["best_rate"] == 0.1 and result["rates"][0.1]["gain"] == pytest.approx(0.2)
    assert "| a | 2 of 3 | 0.30, 0.800 | 0.10: 0.60 vs 0.40 (+20)" in cnp_vs_vanilla._row(
        "a", result
    )
    (tmp_path / "b").mkdir()  # a configuration in which no model was flagged
    (tmp_path / "b" / "config.json").write_text(json.dumps({"seeds": [0, 1], "unflagged": [0, 1]}))
    none = cnp_vs_vanilla.compare(tmp_path / "b", default_rate=0.1)
    assert "no model flagged" in cnp_vs_vanilla._row("b", none)
