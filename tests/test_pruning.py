"""LRP filter scores, CNP's projection, global selection, masked/compact removal, schedules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch_pruning as tp
import torchvision
from sklearn.datasets import load_digits
from torch import nn
from zennit.rules import Epsilon

from cnp_core.debias import reference_indices
from cnp_core.errors import InvalidSpec, LayerError, NoFlaggedSubspace
from cnp_core.lrp import Explainer
from cnp_core.pruning.groups import ChannelGroup, channel_groups, graph_of
from cnp_core.pruning.layers import hidden_linears, upstream_convs
from cnp_core.pruning.projection import (
    ConceptProjection,
    Projection,
    fold_projection,
    insert_projection,
    union_projection,
)
from cnp_core.pruning.relevance import filter_scores
from cnp_core.pruning.schedule import finetune, prune
from cnp_core.pruning.selection import select_filters, unit_scores
from cnp_core.pruning.surgery import compact_model, mask_channels
from cnp_core.spec import PruneSpec
from cnp_core.subspaces import ConceptBasis

torch.set_num_threads(1)


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that merging and masking them matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return _randomise_batchnorm(torchvision.models.resnet18(num_classes=2))


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])


class HeadNet(nn.Module):
    """conv - ReLU - conv - BN - ReLU - global average pool - linear, in-place ReLUs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_scores_match_closed_form_at_the_last_conv():
    # Above the last conv: Epsilon on the linear layer, Norm on the average pool, Pass on
    # ReLU and the merged BatchNorm, so sum_hw R(n, j) = pooled_nj W_tj / z_t exactly.
    torch.manual_seed(3)
    model = _randomise_batchnorm(HeadNet())
    x = torch.rand(5, 3, 8, 8)
    t = torch.tensor([0, 1, 2, 1, 0])
    scores = filter_scores(model, x, t, batch_size=2)
    with torch.no_grad():
        pooled = torch.flatten(model.pool(model.features(x)), 1)
        logits = model.fc(pooled)
    per_image = pooled * model.fc.weight[t] / logits[torch.arange(5), t][:, None]
    expected = per_image.abs().sum(0)
    torch.testing.assert_close(scores["features.2"], expected, rtol=2e-3, atol=1e-6)
    assert set(scores) == {"features.0", "features.2"}
    # The caller's model is untouched (BatchNorm not merged into it, no hooks left).
    assert not model.features[0]._forward_hooks
    assert float(model.features[3].running_var.min()) >= 0.5


class HiddenNet(nn.Module):
    """conv - ReLU - global average pool - hidden linear - ReLU - output linear."""

    def __init__(self, hidden: int = 5, output_first: bool = False):
        super().__init__()
        if output_first:  # registration order != run order
            self.out = nn.Linear(hidden, 3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.hidden = nn.Linear(6, hidden)
        if not output_first:
            self.out = nn.Linear(hidden, 3)

    def features(self, x):
        return torch.relu(self.hidden(torch.flatten(self.conv(x).relu().mean((2, 3), True), 1)))

    def forward(self, x):
        return self.out(self.features(x))


def test_hidden_neuron_scores_match_closed_form():
    # Epsilon on the output layer, Pass on the ReLU: R(n, j) = h_nj W_tj / z_t exactly at
    # the hidden layer's output, and score(hidden, j) = sum_n |R(n, j)|.
    torch.manual_seed(4)
    model = HiddenNet().eval()
    x = torch.rand(5, 3, 8, 8)
    t = torch.tensor([0, 1, 2, 1, 0])
    assert list(hidden_linears(model, x)) == ["hidden"]
    scores = filter_scores(model, x, t, batch_size=3)
    assert set(scores) == {"conv", "hidden"}  # never the output layer
    with torch.no_grad():
        h = model.features(x)
        logits = model.out(h)
    per_image = h * model.out.weight[t] / logits[torch.arange(5), t][:, None]
    torch.testing.assert_close(scores["hidden"], per_image.abs().sum(0), rtol=2e-3, atol=1e-6)
    # A model without convolutions but with a hidden layer has neurons to rank.
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    assert set(filter_scores(mlp, torch.rand(4, 3, 2, 2), t[:4] % 2)) == {"1"}
    # The output layer is the last Linear to run, wherever it is registered.
    assert list(hidden_linears(HiddenNet(output_first=True), x)) == ["hidden"]


def test_resnet_scores_cover_every_conv(resnet, images):
    scores = filter_scores(resnet, *images, batch_size=4)
    convs = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(scores) == sorted(convs)
    for name, s in scores.items():
        assert s.shape == (dict(resnet.named_modules())[name].out_channels,)
        assert torch.isfinite(s).all() and (s >= 0).all()
        assert s.sum() > 0, name
    again = filter_scores(resnet, *images, batch_size=6)  # batching does not matter
    torch.testing.assert_close(again["layer3.1.conv2"], scores["layer3.1.conv2"], rtol=1e-4, atol=0)


def _spurious(d: int, width: int, seed: int) -> np.ndarray:
    """A random d x width matrix with orthonormal columns."""
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, width)))[0]


