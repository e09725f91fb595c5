"""The engine behind the service: a thin, lazily-importing adapter to ``cnp_core.pipeline``.

An *engine* is any module with three functions (the server loads the one named by the
``engine`` setting, this module by default):

- ``validate(spec, allowed_roots)``: fast reference checks; raises CnpError subclasses.
- ``run_audit(spec, *, workdir, progress, cancelled, allowed_roots) -> AuditResult``:
  ``progress(stage, fraction, message)``; raises :class:`cnp_core.errors.Cancelled` once
  ``cancelled()`` is true; writes artifacts into ``workdir`` and lists them in
  ``result.artifacts``.
- ``capabilities() -> dict[str, list[str]]``: what ServerMetadata advertises.

torch is imported only when one of them is called, so the server starts fast and its
worker processes pay for the import, not the RPC threads.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from cnp_core.devices import DeviceUnavailable, device_names, parse_device, visible_gpus
from cnp_core.errors import InvalidSpec
from cnp_core.results import AuditResult
from cnp_core.spec import (
    CONCEPT_METHODS,
    PRUNE_METHODS,
    SCHEDULES,
    SCORES,
    AuditSpec,
)

from . import registry
from .config import ServerConfig
from .errors import FactoryNotAllowed, PathOutsideRoots

REQUIRED = ("validate", "run_audit", "capabilities")


def files_only(spec: AuditSpec) -> AuditSpec:
    """The spec an engine validates: a model URI is the registry's to check, not a path."""
    if not registry.is_model_uri(spec.model.weights):
        return spec
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, weights=""))


def load_engine(name: str) -> ModuleType:
    """Import the engine module ``name`` and check that it has the three functions."""
    module = importlib.import_module(name)
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"engine {name} lacks {', '.join(missing)}")
    return module


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def check_device(spec: AuditSpec, config: ServerConfig) -> None:
    """An explicit CUDA device the server's jobs can have; "auto" and "cpu" always pass.

    Every job runs on one GPU at most, which its worker sees as ``cuda:0`` (the local
    executor pins each slot to one with CUDA_VISIBLE_DEVICES; a Ray job asks for one).
    The local executor has a GPU when ``gpus`` lists some or torch sees some here; a Ray
    cluster's GPUs are not known here, so there the worker refuses a job whose actor got
    none."""
    kind, index = parse_device(spec.device)
    if kind != "cuda":
        return
    if config.executor == "local" and not (config.gpus or visible_gpus()):
        raise DeviceUnavailable(
            f"device {spec.device!r}: this server has no GPU, so its jobs run on cpu; use "
            "device 'auto' (the server's choice) or 'cpu', or submit to a server with GPUs",
            field="device",
        )
    if index:
        raise DeviceUnavailable(
            f"device {spec.device!r}: each job on this server runs on one GPU, which it sees "
            f"as cuda:0 (a job's devices: {', '.join(device_names(1))}); use device 'auto' "
            "(the server's choice), 'cuda' or 'cuda:0'",
            field="device",
        )


def check_references(spec: AuditSpec, config: ServerConfig) -> None:
    """What the operator allows, checked without importing or reading anything a request
    names: a factory only when listed in ``allow_factories``; weights and dataset paths
    absolute and under an allowed root (symlinks resolved first, so a link inside a root
    that points outside is refused); a weights file no larger than ``max_weights_bytes``;
    a device the server's jobs have (:func:`check_device`)."""
    check_device(spec, config)
    factory = spec.model.factory.strip()
    if factory and factory not in config.allow_factories:
        raise FactoryNotAllowed(
            f"model.factory {factory!r} is not allowed on this server: factories run only when "
            "the operator lists them (allow_factories, --allow-factory); name an architecture",
            field="model.factory",
        )
    named = [("dataset.root", spec.dataset.root)]
    if registry.is_model_uri(spec.model.weights):
        registry.check(spec.model.weights, config)  # the model exists in this server's MLflow
    elif spec.model.weights:
        named.append(("model.weights", spec.model.weights))
    roots = [Path(r).resolve() for r in config.allow_roots]
    for field, value in named:
        if not value:
            continue
        if not Path(value).is_absolute():
            raise InvalidSpec(
                f"{field} must be an absolute path on the server, got {value!r}", field=field
            )
        if not roots:
            raise PathOutsideRoots(
                f"{field}: this server allows no model or dataset paths; "
                "start it with --allow-root DIR",
                field=field,
            )
        resolved = Path(value).resolve()
        if not _inside(resolved, roots):
            raise PathOutsideRoots(
                f"{field} {value!r} is not under an allowed root of this server", field=field
            )
        if field == "model.weights" and resolved.is_file():
            size = resolved.stat().st_size
            if size > config.max_weights_bytes:
                raise InvalidSpec(
                    f"model.weights {value!r} is {size / (1 << 30):.2f} GiB, over this server's "
                    f"limit of {config.max_weights_bytes / (1 << 30):.2f} GiB (max_weights_bytes)",
                    field="model.weights",
                )


# --- the default engine: cnp_core.pipeline ------------------------------------------------


def warm_up() -> None:
    """Import the pipeline (torch) in the background so the first CreateAudit is fast."""
    import cnp_core.pipeline  # noqa: F401


def validate(spec: AuditSpec, allowed_roots: Sequence[Path]) -> None:
    from cnp_core import pipeline

    pipeline.validate(spec, allowed_roots=list(allowed_roots))


def run_audit(
    spec: AuditSpec,
    *,
    workdir: Path,
    progress: Callable[[str, float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    allowed_roots: Sequence[Path] | None = None,
) -> AuditResult:
    from cnp_core import pipeline

    return pipeline.run_audit(
        spec,
        workdir=workdir,
        progress=progress,
        cancelled=cancelled,
        allowed_roots=list(allowed_roots) if allowed_roots is not None else None,
    )


def capabilities() -> dict[str, Any]:
    """Architectures, weight formats, methods and composites the engine supports."""
    from cnp_core import models
    from cnp_core.architectures import ARCHITECTURES
    from cnp_core.lrp import composite_names

    return {
        "architectures": list(ARCHITECTURES),
        "weight_formats": [*models.SAFETENSORS_SUFFIXES, *models.PICKLE_SUFFIXES],
        "concept_methods": list(CONCEPT_METHODS),
        "scores": list(SCORES),
        "composites": composite_names(),
        "prune_methods": list(PRUNE_METHODS),
        "prune_schedules": list(SCHEDULES),
    }
