"""LRP activations and context at a layer (ALGORITHMS.md section 1), through zennit.

The context c(x) at layer L is the LRP message per unit of activation: the relevance at L
is exactly R = a * c, and c is defined where a = 0 too. zennit's rule hooks hand the
*relevance* (already multiplied by the layer input) from layer to layer, so c cannot be
read off the backward tensors as R / a. Instead, the modules that consume a (the next
convolution, linear or pooling rule) are switched into a *context mode* in which their
reducer returns sum_i slope_i * g_i (the rule's gradient before the multiplication by its
input), and a tap on a turns that message back into R = a * c for the layers below, so
the input heatmap stays the ordinary LRP heatmap.

Under the "gradient" composite the taps hand the plain (possibly projected) gradient
down instead, and the input heatmap is Gradient x Input: a * c at every tapped layer and
the heatmap then both sum to the logit of a bias-free ReLU network.

Dense models (an MLP over a table, :class:`~cnp_core.architectures.MLP`): zennit's
composites put Epsilon on every hidden and output Linear (``epsilon_plus``), and
``epsilon_plus_flat`` puts Flat on the first. The rule of the first Linear shapes only
the relevance of the input features, never a context or a neuron's pruning score (those
depend only on the rules above the layer): audits and pruning come out the same under
both. Per-feature relevance wants ``epsilon_plus``: Flat spreads a neuron's relevance
over the features whatever their values, and z+ rules assume non-negative inputs, which
scaled features are not.

Cost: when only a and c are wanted (collection), nothing below the lowest tapped layer
enters the autograd graph, so no rule below it runs. zennit's rules replace each layer's
native input gradient, so that gradient is not computed (a zero stands in for it), and
z+ skips its negative-input branch behind a ReLU. Each of these leaves c unchanged.
"""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from zennit.composites import COMPOSITES
from zennit.core import BasicHook, Composite, Hook, Stabilizer
from zennit.rules import Pass, ZPlus
from zennit.types import Activation, Convolution, Linear

from .architectures import canonizers_for
from .errors import InvalidSpec, LayerError


def attribution_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off for parameters.

    zennit canonizers merge BatchNorm into convolutions and can leave merged weights
    behind, so attribution never runs on the caller's model.
    """
    clone = copy.deepcopy(model).eval()
    for param in clone.parameters():
        param.requires_grad_(False)
    return clone


# Not an LRP composite: plain backpropagation, so the context is the gradient of the
# target logit and R = a * grad (Gradient x Input).
GRADIENT = "gradient"


def composite_names() -> list[str]:
    """Every name ``AuditSpec.composite`` accepts."""
    return sorted([*COMPOSITES, GRADIENT])


def _sum_of_products(inputs, gradients) -> torch.Tensor:
    """ZPlus's reducer, sum_i x_i * g_i, for however many branches ran."""
    return sum(x * g for x, g in zip(inputs, gradients, strict=True))


class NonNegativeZPlus(ZPlus):
    """zennit's ZPlus (alpha=1, beta=0) that skips its negative-input branch when the
    layer input has no negative entry, as behind every ReLU.

    ZPlus sums two branches: z+ = conv(x.clamp(min=0), W+, b+) and
    z- = conv(x.clamp(max=0), W-, 0), and R_in = x+ * g+ + x- * g-. For x >= 0, x- = 0,
    so z- = 0 and x- * g- = 0: the first branch alone gives the same relevance (to the
    bit) at half the cost. Inputs with a negative entry get the full rule.
    """

    def __init__(self, stabilizer=1e-6, zero_params=None):
        super().__init__(stabilizer=stabilizer, zero_params=zero_params)
        stabilize = Stabilizer.ensure(stabilizer)
        self.gradient_mapper = lambda out_grad, outputs: (
            [out_grad / stabilize(sum(outputs))] * len(outputs)
        )
        self.reducer = _sum_of_products

    def backward(self, module, grad_input, grad_output):
        if bool(self.stored_tensors["input"][0].min() < 0):
            return super().backward(module, grad_input, grad_output)
        both = self.input_modifiers, self.param_modifiers, self.output_modifiers
        self.input_modifiers, self.param_modifiers, self.output_modifiers = (m[:1] for m in both)
        try:
            return super().backward(module, grad_input, grad_output)
        finally:
            self.input_modifiers, self.param_modifiers, self.output_modifiers = both


