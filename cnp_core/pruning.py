"""LRP pruning and concept-aware network pruning (CNP), ALGORITHMS.md sections 4-5.

Filter score (PXP criterion) of output channel c of conv l over reference samples n,
with R the LRP relevance at the conv's output explaining the one-hot true class:

    score(l, c) = sum_n | sum_{h,w} R(n, c, h, w) |

and the same for the neurons j of every hidden fully connected layer l (each nn.Linear
but the model's output layer): score(l, j) = sum_n |R(n, j)| at the Linear's output.

CNP computes the same scores through an attribution copy in which the projection
P = I - U_s U_s^T (the flagged concept subspace removed) sits right after the audited
layer L as a bias-free 1x1 convolution with the Epsilon rule, so the relevance that
reached the model's decision through the spurious subspace is zero, and filters that
served only that subspace score ~0. Vanilla LRP pruning is the same path without P.

Filters are ranked globally over all prunable convolutions (no per-layer normalisation),
and hidden neurons globally over all hidden Linears, apart from the filters: LRP conserves
relevance layer by layer and a neuron's share of it is far smaller than a filter's, so
one joint ranking would remove the neurons first. Channels that Torch-Pruning's
dependency graph couples (e.g. a ResNet's residual stream) form one unit whose score is
the mean of its filters' scores; the lowest units are removed until the requested
fraction of the filters (and, separately, of the hidden neurons) is gone, keeping at
least one channel per group. Two schedules: one-shot (PXP) and iterative (Yeom: prune a
step, fine-tune, recompute the scores, repeat). The pruned model comes out twice, from
one selection: ``masked`` (same architecture, dead channels zeroed) and ``compact``
(channels removed by Torch-Pruning), which compute the same function.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from zennit.composites import LayerMapComposite, MixedComposite
from zennit.core import collect_leaves
from zennit.rules import Epsilon

from .errors import Cancelled, InvalidSpec, LayerError, NoFlaggedSubspace
from .lrp import attribution_copy, make_composite
from .results import PruningSummary
from .spec import PruneSpec

Progress = Callable[[float, str], None]

# Stabiliser of the Epsilon rule on the projection: small, because P x can be ~0 where
# the relevance above is ~0 too.
PROJECTION_EPSILON = 1e-6


# ------------------------------------------------------------------ the projection


@dataclass
class Projection:
    """P = I - sum_{k in flagged} U_k U_k^T, applied to the output of ``layer`` (d x d).

    A union of flagged subspaces (several attribute values) is one projection: pass
    ``ConceptBasis.complement_projector(ks)`` of all of them.
    """

    layer: str
    matrix: np.ndarray

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        if self.matrix.ndim != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
            raise InvalidSpec(f"a projection is a square d x d matrix, got {self.matrix.shape}")

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]


class ConceptProjection(nn.Conv2d):
    """Bias-free 1x1 convolution x -> P x over channels (also accepts N x d inputs).

    A type of its own so that the composite can give it the Epsilon rule: P has negative
    entries, so the z+ rule of the surrounding convolutions would be wrong for it.
    """

    def __init__(self, matrix: np.ndarray):
        d = matrix.shape[0]
        super().__init__(d, d, kernel_size=1, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.as_tensor(matrix, dtype=torch.float32)[:, :, None, None])
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return nn.functional.linear(x, self.weight.flatten(1))
        return super().forward(x)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise LayerError(f"unknown layer {name!r} for the concept projection")
    parent, _, attr = name.rpartition(".")
    return modules[parent], attr


def insert_projection(model: nn.Module, projection: Projection) -> nn.Module:
    """Put P right after ``projection.layer`` (module replaced by Sequential(layer, P)), in place.

    Only for attribution copies: names below the layer change. Refuses a layer followed
    directly by a BatchNorm, which zennit would merge into P instead of the layer.
    """
    parent, attr = _parent(model, projection.layer)
    layer = getattr(parent, attr)
    setattr(parent, attr, nn.Sequential(layer, ConceptProjection(projection.matrix)))
    leaves = list(collect_leaves(model))
    for before, after in zip(leaves, leaves[1:], strict=False):
        if isinstance(before, ConceptProjection) and isinstance(after, _BatchNorm):
            raise LayerError(
                f"layer {projection.layer!r} is followed by a BatchNorm: project after the "
                "BatchNorm or the activation instead"
            )
    return model


def _composite(name: str, model: nn.Module, projected: bool):
    base = make_composite(name, model)
    if not projected:
        return base
    # The projection's own rule is matched first; the base composite covers the rest and
    # brings its canonizers.
    rule = LayerMapComposite([(ConceptProjection, Epsilon(epsilon=PROJECTION_EPSILON))])
    return MixedComposite([rule, base])


# ------------------------------------------------------------------ filter scores


def _dense_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not isinstance(m, ConceptProjection) and m.groups == 1
    }


def prunable_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Convolutions whose output channels (filters) can be ranked: dense Conv2d layers."""
    convs = _dense_convs(model)
    if not convs:
        raise LayerError("the model has no prunable convolution (dense nn.Conv2d)")
    return convs


