"""Models from MLflow as audit inputs: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` and
``runs:/RUN_ID/PATH``, resolved against this server's own tracking server.

The same safety as a file: of a model's artifacts only a weights file cnp reads anywhere
is fetched (a ``.safetensors`` file, or the ``state_dict.pth`` that
``mlflow.pytorch.log_state_dict`` writes, read with ``weights_only=True``), never the
pickled model MLflow's pytorch flavor may hold; its size is checked before the download.
A compact model cnp registered brings its ``architecture.json`` (pruned layer shapes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cnp_core.errors import ModelError

from .config import ServerConfig
from .errors import NotFound, ServiceError, WrongState

_MODEL_URI = re.compile(
    r"models:/(?P<name>[^/@\s]{1,256})(?:/(?P<version>[1-9][0-9]{0,9})|@(?P<alias>[\w\-]{1,256}))"
)
_RUN_URI = re.compile(r"runs:/(?P<run_id>[0-9a-f]{32})/(?P<path>[\w\-. /]{1,500})")
SAFETENSORS = ".safetensors"
STATE_DICT = "state_dict.pth"  # what mlflow.pytorch.log_state_dict writes
ARCHITECTURE = "architecture.json"  # beside a compact model's weights (cnp_core.export)
_MAX_ENTRIES = 2000  # artifacts listed in a model before giving up
_MAX_DEPTH = 4


class TrackingUnavailable(ServiceError):
    status = "UNAVAILABLE"
    reason = "TRACKING_UNAVAILABLE"
    retry_after = 15.0  # MLflow back, or the client's retry lands on a healthy replica


@dataclass(frozen=True)
class ModelSource:
    """What a model URI resolved to."""

    uri: str
    name: str  # registered model ("" for runs:/)
    version: str
    run_id: str
    artifact_uri: str  # the root of the model's artifacts
    artifact_path: str = ""  # the weights file read, relative to artifact_uri (once fetched)


# Weights references that name MLflow's artifacts, not files on this server; resolve()
# takes the first two and refuses the rest with the forms it takes.
URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_model_uri(text: str) -> bool:
    return text.startswith(URI_PREFIXES)


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _missing(err: Exception) -> bool:
    code = getattr(err, "error_code", "")
    # MLflow answers an unknown alias with INVALID_PARAMETER_VALUE "... not found".
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(err).lower()
    )


def check(uri: str, config: ServerConfig) -> ModelSource:
    """CreateAudit's check of a model URI: the server tracks, and the model exists."""
    if not config.tracking_enabled:
        raise WrongState(
            f"model.weights {uri!r} names an MLflow model, but this server keeps no MLflow "
            "record (started with --no-tracking); give a weights file",
            field="model.weights",
        )
    return resolve(uri, config.effective_tracking_uri)


def resolve(uri: str, tracking_uri: str) -> ModelSource:
    """The model version or run a URI names; NOT_FOUND when there is none."""
    from mlflow.exceptions import MlflowException

    model, run = _MODEL_URI.fullmatch(uri), _RUN_URI.fullmatch(uri)
    if model is None and run is None:
        raise ModelError(
            f"model.weights {uri!r} is not an MLflow model URI of the form "
            "models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH",
            field="model.weights",
        )
    client = _client(tracking_uri)
    try:
        if model is not None:
            name = model["name"]
            if model["alias"]:
                version = client.get_model_version_by_alias(name, model["alias"])
            else:
                version = client.get_model_version(name, model["version"])
            return ModelSource(
                uri,
                name,
                str(version.version),
                version.run_id or "",
                client.get_model_version_download_uri(name, version.version),
            )
        info = client.get_run(run["run_id"]).info
        path = run["path"].strip("/")
        if ".." in path.split("/"):
            raise ModelError(
                f"model.weights {uri!r}: the path may not contain '..'", field="model.weights"
            )
        return ModelSource(uri, "", "", info.run_id, f"{info.artifact_uri.rstrip('/')}/{path}")
    except MlflowException as err:
        if _missing(err):
            raise NotFound(
                f"model.weights {uri!r}: no such model in MLflow", field="model.weights"
            ) from None
        raise TrackingUnavailable(
            f"model.weights {uri!r}: the MLflow tracking server did not answer; retry later",
            field="model.weights",
        ) from None
    except OSError as err:
        raise TrackingUnavailable(
            f"model.weights {uri!r}: the MLflow tracking server is unreachable ({err.strerror})",
            field="model.weights",
        ) from None


