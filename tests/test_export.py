"""Round trips of a compact (physically pruned) model through every export format."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx.reference import ReferenceEvaluator
from torch import nn

from cnp_core.errors import ModelError
from cnp_core.export import describe, load_compact, rebuild, save_compact
from cnp_core.pruning import channel_groups, compact_model, mask_channels, select_filters

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def compact():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = channel_groups(model, x)
    g = torch.Generator().manual_seed(0)
    scores = {
        n: torch.rand(len(c), generator=g)
        for gr in groups
        for n, c in gr.outputs.items()
        if n in gr.convs
    }
    sel = select_filters(scores, 0.4, groups)
    return compact_model(mask_channels(copy.deepcopy(model), sel.zeroed), sel, x).eval(), sel


def test_round_trip_in_every_format(compact, tmp_path):
    model, sel = compact
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    paths = save_compact(model, tmp_path, x[:1], architecture="resnet18", num_classes=3)
    assert {"safetensors", "architecture", "pt2", "onnx"} <= set(paths)

    # safetensors + architecture description -> an ordinary module of the pruned shape
    description = json.loads(paths["architecture"].read_text())
    assert description["channels"]["layer1.0.conv1"] == 64 - len(
        sel.removed.get("layer1.0.conv1", [])
    )
    loaded = load_compact(tmp_path)
    assert type(loaded) is torchvision.models.ResNet
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)

    # torch.export program: loads with torch alone, batch size dynamic
    program = torch.export.load(paths["pt2"]).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-6)

    # ONNX: a valid model, run by onnx's reference evaluator (no onnxruntime here)
    proto = onnx.load(paths["onnx"])
    onnx.checker.check_model(proto)
    out = ReferenceEvaluator(proto).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_rebuild_needs_a_matching_base(compact):
    model, _ = compact
    description = describe(model, architecture="resnet18", num_classes=3)
    rebuilt = rebuild(description)
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="unknown torchvision architecture"):
        rebuild({**description, "architecture": "not_a_model"})
    with pytest.raises(ModelError, match="not in the base model"):
        rebuild(description, base=nn.Sequential(nn.Conv2d(3, 4, 3)))
    # A factory model (not torchvision) rebuilds from a base the caller supplies.
    small = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 2)
    )
    narrow = nn.Sequential(
        nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 30 * 30, 2)
    )
    again = rebuild(describe(narrow), base=small)
    assert again[0].out_channels == 2 and again[3].in_features == 1800


def test_load_refuses_mismatched_weights(compact, tmp_path):
    model, _ = compact
    save_compact(
        model,
        tmp_path,
        torch.randn(1, 3, 32, 32),
        architecture="resnet18",
        num_classes=3,
        formats=("safetensors",),
    )
    description = json.loads((tmp_path / "architecture.json").read_text())
    description["layers"]["layer1.0.conv1"]["out_channels"] += 1
    (tmp_path / "architecture.json").write_text(json.dumps(description))
    with pytest.raises(ModelError, match="do not fit"):
        load_compact(tmp_path)
