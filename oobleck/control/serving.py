"""What the master serves on: its gRPC server (token-gated, TLS when wanted); its TCPStore is started by
:func:`oobleck.store_server.start_store`."""

from __future__ import annotations

import logging
import socket
from concurrent import futures

import grpc

from oobleck.control import oobleck_pb2_grpc, tls
from oobleck.control.auth import TokenInterceptor
from oobleck.control.channel import SERVER_OPTIONS
from oobleck.errors import OobleckError

log = logging.getLogger(__name__)


def bind_server(
    servicer: oobleck_pb2_grpc.MasterServicer, host: str, port: int, token: str, want_tls: bool | None, workers: int
) -> tuple[grpc.Server, str, bytes | None]:
    """A server for ``servicer`` bound to ``host:port`` (0 = a free port) with ``workers`` handler threads,
    behind the token gate; with TLS (``tls.wanted(want_tls, host)``) under a fresh key and certificate.
    Returns (the server, not started yet, the address agents connect to, the certificate PEM or None).
    OobleckError if the port is taken."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="master-rpc"),
        interceptors=[TokenInterceptor(token)],
        # SO_REUSEPORT would let two masters share a port silently
        options=SERVER_OPTIONS + [("grpc.so_reuseport", 0)],
    )
    oobleck_pb2_grpc.add_MasterServicer_to_server(servicer, server)
    material = tls.make_material(host) if tls.wanted(want_tls, host) else None
    if material is None and not tls.is_loopback(host):
        log.warning("cluster.tls is off: the control plane (and its token) to %s travels in plaintext", host)
    try:
        if material is None:
            bound = server.add_insecure_port(join_address(host, port))
        else:
            credentials = grpc.ssl_server_credentials([(material.key_pem, material.cert_pem)])
            bound = server.add_secure_port(join_address(host, port), credentials)
    except RuntimeError:
        raise OobleckError(
            f"cluster.master_port: cannot bind {join_address(host, port)} (in use or not a local address); "
            "choose a free port, or 0 for any free port"
        ) from None
    return server, join_address(host, bound), material.cert_pem if material is not None else None


def join_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def store_host(configured: str) -> str:
    """Where workers reach the store the master bound on ``configured``: a wildcard bind is reachable at
    this machine's name, not at the wildcard itself."""
    return socket.gethostname() if configured in ("0.0.0.0", "::", "") else configured