def _linears_in_run_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the nn.Linear layers in the order they first run in one eval forward pass."""
    names = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            names.setdefault(m, name)
    order: list[str] = []

    def hook(module, inputs, output):
        if names[module] not in order:
            order.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names]
    training = model.training
    param = next(model.parameters(), None)
    try:
        with torch.no_grad():
            model.eval()(example_input[:1].to(param.device if param is not None else "cpu"))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return order


def hidden_linears(model: nn.Module, example_input: torch.Tensor) -> dict[str, nn.Linear]:
    """Fully connected layers whose output neurons can be ranked: every nn.Linear that runs
    in a forward pass except the last one to run, the model's output layer (its neurons
    are the classes). Found with one forward pass of ``example_input[:1]``."""
    modules = dict(model.named_modules())
    return {name: modules[name] for name in _linears_in_run_order(model, example_input)[:-1]}


def upstream_convs(model: nn.Module, layer: str, example_input: torch.Tensor) -> set[str]:
    """The prunable convolutions whose output reaches ``layer``'s output: the ones whose
    filter scores a projection after ``layer`` can change (found by autograd, so branches
    and skips count as the graph says, not as the modules happen to be ordered)."""
    return _reaching(model, layer, example_input, prunable_convs(model))


def _reaching(
    model: nn.Module, layer: str, example_input: torch.Tensor, candidates: dict[str, nn.Module]
) -> set[str]:
    """The ``candidates`` (name -> module) whose output reaches ``layer``'s output."""
    modules = dict(model.named_modules())
    if layer not in modules:
        raise LayerError(f"unknown layer {layer!r} for the pruning scope")
    if not candidates:
        return set()
    outputs: dict[str, torch.Tensor] = {}
    target: list[torch.Tensor] = []

    def keep(name: str):
        def hook(module, inputs, output):
            outputs[name] = output

        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in candidates.items()]
    handles.append(modules[layer].register_forward_hook(lambda m, i, o: target.append(o)))
    training = model.training
    try:
        with torch.enable_grad():
            model.eval()(example_input[:1].detach().clone().requires_grad_(True))
            names = [n for n in candidates if n in outputs]
            grads = torch.autograd.grad(
                target[0].sum(), [outputs[n] for n in names], allow_unused=True
            )
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return {n for n, g in zip(names, grads, strict=True) if g is not None}


