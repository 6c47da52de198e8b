"""Server-side gate of the control plane: the shared-secret check and wire-format validation.

One interceptor wraps every Master method so that (1) a call whose ``authorization`` metadata is not
``Bearer TOKEN`` ends with UNAUTHENTICATED before any handler runs, and (2) request bytes that do not
parse as the method's message end with INVALID_ARGUMENT (gRPC's own default would be INTERNAL), so a
malformed client never reaches the master's state.
"""

from __future__ import annotations

import hmac
from typing import Any, Callable, Iterator

import grpc

from oobleck.control.channel import TOKEN_METADATA_KEY, bearer


def _parse(deserializer: Callable[[bytes], Any] | None, raw: bytes, context: grpc.ServicerContext) -> Any:
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception as e:  # protobuf raises DecodeError and friends; any of them means bad bytes
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {type(e).__name__}: {e}")


def _parse_stream(
    deserializer: Callable[[bytes], Any] | None, raws: Iterator[bytes], context: grpc.ServicerContext
) -> Iterator[Any]:
    for raw in raws:
        yield _parse(deserializer, raw, context)


class TokenInterceptor(grpc.ServerInterceptor):
    """Admits a call only with the right bearer token and well-formed request messages."""

    def __init__(self, token: str) -> None:
        self._expected = bearer(token).encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)  # constant time: no timing oracle
        return False

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if not self._authorized(details):
            return _refusal(handler)
        return _validating(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call without reading it."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong job token")

    return _same_shape(handler, deny, deny)


def _validating(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with request deserialisation moved inside, where a failure becomes INVALID_ARGUMENT."""
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    deserializer = handler.request_deserializer

    def unary(raw: bytes, context: grpc.ServicerContext) -> Any:
        return behavior(_parse(deserializer, raw, context), context)

    def streaming(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        return behavior(_parse_stream(deserializer, raws, context), context)

    return _same_shape(handler, unary, streaming)


def _same_shape(handler: grpc.RpcMethodHandler, unary: Callable, streaming: Callable) -> grpc.RpcMethodHandler:
    """A handler with ``handler``'s cardinality and response serializer whose behaviour is ``unary`` (for
    single-request methods) or ``streaming`` (for request-stream methods); requests arrive as raw bytes."""
    ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(streaming, response_serializer=ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(unary, response_serializer=ser)
    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=ser)
