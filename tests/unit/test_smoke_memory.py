"""The agent end to end over an in-memory stream pair: the seam every transport shares."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from punie_trio.hub import ClientConnection, Manager
from punie_trio.transport import memory_message_stream_pair
from punie_trio.worker import CancelTurn, EchoModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient


@asynccontextmanager
async def _connected(
    tmp_path: Path, acp_schema: SchemaChecker
) -> AsyncIterator[tuple[Manager, AcpTestClient]]:
    """A running manager (echo model, one project root) and a client connected to it over
    an in-memory stream pair; all of it cancelled on exit."""
    manager = Manager((str(tmp_path),), EchoModel())
    agent_side, client_side = memory_message_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await nursery.start(ClientConnection(manager, transport="memory").run, agent_side)
        client = AcpTestClient(client_side, acp_schema)
        await nursery.start(client.run)
        yield manager, client
        nursery.cancel_scope.cancel()


async def test_echo_prompt_over_memory_streams(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    async with _connected(tmp_path, acp_schema) as (_, client):
        init = await client.initialize()
        assert init["protocolVersion"] == 1
        session = await client.new_session(str(tmp_path))
        assert await client.prompt(session, "hello brave new world") == "end_turn"
        assert client.agent_text(session) == "hello brave new world"
        # Echo answers in one chunk; the first answer also names the session.
        chunk, title = client.updates(session)
        assert chunk["sessionUpdate"] == "agent_message_chunk"
        assert title == {"sessionUpdate": "session_info_update", "title": "hello brave new world"}


@pytest.mark.parametrize(
    ("text", "title"),
    [
        ("Fix the bug\r\nin main.py", "Fix the bug"),  # a Windows client's line ending
        ("Fix the bug\rin main.py", "Fix the bug"),
        ("Fix the bug   \nin main.py", "Fix the bug"),
        ("\n\n  Fix the bug\nin main.py", "Fix the bug"),
        ("Fix the bug\u2028in main.py", "Fix the bug"),
    ],
)
async def test_a_title_is_the_first_line_without_its_line_break(
    tmp_path: Path, acp_schema: SchemaChecker, text: str, title: str
) -> None:
    """Only "\n" ended the first line: a CRLF prompt named the session "Fix the bug\r",
    which ``sessions list`` then showed as ``Fix the bug\r``."""
    async with _connected(tmp_path, acp_schema) as (_, client):
        await client.initialize()
        session = await client.new_session(str(tmp_path))
        assert await client.prompt(session, text) == "end_turn"
        assert client.updates(session)[-1] == {
            "sessionUpdate": "session_info_update",
            "title": title,
        }


@asynccontextmanager
async def _one_worker_two_sessions(
    tmp_path: Path, acp_schema: SchemaChecker
) -> AsyncIterator[tuple[Manager, AcpTestClient, str, str]]:
    """A manager and a client with two sessions on one project root (so its worker stays
    while one goes); the first has had a turn, so the worker holds its history."""
    async with _connected(tmp_path, acp_schema) as (manager, client):
        await client.initialize()
        first = await client.new_session(str(tmp_path))
        second = await client.new_session(str(tmp_path))
        assert await client.prompt(first, "remember me") == "end_turn"
        assert first in manager.workers[str(tmp_path)].worker._history
        yield manager, client, first, second


def _fill(commands: trio.MemorySendChannel[Any]) -> None:
    """Fill a worker's command channel with commands it ignores (a burst)."""
    while True:
        try:
            commands.send_nowait(CancelTurn(-1))
        except trio.WouldBlock:
            return


async def test_a_dropped_session_is_forgotten_by_its_worker_even_when_its_queue_is_full(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The worker's copy of a session's history goes with the session. Its ForgetSession
    was dropped when the worker's command channel was full (a burst of 64 commands), and
    the history then stayed for the worker's life. Now it waits its turn, in order."""
    async with _one_worker_two_sessions(tmp_path, acp_schema) as (manager, client, gone, kept):
        handle = manager.workers[str(tmp_path)]
        _fill(handle.commands)
        manager._drop_session(manager.sessions[gone])
        await trio.testing.wait_all_tasks_blocked()
        assert gone not in handle.worker._history
        assert await client.prompt(kept, "still here") == "end_turn"


async def test_a_session_dropped_and_resumed_at_once_keeps_its_history(
    tmp_path: Path, acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's race: the session is dropped (its worker's channel full) in the gap
    between a resume's store read and its ``SeedHistory``. A task sent the drop's
    ``ForgetSession`` one scheduler pass later, the same pass as the resume's seed, in
    either order: half the time the forget came second and the resumed session's next
    prompt started from nothing. Commands now reach the worker in the order queued."""
    async with _one_worker_two_sessions(tmp_path, acp_schema) as (manager, client, gone, _):
        handle = manager.workers[str(tmp_path)]
        store_type = type(manager.store)
        real_get = store_type.get_session

        async def get_session(store: Any, session_id: str) -> Any:
            record = await real_get(store, session_id)
            if session_id == gone:  # dropped, with the channel full, before the load goes on
                _fill(handle.commands)
                manager._drop_session(manager.sessions[gone])
            return record

        monkeypatch.setattr(store_type, "get_session", get_session)
        answer = await client.request_raw(
            "session/resume", {"sessionId": gone, "cwd": str(tmp_path)}
        )
        assert "result" in answer, answer
        await trio.testing.wait_all_tasks_blocked()
        assert handle.backlog is None  # sent on, in order
        assert handle.worker._history.get(gone) == [
            ("user", "remember me"),
            ("agent", "remember me"),
        ]
