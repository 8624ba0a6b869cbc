"""Callers that give up mid-call (tiny deadlines) never split the truth between the store and live state.

A storm of SubmitJob, CancelJob and RetryJob calls with 1-30 ms deadlines; afterwards every stored job
must equal what GetJob says, and every job must reach a terminal state (nothing stays QUEUED forever).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest

from jobwire.server.config import ServerConfig
from jobwire.server.stores.base import JobQuery
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from support.servers import ServerThread

S = job_service_pb2
J = job_pb2
TERMINAL = (J.JOB_STATE_SUCCEEDED, J.JOB_STATE_FAILED, J.JOB_STATE_CANCELLED)


async def _storm(target: str, calls: int, seed: int) -> set[str]:
    """Fire ``calls`` submits, cancels and retries with tiny deadlines; return every job id seen."""
    rng = random.Random(seed)
    seen: set[str] = set()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        # A few jobs acknowledged normally, so that cancels and retries have targets from the start.
        for i in range(20):
            request = S.SubmitJobRequest(type="test.echo", request_id=f"seed-{i}")
            seen.add((await stub.SubmitJob(request)).job.id)

        async def one(i: int) -> None:
            deadline = rng.uniform(0.001, 0.03)
            roll = rng.random()
            try:
                if roll < 0.6 or not seen:
                    # Half of them with a request_id, whose retry must return the job the first made.
                    request_id = f"storm-{rng.randrange(calls // 2)}" if rng.random() < 0.5 else ""
                    request = S.SubmitJobRequest(
                        type="test.echo", priority=rng.randrange(10), request_id=request_id
                    )
                    request.params.update({"i": i})
                    job = (await stub.SubmitJob(request, timeout=deadline)).job
                    seen.add(job.id)
                elif roll < 0.85:
                    target_id = rng.choice(sorted(seen))
                    await stub.CancelJob(S.CancelJobRequest(job_id=target_id), timeout=deadline)
                else:
                    target_id = rng.choice(sorted(seen))
                    await stub.RetryJob(S.RetryJobRequest(job_id=target_id), timeout=deadline)
            except grpc.aio.AioRpcError as error:
                # Giving up is the point; anything but these codes is a defect.
                assert error.code() in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.INVALID_ARGUMENT,  # a request_id reused with other params
                ), error

        # In waves: thousands at once would all expire in the client before reaching the server.
        for start in range(0, calls, 20):
            await asyncio.gather(*(one(i) for i in range(start, min(calls, start + 20))))
    return seen


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_storm_of_abandoned_calls_leaves_store_and_live_state_equal(store: str, tmp_path: Path) -> None:
    url = "memory:" if store == "memory" else f"sqlite:///{tmp_path / 'jobs.db'}"
    config = ServerConfig(host="127.0.0.1", port=0, store=url, max_running=2)
    with ServerThread(config) as server:
        asyncio.run(_storm(server.target, 1500, seed=7))
        assert server.server is not None
        manager = server.server.manager
        stored = server.call(manager.store.list(JobQuery(limit=100_000)))
        assert len(stored) >= 20
        with grpc.insecure_channel(server.target) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            # Every job reaches an end: a QUEUED job that was committed but never queued would hang here.
            for job in stored:
                final = None
                for update in stub.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=30):
                    final = update.job
                assert final is not None and final.state in TERMINAL, (job.id, final)
            # ... and what the store holds is what the API says.
            for job in server.call(manager.store.list(JobQuery(limit=100_000))):
                api = stub.GetJob(S.GetJobRequest(job_id=job.id)).job
                assert int(api.state) == int(job.state), job.id
                assert api.attempt == job.attempt, job.id
