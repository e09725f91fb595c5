"""Server configuration: defaults < TOML file < ``CNP_*`` environment < command-line flags.

Every field of :class:`ServerConfig` can be set in the TOML file (top-level keys), as
``CNP_<FIELD>`` (lists comma-separated, tables as JSON) or with ``--set FIELD=VALUE``;
the common ones have their own flags. The embedded default needs nothing: everything
lives under one data directory (``.cnp``) and the server listens on loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnp_core.errors import CnpError
from cnp_core.spec import FACTORY_PATTERN


class ConfigError(CnpError):
    """The configuration is inconsistent (bad value, unknown key, missing file)."""


# RPC threads that streams may never take: unary calls (CreateAudit, GetOperation) always
# find one, however many clients wait on WatchAudit.
STREAM_RESERVE = 8

EXECUTORS = ("local", "ray")


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    # Health checks only, on their own uncapped server, so streams never starve a probe.
    # Empty: the host of ``listen``, any free port (server.json records it). Always
    # plaintext (Kubernetes probes speak no TLS); it tells nothing but SERVING/NOT_SERVING.
    health_listen: str = ""
    # Plaintext on a non-loopback address sends the bearer token in clear: refused unless
    # the operator says the network is private or a proxy terminates TLS.
    allow_insecure: bool = False
    data_dir: str = ".cnp"
    # Model weights and dataset directories must lie under one of these.
    allow_roots: list[str] = field(default_factory=list)
    # Model factories ("package.module:function") a request may name. None by default:
    # the server process never imports code a request names; a worker imports a listed one.
    allow_factories: list[str] = field(default_factory=list)
    max_weights_bytes: int = 4 << 30  # a larger weights file is refused at submission
    database_url: str = ""  # default: sqlite:///DATA_DIR/jobs.db
    # MLflow: default sqlite:///DATA_DIR/mlflow.db with artifacts in DATA_DIR/mlartifacts.
    tracking_enabled: bool = True
    tracking_uri: str = ""
    tracking_experiment: str = "cnp-audits"
    tracking_retry_seconds: float = 60.0
    tracking_live_seconds: float = 2.0  # how often a running job's run shows its progress
    tracking_http_retries: int = 1
    tracking_http_timeout: float = 10.0
    # A job's MLflow record is retried with back-off (tracking_retry_seconds, doubling, at
    # most 10 times it apart) and given up, as tracking state "failed", after this many.
    tracking_max_attempts: int = 20
    # Bearer-token auth; with no token configured one is generated at DATA_DIR/token.
    auth: bool = True
    token: str = ""
    token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set to require client certificates (mutual TLS)
    max_message_bytes: int = 4 * 1024 * 1024
    artifact_chunk_bytes: int = 1024 * 1024
    max_queued: int = 64
    workers: int = 0  # 0: one per GPU, or one on CPU (Ray: jobs in flight at once)
    # "local": worker processes on this machine, one per GPU; "ray": each job runs in a
    # Ray actor on the cluster at ray_address, asking for one GPU (or CPUs).
    executor: str = "local"
    # Where the Ray cluster is: "HOST:PORT" of its head (GCS), "ray://HOST:10001" (Ray
    # Client), or "auto"; empty: start a Ray instance on this machine.
    ray_address: str = ""
    # Memory a job's worker may allocate (RLIMIT_DATA, bytes); 0: no limit of its own.
    # Over it, the job fails with RESOURCE_EXHAUSTED instead of the kernel killing a process.
    worker_memory_bytes: int = 0
    gpus: list[int] = field(
        default_factory=list
    )  # empty: detect (CUDA_VISIBLE_DEVICES, nvidia-smi)
    # Keep one worker per slot started with its imports done, so a job need not wait
    # for torch to load (costs that process's memory while idle).
    prewarm_workers: bool = True
    max_attempts: int = 3
    poll_seconds: float = 0.5
    heartbeat_seconds: float = 5.0
    lease_seconds: float = 60.0  # a RUNNING job without heartbeat this long is re-queued
    cancel_grace_seconds: float = 10.0
    stage_timeouts: dict[str, float] = field(default_factory=lambda: {"default": 6 * 3600.0})
    drain_seconds: float = 30.0
    engine: str = "cnp_server.engine"  # module with validate, run_audit, capabilities
    node_id: str = field(default_factory=socket.gethostname)
    log_level: str = "INFO"
    rpc_threads: int = 64  # also the bound on concurrent calls (streams hold a thread)
    # Long calls (WatchAudit, WaitOperation, ReadArtifact) open at once from one client
    # address; all clients together get at most rpc_threads - STREAM_RESERVE.
    max_streams_per_client: int = 16
    # Ping a silent connection this often and drop it when no answer comes in the timeout:
    # a vanished client's streams (and their threads) are freed.
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0

    # --- derived ----------------------------------------------------------------------

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def jobs_path(self) -> Path:
        return self.data_path / "jobs"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'jobs.db'}"

    @property
    def effective_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.data_path / 'mlflow.db'}"

    @property
    def tracking_artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts; None lets a remote tracking server decide."""
        return None if self.tracking_uri else (self.data_path / "mlartifacts").as_uri()

    @property
    def effective_token_file(self) -> Path:
        return Path(self.token_file).expanduser() if self.token_file else self.data_path / "token"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def max_streams(self) -> int:
        return self.rpc_threads - STREAM_RESERVE

    @property
    def effective_health_listen(self) -> str:
        return self.health_listen or f"{self.listen.rsplit(':', 1)[0]}:0"

    def stage_timeout(self, stage: str) -> float:
        return float(self.stage_timeouts.get(stage, self.stage_timeouts.get("default", 6 * 3600.0)))

    def validate(self) -> ServerConfig:
        for name in ("listen", "health_listen"):
            value = getattr(self, name)
            if (value or name == "listen") and ":" not in value:
                raise ConfigError(f"{name} must be HOST:PORT, got {value!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if not (self.tls or self.allow_insecure or is_loopback(self.listen)):
            raise ConfigError(
                f"listen {self.listen} is not a loopback address and TLS is off: the bearer "
                "token and every request would cross the network in clear. Set tls_cert and "
                "tls_key (--tls-cert, --tls-key), or, on a private network or behind a "
                "TLS-terminating proxy, allow_insecure = true (--allow-insecure)"
            )
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{name}: no such file {value}")
        for entry in self.allow_factories:
            if not FACTORY_PATTERN.match(entry):
                raise ConfigError(
                    f"allow_factories: {entry!r} is not of the form 'package.module:function'"
                )
        if self.max_weights_bytes < 1 or self.worker_memory_bytes < 0:
            raise ConfigError("max_weights_bytes must be >= 1 and worker_memory_bytes >= 0")
        if self.max_queued < 1 or self.max_attempts < 1 or self.workers < 0:
            raise ConfigError("max_queued and max_attempts must be >= 1, workers >= 0")
        if not 1024 <= self.artifact_chunk_bytes <= self.max_message_bytes - 1024:
            raise ConfigError("artifact_chunk_bytes must lie in [1 KiB, max_message_bytes - 1 KiB]")
        if self.lease_seconds <= self.heartbeat_seconds:
            raise ConfigError("lease_seconds must exceed heartbeat_seconds")
        if self.rpc_threads <= STREAM_RESERVE or self.max_streams_per_client < 1:
            raise ConfigError(
                f"rpc_threads must be > {STREAM_RESERVE} (kept for unary calls), "
                "max_streams_per_client >= 1"
            )
        if self.keepalive_seconds <= 0 or self.keepalive_timeout_seconds <= 0:
            raise ConfigError("keepalive_seconds and keepalive_timeout_seconds must be > 0")
        if self.executor not in EXECUTORS:
            raise ConfigError(
                f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
        if self.tracking_live_seconds <= 0:
            raise ConfigError("tracking_live_seconds must be > 0")
        return self

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets hidden, for the start-up log."""
        values = dataclasses.asdict(self)
        values["token"] = "***" if self.token else ""
        values["database_url"] = mask_url(self.effective_database_url)
        values["tracking_uri"] = mask_url(self.effective_tracking_uri)
        values["token_file"] = str(self.effective_token_file)
        values["data_dir"] = str(self.data_path)
        return values


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or empty (all interfaces)
        return False


def mask_url(url: str) -> str:
    """Hide the password of ``scheme://user:password@host``."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _kind(name: str) -> type:
    f = _FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return type(default)


def parse_value(name: str, text: str) -> Any:
    """A field's value from text (environment or ``--set``)."""
    if name not in _FIELDS:
        raise ConfigError(f"unknown configuration key {name!r}")
    kind = _kind(name)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(text)
            return lowered in {"1", "true", "yes", "on"}
        if kind is list:
            items = [item.strip() for item in text.split(",") if item.strip()]
            return [int(i) for i in items] if name == "gpus" else items
        if kind is dict:
            return json.loads(text)
        return kind(text)
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"{name}: cannot read {text!r} as {kind.__name__}: {err}") from None


def _merge(values: dict[str, Any], updates: Mapping[str, Any], source: str) -> None:
    for key, value in updates.items():
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown configuration key {key!r}")
        kind = _kind(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{source}: {key} must be a {kind.__name__}, got {value!r}")
        values[key] = value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnp-server", description="The cnp concept audit gRPC service."
    )
    p.add_argument("--config", help="TOML configuration file (also CNP_CONFIG)")
    p.add_argument("--listen", help="HOST:PORT to serve on (port 0: any free port)")
    p.add_argument(
        "--health-listen",
        dest="health_listen",
        help="HOST:PORT of the health-only port (default: listen's host, any free port)",
    )
    p.add_argument(
        "--allow-insecure",
        dest="allow_insecure",
        action="store_const",
        const=True,
        help="serve plaintext on a non-loopback address (private network or TLS proxy)",
    )
    p.add_argument("--data-dir", dest="data_dir", help="job store, token, MLflow and job files")
    p.add_argument(
        "--allow-root",
        dest="allow_roots",
        action="append",
        metavar="DIR",
        help="directory that model and dataset paths must lie under (repeatable)",
    )
    p.add_argument(
        "--allow-factory",
        dest="allow_factories",
        action="append",
        metavar="MODULE:FUNCTION",
        help="model factory a request may name, run in a worker (repeatable; default none)",
    )
    p.add_argument("--database-url", dest="database_url", help="SQLAlchemy URL of the job store")
    p.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI")
    p.add_argument(
        "--no-tracking",
        dest="tracking_enabled",
        action="store_const",
        const=False,
        help="no MLflow",
    )
    p.add_argument("--token-file", dest="token_file", help="file holding the bearer token")
    p.add_argument(
        "--no-auth", dest="auth", action="store_const", const=False, help="no token check"
    )
    p.add_argument("--tls-cert", dest="tls_cert")
    p.add_argument("--tls-key", dest="tls_key")
    p.add_argument("--tls-client-ca", dest="tls_client_ca")
    p.add_argument("--max-queued", dest="max_queued", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--engine", help="module providing validate/run_audit/capabilities")
    p.add_argument("--log-level", dest="log_level")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other configuration key (repeatable)",
    )
    return p


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """The effective configuration from flags, environment and file (in that precedence)."""
    environ = os.environ if environ is None else environ
    args = parser().parse_args(argv)
    values: dict[str, Any] = {}
    config_file = args.config or environ.get("CNP_CONFIG")
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: {err}") from None
        _merge(values, table.get("server", table), str(path))
    for name in _FIELDS:
        text = environ.get(f"CNP_{name.upper()}")
        if text is not None:
            values[name] = parse_value(name, text)
    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in {"config", "overrides"} and v is not None and k in _FIELDS
    }
    values.update(flags)
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        values[key.strip()] = parse_value(key.strip(), text)
    config = ServerConfig(**values)
    config.allow_roots = [str(Path(r).expanduser().resolve()) for r in config.allow_roots]
    return config.validate()
