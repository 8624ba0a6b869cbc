"""WorkerService batches: what is queued for a worker at once travels as one stream message, both ways,
and only with a worker that said it accepts them."""

from __future__ import annotations

import grpc
import pytest

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from jobwire.v1 import worker_service_pb2 as W
from support.raw_worker import RawWorker
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2


def _submit(stub: job_service_pb2_grpc.JobServiceStub, job_type: str, count: int) -> set[str]:
    requests = [S.SubmitJobRequest(type=job_type) for _ in range(count)]
    return {job.id for job in stub.BatchSubmitJobs(S.BatchSubmitJobsRequest(requests=requests)).jobs}


def test_a_batching_worker_gets_a_dispatch_round_in_one_message_and_ends_jobs_in_one(
    server: ServerThread,
) -> None:
    with grpc.insecure_channel(server.target) as channel, RawWorker(server.target) as worker:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        assert worker.register("raw.batch", credits=0, accepts_batches=True).accepts_batches
        ids = _submit(stub, "raw.batch", 10)
        worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=10)))
        assert len(worker.next("batch").batch.messages) > 1  # the queued jobs were claimed in one round
        assignments = [m.assignment for m in worker.collect("assignment", 10)]
        assert {a.job.id for a in assignments} == ids

        worker.received.clear()
        ends = [W.ConnectRequest(complete_job=W.CompleteJob(lease=a.lease)) for a in assignments]
        ends.append(W.ConnectRequest(add_credits=W.AddCredits(credits=10)))
        worker.send(W.ConnectRequest(batch=W.ConnectRequestBatch(messages=ends)))
        results = [m.write_result for m in worker.collect("write_result", 10)]
        assert sorted(r.lease.job_id for r in results) == sorted(ids)
        assert all(r.accepted for r in results)
        for job_id in ids:
            assert stub.GetJob(S.GetJobRequest(job_id=job_id)).job.state == J.JOB_STATE_SUCCEEDED
        more = _submit(stub, "raw.batch", 10)  # the credits in the batch were counted
        assert {m.assignment.job.id for m in worker.collect("assignment", 10)} == more


def test_a_worker_that_does_not_accept_batches_never_gets_one(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel, RawWorker(server.target) as worker:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        worker.register("raw.plain", credits=0)
        ids = _submit(stub, "raw.plain", 10)
        worker.send(W.ConnectRequest(add_credits=W.AddCredits(credits=10)))
        assignments = [worker.next("assignment").assignment for _ in range(10)]
        assert {a.job.id for a in assignments} == ids
        assert not worker.messages("batch")


@pytest.mark.parametrize(
    "inner",
    [
        W.ConnectRequest(batch=W.ConnectRequestBatch()),
        W.ConnectRequest(register=W.RegisterWorker(worker_id="again")),
    ],
    ids=["nested batch", "register"],
)
def test_a_batch_holding_a_batch_or_a_registration_ends_the_stream(
    server: ServerThread, inner: W.ConnectRequest
) -> None:
    with RawWorker(server.target) as worker:
        worker.register("raw.bad", accepts_batches=True)
        worker.send(W.ConnectRequest(batch=W.ConnectRequestBatch(messages=[inner])))
        with pytest.raises(grpc.RpcError) as caught:
            worker.next("write_result")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch.messages" in str(caught.value.details())
