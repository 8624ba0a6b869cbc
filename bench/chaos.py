"""The chaos run at length: replicas on PostgreSQL killed with SIGKILL and restarted every few seconds
while jobs, two worker processes and watchers run; then the counts (see tests/support/chaos.py).

Run: ``.venv/bin/python bench/chaos.py [--duration 120] [--kill-every 3] [--rate 40] [--seed 1]``
(PostgreSQL on 127.0.0.1:5432, or JOBWIRE_TEST_POSTGRES). Exit code 1 if anything was lost, ran twice,
got stuck, or a watcher missed a change.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.chaos import Chaos


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=40.0, help="jobs submitted per second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = asyncio.run(Chaos(args.duration, args.kill_every, args.seed, args.rate).run())
    print("\n".join(report.lines()))
    for name, items in (
        ("lost", report.lost),
        ("succeeded twice", report.succeeded_twice),
        ("stuck", report.stuck),
        ("watch gaps", report.watch_gaps),
    ):
        if items:
            print(f"{name}: {items[:10]}")
    return 1 if report.lost or report.succeeded_twice or report.stuck or report.watch_gaps else 0


if __name__ == "__main__":
    raise SystemExit(main())
