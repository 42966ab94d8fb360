"""Fixtures: one store per implementation, with a deterministic clock."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from punie_trio.store import MemoryStore, SessionRecord, Store, open_sqlite_store


class StepClock:
    """A clock that advances one second per reading: ``updated_at`` values are distinct
    and predictable without sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._ticks = itertools.count()
        self.start = start

    def __call__(self) -> float:
        return self.start + next(self._ticks)


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture(params=["memory", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: StepClock
) -> AsyncIterator[Store]:
    if request.param == "memory":
        mem = MemoryStore(clock)
        yield mem
        await mem.aclose()
    else:
        async with open_sqlite_store(tmp_path / "sessions.sqlite3", clock=clock) as db:
            yield db


def make_record(session_id: str = "s1", **changes: Any) -> SessionRecord:
    fields: dict[str, Any] = {
        "id": session_id,
        "root": "/proj",
        "cwd": "/proj",
        "client_id": "client-a",
        "title": None,
        "mode": "code",
        "config": {"model": "m1", "nested": {"a": [1, 2.5, "\u00e9"]}},
        "additional_directories": ("/extra",),
        "created_at": 100.0,
        "updated_at": 100.0,
        "turns": 0,
    }
    fields.update(changes)
    return SessionRecord(**fields)


def text_update(kind: str, text: str) -> dict[str, Any]:
    return {"sessionUpdate": kind, "content": {"type": "text", "text": text}}


def sample_turn(turn: int, n: int = 3) -> list[tuple[str, dict[str, Any]]]:
    entries: list[tuple[str, dict[str, Any]]] = [
        ("user_message_chunk", text_update("user_message_chunk", f"question {turn}"))
    ]
    entries += [
        ("agent_message_chunk", text_update("agent_message_chunk", f"answer {turn}.{i} "))
        for i in range(n)
    ]
    entries.append(("stop", {"stopReason": "end_turn"}))
    return entries
