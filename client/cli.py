"""The ``cnp`` command line: run concept audits against a server, as CI gates.

One command submits an audit (its spec from flags, from a YAML or JSON file, or both),
follows its progress, writes the canonical JSON report, a JUnit file and a Markdown
summary, applies the gate rules (:mod:`cnp_client.gates`) and exits with a code CI can rely
on (:data:`EXIT_CODES_HELP`).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from cnp.v1 import spec_pb2
from cnp_core.errors import CnpError
from cnp_core.spec import (
    AuditSpec,
)

from . import calls, reports
from .client import AuditClient, Job, Progress, ServiceError, code_name
from .gates import GRAMMAR, WARN, Check, GateError, Rule, all_passed, evaluate, parse_rule
from .spec_flags import SpecError, add_spec_flags, default_spec_text, spec_from_args

EXIT_PASS = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM

# gRPC codes a user or its configuration causes; retrying will not help. Every other
# code (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, ABORTED, ...) is an
# infrastructure failure that a retry may clear.
BAD_INPUT_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "UNIMPLEMENTED",
    }
)

_EXIT_CODES = """\
exit codes (stable; CI relies on them):
  0  the audit succeeded and every gate passed (warn: rules never fail it)
  1  a gate failed (the report, JUnit and summary files are still written)
  2  bad input or configuration: invalid flags, spec or spec file, malformed gate rule,
     missing token or baseline file; server answers INVALID_ARGUMENT, NOT_FOUND,
     ALREADY_EXISTS, FAILED_PRECONDITION, OUT_OF_RANGE, UNAUTHENTICATED,
     PERMISSION_DENIED, UNIMPLEMENTED; a job that FAILED with one of those codes (e.g. an
     unreadable file)
  3  server unavailable or infrastructure failure: UNAVAILABLE, DEADLINE_EXCEEDED,
     RESOURCE_EXHAUSTED (queue full), INTERNAL, ABORTED, UNKNOWN, DATA_LOSS; a job that
     FAILED with one of those or was CANCELLED elsewhere; --wait-timeout expired
  130 interrupted (Ctrl-C or SIGTERM); {interrupt}"""
EXIT_CODES_HELP = _EXIT_CODES.format(interrupt="the running job is cancelled first")
WATCH_EXIT_CODES_HELP = _EXIT_CODES.format(
    interrupt="watching stops and the audit keeps running,\n"
    "     unless --cancel-on-interrupt: then it is cancelled first"
)

DEFAULT_SERVER = "127.0.0.1:50051"
API_VERSION = spec_pb2.DESCRIPTOR.package  # "cnp.v1"
# `--summary` without a file: GitHub Actions' job summary of the current step.
STEP_SUMMARY = "$GITHUB_STEP_SUMMARY"
# The artifact `cnp report --format html` downloads (cnp_core.review.REVIEW_NAME; the
# client does not import the science library's plotting).
REVIEW_ARTIFACT = "review.html"


class CliError(Exception):
    """An error that ends the command with ``exit_code`` and a message on stderr."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_for(code: Any) -> int:
    """The exit code of a gRPC status (a ``grpc.StatusCode``, its name or its number)."""
    name = code_name(code)
    if name == "OK":
        return EXIT_PASS
    return EXIT_BAD_INPUT if name in BAD_INPUT_CODES else EXIT_UNAVAILABLE


def version_text() -> str:
    """``cnp 0.1.0 (API cnp.v1)``: the installed package and the API it speaks."""
    try:
        installed = metadata.version("cnp-audit")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        installed = "unknown"
    return f"cnp {installed} (API {API_VERSION})"


# --- arguments ---------------------------------------------------------------------------


