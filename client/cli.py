"""The ``cnp`` command line: run concept audits against a server, as CI gates.

One command submits an audit, follows its progress, writes the canonical JSON report, a
JUnit file and a Markdown summary, applies the gate rules (:mod:`cnp_client.gates`) and
exits with a code CI can rely on (:data:`EXIT_CODES_HELP`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from google.protobuf import json_format

from cnp_core.errors import CnpError
from cnp_core.spec import (
    CONCEPT_METHODS,
    PRUNE_METHODS,
    PRUNE_SCOPES,
    SCHEDULES,
    SCORES,
    AuditSpec,
    DatasetRef,
    ModelRef,
    PruneSpec,
)

from . import reports
from .client import AuditClient, Job, Progress, ServiceError, code_name
from .gates import GRAMMAR, GateError, Rule, all_passed, evaluate, parse_rules

EXIT_PASS = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: the job was cancelled

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

EXIT_CODES_HELP = """\
exit codes (stable; CI relies on them):
  0  the audit succeeded and every gate passed
  1  a gate failed (the report, JUnit and summary files are still written)
  2  bad input or configuration: invalid flags or spec, malformed gate rule, missing
     token or baseline file; server answers INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
     FAILED_PRECONDITION, OUT_OF_RANGE, UNAUTHENTICATED, PERMISSION_DENIED,
     UNIMPLEMENTED; a job that FAILED with one of those codes (e.g. an unreadable file)
  3  server unavailable or infrastructure failure: UNAVAILABLE, DEADLINE_EXCEEDED,
     RESOURCE_EXHAUSTED (queue full), INTERNAL, ABORTED, UNKNOWN, DATA_LOSS; a job that
     FAILED with one of those or was CANCELLED elsewhere; --wait-timeout expired
  130 interrupted (Ctrl-C or SIGTERM); the running job is cancelled first"""

DEFAULT_SERVER = "127.0.0.1:50051"


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


# --- arguments ---------------------------------------------------------------------------


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, got {text!r}")
    return values  # type: ignore[return-value]


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers (a comma list), got {text!r}"
        ) from None


def _absolute(path: str) -> str:
    """Absolute, user-expanded; the server canonicalises and checks its allowed roots."""
    return str(Path(path).expanduser().absolute()) if path else path


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--server",
        default=os.environ.get("CNP_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help="server address (default: $CNP_SERVER or %(default)s)",
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
        help="PEM root certificates of the server: connect with TLS",
    )
    group.add_argument(
        "--tls-cert", metavar="F", help="PEM client certificate, for a server that asks (mTLS)"
    )
    group.add_argument("--tls-key", metavar="F", help="PEM private key of --tls-cert")
    group.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="deadline of each call (seconds)"
    )
    group.add_argument(
        "--retries", type=int, default=3, metavar="N", help="retries of a call on UNAVAILABLE"
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gates and outputs")
    group.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="RULE",
        help="gate rule, e.g. 'max_ap_attribute<=0.8' (repeatable; grammar below)",
    )
    group.add_argument(
        "--baseline-report",
        metavar="F",
        help="JSON report of a baseline model for 'baseline' rules",
    )
    group.add_argument("--json", metavar="F", help="write the canonical JSON report")
    group.add_argument("--junit", metavar="F", help="write JUnit XML, one test case per check")
    group.add_argument("--summary", metavar="F", help="write a Markdown summary for CI pages")
    group.add_argument("--quiet", action="store_true", help="do not print the tables to stdout")


class SpecFlag(NamedTuple):
    """A ``cnp audit`` flag and the spec field it sets (dotted, e.g. ``prune.rate``)."""

    flag: str
    field: str
    options: dict[str, Any]  # argparse keywords: type, help, choices, metavar, action

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


def _flag(flag: str, field: str, **options: Any) -> SpecFlag:
    return SpecFlag(flag, field, options)


# Every AuditSpec field, and nothing else, has one flag here: both the parser and
# spec_from_args read this table, so a new spec field needs only a new row.
SPEC_FLAGS: tuple[SpecFlag, ...] = (
    _flag(
        "--model",
        "model.architecture",
        metavar="ARCH",
        help="torchvision architecture, e.g. resnet18",
    ),
    _flag("--factory", "model.factory", metavar="MODULE:FUNCTION", help="importable model factory"),
    _flag(
        "--weights",
        "model.weights",
        type=_absolute,
        metavar="FILE",
        help=".safetensors or state_dict .pt/.pth",
    ),
    _flag("--num-classes", "model.num_classes", type=int, metavar="N"),
    _flag(
        "--dataset",
        "dataset.root",
        type=_absolute,
        metavar="DIR",
        help="directory with images and labels.csv",
    ),
    _flag("--input-size", "dataset.input_size", type=int, metavar="N"),
    _flag("--mean", "dataset.mean", type=_triple, metavar="R,G,B"),
    _flag("--std", "dataset.std", type=_triple, metavar="R,G,B"),
    _flag(
        "--max-pixels",
        "dataset.max_pixels",
        type=int,
        metavar="N",
        help="largest image read, in pixels (a decompression-bomb cap)",
    ),
    _flag(
        "--layer",
        "layers",
        action="append",
        metavar="NAME",
        help="layer to audit, repeatable (default: the architecture's, e.g. resnet18 layer2 "
        "below 128 px)",
    ),
    _flag(
        "--attribute",
        "attributes",
        action="append",
        metavar="NAME",
        help="labels.csv column (repeatable)",
    ),
    _flag("--positive-class", "positive_class", type=int, metavar="C"),
    _flag(
        "--negative-class", "negative_class", type=int, metavar="C", help="-1: every other class"
    ),
    _flag("--method", "method", choices=CONCEPT_METHODS),
    _flag(
        "--subspaces",
        "n_subspaces",
        type=_int_list,
        action="extend",
        metavar="K",
        help="numbers of subspaces to try, e.g. 4 or 2,4,8 (repeatable; chosen on validation)",
    ),
    _flag("--score", "score", choices=SCORES),
    _flag("--composite", "composite", metavar="NAME"),
    _flag("--flag-threshold", "flag_threshold", type=float, metavar="AP"),
    _flag("--bootstrap", "bootstrap", type=int, metavar="N", help="resamples; 0 disables CIs"),
    _flag("--min-group-size", "min_group_size", type=int, metavar="N"),
    _flag("--positions-per-image", "positions_per_image", type=int, metavar="N"),
    _flag("--fit-images", "fit_images", type=int, metavar="N"),
    _flag("--drsa-restarts", "drsa_restarts", type=int, metavar="N"),
    _flag("--drsa-max-epochs", "drsa_max_epochs", type=int, metavar="N"),
    _flag("--heatmap-samples", "heatmap_samples", type=int, metavar="N", help="0: no heatmaps"),
    _flag("--batch-size", "batch_size", type=int, metavar="N"),
    _flag("--device", "device", metavar="cpu|cuda[:N]"),
    _flag("--seed", "seed", type=int),
    # --prune turns pruning on (and picks the method); the other prune.* flags need it.
    _flag("--prune", "prune.method", choices=PRUNE_METHODS, help="prune after the audit"),
    _flag(
        "--prune-rate", "prune.rate", type=float, metavar="R", help="fraction of filters in (0, 1)"
    ),
    _flag("--prune-schedule", "prune.schedule", choices=SCHEDULES),
    _flag("--prune-steps", "prune.steps", type=int, metavar="N"),
    _flag("--finetune-epochs", "prune.finetune_epochs", type=int, metavar="N"),
    _flag("--learning-rate", "prune.learning_rate", type=float, metavar="LR"),
    _flag(
        "--reference-per-class",
        "prune.reference_per_class",
        type=int,
        metavar="N",
        help="reference images per class for the filter scores",
    ),
    _flag("--prune-attribute", "prune.attribute", metavar="NAME", help="attribute to remove"),
    _flag(
        "--prune-scope",
        "prune.scope",
        choices=PRUNE_SCOPES,
        help="'upstream' (default): only filters that feed the audited layer; 'all'",
    ),
    _flag("--relearn-subspaces", "prune.relearn_subspaces", action="store_true", default=None),
    _flag(
        "--keep-projection",
        "prune.keep_projection",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CNP: fold the projection into the returned model (default: yes)",
    ),
    _flag(
        "--prune-composite",
        "prune.composite",
        metavar="NAME",
        help="LRP rules of the filter scores",
    ),
)

# Help groups by the first part of the field; top-level fields are the audit's.
_GROUPS = {"model": "model", "dataset": "dataset", "": "audit", "prune": "pruning"}
_ONE_OF = ("--model", "--factory")  # a model is an architecture or a factory


def _audit_options(parser: argparse.ArgumentParser) -> None:
    groups = {part: parser.add_argument_group(title) for part, title in _GROUPS.items()}
    one_of = groups["model"].add_mutually_exclusive_group()
    for flag in SPEC_FLAGS:
        group = one_of if flag.flag in _ONE_OF else groups[flag.field.rpartition(".")[0]]
        group.add_argument(flag.flag, dest=flag.dest, **flag.options)

    prune = groups["prune"]
    prune.add_argument("--download-model", metavar="F", help="save the pruned model here")

    job = parser.add_argument_group("job")
    job.add_argument("--request-id", metavar="ID", help="idempotency key (default: a fresh one)")
    job.add_argument(
        "--wait-timeout", type=float, metavar="S", help="cancel and exit 3 after this long"
    )
    job.add_argument("--no-progress", action="store_true", help="plain stage lines, no bar")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="cnp",
        description="Concept audits and concept-aware pruning against a cnp server.",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = commands.add_parser(
        "audit",
        help="submit an audit, wait, write reports, apply gates",
        epilog=f"{GRAMMAR}\n\n{EXIT_CODES_HELP}",
        formatter_class=formatter,
    )
    _connection_options(audit)
    _audit_options(audit)
    _output_options(audit)

    report = commands.add_parser(
        "report",
        help="fetch the report of a finished audit, write files, apply gates",
        epilog=f"{GRAMMAR}\n\n{EXIT_CODES_HELP}",
        formatter_class=formatter,
    )
    report.add_argument("audit_id", metavar="ID")
    _connection_options(report)
    _output_options(report)
    report.add_argument("--download-model", metavar="F", help="save the pruned model here")

    jobs = commands.add_parser(
        "jobs", help="list recent audits", epilog=EXIT_CODES_HELP, formatter_class=formatter
    )
    _connection_options(jobs)
    jobs.add_argument("--limit", type=int, default=50, metavar="N")
    jobs.add_argument("--json", action="store_true", help="one JSON object per line")

    watch = commands.add_parser(
        "watch",
        help="follow an audit until it ends",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    watch.add_argument("audit_id", metavar="ID")
    _connection_options(watch)
    watch.add_argument("--no-progress", action="store_true", help="plain stage lines, no bar")
    watch.add_argument("--wait-timeout", type=float, metavar="S", help="exit 3 after this long")

    cancel = commands.add_parser(
        "cancel", help="cancel an audit", epilog=EXIT_CODES_HELP, formatter_class=formatter
    )
    cancel.add_argument("audit_id", metavar="ID")
    _connection_options(cancel)

    info = commands.add_parser(
        "info", help="server version, limits and capabilities", formatter_class=formatter
    )
    _connection_options(info)
    return parser


def spec_from_args(args: argparse.Namespace) -> AuditSpec:
    """The AuditSpec the flags describe; unset flags keep the library's defaults."""
    given: dict[str, dict[str, Any]] = {part: {} for part in _GROUPS}
    pruning: list[str] = []
    for flag in SPEC_FLAGS:
        value = getattr(args, flag.dest)
        if value is None:
            continue
        part, _, name = flag.field.rpartition(".")
        given[part][name] = value
        if part == "prune":
            pruning.append(flag.flag)
    if pruning and "method" not in given["prune"]:  # only --prune turns pruning on
        raise CliError(
            f"{', '.join(pruning)}: pruning flags need --prune {'|'.join(PRUNE_METHODS)}"
        )
    return AuditSpec(
        model=ModelRef(**given["model"]),
        dataset=DatasetRef(**given["dataset"]),
        prune=PruneSpec(**given["prune"]) if given["prune"] else None,
        **given[""],
    )


