"""A worker session driven by hand through the generated stubs, for tests of what a worker may send.

Unlike the SDK's Worker it sends exactly what the test says, well-formed or not, and lets the test read
every answer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import grpc

from jobwire.v1 import worker_service_pb2 as W
from jobwire.v1 import worker_service_pb2_grpc

WAIT = 20.0


class RawWorker:
    """One WorkerService.Connect stream: ``send`` requests, ``next`` responses of a given kind.

    ``token`` is sent as a bearer token, ``credentials`` (grpc channel credentials) make the channel
    TLS. A thread reads every response into a queue, so that ``next`` can wait with a deadline, and
    ``received`` keeps them all.
    """

    def __init__(self, target: str, token: str | None = None, credentials: Any = None) -> None:
        self._requests: queue.Queue[W.ConnectRequest | None] = queue.Queue()
        self._responses: queue.Queue[W.ConnectResponse | BaseException] = queue.Queue()
        self.received: list[W.ConnectResponse] = []
        self._channel = (
            grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
        )
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._call = worker_service_pb2_grpc.WorkerServiceStub(self._channel).Connect(
            self._outgoing(), metadata=metadata, timeout=120
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _outgoing(self) -> Iterator[W.ConnectRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
        except grpc.RpcError as err:
            self._responses.put(err)
        else:
            self._responses.put(EOFError("the stream ended"))

    def send(self, request: W.ConnectRequest) -> None:
        self._requests.put(request)

    def register(
        self, *types: str, credits: int = 1, worker_id: str = "raw", accepts_batches: bool = False
    ) -> W.WorkerRegistered:
        """Send RegisterWorker; its WorkerRegistered, or the RpcError that ended the stream."""
        self.send(
            W.ConnectRequest(
                register=W.RegisterWorker(
                    worker_id=worker_id,
                    job_types=[W.JobTypeDeclaration(type=t) for t in types],
                    credits=credits,
                    accepts_batches=accepts_batches,
                )
            )
        )
        return self.next("registered").registered

    def next(
        self,
        kind: str | None,
        timeout: float = WAIT,
        where: Callable[[W.ConnectResponse], bool] | None = None,
    ) -> W.ConnectResponse:
        """The next response of this kind (any kind if None; that ``where`` accepts); others are kept in
        ``received`` only. Raises the call's RpcError if the stream ended with one, EOFError if it ended
        with OK."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} within {timeout}s; received {len(self.received)} messages")
            try:
                item = self._responses.get(timeout=remaining)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                self._responses.put(item)  # every later next() sees the end too
                raise item
            self.received.append(item)
            if kind in (None, item.WhichOneof("message")) and (where is None or where(item)):
                return item

    def messages(self, kind: str) -> list[W.ConnectResponse]:
        return [m for m in self.received if m.WhichOneof("message") == kind]

    def unbatched(self, kind: str) -> list[W.ConnectResponse]:
        """The responses of this kind received so far, alone or inside a ConnectResponseBatch."""
        found: list[W.ConnectResponse] = []
        for message in self.received:
            inner = message.batch.messages if message.WhichOneof("message") == "batch" else [message]
            found.extend(m for m in inner if m.WhichOneof("message") == kind)
        return found

    def collect(self, kind: str, count: int, timeout: float = WAIT) -> list[W.ConnectResponse]:
        """Read until ``count`` responses of this kind have arrived (see ``unbatched``); all of them."""
        while len(found := self.unbatched(kind)) < count:
            self.next(None, timeout)
        return found

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()
        self._reader.join(5)

    def __enter__(self) -> RawWorker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
