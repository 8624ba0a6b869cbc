"""The blocking Jobwire client: a thin I/O shell around the shared logic in ``_core``."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc

from jobwire.client import _core
from jobwire.client.channels import open_channel, select_credentials
from jobwire.client.errors import JobFailedError, from_rpc_error
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

__all__ = ["JobwireClient"]


class JobwireClient:
    """Blocking client for the Jobwire JobService.

    Every method raises a :class:`jobwire.client.JobwireError` subclass on failure. Unary calls get
    ``call_timeout`` seconds each (None: no deadline); watch streams are not limited by it.

    The channel is plaintext unless TLS is asked for: ``tls=True`` (the system's trusted roots), or any
    of ``tls_ca`` (PEM file of the CA that signs the server's certificate), ``tls_cert`` and ``tls_key``
    (a client certificate and its key, together, for mutual TLS). ``channel_credentials``, when given,
    wins over all of them. Unreadable PEM files raise InvalidArgumentError here, not on the first call.
    ``token`` is sent as ``authorization: Bearer <token>`` on every call.
    """

    def __init__(
        self,
        target: str = _core.DEFAULT_TARGET,
        *,
        token: str | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        call_timeout: float | None = _core.DEFAULT_CALL_TIMEOUT,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.target = target
        self.call_timeout = call_timeout
        self._metadata = _core.call_metadata(token)
        credentials = select_credentials(
            channel_credentials, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self._channel: Any = open_channel(target, credentials)
        self._stub = job_service_pb2_grpc.JobServiceStub(self._channel)

    def __enter__(self) -> JobwireClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self._channel.close()

    def _call(
        self, method: Callable[..., Any], request: Any, policy: _core.RetryPolicy = _core.NO_RETRY
    ) -> Any:
        """Invoke a unary RPC with metadata, deadline and retries, converting errors."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return method(request, metadata=self._metadata, **_core.unary_timeout(self.call_timeout))
            except grpc.RpcError as err:
                delay = policy.delay_after(attempts, err)
                if delay is None:
                    raise from_rpc_error(err) from err
                time.sleep(delay)

    def submit(
        self,
        type: str,
        params: Mapping[str, Any] | None = None,
        *,
        priority: int | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: _core.Timeout | None = None,
        max_attempts: int | None = None,
        schedule_time: datetime.datetime | None = None,
        non_retryable_codes: Iterable[grpc.StatusCode | int] | None = None,
        retention: _core.Timeout | None = None,
    ) -> job_pb2.Job:
        """Submit a job and return it (QUEUED). Retried on UNAVAILABLE under one request_id.

        ``timeout`` bounds one attempt; ``max_attempts`` overrides the type's retry budget;
        ``schedule_time`` (an aware datetime) delays the start; a failure with one of
        ``non_retryable_codes`` (e.g. ``grpc.StatusCode.INVALID_ARGUMENT``) is not retried;
        ``retention`` (seconds or a timedelta) is how long the job is kept once it ends.
        """
        request = _core.build_submit_request(
            type,
            params,
            priority=priority,
            labels=labels,
            request_id=request_id,
            timeout=timeout,
            max_attempts=max_attempts,
            schedule_time=schedule_time,
            non_retryable_codes=non_retryable_codes,
            retention=retention,
        )
        response: job_service_pb2.SubmitJobResponse = self._call(
            self._stub.SubmitJob, request, _core.SUBMIT_RETRY
        )
        return response.job

    def submit_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[job_pb2.Job]:
        """Submit up to 1,000 jobs in one call: all are stored, or none (the error names
        ``requests[i]``). Each mapping holds ``submit``'s arguments, ``type`` required, e.g.
        ``{"type": "demo.echo", "params": {"n": 1}, "priority": 7}``. Returns the jobs in order,
        without params. Retried on UNAVAILABLE: every job carries a request_id, so none is stored twice.
        """
        request = _core.build_batch_request(jobs)
        response: job_service_pb2.BatchSubmitJobsResponse = self._call(
            self._stub.BatchSubmitJobs, request, _core.SUBMIT_RETRY
        )
        return list(response.jobs)

    def get(self, job_id: str) -> job_pb2.Job:
        """The job as it is now."""
        response: job_service_pb2.GetJobResponse = self._call(
            self._stub.GetJob, job_service_pb2.GetJobRequest(job_id=job_id)
        )
        return response.job

    def list_page(
        self,
        *,
        states: _core.StateFilter = None,
        types: Iterable[str] | None = None,
        labels: Mapping[str, str] | None = None,
        create_time_start: datetime.datetime | None = None,
        create_time_end: datetime.datetime | None = None,
        page_size: int = _core.DEFAULT_PAGE_SIZE,
        page_token: str = "",
        with_payload: bool = False,
        tenants: _core.NameFilter = None,
    ) -> tuple[list[job_pb2.Job], str]:
        """One page of jobs, newest first, and the token of the next page ("" on the last).

        Jobs come without params and result unless ``with_payload`` (the server's full view).
        ``tenants`` (admins only) keeps the jobs of these tenants.
        """
        request = _core.build_list_request(
            states=states,
            types=types,
            labels=labels,
            create_time_start=create_time_start,
            create_time_end=create_time_end,
            page_size=page_size,
            page_token=page_token,
            with_payload=with_payload,
            tenants=tenants,
        )
        return self._list_page(request)

    def _list_page(self, request: job_service_pb2.ListJobsRequest) -> tuple[list[job_pb2.Job], str]:
        response: job_service_pb2.ListJobsResponse = self._call(self._stub.ListJobs, request)
        return list(response.jobs), response.next_page_token

    def list_jobs(
        self,
        *,
        states: _core.StateFilter = None,
        types: Iterable[str] | None = None,
        labels: Mapping[str, str] | None = None,
        create_time_start: datetime.datetime | None = None,
        create_time_end: datetime.datetime | None = None,
        page_size: int = _core.DEFAULT_PAGE_SIZE,
        with_payload: bool = False,
        tenants: _core.NameFilter = None,
        priorities: Iterable[int] | int | None = None,
        order_by: str = "",
    ) -> Iterator[job_pb2.Job]:
        """Every matching job, newest first (or in ``order_by``: "create_time", "priority desc",
        "priority"), fetching pages lazily as the caller iterates.

        Jobs come without params and result unless ``with_payload`` (the server's full view).
        ``tenants`` (one name or several) is for admins, who otherwise see every tenant's jobs; other
        callers see only their own tenant's and may name only it (another is PERMISSION_DENIED).
        """
        request = _core.build_list_request(
            states=states,
            types=types,
            labels=labels,
            create_time_start=create_time_start,
            create_time_end=create_time_end,
            page_size=page_size,
            with_payload=with_payload,
            tenants=tenants,
            priorities=priorities,
            order_by=order_by,
        )
        while True:
            jobs, token = self._list_page(request)
            yield from jobs
            if not token:
                return
            request.page_token = token

    def list_job_types(self) -> list[job_service_pb2.JobTypeInfo]:
        """Every job type the caller may submit, by name: the server's own handlers and the types its
        workers declared, with their defaults, limits and the capacity connected for them now."""
        request = job_service_pb2.ListJobTypesRequest(page_size=1000)
        types: list[job_service_pb2.JobTypeInfo] = []
        while True:
            response: job_service_pb2.ListJobTypesResponse = self._call(self._stub.ListJobTypes, request)
            types.extend(response.job_types)
            if not response.next_page_token:
                return types
            request.page_token = response.next_page_token

    def count_jobs(
        self,
        *,
        states: _core.StateFilter = None,
        types: Iterable[str] | None = None,
        labels: Mapping[str, str] | None = None,
        create_time_start: datetime.datetime | None = None,
        create_time_end: datetime.datetime | None = None,
        tenants: _core.NameFilter = None,
        priorities: Iterable[int] | int | None = None,
    ) -> int:
        """How many jobs ``list_jobs`` with the same filters would give (the server counts them)."""
        request = _core.build_list_request(
            states=states,
            types=types,
            labels=labels,
            create_time_start=create_time_start,
            create_time_end=create_time_end,
            page_size=1,
            tenants=tenants,
            priorities=priorities,
            include_total_size=True,
        )
        response: job_service_pb2.ListJobsResponse = self._call(self._stub.ListJobs, request)
        return response.total_size

    def cancel(self, job_id: str, reason: str = "", *, request_id: str | None = None) -> job_pb2.Job:
        """Cancel a job; returns it CANCELLED, or CANCELLING while its handler stops.

        ``request_id`` (optional) is recorded in the job's audit trail, to trace the call.
        """
        response: job_service_pb2.CancelJobResponse = self._call(
            self._stub.CancelJob, _core.build_cancel_request(job_id, reason, request_id)
        )
        return response.job

    def update(
        self,
        job_id: str,
        *,
        priority: int | _core.Unchanged = _core.UNCHANGED,
        labels: Mapping[str, str] | _core.Unchanged = _core.UNCHANGED,
        schedule_time: datetime.datetime | _core.Unchanged | None = _core.UNCHANGED,
        request_id: str | None = None,
    ) -> job_pb2.Job:
        """Change a job that has not started: its ``priority``, ``labels`` (all replaced) or
        ``schedule_time`` (None: run as soon as possible); fields not given stay as they are.

        The run order follows at once. FailedPreconditionError once the job has started.
        """
        response: job_service_pb2.UpdateJobResponse = self._call(
            self._stub.UpdateJob,
            _core.build_update_request(
                job_id, priority=priority, labels=labels, schedule_time=schedule_time, request_id=request_id
            ),
        )
        return response.job

    def retry(self, job_id: str, *, request_id: str | None = None) -> job_pb2.Job:
        """Queue a FAILED or CANCELLED job again, with a fresh budget of attempts.

        ``request_id`` (optional) is recorded in the job's audit trail, to trace the call.
        """
        response: job_service_pb2.RetryJobResponse = self._call(
            self._stub.RetryJob, _core.build_retry_request(job_id, request_id)
        )
        return response.job

    def audit(self, job_id: str, *, page_size: int = _core.DEFAULT_PAGE_SIZE) -> Iterator[job_pb2.AuditEntry]:
        """Every entry of the job's audit trail (who did what, when, from where), oldest first.

        Pages of ``page_size`` are fetched lazily as the caller iterates; NotFoundError surfaces on
        the first ``next()`` for a job the caller cannot see.
        """
        request = _core.build_audit_request(job_id, page_size=page_size)
        while True:
            response: job_service_pb2.ListJobAuditEntriesResponse = self._call(
                self._stub.ListJobAuditEntries, request
            )
            yield from response.entries
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def stats(self) -> job_service_pb2.GetQueueStatsResponse:
        """Queue counts and timings."""
        response: job_service_pb2.GetQueueStatsResponse = self._call(
            self._stub.GetQueueStats, job_service_pb2.GetQueueStatsRequest()
        )
        return response

    def watch(self, job_id: str, *, after_sequence: int = 0) -> Iterator[job_service_pb2.WatchJobResponse]:
        """Yield the job's changes until it is terminal, resuming by itself after dropped streams."""
        return self._watch(_core.WatchTracker(job_id, after_sequence))

    def _watch(self, tracker: _core.WatchTracker) -> Iterator[job_service_pb2.WatchJobResponse]:
        while True:
            call = self._stub.WatchJob(
                tracker.request(), metadata=self._metadata, timeout=tracker.call_timeout()
            )
            try:
                for response in call:
                    if tracker.accept(response):
                        yield response
                    if tracker.finished:
                        return
                delay = tracker.on_stream_end()
            except grpc.RpcError as err:
                delay = tracker.on_error(err)
            finally:
                call.cancel()  # no-op once the stream has ended; frees it when the caller stops early
            time.sleep(delay)

    def wait(
        self,
        job_id: str,
        *,
        timeout: _core.Timeout | None = None,
        raise_on_failure: bool = False,
    ) -> job_pb2.Job:
        """Block until the job is terminal and return it.

        Raises DeadlineExceededError when ``timeout`` passes first, and JobFailedError for a FAILED
        or CANCELLED job when ``raise_on_failure`` is set.
        """
        tracker = _core.WatchTracker(job_id, timeout=timeout)
        for _ in self._watch(tracker):
            pass
        job = tracker.last_job
        assert job is not None  # _watch only returns after a terminal message
        if raise_on_failure and job.state != job_pb2.JOB_STATE_SUCCEEDED:
            raise JobFailedError(job)
        return job
