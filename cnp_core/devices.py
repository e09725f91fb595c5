"""Where a job computes, and batches that fit the device's memory.

The server chooses the device: a spec's ``device`` of "auto" (the default) is the
worker's GPU when torch sees one, else the CPU. The executor pins each worker to one GPU
(``CUDA_VISIBLE_DEVICES``), so inside a worker that GPU is ``cuda:0``. An explicit
"cpu" or "cuda[:N]" is honoured, or refused with :class:`DeviceUnavailable` naming the
devices there.

Batched passes run through a :class:`BatchRunner`: a chunk that runs out of CUDA memory
is run again at half its size (the allocator's cache freed first), once per pass; a
second out-of-memory ends the job with :class:`GpuOutOfMemory` (RESOURCE_EXHAUSTED) and
advice. The collection passes also size their chunks from the GPU's free memory.

torch is imported inside the functions: the server imports this module (its errors,
to refuse a device at submission) without paying for torch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import CnpError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

AUTO = "auto"  # a spec's device when the server chooses
DEVICE_PATTERN = re.compile(r"^(?P<kind>auto|cpu|cuda)(?::(?P<index>\d+))?$")

# Of the memory free on the GPU, what a collection pass plans to fill: the rest is slack
# for the allocator's fragmentation and what the probe chunk did not show.
MEMORY_HEADROOM = 0.8
_ADVICE = (
    "lower batch_size, audit fewer or smaller images (fit_images, dataset.input_size), "
    "or run the job on a GPU with more memory"
)


class DeviceUnavailable(CnpError):
    """The spec names a device that the server (or the job's worker) does not have."""

    status = "FAILED_PRECONDITION"
    reason = "DEVICE_UNAVAILABLE"


class GpuOutOfMemory(CnpError):
    """A batched pass ran out of GPU memory at half its batch size too.

    ``metadata`` (ErrorInfo's): the device and the batch size that failed.
    """

    status = "RESOURCE_EXHAUSTED"
    reason = "GPU_OUT_OF_MEMORY"
    retryable = False  # the same job runs out again: no RetryInfo, the advice says what to change
    metadata: Mapping[str, str] = MappingProxyType({})


def parse_device(text: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", index or None) of a spec's device; ValueError if malformed."""
    match = DEVICE_PATTERN.match(text)
    if match is None or (match["kind"] != "cuda" and match["index"] is not None):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {text!r}")
    index = match["index"]
    return match["kind"], int(index) if index is not None else None


def device_names(gpus: int) -> list[str]:
    """The devices a process with ``gpus`` visible GPUs can name: cpu, cuda:0, ..."""
    return ["cpu", *(f"cuda:{i}" for i in range(gpus))]


def visible_gpus() -> int:
    """The GPUs torch can use in this process (those CUDA_VISIBLE_DEVICES shows)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def compute_device(requested: str = AUTO) -> torch.device:
    """The torch device a job computes on (see the module docstring)."""
    import torch

    kind, index = parse_device(requested)
    if kind == "cpu":
        return torch.device("cpu")
    gpus = visible_gpus()
    if kind == AUTO:
        return torch.device("cuda", 0) if gpus else torch.device("cpu")
    index = index or 0
    if index >= gpus:
        has = "no GPU" if gpus == 0 else f"{gpus} GPU{'s' if gpus > 1 else ''}"
        raise DeviceUnavailable(
            f"device {requested!r} is not available: this worker has {has} (its devices: "
            f"{', '.join(device_names(gpus))}); use device 'auto' (the server's choice) "
            "or one of those",
            field="device",
        )
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> dict[str, str]:
    """What a report records of the device a job computed on."""
    import torch

    found = {"device": str(device)}
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
        found["cuda"] = str(torch.version.cuda)
    return found


def _gpu_text(device: torch.device) -> str:
    """``the GPU (cuda:0, NVIDIA H100, 79.2 GiB)``; ``the device (cpu)`` off a GPU."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the device ({device})"
    properties = torch.cuda.get_device_properties(device)
    return f"the GPU ({device}, {properties.name}, {properties.total_memory / (1 << 30):.1f} GiB)"


def _free_cache(device: torch.device) -> None:
    import torch

    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def batch_that_fits(available: int, per_item: int, limit: int) -> int:
    """Items per chunk (1 to ``limit``) that fill ``MEMORY_HEADROOM`` of ``available`` bytes
    when one item takes ``per_item``."""
    return max(1, min(limit, int(MEMORY_HEADROOM * available) // max(per_item, 1)))


_FAILED = object()  # a chunk that ran out of memory


class BatchRunner:
    """Runs the batches of one pass (``doing``: "collecting activations", for messages)
    on ``device`` in chunks that fit its memory.

    ``map(step, *batch)`` yields ``step(*chunk)`` for consecutive chunks of the batch's
    tensors (sliced on their first axis), in order. A chunk that raises CUDA's
    OutOfMemoryError is run again at half its size, and later chunks of the pass stay at
    that size; another out-of-memory raises :class:`GpuOutOfMemory`. So a step must
    commit nothing itself: it returns its results and the caller keeps them.

    ``fit_memory`` (on a GPU): the pass's first chunk is one item, whose peak memory
    sizes the chunks after it to the GPU's free memory (never above the batch).
    """

    def __init__(self, device: str | torch.device, doing: str, *, fit_memory: bool = False):
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())  # named in errors
        self.doing = doing
        self.size: int | None = None  # chunk size cap; None: the whole batch
        self.halved_from: int | None = None
        self._probe = fit_memory and self.device.type == "cuda"

    def map(self, step: Callable[..., T], *batch: Any) -> Iterator[T]:
        import torch

        n = len(batch[0])
        start = 0
        while start < n:
            size = 1 if self._probe else min(n - start, self.size or n)
            chunk = tuple(part[start : start + size] for part in batch)
            baseline = self._start_probe() if self._probe else 0
            try:
                result = step(*chunk)
            except torch.cuda.OutOfMemoryError:
                result = _FAILED  # handled outside: the error's frames hold the chunk's tensors
            del chunk
            if result is _FAILED:
                self._halve(size)
                continue
            if self._probe:
                self._fit(torch.cuda.max_memory_allocated(self.device) - baseline, n)
            yield result
            start += size

    def _start_probe(self) -> int:
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _fit(self, per_item: int, limit: int) -> None:
        """Chunks after the probe: as many items as the GPU's free memory holds."""
        import torch

        self._probe = False
        free, _ = torch.cuda.mem_get_info(self.device)
        # Memory the allocator holds but no tensor uses is free for this pass too.
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        self.size = batch_that_fits(free + cached, per_item, limit)

    def _halve(self, size: int) -> None:
        """After an out-of-memory at ``size``: free the cache and halve, or give up."""
        self._probe = False
        _free_cache(self.device)
        if self.halved_from is not None or size <= 1:
            retried = f", after a retry at half of {self.halved_from}" if self.halved_from else ""
            error = GpuOutOfMemory(
                f"{_gpu_text(self.device)} ran out of memory while {self.doing}, at {size} "
                f"image{'s' if size > 1 else ''} per batch{retried}: {_ADVICE}",
                field="batch_size",
            )
            error.metadata = {"device": str(self.device), "batch_size": str(size)}
            raise error
        self.halved_from, self.size = size, (size + 1) // 2


@contextlib.contextmanager
def gpu_memory_errors(device: torch.device) -> Iterator[None]:
    """A CUDA out-of-memory outside the batched passes (the concept fit holds fit_images x
    positions_per_image rows on the device) as :class:`GpuOutOfMemory`, with advice."""
    import torch

    failed = False
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        failed = True  # raised below, once the error (and the tensors its frames hold) is gone
    if failed:
        _free_cache(device)
        error = GpuOutOfMemory(
            f"{_gpu_text(device)} ran out of memory outside the batched passes: lower "
            "fit_images or positions_per_image (the concept fit holds fit_images x "
            "positions_per_image rows on it), or run the job on a GPU with more memory",
            field="fit_images",
        )
        error.metadata = {"device": str(device)}
        raise error
