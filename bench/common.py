"""Shared by the benchmarks: interleaved timing, PASS/MISS checks, the table, the JSON record.

These machines are noisy (shared cores, other jobs), so every comparison is run side by
side in one process: the contenders alternate (A, B, A, B, ...) after a warm-up round,
and the medians of their repeats are compared as a ratio.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"


# ------------------------------------------------------------------------------ timing


def interleaved(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds of each contender over ``repeats`` rounds, run in turn (A, B, A, B...).

    ``warmup`` untimed rounds come first (lazy initialisation, allocator, caches).
    Alternating spreads the machine's slow phases over all contenders alike. When ``cpu``
    is given it receives the CPU seconds of this process per run (all threads): less
    sensitive than wall time to other programs taking the cores.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (seconds or any unit)."""
    return {"median": median(values), "min": float(min(values)), "max": float(max(values))}


# ------------------------------------------------------------------------------ checks


@dataclass
class Check:
    """One measured figure against its target: ``value <op> target``."""

    name: str
    value: float
    op: str  # "<=" or ">="
    target: float
    unit: str = "x"
    note: str = ""
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"op must be <= or >=, got {self.op!r}")
        self.passed = self.value <= self.target if self.op == "<=" else self.value >= self.target

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "MISS"


def format_table(title: str, checks: Sequence[Check]) -> str:
    """A fixed-width table: check, measured, target, PASS/MISS, note."""
    rows = [("check", "measured", "target", "", "note")]
    for c in checks:
        rows.append(
            (c.name, f"{c.value:.3f}{c.unit}", f"{c.op} {c.target:g}{c.unit}", c.verdict, c.note)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [title, "-" * len(title)]
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(4)]
        lines.append("  ".join(cells + [r[4]]).rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------ records


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where the figures came from: CPU, cores, threads, accelerator, versions, date."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp": {k: os.environ.get(k, "") for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": _git_commit(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class BenchResult:
    """What a benchmark returns and writes: its checks, its figures and the machine."""

    name: str
    title: str
    checks: list[Check]
    details: dict[str, Any]
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    quick: bool = False

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def table(self) -> str:
        return format_table(f"{self.title} ({self.seconds:.0f} s)", self.checks)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for check, record in zip(self.checks, out["checks"], strict=True):
            record["verdict"] = check.verdict
        out["passed"] = self.passed
        return out


def results_dir() -> Path:
    """``$CNP_BENCH_RESULTS``, else ``bench/results``."""
    return Path(os.environ.get("CNP_BENCH_RESULTS") or RESULTS)


def result_path(name: str, quick: bool = False, device: str = "cpu") -> Path:
    """``<results>/<name>[.cuda][.quick].json``: GPU figures and smoke runs never overwrite
    the CPU figures."""
    suffix = (".cuda" if device.startswith("cuda") else "") + (".quick" if quick else "")
    return results_dir() / f"{name}{suffix}.json"


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (a ``.tmp`` sibling renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def write_result(result: BenchResult) -> Path:
    """Write the benchmark's record to :func:`result_path`."""
    device = str(result.machine.get("device", "cpu"))
    return write_json(result_path(result.name, result.quick, device), result.to_dict())


def _json_default(value: object) -> object:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


# ------------------------------------------------------------------------------ running


def spec_setting(text: str, *, prune: bool = False) -> tuple[str, Any]:
    """``FIELD=VALUE`` for a top-level AuditSpec field (with ``prune``, also
    ``prune.FIELD``), the value parsed by the field's default type (``--set``)."""
    import dataclasses

    from cnp_core.spec import AuditSpec, PruneSpec

    key, _, value = text.partition("=")
    owner, name = AuditSpec(), key
    if prune and key.startswith("prune."):
        owner, name = PruneSpec(), key.removeprefix("prune.")
    names = {f.name for f in dataclasses.fields(owner)} - {"model", "dataset", "prune"}
    if name not in names or not value:
        wanted = "an AuditSpec field" + (" or prune.FIELD" if prune else "")
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE of {wanted}, got {text!r}")
    default = getattr(owner, name)
    if isinstance(default, list):  # n_subspaces (numbers) or layers (names)
        items = value.split(",")
        return key, [int(v) for v in items] if all(v.isdigit() for v in items) else items
    if isinstance(default, bool):
        return key, value.lower() in ("1", "true", "yes")
    return key, type(default)(value)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's own choice)"
    )
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/*.json")
    return p


def set_threads(threads: int) -> None:
    """torch threads here and, through ``OMP_NUM_THREADS`` (which torch reads at start-up),
    in every child process: audit jobs, the server and its workers. 0: leave the default."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def report(result: BenchResult, write: bool = True) -> dict[str, Any]:
    """Print the benchmark's table, write its JSON (unless ``write`` is false), return the record."""
    print(result.table(), flush=True)
    record = result.to_dict()
    if write:
        path = write_result(result)
        record["written"] = str(path)
        print(f"written: {record['written']}", flush=True)
    return record


def timed(run: Callable[..., BenchResult], **options: Any) -> BenchResult:
    """``run(**options)`` with its wall time and the machine record filled in."""
    started = time.perf_counter()
    result = run(**options)
    result.seconds = round(time.perf_counter() - started, 1)
    result.machine = machine_info(options.get("device", "cpu"))
    result.quick = bool(options.get("quick", False))
    return result


def main(run: Callable[..., dict[str, Any]], doc: str, argv: list[str] | None = None) -> int:
    """The command line of a benchmark whose ``run(quick, write)`` measures and reports."""
    args = parser(doc.splitlines()[0]).parse_args(argv)
    set_threads(args.threads)
    run(args.quick, not args.no_write)
    return 0