class _Relevance(torch.autograd.Function):
    """Identity on a conv output; its backward reads the relevance arriving there.

    In zennit the tensor flowing backward between layers is the relevance itself, so the
    gradient at the conv's output is R(n, c, h, w). A function node (not a tensor hook)
    keeps it right when an in-place ReLU later modifies the output.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sink: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.sink = sink
        return x.clone()

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        ctx.sink(relevance.detach())
        return relevance, None


def _width(module: nn.Module) -> int:
    """Output channels of a conv, output neurons of a Linear."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _batches(n: int, size: int) -> Iterable[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def filter_scores(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    composite: str = "epsilon_plus_flat",
    projection: Projection | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """score(l, c) = sum_n |sum_{h,w} R(n, c, h, w)| for every prunable conv l, and
    score(l, j) = sum_n |R(n, j)| for every hidden Linear l (:func:`hidden_linears`), as
    CPU tensors keyed by layer name.

    R is the LRP relevance (``composite``, canonizers merging BatchNorm into the convs, so
    R is taken after the merged BatchNorm) at each layer's output, starting from the
    one-hot true class ``targets``. With ``projection`` (CNP), P is inserted after its
    layer in the attribution copy; the caller's model is never modified.
    """
    if len(images) != len(targets) or len(images) == 0:
        raise InvalidSpec("filter scores need a non-empty reference set with one target each")
    device = torch.device(device)
    clone = attribution_copy(model).to(device)
    modules = dict(clone.named_modules())
    layers: dict[str, nn.Module] = {**_dense_convs(clone), **hidden_linears(clone, images)}
    if not layers:
        raise LayerError(
            "the model has no prunable convolution (dense nn.Conv2d) or hidden linear layer"
        )
    watched = {name: modules[name] for name in layers}  # by identity: names shift below P
    if projection is not None:
        insert_projection(clone, projection)
        layer = dict(clone.named_modules())[projection.layer][0]
    scores = {name: torch.zeros(_width(m), dtype=torch.float64) for name, m in watched.items()}
    calls = [0]

    def recorder(name: str):
        linear = isinstance(watched[name], nn.Linear)

        def sink(relevance: torch.Tensor) -> None:
            if linear:  # neurons on the last axis (also for N x T x d inputs)
                relevance = relevance.movedim(-1, 1)
            dims = tuple(range(2, relevance.dim()))
            per_image = relevance.sum(dim=dims) if dims else relevance
            scores[name] += per_image.abs().sum(0).double().cpu()

        def hook(module, inputs, output):
            return _Relevance.apply(output, sink)

        return hook

    def count(module, inputs, output):
        calls[0] += 1
        if output.dim() not in (2, 4) or output.shape[1] != projection.dim:
            raise LayerError(
                f"layer {projection.layer!r} outputs {tuple(output.shape[1:])}, which a "
                f"{projection.dim}-dimensional projection cannot follow"
            )

    with _composite(composite, clone, projection is not None).context(clone):
        # Registered after the composite's hooks: the recorders see the rule-wrapped output.
        handles = [m.register_forward_hook(recorder(name)) for name, m in watched.items()]
        if projection is not None:
            handles.append(layer.register_forward_hook(count))
        try:
            for part in _batches(len(images), batch_size):
                x = images[part].to(device).requires_grad_(True)
                calls[0] = 0
                with torch.enable_grad():
                    logits = clone(x)
                    if projection is not None and calls[0] != 1:
                        raise LayerError(
                            f"layer {projection.layer!r} runs {calls[0]} times per forward pass "
                            "(a shared module, e.g. a ResNet's ReLU): project after a block output"
                        )
                    start = nn.functional.one_hot(targets[part].to(device), logits.shape[1])
                    torch.autograd.grad(logits, x, start.to(logits.dtype))
        finally:
            for handle in handles:
                handle.remove()
    return {name: s.float() for name, s in scores.items()}


def reference_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A seeded reference set: ``per_class`` indices of each class (all when fewer), sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.append(rng.choice(members, size=min(per_class, members.size), replace=False))
    return np.sort(np.concatenate(picks))


# ------------------------------------------------------------------ coupled channels


@dataclass
class ChannelGroup:
    """Output channels Torch-Pruning couples: removing root channel i removes, in every
    module of ``outputs``, the channel ``outputs[module][i]`` (convs, Linears, BatchNorms).

    ``kind`` is "filter" for a group rooted at a convolution and "neuron" for one rooted
    at a hidden Linear; the two kinds are ranked separately.
    """

    root: str
    size: int
    outputs: dict[str, list[int]]
    # The scored layers among ``outputs``, one unit each per root channel: convolutions
    # (filters) in a "filter" group, hidden Linears (neurons) in a "neuron" group.
    convs: list[str]
    kind: str = "filter"


class LRPImportance(tp.importance.Importance):
    """Torch-Pruning importance from LRP scores: for every root channel of a group, the
    mean of score(l, c) over the coupled scored layers l (convolutions, or hidden Linears
    for a group rooted at one; no per-layer normalisation)."""

    def __init__(self, scores: dict[str, torch.Tensor], names: dict[nn.Module, str]):
        self.scores = scores
        self.names = names

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        total, count = None, None
        for item in group:
            name = self.names.get(item.dep.target.module)
            if name not in self.scores or not _is_output(item):
                continue
            if total is None:
                n = len(group[0].root_idxs)
                total, count = torch.zeros(n), torch.zeros(n)
            roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
            total.index_add_(0, roots, self.scores[name][item.idxs].float())
            count.index_add_(0, roots, torch.ones(len(roots)))
        return None if total is None else total / count.clamp(min=1)


_OUTPUT_HANDLERS = (
    tp.prune_conv_out_channels,
    tp.prune_linear_out_channels,
    tp.prune_batchnorm_out_channels,
)


