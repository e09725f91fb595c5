"""What the blocking and the asyncio client share, so they cannot drift apart: how the
channel is set up, the request each method sends, when a failed call is tried again,
and how a streamed artifact lands on disk."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf.duration_pb2 import Duration

from cnp.v1 import service_pb2, service_pb2_grpc
from cnp_core import convert
from cnp_core.paths import read_secret
from cnp_core.spec import AuditSpec

from .errors import DeadlineExceeded, Internal, NotFound, ServiceError

if TYPE_CHECKING:
    from .client import Artifact

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_BACKOFF = 8.0  # seconds between two tries of our own choosing
# A server may ask for a longer wait (RetryInfo); past this the error is raised at once,
# with its retry_delay, so that a caller decides instead of a client hanging silently.
MAX_SERVER_RETRY_DELAY = 60.0
WAIT_SLICE = 60.0  # one WaitOperation call waits at most this long on the server
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


# --- connection -----------------------------------------------------------------------


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


def default_token(
    token: str | None = None, token_file: str | os.PathLike | None = None
) -> str | None:
    """The bearer token: argument, file argument, $CNP_TOKEN, $CNP_TOKEN_FILE, then the
    embedded server's token file ($CNP_DATA_DIR/token or ./.cnp/token) if it exists."""
    if token:
        return token
    if token_file:
        return read_secret(Path(token_file), "token file", PermissionError)
    if os.environ.get("CNP_TOKEN"):
        return os.environ["CNP_TOKEN"]
    if os.environ.get("CNP_TOKEN_FILE"):
        return read_secret(os.environ["CNP_TOKEN_FILE"], "token file", PermissionError)
    local = Path(os.environ.get("CNP_DATA_DIR", ".cnp")).expanduser() / "token"
    return read_secret(local, "token file", PermissionError) if local.is_file() else None


@dataclass(frozen=True)
class Connection:
    """What a channel needs: TLS credentials (None: plaintext), options, call metadata."""

    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]


def connection(
    *,
    token: str | None,
    token_file: str | os.PathLike | None,
    root_certificates: bytes | str | os.PathLike | None,
    client_certificate: bytes | str | os.PathLike | None,
    client_key: bytes | str | os.PathLike | None,
    max_message_bytes: int,
) -> Connection:
    """The channel parts of a client's options (both clients take the same ones)."""
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together")
    if client_certificate is not None and root_certificates is None:
        raise ValueError("a client certificate needs TLS: give root_certificates too")
    credentials = None
    if root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(root_certificates),
            private_key=_pem(client_key),
            certificate_chain=_pem(client_certificate),
        )
    secret = default_token(token, token_file)
    return Connection(
        credentials=credentials,
        options=(
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ),
        metadata=(("authorization", f"Bearer {secret}"),) if secret else (),
    )


class Endpoint:
    """The channel, credentials and stubs of a client; ``channels`` is ``grpc`` or
    ``grpc.aio``."""

    channels: Any

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        root_certificates: bytes | str | os.PathLike | None = None,
        client_certificate: bytes | str | os.PathLike | None = None,
        client_key: bytes | str | os.PathLike | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
    ) -> None:
        self.address, self.timeout, self.retries, self.backoff = address, timeout, retries, backoff
        link = connection(
            token=token,
            token_file=token_file,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            max_message_bytes=max_message_bytes,
        )
        self._metadata = link.metadata
        if link.credentials is not None:
            self._channel = self.channels.secure_channel(
                address, link.credentials, options=link.options
            )
        else:
            self._channel = self.channels.insecure_channel(address, options=link.options)
        self._audit = service_pb2_grpc.ConceptAuditStub(self._channel)
        self._operations = operations_pb2_grpc.OperationsStub(self._channel)


# --- requests -------------------------------------------------------------------------


def create_request(
    spec: AuditSpec,
    request_id: str | None,
    *,
    experiment: str = "",
    tags: Mapping[str, str] | None = None,
    register_model: str = "",
) -> service_pb2.CreateAuditRequest:
    """A submission; a fresh request id when none is given (so a retry is the same job)."""
    return service_pb2.CreateAuditRequest(
        spec=convert.spec_to_proto(spec),
        request_id=request_id or uuid.uuid4().hex,
        tracking=service_pb2.TrackingOptions(
            experiment=experiment, tags=dict(tags or {}), register_model=register_model
        ),
    )


def get_request(job_id: str) -> operations_pb2.GetOperationRequest:
    return operations_pb2.GetOperationRequest(name=convert.operation_name(job_id))


def cancel_request(job_id: str) -> operations_pb2.CancelOperationRequest:
    return operations_pb2.CancelOperationRequest(name=convert.operation_name(job_id))


def delete_request(job_id: str) -> operations_pb2.DeleteOperationRequest:
    return operations_pb2.DeleteOperationRequest(name=convert.operation_name(job_id))


def list_request(
    page_size: int, page_token: str, state: str | None
) -> operations_pb2.ListOperationsRequest:
    return operations_pb2.ListOperationsRequest(
        name="operations",
        page_size=page_size,
        page_token=page_token,
        filter=f"state={state}" if state else "",
    )


def wait_request(job_id: str, seconds: float) -> operations_pb2.WaitOperationRequest:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return operations_pb2.WaitOperationRequest(
        name=convert.operation_name(job_id), timeout=duration
    )


