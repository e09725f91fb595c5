"""What a job asks for: the one spec type, shared by the library, the server and the CLI.

The proto ``cnp.v1.AuditSpec`` mirrors these dataclasses field for field; the
converter (:mod:`cnp_core.convert`) is the only place that translates between the two.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidSpec
from .methods import CONCEPT_METHODS as _CONCEPT_REGISTRY
from .pruning.criteria import CRITERIA as _CRITERIA_REGISTRY

# Choices, read from the registries (a registered method is a valid choice everywhere).
CONCEPT_METHODS = tuple(_CONCEPT_REGISTRY)
SCORES = ("share", "raw")
PRUNE_METHODS = tuple(_CRITERIA_REGISTRY)
SCHEDULES = ("oneshot", "iterative")
PRUNE_SCOPES = ("all", "upstream")
# A model factory: "package.module:function" (the function may be an attribute path).
FACTORY_PATTERN = re.compile(r"^(?P<module>\w+(?:\.\w+)*):(?P<attr>\w+(?:\.\w+)*)$")

# Every size a request sets is bounded: memory and time per job stay predictable, and a
# typo (1e9 resamples) fails at once with the range instead of running for days.
MAX_LIST, MAX_NAME, MAX_SUBSPACES = 16, 256, 512
AUDIT_BOUNDS = {
    "positions_per_image": (1, 1024),
    "fit_images": (1, 100_000),
    "drsa_restarts": (1, 16),
    "drsa_max_epochs": (1, 20_000),
    "bootstrap": (0, 10_000),
    "min_group_size": (1, 1_000_000),
    "heatmap_samples": (0, 64),
    "batch_size": (1, 1024),
}
PRUNE_BOUNDS = {
    "steps": (1, 100),
    "finetune_epochs": (0, 1000),
    "reference_per_class": (1, 10_000),
}


def _check_bounds(owner: Any, bounds: dict[str, tuple[int, int]], prefix: str = "") -> None:
    for name, (low, high) in bounds.items():
        value = getattr(owner, name)
        if not low <= value <= high:
            raise InvalidSpec(f"{prefix}{name} must lie in [{low}, {high}], got {value}")


@dataclass
class ModelRef:
    """A model: a torchvision architecture or an importable factory, plus a weights file."""

    architecture: str = ""  # torchvision name from the allow-list, e.g. "resnet18"
    factory: str = ""  # "package.module:function", called with num_classes=...
    weights: str = ""  # .safetensors or a state_dict .pt/.pth (loaded weights_only)
    num_classes: int = 2


@dataclass
class DatasetRef:
    """A directory with images and a labels.csv (path, label, split, attribute columns...)."""

    root: str = ""
    input_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_pixels: int = 4096 * 4096  # decompression-bomb cap per image


@dataclass
class PruneSpec:
    """Optional pruning stage: CNP (concept projected out) or vanilla LRP pruning."""

    method: str = "cnp"  # "cnp" | "lrp"
    # Fraction of the prunable filters removed, in (0, 1). 0.1: over five benchmark models
    # CNP's lead over vanilla LRP pruning was largest at 0.05 and 0.1 (+24 and +23 points
    # on the worst group) with balanced accuracy above the unpruned model's, and fell from
    # 0.2 on as one model broke (README, "CNP vs vanilla LRP pruning").
    rate: float = 0.1
    schedule: str = "oneshot"  # "oneshot" (PXP) | "iterative" (Yeom: prune, fine-tune, repeat)
    steps: int = 1  # pruning steps of the iterative schedule
    finetune_epochs: int = 0  # per step; 0 = no fine-tuning
    learning_rate: float = 1e-3
    reference_per_class: int = 32  # reference images per class for the filter scores
    relearn_subspaces: bool = False  # re-fit the concept basis after each fine-tuning round
    attribute: str = ""  # which audited attribute to remove; default: the first
    # "upstream": only the convolutions that feed the audited layer, or "all". The
    # projection changes no score outside the upstream ones, so there both methods would
    # prune alike (README, "CNP vs vanilla LRP pruning").
    scope: str = "upstream"
    composite: str = "epsilon_plus_flat"  # LRP rules of the filter scores
    # CNP: fold P = I - U_s U_s^T into the layers that read the audited layer (exact), so
    # the returned model itself no longer carries the removed subspace: on five 64 px
    # benchmark models the projection alone lifted the worst group from 0.49 to 0.73 on
    # average (README, "CNP vs vanilla LRP pruning"). Exact only where convolutions or linear layers read
    # the layer; elsewhere (a max pool) the job fails before the audit and says so.
    keep_projection: bool = True

    def validate(self, attributes: list[str]) -> None:
        if self.method not in PRUNE_METHODS:
            raise InvalidSpec(
                f"prune.method must be one of {', '.join(PRUNE_METHODS)}, got {self.method!r}"
            )
        if not 0.0 < self.rate < 1.0:
            raise InvalidSpec(f"prune.rate must lie strictly between 0 and 1, got {self.rate}")
        if self.schedule not in SCHEDULES:
            raise InvalidSpec(
                f"prune.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.scope not in PRUNE_SCOPES:
            raise InvalidSpec(
                f"prune.scope must be one of {', '.join(PRUNE_SCOPES)}, got {self.scope!r}"
            )
        _check_bounds(self, PRUNE_BOUNDS, "prune.")
        if self.schedule == "oneshot" and self.steps != 1:
            raise InvalidSpec("prune.steps > 1 needs schedule 'iterative'")
        if self.learning_rate <= 0:
            raise InvalidSpec("prune.learning_rate must be positive")
        if self.attribute and self.attribute not in attributes:
            raise InvalidSpec(
                f"prune.attribute {self.attribute!r} is not among the audited attributes"
            )


@dataclass
class AuditSpec:
    """One audit (and optionally one pruning run) of one model on one dataset."""

    model: ModelRef = field(default_factory=ModelRef)
    dataset: DatasetRef = field(default_factory=DatasetRef)
    layers: list[str] = field(default_factory=list)  # empty: the architecture's default layer
    attributes: list[str] = field(default_factory=list)
    positive_class: int = 1  # the class suspected of relying on the attribute
    negative_class: int = -1  # -1: every other class
    method: str = "drsa"
    # The defaults below won the sweep over model populations (README, "Verdict reliability").
    n_subspaces: list[int] = field(default_factory=lambda: [4, 8])  # several K: chosen on val
    score: str = "share"  # "share" (R_k / sum_j |R_j|) or "raw" (R_k)
    # LRP rules of the contexts the concepts are fitted on; "": the concept method's own
    # (DRSA: plain gradient, CAV: EpsilonPlusFlat), recorded in the report's spec
    composite: str = ""
    positions_per_image: int = 20
    fit_images: int = 512  # at most this many positive-class train images fit the basis
    drsa_restarts: int = 1
    # A cap (the fit stops earlier once J stops improving). 150: over the 64 px badge
    # population it flagged the same models as 400 epochs, at higher AP (0.97-1.00 vs
    # 0.95-1.00), in half the audit time (README, "Verdict reliability").
    drsa_max_epochs: int = 150
    flag_threshold: float = 0.8  # AP_attribute a subspace must reach to be flagged
    bootstrap: int = 200  # resamples for confidence intervals; 0 disables them
    min_group_size: int = 10
    heatmap_samples: int = 4
    batch_size: int = 32
    device: str = "cpu"
    seed: int = 1
    prune: PruneSpec | None = None

    def validate(self) -> AuditSpec:
        """Check every field that can be checked without touching files; return self."""
        if not self.model.architecture and not self.model.factory:
            raise InvalidSpec("model: give an architecture name or a factory 'module:function'")
        if self.model.architecture and self.model.factory:
            raise InvalidSpec("model: give an architecture or a factory, not both")
        _check_bounds(self.model, {"num_classes": (2, 100_000)}, "model.")
        if not self.dataset.root:
            raise InvalidSpec("dataset.root is required")
        if not 8 <= self.dataset.input_size <= 1024:
            raise InvalidSpec(
                f"dataset.input_size must lie in [8, 1024], got {self.dataset.input_size}"
            )
        for name in ("mean", "std"):
            values = getattr(self.dataset, name)
            if len(values) != 3:
                raise InvalidSpec(f"dataset.{name} needs 3 values (R,G,B), got {len(values)}")
        if any(s <= 0 for s in self.dataset.std):
            raise InvalidSpec("dataset.std values must be positive")
        if not self.attributes:
            raise InvalidSpec("attributes: name at least one attribute column to audit")
        if self.method not in CONCEPT_METHODS:
            raise InvalidSpec(
                f"method must be one of {', '.join(CONCEPT_METHODS)}, got {self.method!r}"
            )
        if self.score not in SCORES:
            raise InvalidSpec(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if not 1 <= len(self.n_subspaces) <= MAX_LIST or not all(
            1 <= k <= MAX_SUBSPACES for k in self.n_subspaces
        ):
            raise InvalidSpec(
                f"n_subspaces: give 1 to {MAX_LIST} numbers of subspaces, each in "
                f"[1, {MAX_SUBSPACES}], got {self.n_subspaces}"
            )
        for name in ("layers", "attributes"):
            names = getattr(self, name)
            if len(names) > MAX_LIST or any(len(n) > MAX_NAME for n in names):
                raise InvalidSpec(
                    f"{name}: at most {MAX_LIST} names of at most {MAX_NAME} characters each"
                )
        if not 0 <= self.positive_class < self.model.num_classes:
            raise InvalidSpec(
                f"positive_class {self.positive_class} is not a class of a "
                f"{self.model.num_classes}-class model"
            )
        if self.negative_class != -1 and not 0 <= self.negative_class < self.model.num_classes:
            raise InvalidSpec(f"negative_class {self.negative_class} is not a class of the model")
        if self.negative_class == self.positive_class:
            raise InvalidSpec("negative_class must differ from positive_class")
        if not 0.0 < self.flag_threshold <= 1.0:
            raise InvalidSpec("flag_threshold must lie in (0, 1]")
        _check_bounds(self, AUDIT_BOUNDS)
        _check_bounds(self.dataset, {"max_pixels": (1, 1 << 30)}, "dataset.")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise InvalidSpec(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.prune is not None:
            self.prune.validate(self.attributes)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditSpec:
        data = dict(data)
        model = ModelRef(**data.pop("model", {}))
        dataset = data.pop("dataset", {})
        for key in ("mean", "std"):
            if key in dataset:
                dataset[key] = tuple(dataset[key])
        prune = data.pop("prune", None)
        try:
            return cls(
                model=model,
                dataset=DatasetRef(**dataset),
                prune=PruneSpec(**prune) if prune else None,
                **data,
            )
        except TypeError as err:  # unknown field names
            raise InvalidSpec(f"spec: {err}") from None
