"""The HTML review (cnp_core.review) and the heatmaps a person can read (cnp_core.heatmaps).

Constructed results (the dataclasses filled by hand, with hostile attribute values and
fairness breakdowns) check every section, the escaping and that the page has no script
and no external URL. One real audit with CNP pruning runs through a real cnp-server (the
real engine, on the suite's cached benchmark); ``cnp report --format html`` downloads its
review, and headless Chromium renders it to a screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnp_client.cli import REVIEW_ARTIFACT, main
from cnp_core.heatmaps import (
    FLAG_COLOUR,
    map_scale,
    overlay,
    plot_text,
    relevance_shares,
    save_heatmap_grid,
)
from cnp_core.results import (
    AttributeAudit,
    AuditResult,
    Evaluation,
    FairnessGroup,
    GroupFairness,
    GroupMetric,
    Metric,
    PruningSummary,
    SubspaceScore,
)
from cnp_core.review import REVIEW_NAME, render_review, write_review
from cnp_core.spec import AuditSpec, DatasetRef, ModelRef, PruneSpec

HOSTILE = "<img src=x onerror=alert(1)>"
PATHLIKE = "../../x"
MATHTEXT = r"$\notacommand{$"  # matplotlib would parse it as a (broken) formula
RACE = ["White", "Black", HOSTILE, PATHLIKE, MATHTEXT]
SECTIONS = {
    "Verdict",
    "Concept audit",
    "Accuracy per group",
    "Fairness",
    "Subspace heatmaps",
    "Pruning",
}
CHROMIUM = shutil.which("chromium")


# --- constructed results ------------------------------------------------------------------


def _m(value: float, spread: float = 0.05, base: float = 0.0) -> Metric:
    return Metric(value, value - spread, value + spread, base)


def _audit(value: str, flagged: int) -> AttributeAudit:
    rows = [
        SubspaceScore(
            j, 0.4 - 0.1 * j, *(_m(0.93 if j == flagged else 0.5 + 0.03 * j, base=0.2),) * 6
        )
        for j in range(4)
    ]
    return AttributeAudit("race", value, "layer2", 4, rows, flagged, selection_ap=0.9)


def _fairness(attributes: list[str], groups: list[list[str]], shift: float) -> GroupFairness:
    made = [
        FairnessGroup(
            values,
            count=3 if n == 1 else 80 + n,
            accuracy=_m(0.8 - 0.05 * n + shift),
            selection_rate=_m(0.3 + 0.1 * n),
            true_positive_rate=_m(float("nan")) if n == 2 else _m(0.7 + 0.04 * n),
            false_positive_rate=_m(0.1 + 0.05 * n - shift),
            too_small=n == 1,
        )
        for n, values in enumerate(groups)
    ]
    return GroupFairness(
        attributes,
        positive_class=1,
        groups=made,
        demographic_parity_difference=_m(0.31 - shift),
        demographic_parity_ratio=_m(0.52 + shift),
        equalized_odds_difference=_m(0.27 - shift),
        equalized_odds_ratio=_m(0.41 + shift),
        accuracy_difference=_m(0.2),
    )


def _evaluation(shift: float) -> Evaluation:
    groups = [
        GroupMetric(label, "race", value, 4 if value == HOSTILE else 60, _m(0.9 - 0.1 * n + shift))
        for label in (0, 1)
        for n, value in enumerate(RACE)
    ]
    for group in groups:
        group.too_small = group.count < 10
    by_race = [[v] for v in RACE]
    crossed = [[v, s] for v in RACE[:3] for s in ("female", "male")]
    return Evaluation(
        balanced_accuracy=_m(0.8 + shift),
        worst_group_accuracy=_m(0.5 + shift),
        worst_group=f"class 0, race={PATHLIKE}",
        groups=groups,
        parameters=1000,
        flops=5000,
        latency_ms=1.5,
        fairness=[
            _fairness(["race"], by_race, shift),
            _fairness(["race", "sex"], crossed, shift),
        ],
    )


def _constructed(directory: Path, *, flagged: int = 1) -> AuditResult:
    spec = AuditSpec(
        model=ModelRef(architecture="resnet18", weights="/server/only/path/model.safetensors"),
        dataset=DatasetRef(root="/server/only/path/data"),
        attributes=["race", "sex"],
        prune=PruneSpec(method="cnp", rate=0.1),
    )
    rng = np.random.default_rng(0)
    heatmap = save_heatmap_grid(
        rng.random((2, 16, 16, 3)),
        rng.normal(size=(2, 6, 16, 16)),
        directory / "heatmaps" / "grid.png",
        [f"class 0 {HOSTILE}", MATHTEXT],
        flagged=flagged,
        target=MATHTEXT,
    )
    return AuditResult(
        spec=spec,
        model_sha256="ab" * 32,
        dataset_digest="cd" * 32,
        attributes=[_audit(v, flagged if v == HOSTILE else -1) for v in RACE],
        before=_evaluation(0.0),
        after=_evaluation(0.08),
        pruning=PruningSummary("cnp", 0.1, 960, 96),
        timings={"fit": 1.0},
        versions={"cnp": "test", "device": "cpu"},
        artifacts={f"heatmap:race={HOSTILE}:layer2": str(heatmap)},
    )


class _Page(HTMLParser):
    """Every tag with its attributes, the h2 headings, the text and the style sheets."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.headings: list[str] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self._open: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._open = tag

    def handle_endtag(self, tag):
        self._open = None

    def handle_data(self, data):
        self.text.append(data)
        if self._open == "h2":
            self.headings.append(data.strip())
        if self._open == "style":
            self.styles.append(data)

    def images(self) -> list[Image.Image]:
        prefix = "data:image/png;base64,"
        found = []
        for tag, attrs in self.tags:
            if tag == "img":
                assert attrs["src"].startswith(prefix)
                found.append(Image.open(io.BytesIO(base64.b64decode(attrs["src"][len(prefix) :]))))
        return found


