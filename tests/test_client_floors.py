"""The client at the lowest versions pyproject allows: installed from the registry into a
fresh venv, then used against a real ``cnp-server``.

The floors are read from pyproject.toml, so this test and the dependency list cannot
disagree. The project goes in with ``--no-deps`` from a wheel built here: only the
floors are there, and torch is not (the client install is torch-free).
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from test_server_support import REPO, ServerProcess, make_references

STUBS = REPO / "proto" / "cnp" / "v1"
PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input")
# What the wheel is built from (the checkout without its venv, caches and test data).
SOURCES = ("pyproject.toml", "README.md", "cnp_core", "server", "client", "proto")


def base_floors() -> dict[str, str]:
    """Each base dependency's ``>=`` floor, by distribution name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        lows = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{line!r}: a base dependency needs exactly one >= floor"
        caps = [str(s) for s in requirement.specifier if s.operator != ">="]
        assert not caps, f"{line!r}: no upper caps on the client's dependencies ({caps})"
        floors[requirement.name] = lows[0]
    return floors


def test_the_floors_cover_what_the_generated_stubs_check():
    """grpcio and protobuf floors at least what the stubs check when they are imported."""
    floors = base_floors()
    grpc_needs = set()
    for stub in STUBS.glob("*_pb2_grpc.py"):
        grpc_needs |= set(re.findall(r"GRPC_GENERATED_VERSION = '([\d.]+)'", stub.read_text()))
    protobuf_needs = set()
    for stub in STUBS.glob("*_pb2.py"):
        found = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*[\w.]+,\s*(\d+),\s*(\d+),\s*(\d+),",
            stub.read_text(),
        )
        assert found, f"{stub.name}: no protobuf runtime check found"
        protobuf_needs.add(".".join(found.groups()))
    assert grpc_needs and protobuf_needs
    assert Version(floors["grpcio"]) >= max(map(Version, grpc_needs))
    assert Version(floors["protobuf"]) >= max(map(Version, protobuf_needs))
    assert {"grpcio-status", "googleapis-common-protos", "rich", "PyYAML"} <= set(floors)


# Runs inside the floors venv: both clients against the server, and the error details.
CLIENT_SCRIPT = r"""
import asyncio, json, sys
from importlib import metadata
import cnp_client, cnp_client.aio
from cnp_client import AsyncAuditClient, AuditClient, AuditSpec, DatasetRef, InvalidArgument, ModelRef

address, weights, data = sys.argv[1:4]  # the token comes in $CNP_TOKEN

def spec(script="layer", attributes=("wm",)):
    return AuditSpec(model=ModelRef(architecture="scripted", weights=weights),
                     dataset=DatasetRef(root=data, input_size=28), layers=[script],
                     attributes=list(attributes), bootstrap=0)

out = {"versions": {name: metadata.version(name) for name in json.loads(sys.argv[4])}}
with AuditClient(address) as client:
    out["blocking_version"] = client.metadata().version
    job = client.wait(client.submit(spec("sleep:2")).id, timeout=60)
    out["blocking_state"] = job.state
    out["blocking_report"] = client.report(job.id).audit_id == job.id
    out["watch_id"] = job.id
    try:
        client.submit(spec(attributes=["nope"]))
    except InvalidArgument as err:
        out["error"] = [err.code, err.reason, err.domain, bool(err.audit_id)]

async def use_asyncio():
    async with AsyncAuditClient(address) as client:
        out["async_version"] = (await client.metadata()).version
        job = await client.submit(spec("sleep:2"))
        out["async_states"] = [u.state async for u in client.watch(job.id)][-1:]
        out["async_report"] = (await client.report(job.id)).audit_id == job.id

asyncio.run(use_asyncio())
print(json.dumps(out))
"""


def _run(*command: str | Path, **options) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=240, **options
    )
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done


def _wheel(into: Path) -> Path:
    """The project's wheel, built from a copy so the checkout gets no build files."""
    source = into / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    _run(
        sys.executable,
        *PIP,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        into / "wheel",
        source,
    )
    (wheel,) = (into / "wheel").glob("cnp_audit-*.whl")
    return wheel


def _on_a_terminal(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``command`` with stderr on a pseudo-terminal (the CLI draws its rich bar there)."""
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # a full pty buffer would block the CLI
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=follower,
            env=env,
            timeout=120,
        )
    finally:
        os.close(follower)
    reader.join(timeout=10)
    os.close(leader)
    return done.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_the_client_works_at_its_lowest_versions(tmp_path):
    floors = base_floors()
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    pins = [f"{name}=={version}" for name, version in floors.items()]
    _run(python, *PIP, "install", "-q", "--only-binary=:all:", *pins)
    _run(python, *PIP, "install", "-q", "--no-deps", _wheel(tmp_path))
    _run(python, *PIP, "check")  # the floors satisfy what the installed project declares

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV"} and not k.startswith("CNP_")
    }
    no_torch = subprocess.run(
        [python, "-c", "import torch"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    refs = tmp_path / "refs"
    weights, data = make_references(refs)
    server = ServerProcess(tmp_path / "data", [refs], args=["--no-tracking"]).start()
    env["CNP_TOKEN"] = server.token
    try:
        script = tmp_path / "use_clients.py"
        script.write_text(CLIENT_SCRIPT)
        done = _run(
            python,
            script,
            server.address,
            weights,
            data,
            json.dumps(list(floors)),
            env=env,
            cwd=tmp_path,
        )
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert {name: Version(v) for name, v in out["versions"].items()} == {
            name: Version(v) for name, v in floors.items()
        }
        assert out["blocking_state"] == "SUCCEEDED" and out["blocking_report"]
        assert out["async_states"] == ["SUCCEEDED"] and out["async_report"]
        assert out["blocking_version"] == out["async_version"] != ""
        # google.rpc details decoded with the floor grpcio-status and common protos.
        code, reason, domain, has_audit_id = out["error"]
        assert code == "INVALID_ARGUMENT" and reason and domain == "cnp.v1" and has_audit_id

        cnp = bin_dir / "cnp"
        assert "audit" in _run(cnp, "--help", env=env, cwd=tmp_path).stdout
        info = _run(cnp, "info", "--server", server.address, env=env, cwd=tmp_path)
        assert json.loads(info.stdout)["version"] == out["blocking_version"]
        assert "\nmodel:" in _run(cnp, "spec", env=env, cwd=tmp_path).stdout  # PyYAML's floor
        code, screen = _on_a_terminal(
            [str(cnp), "watch", out["watch_id"], "--server", server.address],
            {**env, "TERM": "xterm-256color", "COLUMNS": "120"},
        )
        assert code == 0, screen
        assert "100%" in screen and "━" in screen  # rich drew its bar at the floor version
    finally:
        server.stop()
