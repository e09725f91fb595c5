"""Faults inside a job, against a real ``cnp-server`` (scripted engine): a job that needs
more memory than its worker may have, a worker the kernel kills, a full disk. Each ends
as a FAILED job with RESOURCE_EXHAUSTED and a message that says what happened, and the
server goes on running the next job.
"""

from __future__ import annotations

import pytest
from test_server_support import ServerProcess, make_references, make_spec

from cnp_client import AuditClient

pytestmark = pytest.mark.slow

# Room for the scripted worker's own imports and job, none for 4 GB more.
WORKER_MEMORY = 3 << 29


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    make_references(root)
    return root


@pytest.fixture(scope="module")
def client(tmp_path_factory, refs):
    server = ServerProcess(
        tmp_path_factory.mktemp("data"),
        [refs],
        settings={"worker_memory_bytes": WORKER_MEMORY},
        args=["--no-tracking"],
    ).start()
    with AuditClient(server.address, token=server.token, timeout=20) as c:
        yield c
    server.stop()


@pytest.mark.parametrize(
    ("script", "fragment"),
    [
        ("alloc:4e9", "ran out of memory (the worker's limit, worker_memory_bytes"),
        ("sigkill", "killed by the kernel (SIGKILL), most likely out of memory"),
        ("diskfull", "no space left on the server's disk"),
    ],
)
def test_a_job_out_of_memory_or_disk_fails_with_resource_exhausted(client, refs, script, fragment):
    job = client.wait(client.submit(make_spec(refs, script)).id, timeout=120)
    assert (job.state, job.error_code) == ("FAILED", "RESOURCE_EXHAUSTED")
    assert fragment in job.error_message and "Traceback" not in job.error_message
    assert client.wait(client.submit(make_spec(refs)).id, timeout=120).succeeded  # next one runs
