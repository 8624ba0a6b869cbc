"""Several Connect stream messages sent as one, on both ends of WorkerService.

A stream message costs the sender's and the receiver's event loops far more than the protobuf inside
it, so whatever is queued at once (a dispatch round's assignments, a commit's write results, a burst of
outcomes and credits) travels as one ConnectResponseBatch or ConnectRequestBatch, when the other end
said it accepts them. See ``protos/jobwire/v1/worker_service.proto``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

# A batch stops growing past this many bytes: far below the 4 MiB message limit that gRPC clients and
# the server apply by default; a larger single message is sent on its own.
BATCH_BYTES = 1 << 20
# At most this many queued messages are taken for one batch.
BATCH_MESSAGES = 256

M = TypeVar("M", bound=Message)


def batched(messages: Sequence[M], wrap: Callable[[list[M]], M], budget: int = BATCH_BYTES) -> list[M]:
    """``messages`` as few stream messages: runs of at most ``budget`` bytes, each run of two or more
    wrapped by ``wrap`` (a run of one is sent as itself)."""
    if len(messages) == 1:
        return list(messages)
    out: list[M] = []
    run: list[M] = []
    size = 0
    for message in messages:
        message_size = message.ByteSize()
        if run and size + message_size > budget:
            out.append(run[0] if len(run) == 1 else wrap(run))
            run, size = [], 0
        run.append(message)
        size += message_size
    if run:
        out.append(run[0] if len(run) == 1 else wrap(run))
    return out
