"""A worker session driven by hand through the generated stubs, for tests of what a worker may send.

Unlike the SDK's Worker it sends exactly what the test says, well-formed or not, and lets the test read
every answer.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from types import TracebackType

import grpc

from jobwire.v1 import worker_service_pb2 as W
from jobwire.v1 import worker_service_pb2_grpc

WAIT = 20.0


class RawWorker:
    """One Connect stream: ``send`` requests, ``next`` responses of a given kind."""

    def __init__(self, target: str, token: str | None = None) -> None:
        self._requests: queue.Queue[W.ConnectRequest | None] = queue.Queue()
        self._channel = grpc.insecure_channel(target)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._responses = worker_service_pb2_grpc.WorkerServiceStub(self._channel).Connect(
            self._outgoing(), timeout=120, metadata=metadata
        )

    def _outgoing(self) -> Iterator[W.ConnectRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, request: W.ConnectRequest) -> None:
        self._requests.put(request)

    def register(self, *types: str, credits: int = 1, worker_id: str = "raw") -> W.WorkerRegistered:
        self.send(
            W.ConnectRequest(
                register=W.RegisterWorker(
                    worker_id=worker_id,
                    job_types=[W.JobTypeDeclaration(type=t) for t in types],
                    credits=credits,
                )
            )
        )
        return self.next("registered").registered

    def next(self, kind: str) -> W.ConnectResponse:
        """The next response of this kind (others are skipped); raises the call's RpcError if it ends."""
        response: W.ConnectResponse
        for response in self._responses:
            if response.WhichOneof("message") == kind:
                return response
        raise AssertionError(f"the stream ended while {kind} was expected")

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
        self._channel.close()

    def __enter__(self) -> RawWorker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