def _list(artifact_uri: str, tracking_uri: str) -> list[Any]:
    """Every file under the model's artifacts (bounded)."""
    from mlflow.artifacts import list_artifacts

    files, queue = [], [("", 0)]
    while queue:
        path, depth = queue.pop()
        uri = f"{artifact_uri}/{path}" if path else artifact_uri
        for entry in list_artifacts(artifact_uri=uri, tracking_uri=tracking_uri) or []:
            name = entry.path.rsplit("/", 1)[-1]
            relative = f"{path}/{name}" if path else name
            if len(files) + len(queue) > _MAX_ENTRIES:
                raise ModelError(
                    "the MLflow model has too many artifacts to search", field="model.weights"
                )
            if entry.is_dir and depth < _MAX_DEPTH:
                queue.append((relative, depth + 1))
            elif not entry.is_dir:
                files.append((relative, entry.file_size or 0))
    return files


def _weights_file(files: list[tuple[str, int]], uri: str) -> tuple[str, int]:
    """The one weights file of a model: its safetensors file, else its state_dict.pth."""
    for wanted in (
        lambda path: path.endswith(SAFETENSORS),
        lambda path: path.rsplit("/", 1)[-1] == STATE_DICT,
    ):
        found = [(path, size) for path, size in files if wanted(path)]
        if len(found) > 1:
            found = [f for f in found if f[0].rsplit("/", 1)[-1] == "model.safetensors"]
            if len(found) != 1:
                raise ModelError(
                    f"model.weights {uri!r}: the model holds several weights files; "
                    "name one with runs:/RUN_ID/PATH",
                    field="model.weights",
                )
        if found:
            return found[0]
    raise ModelError(
        f"model.weights {uri!r}: the model holds no safetensors file and no state_dict.pth. "
        "cnp never unpickles a model: log its weights with it (e.g. model.safetensors as an "
        "extra file, or mlflow.pytorch.log_state_dict)",
        field="model.weights",
    )


def fetch(
    source: ModelSource, destination: Path, tracking_uri: str, max_bytes: int
) -> tuple[Path, ModelSource]:
    """Download the model's weights file (and architecture.json beside it) into
    ``destination``; returns the local weights path and the source naming that file."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        if source.artifact_uri.endswith((SAFETENSORS, STATE_DICT)):  # runs:/ID/x.safetensors
            base, _, leaf = source.artifact_uri.rpartition("/")
            files = [(p, s) for p, s in _list(base, tracking_uri) if p == leaf]
            base_uri = base
        else:
            files, base_uri = _list(source.artifact_uri, tracking_uri), source.artifact_uri
        path, size = _weights_file(files, source.uri)
        if size > max_bytes:
            raise ModelError(
                f"model.weights {source.uri!r}: {path} is {size / (1 << 30):.2f} GiB, over this "
                f"server's limit of {max_bytes / (1 << 30):.2f} GiB (max_weights_bytes)",
                field="model.weights",
            )
        wanted = [path]
        sibling = f"{path.rpartition('/')[0]}/{ARCHITECTURE}".lstrip("/")
        if any(p == sibling for p, _ in files):
            wanted.append(sibling)
        destination.mkdir(parents=True, exist_ok=True)
        for relative in wanted:
            target = destination / Path(relative).name
            local = download_artifacts(
                artifact_uri=f"{base_uri}/{relative}",
                dst_path=str(destination / "download"),
                tracking_uri=tracking_uri,
            )
            Path(local).replace(target)
        return destination / Path(path).name, replace(source, artifact_path=path)
    except MlflowException as err:
        if _missing(err):
            raise NotFound(
                f"model.weights {source.uri!r}: its artifacts are gone", field="model.weights"
            ) from None
        raise TrackingUnavailable(
            f"model.weights {source.uri!r}: could not fetch the model from MLflow; retry later",
            field="model.weights",
        ) from None
