"""Jobwire Python SDK: blocking and asyncio clients for the jobwire.v1 JobService.

Usage::

    from jobwire.client import JobwireClient, job_result

    with JobwireClient("localhost:50051") as client:
        job = client.submit("demo.sleep", {"seconds": 2})
        done = client.wait(job.id, timeout=60, raise_on_failure=True)
        print(job_result(done))

TLS: ``JobwireClient("jobs.example:443", tls=True)`` (system roots), or ``tls_ca="ca.pem"`` for a private
CA, plus ``tls_cert``/``tls_key`` for mutual TLS; ``tls_credentials()`` builds the same credentials.
"""

from jobwire.client.async_client import AsyncJobwireClient
from jobwire.client.channels import tls_credentials
from jobwire.client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    JobFailedError,
    JobwireError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from jobwire.client.jobs import (
    ACTIVE_STATES,
    STATE_NAMES,
    TERMINAL_STATES,
    is_terminal,
    job_params,
    job_result,
    parse_state,
    state_name,
)
from jobwire.client.sync_client import JobwireClient

__all__ = [
    "ACTIVE_STATES",
    "STATE_NAMES",
    "TERMINAL_STATES",
    "AsyncJobwireClient",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "JobFailedError",
    "JobwireClient",
    "JobwireError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "is_terminal",
    "job_params",
    "job_result",
    "parse_state",
    "state_name",
    "tls_credentials",
]
