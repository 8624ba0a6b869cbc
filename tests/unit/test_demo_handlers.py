"""The built-in demo handlers say what they do: steps done and the message agree."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

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


async def test_progress_details_replace_whole_are_kept_when_not_given_and_are_checked() -> None:
    ctx = RecordingContext()
    ctx.report_progress(percent=10, details={"rows": 100, "rate": 2.5})
    ctx.report_progress(percent=20)  # details not given: kept
    ctx.report_progress(details={"rows": 300})  # replaced whole
    assert [r.details for r in ctx.reports] == [
        {"rows": 100, "rate": 2.5},
        {"rows": 100, "rate": 2.5},
        {"rows": 300},
    ]
    for bad, error in (
        ({"x": "y" * 5000}, ValueError),  # over 4 KiB of JSON
        ({"nan": float("nan")}, ValueError),
        ({"obj": object()}, TypeError),
        ([1, 2], TypeError),  # not an object
    ):
        with pytest.raises(error):
            ctx.report_progress(details=bad)  # type: ignore[arg-type]
    assert len(ctx.reports) == 3  # a refused report publishes nothing