def test_projection_removes_the_subspace_relevance(resnet, images):
    # Independent check with the lead's context tap: the context at layer2 (inside the
    # projected copy) is the Epsilon message of P, so R_s = sum_p (U^T a)(U^T c) ~ 0.
    u = _spurious(128, 8, seed=5)
    p = np.eye(128) - u @ u.T
    projected = insert_projection(copy.deepcopy(resnet), Projection("layer2", p))
    target = images[1]
    with Explainer(resnet, ["layer2"]) as ex:
        plain = ex.explain(images[0], target)
    rule = [(ConceptProjection, Epsilon(epsilon=1e-6))]
    with Explainer(projected, ["layer2.0"], layer_map=rule) as ex:
        cnp = ex.explain(images[0], target)

    def subspace_relevance(a, c):
        ua = torch.einsum("ndhw,dk->nkhw", a.double(), torch.as_tensor(u))
        uc = torch.einsum("ndhw,dk->nkhw", c.double(), torch.as_tensor(u))
        return (ua * uc).sum(dim=(1, 2, 3))

    before = subspace_relevance(plain.activations["layer2"], plain.contexts["layer2"])
    after = subspace_relevance(cnp.activations["layer2.0"], cnp.contexts["layer2.0"])
    total = (cnp.activations["layer2.0"] * cnp.contexts["layer2.0"]).sum(dim=(1, 2, 3))
    assert after.abs().max() < 1e-5 * total.abs().max()
    assert after.abs().max() < 1e-3 * before.abs().mean()


def test_cnp_zeroes_filters_that_write_only_the_spurious_channels(resnet, images):
    # U_s = standard basis vectors: the filters of layer2.1.conv2 that write those
    # channels reach the output only through the projected subspace.
    channels = [3, 17, 40, 77]
    p = np.eye(128)
    p[channels, channels] = 0
    vanilla = filter_scores(resnet, *images)
    cnp = filter_scores(resnet, *images, projection=Projection("layer2", p))
    spurious = cnp["layer2.1.conv2"][channels]
    assert spurious.max() < 1e-6 * cnp["layer2.1.conv2"].max()
    assert vanilla["layer2.1.conv2"][channels].min() > 1e-3 * vanilla["layer2.1.conv2"].max()
    # ... and the filters chosen for removal differ from vanilla LRP pruning's.
    a = select_filters(vanilla, 0.3).removed
    b = select_filters(cnp, 0.3).removed
    assert set(channels) <= set(b["layer2.1.conv2"])
    assert a != b


def test_upstream_convs_follow_the_graph():
    resnet = torchvision.models.resnet18(num_classes=2)
    x = torch.zeros(1, 3, 32, 32)
    expected = {"conv1"} | {
        name
        for name, m in resnet.named_modules()
        if isinstance(m, nn.Conv2d) and name.startswith(("layer1.", "layer2."))
    }
    assert upstream_convs(resnet, "layer2", x) == expected
    assert "layer2.0.downsample.0" in expected  # the skip path counts too
    vgg = torchvision.models.vgg11(num_classes=2)  # in-place ReLUs after every conv
    assert upstream_convs(vgg, "features.10", x) == {f"features.{i}" for i in (0, 3, 6, 8)}
    with pytest.raises(LayerError, match="unknown layer"):
        upstream_convs(resnet, "layer9", x)