def _tag(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--server",
        default=os.environ.get("CNP_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"server address (default: $CNP_SERVER, else {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--token-file",
        metavar="F",
        help="bearer token file (default: $CNP_TOKEN, else $CNP_TOKEN_FILE, else "
        "$CNP_DATA_DIR/token or .cnp/token when present)",
    )
    group.add_argument(
        "--tls-ca",
        "--ca-cert",
        dest="tls_ca",
        metavar="F",
        help="PEM root certificates of the server: connect with TLS (default: plaintext)",
    )
    group.add_argument(
        "--tls-cert",
        metavar="F",
        help="PEM client certificate, for a server that asks (mTLS) (default: none)",
    )
    group.add_argument(
        "--tls-key", metavar="F", help="PEM private key of --tls-cert (default: none)"
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="deadline of each call, in seconds (default: %(default)g)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="retries of a call on UNAVAILABLE (default: %(default)s)",
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gates and outputs")
    group.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="RULE",
        help="gate rule, e.g. 'max_ap_attribute<=0.8' or 'worst_group_accuracy.ci_low>=0.7'; "
        "a violated rule exits 1 (repeatable; grammar below) (default: none)",
    )
    group.add_argument(
        "--warn",
        action="append",
        default=[],
        metavar="RULE",
        help="a rule that is checked and reported (terminal, JUnit, summary) but never "
        "fails: the same as --gate 'warn:RULE' (repeatable) (default: none)",
    )
    group.add_argument(
        "--baseline-report",
        metavar="F",
        help="JSON report of a baseline model for 'baseline' rules (default: none)",
    )
    group.add_argument(
        "--json",
        metavar="F",
        help="write the canonical JSON report to F; '-': to stdout, and everything else to "
        "stderr (default: not written)",
    )
    group.add_argument(
        "--junit",
        metavar="F",
        help="write JUnit XML, one test case per check (default: not written)",
    )
    group.add_argument(
        "--summary",
        nargs="?",
        const=STEP_SUMMARY,
        metavar="F",
        help="write a Markdown summary for CI pages to F; without F, append it to "
        "$GITHUB_STEP_SUMMARY (GitHub Actions' job summary), as is any F that names that "
        "file (default: not written)",
    )
    group.add_argument(
        "--quiet",
        action="store_true",
        help="do not print the tables (default: print them to stdout, or to stderr with --json -)",
    )


def _audit_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("spec file")
    source.add_argument(
        "--spec",
        metavar="FILE",
        help="an audit spec in YAML or JSON, as `cnp spec` prints it ('-': stdin); the "
        "flags given here override its values; relative paths in it are read from the "
        "current directory, as the flags' are (default: the library defaults)",
    )
    source.add_argument(
        "--dry-run",
        action="store_true",
        help="check the spec, the gates and the files, print the request that would be "
        "sent as JSON and exit 0, without contacting the server (default: off)",
    )
    groups = add_spec_flags(parser)
    prune = groups["prune"]
    prune.add_argument(
        "--download-model", metavar="F", help="save the pruned model here (default: not saved)"
    )

    tracking = parser.add_argument_group("MLflow (the server's tracking server)")
    tracking.add_argument(
        "--experiment",
        metavar="NAME",
        help="experiment of the job's run, created if missing (default: the server's)",
    )
    tracking.add_argument(
        "--tag",
        type=_tag,
        action="append",
        metavar="KEY=VALUE",
        help="tag of the run, e.g. git_commit=$GITHUB_SHA (repeatable) (default: none)",
    )
    tracking.add_argument(
        "--register-model",
        metavar="NAME",
        help="register the pruned model under NAME in the model registry (default: not registered)",
    )

    job = parser.add_argument_group("job")
    job.add_argument(
        "--request-id", metavar="ID", help="idempotency key (default: a fresh one per run)"
    )
    _follow_options(job, "cancel and exit 3 after this many seconds")


def _follow_options(group: Any, timeout_help: str) -> None:
    group.add_argument(
        "--wait-timeout", type=float, metavar="S", help=f"{timeout_help} (default: no limit)"
    )
    group.add_argument(
        "--no-progress",
        action="store_true",
        help="plain stage lines, no bar (default: a bar on a terminal, lines otherwise)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="cnp",
        description="Concept audits and concept-aware pruning against a cnp server.",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--version", action="version", version=version_text(), help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = commands.add_parser(
        "audit",
        help="submit an audit, wait, write reports, apply gates",
        description="Submit an audit, follow it, write the reports and apply the gates. "
        "The spec comes from --spec FILE (see `cnp spec`), the flags, or both.",
        epilog=f"{GRAMMAR}\n\n{EXIT_CODES_HELP}",
        formatter_class=formatter,
    )
    _connection_options(audit)
    _audit_options(audit)
    _output_options(audit)

    spec = commands.add_parser(
        "spec",
        help="print the default audit spec, to edit and pass to `cnp audit --spec`",
        description="Print the default audit spec (every field, the library's defaults): "
        "`cnp spec > audit.yaml`, edit it, then `cnp audit --spec audit.yaml`.",
        formatter_class=formatter,
    )
    spec.add_argument(
        "--format",
        choices=("yaml", "json"),
        default="yaml",
        help="output format (default: %(default)s)",
    )
    spec.add_argument(
        "--prune",
        action="store_true",
        help="include the pruning section with its defaults (default: off: prune: null, "
        "an audit only)",
    )

    report = commands.add_parser(
        "report",
        help="fetch the report of a finished audit, write files, apply gates",
        epilog=f"{GRAMMAR}\n\n{EXIT_CODES_HELP}",
        formatter_class=formatter,
    )
    report.add_argument("audit_id", metavar="ID", help="the audit's id (aud-...)")
    _connection_options(report)
    _output_options(report)
    report.add_argument(
        "--download-model", metavar="F", help="save the pruned model here (default: not saved)"
    )
    report.add_argument(
        "--format",
        choices=("text", "html"),
        default="text",
        help="text: print the tables; html: download the job's fairness review (one "
        "self-contained HTML page with plots and heatmaps) to -o F instead; gates and the "
        "other files work the same (default: %(default)s)",
    )
    report.add_argument(
        "-o",
        "--output",
        metavar="F",
        help="where --format html writes the review (default: ID-review.html)",
    )

    jobs = commands.add_parser(
        "jobs", help="list recent audits", epilog=EXIT_CODES_HELP, formatter_class=formatter
    )
    _connection_options(jobs)
    jobs.add_argument(
        "--limit", type=int, default=50, metavar="N", help="at most N jobs (default: %(default)s)"
    )
    jobs.add_argument(
        "--json", action="store_true", help="one JSON object per line (default: a table)"
    )

    watch = commands.add_parser(
        "watch",
        help="follow an audit until it ends (Ctrl-C stops watching; the audit keeps running)",
        description="Follow an audit until it ends; exit as `cnp audit` would for its "
        "outcome. Ctrl-C or SIGTERM stops watching and exits 130 (--wait-timeout: 3), and "
        "the audit keeps running on the server, unless --cancel-on-interrupt.",
        epilog=WATCH_EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    watch.add_argument("audit_id", metavar="ID", help="the audit's id (aud-...)")
    _connection_options(watch)
    group = watch.add_argument_group("job")
    _follow_options(group, "stop watching and exit 3 after this many seconds")
    group.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        help="on Ctrl-C, SIGTERM or --wait-timeout cancel the audit too, as `cnp audit` "
        "does (default: off: the audit keeps running)",
    )

    cancel = commands.add_parser(
        "cancel", help="cancel an audit", epilog=EXIT_CODES_HELP, formatter_class=formatter
    )
    cancel.add_argument("audit_id", metavar="ID", help="the audit's id (aud-...)")
    _connection_options(cancel)

    info = commands.add_parser(
        "info", help="server version, limits and capabilities", formatter_class=formatter
    )
    _connection_options(info)
    return parser


def _tracking(args: argparse.Namespace) -> dict[str, Any]:
    """The MLflow options given (as AuditClient.submit takes them); a repeated tag key is
    a mistake, not an override."""
    tags: dict[str, str] = {}
    for key, value in args.tag or []:
        if key in tags:
            raise CliError(f"--tag {key}: given twice")
        tags[key] = value
    options = {"experiment": args.experiment, "tags": tags, "register_model": args.register_model}
    return {key: value for key, value in options.items() if value}


# --- gates and outputs -------------------------------------------------------------------


@dataclass
class Gating:
    """Rules and baseline, checked before anything is sent to the server."""

    rules: list[Rule]
    baseline: dict[str, Any] | None


def _prepare_gates(args: argparse.Namespace, spec: AuditSpec | None = None) -> Gating:
    try:
        rules = [parse_rule(text) for text in args.gate]
        rules += [parse_rule(text, WARN) for text in args.warn]
    except GateError as err:
        raise CliError(str(err)) from None
    baseline = None
    if args.baseline_report:
        path = Path(args.baseline_report)
        try:
            baseline = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CliError(f"--baseline-report {path}: {err}") from None
        if not isinstance(baseline, dict):
            raise CliError(f"--baseline-report {path}: not a JSON report object")
    for rule in rules:
        if rule.needs_baseline and baseline is None:
            raise CliError(f"gate {rule.text!r} compares with a baseline: add --baseline-report F")
        if spec is not None and rule.needs_after and spec.prune is None:
            raise CliError(f"gate {rule.text!r} reads the pruned model: add --prune cnp|lrp")
    return Gating(rules, baseline)


def _summary_target(args: argparse.Namespace) -> tuple[Path | None, bool]:
    """Where the Markdown summary goes, and whether it is appended: GitHub Actions reads a
    step's summary from $GITHUB_STEP_SUMMARY, which other commands of the step append to."""
    if args.summary is None:
        return None, False
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY", "")
    if args.summary == STEP_SUMMARY:
        if not step_summary:
            raise CliError(
                "--summary without a file appends to $GITHUB_STEP_SUMMARY, which is not set "
                "(outside GitHub Actions): give a file, --summary F"
            )
        return Path(step_summary), True
    path = Path(args.summary).expanduser()
    return path, bool(step_summary) and path.resolve() == Path(step_summary).resolve()


def _write_summary(args: argparse.Namespace, markdown: str) -> None:
    path, append = _summary_target(args)
    if path is None:
        return
    if not append:
        reports.write_text(path, markdown)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    separator = "\n" if path.is_file() and path.stat().st_size else ""
    with path.open("a", encoding="utf-8") as handle:  # never truncate: others wrote there
        handle.write(separator + markdown)


def _finish(args: argparse.Namespace, client: AuditClient, audit_id: str, gating: Gating) -> int:
    """Fetch the report, write every requested file, apply the gates: the exit code."""
    view = client.report(audit_id)
    report = view.to_dict()
    try:
        checks = evaluate(gating.rules, report, gating.baseline)
    except GateError as err:
        raise CliError(str(err)) from None
    # With --json -, stdout carries the report alone: everything for people goes to stderr.
    human = sys.stderr if args.json == "-" else sys.stdout
    if args.json == "-":
        sys.stdout.write(view.to_json().rstrip("\n") + "\n")
        sys.stdout.flush()
    elif args.json:
        reports.write_text(args.json, view.to_json())
    if args.junit:
        reports.write_text(args.junit, reports.junit_xml(checks, audit_id=audit_id))
    _write_summary(args, reports.markdown_summary(report, checks))
    if getattr(args, "download_model", None):
        _download_model(client, audit_id, args.download_model)
    html = getattr(args, "format", "text") == "html"
    if html:
        _download_review(client, audit_id, args.output or f"{audit_id}-review.html")
    if not args.quiet and not html:
        human.write(reports.text_summary(report, checks))
        _print_run(client.get(audit_id), human)
        human.flush()
    _print_warnings(checks)
    return EXIT_PASS if all_passed(checks) else EXIT_GATE_FAILED


def _print_run(job: Job, out: Any) -> None:
    """Where the job's MLflow run is (it exists from the job's start), for the CI log."""
    if job.mlflow_run_id:
        out.write(f"MLflow: run {job.mlflow_run_id} in experiment {job.mlflow_experiment_id}\n")


def _print_warnings(checks: Sequence[Check]) -> None:
    """Warn rules that did not hold, on stderr: seen in a CI log, never failing the job."""
    for check in checks:
        if check.warned:
            print(f"cnp: warning: {check.name}: {check.message}", file=sys.stderr)


def _download_model(client: AuditClient, audit_id: str, path: str) -> None:
    target = client.download_model(audit_id, Path(path).expanduser())
    print(f"cnp: pruned model written to {target}", file=sys.stderr)


def _download_review(client: AuditClient, audit_id: str, path: str) -> None:
    """The job's review.html (only a job that succeeded gets here: the report came first)."""
    if REVIEW_ARTIFACT not in {a.name for a in client.artifacts(audit_id)}:
        raise CliError(
            f"audit {audit_id} has no {REVIEW_ARTIFACT}: it was run by a server that wrote no "
            f"reviews; `cnp report {audit_id}` prints its tables"
        )
    target = client.download_artifact(audit_id, REVIEW_ARTIFACT, Path(path).expanduser())
    print(f"cnp: review written to {target}", file=sys.stderr)


# --- progress ----------------------------------------------------------------------------


class _Display:
    """A rich progress bar on a terminal; plain stage lines otherwise (CI logs)."""

    def __init__(self, audit_id: str, plain: bool) -> None:
        self.audit_id = audit_id
        self.started = time.monotonic()
        self.last: tuple[str, str] | None = None
        self.bar: Any = None
        if plain or not sys.stderr.isatty():
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as ProgressBar
        except ImportError:  # rich is optional: the client installs with grpcio alone
            return
        self.bar = ProgressBar(
            TextColumn("[bold]{task.fields[stage]:<12}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task("", total=1.0, stage="queued")
        self.bar.start()

    def update(self, stage: str, fraction: float, message: str, state: str) -> None:
        stage = stage or state.lower() or "queued"
        if self.bar is not None:
            self.bar.update(
                self.task, completed=max(0.0, min(fraction, 1.0)), stage=stage, description=message
            )
            return
        if (stage, message) != self.last:  # one line per stage or message, not per tick
            self.last = (stage, message)
            elapsed = time.monotonic() - self.started
            text = f"[{elapsed:6.1f}s] {self.audit_id} {stage}: {fraction:4.0%}"
            print(f"{text} {message}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


_END = object()


def _stream(watch: Callable[[], Iterator[Progress]], items: queue.Queue) -> None:
    """Move the watch stream into ``items`` (so the main thread stays interruptible)."""
    try:
        for item in watch():
            items.put(item)
    except Exception as err:  # handed to the main thread, which decides
        items.put(err)
    items.put(_END)


def _follow(client: AuditClient, audit_id: str, *, plain: bool, wait_timeout: float | None) -> Job:
    """Show progress until the job ends; return its final Job. Raises _WaitExpired when
    ``wait_timeout`` passes first."""
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    items: queue.Queue = queue.Queue()
    threading.Thread(
        target=_stream, args=(lambda: client.watch(audit_id), items), daemon=True
    ).start()
    display = _Display(audit_id, plain)
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _WaitExpired
            try:
                item = items.get(timeout=0.2 if remaining is None else min(0.2, remaining))
            except queue.Empty:
                continue
            if item is _END:
                break
            if isinstance(item, Exception):
                if not isinstance(item, ServiceError) or item.code != "UNAVAILABLE":
                    raise item
                # The stream broke for good (server restart): the job store still has the job.
                try:
                    return client.wait(audit_id, timeout=remaining)
                except ServiceError as err:
                    if err.code != "DEADLINE_EXCEEDED" or wait_timeout is None:
                        raise
                    raise _WaitExpired from None
            display.update(item.stage, item.progress, item.message, item.state)
    finally:
        display.close()
    return client.get(audit_id)


class _WaitExpired(Exception):
    """--wait-timeout passed before the job ended."""


def _cancel_quietly(client: AuditClient, audit_id: str) -> None:
    try:
        client.cancel(audit_id)
    except Exception as err:  # best effort while giving up
        print(f"cnp: could not cancel {audit_id}: {err}", file=sys.stderr)


def _raise_unless_succeeded(job: Job) -> None:
    """Exit codes for a job that ended without a report: its stored code decides."""
    if job.succeeded:
        return
    if job.state == "CANCELLED":
        why = f": {job.error_message}" if job.error_message else ""
        raise CliError(f"audit {job.id} was cancelled{why}", EXIT_UNAVAILABLE)
    code = job.error_code or "UNKNOWN"
    raise CliError(f"audit {job.id} {job.state} ({code}): {job.error_message}", exit_code_for(code))


def _follow_or_stop(
    client: AuditClient, audit_id: str, args: argparse.Namespace, *, cancel: bool
) -> Job:
    """:func:`_follow`; on Ctrl-C, SIGTERM or --wait-timeout cancel the job when ``cancel``
    (else leave it running, and say so), then exit 130, or 3 for the timeout."""
    try:
        return _follow(client, audit_id, plain=args.no_progress, wait_timeout=args.wait_timeout)
    except KeyboardInterrupt:
        if cancel:
            print(f"\ncnp: interrupted; cancelling audit {audit_id}", file=sys.stderr)
            _cancel_quietly(client, audit_id)
        else:
            print(f"\ncnp: interrupted; {_still_running(audit_id)}", file=sys.stderr)
        raise
    except _WaitExpired:
        if cancel:
            _cancel_quietly(client, audit_id)
        outcome = "cancelled" if cancel else _still_running(audit_id)
        message = f"audit {audit_id} did not finish within --wait-timeout {args.wait_timeout:g} s"
        raise CliError(f"{message}; {outcome}", EXIT_UNAVAILABLE) from None


def _still_running(audit_id: str) -> str:
    return f"audit {audit_id} keeps running (`cnp cancel {audit_id}` stops it)"


# --- commands ----------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> AuditClient:
    """A client; the token comes from --token-file, else as ``default_token`` finds it."""
    token_file, source = args.token_file, "--token-file"
    if not token_file and not os.environ.get("CNP_TOKEN"):
        token_file, source = os.environ.get("CNP_TOKEN_FILE"), "CNP_TOKEN_FILE"
    if token_file and not Path(token_file).expanduser().is_file():
        raise CliError(f"token file not found ({source}): {token_file}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise CliError("--tls-cert needs --tls-ca: client certificates are sent over TLS only")
    pem: dict[str, bytes | None] = {}
    for flag, name in (
        ("--tls-ca", "tls_ca"),
        ("--tls-cert", "tls_cert"),
        ("--tls-key", "tls_key"),
    ):
        try:
            value = getattr(args, name)
            pem[name] = Path(value).expanduser().read_bytes() if value else None
        except OSError as err:
            raise CliError(f"{flag}: {err.strerror}: {value}") from None
    try:
        return AuditClient(
            args.server,
            token_file=args.token_file,
            root_certificates=pem["tls_ca"],
            client_certificate=pem["tls_cert"],
            client_key=pem["tls_key"],
            timeout=args.timeout,
            retries=args.retries,
        )
    except PermissionError as err:  # a token file others can read
        raise CliError(str(err)) from None


def cmd_audit(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    try:
        spec.validate()
    except CnpError as err:
        raise CliError(str(err)) from None
    gating = _prepare_gates(args, spec)
    _summary_target(args)  # a bare --summary outside GitHub Actions fails before any call
    if args.download_model and spec.prune is None:
        raise CliError("--download-model needs --prune cnp|lrp")
    tracking = _tracking(args)
    if args.dry_run:
        request = calls.create_request(spec, args.request_id, **tracking)
        message = json_format.MessageToDict(request, preserving_proto_field_name=True)
        print(json.dumps(message, indent=2))
        return EXIT_PASS
    client = _client(args)
    job = client.submit(spec, request_id=args.request_id or uuid.uuid4().hex, **tracking)
    audit_id = job.id
    print(f"cnp: audit {audit_id} submitted to {args.server}", file=sys.stderr)
    job = _follow_or_stop(client, audit_id, args, cancel=True)
    _raise_unless_succeeded(job)
    return _finish(args, client, audit_id, gating)


def cmd_spec(args: argparse.Namespace) -> int:
    sys.stdout.write(default_spec_text(args.format, prune=args.prune))
    return EXIT_PASS


def cmd_report(args: argparse.Namespace) -> int:
    if args.output and args.format != "html":
        raise CliError("-o/--output names the file of --format html")
    gating = _prepare_gates(args)
    _summary_target(args)
    client = _client(args)
    return _finish(args, client, args.audit_id, gating)


def cmd_watch(args: argparse.Namespace) -> int:
    client = _client(args)
    job = _follow_or_stop(client, args.audit_id, args, cancel=args.cancel_on_interrupt)
    _raise_unless_succeeded(job)
    print(f"audit {args.audit_id} SUCCEEDED")
    return EXIT_PASS


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.audit_id)
    print(f"audit {job.id}: {job.state}{' (cancel requested)' if job.cancel_requested else ''}")
    return EXIT_PASS


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = _client(args).list(page_size=min(args.limit, 100), limit=args.limit)
    rows = [_job_row(job) for job in jobs]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_PASS
    table = [["ID", "STATE", "STAGE", "PROGRESS", "MLFLOW", "CREATED", "MESSAGE"]]
    for row in rows:
        progress = f"{row['progress']:.0%}"
        table.append(
            [
                row["id"],
                row["state"],
                row["stage"],
                progress,
                row["tracking_state"] or "-",
                row["created"],
                row["message"],
            ]
        )
    print("\n".join(reports.align(table)))
    return EXIT_PASS


def _job_row(job: Job) -> dict[str, Any]:
    created = job.created.isoformat(timespec="seconds") if job.created else ""
    message = f"{job.error_code}: {job.error_message}" if job.error_code else job.message
    return {
        "id": job.id,
        "state": job.state,
        "stage": job.stage,
        "progress": job.progress,
        "created": created,
        "message": message,
        "mlflow_run_id": job.mlflow_run_id,
        "tracking_state": job.tracking_state,
        "tracking_error": job.tracking_error,
    }


def cmd_info(args: argparse.Namespace) -> int:
    metadata = _client(args).metadata()
    print(
        json.dumps(json_format.MessageToDict(metadata, preserving_proto_field_name=True), indent=2)
    )
    return EXIT_PASS


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "audit": cmd_audit,
    "spec": cmd_spec,
    "report": cmd_report,
    "jobs": cmd_jobs,
    "watch": cmd_watch,
    "cancel": cmd_cancel,
    "info": cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cnp``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    # CI runners stop jobs with SIGTERM: treat it like Ctrl-C so the audit is cancelled.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        return COMMANDS[args.command](args)
    except CliError as err:
        print(f"cnp: error: {err}", file=sys.stderr)
        return err.exit_code
    except SpecError as err:
        print(f"cnp: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ServiceError as err:
        where = f" (audit {err.audit_id})" if err.audit_id else ""
        print(f"cnp: error{where}: {err.code}: {err.message}", file=sys.stderr)
        return exit_code_for(err.code)
    except OSError as err:  # an output path that cannot be written
        print(f"cnp: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
