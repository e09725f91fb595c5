"""The audit finds a watermark the test planted, and raises no false alarm without one.

Real components end to end: the generated 64 px benchmark (resnet18 trained on it, cached
by parameters), zennit LRP, DRSA, the pipeline's K and subspace selection on the
validation split, AP reported on the test split. 64 px, as in ALGORITHMS.md section 3: at
32 px the watermark's relevance is not separable from the digit's (measured: even the
relevance share of the badge's own corner predicts the watermark with AP 0.88 only).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("benchmarks")]

# The spec's defaults (plain-gradient contexts, K chosen from 4 and 8, one DRSA start of
# at most 150 epochs, resnet18's default layer: layer2 at 64 px); only the report's
# extras are off. Measured at the defaults over training seeds 0-4 on a 2-core Xeon
# (python -m bench.verdicts, README "Verdict reliability"): every shortcut model flagged
# with test AP_watermark 0.97-1.00 and AP_class 0.39-0.56, while another subspace carried
# the class at AP_class 0.77-0.91 (0.20-0.43 above). Models trained without the
# correlation: best AP_watermark 0.55-0.61, none flagged. The bounds leave that margin.
AUDIT = {"bootstrap": 0, "heatmap_samples": 0}


def _audit(tmp_path, correlation: float):
    from cnp_core.pipeline import run_audit
    from cnp_core.synthetic import ensure_benchmark

    bench = ensure_benchmark(image_size=64, correlation=correlation)
    result = run_audit(bench.audit_spec(**AUDIT), workdir=tmp_path)
    (audit,) = result.attributes
    return audit


def test_a_subspace_isolates_the_planted_watermark_and_another_carries_the_class(tmp_path):
    audit = _audit(tmp_path, correlation=0.95)
    assert audit.flagged_subspace >= 0, "the watermark subspace must be flagged"
    flagged = audit.subspaces[audit.flagged_subspace]
    assert flagged.ap_attribute.value >= 0.9
    # It isolates the watermark: it says little about the class, another subspace says much.
    others = [s for s in audit.subspaces if s.index != audit.flagged_subspace]
    class_ap = max(s.ap_class.value for s in others)
    assert flagged.ap_class.value <= flagged.ap_class.base_rate + 0.25
    assert class_ap >= 0.65 and class_ap - flagged.ap_class.value >= 0.1


def test_no_false_alarm_on_a_model_trained_without_the_correlation(tmp_path):
    audit = _audit(tmp_path, correlation=0.5)
    assert audit.flagged_subspace == -1
    assert max(s.ap_attribute.value for s in audit.subspaces) < 0.7
