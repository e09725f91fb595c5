"""The cnp CLI without a server: flags -> AuditSpec, exit codes, checks done before any call."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from cnp_client.cli import (
    BAD_INPUT_CODES,
    EXIT_BAD_INPUT,
    EXIT_UNAVAILABLE,
    CliError,
    _Display,
    build_parser,
    exit_code_for,
    main,
    spec_from_args,
)
from cnp_core.spec import AuditSpec, PruneSpec

BASE = [
    "--model", "resnet18", "--weights", "model.safetensors", "--num-classes", "2",
    "--dataset", "data", "--input-size", "64", "--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.2",
    "--layer", "layer3", "--attribute", "watermark",
]  # fmt: skip


def parse_spec(*extra: str) -> AuditSpec:
    return spec_from_args(build_parser().parse_args(["audit", *BASE, *extra]))


def test_flags_become_the_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(
        "--layer", "layer4", "--attribute", "sex", "--positive-class", "0",
        "--subspaces", "2,4", "--subspaces", "8", "--method", "prca", "--bootstrap", "0",
        "--device", "cuda:0", "--seed", "7",
        "--prune", "lrp", "--prune-rate", "0.2", "--prune-schedule", "iterative", "--prune-steps", "3",
        "--finetune-epochs", "2", "--prune-attribute", "watermark",
    )  # fmt: skip
    assert spec.validate() is spec
    # Paths are made absolute before they are sent: the server checks its allowed roots.
    assert spec.model.weights == str(tmp_path / "model.safetensors")
    assert spec.dataset.root == str(tmp_path / "data")
    assert (spec.model.architecture, spec.model.factory, spec.model.num_classes) == (
        "resnet18",
        "",
        2,
    )
    assert spec.dataset.mean == (0.5, 0.4, 0.3) and spec.dataset.std == (0.2, 0.2, 0.2)
    assert spec.layers == ["layer3", "layer4"] and spec.attributes == ["watermark", "sex"]
    assert spec.n_subspaces == [2, 4, 8] and spec.method == "prca" and spec.positive_class == 0
    assert (spec.bootstrap, spec.device, spec.seed) == (0, "cuda:0", 7)
    prune = spec.prune
    assert (prune.method, prune.rate, prune.schedule, prune.steps) == ("lrp", 0.2, "iterative", 3)
    assert (prune.finetune_epochs, prune.attribute) == (2, "watermark")


def test_flags_for_image_cap_reference_set_and_pruning_rules():
    spec = parse_spec(
        "--max-pixels", "1000000", "--prune", "cnp", "--reference-per-class", "8",
        "--prune-composite", "epsilon", "--learning-rate", "0.01", "--relearn-subspaces",
        "--keep-projection",
    )  # fmt: skip
    assert spec.validate() is spec and spec.dataset.max_pixels == 1_000_000
    prune = spec.prune
    assert (prune.reference_per_class, prune.composite) == (8, "epsilon")
    assert (prune.learning_rate, prune.relearn_subspaces, prune.keep_projection) == (
        0.01,
        True,
        True,
    )
    assert parse_spec("--prune", "cnp").prune.keep_projection is True  # the default
    assert parse_spec("--prune", "cnp", "--no-keep-projection").prune.keep_projection is False
    assert spec.composite == AuditSpec().composite  # the audit's rules stay apart


@pytest.mark.parametrize(
    "flags",
    [["--reference-per-class", "8"], ["--prune-steps", "2", "--prune-composite", "epsilon"]],
)
def test_every_pruning_flag_needs_prune(flags):
    with pytest.raises(CliError, match=f"{', '.join(flags[::2])}: pruning flags need --prune"):
        parse_spec(*flags)


def test_unset_flags_keep_library_defaults():
    spec, default = parse_spec(), AuditSpec()
    assert spec.prune is None
    for name in ("method", "n_subspaces", "score", "bootstrap", "min_group_size", "seed", "device"):
        assert getattr(spec, name) == getattr(default, name), name
    spec = parse_spec("--prune", "cnp")
    assert spec.prune.rate == PruneSpec().rate and spec.prune.schedule == "oneshot"
    factory = spec_from_args(
        build_parser().parse_args(
            [
                "audit",
                "--factory",
                "pkg.mod:make",
                "--dataset",
                "d",
                "--layer",
                "l",
                "--attribute",
                "a",
            ]
        )
    )
    assert factory.model.factory == "pkg.mod:make" and factory.model.weights == ""


@contextlib.contextmanager
def listening_socket():
    """A loopback port that records whether anything connected to it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        yield server, f"127.0.0.1:{server.getsockname()[1]}"