def test_upstream_scope_prunes_only_what_feeds_the_audited_layer(resnet, images):
    p = np.eye(128)
    p[:8, :8] -= np.eye(8)
    feeding = upstream_convs(resnet, "layer2", images[0])
    total = sum(resnet.get_submodule(n).out_channels for n in feeding)
    for method in ("lrp", "cnp"):
        spec = PruneSpec(method=method, rate=0.3, scope="upstream")
        out = prune(resnet, spec, images, projection=Projection("layer2", p))
        assert set(out.summary.removed) <= feeding
        assert out.summary.filters_total == total
        assert abs(out.summary.filters_removed - round(0.3 * total)) <= 4
    with pytest.raises(InvalidSpec, match="audited layer"):
        prune(resnet, PruneSpec(method="lrp", scope="upstream"), images)
    with pytest.raises(InvalidSpec, match="scope"):
        PruneSpec(scope="downstream").validate([])


def test_prune_removes_hidden_neurons_and_counts_them():
    torch.manual_seed(2)
    model = HiddenNet(hidden=6).eval()
    x, t = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    out = prune(model, PruneSpec(method="lrp", rate=0.5, scope="all"), (x, t))
    s = out.summary
    assert (s.filters_removed, s.filters_total, s.neurons_removed, s.neurons_total) == (3, 6, 3, 6)
    assert set(s.removed) == {"conv"}  # the summary's per-layer list stays about filters
    assert out.history[0].neurons_removed == 3 and out.selection.neurons.keys() == {"hidden"}
    assert out.compact.hidden.out_features == 3 and out.compact.out.in_features == 3
    assert out.compact.out.out_features == 3  # the classes stay
    with torch.no_grad():
        torch.testing.assert_close(out.compact(x), out.masked(x), rtol=1e-5, atol=1e-6)
    # The upstream scope ranks what feeds the audited layer: no neuron feeds the conv.
    spec = PruneSpec(method="lrp", rate=0.5, scope="upstream")
    assert prune(model, spec, (x, t), layer="conv").summary.neurons_total == 0
    assert prune(model, spec, (x, t), layer="hidden").summary.neurons_total == 6


def test_union_of_subspaces_is_removed(resnet, images):
    basis = ConceptBasis(_spurious(128, 128, seed=2).reshape(128, 4, 32), np.nan, "random")
    p = basis.complement_projector([0, 2])  # two flagged subspaces (two attribute values)
    projected = insert_projection(copy.deepcopy(resnet), Projection("layer2", p))
    rule = [(ConceptProjection, Epsilon(epsilon=1e-6))]
    with Explainer(projected, ["layer2.0"], layer_map=rule) as ex:
        out = ex.explain(images[0], images[1])
    a = out.activations["layer2.0"].permute(0, 2, 3, 1).reshape(-1, 128)
    c = out.contexts["layer2.0"].permute(0, 2, 3, 1).reshape(-1, 128)
    per_subspace = np.abs(basis.relevance(a, c).sum(0))
    assert per_subspace[[0, 2]].max() < 1e-5 * per_subspace[[1, 3]].max()


def test_union_projection_of_overlapping_subspaces():
    # Two fits (e.g. one per value of a multi-valued attribute) whose subspaces overlap.
    g = np.random.default_rng(0)
    shared = g.standard_normal((16, 1))
    u1 = np.linalg.qr(np.hstack([shared, g.standard_normal((16, 2))]))[0]
    u2 = np.linalg.qr(np.hstack([shared, g.standard_normal((16, 1))]))[0]
    p = union_projection("layer", [u1, u2[:, :, None]]).matrix
    np.testing.assert_allclose(p @ p, p, atol=1e-10)
    np.testing.assert_allclose(p, p.T, atol=1e-12)
    np.testing.assert_allclose(p @ np.hstack([u1, u2]), 0, atol=1e-10)
    assert round(np.trace(p)) == 16 - 4  # span(u1, u2) has dimension 4, not 5


def test_projection_layer_errors(resnet, images):
    with pytest.raises(LayerError, match="unknown layer"):
        filter_scores(resnet, *images, projection=Projection("layer9", np.eye(128)))
    with pytest.raises(LayerError, match="runs 2 times"):  # ResNet's shared ReLU
        filter_scores(resnet, *images, projection=Projection("layer2.0.relu", np.eye(128)))
    with pytest.raises(LayerError, match="BatchNorm"):
        filter_scores(resnet, *images, projection=Projection("layer2.0.conv1", np.eye(128)))
    with pytest.raises(LayerError, match="cannot follow"):
        filter_scores(resnet, *images, projection=Projection("layer2", np.eye(64)))
    with pytest.raises(LayerError, match="no prunable convolution"):
        filter_scores(
            nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.rand(2, 3, 2, 2), images[1][:2]
        )


