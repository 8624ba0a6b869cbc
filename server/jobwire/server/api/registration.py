"""Registers servicers so that every call is authenticated first, and a request which does not decode
is INVALID_ARGUMENT, not UNKNOWN.

The generated ``add_*Servicer_to_server`` lets grpcio decode requests, and grpcio answers a
``DecodeError`` with UNKNOWN. Here grpcio hands over raw bytes and we decode them ourselves, after the
caller's credentials are checked (an unauthenticated caller learns nothing, not even how its request
would have been judged). The servicer reads the caller with ``authentication.current_caller()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from jobwire.server.api.authentication import Authenticator, set_caller
from jobwire.server.api.errors import abort, invalid
from jobwire.server.errors import JobwireError, Starting

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


Ready = Callable[[], bool]


async def _authenticate(
    authenticator: Authenticator, ready: Ready, context: grpc.aio.ServicerContext
) -> None:
    """The caller's credentials, then whether the server is ready to serve (a server still recovering
    its queue answers UNAVAILABLE, SERVER_STARTING, with a RetryInfo)."""
    try:
        set_caller(authenticator.caller(context))
        if not ready():
            raise Starting("the server is starting: it is recovering its jobs from the store; retry shortly")
    except JobwireError as error:
        await abort(context, error)


def _decoding(
    method: Handler, descriptor: MethodDescriptor, authenticator: Authenticator, ready: Ready
) -> Handler:
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    type_name = descriptor.input_type.full_name

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        await _authenticate(authenticator, ready, context)
        try:
            request = request_class.FromString(raw)
        except DecodeError as error:
            await abort(context, invalid("request", f"not a valid {type_name} message: {error}"))
        return await method(request, context)

    return handle


def _decoding_stream(
    method: Handler, descriptor: MethodDescriptor, authenticator: Authenticator, ready: Ready
) -> Handler:
    """For client streaming: the servicer gets an async iterator of decoded messages.

    A message that does not decode raises InvalidArgument from the iterator: the servicer, which may be
    reading it in a task of its own, ends the call with it (aborting here would race with the servicer).
    """
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    type_name = descriptor.input_type.full_name

    async def handle(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        await _authenticate(authenticator, ready, context)

        async def decoded() -> AsyncIterator[Any]:
            async for raw in raw_requests:
                try:
                    message = request_class.FromString(raw)
                except DecodeError as error:
                    raise invalid("request", f"not a valid {type_name} message: {error}") from None
                yield message

        return await method(decoded(), context)

    return handle


def add_servicer(
    servicer: object,
    service: ServiceDescriptor,
    server: grpc.aio.Server,
    authenticator: Authenticator,
    ready: Ready = lambda: True,
) -> None:
    """Register every RPC of ``service`` implemented by ``servicer`` (any streaming kind)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for descriptor in service.methods:
        method = getattr(servicer, descriptor.name)
        serialize = message_factory.GetMessageClass(descriptor.output_type).SerializeToString
        if descriptor.client_streaming:
            make = (
                grpc.stream_stream_rpc_method_handler
                if descriptor.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            handlers[descriptor.name] = make(
                _decoding_stream(method, descriptor, authenticator, ready), response_serializer=serialize
            )
            continue
        make = (
            grpc.unary_stream_rpc_method_handler
            if descriptor.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[descriptor.name] = make(
            _decoding(method, descriptor, authenticator, ready), response_serializer=serialize
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
