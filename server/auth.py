"""Bearer-token authentication: the token file and the server interceptor.

Every call needs ``authorization: Bearer <token>`` except health checks and reflection,
which stay open so probes and tools work without secrets.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from cnp_core.paths import read_secret

from .config import ConfigError
from .errors import Failure, abort

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def ensure_token(path: Path) -> str:
    """The token stored at ``path``; a new random one (file mode 0600) when absent. An
    existing token file that others may read is refused (:func:`read_secret`)."""
    if path.is_file():
        token = read_secret(path, "token file", ConfigError)
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Create with 0600 from the start: never world-readable, not even for an instant.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    os.chmod(path, 0o600)
    log.info("generated a bearer token at %s", path)
    return token


def _deny(message: str, reason: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    failure = Failure(code="UNAUTHENTICATED", message=message, reason=reason)

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, failure)

    return deny


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        if not self._tokens:
            raise ValueError("at least one token is needed")

    def _valid(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        offered = header[len("Bearer ") :].strip().encode()
        # Constant-time comparison against every accepted token.
        return any(hmac.compare_digest(offered, token) for token in self._tokens)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization")
        if self._valid(header):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if header:
            deny = _deny("invalid bearer token", "INVALID_TOKEN")
        else:
            deny = _deny("missing bearer token", "MISSING_TOKEN")
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