def test_global_ranking_without_per_layer_normalisation():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 20.0, 30.0])}
    sel = select_filters(scores, 0.5)
    # The three lowest are all in "a"; one channel of "a" must stay, so b's lowest goes.
    assert sel.removed == {"a": [0, 1], "b": [0]}
    assert sel.filters_removed == 3 and sel.filters_total == 6
    for rate in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(InvalidSpec):
            select_filters(scores, rate)


def test_coupled_channels_share_one_score():
    scores = {
        "x": torch.tensor([1.0, 9.0]),
        "y": torch.tensor([5.0, 0.0]),
        "z": torch.tensor([4.0, 4.0]),
    }
    coupled = ChannelGroup("x", 2, {"x": [0, 1], "bn": [0, 1], "y": [1, 0]}, ["x", "y"])
    single = ChannelGroup("z", 2, {"z": [0, 1]}, ["z"])
    np.testing.assert_allclose(unit_scores(coupled, scores), [0.5, 7.0])
    sel = select_filters(scores, 0.3, [coupled, single])  # target 2 of 6 filters
    assert sel.groups == {"x": [0]}
    assert sel.removed == {"x": [0], "y": [1]}
    assert sel.zeroed == {"x": [0], "bn": [0], "y": [1]}


def test_neurons_are_ranked_apart_from_filters():
    # Neuron scores are far below filter scores (LRP conservation spreads the relevance
    # over more units); a joint ranking would remove every neuron before any filter.
    scores = {
        "conv": torch.tensor([4.0, 1.0, 3.0, 2.0]),
        "fc1": torch.tensor([0.02, 0.01, 0.03, 0.04, 0.05, 0.06]),
        "fc2": torch.tensor([0.001, 0.002]),
    }
    groups = [
        ChannelGroup("conv", 4, {"conv": [0, 1, 2, 3], "bn": [0, 1, 2, 3]}, ["conv"]),
        ChannelGroup("fc1", 6, {"fc1": list(range(6))}, ["fc1"], "neuron"),
        ChannelGroup("fc2", 2, {"fc2": [0, 1]}, ["fc2"], "neuron"),
    ]
    sel = select_filters(scores, 0.5, groups)
    assert sel.removed == {"conv": [1, 3]}  # half of the filters
    # Half of the 8 neurons, globally over the hidden layers; fc2 keeps one (min_keep).
    assert sel.neurons == {"fc1": [0, 1, 2], "fc2": [0]}
    assert (sel.filters_removed, sel.filters_total) == (2, 4)
    assert (sel.neurons_removed, sel.neurons_total) == (4, 8)
    assert sel.zeroed == {"conv": [1, 3], "bn": [1, 3], "fc1": [0, 1, 2], "fc2": [0]}
    # An earlier step's removals count towards each kind's own target.
    later = select_filters(scores, 0.75, groups, already=sel.groups)
    assert later.neurons["fc1"] == [0, 1, 2, 3, 4] and later.removed["conv"] == [1, 2, 3]


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=2)
    if arch.startswith("vgg"):  # a small head keeps the test fast; flatten coupling stays
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 32),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(32, 16),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(16, 2),
        )
    return _randomise_batchnorm(model)


