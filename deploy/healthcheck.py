"""Exit 0 when cnp-server's health-only port answers SERVING, 1 otherwise.

The image's HEALTHCHECK and compose's health checks run it; Kubernetes probes the same port
with its own gRPC probe. The health port (health_listen) speaks plaintext whatever the TLS
setting of the main port, so this needs neither certificates nor a token.

    python healthcheck.py [HOST:PORT [SERVICE]]   # default localhost:50052, overall status
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "localhost:50052"
TIMEOUT_SECONDS = 3.0


def check(address: str, service: str = "") -> tuple[bool, str]:
    """Whether ``address`` says SERVING for ``service``, and what it said."""
    request = health_pb2.HealthCheckRequest(service=service)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(request, timeout=TIMEOUT_SECONDS).status
    except grpc.RpcError as err:
        return False, err.code().name
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return status == health_pb2.HealthCheckResponse.SERVING, name


def main(argv: list[str]) -> int:
    address = argv[0] if argv else DEFAULT_ADDRESS
    service = argv[1] if len(argv) > 1 else ""
    serving, said = check(address, service)
    print(f"{address} {service or '(overall)'}: {said}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