# zennit composites whose ZPlus rule (on these module types) NonNegativeZPlus replaces.
_ZPLUS_LAYERS = {
    "epsilon_plus": Convolution,
    "epsilon_plus_flat": Convolution,
    "excitation_backprop": Linear,  # zennit's Linear: dense layers and convolutions
}


def make_composite(name: str, model: nn.Module, **options) -> Composite | None:
    """The zennit composite registered as ``name`` (e.g. ``epsilon_plus_flat``) with
    canonizers; None for ``gradient``. ``options`` go to the composite (e.g. ``epsilon``);
    a ``layer_map`` there takes precedence over the composite's own rules.
    """
    if name == GRADIENT:
        return None
    if name not in COMPOSITES:
        raise InvalidSpec(f"composite must be one of {', '.join(composite_names())}, got {name!r}")
    if name in _ZPLUS_LAYERS:
        rule = NonNegativeZPlus(
            stabilizer=options.get("stabilizer", 1e-6), zero_params=options.get("zero_params")
        )
        options["layer_map"] = [*(options.get("layer_map") or []), (_ZPLUS_LAYERS[name], rule)]
    return COMPOSITES[name](canonizers=canonizers_for(model), **options)


# --- context capture -----------------------------------------------------------------


def _rule_of(module: nn.Module) -> Hook | None:
    """The zennit hook a registered composite attached to ``module``, if any."""
    for fn in module._forward_hooks.values():
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, Hook):
            return owner
    return None


class _Tap(torch.autograd.Function):
    """Identity on the activation a at layer L; in the backward pass it receives the
    context c (its consumers run in context mode), records it, and hands a * f(c) down."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, tap: LayerTap) -> torch.Tensor:
        ctx.tap = tap
        ctx.save_for_backward(a)
        return a.clone()  # a fresh tensor: in-place ops downstream must not touch a

    @staticmethod
    def backward(ctx, context: torch.Tensor):
        (a,) = ctx.saved_tensors
        tap: LayerTap = ctx.tap
        tap.context = context.detach()
        message = context if tap.transform is None else tap.transform(context)
        # Below the tap LRP rules expect relevance, plain backpropagation a gradient.
        return (message if tap.gradient else a * message), None


@dataclass
class LayerTap:
    """State of one audited layer during one forward/backward pass."""

    name: str
    activation: torch.Tensor | None = None
    context: torch.Tensor | None = None
    node: object = None  # the tap's autograd node in the current graph
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    leaves: list[torch.Tensor] | None = None  # set when the forward below runs without a graph
    gradient: bool = False  # plain backpropagation (no LRP rules): hand the gradient down

    def hook(self, module: nn.Module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise LayerError(f"layer {self.name!r} returns {type(output).__name__}, not a tensor")
        self.activation = output.detach().clone()
        if self.leaves is not None and not output.requires_grad:
            # Layer-only pass: everything below ran without a graph. From here on the
            # forward builds one (and zennit's rule hooks engage), starting at a leaf.
            torch.set_grad_enabled(True)
            output = output.detach().requires_grad_(True)
            self.leaves.append(output)
        tapped = _Tap.apply(output, self)
        self.node = tapped.grad_fn
        return tapped


def _context_reducer(hook: BasicHook) -> Callable:
    """The rule's own reducer, fed the input *slopes* instead of the modified inputs.

    For a rule R_in = sum_i m_i(x) * g_i with positively homogeneous input modifiers m_i
    (identity, clamp(min=0), clamp(max=0): every rule used past the first layer), the
    message per unit of input is c = sum_i (m_i(s) * s) * g_i with s = sign(x) (+1 at 0),
    and R_in = x * c exactly. A rule for which that identity fails is refused.
    """
    reduce = hook.reducer

    def context(inputs, gradients):
        x = hook.stored_tensors["input"][0]
        sign = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
        slopes = [modifier(sign) * sign for modifier in hook.input_modifiers]
        message = reduce(slopes, gradients)
        relevance = reduce(inputs, gradients)
        scale = relevance.abs().max().clamp(min=1e-12)
        if (x * message - relevance).abs().max() > 1e-4 * scale:
            raise LayerError(
                f"the LRP rule {type(hook).__name__} is not homogeneous in its input, so no "
                "context can be defined behind it; audit another layer or use another composite"
            )
        return message

    return context


class _NoNativeBackward(torch.autograd.Function):
    """A ruled layer's output y, detached from the layer's own graph. zennit computes the
    layer's native input gradient and then replaces it with its rule's relevance (a hook
    on the layer input); here autograd hands that hook a free zero tensor instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.input_like = x.shape, x.dtype, x.device
        return y.detach()  # not y itself: that would be a view, barring in-place ops

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.input_like
        return torch.zeros((), dtype=dtype, device=device).expand(shape), None