def assert_no_connection(server: socket.socket) -> None:
    time.sleep(0.05)
    with pytest.raises(BlockingIOError):
        server.accept()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--positive-class", "5"], "positive_class 5 is not a class"),
        (["--prune", "cnp", "--prune-rate", "1.5"], "prune.rate must lie strictly between 0 and 1"),
        (["--prune-rate", "0.2"], "need --prune"),
        (["--gate", "max_ap_attribute<=high"], "RULE      := [SCOPE"),
        (["--gate", "worst_group_accuracy>=baseline-0.02"], "add --baseline-report"),
        (["--gate", "after.balanced_accuracy>=0.9"], "add --prune"),
        (["--download-model", "m.safetensors"], "--download-model needs --prune"),
        (["--baseline-report", "missing.json"], "--baseline-report missing.json"),
        (["--token-file", "missing-token"], "token file not found"),
    ],
)
def test_bad_input_exits_2_before_contacting_the_server(
    tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(tmp_path)
    with listening_socket() as (server, address):
        assert main(["audit", "--server", address, *BASE, *extra]) == EXIT_BAD_INPUT
        assert_no_connection(server)
    assert message in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main(["audit", *BASE, "--mean", "0.5,0.5"]) == EXIT_BAD_INPUT
    assert "expected three numbers R,G,B" in capsys.readouterr().err
    assert main(["audit", *BASE, "--subspaces", "four"]) == EXIT_BAD_INPUT
    assert main(["frobnicate"]) == EXIT_BAD_INPUT


def test_help_documents_exit_codes_and_gates(capsys):
    assert main(["audit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes (stable; CI relies on them)" in out
    assert "2  bad input or configuration" in out and "3  server unavailable" in out
    assert "max_ap_attribute" in out and "baseline [(+|-|*) NUMBER]" in out


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_exit_code_for_every_status(code):
    expected = 0 if code is grpc.StatusCode.OK else 2 if code.name in BAD_INPUT_CODES else 3
    assert (
        exit_code_for(code) == exit_code_for(code.name) == exit_code_for(code.value[0]) == expected
    )
    if code.name in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAUTHENTICATED"):
        assert expected == 2
    if code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "RESOURCE_EXHAUSTED"):
        assert expected == 3


def test_no_server_exits_3(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as probe:  # a free loopback port: nothing listens there
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    code = main(["audit", "--server", address, "--timeout", "1", "--retries", "0", *BASE])
    assert code == EXIT_UNAVAILABLE
    assert time.monotonic() - started < 15
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert not Path(tmp_path, ".cnp").exists()  # nothing written on failure


def test_plain_progress_prints_one_line_per_stage_or_message(capsys):
    display = _Display("aud-1", plain=True)
    display.update("", 0.0, "", "QUEUED")
    for fraction in (0.0, 0.25, 0.5):  # ticks of one stage and message: one line
        display.update("load", fraction, "reading images", "RUNNING")
    display.update("fit", 0.1, "restart 1 of 3", "RUNNING")
    display.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("aud-1 queued:   0%")
    assert lines[1].endswith("aud-1 load:   0% reading images")
    assert lines[2].endswith("aud-1 fit:  10% restart 1 of 3")


def test_missing_token_file_from_the_environment_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("CNP_TOKEN", raising=False)
    monkeypatch.setenv("CNP_TOKEN_FILE", "/nonexistent/token")
    assert main(["jobs", "--server", "127.0.0.1:1"]) == EXIT_BAD_INPUT
    assert "token file not found (CNP_TOKEN_FILE): /nonexistent/token" in capsys.readouterr().err


def test_cli_runs_without_torch_or_numpy():
    """CI images install the client only: the CLI, gates and reports need neither."""
    script = (
        "import sys\n"
        "sys.modules['torch'] = sys.modules['numpy'] = None  # importing them now fails\n"
        "from cnp_client.cli import main\n"
        "from cnp_client import gates, reports\n"
        f"sys.exit(main(['audit', *{BASE!r}, '--positive-class', '3']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "positive_class 3 is not a class of a 2-class model" in result.stderr