def spec_arguments(spec: AuditSpec, always: Collection[str] = ()) -> list[str]:
    """The flags that ask for ``spec`` (the inverse of :func:`spec_from_args`): every
    field that differs from the library's default, and the fields in ``always``."""
    defaults = dataclasses.replace(AuditSpec(), prune=PruneSpec())
    args: list[str] = []
    for flag in SPEC_FLAGS:
        if flag.field.startswith("prune.") and spec.prune is None:
            continue
        value = _field(spec, flag.field)
        if flag.field not in always and value == _field(defaults, flag.field):
            continue
        action = flag.options.get("action")
        if action == "store_true":
            args += [flag.flag] if value else []
        elif action is argparse.BooleanOptionalAction:
            args += [flag.flag if value else "--no-" + flag.flag.removeprefix("--")]
        elif action == "append":
            for item in value:
                args += [flag.flag, str(item)]
        elif isinstance(value, (list, tuple)):
            args += [flag.flag, ",".join(str(v) for v in value)]
        else:
            args += [flag.flag, str(value)]
    return args


def _field(spec: AuditSpec, dotted: str) -> Any:
    for part in dotted.split("."):
        spec = getattr(spec, part)
    return spec


# --- gates and outputs -------------------------------------------------------------------


@dataclass
class Gating:
    """Rules and baseline, checked before anything is sent to the server."""

    rules: list[Rule]
    baseline: dict[str, Any] | None


