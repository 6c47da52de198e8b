"""Client side of the control plane: authenticated channels to the master.

Every call carries the job's shared secret as ``authorization: Bearer TOKEN`` metadata; the master
refuses calls without it (see :mod:`oobleck.control.auth`). With the job's certificate (TLS on, see
:mod:`oobleck.control.tls`) the channel is TLS and trusts that certificate alone. Channels send keepalive
pings, so a master that stops answering (hung, or its machine cut off) breaks their calls instead of
leaving them blocked forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import grpc

from oobleck.control import oobleck_pb2_grpc
from oobleck.errors import OobleckError

#: Assignments carry the whole plan and config: the master sends, and clients receive, up to this much
#: (gRPC's default is 4 MB). Requests to the master stay small (see MAX_REQUEST_BYTES).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: The most the master accepts in one request. gRPC applies its receive limit before any handler (so before
#: the token check): a limit as large as MAX_MESSAGE_BYTES would let anyone who can reach the port make the
#: master buffer that much per call. Requests are heartbeats, registrations, exits, assignment requests
#: and injections; the largest legitimate one is an InjectRequest naming nodes (names are at most 128
#: bytes: some 450 of them fit), everything else is well under 1 KiB.
MAX_REQUEST_BYTES = 64 * 1024
#: Client keepalive: a ping after this long without activity on the connection...
KEEPALIVE_TIME_MS = 10_000
#: ...unanswered for this long closes the connection, failing its calls with UNAVAILABLE.
KEEPALIVE_TIMEOUT_MS = 5_000
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
]
#: The master's side: small requests, large replies, and permission for the clients' keepalive pings (a
#: server that gets pings more often than it allows answers with GOAWAY "too_many_pings").
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for pinging
    # and the master pings too: the connection of a client that stopped answering is closed, ending its
    # calls (an agent's Session, a worker's GetAssignment) instead of holding a handler thread forever
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
]
TOKEN_METADATA_KEY = "authorization"


def bearer(token: str) -> str:
    """The metadata value that carries ``token``."""
    return f"Bearer {token}"


def read_token(path: str | Path) -> str:
    """The shared secret stored in ``path`` (surrounding whitespace stripped); OobleckError if unreadable
    or empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise OobleckError(f"--token-file {path}: cannot read ({e.strerror}); pass the job's token file") from None
    if not token:
        raise OobleckError(f"--token-file {path}: the file is empty; pass the job's token file")
    return token


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to the metadata of every call."""

    def __init__(self, token: str) -> None:
        self._metadata = (TOKEN_METADATA_KEY, bearer(token))

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or []) + [self._metadata]
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def open_channel(address: str, token: str | None, cert: bytes | None = None) -> grpc.Channel:
    """A channel to ``address`` (``host:port``) with raised message limits and keepalive that sends
    ``token`` on every call (no token at all when ``token`` is None). With ``cert`` (the job's PEM
    certificate) the channel is TLS and trusts that certificate only; without, it is plaintext."""
    if cert is None:
        channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    else:
        from oobleck.control.tls import SERVER_NAME

        credentials = grpc.ssl_channel_credentials(root_certificates=cert)
        options = GRPC_OPTIONS + [("grpc.ssl_target_name_override", SERVER_NAME)]
        channel = grpc.secure_channel(address, credentials, options=options)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _TokenInterceptor(token))


def wait_ready(channel: grpc.Channel, address: str, timeout_s: float, tls: bool = False) -> None:
    """Block until ``channel`` connects; OobleckError naming ``address`` if it does not within
    ``timeout_s`` seconds."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        hint = "; check --master and that the job is running"
        if tls:
            hint += ", and that --cert-file is this job's certificate (a TLS handshake with another fails)"
        raise OobleckError(f"master {address} unreachable after {timeout_s:g} s{hint}") from None


def master_stub(channel: grpc.Channel) -> oobleck_pb2_grpc.MasterStub:
    """The generated client of the Master service over ``channel``."""
    return oobleck_pb2_grpc.MasterStub(channel)
