"""Client side of the control plane: authenticated channels to the master.

Every call carries the job's shared secret as ``authorization: Bearer TOKEN`` metadata; the master
refuses calls without it (see :mod:`oobleck.control.auth`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import grpc

from oobleck.control import oobleck_pb2_grpc
from oobleck.errors import OobleckError

#: Assignments carry the whole plan and config; lift gRPC's 4 MB default on both ends.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
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


def open_channel(address: str, token: str | None) -> grpc.Channel:
    """An insecure channel to ``address`` (``host:port``) with raised message limits that sends
    ``token`` on every call (no token at all when ``token`` is None)."""
    channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _TokenInterceptor(token))


def wait_ready(channel: grpc.Channel, address: str, timeout_s: float) -> None:
    """Block until ``channel`` connects; OobleckError naming ``address`` if it does not within
    ``timeout_s`` seconds."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise OobleckError(
            f"master {address} unreachable after {timeout_s:g} s; check --master and that the job is running"
        ) from None


def master_stub(channel: grpc.Channel) -> oobleck_pb2_grpc.MasterStub:
    """The generated client of the Master service over ``channel``."""
    return oobleck_pb2_grpc.MasterStub(channel)
