"""The pruned model as MLflow models, written by the worker next to the job's artifacts.

Two model directories under ``<workdir>/mlflow/``, each an MLflow model with a signature
and an input example: ``pytorch`` (the ``torch.export`` program, MLflow's safe ``pt2``
serialization, with cnp's own ``model.safetensors`` + ``architecture.json`` as extra
files, so an audit of ``models:/NAME/VERSION`` reads plain weights, never a pickle) and
``onnx`` (when the model could be exported to ONNX). The tracker uploads them to the
job's run and registers the first under the name the client gave.

Saved with ``save_model`` (local files) rather than the fluent ``log_model``: the fluent
API keeps an active run per process, which a server logging many jobs cannot share.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DIRECTORY = "mlflow"
PYTORCH = "pytorch"
ONNX = "onnx"
# The artifact paths in the run (the names log_model would give them).
ARTIFACT_PATHS = {PYTORCH: "model", ONNX: "model_onnx"}


def _requirements() -> list[str]:
    """Pinned requirements (inferring them would import the model in a subprocess)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "torchvision")]


def _sample_shape(compact_dir: Path, input_size: int) -> tuple[int, ...]:
    """One input's shape, as the model was exported with (architecture.json's
    ``input_shape``: (in_features,) for an MLP over a table); an RGB image of
    ``input_size`` pixels when the description has none."""
    import json

    from cnp_core.export import ARCHITECTURE_FILE

    described = json.loads((compact_dir / ARCHITECTURE_FILE).read_text(encoding="utf-8"))
    shape = described.get("input_shape") or [1, 3, input_size, input_size]
    return tuple(int(n) for n in shape[1:])


def save_models(
    compact_dir: Path, workdir: Path, metadata: dict[str, Any], input_size: int
) -> dict[str, Path]:
    """Write the MLflow models of the compact model in ``compact_dir``; returns flavor ->
    directory. A flavor that cannot be written is logged and left out."""
    import mlflow.onnx
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from cnp_core.export import ARCHITECTURE_FILE, ONNX_FILE, WEIGHTS_FILE, load_compact

    root = workdir / DIRECTORY
    model = load_compact(compact_dir)
    # Two rows: torch.export would fix a batch size of 1 into the program.
    example = np.zeros((2, *_sample_shape(compact_dir, input_size)), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, logits)
    saved: dict[str, Path] = {}
    try:
        mlflow.pytorch.save_model(
            model,
            root / PYTORCH,
            signature=signature,
            input_example=example,
            extra_files=[str(compact_dir / WEIGHTS_FILE), str(compact_dir / ARCHITECTURE_FILE)],
            pip_requirements=_requirements(),
            metadata={"cnp": metadata},
            serialization_format="pt2",
        )
        saved[PYTORCH] = root / PYTORCH
    except Exception:
        log.exception("the pruned model could not be saved as an MLflow pytorch model")
    if (compact_dir / ONNX_FILE).is_file():
        try:
            import onnx

            mlflow.onnx.save_model(
                onnx.load(str(compact_dir / ONNX_FILE)),
                root / ONNX,
                signature=signature,
                input_example=example,
                pip_requirements=["onnxruntime"],
                metadata={"cnp": metadata},
                save_as_external_data=False,
            )
            saved[ONNX] = root / ONNX
        except Exception:
            log.exception("the pruned model could not be saved as an MLflow ONNX model")
    return saved
