"""The Ray executor (``executor = "ray"``) on a real Ray head started on this machine.

One head (2 CPUs, ``tests/`` on its workers' ``PYTHONPATH`` for the scripted engine)
and one ``cnp-server`` on it with two slots serve the server tests: jobs run in Ray
actors (not in children of the server), succeed with their stages and artifacts, are
cancelled cooperatively or killed after the grace period, fail on a stage timeout; a
job whose actor process is killed with SIGKILL fails with Ray's reason while the next
job still runs; on stop a running job is re-queued and its actor ends. A server whose
Ray head is unreachable refuses to start, and one without ``ray_address`` starts Ray
itself and runs the real engine in it. Fast tests: the errors a dead actor leaves
(Ray's own exception classes, built as Ray builds them) and what an actor asks for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_server_support import TESTS, ServerProcess, make_spec, prune_spec, wait_for

from cnp_client import AuditClient
from cnp_server.jobs import QUEUED
from cnp_server.store import JobStore

sys.path.insert(0, str(TESTS.parent))  # bench/ is a folder of the repository, not a package
from bench.audits import QUICK  # noqa: E402
from bench.ray_overhead import RayHead, free_port  # noqa: E402


@pytest.fixture(scope="module")
def head():
    ray_head = RayHead(num_cpus=2, pythonpath=[TESTS]).start()
    yield ray_head
    ray_head.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, head, refs):
    process = ServerProcess(
        tmp_path_factory.mktemp("data"),
        [refs],
        settings={
            "executor": "ray",
            "ray_address": head.address,
            "workers": 2,
            "stage_timeouts": {"default": 3600, "hang": 1.0},
            "drain_seconds": 1,
        },
        args=["--no-tracking"],
    ).start(timeout=120)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    with AuditClient(server.address, token=server.token, timeout=20) as c:
        yield c


def _actor_pid(server: ServerProcess, audit_id: str) -> int:
    """The pid of the Ray worker process that runs the job (from the server's log)."""
    pattern = re.compile(
        rf"job {audit_id} attempt \d+ started in a pre-warmed Ray actor: pid (\d+)"
    )
    found = wait_for(lambda: pattern.search(server.log), timeout=30)
    return int(found.group(1))


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_job_runs_in_a_ray_actor_with_its_stages_and_artifacts(client, server, head, refs):
    gate = refs / "gate-success"
    spec = make_spec(refs, f"hold:collect:{gate};stage:fit:3", prune=prune_spec())
    job = client.submit(spec)
    wait_for(lambda: client.get(job.id).stage == "collect", timeout=30)
    pid = _actor_pid(server, job.id)
    # A process of the Ray head (a child of its raylet), not of the server.
    assert head.process.pid in _ancestors(pid)
    assert server.process.pid not in _ancestors(pid)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::JobActor")
    gate.touch()
    updates = list(client.watch(job.id))
    assert updates[-1].state == "SUCCEEDED" and updates[-1].progress == 1.0
    assert {u.stage for u in updates} >= {"collect", "fit", "report"}
    assert {a.name for a in client.artifacts(job.id)} == {
        "audit_table",
        "heatmap:wm=1:layer",
        "model_compact",
        "report.json",
    }
    report = client.report(job.id)
    assert report.flagged() == {"wm=1@layer": 1, "wm=0@layer": -1}
    assert report.proto.pruning.filters_removed == 19
    stored = json.loads((server.data_dir / "jobs" / job.id / "report.json").read_text())
    assert stored["audit_id"] == job.id
    wait_for(lambda: not _alive(pid), timeout=15)  # one job per actor: killed once it ended


@pytest.mark.slow
def test_cancel_cooperative_and_of_a_job_that_ignores_it(client, refs):
    polite = client.submit(make_spec(refs, "sleep:300"))
    stubborn = client.submit(make_spec(refs, "stubborn:300"))
    for job in (polite, stubborn):  # two slots: both run at once
        wait_for(lambda job=job: client.get(job.id).stage == "work", timeout=30)
    started = time.monotonic()
    client.cancel(polite.id)
    client.cancel(stubborn.id)
    final = client.wait(polite.id, timeout=30)
    assert final.state == "CANCELLED" and final.error_code == "CANCELLED"
    assert time.monotonic() - started < 5  # the actor's next step saw the flag
    final = client.wait(stubborn.id, timeout=30)
    assert final.state == "CANCELLED" and final.error_message == "cancelled (terminated)"
    assert 2.0 <= time.monotonic() - started < 15  # grace 2 s, then ray.kill


@pytest.mark.slow
def test_a_stage_over_its_time_limit_fails_with_deadline_exceeded(client, refs):
    job = client.wait(client.submit(make_spec(refs, "stage:hang:300")).id, timeout=60)
    assert job.state == "FAILED" and job.error_code == "DEADLINE_EXCEEDED"
    assert "'hang'" in job.error_message and "1 s" in job.error_message


@pytest.mark.slow
def test_a_killed_actor_process_fails_its_job_and_the_next_job_runs(client, server, refs):
    job = client.submit(make_spec(refs, "sleep:300"))
    wait_for(lambda: client.get(job.id).stage == "work", timeout=30)
    os.kill(_actor_pid(server, job.id), signal.SIGKILL)
    failed = client.wait(job.id, timeout=30)
    assert failed.state == "FAILED" and failed.error_code == "INTERNAL"
    assert failed.error_message.startswith("the Ray worker process running the job died")
    assert "its worker process has died" in failed.error_message  # Ray's reason
    assert "/" not in failed.error_message  # no paths of the Ray session
    following = client.wait(client.submit(make_spec(refs, "sleep:2")).id, timeout=60)
    assert following.state == "SUCCEEDED" and following.attempt == 1


@pytest.mark.slow
def test_an_unreachable_ray_head_stops_the_server_at_start(tmp_path, refs):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    server = ServerProcess(
        tmp_path / "data",
        [refs],
        settings={"executor": "ray", "ray_address": address},
        args=["--no-tracking"],
    )
    with pytest.raises(RuntimeError, match="exited with 2"):
        server.start(timeout=60)
    assert f"cannot reach the Ray cluster at ray_address='{address}'" in server.log
    assert "Traceback" not in server.log


@pytest.mark.slow
def test_stop_re_queues_a_running_job_and_ends_its_actor(client, server, refs):
    job = client.submit(make_spec(refs, "sleep:300"))
    wait_for(lambda: client.get(job.id).stage == "work", timeout=30)
    pid = _actor_pid(server, job.id)
    assert server.stop() == 0  # drains for 1 s, then interrupts the job
    store = JobStore(f"sqlite:///{server.data_dir / 'jobs.db'}")
    stored = store.get(job.id)
    store.close()
    assert stored.state == QUEUED and stored.message.startswith("re-queued: the server shut")
    wait_for(lambda: not _alive(pid), timeout=15)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile
    return found


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_a_real_audit_in_the_ray_instance_the_server_starts(tmp_path, monkeypatch):
    """``ray_address`` empty: the server starts Ray itself and stops it on shutdown; the
    real engine (torch, the pipeline) runs in its actor, on the tiny watermark benchmark."""
    from cnp_core.synthetic import ensure_benchmark

    bench = ensure_benchmark()
    ray_tmp = Path(tempfile.mkdtemp(prefix="cnp-ray-", dir="/tmp"))  # short socket paths
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    real = ServerProcess(
        tmp_path / "data",
        [bench.dataset.parent],
        engine="cnp_server.engine",
        settings={"executor": "ray"},
        args=["--no-tracking"],
    )
    try:
        real.start(timeout=120)
        with AuditClient(real.address, token=real.token, timeout=60) as c:
            report = c.audit(bench.audit_spec(**QUICK), timeout=300)
        assert real.stop() == 0
        assert not _processes_mentioning(str(ray_tmp))  # Ray went with the server
    finally:
        real.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    data = report.to_dict()
    assert data["attributes"][0]["attribute"] == bench.attribute
    assert set(data["timings"]) >= {"load", "collect", "fit", "audit"}
    assert "cluster: started in this process" in real.log
    assert "started in a pre-warmed Ray actor" in real.log


# --- fast: no Ray cluster ----------------------------------------------------------------


def _died(message: str, **context) -> BaseException:
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    return ActorDiedError(
        ActorDiedErrorContext(
            error_message=message, class_name="JobActor", actor_id=b"\x01" * 16, pid=7, **context
        )
    )


def test_a_dead_actor_leaves_an_error_with_rays_reason_and_no_paths():
    from ray.core.generated.common_pb2 import NodeDeathInfo
    from ray.exceptions import ActorDiedError, RayTaskError

    from cnp_server.ray_executor import worker_died

    oom = _died(
        "The actor is dead because its worker process has died. Worker exit type: "
        "NODE_OUT_OF_MEMORY Worker exit detail: Task was killed due to the node running low "
        "on memory. The top 10 memory consumers are: PID 5 /usr/bin/python 20GB. Refer to "
        "the documentation on how to address the out of memory issue"
    )
    code, message, details = worker_died(oom)
    assert code == "RESOURCE_EXHAUSTED" and "ran out of memory" in message
    assert json.loads(details)["reason"] == "OUT_OF_MEMORY"

    preempted = NodeDeathInfo(reason=NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED)
    for lost in (
        _died("The actor died because its node has died. Node Id: ab12"),
        _died("The actor died.", node_death_info=preempted),
    ):
        code, message, details = worker_died(lost)
        assert code == "UNAVAILABLE" and "node running the job was lost" in message
        assert json.loads(details)["retry_after"] > 0  # another node can run it

    traceback = (
        'Traceback (most recent call last):\n  File "/srv/app/cnp_server/ray_executor.py", '
        "line 80, in __init__\n    import engine\nModuleNotFoundError: No module named 'engine'"
    )
    start_failed = ActorDiedError(
        RayTaskError("JobActor.__init__", traceback, ModuleNotFoundError(), pid=3, ip="10.0.0.1")
    )
    code, message, _ = worker_died(start_failed)
    assert code == "INTERNAL"
    assert message == (
        "the Ray worker could not start the job's actor: "
        "ModuleNotFoundError: No module named 'engine'"
    )

    crashed = _died(
        "The actor is dead because its worker process has died. Worker exit detail: a "
        "segfault in /usr/lib/x86_64-linux-gnu/libc.so.6. Some common causes include: ..."
    )
    code, message, _ = worker_died(crashed)
    assert code == "INTERNAL" and message.startswith("the Ray worker process running the job died")
    assert "segfault in <path>" in message and "common causes" not in message
    assert "/" not in message and "10.0.0.1" not in message


def _nodes(*resources: dict, dead: dict | None = None) -> list[dict]:
    """Nodes as ``ray.nodes()`` lists them."""
    alive = [{"Alive": True, "Resources": r} for r in resources]
    return alive + ([{"Alive": False, "Resources": dead}] if dead else [])


def test_slots_and_actors_follow_the_gpus_else_share_the_cpus():
    from cnp_server.ray_executor import plan

    head = {"CPU": 0, "node:__internal_head__": 1}  # KubeRay's head runs no jobs
    gpus = _nodes(head, {"CPU": 16, "GPU": 2}, {"CPU": 8, "GPU": 1}, dead={"GPU": 4})
    assert plan(gpus, workers=0) == (3, {"num_gpus": 1, "num_cpus": 8})
    assert plan(gpus, workers=1) == (1, {"num_gpus": 1, "num_cpus": 8})
    cpus = _nodes(head, {"CPU": 8}, {"CPU": 4})
    assert plan(cpus, workers=0) == (1, {"num_cpus": 8})  # at most one node's
    assert plan(cpus, workers=4) == (4, {"num_cpus": 3})
    assert plan(cpus, workers=50) == (50, {"num_cpus": 1})
    # Workers not there yet: no actor (one asking for a CPU would miss the GPU later).
    assert plan(_nodes(head), workers=0) == (1, None)


def test_a_malformed_ray_address_is_a_configuration_error():
    from cnp_server.config import ConfigError
    from cnp_server.ray_executor import connect

    with pytest.raises(ConfigError, match="ray_address must be HOST:PORT"):
        connect("head-without-port")
