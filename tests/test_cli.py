"""The cnp CLI without a server: flags -> AuditSpec, exit codes, checks done before any call."""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import grpc
import pytest
from test_layering import spec_fields  # the spec's dotted field names

from cnp.v1 import spec_pb2
from cnp_client.cli import (
    BAD_INPUT_CODES,
    EXIT_BAD_INPUT,
    EXIT_UNAVAILABLE,
    _Display,
    build_parser,
    exit_code_for,
    main,
)
from cnp_client.spec_flags import SPEC_FLAGS, SpecError, spec_from_args
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
    with pytest.raises(SpecError, match=f"{', '.join(flags[::2])}: pruning flags need --prune"):
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
        (["--gate", "max_ap_attribute<=high"], 'RULE      := ["warn:"] [SCOPE'),
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


# --- version, help, and the flag table ------------------------------------------------------


def test_version_names_the_package_and_the_api(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"cnp {metadata.version('cnp-audit')} (API cnp.v1)"
    assert spec_pb2.DESCRIPTOR.package == "cnp.v1"  # the API the version line names


def test_every_spec_field_has_a_flag_and_every_flag_a_field():
    fields = spec_fields()
    # The walk sees nested and newer fields: the class names among them.
    assert {"prune.rate", "model.classes", "positive_class_name"} <= set(fields)
    covered = [name for flag in SPEC_FLAGS for name in flag.fields]
    assert sorted(covered) == sorted(set(covered)), "a field with two flags"
    assert set(fields) - set(covered) == set(), "spec fields without a flag"
    assert set(covered) - set(fields) == set(), "flags for fields the spec lacks"
    audit = subcommands()["audit"]
    flags = {option for action in audit._actions for option in action.option_strings}
    assert {flag.flag for flag in SPEC_FLAGS} <= flags


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_every_flag_has_help_and_shows_its_default():
    undocumented = []
    for name, parser in subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"cnp {name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                undocumented.append(f"{label}: no help")
            elif action.option_strings and "(default: " not in action.help:
                undocumented.append(f"{label}: no default shown")
    assert undocumented == []
    # The defaults shown are the library's (the argparse defaults are None, so that a
    # flag left out does not override a --spec file).
    text = subcommands()["audit"].format_help()
    assert "(default: 0.8)" in text and "(default: 4,8)" in text
    assert "(default: 0.5,0.5,0.5)" in text and "epsilon_plus_flat" in text


# --- class flags, MLflow flags --------------------------------------------------------------


def test_classes_by_name_or_index(tmp_path):
    spec = parse_spec("--classes", "plain, ring", "--positive-class", "ring")
    assert spec.model.classes == ["plain", "ring"]
    assert (spec.positive_class, spec.positive_class_name) == (AuditSpec().positive_class, "ring")
    assert spec.validate().class_indices(spec.model.classes) == (1, -1)
    spec = parse_spec("--positive-class", "0", "--negative-class", "1")
    assert (spec.positive_class, spec.positive_class_name) == (0, "")
    assert (spec.negative_class, spec.negative_class_name) == (1, "")
    names = tmp_path / "classes.txt"
    names.write_text("dugong, sea cow\nwhale\n\n")
    spec = parse_spec("--classes", f"@{names}", "--negative-class", "dugong, sea cow")
    assert spec.model.classes == ["dugong, sea cow", "whale"]
    assert spec.negative_class_name == "dugong, sea cow"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tag", "no-equals-sign"], "argument --tag: expected KEY=VALUE, got 'no-equals-sign'"),
        (["--tag", "=value"], "expected KEY=VALUE"),
        (["--tag", "ci=1", "--tag", "ci=2"], "--tag ci: given twice"),
        (["--classes", "@missing.txt"], "missing.txt: No such file or directory"),
        (["--classes", " , "], "no class names"),
        (["--warn", "worst_group_accuracy>>0.7"], "cannot read the reference '>0.7'"),
        (["--summary"], "$GITHUB_STEP_SUMMARY, which is not set"),
    ],
)
def test_bad_new_flags_exit_2_before_contacting_the_server(
    tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    with listening_socket() as (server, address):
        assert main(["audit", "--server", address, *BASE, *extra]) == EXIT_BAD_INPUT
        assert_no_connection(server)
    assert message in capsys.readouterr().err


def test_model_uris_are_sent_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("models:/shapes/3", "models:/shapes@champion", "runs:/" + "a" * 32 + "/model"):
        assert parse_spec("--weights", uri).model.weights == uri
    assert parse_spec("--weights", "w/m.pt").model.weights == str(tmp_path / "w" / "m.pt")


def test_watch_help_says_what_an_interrupt_does(capsys):
    assert main(["watch", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "Ctrl-C or SIGTERM stops watching and exits 130 (--wait-timeout: 3), and the audit "
        "keeps running on the server, unless --cancel-on-interrupt" in text
    )
    assert "--cancel-on-interrupt on Ctrl-C, SIGTERM or --wait-timeout cancel the audit" in text
    assert "watching stops and the audit keeps running, unless --cancel-on-interrupt" in text
