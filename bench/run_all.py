"""Run every benchmark, print one summary table, write ``bench/results/summary.json``.

    python -m bench.run_all [--quick] [--only lrp_collection,drsa]

``make bench`` runs this. The benchmarks run one after the other in this process (the
audits of service_overhead, scale and memory in child processes); memory reuses the 1x
and 8x audits that scale measured. A benchmark that fails is reported as ERROR and the
others still run. ``--quick`` is a smoke run on tiny sizes (results in ``*.quick.json``).
"""

from __future__ import annotations

import importlib
import time
import traceback
from typing import Any

from . import common

BENCHMARKS = (
    "lrp_collection",
    "drsa",
    "pruned_latency",
    "service_overhead",
    "scale",
    "memory",
    "audit_speed",
    "submissions",
)


def summary_table(records: dict[str, dict[str, Any]], seconds: float) -> str:
    rows = [("benchmark", "check", "measured", "target", "", "time")]
    for name, record in records.items():
        if "error" in record:
            rows.append((name, record["error"][:60], "", "", "ERROR", ""))
            continue
        for i, check in enumerate(record["checks"]):
            unit = check["unit"]
            rows.append(
                (
                    name if i == 0 else "",
                    check["name"],
                    f"{check['value']:.3f}{unit}",
                    f"{check['op']} {check['target']:g}{unit}",
                    check["verdict"],
                    f"{record['seconds']:.0f} s" if i == 0 else "",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    passed = sum(c["passed"] for r in records.values() for c in r.get("checks", []))
    total = sum(len(r.get("checks", [])) for r in records.values())
    errors = sum("error" in r for r in records.values())
    title = f"Summary: {passed}/{total} targets met" + (f", {errors} errors" if errors else "")
    title += f"; total {seconds:.0f} s ({seconds / 60:.1f} min)"
    return "\n".join([title, "=" * len(title), *lines])


def run(quick: bool = False, write: bool = True, only: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmarks (all, or ``only``) and return the summary record."""
    names = [n for n in BENCHMARKS if not only or n in only]
    unknown = set(only or []) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
    started = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        module = importlib.import_module(f"bench.{name}")
        began = time.perf_counter()
        try:
            records[name] = module.run(quick=quick, write=write)
        except Exception as err:  # keep going: one broken benchmark must not hide the rest
            traceback.print_exc()
            records[name] = {
                "error": f"{type(err).__name__}: {err}",
                "seconds": time.perf_counter() - began,
            }
    seconds = time.perf_counter() - started
    table = summary_table(records, seconds)
    print("\n" + table, flush=True)
    summary = {
        "quick": quick,
        "seconds": round(seconds, 1),
        "machine": common.machine_info(),
        "passed": all(r.get("passed", False) for r in records.values()),
        "benchmarks": {
            name: {k: r[k] for k in ("checks", "seconds", "passed", "error") if k in r}
            for name, r in records.items()
        },
        "table": table.splitlines(),
    }
    if write:
        path = common.write_json(common.result_path("summary", quick), summary)
        print(f"written: {path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    run(args.quick, not args.no_write, only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
