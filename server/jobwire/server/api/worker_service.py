"""WorkerService over gRPC: one Connect stream per worker session, translated to JobManager calls.

Two tasks serve a stream: the reader applies what the worker says (credits, progress, heartbeats,
outcomes), the sender writes what the manager queued on the session (assignments, cancellations,
revoked leases, write results). Outcome writes run as tasks of their own, so a worker's progress and
heartbeats are not held up behind a commit.

Batches: a stream message costs the event loop far more than the protobuf inside it, so a worker that
says it accepts batches gets whatever is queued for it (one dispatch round's assignments, one commit's
write results) as one ConnectResponseBatch, and the server takes a ConnectRequestBatch of the worker's
outcomes and credits. Under light load a batch is a single message, sent as itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from jobwire.handlers.api import MAX_PROGRESS_DETAILS_BYTES
from jobwire.server.api import convert
from jobwire.server.api.authentication import current_caller
from jobwire.server.api.errors import abort, invalid
from jobwire.server.errors import Draining, JobwireError
from jobwire.server.job import MAX_RESULT_BYTES, ErrorCode, JobError, Progress, clip, result_too_large
from jobwire.server.job_types import JobType
from jobwire.server.manager import Abandoned, Failed, JobManager, Outcome, Succeeded
from jobwire.server.validation import MAX_REASON
from jobwire.server.workers import (
    Assignment,
    CancelRequest,
    LeaseRevoked,
    LeaseToken,
    OutboxMessage,
    WorkerSession,
    WriteResult,
)
from jobwire.v1 import worker_service_pb2 as pb
from jobwire.v1 import worker_service_pb2_grpc
from jobwire.worker.batches import BATCH_MESSAGES, batched

log = logging.getLogger("jobwire.api.workers")


class WorkerServiceServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    """WorkerService.Connect, translated to worker-session calls on the JobManager."""

    def __init__(self, manager: JobManager) -> None:
        self._manager = manager

    async def Connect(  # type: ignore[override]  # requests arrive decoded by registration.add_servicer
        self, requests: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            first = await anext(requests, None)
            if first is None:
                return
            if first.WhichOneof("message") != "register":
                raise invalid("register", "the first message of a session must be RegisterWorker")
            register = first.register
            session = await self._manager.connect_worker(
                register.worker_id or context.peer(),
                [_job_type(d) for d in register.job_types],
                register.credits,
                current_caller(),
            )
        except JobwireError as error:
            await abort(context, error)
        registered = pb.WorkerRegistered(session_id=session.session_id, accepts_batches=True)
        lease = self._manager.settings.lease_duration
        convert.set_duration(registered.lease_duration, lease)
        convert.set_duration(registered.heartbeat_interval, lease / 3)
        await context.write(pb.ConnectResponse(registered=registered))

        writes: set[asyncio.Task[None]] = set()
        reader = asyncio.create_task(self._read(requests, session, writes))
        sender = asyncio.create_task(self._send(session, context, register.accepts_batches))
        try:
            done, _ = await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                failure = reader.exception()
                if isinstance(failure, JobwireError):
                    await abort(context, failure)  # the only abort on this path: a protocol violation
                if failure is not None:  # the stream broke under the reader: nobody to answer
                    log.info("worker stream ended: %r", failure, extra={"session": session.session_id})
                    return
                if writes:  # the worker closed its side: let its last outcomes land
                    await asyncio.wait(writes, timeout=10)
                session.close()
                await asyncio.wait({sender}, timeout=5)
                return
            if sender.exception() is None and self._manager.draining:
                # The server closed the session to drain: tell the worker to reconnect elsewhere.
                await abort(context, Draining("the server is shutting down; reconnect and renew your leases"))
            # Otherwise a write failed: the worker went away, and there is no one to tell.
        finally:
            for task in (reader, sender):
                task.cancel()
            self._manager.disconnect_worker(session)

    async def _read(
        self,
        requests: AsyncIterator[pb.ConnectRequest],
        session: WorkerSession,
        writes: set[asyncio.Task[None]],
    ) -> None:
        async for request in requests:
            kind = request.WhichOneof("message")
            if kind != "batch":
                self._apply(request, kind, session, writes)
                continue
            for message in request.batch.messages:
                inner = message.WhichOneof("message")
                if inner in ("batch", "register"):
                    raise invalid("batch.messages", "a batch holds no RegisterWorker and no other batch")
                self._apply(message, inner, session, writes)

    def _apply(
        self,
        request: pb.ConnectRequest,
        kind: str | None,
        session: WorkerSession,
        writes: set[asyncio.Task[None]],
    ) -> None:
        """One message from the worker (``kind`` is its oneof case)."""
        manager = self._manager
        if kind == "add_credits":
            manager.add_credits(session, request.add_credits.credits)
        elif kind == "report_progress":
            report = request.report_progress
            manager.worker_progress(session, _token(report.lease), _progress(report.progress))
        elif kind == "heartbeat":
            manager.worker_heartbeat(session, [_token(t) for t in request.heartbeat.leases])
        elif kind in ("complete_job", "fail_job", "release_job"):
            token, outcome = _outcome(request, kind)
            task = asyncio.create_task(manager.worker_finish(session, token, outcome))
            writes.add(task)
            task.add_done_callback(writes.discard)
        elif kind == "register":
            raise invalid("register", "RegisterWorker may only be the first message of a session")
        else:
            raise invalid("message", "empty or unknown ConnectRequest message")

    async def _send(self, session: WorkerSession, context: grpc.aio.ServicerContext, batches: bool) -> None:
        limit = BATCH_MESSAGES if batches else 1
        while (messages := await session.next_messages(limit)) is not None:
            for response in batched([_response(message) for message in messages], _response_batch):
                await context.write(response)


def _response_batch(responses: list[pb.ConnectResponse]) -> pb.ConnectResponse:
    return pb.ConnectResponse(batch=pb.ConnectResponseBatch(messages=responses))


def _job_type(declaration: pb.JobTypeDeclaration) -> JobType:
    return JobType(
        name=declaration.type,
        timeout=convert.duration_seconds(declaration.timeout) if declaration.HasField("timeout") else None,
        max_running=declaration.max_running or None,
        retry=convert.retry_from_proto(declaration.retry_policy),
    )


def _token(token: pb.LeaseToken) -> LeaseToken:
    return LeaseToken(token.job_id, token.attempt, token.epoch)


def _token_proto(token: LeaseToken) -> pb.LeaseToken:
    return pb.LeaseToken(job_id=token.job_id, attempt=token.attempt, epoch=token.epoch)


def _progress(progress: Any) -> Progress:
    details = None
    if progress.HasField("details"):
        if progress.details.ByteSize() <= MAX_PROGRESS_DETAILS_BYTES:
            details = convert.struct_to_dict(progress.details)
        else:  # a report is not worth ending the worker's session: keep the rest of it
            log.warning("progress details over %d bytes dropped", MAX_PROGRESS_DETAILS_BYTES)
    return Progress(
        percent=min(100.0, max(0.0, progress.percent)),
        message=progress.message[:1024],
        current_step=progress.current_step,
        total_steps=progress.total_steps,
        details=details,
    )


def _outcome(request: pb.ConnectRequest, kind: str) -> tuple[LeaseToken, Outcome]:
    if kind == "complete_job":
        complete = request.complete_job
        size = complete.result.ByteSize()
        if size > MAX_RESULT_BYTES:  # not stored: the attempt fails for good, as in-process
            return _token(complete.lease), Failed(result_too_large(size), retryable=False)
        result = convert.struct_to_dict(complete.result) if complete.result.fields else {}
        return _token(complete.lease), Succeeded(result)
    if kind == "fail_job":
        fail = request.fail_job
        error = convert.status_to_job_error(fail.error, "WORKER_REPORTED")
        if error.code == ErrorCode.CANCELLED:
            return _token(fail.lease), Failed(error, retryable=False)
        return _token(fail.lease), Failed(error, retryable=not fail.non_retryable)
    release = request.release_job
    reason = clip(release.reason, MAX_REASON)
    message = "the worker handed the job back" + (f": {reason}" if reason else "")
    return _token(release.lease), Abandoned(JobError(ErrorCode.ABORTED, message, "ATTEMPT_RELEASED"))


def _response(message: OutboxMessage) -> pb.ConnectResponse:
    if isinstance(message, Assignment):
        assignment = pb.JobAssignment(
            job=convert.job_to_proto(message.job), lease=_token_proto(message.lease)
        )
        convert.set_timestamp(assignment.lease_expire_time, message.lease_expire_time)
        if message.timeout is not None:
            convert.set_duration(assignment.timeout, message.timeout)
        return pb.ConnectResponse(assignment=assignment)
    if isinstance(message, CancelRequest):
        return pb.ConnectResponse(
            cancel_requested=pb.CancelRequested(lease=_token_proto(message.lease), reason=message.reason)
        )
    if isinstance(message, LeaseRevoked):
        return pb.ConnectResponse(
            lease_revoked=pb.LeaseRevoked(lease=_token_proto(message.lease), reason=message.reason)
        )
    assert isinstance(message, WriteResult)
    return pb.ConnectResponse(
        write_result=pb.WriteResult(
            lease=_token_proto(message.lease), accepted=message.accepted, reason=message.reason
        )
    )
