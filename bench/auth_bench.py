"""What authentication costs: SubmitJob with it off, with a bearer token, with TLS, with mutual TLS.

Run: ``.venv/bin/python bench/auth_bench.py [--duration 5] [--concurrency 32] [--json]``

Each case is a server in its own process (memory store, jobs that stay queued: the submit path alone),
driven by the same client load as ``submit_bench.py`` (the same pre-serialized request, N calls in
flight). Printed per case: calls/s, latency, server CPU per call, and the ratio to authentication off
measured in the same run. A token is verified once per server and then found in the cache; TLS adds the
encryption of every byte.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from submit_bench import (  # noqa: E402
    LoadResult,
    check_submit_type,
    drive_load,
    jobwire_server,
    parked_payload,
)

from support.security import Keys, make_pki, person  # noqa: E402

SUBMIT = "/jobwire.v1.JobService/SubmitJob"


async def run(args: argparse.Namespace) -> list[LoadResult]:
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        keys = Keys(folder / "keys.pem")
        token = keys.token("bench", "submitter")
        pki = make_pki(folder, {"client": person("bench-client", "bench", "submitter")}, {})
        bearer = (("authorization", f"Bearer {token}"),)
        tls = ("--tls-cert", pki.server_cert, "--tls-key", pki.server_key)
        cases: list[tuple[str, tuple[str, ...], Any, Any]] = [
            ("authentication off", (), None, None),
            ("bearer token", ("--auth-key-file", str(keys.path)), bearer, None),
            ("TLS, authentication off", tls, None, pki.credentials(None)),
            ("TLS + bearer token", ("--auth-key-file", str(keys.path), *tls), bearer, pki.credentials(None)),
            (
                "mutual TLS (client certificate)",
                (*tls, "--tls-client-ca", pki.ca),
                None,
                pki.credentials("client"),
            ),
        ]
        results = []
        for name, flags, metadata, credentials in cases:
            server = jobwire_server("memory:", 8, "--type-limits", "demo.sleep=1", *flags)
            server.start()
            try:
                results.append(
                    await drive_load(
                        name,
                        server,
                        SUBMIT,
                        parked_payload(),
                        check_submit_type("demo.sleep"),
                        args.concurrency,
                        args.warmup,
                        args.duration,
                        metadata=metadata,
                        credentials=credentials,
                    )
                )
            finally:
                server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per case")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2, default=str))
        return 0
    base = results[0].calls_per_s or 1.0
    print(f"SubmitJob, memory store, jobs stay queued; {args.concurrency} in flight, {args.duration:g}s each")
    header = f"{'case':34} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv CPU µs/call':>16}"
    print(f"{header} {'x off':>6} {'errors':>6}")
    for r in results:
        cpu = f"{r.server_cpu_us_per_call:.0f}" if r.server_cpu_us_per_call is not None else "-"
        print(
            f"{r.case:34} {r.calls_per_s:>8.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {cpu:>16} "
            f"{r.calls_per_s / base:>6.2f} {r.errors:>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