def _is_output(item) -> bool:
    """Does this group item remove output channels (of a conv, a Linear or a BatchNorm)?"""
    # Handlers are bound methods, a new object on every access: compare with ==, never `is`.
    return any(item.dep.handler == handler for handler in _OUTPUT_HANDLERS)


def _graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph of a clean model (no hooks, no projection); tracing puts the
    model into eval mode, so callers pass a copy they own."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, verbose=False
        )


def _root_handler(module: nn.Module):
    """Torch-Pruning's handler removing the output channels of a group's root."""
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_conv_out_channels


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Every group of coupled output channels rooted at a prunable convolution ("filter"
    groups) or at a hidden Linear ("neuron" groups). The model's output layer is left
    out, and so is every group that would remove its outputs (the classes)."""
    clean = copy.deepcopy(model).cpu()
    x = example_input[:1].cpu()
    hidden = hidden_linears(clean, x)
    graph = _graph(clean, x)
    names = {m: n for n, m in clean.named_modules()}
    scored = {"filter": set(_dense_convs(clean)), "neuron": set(hidden)}
    output_layers = [
        m for m, name in names.items() if isinstance(m, nn.Linear) and name not in hidden
    ]
    groups = []
    for group in graph.get_all_groups(
        ignored_layers=output_layers, root_module_types=[nn.Conv2d, nn.Linear]
    ):
        root_module = group[0].dep.target.module
        kind = "neuron" if isinstance(root_module, nn.Linear) else "filter"
        outputs: dict[str, list[int]] = {}
        for item in group:
            module = item.dep.target.module
            if _is_output(item) and isinstance(module, nn.Conv2d | nn.Linear | _BatchNorm):
                order = np.argsort(item.root_idxs)
                outputs[names[module]] = [int(item.idxs[i]) for i in order]
        convs = [name for name in outputs if name in scored[kind]]
        if convs:
            root = names[root_module]
            groups.append(ChannelGroup(root, len(outputs[root]), outputs, convs, kind))
    return groups


# ------------------------------------------------------------------ selection


@dataclass
class Selection:
    """Which channels go: per group root (its own indexing) and per module."""

    groups: dict[str, list[int]]  # root conv or Linear -> removed root channels
    removed: dict[str, list[int]]  # conv -> removed filters (output channels)
    zeroed: dict[str, list[int]]  # conv, Linear or BatchNorm -> channels zeroed when masked
    filters_total: int
    neurons: dict[str, list[int]] = field(default_factory=dict)  # hidden Linear -> neurons
    neurons_total: int = 0

    @property
    def filters_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def neurons_removed(self) -> int:
        return sum(len(v) for v in self.neurons.values())


def _totals(groups: list[ChannelGroup]) -> dict[str, int]:
    """Filters and neurons the groups hold: kind -> count."""
    totals = {"filter": 0, "neuron": 0}
    for g in groups:
        totals[g.kind] += g.size * len(g.convs)
    return totals


def _unit_scores(group: ChannelGroup, scores: dict[str, torch.Tensor]) -> np.ndarray:
    """Mean LRP score over the group's coupled filters, per root channel (what
    :class:`LRPImportance` computes from a Torch-Pruning group)."""
    per_conv = [scores[name][group.outputs[name]].double().numpy() for name in group.convs]
    return np.mean(per_conv, axis=0)


def select_filters(
    scores: dict[str, torch.Tensor],
    rate: float,
    groups: list[ChannelGroup] | None = None,
    *,
    already: dict[str, list[int]] | None = None,
    min_keep: int = 1,
) -> Selection:
    """Remove the globally lowest-scoring units until ``rate`` of all filters are gone,
    and, ranked separately, until ``rate`` of all hidden neurons are gone.

    Filters compete only with filters and neurons only with neurons (``ChannelGroup.kind``):
    a neuron's LRP score is far below a filter's, so a joint ranking would remove every
    neuron first. Without ``groups`` every scored channel is a filter of its own. ``already``
    (root -> channels, from an earlier step) stays removed and counts towards the rate.
    Each group keeps at least ``min_keep`` channels (a fully pruned group would be skipped
    by Torch-Pruning).
    """
    if not 0.0 < rate < 1.0:
        raise InvalidSpec(f"pruning rate must lie strictly between 0 and 1, got {rate}")
    if groups is None:
        groups = [
            ChannelGroup(name, len(s), {name: list(range(len(s)))}, [name])
            for name, s in scores.items()
        ]
    missing = {n for g in groups for n in g.convs} - set(scores)
    if missing:
        raise LayerError(f"no filter scores for {sorted(missing)}")
    totals = _totals(groups)
    chosen = {g.root: set((already or {}).get(g.root, [])) for g in groups}
    for kind, total in totals.items():
        _remove_lowest(scores, groups, kind, int(round(rate * total)), chosen, min_keep)
    selection = Selection({}, {}, {}, totals["filter"], neurons_total=totals["neuron"])
    for g in groups:
        picked = sorted(chosen[g.root])
        if not picked:
            continue
        selection.groups[g.root] = picked
        scored = selection.removed if g.kind == "filter" else selection.neurons
        for name, channels in g.outputs.items():
            mapped = sorted(channels[i] for i in picked)
            selection.zeroed[name] = mapped
            if name in g.convs:
                scored[name] = mapped
    return selection


def _remove_lowest(
    scores: dict[str, torch.Tensor],
    groups: list[ChannelGroup],
    kind: str,
    target: int,
    chosen: dict[str, set[int]],
    min_keep: int,
) -> None:
    """Add the lowest-scoring units of the groups of ``kind`` to ``chosen`` until ``target``
    scored channels of that kind are removed, in place."""
    removed = sum(len(chosen[g.root]) * len(g.convs) for g in groups if g.kind == kind)
    units = [
        (float(s), gi, int(i))
        for gi, g in enumerate(groups)
        if g.kind == kind
        for i, s in enumerate(_unit_scores(g, scores))
    ]
    units.sort()  # ties broken by group and channel order: deterministic
    for _, gi, i in units:
        if removed >= target:
            break
        g = groups[gi]
        if i in chosen[g.root] or len(chosen[g.root]) >= g.size - min_keep:
            continue
        chosen[g.root].add(i)
        removed += len(g.convs)


# ------------------------------------------------------------------ masked and compact


def mask_channels(model: nn.Module, zeroed: dict[str, list[int]]) -> nn.Module:
    """Make channels exactly dead, in place: conv filters, Linear weight rows, their biases
    and the BatchNorm scale and shift zeroed, so every consumer sees 0 (as if the channel
    were removed)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, channels in zeroed.items():
            module, idx = modules[name], torch.as_tensor(channels, dtype=torch.long)
            module.weight[idx] = 0
            if module.bias is not None:
                module.bias[idx] = 0
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                module.running_mean[idx] = 0
                module.running_var[idx] = 1
    return model


