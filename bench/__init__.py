"""Benchmarks (not tests): each module measures one claim side by side, prints a table with
the ratio, its target and PASS/MISS, and writes ``bench/results/<name>.json``.

Run one with ``python -m bench.<name> [--quick]``, or all with ``python -m bench.run_all``.

OpenMP threads sleep instead of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE``,
unless set otherwise; inherited by every child process: audit jobs, the server and its
workers). With torch's default spinning, a shared machine whose cores are busy with other
work makes the same audit 10-20x slower (measured: 82 s vs 4.4 s with 2 threads, 3.5 s
with 1) and a 512 x 512 ``eigh`` 5.2 s instead of 27 ms, which would measure the
neighbours, not cnp. The thread count itself stays torch's default. OpenMP reads the
variable when torch is first imported, so it is set here, before any benchmark imports it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