def watch_request(job_id: str) -> service_pb2.WatchAuditRequest:
    return service_pb2.WatchAuditRequest(audit_id=job_id)


def report_request(job_id: str) -> service_pb2.GetAuditReportRequest:
    return service_pb2.GetAuditReportRequest(audit_id=job_id)


def artifacts_request(job_id: str) -> service_pb2.ListArtifactsRequest:
    return service_pb2.ListArtifactsRequest(audit_id=job_id)


def read_request(job_id: str, name: str, offset: int) -> service_pb2.ReadArtifactRequest:
    return service_pb2.ReadArtifactRequest(audit_id=job_id, name=name, offset=offset)


def metadata_request() -> service_pb2.GetServerMetadataRequest:
    return service_pb2.GetServerMetadataRequest()


# --- retries --------------------------------------------------------------------------


def retry_delay(error: ServiceError, failures: int, retries: int, backoff: float) -> float | None:
    """Seconds to wait before trying a failed call again, or None to raise ``error``.

    Only UNAVAILABLE is tried again (a submission carries its request id, so even a
    retried submit is one job). The server's RetryInfo, when it sends one, sets the
    wait; otherwise it grows exponentially from ``backoff``.
    """
    if error.code != "UNAVAILABLE" or failures >= retries:
        return None
    if error.retry_delay is not None:
        return error.retry_delay if error.retry_delay <= MAX_SERVER_RETRY_DELAY else None
    return min(backoff * 2**failures, MAX_BACKOFF)


def wait_deadline(timeout: float | None) -> float | None:
    """The monotonic time a ``wait(timeout=...)`` gives up at (None: never)."""
    return None if timeout is None else time.monotonic() + timeout


def next_wait(deadline: float | None) -> float | None:
    """How long the next WaitOperation may wait on the server; None once ``deadline``
    has passed (then one last GetOperation decides)."""
    if deadline is None:
        return WAIT_SLICE
    left = deadline - time.monotonic()
    return min(left, WAIT_SLICE) if left > 0 else None


def still_running(job_id: str, state: str, timeout: float | None) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"audit {job_id} still {state} after {timeout or 0:g} s", audit_id=job_id
    )


# --- artifacts ------------------------------------------------------------------------


class ArtifactFile:
    """A download in progress: chunks go to ``<path>.part``, which becomes ``path`` only
    when its size and sha256 match what the server listed."""

    def __init__(self, job_id: str, info: Artifact, path: str | os.PathLike) -> None:
        self.job_id, self.info = job_id, info
        self.target = Path(path)
        self.partial = self.target.with_name(self.target.name + ".part")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._digest = hashlib.sha256()
        self._handle = self.partial.open("wb")

    @property
    def offset(self) -> int:
        """Where a (resumed) stream has to start."""
        return self._handle.tell()

    def write(self, chunk: service_pb2.ReadArtifactResponse) -> None:
        if chunk.offset != self.offset:
            raise Internal(f"artifact stream out of order at {chunk.offset}", audit_id=self.job_id)
        self._handle.write(chunk.data)
        self._digest.update(chunk.data)

    def discard(self) -> None:
        """Drop the partial file (idempotent)."""
        self._handle.close()
        self.partial.unlink(missing_ok=True)

    def finish(self) -> Path:
        size = self.offset
        self._handle.close()
        if size != self.info.size or self._digest.hexdigest() != self.info.sha256:
            self.partial.unlink(missing_ok=True)
            raise Internal(
                f"artifact {self.info.name!r} arrived corrupted ({size} of {self.info.size} bytes)",
                audit_id=self.job_id,
            )
        self.partial.replace(self.target)
        return self.target


def find_artifact(job_id: str, artifacts: Sequence[Artifact], name: str) -> Artifact:
    info = {a.name: a for a in artifacts}.get(name)
    if info is None:
        raise NotFound(f"audit {job_id} has no artifact {name!r}", audit_id=job_id)
    return info


_MODEL_PREFIXES = ("model_compact", "model_masked")
_MODEL_SUFFIXES = (".pt2", ".safetensors", ".onnx")


def _model_rank(artifact: Artifact) -> tuple[int, int, str]:
    """Compact before masked; then pt2, safetensors, onnx, anything else; then by name."""
    kind = 0 if artifact.name.startswith("model_compact") else 1
    suffix = next(
        (i for i, s in enumerate(_MODEL_SUFFIXES) if artifact.name.endswith(s)),
        len(_MODEL_SUFFIXES),
    )
    return kind, suffix, artifact.name


def choose_model(
    job_id: str, artifacts: Sequence[Artifact], path: str | os.PathLike, format: str | None
) -> Artifact:
    """The pruned model to download (see ``AuditClient.download_model``)."""
    models = [a for a in artifacts if a.name.startswith(_MODEL_PREFIXES)]
    suffix = Path(path).suffix
    if format is None and any(a.name.endswith(suffix) for a in models if suffix):
        format = suffix
    if format:
        models = [a for a in models if a.name.endswith("." + format.lstrip("."))]
    if not models:
        wanted = f" in format {format!r}" if format else ""
        raise NotFound(
            f"audit {job_id} has no pruned model{wanted} (was pruning requested?)",
            audit_id=job_id,
        )
    return min(models, key=_model_rank)
