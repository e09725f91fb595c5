"""LRP context at a layer (ALGORITHMS.md section 1) against an independent gradient-trick LRP."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from zennit.rules import ZPlus

from cnp_core.errors import LayerError
from cnp_core.lrp import Explainer, NonNegativeZPlus, _rule_of

EPS = 1e-6  # zennit's default stabiliser


pytestmark = pytest.mark.usefixtures("one_thread")


def _stabilize(z: torch.Tensor) -> torch.Tensor:
    return z + ((z == 0).to(z) + z.sign()) * EPS


class SmallCNN(nn.Module):
    """Bias-free, so LRP conserves the explained logit exactly (up to the stabiliser)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.ReLU(),  # features.4: the audited layer
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * 4 * 4, 3, bias=False)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _trick_context(model: SmallCNN, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient-trick LRP above features.4 with the rules of ``epsilon_plus``.

    Each layer's output keeps its true value but back-propagates through the rule's
    modified forward: y = z_mod * (z / stab(z_mod)).detach(). Then the gradient at the
    activation a is the LRP message per unit of a: the context.
    """
    with torch.no_grad():
        a = model.features[:5](x)
    a = a.clone().requires_grad_(True)

    def zplus_conv(inp, conv):  # the textbook z+ rule for inputs >= 0 (a is post-ReLU)
        z = conv(inp)
        z_mod = F.conv2d(inp, conv.weight.clamp(min=0), padding=1)
        return z_mod * (z / _stabilize(z_mod)).detach()

    h = torch.relu(zplus_conv(a, model.features[5]))
    h = torch.flatten(F.max_pool2d(h, 2), 1)
    z = model.classifier(h)
    logits = z * (z / _stabilize(z)).detach()  # epsilon rule
    onehot = F.one_hot(target, 3).to(logits)
    (context,) = torch.autograd.grad(logits, a, onehot)
    return a.detach(), context


@pytest.fixture
def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().double().eval()


def test_context_equals_gradient_trick_lrp(small_cnn):
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1, 0])
    with Explainer(small_cnn, ["features.4"], composite="epsilon_plus") as explainer:
        out = explainer.explain(x, target)
        lean = explainer.explain(x, target, input_relevance=False)  # no graph below the layer
    a, c = out.activations["features.4"], out.contexts["features.4"]
    a_ref, c_ref = _trick_context(small_cnn, x, target)

    torch.testing.assert_close(a, a_ref)
    rel_error = (c - c_ref).norm() / c_ref.norm()
    assert rel_error < 1e-5
    assert (lean.contexts["features.4"] - c_ref).norm() / c_ref.norm() < 1e-5
    zeros = a == 0
    assert zeros.float().mean() > 0.2  # the comparison covers many zero activations
    assert c[zeros].abs().sum() > 0  # the context is defined where a = 0: not R / a


def test_gradient_mode_context_is_the_plain_gradient(small_cnn):
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    with Explainer(small_cnn, ["features.4"], composite="gradient") as explainer:
        out = explainer.explain(x, target)
    a = small_cnn.features[:5](x).detach().requires_grad_(True)
    logits = small_cnn.classifier(torch.flatten(small_cnn.features[5:](a), 1))
    (grad,) = torch.autograd.grad(logits[torch.arange(3), target].sum(), a)
    torch.testing.assert_close(out.contexts["features.4"], grad)
    # Bias-free ReLU network: Gradient x Input sums to the logit (Euler's theorem).
    layer_relevance = (out.activations["features.4"] * grad).sum((1, 2, 3))
    torch.testing.assert_close(layer_relevance, out.logits[torch.arange(3), target])


def test_relevance_is_conserved(small_cnn):
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([2, 0, 1, 2])
    no_stabiliser = {"epsilon": 1e-30, "stabilizer": 1e-30}
    with Explainer(small_cnn, ["features.4"], "epsilon_plus", **no_stabiliser) as explainer:
        out = explainer.explain(x, target)
    layer_relevance = (out.activations["features.4"] * out.contexts["features.4"]).sum((1, 2, 3))
    logit = out.logits[torch.arange(4), target]
    torch.testing.assert_close(layer_relevance, logit, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.input_relevance.sum((1, 2, 3)), logit, rtol=1e-9, atol=1e-12)


def test_subspace_heatmaps_and_residue_sum_to_the_heatmap(small_cnn):
    d, k, dk = 16, 3, 4  # 12 of 16 dimensions: a non-zero residue
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0][:, : k * dk]
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 1, 0])

    def project(matrix):
        return lambda c: torch.einsum("de,nehw->ndhw", matrix, c)

    with Explainer(small_cnn, ["features.4"], composite="epsilon_plus") as explainer:
        full = explainer.explain(x, target).input_relevance
        parts = []
        for j in range(k):
            u = basis[:, j * dk : (j + 1) * dk]
            parts.append(explainer.explain(x, target, {"features.4": project(u @ u.T)}))
        residue = explainer.explain(
            x, target, {"features.4": project(torch.eye(d, dtype=torch.float64) - basis @ basis.T)}
        )
    total = sum(p.input_relevance for p in parts) + residue.input_relevance
    torch.testing.assert_close(total, full, rtol=1e-7, atol=1e-9)
    assert residue.input_relevance.abs().sum() > 1e-3 * full.abs().sum()


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer3"), ("vgg11", "features.15")])
def test_torchvision_models_conserve_between_layer_and_input(arch, layer):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with Explainer(model, [layer]) as explainer:
        out = explainer.explain(x, torch.tensor([1, 0]))
    layer_total = (out.activations[layer] * out.contexts[layer]).sum((1, 2, 3))
    # Rules below the layer (flat first layer, z+ with merged BatchNorm) conserve it.
    torch.testing.assert_close(
        out.input_relevance.sum((1, 2, 3)), layer_total, rtol=1e-3, atol=1e-4
    )
    after = model.state_dict()  # the canonizers touched only the attribution copy
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_context_does_not_depend_on_the_batch(small_cnn):
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    with Explainer(small_cnn, ["features.4"], composite="epsilon_plus") as explainer:
        whole = explainer.explain(x, target).contexts["features.4"]
        halves = [explainer.explain(x[i : i + 3], target[i : i + 3]) for i in (0, 3)]
    torch.testing.assert_close(torch.cat([h.contexts["features.4"] for h in halves]), whole)


@pytest.mark.parametrize(
    "arch,layer,message",
    [
        ("resnet18", "layer1.0", "mixed with another branch"),
        ("vgg11", "features.0", "through an activation"),
        ("resnet18", "fc", "feeds no later LRP rule"),
        ("resnet18", "layer9", "Did you mean"),
    ],
)
def test_layers_that_cannot_be_audited_say_why(arch, layer, message):
    model = torchvision.models.get_model(arch, num_classes=2)
    with pytest.raises(LayerError, match=message), Explainer(model, [layer]) as explainer:
        explainer.explain(torch.randn(1, 3, 32, 32), torch.tensor([0]))


def _rule_relevance(rule, conv: nn.Conv2d, x: torch.Tensor, upstream: torch.Tensor):
    """Relevance at the input of ``conv`` under ``rule``, and how often conv ran."""
    calls = []
    forward = conv.forward

    def counted(inp):
        calls.append(1)
        return forward(inp)

    conv.forward = counted
    handles = rule.register(conv)
    try:
        x = x.clone().requires_grad_(True)
        (relevance,) = torch.autograd.grad(conv(x), x, upstream)
    finally:
        handles.remove()
        del conv.forward
    return relevance, len(calls)


def test_nonnegative_zplus_is_zennit_zplus_at_half_the_cost():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()  # with a bias: z+ gets b+ only
    upstream = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    after_relu = torch.randn(3, 4, 7, 7, dtype=torch.float64).clamp(min=0)
    mixed = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    for x, branches in ((after_relu, 1), (mixed, 2)):
        expected, _ = _rule_relevance(ZPlus(), conv, x, upstream)
        got, calls = _rule_relevance(NonNegativeZPlus(), conv, x, upstream)
        assert torch.equal(got, expected)
        assert calls == 1 + branches  # the model's forward, then the rule's branches
    assert (after_relu == 0).any() and expected.abs().sum() > 0


def _count_backward(module: nn.Module) -> list:
    """A list that grows by one each time the LRP rule of ``module`` runs."""
    rule, calls = _rule_of(module), []
    backward = rule.backward

    def counted(*args):
        calls.append(1)
        return backward(*args)

    rule.backward = counted
    return calls


def test_layer_only_pass_equals_the_full_pass_without_the_rules_below():
    # Two taps and a transform on the upper one: the lower context depends on it.
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", num_classes=2).eval()
    x, target = torch.randn(3, 3, 32, 32), torch.tensor([1, 0, 1])
    layers = ["layer2", "layer3"]
    transforms = {"layer3": lambda c: c * (torch.arange(256) % 2).view(1, -1, 1, 1)}
    with Explainer(model, layers) as explainer:
        modules = dict(explainer.model.named_modules())
        counts = {
            name: _count_backward(modules[name]) for name in ("layer1.0.conv1", "layer3.0.conv1")
        }
        full = explainer.explain(x, target, transforms)
        ran_full = {name: len(calls) for name, calls in counts.items()}
        lean = explainer.explain(x, target, transforms, input_relevance=False)
        untransformed = explainer.explain(x, target, input_relevance=False).contexts["layer2"]
    assert full.input_relevance is not None and lean.input_relevance is None
    assert not torch.allclose(untransformed, lean.contexts["layer2"])
    torch.testing.assert_close(lean.logits, full.logits, rtol=1e-6, atol=1e-6)
    for layer in layers:
        assert torch.equal(lean.activations[layer], full.activations[layer])
        torch.testing.assert_close(lean.contexts[layer], full.contexts[layer], rtol=1e-5, atol=0)
    assert ran_full == {"layer1.0.conv1": 1, "layer3.0.conv1": 1}
    assert len(counts["layer1.0.conv1"]) == 1  # no rule below the lowest tap ran again
    assert len(counts["layer3.0.conv1"]) == 3  # the rules between the taps did


def test_conv_backward_runs_only_inside_the_rules(small_cnn):
    # zennit's native conv backward is skipped (its rule replaces it), and z+ runs one
    # branch behind a ReLU: 2 for the first conv (signed pixels) + 1 + 1 for the others.
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with Explainer(small_cnn, ["features.4"], composite="epsilon_plus") as explainer:
        explainer.explain(x, torch.tensor([0, 1]))  # the first pass finds the consumers
        with torch.profiler.profile() as prof:
            out = explainer.explain(x, torch.tensor([0, 1]))
    names = [event.name for event in prof.events()]
    assert names.count("aten::convolution_backward") == 4
    assert out.input_relevance.abs().sum() > 0
