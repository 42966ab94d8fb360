from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from .acp_schema import SchemaChecker


@pytest.fixture
def acp_schema() -> Iterator[SchemaChecker]:
    """Validate every agent message a test sees; fails the test if none was checked."""
    checker = SchemaChecker()
    yield checker
    assert checker.checked > 0, "the test validated no agent message against the ACP schema"


@pytest.fixture
def autojump_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """pytest-trio's ``autojump_clock``, except that no time passes while work runs in a
    thread (``trio.to_thread.run_sync``: a tool's path check, its disk read or write).

    Why: with ``autojump_threshold=0`` the clock jumps to the next deadline whenever no
    task is runnable, and a task waiting on a thread is not runnable. A tool call's thread
    then let a test's grace period (60 s) run out in the microseconds the thread took, at
    random (1 run in 10-30). Threads take no mock time here: the clock waits for them."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    real_run_sync = trio.to_thread.run_sync
    running = 0

    async def run_sync(*args: Any, **kwargs: Any) -> Any:
        nonlocal running
        running += 1
        clock.autojump_threshold = math.inf
        try:
            return await real_run_sync(*args, **kwargs)
        finally:
            running -= 1
            if not running:
                clock.autojump_threshold = 0

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    return clock