def _without_native_backward(rule: BasicHook, module: nn.Module, inputs, output):
    """Forward hook: skip the native backward of a layer whose gradient ``rule`` replaces
    (one tensor input, so zennit's rule hook returns the relevance for it)."""
    if (
        rule.active
        and len(inputs) == 1
        and isinstance(output, Tensor)
        and output.requires_grad
        and inputs[0].requires_grad
    ):
        return _NoNativeBackward.apply(inputs[0], output.detach())
    return None


@dataclass
class Explanation:
    """One batch explained from the target logits down to the input."""

    logits: torch.Tensor  # N x classes
    activations: dict[str, torch.Tensor]  # layer -> a, N x d x H x W (or N x d)
    contexts: dict[str, torch.Tensor]  # layer -> c, same shape; R = a * c
    # N x C x H x W (N x F for a table): the LRP heatmap, Gradient x Input under the
    # "gradient" composite (None if not asked)
    input_relevance: torch.Tensor | None


class Explainer:
    """LRP of a model with activations and contexts tapped at named layers.

    Use as a context manager; the caller's model is never modified::

        with Explainer(model, ["layer3"]) as explainer:
            out = explainer.explain(images, targets)
            relevance = out.activations["layer3"] * out.contexts["layer3"]
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        composite: str = "epsilon_plus_flat",
        device: str | torch.device = "cpu",
        **composite_options,
    ):
        self.device = torch.device(device)
        self.model = attribution_copy(model).to(self.device)
        modules = dict(self.model.named_modules())
        missing = [name for name in layers if name not in modules or not name]
        if missing:
            raise LayerError(_unknown_layer_message(missing[0], list(modules)))
        self._composite = make_composite(composite, self.model, **composite_options)
        gradient = self._composite is None
        self.taps = {name: LayerTap(name, gradient=gradient) for name in layers}
        self._tapped_modules = {name: modules[name] for name in layers}
        self._handles: list = []
        self._consumers_found = False
        self._inputs: dict[nn.Module, object] = {}  # module -> autograd node of its input

    def __enter__(self) -> Explainer:
        if self._composite is None:  # gradient: the taps read the plain gradient
            self._consumers_found = True
        else:
            self._composite.register(self.model)
        # Registered after the composite's hooks, so they run after them: the taps see
        # the layer's final output and the recorders see the input zennit prepared.
        for name, module in self._tapped_modules.items():
            self._handles.append(module.register_forward_hook(self.taps[name].hook))
        for module in self.model.modules():
            rule = _rule_of(module)
            if rule is not None:
                self._handles.append(module.register_forward_pre_hook(self._record_input))
            if isinstance(rule, BasicHook) and isinstance(getattr(module, "weight", None), Tensor):
                # First of the forward hooks: zennit's then see the lean output.
                hook = functools.partial(_without_native_backward, rule)
                self._handles.append(module.register_forward_hook(hook, prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._composite is not None:
            self._composite.remove()

    def _record_input(self, module: nn.Module, inputs) -> None:
        if not self._consumers_found and inputs and isinstance(inputs[0], torch.Tensor):
            self._inputs[module] = inputs[0].grad_fn

    def _find_consumers(self) -> None:
        """Switch the rules that read each tapped activation into context mode.

        A consumer is a module with an LRP rule whose input is computed from the tapped
        activation by rule-free operations only (pooling by max, reshapes). The autograd
        graph of the first batch tells which modules those are; the structure is static.
        """
        rules = {m: _rule_of(m) for m in self._inputs}
        stops = {node: m for m, node in self._inputs.items() if not isinstance(rules[m], Pass)}
        activations = {node for m, node in self._inputs.items() if isinstance(m, Activation)}
        taps = {tap.node: tap.name for tap in self.taps.values()}
        found: dict[str, list[nn.Module]] = {name: [] for name in self.taps}
        for module, start in self._inputs.items():
            if start not in stops:
                continue
            reached, other, through_activation = set(), False, False
            todo, seen = [start], {start}
            while todo:
                node = todo.pop()
                for parent, _ in node.next_functions:
                    if parent is None or parent in seen:
                        continue
                    seen.add(parent)
                    if parent in taps:
                        reached.add(taps[parent])
                    elif parent in stops or not parent.next_functions:
                        other = True  # another rule's output, or a leaf such as the input
                    else:
                        through_activation |= parent in activations
                        todo.append(parent)
            if not reached:
                continue
            layer = next(iter(reached))
            if other or len(reached) > 1 or through_activation:
                raise LayerError(
                    f"layer {layer!r} cannot be audited: its output reaches the next LRP rule "
                    + (
                        "through an activation; audit that activation's output instead"
                        if through_activation
                        else "mixed with another branch (e.g. a residual "
                        "sum); audit a block output or a layer before the merge instead"
                    )
                )
            found[layer].append(module)
        for layer, consumers in found.items():
            if not consumers:
                raise LayerError(
                    f"layer {layer!r} feeds no later LRP rule (is it the output layer?); "
                    "audit an inner layer"
                )
            for module in consumers:
                rule = rules[module]
                if not isinstance(rule, BasicHook):
                    raise LayerError(f"layer {layer!r} feeds a module without an LRP rule")
                rule.reducer = _context_reducer(rule)
        self._consumers_found = True
        self._inputs.clear()

    def explain(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        *,
        input_relevance: bool = True,
    ) -> Explanation:
        """Explain the logits ``targets`` (one class index per image) of ``images``.

        ``transforms`` maps a layer to f applied to its context before the relevance
        a * f(c) continues downwards (e.g. a subspace projection for subspace heatmaps).
        With ``input_relevance=False`` only the activations and contexts are wanted: the
        forward below the lowest tapped layer builds no graph and the backward stops there
        (the context at L depends only on the rules above L), so no rule below L runs.
        """
        for name, tap in self.taps.items():
            tap.transform = (transforms or {}).get(name)
        # The first batch always runs the full graph: it tells which rules consume a.
        layer_only = not input_relevance and self._consumers_found
        leaves: list[torch.Tensor] = []
        images = images.to(self.device).detach()  # never the caller's
        if not layer_only:
            images.requires_grad_(True)
            leaves.append(images)
        for tap in self.taps.values():
            tap.leaves = leaves if layer_only else None
        # Layer-only: grad is off until the first tap switches it on (see LayerTap.hook);
        # the context manager restores the caller's mode whatever happened inside.
        try:
            with torch.set_grad_enabled(not layer_only):
                logits = self.model(images)
                if not self._consumers_found:
                    self._find_consumers()
                if not logits.requires_grad:
                    raise LayerError("no tapped layer was reached by the forward pass")
                # The explained quantity is the target logit itself (zennit starts from the
                # gradient it is handed, which here is the initial relevance); plain
                # gradients start from 1, so that a * grad sums to about the logit.
                start = torch.zeros_like(logits)
                rows = torch.arange(len(targets), device=self.device)
                picked = targets.to(self.device)
                initial = (
                    logits.detach() if self._composite is not None else torch.ones_like(logits)
                )
                start[rows, picked] = initial[rows, picked]
                grads = torch.autograd.grad(logits, leaves, start, allow_unused=layer_only)
            heatmap = None
            if input_relevance and not layer_only:
                heatmap = grads[0].detach()
                if self._composite is None:  # the gradient: Gradient x Input is its relevance
                    heatmap = heatmap * images.detach()
            return Explanation(
                logits=logits.detach(),
                activations={name: tap.activation for name, tap in self.taps.items()},
                contexts={name: tap.context for name, tap in self.taps.items()},
                input_relevance=heatmap,
            )
        finally:
            # Also after a failure (a GPU out of memory, retried smaller): the taps and the
            # first pass's graph nodes would hold the failed batch's tensors.
            for tap in self.taps.values():
                tap.activation = tap.context = tap.node = tap.transform = tap.leaves = None
            if not self._consumers_found:
                self._inputs.clear()


def _unknown_layer_message(name: str, valid: list[str]) -> str:
    valid = [v for v in valid if v]
    close = difflib.get_close_matches(name, valid, n=5)
    listed = ", ".join(valid[:40]) + (f" ... ({len(valid)} in all)" if len(valid) > 40 else "")
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown layer {name!r}.{hint} Valid layers: {listed}"
