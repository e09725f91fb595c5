"""``cnp-server``: start the gRPC service (config, store, executor, MLflow tracker, server).

Start-up re-queues jobs this node was running when it stopped; shutdown (SIGTERM or
SIGINT) turns health to NOT_SERVING (on both ports: the main one and ``health_listen``),
refuses new audits, lets running jobs finish for ``drain_seconds`` and re-queues what is
left, so no accepted job is lost or stuck.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cnp.v1 import service_pb2_grpc

from . import __version__, logs
from .auth import BearerTokenInterceptor, ensure_token
from .config import ConfigError, ServerConfig, load_config, mask_url
from .engine import load_engine
from .executor import Executor, LocalExecutor
from .service import (
    SERVICE_NAMES,
    AuditService,
    ConceptAuditServicer,
    OperationsServicer,
)
from .store import JobStore
from .tracking import Tracker

log = logging.getLogger("cnp_server")


HEALTH_THREADS = 4  # Check is answered in microseconds; Watch holds no thread


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _bind(
    server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """The port ``server`` got at ``address``; ConfigError when it cannot listen there."""
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc raises when the address cannot be bound
        port = 0
    if not port:
        raise ConfigError(f"cannot listen on {address} (address in use?)")
    return port


def _open_store(url: str) -> JobStore:
    """The job store, its schema migrated; ConfigError (a clear line, exit 2) when the
    database cannot be reached or refuses us."""
    from sqlalchemy.exc import SQLAlchemyError

    from .migrations import NewerSchema

    try:
        return JobStore(url, migrate=True)
    except NewerSchema as err:
        raise ConfigError(str(err)) from None
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise ConfigError(f"cannot open the job store at {mask_url(url)}: {reason}") from None


def make_executor(
    config: ServerConfig,
    store: JobStore,
    on_finished: Callable[[str], None] | None = None,
    on_started: Callable[[str], None] | None = None,
) -> Executor:
    """The executor the configuration names (Ray is imported only when asked for)."""
    if config.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(config, store, on_finished=on_finished, on_started=on_started)
    return LocalExecutor(config, store, on_finished=on_finished, on_started=on_started)


def _remove_if_ours(info: Path) -> None:
    """Remove server.json unless another replica sharing the data directory wrote it since."""
    try:
        if json.loads(info.read_text()).get("pid") == os.getpid():
            info.unlink()
    except (OSError, ValueError):
        pass


class Application:
    """The running service; ``start()`` returns the bound port, ``stop()`` drains and stops."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port = 0
        self.server: grpc.Server | None = None
        self.health_server: grpc.Server | None = None

    def start(self) -> int:
        c = self.config
        c.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        c.jobs_path.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        self.store = _open_store(c.effective_database_url)
        for audit_id, state in self.store.recover(max_attempts=c.max_attempts, owner=c.node_id):
            log.warning("job %s was running when this node stopped: now %s", audit_id, state)
        self.engine = load_engine(c.engine)
        self.tracker = Tracker(c, self.store) if c.tracking_enabled else None
        tracker = self.tracker
        wake = (lambda _audit_id: tracker.wake()) if tracker else None
        self.executor = make_executor(c, self.store, on_finished=wake, on_started=wake)
        self.service = AuditService(c, self.store, self.executor, self.engine)

        interceptors = []
        if c.auth:
            token = c.token or ensure_token(c.effective_token_file)
            interceptors.append(BearerTokenInterceptor([token]))
        else:
            log.warning("authentication is OFF: anyone who reaches %s can submit audits", c.listen)
        options = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share
            # Ping silent connections, and keep pinging a stream that sends nothing (the
            # default stops after 2 pings without data): a vanished client's streams end.
            ("grpc.keepalive_time_ms", int(c.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(c.keepalive_timeout_seconds * 1000)),
            # grpcio 1.85 drops a connection whose ping goes unanswered only after this
            # (60 s by default), whatever keepalive_timeout_ms says: set both.
            ("grpc.http2.ping_timeout_ms", int(c.keepalive_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients may ping every 10 s (gRPC refuses pings closer than 5 min by default).
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        server = grpc.server(
            ThreadPoolExecutor(max_workers=c.rpc_threads, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=options,
            # Each stream holds a thread: beyond this, calls fail fast (RESOURCE_EXHAUSTED)
            # instead of waiting behind long WatchAudit streams.
            maximum_concurrent_rpcs=c.rpc_threads,
        )
        service_pb2_grpc.add_ConceptAuditServicer_to_server(
            ConceptAuditServicer(self.service), server
        )
        operations_pb2_grpc.add_OperationsServicer_to_server(
            OperationsServicer(self.service), server
        )
        # One servicer behind both ports: drain's NOT_SERVING shows on each. The health-only
        # server has no cap and no streams of ours (Health.Watch holds no thread), so
        # however busy the main port, a probe is answered.
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([*SERVICE_NAMES, reflection.SERVICE_NAME], server)
        health_server = grpc.server(
            ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="health"),
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)

        credentials = None
        if c.tls:
            credentials = grpc.ssl_server_credentials(
                [(_read(c.tls_key), _read(c.tls_cert))],
                root_certificates=_read(c.tls_client_ca) if c.tls_client_ca else None,
                require_client_auth=bool(c.tls_client_ca),
            )
        self.port = _bind(server, c.listen, credentials)
        health_port = _bind(health_server, c.effective_health_listen)
        self.server, self.health_server = server, health_server

        if self.tracker:
            self.tracker.start()
        self.executor.start()
        health_server.start()
        server.start()
        for name in ["", *SERVICE_NAMES]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        warm_up = getattr(self.engine, "warm_up", None)
        if callable(warm_up):
            threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
        self.address = f"{c.listen.rsplit(':', 1)[0]}:{self.port}"
        self.health_address = f"{c.effective_health_listen.rsplit(':', 1)[0]}:{health_port}"
        # Written whole, then renamed: a client polling for it never reads half a file.
        info = c.data_path / f"server.json.{os.getpid()}.tmp"  # replicas may share data_dir
        info.write_text(
            json.dumps(
                {
                    "address": self.address,
                    "health_address": self.health_address,
                    "pid": os.getpid(),
                    "tls": c.tls,
                }
            )
        )
        info.replace(c.data_path / "server.json")
        log.info(
            "cnp-server %s listening on %s (%s), health checks also on %s",
            __version__,
            self.address,
            "TLS" if c.tls else "plaintext",
            self.health_address,
        )
        return self.port

    def _lock_data_dir(self) -> None:
        """With the embedded SQLite store, one server per data directory: a second one
        would take the first one's running jobs for orphans and run them again."""
        if self.config.database_url:  # a shared store: replicas coordinate through it
            return
        self._lock = (self.config.data_path / "server.lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another cnp-server is using {self.config.data_path}; "
                "stop it or give this one another --data-dir"
            ) from None

    def stop(self) -> None:
        log.info("shutting down: health NOT_SERVING, no new audits, draining running jobs")
        self.health.enter_graceful_shutdown()
        self.service.stopping.set()
        self.executor.stop(self.config.drain_seconds)
        if self.tracker:
            self.tracker.stop()
        if self.server is not None:
            self.server.stop(grace=5.0).wait()
        if self.health_server is not None:  # last: probes see NOT_SERVING until the end
            self.health_server.stop(grace=1.0).wait()
        self.store.close()
        _remove_if_ours(self.config.data_path / "server.json")
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as err:
        print(f"cnp-server: {err}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    log.info("effective configuration: %s", json.dumps(config.masked(), sort_keys=True))
    app = Application(config)
    try:
        app.start()
    except ConfigError as err:
        log.error("%s", err)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