@pytest.mark.parametrize(
    ("arch", "rate"),
    [("resnet18", 0.3), ("resnet18", 0.5), ("vgg11", 0.3), ("vgg11", 0.5), ("vgg11_bn", 0.5)],
)
def test_masked_and_compact_compute_the_same_function(arch, rate):
    model = _model(arch)
    x = torch.randn(3, 3, 32, 32)
    scores = filter_scores(model, x, torch.tensor([0, 1, 1]))
    groups = channel_groups(model, x[:1])
    sel = select_filters(scores, rate, groups)
    masked = mask_channels(copy.deepcopy(model), sel.zeroed)
    compact = compact_model(masked, sel, x[:1]).eval()
    with torch.no_grad():
        out_masked, out_compact, out_full = masked(x), compact(x), model(x)
    torch.testing.assert_close(out_compact, out_masked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_masked, out_full)
    n_params = sum(p.numel() for p in compact.parameters())
    assert n_params < sum(p.numel() for p in model.parameters())
    # The rate is met (overshoot at most one coupled unit) and no layer is emptied.
    largest_unit = max(len(g.convs) for g in groups)
    assert rate * sel.filters_total <= sel.filters_removed + 0.5
    assert sel.filters_removed < rate * sel.filters_total + largest_unit
    for name, conv in dict(compact.named_modules()).items():
        if isinstance(conv, nn.Conv2d):
            original = dict(model.named_modules())[name].out_channels
            assert conv.out_channels == original - len(sel.removed.get(name, []))
            assert conv.out_channels >= 1
    if arch.startswith("vgg"):  # hidden neurons go at the same rate, ranked on their own
        assert sel.neurons_total == 48 and sel.neurons_removed == round(rate * 48)
        assert set(sel.neurons) <= {"classifier.0", "classifier.3"}
        head = compact.classifier
        assert head[0].out_features == 32 - len(sel.neurons.get("classifier.0", []))
        assert head[3].in_features == head[0].out_features  # the next layer's columns too
        assert head[3].out_features == 16 - len(sel.neurons.get("classifier.3", []))
        assert head[6].in_features == head[3].out_features and head[6].out_features == 2
        for name in sel.neurons:  # dead in the masked model: weight rows and biases zero
            fc = masked.get_submodule(name)
            assert fc.weight[sel.neurons[name]].abs().max() == 0
            assert fc.bias[sel.neurons[name]].abs().max() == 0
    else:
        assert sel.neurons_total == 0 and not sel.neurons
    if arch == "resnet18":  # residual-coupled convolutions lose the same channels
        streams = [g for g in groups if len(g.convs) > 1]
        assert len(streams) == 4 and any(g.root in sel.groups for g in streams)
        for g in streams:
            removed = [sel.removed.get(name, []) for name in g.convs]
            assert all(r == removed[0] for r in removed)


_OUTPUT_HANDLERS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


def _torch_pruning_mean(group, scores, names) -> np.ndarray:
    """An independent oracle: the mean score per root channel over the scored layers of a
    Torch-Pruning group, read straight from the graph's own index maps."""
    total = np.zeros(len(group[0].root_idxs))
    count = np.zeros_like(total)
    for item in group:
        name = names.get(item.dep.target.module)
        if name in scores and any(item.dep.handler == h for h in _OUTPUT_HANDLERS):
            np.add.at(total, item.root_idxs, scores[name][item.idxs].double().numpy())
            np.add.at(count, item.root_idxs, 1.0)
    return total / np.maximum(count, 1)


def test_unit_scores_follow_the_torch_pruning_groups(resnet, images):
    scores = filter_scores(resnet, *images)
    clean = copy.deepcopy(resnet)
    graph = graph_of(clean, images[0][:1])
    names = {m: n for n, m in clean.named_modules()}
    groups = {g.root: g for g in channel_groups(resnet, images[0][:1])}
    seen = 0
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d]):
        root = names[group[0].dep.target.module]
        expected = _torch_pruning_mean(group, scores, names)
        np.testing.assert_allclose(unit_scores(groups[root], scores), expected, rtol=1e-5)
        seen += 1
    assert seen == len(groups) == 12  # resnet18: 8 block-internal convs + 4 residual streams


def test_unit_scores_of_hidden_neurons():
    model = HiddenNet(hidden=4).eval()
    x = torch.rand(3, 3, 8, 8)
    scores = filter_scores(model, x, torch.tensor([0, 1, 2]))
    clean = copy.deepcopy(model)
    graph = graph_of(clean, x[:1])
    names = {m: n for n, m in clean.named_modules()}
    groups = {g.root: g for g in channel_groups(model, x[:1])}
    assert {r: g.kind for r, g in groups.items()} == {"conv": "filter", "hidden": "neuron"}
    (group,) = graph.get_all_groups(root_module_types=[nn.Linear], ignored_layers=[clean.out])
    np.testing.assert_allclose(
        unit_scores(groups["hidden"], scores), _torch_pruning_mean(group, scores, names), rtol=1e-6
    )
    np.testing.assert_allclose(unit_scores(groups["hidden"], scores), scores["hidden"], rtol=1e-6)


