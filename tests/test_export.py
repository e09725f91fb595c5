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
from cnp_core.export import (
    describe,
    fold_batchnorm,
    for_inference,
    load_compact,
    rebuild,
    save_compact,
)
from cnp_core.pruning.groups import channel_groups
from cnp_core.pruning.selection import select_filters
from cnp_core.pruning.surgery import compact_model, mask_channels

torch.set_num_threads(1)


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so that folding them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def _count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


def _channels_last(model: nn.Module) -> bool:
    return all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    )


@pytest.fixture(scope="module")
def compact():
    torch.manual_seed(0)
    model = _randomise_batchnorm(torchvision.models.resnet18(num_classes=3))
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
    masked = mask_channels(copy.deepcopy(model), sel.zeroed)
    return compact_model(masked, sel, x), sel, masked


def _small_vgg_bn() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(num_classes=2)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 2))
    return _randomise_batchnorm(model)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_inference_form_folds_every_batchnorm_and_keeps_the_function(arch):
    if arch == "resnet18":
        torch.manual_seed(0)
        model = _randomise_batchnorm(torchvision.models.resnet18(num_classes=3))
    else:
        model = _small_vgg_bn()
    batchnorms = _count(model, nn.BatchNorm2d)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    fast = for_inference(model)
    assert _count(fast, nn.BatchNorm2d) == 0 and _count(fast, nn.Identity) == batchnorms
    assert _channels_last(fast) and not fast.training
    assert all(m.bias is not None for m in fast.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert _count(model, nn.BatchNorm2d) == batchnorms  # the caller's model is untouched
    assert not _channels_last(model)


class _Branching(nn.Module):
    """A conv whose output also feeds a skip (its BatchNorm cannot be folded), a BatchNorm
    after a non-conv, and one conv + BatchNorm pair that folds."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool, self.bn_pool = nn.AvgPool2d(1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.a(x)
        z = self.bn_pool(self.pool(self.bn_a(y) + y))
        return self.bn_b(self.b(z))


class _Dynamic(_Branching):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return super().forward(x)


def test_only_exact_conv_batchnorm_pairs_fold():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model = _randomise_batchnorm(_Branching())
    folded = copy.deepcopy(model)
    with torch.no_grad():
        assert fold_batchnorm(folded) == 1
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert type(folded.bn_b) is nn.Identity and folded.b.bias is not None
    assert type(folded.bn_a) is nn.BatchNorm2d and type(folded.bn_pool) is nn.BatchNorm2d
    # Untraceable: nothing folds, the model still comes out channels-last and exact.
    dynamic = _randomise_batchnorm(_Dynamic())
    fast = for_inference(dynamic)
    assert _count(fast, nn.BatchNorm2d) == 3 and _channels_last(fast)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), dynamic(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="eval mode"):
        fold_batchnorm(_Branching().train())


def test_compact_model_ships_inference_ready_unless_asked(compact):
    model, sel, masked = compact
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert _count(model, nn.BatchNorm2d) == 0 and _channels_last(model) and not model.training
    trainable = compact_model(masked.train(), sel, x[:1], inference=False)
    masked.eval()
    assert _count(trainable, nn.BatchNorm2d) == 20 and trainable.training
    assert not _channels_last(trainable)
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(trainable.eval()(x), expected, rtol=1e-4, atol=1e-5)


def test_round_trip_in_every_format(compact, tmp_path):
    model, sel, _ = compact
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
    assert description["memory_format"] == "channels_last"
    assert description["layers"]["layer1.0.bn1"] == {"type": "Identity"}
    loaded = load_compact(tmp_path)
    assert type(loaded) is torchvision.models.ResNet
    assert _count(loaded, nn.BatchNorm2d) == 0 and _channels_last(loaded)
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
    model, _, _ = compact
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
    model, _, _ = compact
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


def test_a_model_onnx_cannot_express_still_exports_the_other_formats(tmp_path):
    """VGG's 7x7 adaptive pool on the 2x2 map of a 64 px input has no ONNX form: the
    pruned model must not be lost with that one file."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=2).eval()
    with pytest.warns(UserWarning, match="no ONNX file.*adaptive_avg_pool2d"):
        paths = save_compact(model, tmp_path, torch.randn(1, 3, 64, 64))
    assert set(paths) == {"safetensors", "architecture", "pt2"}
    assert not (tmp_path / "model.onnx").exists()
