"""Real Jobwire servers for tests: in a background thread (in-process), or as a separate process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from jobwire.handlers import load_handlers
from jobwire.server.app import JobwireServer
from jobwire.server.clock import Clock
from jobwire.server.config import ServerConfig

T = TypeVar("T")
TESTS_DIR = Path(__file__).resolve().parent.parent
HANDLER_MODULES = ["jobwire.handlers.demo", "support.handlers"]


class ServerThread:
    """A JobwireServer on 127.0.0.1:<free port>, running its own event loop in a daemon thread.

    Sync and async tests alike talk to it over a real loopback connection.
    """

    def __init__(self, config: ServerConfig | None = None, clock: Clock | None = None) -> None:
        self.config = config or ServerConfig(host="127.0.0.1", port=0, store="memory:")
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="jobwire-test-server", daemon=True)
        self.server: JobwireServer | None = None
        self.target = ""

    def start(self) -> str:
        self._thread.start()
        handlers = load_handlers(HANDLER_MODULES)

        async def boot() -> JobwireServer:
            server = JobwireServer(self.config, handlers=handlers, clock=self.clock)
            await server.start()
            return server

        self.server = self.call(boot())
        self.target = f"127.0.0.1:{self.server.port}"
        return self.target

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop (e.g. to look inside the manager) and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess:
    """``python -m jobwire.server`` as a child process, for crash and restart tests."""

    def __init__(self, store: str, *extra_args: str, cwd: Path | None = None) -> None:
        self.args = [
            sys.executable,
            "-m",
            "jobwire.server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--store",
            store,
            "--handlers",
            "support.handlers",
            "--log-format",
            "json",
            "--drain-delay",  # tests that follow the drain sequence give their own
            "0",
            *extra_args,
        ]
        self.cwd = cwd
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.log_lines: list[str] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=self.cwd
        )
        ready = threading.Event()

        def read_logs() -> None:
            assert self.process is not None and self.process.stderr is not None
            for line in self.process.stderr:
                self.log_lines.append(line)
                if not ready.is_set() and '"jobwire listening"' in line:
                    self.port = int(json.loads(line)["port"])
                    ready.set()

        threading.Thread(target=read_logs, daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise RuntimeError("server process did not start:\n" + "".join(self.log_lines[-30:]))
        return self.target

    def kill(self) -> None:
        """SIGKILL: no drain, no flush — a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: a graceful drain. Returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)