def _assert_offline_and_inert(page: _Page) -> None:
    """No script, no frame, no external resource: every URL is an inline PNG."""
    names = {tag for tag, _ in page.tags}
    assert not names & {"script", "iframe", "object", "embed", "link", "base", "form"}
    for tag, attrs in page.tags:
        assert not any(key.startswith("on") for key in attrs), (tag, attrs)
        for key in ("src", "href", "action", "srcset", "poster"):
            if key in attrs:
                assert tag == "img" and key == "src" and attrs[key].startswith("data:image/png")
    assert all("url(" not in css and "@import" not in css for css in page.styles)
    policy = [
        a["content"] for t, a in page.tags if a.get("http-equiv") == "Content-Security-Policy"
    ]
    assert policy == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]


def test_the_review_has_every_section_escaped_inline_and_offline(tmp_path):
    result = _constructed(tmp_path / "job")
    path = write_review(result, tmp_path / "out")
    assert path == tmp_path / "out" / REVIEW_NAME == tmp_path / "out" / REVIEW_ARTIFACT
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [REVIEW_NAME]
    html_text = path.read_text(encoding="utf-8")
    page = _Page(html_text)
    assert set(page.headings) == SECTIONS
    _assert_offline_and_inert(page)
    # The hostile value is text on the page, never markup; server paths never show.
    assert "<img src=x" not in html_text and "&lt;img src=x onerror=alert(1)&gt;" in html_text
    text = "".join(page.text)
    assert HOSTILE in text and PATHLIKE in text and MATHTEXT in text
    assert "/server/only/path" not in html_text
    # Plots: the AP heatmap, the group accuracies, one per fairness breakdown, the heatmap.
    images = page.images()
    assert len(images) == 1 + 1 + 2 + 1
    assert all(image.format == "PNG" and image.width >= 300 for image in images)
    # The verdict names the flagged value and subspace; small groups are marked.
    assert f"value {HOSTILE}: S2 at layer2" in text
    assert text.count("small n=4") == 2 and text.count("small n=3") == 2  # per breakdown
    # Disparities before and after, as the dataclasses hold them, with the change.
    assert "equalized odds difference" in text and "0.270" in text and "0.190" in text
    assert "-0.080" in text


