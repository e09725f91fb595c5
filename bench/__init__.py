"""Benchmarks (not tests): each module measures one claim side by side, prints a table with
the ratio, its target and PASS/MISS, and writes ``bench/results/<name>.json``.

Run one with ``python -m bench.<name> [--quick]``, or all with ``python -m bench.run_all``.
"""
