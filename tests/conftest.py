from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from punie_trio.store._thread import OwnerThread, Started

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
    thread (``trio.to_thread.run_sync``: a tool's path check, its disk read or write; and
    the SQLite store's own thread, ``OwnerThread``, while a task awaits one of its jobs).

    Why: with ``autojump_threshold=0`` the clock jumps to the next deadline whenever no
    task is runnable, and a task waiting on a thread is not runnable. A tool call's thread
    then let a test's grace period (60 s) run out in the microseconds the thread took, at
    random (1 run in 10-30). The store's thread did the same: a test's wait of 1,000 s
    for a load or delete to be answered passed while the store read a page. Threads take
    no mock time here: the clock waits for them."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    running = 0

    def held(real: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal running
            running += 1
            clock.autojump_threshold = math.inf
            try:
                return await real(*args, **kwargs)
            finally:
                running -= 1
                if not running:
                    clock.autojump_threshold = 0

        return wrapper

    monkeypatch.setattr(trio.to_thread, "run_sync", held(trio.to_thread.run_sync))
    monkeypatch.setattr(OwnerThread, "_submit", held(OwnerThread._submit))
    monkeypatch.setattr(Started, "wait", held(Started.wait))
    monkeypatch.setattr(Started, "result", held(Started.result))
    return clock