def test_a_result_without_evaluations_fairness_or_heatmaps_still_renders(tmp_path):
    """An audit of a tabular model or an old result: the sections it has, no failure."""
    result = _constructed(tmp_path / "job", flagged=-1)
    result.before = result.after = result.pruning = None
    result.artifacts = {}
    page = _Page(render_review(result))
    assert set(page.headings) == {"Verdict", "Concept audit", "Subspace heatmaps"}
    assert "not flagged" in "".join(page.text) and len(page.images()) == 1
    result.attributes = []
    assert "No audit tables." in render_review(result)


def test_heatmaps_are_scaled_per_map_with_shares_and_the_flagged_column_framed(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.random((16, 16, 3))
    ordinary = rng.normal(size=(16, 16))
    faint = 1e-3 * ordinary  # a subspace with little relevance next to the ordinary map
    noise = 1e-12 * rng.normal(size=(16, 16))  # a residue of rounding errors
    maps = np.stack([ordinary, 0.999 * ordinary, faint, noise])[None]
    shares = relevance_shares(maps)
    np.testing.assert_allclose(shares.sum(1), 1.0)
    assert shares[0, 1] < 0.002 and shares[0, 2] < 1e-9
    grey = overlay(image, np.zeros((16, 16)), 1.0)
    # Scaled to itself the faint map is as vivid as the ordinary one ...
    vivid = np.abs(overlay(image, faint, map_scale(faint)) - grey).max()
    assert vivid > 0.5
    floor = 0.01 * map_scale(ordinary)
    # ... while the floor keeps rounding noise invisible (under one grey level of 255).
    assert np.abs(overlay(image, noise, max(map_scale(noise), floor)) - grey).max() < 1 / 255

    def red_frame_pixels(flagged: int) -> int:
        path = save_heatmap_grid(image[None], maps, tmp_path / f"{flagged}.png", flagged=flagged)
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        target = np.array([int(FLAG_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels - target).sum(-1) < 30).sum())

    assert red_frame_pixels(0) > 300 and red_frame_pixels(-1) < 20
    assert plot_text("$x$") == r"\$x\$" and len(plot_text("w" * 300)) == 40


# --- a real audit's review, rendered by Chromium -------------------------------------------


@pytest.fixture(scope="module")
def real_review(tmp_path_factory) -> Path:
    """The review.html that ``run_audit`` writes for a real audit with CNP pruning of the
    suite's smallest cached benchmark, at cheap settings that still flag the watermark."""
    import torch

    from cnp_core.pipeline import run_audit
    from cnp_core.synthetic import ensure_benchmark

    spec = ensure_benchmark().audit_spec(
        n_subspaces=[8],
        drsa_max_epochs=100,
        positions_per_image=10,
        flag_threshold=0.6,
        bootstrap=20,
        heatmap_samples=2,
        prune=PruneSpec(method="cnp", rate=0.1, reference_per_class=8),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: two OpenMP threads wait on each other
    try:
        result = run_audit(spec, workdir=tmp_path_factory.mktemp("job"))
    finally:
        torch.set_num_threads(threads)
    assert result.pruning is not None and any(a.flagged_subspace >= 0 for a in result.attributes)
    return Path(result.artifacts[REVIEW_NAME])


def screenshot(page: Path, target: Path, height: int = 3000) -> Path:
    """``page`` rendered by headless Chromium, 1280 px wide; the flags run as root, with a
    throwaway profile and no network traffic of its own. ``make install`` installs
    Chromium, so its absence fails rather than skips."""
    assert CHROMIUM, "Chromium is not installed: run make browser (make install does)"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={target.parent / 'chromium-profile'}",
        f"--screenshot={target}", f"--window-size=1280,{height}", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and target.is_file(), done.stderr[-2000:]
    return target


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_a_real_review_renders_in_chromium_with_its_plots(real_review, tmp_path):
    listed = json.loads(real_review.parent.joinpath("report.json").read_text())["artifacts"]
    assert listed[REVIEW_NAME] == str(real_review)  # a job artifact, like report.json
    page = _Page(real_review.read_text(encoding="utf-8"))
    assert {
        "Verdict",
        "Concept audit",
        "Accuracy per group",
        "Subspace heatmaps",
        "Pruning",
    } <= set(page.headings)
    _assert_offline_and_inert(page)
    assert len(page.images()) >= 3  # AP heatmap, group accuracies, subspace heatmaps

    shot = screenshot(real_review, tmp_path / "review.png")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (3000, 1280, 3)
    inked = (pixels < 235).any(-1).mean()
    # The plots drew: blue AP cells and dots, and the flagged subspace's red frame.
    blue = ((pixels[..., 2] - pixels[..., 0] > 60) & (pixels[..., 2] > 120)).mean()
    red = (np.abs(pixels - [214, 39, 40]).sum(-1) < 40).mean()
    assert inked > 0.08 and blue > 0.005 and red > 0.0002, (inked, blue, red)


# --- `cnp report --format html` against a real server ----------------------------------------


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, refs):
    """A real cnp-server running the scripted engine, whose jobs write no review: a job of
    an older server, as far as the CLI can tell."""
    from test_server_support import ServerProcess

    process = ServerProcess(tmp_path_factory.mktemp("data"), [refs], args=["--no-tracking"])
    yield process.start()
    process.stop()


def _report_args(process, audit_id: str, *extra: str) -> list[str]:
    token = str(process.data_dir / "token")
    return ["report", audit_id, "--server", process.address, "--token-file", token, *extra]


def _job(process, refs: Path, script: str) -> str:
    from test_server_support import make_spec

    from cnp_client import AuditClient, ServiceError

    with AuditClient(process.address, token=process.token, timeout=60) as client:
        try:
            return client.audit(make_spec(refs, script), timeout=60).audit_id
        except ServiceError as err:  # the job failed: its id comes with the error
            return err.audit_id


@pytest.mark.slow
def test_report_html_names_a_missing_review_or_a_failed_job_clearly(
    scripted, refs, tmp_path, capsys
):
    target = tmp_path / "review.html"
    old = _job(scripted, refs, "")
    assert main(_report_args(scripted, old, "--format", "html", "-o", str(target))) == 2
    err = capsys.readouterr().err
    assert f"audit {old} has no review.html" in err and f"`cnp report {old}`" in err
    assert not target.exists() and not list(tmp_path.glob("*.part"))

    failed = _job(scripted, refs, "fail:INVALID_ARGUMENT")
    assert main(_report_args(scripted, failed, "--format", "html", "-o", str(target))) == 2
    err = capsys.readouterr().err
    assert f"audit {failed} is FAILED" in err and "it has no report" in err
    assert not target.exists()

    assert main(_report_args(scripted, old, "-o", str(target))) == 2
    assert "-o/--output names the file of --format html" in capsys.readouterr().err


def test_a_multi_valued_attribute_is_summarised_as_a_whole_and_escaped(tmp_path):
    from cnp_core.results import AttributeSummary, SubspaceValues, ValueSummary

    result = _constructed(tmp_path)
    m = Metric(0.9, 0.85, 0.95, 0.25)
    values = [ValueSummary("a", 4, 1, m, 1), ValueSummary("<b>x</b>", 4, 1, m, -1)]
    shared = [SubspaceValues(4, 1, ["a", "<b>x</b>"])]
    result.attribute_summaries = [
        AttributeSummary("group", "layer2", values, shared=shared, removed=shared[:1])
    ]
    page = render_review(result)
    assert "group as a whole, at layer2" in page
    assert "One subspace for several values: S2 (K=4) for a, &lt;b&gt;x&lt;/b&gt;." in page
    assert "CNP removes: S2 (K=4)" in page and "<b>x</b>" not in page