def compact_model(
    model: nn.Module,
    selection: Selection,
    example_input: torch.Tensor,
    *,
    inference: bool = True,
) -> nn.Module:
    """A physically smaller copy: the selected channels (filters and hidden neurons)
    removed with Torch-Pruning's dependency graph (coupled layers pruned together, e.g. a
    removed neuron's input column of the next Linear). With ``inference`` (what
    :func:`prune` ships) it is also made ready for inference, same function: eval mode,
    BatchNorms folded into their convolutions, channels-last weights
    (:func:`cnp_core.export.for_inference`); without, it keeps the architecture and the
    model's train/eval mode, e.g. to fine-tune it further."""
    from .export import for_inference

    clean = copy.deepcopy(model).cpu()
    training = clean.training
    graph = _graph(clean, example_input.cpu())
    modules = dict(clean.named_modules())
    for root, channels in selection.groups.items():
        module = modules[root]
        group = graph.get_pruning_group(module, _root_handler(module), channels)
        if not graph.check_pruning_group(group):
            raise LayerError(f"pruning {len(channels)} channels of {root!r} would empty a layer")
        group.prune()
    return for_inference(clean) if inference else clean.train(training)


def fold_projection(model: nn.Module, projection: Projection) -> nn.Module:
    """A copy in which P is folded exactly into the layers that read ``projection.layer``:
    W' = W P over input channels, for every consumer (convolutions, or linear layers
    behind average pooling and flattening). Raises LayerError where that is not exact."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname == projection.layer or super().is_leaf_module(m, qualname)

    folded = copy.deepcopy(model)
    _parent(folded, projection.layer)
    try:
        graph = _Tracer().trace(folded)
    except Exception as err:  # noqa: BLE001 - fx refuses dynamic control flow
        raise LayerError(f"cannot trace the model to fold the projection: {err}") from None
    modules = dict(folded.named_modules())
    start = next(n for n in graph.nodes if n.op == "call_module" and n.target == projection.layer)
    passthrough = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)
    consumers, todo = {}, list(start.users)
    while todo:
        node = todo.pop()
        module = modules.get(node.target) if node.op == "call_module" else None
        if (isinstance(module, nn.Conv2d) and module.groups == 1) or (
            isinstance(module, nn.Linear) and module.in_features == projection.dim
        ):
            consumers[id(module)] = module
        elif isinstance(module, passthrough) or node.target is torch.flatten:
            todo.extend(node.users)
        else:
            raise LayerError(
                f"the projection after {projection.layer!r} cannot be folded exactly: "
                f"its output reaches {node.op} {node.target}"
            )
    p = torch.as_tensor(projection.matrix, dtype=torch.float32)
    with torch.no_grad():
        for module in consumers.values():
            w = module.weight
            module.weight.copy_(torch.einsum("oi...,ij->oj...", w, p.to(w.device, w.dtype)))
    return folded


# ------------------------------------------------------------------ fine-tuning


def finetune(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int,
    learning_rate: float,
    zeroed: dict[str, list[int]] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    cancelled: Callable[[], bool] | None = None,
) -> list[float]:
    """Adam on cross-entropy over ``loader`` batches (images, labels, ...), in place; pruned
    channels are re-zeroed after every step so they stay dead. Returns the mean loss per epoch."""
    torch.manual_seed(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=learning_rate)
    losses = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            if cancelled is not None and cancelled():
                raise Cancelled("the job was cancelled")
            x, y = batch[0].to(device), batch[1].to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimiser.step()
            if zeroed:
                mask_channels(model, zeroed)
            total, count = total + float(loss.detach()) * len(y), count + len(y)
        losses.append(total / max(count, 1))
    return losses


# ------------------------------------------------------------------ the schedule


@dataclass
class PruneStep:
    step: int
    rate: float  # cumulative fraction of filters (and of hidden neurons) removed
    filters_removed: int
    finetune_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    neurons_removed: int = 0


@dataclass
class PruneOutcome:
    """Both forms of the pruned model (same function) and how they came about."""

    masked: nn.Module
    compact: nn.Module
    summary: PruningSummary
    history: list[PruneStep]
    selection: Selection
    projection: Projection | None = None  # the last projection used (CNP)


def prune(
    model: nn.Module,
    spec: PruneSpec,
    reference: tuple[torch.Tensor, torch.Tensor],
    *,
    train_loader: Iterable | None = None,
    projection: Projection | None = None,
    relearn: Callable[[nn.Module], Projection] | None = None,
    keep_projection: bool = False,
    layer: str = "",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> PruneOutcome:
    """Vanilla LRP pruning (``spec.method == "lrp"``) or CNP (``"cnp"``: ``projection`` used
    for the scores), one-shot or iterative, on a copy of ``model``.

    ``reference`` = (images, true labels) for the scores (see :func:`reference_indices`).
    Step t of ``spec.steps`` removes filters, and hidden neurons of fully connected layers
    (ranked apart), up to the cumulative rate ``spec.rate * t / steps``, then fine-tunes
    ``spec.finetune_epochs`` over ``train_loader``; with ``spec.relearn_subspaces`` the
    caller's ``relearn(model)`` returns the next projection.
    ``keep_projection`` folds P into the model itself (exact, see :func:`fold_projection`).
    ``spec.scope == "upstream"`` ranks only the convolutions and hidden Linears that feed
    the audited layer (the projection's, else ``layer``), for both methods alike; the rate
    is then a fraction of those filters (and neurons). ``spec.composite`` names the LRP
    rules of the scores.
    """
    spec.validate([spec.attribute] if spec.attribute else [])
    if spec.method == "cnp" and projection is None:
        raise NoFlaggedSubspace(
            "CNP needs a flagged concept subspace to project out, and none was flagged: "
            "lower flag_threshold, try more subspaces, or use the supervised 'cav' method"
        )
    if spec.finetune_epochs > 0 and train_loader is None:
        raise InvalidSpec("fine-tuning needs training data (train_loader)")
    if spec.method == "cnp" and spec.relearn_subspaces and relearn is None:
        raise InvalidSpec("relearn_subspaces needs a relearn(model) callback")
    scope_layer = projection.layer if projection is not None else layer
    if spec.scope == "upstream" and not scope_layer:
        raise InvalidSpec("prune.scope 'upstream' needs the audited layer")
    if spec.method == "lrp":
        projection = None
    images, targets = reference
    example = images[:1].cpu()
    report = progress or (lambda fraction, message: None)

    work = copy.deepcopy(model).cpu()
    if keep_projection and projection is not None:
        work = fold_projection(work, projection)
    groups = channel_groups(work, example)
    if spec.scope == "upstream":
        scored = {**_dense_convs(work), **hidden_linears(work, example)}
        feeding = _reaching(work, scope_layer, example, scored)
        groups = [g for g in groups if set(g.convs) <= feeding]
    totals = _totals(groups)
    selection = Selection({}, {}, {}, totals["filter"], neurons_total=totals["neuron"])
    history = []
    for step in range(1, spec.steps + 1):
        if cancelled is not None and cancelled():
            raise Cancelled("the job was cancelled")
        began = time.perf_counter()
        report((step - 1) / spec.steps, f"step {step}/{spec.steps}: filter relevance")
        scores = filter_scores(
            work.eval(),
            images,
            targets,
            composite=spec.composite,
            projection=projection,
            batch_size=batch_size,
            device=device,
        )
        rate = spec.rate * step / spec.steps
        selection = select_filters(scores, rate, groups, already=selection.groups)
        mask_channels(work, selection.zeroed)
        record = PruneStep(
            step, rate, selection.filters_removed, neurons_removed=selection.neurons_removed
        )
        if spec.finetune_epochs > 0:
            report((step - 0.5) / spec.steps, f"step {step}/{spec.steps}: fine-tuning")
            record.finetune_loss = finetune(
                work,
                train_loader,
                epochs=spec.finetune_epochs,
                learning_rate=spec.learning_rate,
                zeroed=selection.zeroed,
                device=device,
                seed=seed + step,
                cancelled=cancelled,
            )
            work = work.cpu().eval()
            if projection is not None and spec.relearn_subspaces:
                projection = relearn(work)
                if keep_projection:
                    work = mask_channels(fold_projection(work, projection), selection.zeroed)
        record.seconds = round(time.perf_counter() - began, 3)
        history.append(record)
    work = work.cpu().eval()
    compact = compact_model(work, selection, example).eval()
    report(1.0, "pruned")
    summary = PruningSummary(
        method=spec.method,
        rate=spec.rate,
        filters_total=selection.filters_total,
        filters_removed=selection.filters_removed,
        removed=selection.removed,
        neurons_total=selection.neurons_total,
        neurons_removed=selection.neurons_removed,
    )
    return PruneOutcome(work, compact, summary, history, selection, projection)


# ------------------------------------------------------------------ from an audit


def union_projection(layer: str, subspaces: list[np.ndarray]) -> Projection:
    """P = I - Q Q^T with Q an orthonormal basis of span(U_1, ..., U_m): removes the union
    of several flagged subspaces (e.g. one per value of a multi-valued attribute), also
    when they come from different fits and are not orthogonal to each other."""
    stacked = np.concatenate(
        [np.asarray(u, dtype=np.float64).reshape(u.shape[0], -1) for u in subspaces], 1
    )
    left, singular, _ = np.linalg.svd(stacked, full_matrices=False)
    q = left[:, singular > 1e-8 * singular.max()]
    return Projection(layer, np.eye(stacked.shape[0]) - q @ q.T)


def _flagged_projection(spec, attribute: str, audits, bases, keys) -> Projection | None:
    """The union of the subspaces flagged for any value of ``attribute`` at its first
    flagged layer, or None when the audit flagged none."""
    from .pipeline import basis_of

    flagged = [a for a in audits if a.attribute == attribute and a.flagged_subspace >= 0]
    if not flagged:
        return None
    layer = flagged[0].layer
    chosen = [a for a in flagged if a.layer == layer]
    return union_projection(
        layer, [basis_of(a, bases, keys).subspace(a.flagged_subspace) for a in chosen]
    )


class _Labelled(torch.utils.data.Dataset):
    """(image, label) pairs of table rows, for fine-tuning."""

    def __init__(self, table, indices, ref):
        from .data import ImageDataset

        self.images = ImageDataset(table, indices, ref)
        self.labels = table.labels[np.asarray(indices)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, n: int):
        return self.images[n][0], int(self.labels[n])


def prune_from_audit(spec, model, table, splits, audits, bases, keys, result, workdir, run) -> None:
    """The pipeline's prune stage: CNP (the flagged subspaces of ``spec.prune.attribute``,
    default the first audited attribute, projected out) or vanilla LRP pruning; fills
    ``result.after``, ``result.pruning`` and the artifacts (masked state_dict, compact
    model in safetensors + architecture.json, torch.export and ONNX)."""
    from pathlib import Path

    from .data import ImageDataset, make_loader
    from .evaluation import evaluate_table
    from .export import save_compact
    from .models import save_weights

    p = spec.prune
    attribute = p.attribute or spec.attributes[0]
    projection = _flagged_projection(spec, attribute, audits, bases, keys)
    if p.method == "cnp" and projection is None:
        raise NoFlaggedSubspace(
            f"CNP was asked to remove {attribute!r}, but the audit flagged no subspace for it "
            f"(threshold {spec.flag_threshold}): lower flag_threshold, audit with more "
            "subspaces (n_subspaces), or use the supervised method 'cav'"
        )
    fit = np.asarray(splits.fit)
    ref_rows = fit[reference_indices(table.labels[fit], p.reference_per_class, spec.seed)]
    ref_data = ImageDataset(table, ref_rows, spec.dataset)
    images = torch.stack([ref_data[i][0] for i in range(len(ref_data))])
    reference = (images, torch.as_tensor(table.labels[ref_rows]))
    train_loader = make_loader(
        _Labelled(table, fit, spec.dataset), spec.batch_size, shuffle=True, seed=spec.seed
    )
    relearn = None
    if p.method == "cnp" and p.relearn_subspaces:
        relearn = _relearner(spec, table, splits, attribute, projection, run)
    outcome = prune(
        model,
        p,
        reference,
        train_loader=train_loader,
        projection=projection,
        relearn=relearn,
        layer=projection.layer if projection is not None else spec.layers[0],
        batch_size=spec.batch_size,
        device=spec.device,
        seed=spec.seed,
        progress=lambda fraction, message: run.within(0.8 * fraction, message),
        cancelled=run.cancelled,
    )
    run.within(0.85, "evaluating the pruned model")
    result.after = evaluate_table(outcome.compact, table, splits.test, spec, device=spec.device)
    result.pruning = outcome.summary
    out = Path(workdir) / "pruned"
    save_weights(outcome.masked, out / "masked.safetensors")
    paths = save_compact(
        outcome.compact,
        out / "compact",
        images[:1],
        architecture=spec.model.architecture,
        num_classes=spec.model.num_classes,
        method=p.method,
        rate=p.rate,
    )
    # Artifact names say what and which format: the client picks a model by them.
    result.artifacts["model_masked.safetensors"] = str(out / "masked.safetensors")
    for name, path in paths.items():
        suffix = "architecture.json" if name == "architecture" else name
        result.artifacts[f"model_compact.{suffix}"] = str(path)


def _relearner(spec, table, splits, attribute, previous, run):
    """relearn(model) -> Projection: the audit's collect, fit, score and flag steps at the
    projection's layer, repeated on the fine-tuned model (concepts drift). Keeps the last
    projection when the new fit flags nothing."""
    from .collect import collect_instances, collect_relevance
    from .data import ImageDataset, make_loader
    from .lrp import Explainer
    from .pipeline import _audit, _choose, _class_pair, _fit_bases

    state = {"projection": previous}
    layer = previous.layer
    local = copy.copy(spec)
    local.layers = [layer]
    local.attributes = [attribute]
    pair = _class_pair(spec, table.labels)
    positive = table.labels == spec.positive_class

    def loader(indices):
        return make_loader(ImageDataset(table, indices, spec.dataset), spec.batch_size)

    def relearn(current: nn.Module) -> Projection:
        mask = positive if spec.method != "cav" else pair
        fit_ids = _choose(splits.fit[mask[splits.fit]], spec.fit_images, spec.seed)
        with Explainer(current, [layer], spec.composite, device=spec.device) as explainer:
            instances = collect_instances(
                explainer,
                loader(fit_ids),
                spec.positive_class,
                per_image=spec.positions_per_image,
                seed=spec.seed,
                cancelled=run.cancelled,
            )
            bases, keys = _fit_bases(local, table, instances, positive, run)
            audited = np.concatenate([splits.val, splits.test])
            scored = collect_relevance(
                explainer,
                loader(audited[pair[audited]]),
                spec.positive_class,
                {layer: [b.basis for b in bases[layer]]},
                cancelled=run.cancelled,
            )
        audits = _audit(local, table, splits, scored, bases, keys)
        found = _flagged_projection(local, attribute, audits, bases, keys)
        if found is not None:
            state["projection"] = found
        return state["projection"]

    return relearn
