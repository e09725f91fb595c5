"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Reference files of the scripted engine's tiny model and dataset (one set per module),
    under the root the module's servers allow."""
    from test_server_support import make_references

    root = tmp_path_factory.mktemp("refs")
    make_references(root)
    return root


@pytest.fixture
def one_thread():
    """One torch thread for the test: on shared cores, two OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The benchmark models that the science and end-to-end tests audit (cached by their
# parameters in .cnp/cache), largest first. Training runs on one thread, so on a fresh
# clone two of them train at once: on 2 cores that halves the wait.
BENCHMARKS = (
    {"image_size": 64},
    {"image_size": 64, "correlation": 0.5},
    {},
    {"correlation": 0.5},
    {"style": "text"},
)
# The four-valued tint benchmark of tests/test_multivalued.py (small: it trains in the
# pool's last round, beside the text benchmark).
TINT_QUICK = {
    "style": "tint",
    "tint_values": 4,
    "image_size": 32,
    "seed": 2,
    "train_sizes": (100, 200),
    "val_per_class": 24,
    "test_per_class": 40,
    "epochs": 8,
}
BENCHMARKS += (TINT_QUICK,)


@pytest.fixture(scope="session")
def benchmarks():
    """Every model of BENCHMARKS trained (or found in the cache); tests then call
    ``ensure_benchmark`` with the same parameters and find it there."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from cnp_core.synthetic import ensure_benchmark

    workers = min(2, os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(ensure_benchmark, **params) for params in BENCHMARKS]
        return [future.result() for future in futures]


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster for the session; tests make their own databases."""
    from postgres import PostgresCluster

    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()