def test_fold_projection_is_exact(resnet, images):
    u = _spurious(256, 16, seed=1)
    projection = Projection("layer3", np.eye(256) - u @ u.T)
    folded = fold_projection(resnet, projection)
    inserted = insert_projection(copy.deepcopy(resnet), projection)
    with torch.no_grad():
        torch.testing.assert_close(folded(images[0]), inserted(images[0]), rtol=1e-4, atol=1e-5)
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in resnet.named_modules()]
    w = _spurious(512, 4, 0)
    last = Projection("layer4", np.eye(512) - w @ w.T)
    with torch.no_grad():  # through average pooling and flattening into the linear layer
        torch.testing.assert_close(
            fold_projection(resnet, last)(images[0]),
            insert_projection(copy.deepcopy(resnet), last)(images[0]),
            rtol=1e-4,
            atol=1e-5,
        )
    with pytest.raises(LayerError, match="cannot be folded"):
        fold_projection(resnet, Projection("layer2.0", np.eye(128)))  # a residual sum follows


# ------------------------------------------------------------------ a trained model


class DigitNet(nn.Module):
    def __init__(self, widths=(16, 32, 32)):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1),
            nn.BatchNorm2d(a),
            nn.ReLU(inplace=True),
            nn.Conv2d(a, b, 3, padding=1),
            nn.BatchNorm2d(b),
            nn.ReLU(inplace=True),  # features.5: where a concept would be projected out
            nn.Conv2d(b, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = DigitNet()
    loader = _loader(x[:1400], y[:1400])
    finetune(model, loader, epochs=6, learning_rate=1e-2)
    return model.eval(), x, y


def _loader(x, y, batch_size=100):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_iterative_schedule_with_finetuning(digits):
    model, x, y = digits
    test_x, test_y = x[1400:], y[1400:]
    ref = reference_indices(y[:1400].numpy(), 8, seed=0)
    assert len(ref) == 80 and len(set(y[ref].tolist())) == 10
    base = _accuracy(model, test_x, test_y)
    assert base > 0.85
    spec = PruneSpec(
        method="lrp",
        rate=0.3,
        schedule="iterative",
        steps=2,
        finetune_epochs=2,
        learning_rate=1e-2,
        scope="all",  # the whole model: no audited layer here
    )
    out = prune(model, spec, (x[ref], y[ref]), train_loader=_loader(x[:1400], y[:1400]))
    assert [s.rate for s in out.history] == [0.15, 0.3]
    assert out.summary.filters_total == 80
    assert [s.filters_removed for s in out.history] == [12, 24]
    assert all(s.finetune_loss[1] < s.finetune_loss[0] for s in out.history)
    # Pruned channels stayed dead through fine-tuning, and both forms agree.
    for name, channels in out.selection.zeroed.items():
        assert dict(out.masked.named_modules())[name].weight[channels].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(out.compact(test_x), out.masked(test_x), rtol=1e-4, atol=1e-4)
    # Fine-tuning is what keeps the pruned model useful (PXP one-shot, no fine-tuning).
    oneshot = prune(model, PruneSpec(method="lrp", rate=0.3, scope="all"), (x[ref], y[ref]))
    assert _accuracy(out.compact, test_x, test_y) > max(
        0.6, _accuracy(oneshot.compact, test_x, test_y)
    )
    assert _accuracy(model, test_x, test_y) == base  # the caller's model is untouched


def test_cnp_schedule_relearns_and_keeps_the_projection(digits):
    model, x, y = digits
    ref = reference_indices(y[:1400].numpy(), 4, seed=1)
    u = _spurious(32, 2, seed=3)
    calls = []

    def relearn(current: nn.Module) -> Projection:
        calls.append(current)
        w = _spurious(32, 2, seed=10 + len(calls))
        return Projection("features.5", np.eye(32) - w @ w.T)

    spec = PruneSpec(
        method="cnp",
        rate=0.25,
        schedule="iterative",
        steps=2,
        finetune_epochs=1,
        relearn_subspaces=True,
    )
    first = Projection("features.5", np.eye(32) - u @ u.T)
    out = prune(
        model,
        spec,
        (x[ref], y[ref]),
        train_loader=_loader(x[:700], y[:700]),
        projection=first,
        relearn=relearn,
        keep_projection=True,
    )
    assert len(calls) == 2 and out.projection is not first
    with torch.no_grad():
        torch.testing.assert_close(out.compact(x[:50]), out.masked(x[:50]), rtol=1e-4, atol=1e-4)
    # A planted concept: the 4 channels of features.5 that vanilla LRP finds most relevant.
    vanilla = prune(model, PruneSpec(method="lrp", rate=0.25, scope="all"), (x[ref], y[ref]))
    top = torch.argsort(filter_scores(model, x[ref], y[ref])["features.3"])[-4:].tolist()
    planted = np.eye(32)
    planted[top, top] = 0
    cnp = prune(
        model,
        PruneSpec(method="cnp", rate=0.25, scope="all"),
        (x[ref], y[ref]),
        projection=Projection("features.5", planted),
    )
    assert vanilla.summary.filters_removed == cnp.summary.filters_removed
    assert not set(top) & set(vanilla.summary.removed.get("features.3", []))
    assert set(top) <= set(cnp.summary.removed["features.3"])


def test_prune_rejects_bad_requests(digits):
    model, x, y = digits
    ref = (x[:20], y[:20])
    with pytest.raises(NoFlaggedSubspace, match="cav"):
        prune(model, PruneSpec(method="cnp"), ref)
    with pytest.raises(InvalidSpec, match="strictly between"):
        prune(model, PruneSpec(method="lrp", rate=1.0), ref)
    with pytest.raises(InvalidSpec, match="training data"):
        prune(model, PruneSpec(method="lrp", finetune_epochs=1), ref)
    p = Projection("features.5", np.eye(32))
    spec = PruneSpec(method="cnp", relearn_subspaces=True, finetune_epochs=1)
    with pytest.raises(InvalidSpec, match="relearn"):
        prune(model, spec, ref, projection=p, train_loader=_loader(x[:20], y[:20]))


# ------------------------------------------------------------------ experiment runner


def _rows():
    from cnp_core.experiment import Row

    rows = []
    for seed in range(3):
        jitter = 0.01 * seed
        rows.append(Row(seed, "none", 0.0, 0.76 + jitter, 0.22, 0.9, 0.22))
        rows.append(Row(seed, "projected", 0.0, 0.78, 0.45 + jitter, 0.9, 0.45))
        for rate, lrp, cnp, bacc in ((0.2, 0.30, 0.60, 0.80), (0.4, 0.25, 0.70, 0.70)):
            rows.append(Row(seed, "lrp", rate, 0.77, lrp + jitter, 0.9, lrp, filters_removed=10))
            rows.append(Row(seed, "cnp", rate, bacc + jitter, cnp, 0.9, cnp, filters_removed=10))
    return rows


def test_experiment_summary_and_best_matched_rate(tmp_path):
    from cnp_core.experiment import ExperimentConfig, best_matched, summarise, write_outputs

    summary = summarise(_rows())
    assert [(s.method, s.rate) for s in summary][:3] == [
        ("none", 0.0),
        ("projected", 0.0),
        ("lrp", 0.2),
    ]
    cnp = next(s for s in summary if (s.method, s.rate) == ("cnp", 0.2))
    assert cnp.n == 3 and cnp.mean["balanced_accuracy"] == pytest.approx(0.81)
    assert cnp.std["balanced_accuracy"] == pytest.approx(0.01)
    best = best_matched(summary)
    # 0.4 has the larger gap but loses balanced accuracy; 0.2 is the best matched rate.
    assert best["rate"] == 0.2 and best["qualified"] and best["target_met"]
    assert best["gap_other_attribute"] == pytest.approx(0.29)
    config = ExperimentConfig(seeds=(0, 1, 2, 3), keep_projection=True, unflagged=[3])
    paths = write_outputs(_rows(), config, "watermark", tmp_path)
    text = paths["summary_md"].read_text()
    assert "| CNP (projection kept) | 0.20 | 0.810 ± 0.010 |" in text and "met" in text
    assert "3 of 4 models flagged" in text
    for key in ("balanced_accuracy", "other_attribute"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths["rows"].read_text().splitlines()) == 1 + len(_rows())


def test_concept_fits_are_cached_by_every_setting_they_depend_on(tmp_path):
    from cnp_core.experiment import ConceptFit, ExperimentConfig, concept_cache

    config = ExperimentConfig(benchmark="bench-1")
    name = concept_cache(config, 0)
    assert name == concept_cache(ExperimentConfig(benchmark="bench-1", rates=(0.5,)), 0)
    assert name != concept_cache(config, 1)
    assert name != concept_cache(ExperimentConfig(benchmark="bench-1", n_subspaces=(4,)), 0)
    assert name != concept_cache(ExperimentConfig(benchmark="bench-2"), 0)
    fit = ConceptFit(Projection("layer3", np.eye(4) - 0.25), 0.98, "S1* ...", 12.5)
    fit.save(tmp_path / name)
    back = ConceptFit.load(tmp_path / name)
    assert back.projection.layer == "layer3" and back.table == "S1* ..."
    assert np.array_equal(back.projection.matrix, fit.projection.matrix)
    assert back.ap_attribute == 0.98


@pytest.mark.slow
def test_experiment_end_to_end_with_cav_and_relearning():
    """One seed, one rate, on the cached watermark benchmark (built on first use)."""
    from cnp_core.experiment import ExperimentConfig, load_benchmark, run_seed

    config = ExperimentConfig(
        seeds=(0,),
        rates=(0.2,),
        concept="cav",
        relearn=True,
        schedule="iterative",
        steps=2,
        finetune_epochs=1,
        layer="layer1",
        image_size=32,
        # The runner's mechanics, not the audit's verdict: a 32 px CAV at layer1 predicts
        # the watermark with AP 0.76 to 0.87 depending on the machine's trained model.
        flag_threshold=0.5,
    )
    bench, model, table, splits = load_benchmark(config, 0)
    rows = run_seed(bench, model, table, splits, config, 0, log=lambda m: None)
    assert [r.method for r in rows] == ["none", "projected", "lrp", "cnp"]
    lrp, cnp = rows[2], rows[3]
    # Residual-coupled convs leave together, so matched rates agree up to one group (<= 4).
    assert cnp.filters_removed > 0 and abs(lrp.filters_removed - cnp.filters_removed) <= 4
    assert cnp.parameters < rows[0].parameters
    assert 0.0 <= cnp.other_attribute <= 1.0 and np.isfinite(cnp.flagged_ap)


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_prune_stage_of_the_pipeline(tmp_path):
    """CNP as the pipeline's optional stage, from a real audit on the benchmark."""
    from cnp_core import pipeline
    from cnp_core.export import load_compact
    from cnp_core.synthetic import ensure_benchmark

    bench = ensure_benchmark()
    spec = bench.audit_spec(
        layers=["layer1"],
        flag_threshold=0.5,
        drsa_max_epochs=100,
        bootstrap=0,
        heatmap_samples=0,
        prune=PruneSpec(method="cnp", rate=0.2, reference_per_class=8, keep_projection=True),
    )
    result = pipeline.run_audit(spec, workdir=tmp_path)
    assert result.pruning.method == "cnp" and result.pruning.filters_removed > 0
    assert result.after.parameters < result.before.parameters
    compact = load_compact(result.artifacts["model_compact.architecture.json"].rsplit("/", 1)[0])
    assert sum(p.numel() for p in compact.parameters()) == result.after.parameters


def test_a_kept_projection_that_cannot_fold_fails_before_the_audit():
    from cnp_core.debias import check_prune
    from cnp_core.spec import AuditSpec

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.Flatten()
    )
    spec = AuditSpec(layers=["1"], prune=PruneSpec(method="cnp"))  # a max pool reads "1"
    with pytest.raises(InvalidSpec, match="reaches call_module 2.*--no-keep-projection"):
        check_prune(model, spec)
    for fine in (
        AuditSpec(layers=["2"], prune=PruneSpec(method="cnp")),  # a convolution reads "2"
        AuditSpec(layers=["1"], prune=PruneSpec(method="cnp", keep_projection=False)),
        AuditSpec(layers=["1"], prune=PruneSpec(method="lrp")),
        AuditSpec(layers=["1"]),
    ):
        check_prune(model, fine)
