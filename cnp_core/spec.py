"""What a job asks for: the one spec type, shared by the library, the server and the CLI.

The proto ``cnp.v1.AuditSpec`` mirrors these dataclasses field for field; the
converter (:mod:`cnp_core.convert`) is the only place that translates between the two.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .devices import AUTO, parse_device
from .errors import CnpError, InvalidSpec
from .methods import CONCEPT_METHODS as _CONCEPT_REGISTRY
from .paths import listing
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
MAX_CLASSES = 100_000  # outputs of a model, and so class names
# cnp's own architecture: a multi-layer perceptron over a table's features, shaped by
# ModelRef.layer_sizes = [in_features, hidden_1, ..., hidden_n].
MLP_ARCHITECTURE = "mlp"
MAX_UNITS = 100_000  # features, or hidden neurons of one layer
DATASET_FORMATS = ("images", "table")
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
            raise InvalidSpec(
                f"{prefix}{name} must lie in [{low}, {high}], got {value}", field=prefix + name
            )


# Control characters (tab and line breaks included): a class name is one printable line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INDEX = re.compile(r"\d+")


def check_class_names(
    names: Sequence[str],
    source: str,
    position: Callable[[int], str],
    error: type[CnpError] = InvalidSpec,
    field: str = "",
) -> None:
    """Class names in the model's output order, as ``source`` (``model.classes``,
    ``classes.txt``) gives them; ``position(i)`` names the i-th in messages.

    Each is printable text without surrounding spaces, unique, at most MAX_NAME long; a
    name that reads as a class index (``"3"``) must stand at that index, so a label means
    the same class whether it is read as a name or as an index.
    """
    if len(names) > MAX_CLASSES:
        raise error(
            f"{source} names {len(names)} classes, over the limit of {MAX_CLASSES}",
            field=field or source,
        )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        where = position(i)
        problem = ""
        if not isinstance(name, str):
            problem = f"{name!r} is not text"
        elif not name.strip():
            problem = "is empty"
        elif _CONTROL.search(name):
            problem = f"{name!r} holds a control character"
        elif name != name.strip():
            problem = f"{name!r} has leading or trailing spaces"
        elif len(name) > MAX_NAME:
            problem = f"is longer than {MAX_NAME} characters"
        elif name in seen:
            problem = f"{name!r} repeats {position(seen[name])}"
        elif _INDEX.fullmatch(name) and int(name) != i:
            problem = f"{name!r} reads as class index {int(name)} but names class {i}"
        if problem:
            raise error(f"{where}: class name {problem}", field=field or where)
        seen[name] = i


@dataclass
class ModelRef:
    """A model: a torchvision architecture, cnp's "mlp", or an importable factory, plus a
    weights file."""

    architecture: str = ""  # name from the allow-list, e.g. "resnet18", or "mlp"
    factory: str = ""  # "package.module:function", called with num_classes=...
    weights: str = ""  # .safetensors or a state_dict .pt/.pth (loaded weights_only)
    num_classes: int = 2
    # Class names in output order (len == num_classes: both are given, never one derived
    # from the other). labels.csv may then label images by name; without them a
    # classes.txt beside labels.csv may name the classes.
    classes: list[str] = field(default_factory=list)
    # architecture "mlp" only (and required there): [in_features, hidden_1, ..., hidden_n],
    # n >= 1; in_features is the number of features of the table dataset.
    layer_sizes: list[int] = field(default_factory=list)


@dataclass
class DatasetRef:
    """A directory with a labels.csv: images (path, label, split, attribute columns...) or,
    with format "table", one row of numeric features per sample (cnp_core.tables)."""

    root: str = ""
    # The image fields below are ignored for a table (features are used as written).
    input_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_pixels: int = 4096 * 4096  # decompression-bomb cap per image
    # "images", or "table": labels.csv holds label, split, attribute and feature columns,
    # and features.txt beside it names the feature columns in the model's input order.
    format: str = "images"

    @property
    def is_table(self) -> bool:
        return self.format == "table"


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
                f"prune.method must be one of {', '.join(PRUNE_METHODS)}, got {self.method!r}",
                field="prune.method",
            )
        if not 0.0 < self.rate < 1.0:
            raise InvalidSpec(
                f"prune.rate must lie strictly between 0 and 1, got {self.rate}",
                field="prune.rate",
            )
        if self.schedule not in SCHEDULES:
            raise InvalidSpec(
                f"prune.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
                field="prune.schedule",
            )
        if self.scope not in PRUNE_SCOPES:
            raise InvalidSpec(
                f"prune.scope must be one of {', '.join(PRUNE_SCOPES)}, got {self.scope!r}",
                field="prune.scope",
            )
        _check_bounds(self, PRUNE_BOUNDS, "prune.")
        if self.schedule == "oneshot" and self.steps != 1:
            raise InvalidSpec("prune.steps > 1 needs schedule 'iterative'", field="prune.steps")
        if self.learning_rate <= 0:
            raise InvalidSpec("prune.learning_rate must be positive", field="prune.learning_rate")
        if self.attribute and self.attribute not in attributes:
            raise InvalidSpec(
                f"prune.attribute {self.attribute!r} is not among the audited attributes",
                field="prune.attribute",
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
    # The classes by name, resolved against the model's class names (model.classes or
    # classes.txt) when the dataset is loaded; the index field then holds the resolved
    # index. An index field left at its default yields to the name; a non-default index
    # must agree with the name.
    positive_class_name: str = ""
    negative_class_name: str = ""
    method: str = "drsa"
    # The defaults below won the sweep over model populations (README, "Verdict reliability").
    n_subspaces: list[int] = field(default_factory=lambda: [4, 8])  # several K: chosen on val
    score: str = "share"  # "share" (R_k / sum_j |R_j|) or "raw" (R_k)
    # LRP rules of the contexts the concepts are fitted on; "": the concept method's own
    # (DRSA: plain gradient, CAV: EpsilonPlusFlat), recorded in the report's spec
    composite: str = ""
    positions_per_image: int = 20  # a table has one position per sample: ignored there
    fit_images: int = 512  # at most this many positive-class train images fit the basis
    drsa_restarts: int = 1
    # A cap (the fit stops earlier once J stops improving). 150: over the 64 px badge
    # population it flagged the same models as 400 epochs, at higher AP (0.97-1.00 vs
    # 0.95-1.00), in half the audit time (README, "Verdict reliability").
    drsa_max_epochs: int = 150
    # AP_attribute a subspace must reach to be flagged where the attribute's base rate is
    # 0.5; at other base rates the same lift over chance (cnp_core.audit.flag_level: 0.70
    # at base 0.25, 0.94 at base 0.86).
    flag_threshold: float = 0.8
    bootstrap: int = 200  # resamples for confidence intervals; 0 disables them
    min_group_size: int = 10
    heatmap_samples: int = 4  # image heatmaps; ignored for a table
    batch_size: int = 32  # at most: a GPU pass that runs out of memory halves it once
    # "auto": the server's choice, the job's GPU when its worker has one, else the CPU;
    # "cpu" or "cuda[:N]" is honoured, or refused when the server has no such device.
    device: str = AUTO
    seed: int = 1
    prune: PruneSpec | None = None

    def validate(self) -> AuditSpec:
        """Check every field that can be checked without touching files; return self.

        Class names are checked against model.classes when it is given; against a
        classes.txt only when the dataset is loaded (:meth:`resolve_classes`).
        """
        if not self.model.architecture and not self.model.factory:
            raise InvalidSpec(
                "model: give an architecture name or a factory 'module:function'",
                field="model.architecture",
            )
        if self.model.architecture and self.model.factory:
            raise InvalidSpec(
                "model: give an architecture or a factory, not both", field="model.factory"
            )
        _check_bounds(self.model, {"num_classes": (2, MAX_CLASSES)}, "model.")
        if not self.dataset.root:
            raise InvalidSpec("dataset.root is required", field="dataset.root")
        self._validate_format()
        if not self.dataset.is_table:  # a table ignores the image fields
            self._validate_image_fields()
        if not self.attributes:
            raise InvalidSpec(
                "attributes: name at least one attribute column to audit", field="attributes"
            )
        if self.method not in CONCEPT_METHODS:
            raise InvalidSpec(
                f"method must be one of {', '.join(CONCEPT_METHODS)}, got {self.method!r}",
                field="method",
            )
        if self.score not in SCORES:
            raise InvalidSpec(
                f"score must be one of {', '.join(SCORES)}, got {self.score!r}", field="score"
            )
        if not 1 <= len(self.n_subspaces) <= MAX_LIST or not all(
            1 <= k <= MAX_SUBSPACES for k in self.n_subspaces
        ):
            raise InvalidSpec(
                f"n_subspaces: give 1 to {MAX_LIST} numbers of subspaces, each in "
                f"[1, {MAX_SUBSPACES}], got {self.n_subspaces}",
                field="n_subspaces",
            )
        for name in ("layers", "attributes"):
            names = getattr(self, name)
            too_long = [i for i, n in enumerate(names) if len(n) > MAX_NAME]
            if len(names) > MAX_LIST or too_long:
                raise InvalidSpec(
                    f"{name}: at most {MAX_LIST} names of at most {MAX_NAME} characters each",
                    field=f"{name}[{too_long[0]}]" if too_long else name,
                )
        self._validate_classes()
        if not 0.0 < self.flag_threshold <= 1.0:
            raise InvalidSpec("flag_threshold must lie in (0, 1]", field="flag_threshold")
        _check_bounds(self, AUDIT_BOUNDS)
        _check_bounds(self.dataset, {"max_pixels": (1, 1 << 30)}, "dataset.")
        try:
            parse_device(self.device)
        except ValueError as err:
            raise InvalidSpec(str(err), field="device") from None
        if self.prune is not None:
            self.prune.validate(self.attributes)
        return self

    def _validate_format(self) -> None:
        """The dataset format, and the model kind that reads it: an MLP (layer_sizes)
        reads a table's feature rows, a torchvision network reads images; a factory's
        model may read either."""
        model, dataset = self.model, self.dataset
        if dataset.format not in DATASET_FORMATS:
            raise InvalidSpec(
                f"dataset.format must be one of {', '.join(DATASET_FORMATS)}, "
                f"got {dataset.format!r}",
                field="dataset.format",
            )
        mlp = model.architecture == MLP_ARCHITECTURE
        if model.layer_sizes and not mlp:
            raise InvalidSpec(
                f"model.layer_sizes shape an architecture {MLP_ARCHITECTURE!r} only; "
                f"this model is {model.architecture or model.factory!r}",
                field="model.layer_sizes",
            )
        if mlp:
            sizes = model.layer_sizes
            if not 2 <= len(sizes) <= MAX_LIST or not all(1 <= s <= MAX_UNITS for s in sizes):
                raise InvalidSpec(
                    f"model.layer_sizes: architecture {MLP_ARCHITECTURE!r} needs "
                    f"[in_features, hidden_1, ..., hidden_n]: 2 to {MAX_LIST} sizes, each in "
                    f"[1, {MAX_UNITS}], got {list(sizes)}",
                    field="model.layer_sizes",
                )
            if not dataset.is_table:
                raise InvalidSpec(
                    f"architecture {MLP_ARCHITECTURE!r} reads rows of features: set "
                    "dataset.format to 'table'",
                    field="dataset.format",
                )
        elif model.architecture and dataset.is_table:
            raise InvalidSpec(
                f"architecture {model.architecture!r} reads images, not a table's features: "
                f"use architecture {MLP_ARCHITECTURE!r} with model.layer_sizes, or a factory",
                field="model.architecture",
            )

    def _validate_image_fields(self) -> None:
        if not 8 <= self.dataset.input_size <= 1024:
            raise InvalidSpec(
                f"dataset.input_size must lie in [8, 1024], got {self.dataset.input_size}",
                field="dataset.input_size",
            )
        for name in ("mean", "std"):
            values = getattr(self.dataset, name)
            if len(values) != 3:
                raise InvalidSpec(
                    f"dataset.{name} needs 3 values (R,G,B), got {len(values)}",
                    field=f"dataset.{name}",
                )
        if any(s <= 0 for s in self.dataset.std):
            raise InvalidSpec("dataset.std values must be positive", field="dataset.std")

    def _validate_classes(self) -> None:
        """model.classes, the class indices, and the class names as far as they are known."""
        classes = self.model.classes
        check_class_names(classes, "model.classes", lambda i: f"model.classes[{i}]")
        if classes and len(classes) != self.model.num_classes:
            raise InvalidSpec(
                f"model.classes names {len(classes)} classes, but model.num_classes is "
                f"{self.model.num_classes}: give one name per output of the model",
                field="model.classes",
            )
        for which in ("positive", "negative"):
            name = getattr(self, f"{which}_class_name")
            if len(name) > MAX_NAME:
                raise InvalidSpec(
                    f"{which}_class_name is longer than {MAX_NAME} characters",
                    field=f"{which}_class_name",
                )
        if not 0 <= self.positive_class < self.model.num_classes:
            raise InvalidSpec(
                f"positive_class {self.positive_class} is not a class of a "
                f"{self.model.num_classes}-class model",
                field="positive_class",
            )
        if self.negative_class != -1 and not 0 <= self.negative_class < self.model.num_classes:
            raise InvalidSpec(
                f"negative_class {self.negative_class} is not a class of the model",
                field="negative_class",
            )
        if classes:
            self.class_indices(classes)  # names resolve, and the classes differ
        elif not self.positive_class_name and not self.negative_class_name:
            self._check_distinct(self.positive_class, self.negative_class)
        elif self.positive_class_name == self.negative_class_name:
            raise InvalidSpec(
                "negative_class_name must differ from positive_class_name",
                field="negative_class_name",
            )

    def _check_distinct(self, positive: int, negative: int) -> None:
        if negative == positive:
            field = "negative_class_name" if self.negative_class_name else "negative_class"
            raise InvalidSpec("negative_class must differ from positive_class", field=field)

    def _class_index(self, which: str, names: Sequence[str]) -> int:
        """The index of the positive or negative class, from its name when it has one."""
        index, name = getattr(self, f"{which}_class"), getattr(self, f"{which}_class_name")
        if not name:
            return index
        field = f"{which}_class_name"
        if not names:
            raise InvalidSpec(
                f"{field} {name!r} needs the model's class names: list them in "
                "model.classes or in a classes.txt beside labels.csv (one per line, in the "
                "model's output order), or give the class by index",
                field=field,
            )
        try:
            found = list(names).index(name)
        except ValueError:
            raise InvalidSpec(
                f"{field} {name!r} is not a class name of the model; classes: "
                f"{listing([repr(n) for n in names])}",
                field=field,
            ) from None
        default = getattr(AuditSpec, f"{which}_class")  # the dataclass default: 1 or -1
        if index not in (default, found):
            raise InvalidSpec(
                f"{which}_class {index} and {field} {name!r} (class {found}) disagree: "
                "give the class by index or by name",
                field=field,
            )
        return found

    def class_indices(self, names: Sequence[str]) -> tuple[int, int]:
        """(positive, negative) class indices, the names resolved against ``names`` (the
        model's class names in output order; empty when it has none)."""
        positive = self._class_index("positive", names)
        negative = self._class_index("negative", names)
        self._check_distinct(positive, negative)
        return positive, negative

    def resolve_classes(self, names: Sequence[str]) -> AuditSpec:
        """Set positive_class and negative_class from their names (the names stay, so
        the report's spec shows both); return self."""
        self.positive_class, self.negative_class = self.class_indices(names)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditSpec:
        data = dict(data)
        dataset = dict(data.pop("dataset", None) or {})
        for key in ("mean", "std"):
            if key in dataset:
                dataset[key] = tuple(dataset[key])
        prune = data.pop("prune", None)
        parts = {
            "model": _build(ModelRef, data.pop("model", None) or {}, "model."),
            "dataset": _build(DatasetRef, dataset, "dataset."),
            "prune": _build(PruneSpec, prune, "prune.") if prune else None,
        }
        return _build(cls, {**data, **parts})


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """``cls(**values)``; an unknown field name is an InvalidSpec naming its path."""
    try:
        return cls(**values)
    except TypeError as err:
        unknown = re.search(r"argument '(\w+)'", str(err))
        name = prefix + unknown.group(1) if unknown else prefix.rstrip(".")
        raise InvalidSpec(
            f"spec: unknown field {name!r}" if unknown else f"spec: {err}", field=name
        ) from None
