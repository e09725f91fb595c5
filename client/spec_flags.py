"""The audit spec on the command line: one flag per spec field (:data:`SPEC_FLAGS`), a
spec file under them (``cnp audit --spec FILE``), and the default spec ``cnp spec`` prints.

The parser, :func:`spec_from_args` and :func:`spec_arguments` all read the one table, so a
new spec field needs only a new row (a test checks that every field has one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from google.protobuf import json_format

from cnp.v1 import spec_pb2
from cnp_core import convert
from cnp_core.errors import CnpError
from cnp_core.spec import (
    CONCEPT_METHODS,
    DATASET_FORMATS,
    PRUNE_METHODS,
    PRUNE_SCOPES,
    SCHEDULES,
    SCORES,
    AuditSpec,
    PruneSpec,
)


class SpecError(ValueError):
    """The flags or the spec file do not make a spec; the message says which part."""


# --- flag values -------------------------------------------------------------------------


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, got {text!r}")
    return values  # type: ignore[return-value]


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers (a comma list), got {text!r}"
        ) from None


def _absolute(path: str) -> str:
    """Absolute, user-expanded; the server canonicalises and checks its allowed roots.
    A URI (``models:/NAME/1``, ``runs:/ID/PATH``) goes as given: the server resolves it
    against its MLflow, or says which schemes it takes."""
    if not path or re.match(r"^[a-z][a-z0-9+.-]+:/", path):
        return path
    return str(Path(path).expanduser().absolute())


def _class_ref(text: str) -> int | str:
    """A class by index (``3``) or by name (``ring``)."""
    return int(text) if re.fullmatch(r"-?\d+", text.strip()) else text


def _class_names(text: str) -> list[str]:
    """``a,b,c``, or ``@FILE`` with one name per line (for names with commas)."""
    if text.startswith("@"):
        try:
            lines = Path(text[1:]).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise argparse.ArgumentTypeError(f"{text[1:]}: {err.strerror}") from None
        names = [line.strip() for line in lines if line.strip()]
    else:
        names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no class names in {text!r}")
    return names


# --- the table ---------------------------------------------------------------------------


class SpecFlag(NamedTuple):
    """A ``cnp audit`` flag and the spec field it sets (dotted, e.g. ``prune.rate``)."""

    flag: str
    field: str
    options: dict[str, Any]  # argparse keywords: type, help, choices, metavar, action
    name_field: str = ""  # a class flag: the *_class_name field a non-numeric value sets
    shown: str = ""  # the default as help shows it; "": the library default's value

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def fields(self) -> tuple[str, ...]:
        """Every spec field the flag sets."""
        return (self.field, self.name_field) if self.name_field else (self.field,)


def _flag(flag: str, field: str, *, name_field: str = "", shown: str = "", **options: Any):
    return SpecFlag(flag, field, options, name_field, shown)


# Every AuditSpec field, and nothing else, has one flag here: the parser, spec_from_args
# and spec_arguments all read this table, so a new spec field needs only a new row.
SPEC_FLAGS: tuple[SpecFlag, ...] = (
    _flag(
        "--model",
        "model.architecture",
        metavar="ARCH",
        help="torchvision architecture, e.g. resnet18, or mlp (with --layer-sizes)",
    ),
    _flag(
        "--layer-sizes",
        "model.layer_sizes",
        type=_int_list,
        metavar="IN,H1,...",
        shown="none; required with --model mlp",
        help="an mlp's in_features (the table's features) and hidden layer widths",
    ),
    _flag("--factory", "model.factory", metavar="MODULE:FUNCTION", help="importable model factory"),
    _flag(
        "--weights",
        "model.weights",
        type=_absolute,
        metavar="FILE|URI",
        help=".safetensors or state_dict .pt/.pth file, or a model in the server's MLflow: "
        "models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH",
    ),
    _flag("--num-classes", "model.num_classes", type=int, metavar="N", help="outputs of the model"),
    _flag(
        "--classes",
        "model.classes",
        type=_class_names,
        metavar="A,B,...|@FILE",
        shown="a classes.txt beside labels.csv, else class indices",
        help="class names in the model's output order, a comma list or @FILE with one per "
        "line; labels.csv may then label images by name",
    ),
    _flag(
        "--dataset",
        "dataset.root",
        type=_absolute,
        metavar="DIR",
        shown="none; required here or in --spec",
        help="directory with labels.csv and the images (or features.txt, --dataset-format table)",
    ),
    _flag(
        "--dataset-format",
        "dataset.format",
        choices=DATASET_FORMATS,
        help="images, or table: labels.csv holds numeric feature columns that features.txt "
        "names in the model's input order",
    ),
    _flag(
        "--input-size",
        "dataset.input_size",
        type=int,
        metavar="N",
        help="image side in pixels (not for a table)",
    ),
    _flag("--mean", "dataset.mean", type=_triple, metavar="R,G,B", help="normalisation mean"),
    _flag("--std", "dataset.std", type=_triple, metavar="R,G,B", help="normalisation std"),
    _flag(
        "--max-pixels",
        "dataset.max_pixels",
        type=int,
        metavar="N",
        help="largest image read, in pixels (a decompression-bomb cap)",
    ),
    _flag(
        "--layer",
        "layers",
        action="append",
        metavar="NAME",
        shown="the architecture's, e.g. resnet18 layer2 below 128 px",
        help="layer to audit (repeatable)",
    ),
    _flag(
        "--attribute",
        "attributes",
        action="append",
        metavar="NAME",
        shown="none; at least one, here or in --spec",
        help="labels.csv column (repeatable)",
    ),
    _flag(
        "--positive-class",
        "positive_class",
        type=_class_ref,
        metavar="C|NAME",
        name_field="positive_class_name",
        help="the class suspected of relying on the attribute: an index, or a name from "
        "--classes or classes.txt",
    ),
    _flag(
        "--negative-class",
        "negative_class",
        type=_class_ref,
        metavar="C|NAME",
        name_field="negative_class_name",
        shown="-1, every other class",
        help="the class it is contrasted with: an index (-1: every other class) or a name",
    ),
    _flag("--method", "method", choices=CONCEPT_METHODS, help="concept method"),
    _flag(
        "--subspaces",
        "n_subspaces",
        type=_int_list,
        action="extend",
        metavar="K",
        help="numbers of subspaces to try, e.g. 4 or 2,4,8 (repeatable; chosen on validation)",
    ),
    _flag("--score", "score", choices=SCORES, help="subspace score: relevance share or raw"),
    _flag(
        "--composite",
        "composite",
        metavar="NAME",
        shown="the concept method's own",
        help="LRP rules of the concept fit's contexts",
    ),
    _flag(
        "--flag-threshold",
        "flag_threshold",
        type=float,
        metavar="AP",
        help="AP_attribute a subspace must reach to be flagged",
    ),
    _flag("--bootstrap", "bootstrap", type=int, metavar="N", help="resamples; 0 disables CIs"),
    _flag(
        "--min-group-size",
        "min_group_size",
        type=int,
        metavar="N",
        help="smaller groups are marked as too small",
    ),
    _flag(
        "--positions-per-image",
        "positions_per_image",
        type=int,
        metavar="N",
        help="positions sampled per image for the concept fit",
    ),
    _flag(
        "--fit-images",
        "fit_images",
        type=int,
        metavar="N",
        help="at most this many positive-class train images fit the basis",
    ),
    _flag("--drsa-restarts", "drsa_restarts", type=int, metavar="N", help="DRSA random starts"),
    _flag(
        "--drsa-max-epochs",
        "drsa_max_epochs",
        type=int,
        metavar="N",
        help="DRSA epochs at most (the fit stops earlier when it settles)",
    ),
    _flag("--heatmap-samples", "heatmap_samples", type=int, metavar="N", help="0: no heatmaps"),
    _flag("--batch-size", "batch_size", type=int, metavar="N", help="images per batch"),
    _flag(
        "--device",
        "device",
        metavar="auto|cpu|cuda[:N]",
        help="where the job computes; auto: the server's choice, its GPU when it has one",
    ),
    _flag("--seed", "seed", type=int, metavar="N", help="random seed"),
    # --prune turns pruning on (and picks the method); the other prune.* flags need it.
    _flag(
        "--prune",
        "prune.method",
        choices=PRUNE_METHODS,
        shown="no pruning, unless --spec has a prune section",
        help="prune after the audit, with this method",
    ),
    _flag(
        "--prune-rate", "prune.rate", type=float, metavar="R", help="fraction of filters in (0, 1)"
    ),
    _flag("--prune-schedule", "prune.schedule", choices=SCHEDULES, help="pruning schedule"),
    _flag(
        "--prune-steps",
        "prune.steps",
        type=int,
        metavar="N",
        help="pruning steps of the iterative schedule",
    ),
    _flag(
        "--finetune-epochs",
        "prune.finetune_epochs",
        type=int,
        metavar="N",
        help="fine-tuning epochs per step",
    ),
    _flag(
        "--learning-rate",
        "prune.learning_rate",
        type=float,
        metavar="LR",
        help="fine-tuning learning rate",
    ),
    _flag(
        "--reference-per-class",
        "prune.reference_per_class",
        type=int,
        metavar="N",
        help="reference images per class for the filter scores",
    ),
    _flag(
        "--prune-attribute",
        "prune.attribute",
        metavar="NAME",
        shown="the first audited attribute",
        help="attribute to remove",
    ),
    _flag(
        "--prune-scope",
        "prune.scope",
        choices=PRUNE_SCOPES,
        help="'upstream': only filters that feed the audited layer; 'all'",
    ),
    _flag(
        "--relearn-subspaces",
        "prune.relearn_subspaces",
        action=argparse.BooleanOptionalAction,
        help="re-fit the concept basis after each fine-tuning round",
    ),
    _flag(
        "--keep-projection",
        "prune.keep_projection",
        action=argparse.BooleanOptionalAction,
        help="CNP: fold the projection into the returned model",
    ),
    _flag(
        "--prune-composite",
        "prune.composite",
        metavar="NAME",
        help="LRP rules of the filter scores",
    ),
)

# Help groups by the first part of the field; top-level fields are the audit's.
_GROUPS = {"model": "model", "dataset": "dataset", "": "audit", "prune": "pruning"}
_ONE_OF = {"--model": "model.factory", "--factory": "model.architecture"}  # flag: cleared
# The library's defaults, pruning included, as help shows them and flags compare with.
_DEFAULTS = dataclasses.replace(AuditSpec(), prune=PruneSpec())


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "none"
    return str(value) if value != "" else "none"


def _help(flag: SpecFlag) -> str:
    """The flag's help and its default, read from the library (``%`` escaped for argparse)."""
    default = flag.shown or _shown(_field(_DEFAULTS, flag.field))
    text = f"{flag.options.get('help', '')} (default: {default})".strip()
    return text.replace("%", "%%")


