"""The built-in demo handlers say what they do: steps done and the message agree."""

from __future__ import annotations

import asyncio
from typing import Any

from jobwire.handlers.api import Progress
from jobwire.handlers.demo import sleep
from jobwire.handlers.runner import CancellableContext


class RecordingContext(CancellableContext):
    def __init__(self) -> None:
        super().__init__("j", "demo.sleep", 1, 1, None, asyncio.get_running_loop())
        self.reports: list[Progress] = []

    def _emit(self, progress: Progress) -> None:
        self.reports.append(progress)


async def test_demo_sleep_reports_steps_done_consistently() -> None:
    ctx = RecordingContext()
    result: Any = await sleep({"seconds": 0.01, "steps": 4}, ctx)
    assert result == {"slept_seconds": 0.01, "steps": 4}
    assert [(p.current_step, p.message) for p in ctx.reports] == [
        (step, f"{step} of 4 steps done") for step in range(5)
    ]
    assert ctx.reports[-1].percent == 100.0
