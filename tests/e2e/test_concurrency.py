"""The in-process concurrency limit holds on every store, and a job's handler runs once per attempt.

Regression: on SQLite a job's last progress note reaches the feed in the same batch as its end, after the
handler has returned; the in-process executor took that RUNNING change for a claim, ran the handler a
second time and gave back a second slot, so ``--max-running`` stopped holding (122 jobs at once with a
limit of 4).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobwire.client import JobwireClient
from jobwire.server.config import ServerConfig
from support import handlers
from support.servers import ServerThread

LIMIT = 3
JOBS = 120


@pytest.fixture(params=["memory", "sqlite"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    store = "memory:" if request.param == "memory" else f"sqlite:///{tmp_path / 'jobs.db'}"
    with ServerThread(ServerConfig(host="127.0.0.1", port=0, store=store, max_running=LIMIT)) as server:
        yield server.target


def test_max_running_holds_and_each_job_runs_once(target: str) -> None:
    with handlers.RUNS_LOCK:
        handlers.RUNS.clear()
    with JobwireClient(target) as client, ThreadPoolExecutor(16) as pool:
        ids = list(
            pool.map(
                lambda i: client.submit("test.counted", {"key": f"k{i}", "seconds": 0.02}).id, range(JOBS)
            )
        )
        jobs = [client.wait(job_id, timeout=60, raise_on_failure=True) for job_id in ids]
    edges = sorted(
        [(job.start_time.ToNanoseconds(), 1) for job in jobs]
        + [(job.end_time.ToNanoseconds(), -1) for job in jobs]
    )
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most <= LIMIT
    with handlers.RUNS_LOCK:
        assert {f"k{i}": 1 for i in range(JOBS)} == handlers.RUNS