def _prepare_gates(args: argparse.Namespace, spec: AuditSpec | None = None) -> Gating:
    try:
        rules = parse_rules(args.gate)
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


def _finish(args: argparse.Namespace, client: AuditClient, audit_id: str, gating: Gating) -> int:
    """Fetch the report, write every requested file, apply the gates: the exit code."""
    view = client.report(audit_id)
    report = view.to_dict()
    try:
        checks = evaluate(gating.rules, report, gating.baseline)
    except GateError as err:
        raise CliError(str(err)) from None
    if args.json:
        reports.write_text(args.json, view.to_json())
    if args.junit:
        reports.write_text(args.junit, reports.junit_xml(checks, audit_id=audit_id))
    if args.summary:
        reports.write_text(args.summary, reports.markdown_summary(report, checks))
    if getattr(args, "download_model", None):
        _download_model(client, audit_id, args.download_model)
    if not args.quiet:
        sys.stdout.write(reports.text_summary(report, checks))
        sys.stdout.flush()
    return EXIT_PASS if all_passed(checks) else EXIT_GATE_FAILED


def _download_model(client: AuditClient, audit_id: str, path: str) -> None:
    target = client.download_model(audit_id, Path(path).expanduser())
    print(f"cnp: pruned model written to {target}", file=sys.stderr)


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
    """Show progress until the job ends; return its final Job. Times out with exit 3."""
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
                raise _gave_up(client, audit_id, wait_timeout)
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
                    raise _gave_up(client, audit_id, wait_timeout) from None
            display.update(item.stage, item.progress, item.message, item.state)
    finally:
        display.close()
    return client.get(audit_id)


