"""LRP pruning and concept-aware network pruning (CNP), ALGORITHMS.md sections 4-5.

The modules, in the order a pruning run uses them:

- ``criteria``: the registry of pruning criteria, each a callable
  ``(model, images, targets) -> {layer: per-channel scores}`` (like Torch-Pruning's
  importance); LRP and CNP are one LRP criterion without and with a concept projection.
- ``projection``: P = I - U_s U_s^T after the audited layer (inserted for attribution,
  folded into the weights for deployment).
- ``relevance``: the LRP filter and neuron scores (PXP criterion).
- ``layers``: which layers are scored, and which feed the audited layer.
- ``groups``: channels Torch-Pruning's dependency graph couples.
- ``selection``: the global ranking that picks what goes.
- ``surgery``: the masked and the compact (physically smaller) model.
- ``schedule``: one-shot and iterative pruning with fine-tuning.

The package imports nothing heavy itself: the spec reads the criteria registry without
torch.
"""