def add_spec_flags(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every spec flag, in help groups (model, dataset, audit, pruning); returns the groups."""
    groups = {part: parser.add_argument_group(title) for part, title in _GROUPS.items()}
    one_of = groups["model"].add_mutually_exclusive_group()
    for flag in SPEC_FLAGS:
        group = one_of if flag.flag in _ONE_OF else groups[flag.field.rpartition(".")[0]]
        options = {**flag.options, "help": _help(flag), "default": None}
        group.add_argument(flag.flag, dest=flag.dest, **options)
    return groups


# --- the spec: a file, flags over it -----------------------------------------------------


def spec_from_args(args: argparse.Namespace) -> AuditSpec:
    """The AuditSpec of ``--spec`` (else the library's defaults) with the flags the user
    gave over it; flags left out (None) change nothing."""
    source = getattr(args, "spec", None)
    spec = load_spec(source) if source else AuditSpec()
    for flag in SPEC_FLAGS:  # the file's relative paths are the current directory's too
        if flag.options.get("type") is _absolute:
            _set(spec, flag.field, _absolute(_field(spec, flag.field)))
    if getattr(args, "prune", None) is not None and spec.prune is None:
        spec.prune = PruneSpec()  # --prune turns pruning on
    without_prune = []
    for flag in SPEC_FLAGS:
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        if flag.field.startswith("prune.") and spec.prune is None:
            without_prune.append(flag.flag)
            continue
        _apply(spec, flag, value)
    if without_prune:
        raise SpecError(
            f"{', '.join(without_prune)}: pruning flags need --prune {'|'.join(PRUNE_METHODS)} "
            "(or a prune section in --spec)"
        )
    return spec


def _apply(spec: AuditSpec, flag: SpecFlag, value: Any) -> None:
    if flag.name_field:  # a class: an index sets the index, a name the name
        by_name = isinstance(value, str)
        # The index at its default yields to a name (AuditSpec's rule); a name is cleared
        # by an index. Either way the file's other spelling of the class is overridden.
        _set(spec, flag.field, _field(_DEFAULTS, flag.field) if by_name else value)
        _set(spec, flag.name_field, value if by_name else "")
        return
    _set(spec, flag.field, value)
    if flag.flag in _ONE_OF:  # an architecture or a factory: the flag replaces the file's
        _set(spec, _ONE_OF[flag.flag], "")


def _set(spec: AuditSpec, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    owner: Any = spec
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, name, value)


def load_spec(source: str) -> AuditSpec:
    """The AuditSpec in a YAML or JSON file (``-``: stdin), in the shape ``cnp spec``
    prints. Unknown keys and mistyped values are a :class:`SpecError` naming the field."""
    name = "<stdin>" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).expanduser().read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise SpecError(f"--spec {name}: {why}") from None
    data = _parse_document(text, name)
    if not isinstance(data, dict):
        raise SpecError(
            f"--spec {name}: expected a mapping of spec fields (as `cnp spec` prints), "
            f"got {type(data).__name__}"
        )
    _check_keys(data, AuditSpec, "", name)
    try:  # the proto's JSON parser checks every value's type
        message = json_format.ParseDict(data, spec_pb2.AuditSpec())
        return convert.spec_from_proto(message)
    except json_format.ParseError as err:
        raise SpecError(f"--spec {name}: {_parse_error(err)}") from None
    except CnpError as err:
        raise SpecError(f"--spec {name}: {err}") from None


def _parse_document(text: str, name: str) -> Any:
    if name.endswith(".json") or text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError as err:
            raise SpecError(f"--spec {name}: not valid JSON: {err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"--spec {name}: not valid YAML: {err}") from None


def _check_keys(data: dict, cls: type, prefix: str, name: str) -> None:
    """Every key a field of ``cls`` (recursively); the first unknown one is named by path."""
    hints = typing.get_type_hints(cls)
    known = [field.name for field in dataclasses.fields(cls)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in known:
            where = f"{prefix.rstrip('.')} " if prefix else ""
            raise SpecError(
                f"--spec {name}: unknown key {path!r}; the {where}fields are: {', '.join(known)}"
            )
        nested = next(
            (k for k in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(k)),
            None,
        )
        if nested is None or value is None:
            continue
        if not isinstance(value, dict):
            raise SpecError(f"--spec {name}: {path}: expected a mapping, got {value!r}")
        _check_keys(value, nested, f"{path}.", name)


def _parse_error(err: json_format.ParseError) -> str:
    """protobuf's nested "Failed to parse prune field: ... at AuditSpec.prune.rate." as
    ``prune.rate: Couldn't parse float: high``."""
    text = str(err).splitlines()[0]
    parents = re.findall(r"Failed to parse (\w+) field: ", text)
    why = re.sub(r"Failed to parse \w+ field: ", "", text)
    path = ".".join(parents)
    at = re.search(r' at "?AuditSpec\.?([\w.\[\]]*?)"?\.*$', why)
    if at:
        why, path = why[: at.start()], at.group(1) or path
    why = why.rstrip(".")
    return f"{path}: {why}" if path else why


def default_spec_text(output: str, prune: bool = False) -> str:
    """The default spec, every field, as ``cnp spec`` prints it (YAML or JSON)."""
    spec = AuditSpec(prune=PruneSpec() if prune else None)
    data = json.loads(json.dumps(spec.to_dict()))  # tuples as lists
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    header = (
        "# cnp audit spec: edit it, then `cnp audit --spec FILE` (flags override it).\n"
        "# Needed: model.architecture (or model.factory), model.weights, dataset.root and\n"
        "# attributes. prune: null audits only; `cnp spec --prune` adds its defaults.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def spec_arguments(spec: AuditSpec, always: Collection[str] = ()) -> list[str]:
    """The flags that ask for ``spec`` (the inverse of :func:`spec_from_args`): every
    field that differs from the library's default, and the fields in ``always``."""
    args: list[str] = []
    for flag in SPEC_FLAGS:
        if flag.field.startswith("prune.") and spec.prune is None:
            continue
        value = _field(spec, flag.field)
        named = flag.name_field and _field(spec, flag.name_field)
        if named:
            value = named
        elif flag.field not in always and value == _field(_DEFAULTS, flag.field):
            continue
        action = flag.options.get("action")
        if action is argparse.BooleanOptionalAction:
            args += [flag.flag if value else "--no-" + flag.flag.removeprefix("--")]
        elif action == "append":
            for item in value:
                args += [flag.flag, str(item)]
        elif isinstance(value, (list, tuple)):
            args += [flag.flag, ",".join(str(v) for v in value)]
        else:
            args += [flag.flag, str(value)]
    return args


def _field(spec: AuditSpec, dotted: str) -> Any:
    for part in dotted.split("."):
        spec = getattr(spec, part)
    return spec