def _gave_up(client: AuditClient, audit_id: str, wait_timeout: float) -> CliError:
    _cancel_quietly(client, audit_id)
    message = f"audit {audit_id} did not finish within --wait-timeout {wait_timeout:g} s; cancelled"
    return CliError(message, EXIT_UNAVAILABLE)


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
    if args.download_model and spec.prune is None:
        raise CliError("--download-model needs --prune cnp|lrp")
    client = _client(args)
    job = client.submit(spec, request_id=args.request_id or uuid.uuid4().hex)
    audit_id = job.id
    print(f"cnp: audit {audit_id} submitted to {args.server}", file=sys.stderr)
    try:
        job = _follow(client, audit_id, plain=args.no_progress, wait_timeout=args.wait_timeout)
    except KeyboardInterrupt:
        print(f"\ncnp: interrupted; cancelling audit {audit_id}", file=sys.stderr)
        _cancel_quietly(client, audit_id)
        return EXIT_INTERRUPTED
    _raise_unless_succeeded(job)
    return _finish(args, client, audit_id, gating)


def cmd_report(args: argparse.Namespace) -> int:
    gating = _prepare_gates(args)
    client = _client(args)
    return _finish(args, client, args.audit_id, gating)


def cmd_watch(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        job = _follow(client, args.audit_id, plain=args.no_progress, wait_timeout=args.wait_timeout)
    except KeyboardInterrupt:  # watching only: leave the job running
        return EXIT_INTERRUPTED
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
