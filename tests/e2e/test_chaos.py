"""Replicas killed with SIGKILL and restarted while jobs, workers and watchers run (a short run; the long
one is ``bench/chaos.py``). Nothing acknowledged is lost, nothing succeeds twice, nothing is stuck,
and no watcher misses a transition."""

from __future__ import annotations

import asyncio

from support.chaos import Chaos
from support.postgres import require_postgres


def test_kill_random_replicas_while_jobs_workers_and_watchers_run() -> None:
    require_postgres()
    report = asyncio.run(Chaos(duration=12, kill_every=3, seed=20261201).run())
    print("\n".join(report.lines()))
    assert report.kills and report.acknowledged > 100
    assert report.lost == []
    assert report.succeeded_twice == []
    assert report.stuck == []
    assert report.watch_gaps == []
    assert report.finished == report.acknowledged
