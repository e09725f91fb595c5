"""Group evaluation: per-group accuracy and size, worst group, small groups, model cost."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cnp_core.errors import GroupTooSmall, InvalidSpec
from cnp_core.evaluation import evaluate, evaluate_predictions, find_group, model_cost, predict
from cnp_core.pruning.groups import channel_groups
from cnp_core.pruning.selection import select_filters
from cnp_core.pruning.surgery import compact_model, mask_channels

torch.set_num_threads(1)


def _watermark_case():
    # class 0: 30 clean (all right), 20 watermarked (5 right); class 1: 40 watermarked
    # (36 right), 6 clean (3 right: a group below min_group_size).
    labels = np.array([0] * 50 + [1] * 46)
    wm = np.array([0] * 30 + [1] * 20 + [1] * 40 + [0] * 6)
    pred = labels.copy()
    pred[30:45] = 1  # 15 of class 0 + WM wrong
    pred[50:54] = 0  # 4 of class 1 + WM wrong
    pred[90:93] = 0  # 3 of class 1 clean wrong
    return labels, pred, wm


def test_groups_and_worst_group():
    labels, pred, wm = _watermark_case()
    ev = evaluate_predictions(
        labels, pred, {"watermark": wm}, resamples=100, seed=0, min_group_size=10
    )
    sizes = {(g.label, g.value): g.count for g in ev.groups}
    assert sizes == {(0, "0"): 30, (0, "1"): 20, (1, "0"): 6, (1, "1"): 40}
    other = find_group(ev, 0, "watermark", 1)  # the seed's "other class + watermark"
    assert other.accuracy.value == pytest.approx(5 / 20)
    assert other.accuracy.ci_low < 0.25 < other.accuracy.ci_high
    small = find_group(ev, 1, "watermark", "0")
    assert small.too_small and small.accuracy.value == pytest.approx(0.5)
    # The small group (0.5) is not the worst although it is below 0.25 + CI: it is excluded,
    # and the worst group is the other class with the watermark.
    assert ev.worst_group == "class 0 + watermark=1"
    assert ev.worst_group_accuracy.value == pytest.approx(0.25)
    recall0, recall1 = 35 / 50, 39 / 46
    assert ev.balanced_accuracy.value == pytest.approx((recall0 + recall1) / 2)
    assert ev.balanced_accuracy.ci_low <= ev.balanced_accuracy.value <= ev.balanced_accuracy.ci_high
    with pytest.raises(KeyError):
        find_group(ev, 2, "watermark", "1")


def test_small_group_becomes_worst_when_allowed():
    labels, pred, wm = _watermark_case()
    ev = evaluate_predictions(labels, pred, {"watermark": wm}, resamples=0, min_group_size=5)
    assert not find_group(ev, 1, "watermark", "0").too_small
    assert ev.worst_group == "class 0 + watermark=1"  # 0.25 < 0.5 still
    pred2 = pred.copy()
    pred2[90:96] = 0  # the 6-sample group now entirely wrong
    ev2 = evaluate_predictions(labels, pred2, {"watermark": wm}, resamples=0, min_group_size=5)
    assert ev2.worst_group == "class 1 + watermark=0"
    assert ev2.worst_group_accuracy.value == 0.0
    ev3 = evaluate_predictions(labels, pred2, {"watermark": wm}, resamples=0, min_group_size=10)
    assert ev3.worst_group == "class 0 + watermark=1"


def test_named_classes_name_their_groups_and_the_worst_group():
    labels, pred, wm = _watermark_case()
    names = ["three", "eight"]
    ev = evaluate_predictions(labels, pred, {"watermark": wm}, resamples=0, class_names=names)
    plain = evaluate_predictions(labels, pred, {"watermark": wm}, resamples=0)
    assert {(g.label, g.label_name) for g in ev.groups} == {(0, "three"), (1, "eight")}
    assert {g.label_name for g in plain.groups} == {""}
    assert (
        ev.worst_group == "three (0) + watermark=1" and plain.worst_group == "class 0 + watermark=1"
    )
    # The numbers do not depend on the names.
    assert [g.accuracy for g in ev.groups] == [g.accuracy for g in plain.groups]
    assert ev.balanced_accuracy == plain.balanced_accuracy
    # Without attributes the worst class stands in, by name too.
    assert evaluate_predictions(labels, pred, {}, resamples=0, class_names=names).worst_group == (
        "three (0)"
    )


def test_multi_valued_and_several_attributes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    pred = np.where(rng.random(300) < 0.8, labels, 1 - labels)
    age = rng.choice(["young", "mid", "old"], 300)
    sex = rng.choice(["f", "m"], 300)
    ev = evaluate_predictions(labels, pred, {"age": age, "sex": sex}, resamples=0)
    assert len(ev.groups) == 2 * 3 + 2 * 2
    assert sum(g.count for g in ev.groups if g.attribute == "age") == 300
    for g in ev.groups:
        members = (labels == g.label) & ((age if g.attribute == "age" else sex) == g.value)
        assert g.accuracy.value == pytest.approx((pred[members] == labels[members]).mean())
    assert ev.worst_group_accuracy.value == min(g.accuracy.value for g in ev.groups)


def test_every_group_too_small_is_an_error():
    labels, pred, wm = _watermark_case()
    with pytest.raises(GroupTooSmall, match="min_group_size=100"):
        evaluate_predictions(labels, pred, {"watermark": wm}, min_group_size=100)
    with pytest.raises(InvalidSpec):
        evaluate_predictions(labels, pred, {"watermark": wm[:10]})
    with pytest.raises(InvalidSpec):
        evaluate_predictions([], [], {})


def test_evaluate_a_model_and_its_cost():
    # A linear model on 2x2 images whose predictions are known: class = argmax of the
    # first two pixels.
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 2, 2, generator=g)
    expected = (x[:, 0, 0, 1] > x[:, 0, 0, 0]).long().numpy()
    labels = np.array([0, 1] * 20)
    attr = {"wm": np.array([0] * 20 + [1] * 20)}
    np.testing.assert_array_equal(predict(model, x, batch_size=7), expected)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.tensor(labels)), batch_size=16
    )
    ev = evaluate(model, loader, labels, attr, example_input=x[:1], resamples=0, min_group_size=5)
    direct = evaluate_predictions(labels, expected, attr, resamples=0, min_group_size=5)
    assert ev.groups == direct.groups and ev.balanced_accuracy == direct.balanced_accuracy
    assert ev.parameters == 8 and ev.flops == 8 and ev.latency_ms > 0


def test_pruned_resnet_is_cheaper():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = channel_groups(model, x)
    scores = {
        name: torch.rand(len(ch))
        for g in groups
        for name, ch in g.outputs.items()
        if name in g.convs
    }
    sel = select_filters(scores, 0.5, groups)
    compact = compact_model(mask_channels(copy.deepcopy(model), sel.zeroed), sel, x)
    params, macs, latency = model_cost(model, x, repeats=5)
    params2, macs2, latency2 = model_cost(compact, x, repeats=5)
    assert params == sum(p.numel() for p in model.parameters())
    assert params2 < 0.5 * params and macs2 < 0.5 * macs
    assert latency > 0 and latency2 > 0
