"""Fuzz every RPC of a Jobwire server at length and print what came back, by status code.

Run: ``.venv/bin/python bench/fuzz.py [--calls 35000] [--seed 1] [--store sqlite] [--auth] [--trace-memory]``

The server runs in a child process (SQLite store in a temp dir, the test handlers loaded); the fuzzer is
``tests/support/fuzzing.py``, the same one the test suite runs briefly. The report gives the count of each
status (UNKNOWN and INTERNAL are defects) and the server's resident memory before, at the end and after a
pause. With ``--trace-memory`` the server runs in this process instead, under tracemalloc, and the
allocations still held after fuzzing are listed by the line of Jobwire code that made them. With
``--auth`` the server checks bearer tokens, and each call carries a valid token of a random role and
tenant, a junk one, or none.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from submit_bench import process_rss_mib  # noqa: E402

from jobwire.server.config import ServerConfig  # noqa: E402
from support.fuzzing import Fuzzer  # noqa: E402
from support.security import Keys  # noqa: E402
from support.servers import ServerProcess, ServerThread  # noqa: E402


def report(fuzzer: Fuzzer, seconds: float, memory: dict[str, float], as_json: bool) -> int:
    defects = fuzzer.defects()
    if as_json:
        print(
            json.dumps(
                {
                    "calls": sum(fuzzer.codes.values()),
                    "seconds": round(seconds, 1),
                    "by_status": dict(fuzzer.codes),
                    "by_method": {p: dict(c) for p, c in fuzzer.by_method.items()},
                    "memory_mib": memory,
                    "defects": defects,
                }
            )
        )
    else:
        print(f"{sum(fuzzer.codes.values())} fuzzed calls in {seconds:.1f} s")
        print(f"{'status':<26}{'calls':>8}")
        for code, count in sorted(fuzzer.codes.items(), key=lambda item: -item[1]):
            print(f"{code:<26}{count:>8}")
        print()
        for path, counts in sorted(fuzzer.by_method.items()):
            print(f"{path:<42} " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())))
        print()
        print("server memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
        print("defects (UNKNOWN, INTERNAL, oversized error trailers):", defects or "none")
        for kind, sample in fuzzer.samples.items():
            print(f"first {kind}: {sample}")
    return 1 if defects else 0


def fuzz_child_process(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        store = "memory:" if args.store == "memory" else f"sqlite:///{tmp}/fuzz.db"
        tokens: list[str] = []
        extra: list[str] = []
        if args.auth:  # valid tokens of every role in two tenants; the fuzzer also sends none and junk
            keys = Keys(Path(tmp) / "keys.pem")
            tokens = [
                keys.token(t, role) for t in ("a", "b") for role in ("admin", "submitter", "viewer", "worker")
            ]
            extra = ["--auth-key-file", str(keys.path)]
        server = ServerProcess(store, *extra)
        server.start()
        assert server.process is not None
        pid = server.process.pid
        try:
            memory = {"start": process_rss_mib(pid)}
            fuzzer = Fuzzer(server.target, args.seed, tokens=tokens)
            began = time.monotonic()
            asyncio.run(fuzzer.run(args.calls, args.concurrency))
            seconds = time.monotonic() - began
            memory["end"] = process_rss_mib(pid)
            time.sleep(args.settle)
            memory[f"after {args.settle:g} s"] = process_rss_mib(pid)
            return report(fuzzer, seconds, memory, args.json)
        finally:
            server.kill()


def fuzz_traced(args: argparse.Namespace) -> int:
    """The server in this process under tracemalloc: who holds the memory after fuzzing."""
    with tempfile.TemporaryDirectory() as tmp:
        store = "memory:" if args.store == "memory" else f"sqlite:///{tmp}/fuzz.db"
        config = ServerConfig(host="127.0.0.1", port=0, store=store)
        tracemalloc.start(8)
        with ServerThread(config) as server:
            before = tracemalloc.take_snapshot()
            fuzzer = Fuzzer(server.target, args.seed)
            began = time.monotonic()
            asyncio.run(fuzzer.run(args.calls, args.concurrency))
            seconds = time.monotonic() - began
            time.sleep(args.settle)
            gc.collect()
            after = tracemalloc.take_snapshot()
            code = report(fuzzer, seconds, {}, args.json)
            jobwire_code = tracemalloc.Filter(True, "*jobwire*")
            stats = after.filter_traces([jobwire_code]).compare_to(
                before.filter_traces([jobwire_code]), "lineno"
            )
            print("\nstill held after fuzzing, by the Jobwire line that allocated it:")
            for stat in stats[:15]:
                size, blocks = stat.size_diff / 1024, stat.count_diff
                print(f"  {size:>9.0f} KiB  {blocks:>8} blocks  {stat.traceback[0]}")
            total = sum(s.size_diff for s in stats)
            print(f"  total {total / 1048576:.1f} MiB held by Jobwire allocations")
            current, peak = tracemalloc.get_traced_memory()
            print(
                f"all Python allocations (server, client and fuzzer): {current / 1048576:.0f} MiB now, "
                f"{peak / 1048576:.0f} MiB at the peak; process RSS {process_rss_mib(os.getpid()):.0f} MiB"
            )
        return code


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=35_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait before the last reading")
    parser.add_argument("--trace-memory", action="store_true")
    parser.add_argument(
        "--auth",
        action="store_true",
        help="authentication on: calls carry tokens of every role, none or junk",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    return fuzz_traced(args) if args.trace_memory else fuzz_child_process(args)


if __name__ == "__main__":
    raise SystemExit(main())
