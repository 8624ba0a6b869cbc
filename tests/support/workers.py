"""``python -m jobwire.cli worker`` as a child process, its JSON log lines collected, for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from support.servers import TESTS_DIR

WAIT = 60.0  # upper bound of any single wait; the tests normally take a few seconds each


class WorkerProcess:
    """``python -m jobwire.cli worker`` as a child process, its JSON log lines collected."""

    def __init__(self, target: str, worker_id: str, *extra_args: str, concurrency: int = 1) -> None:
        self.worker_id = worker_id
        self.args = [
            sys.executable,
            "-m",
            "jobwire.cli",
            "worker",
            "--server",
            target,
            "--handlers",
            "support.worker_handlers",
            "--concurrency",
            str(concurrency),
            "--worker-id",
            worker_id,
            "--log-level",
            "DEBUG",
            *extra_args,
        ]
        self.process: subprocess.Popen[str] | None = None
        self.logs: list[dict[str, Any]] = []
        self._changed = threading.Condition()

    def start(self) -> WorkerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        threading.Thread(target=self._read_logs, daemon=True).start()
        return self

    def _read_logs(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"message": line.rstrip()}
            with self._changed:
                self.logs.append(entry)
                self._changed.notify_all()

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT) -> dict[str, Any]:
        """The first log entry matching ``predicate``, waiting for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for entry in self.logs[seen:]:
                    if predicate(entry):
                        return entry
                seen = len(self.logs)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.worker_id}: no such log line; last lines: {self.logs[-20:]}")
                self._changed.wait(remaining)

    def wait_registered(self, count: int = 1) -> None:
        """Wait until the worker has registered ``count`` times (reconnections included)."""
        deadline = time.monotonic() + WAIT
        with self._changed:
            while sum(1 for e in self.logs if e.get("message") == "worker registered") < count:
                assert self.process is not None
                assert self.process.poll() is None, f"{self.worker_id} exited: {self.logs[-20:]}"
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{self.worker_id} never registered: {self.logs[-20:]}"
                self._changed.wait(min(remaining, 0.5))

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = WAIT) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
