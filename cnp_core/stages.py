"""The stages of an audit job: progress, timings and cancellation in one place.

"Progress" in cnp means how far a job has come: the pipeline reports it through a
:data:`ProgressCallback` (stage, overall fraction, message), which the server stores and
streams; work inside a stage reports through a :data:`StepCallback`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import Cancelled

ProgressCallback = Callable[[str, float, str], None]  # (stage, overall fraction, message)
StepCallback = Callable[[float, str], None]  # (fraction of the current stage, message)

# Overall progress at the start of each stage (the server shows one bar).
STAGES = {
    "load": 0.0,
    "evaluate": 0.05,
    "collect": 0.12,
    "fit": 0.40,
    "score": 0.50,
    "audit": 0.78,
    "heatmaps": 0.82,
    "prune": 0.86,
    "report": 0.98,
}


def _ignore(stage: str, fraction: float, message: str) -> None:
    pass


class Stages:
    """Walks a job through :data:`STAGES`: reports progress, times every stage and raises
    :class:`~cnp_core.errors.Cancelled` at stage and step boundaries once cancelled."""

    def __init__(
        self, progress: ProgressCallback | None, cancelled: Callable[[], bool] | None
    ) -> None:
        self._progress = progress or _ignore
        self.cancelled = cancelled
        self.timings: dict[str, float] = {}
        self._stage = ""
        self._started = 0.0

    def stage(self, name: str, message: str = "") -> None:
        self._close()
        self.check()
        self._stage, self._started = name, time.perf_counter()
        self._progress(name, STAGES[name], message or name)

    def within(self, fraction: float, message: str = "") -> None:
        """Progress inside the current stage (0..1 of it): a :data:`StepCallback`."""
        names = list(STAGES)
        start = STAGES[self._stage]
        nxt = names.index(self._stage) + 1
        end = STAGES[names[nxt]] if nxt < len(names) else 1.0
        self._progress(self._stage, start + (end - start) * fraction, message or self._stage)

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("the job was cancelled")

    def _close(self) -> None:
        if self._stage:
            self.timings[self._stage] = round(time.perf_counter() - self._started, 3)

    def finish(self) -> None:
        self._close()
        self._stage = ""
        self._progress("done", 1.0, "done")
