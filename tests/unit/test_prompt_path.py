"""The prompt's fast path through the hub: what a short prompt costs, and its cancel paths.

A ``session/prompt`` starts no task in its connection (the peer holds a Deferred that the
turn's relay answers), and a short turn's updates and answer leave in one write.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from punie_trio.hub import ClientConnection, Manager
from punie_trio.hub._turns import EARLY_WRITE_UPDATES
from punie_trio.store import MemoryStore, Store, open_sqlite_store
from punie_trio.transport import NdjsonStream, memory_message_stream_pair
from punie_trio.worker import EchoModel

from .test_peer import LineReader, _CountingSend


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", **msg}).encode() + b"\n"


async def _connect_initialized(
    nursery: trio.Nursery, manager: Manager, counting: bool = False
) -> tuple[ClientConnection, trio.StapledStream[Any, Any], LineReader, _CountingSend | None]:
    """An NDJSON client connection to ``manager``, initialized (optionally counting the
    agent's socket writes)."""
    ours, theirs = trio.testing.memory_stream_pair()
    writes = _CountingSend(ours) if counting else None
    conn = ClientConnection(manager, transport="memory")
    await nursery.start(conn.run, NdjsonStream(ours, writes or ours))
    reader = LineReader(theirs)
    await theirs.send_all(
        _line({"id": 1, "method": "initialize", "params": {"protocolVersion": 1}})
    )
    assert "result" in await reader.next()
    return conn, theirs, reader, writes


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
async def test_short_prompt_updates_and_answer_leave_in_one_write(
    tmp_path: Path, store_kind: str
) -> None:
    """A short turn's updates and answer leave in exactly one write, with either store
    (sqlite: the only running turn is committed at once, without a group's passes; its
    updates, sent before the commit, wake the writer of this stream, which cannot write
    synchronously, and it runs once the answer is queued too)."""
    root = Path(await trio.Path(tmp_path).resolve())
    async with contextlib.AsyncExitStack() as stack:
        store: Store = (
            MemoryStore()
            if store_kind == "memory"
            else await stack.enter_async_context(open_sqlite_store(root / "store.db"))
        )
        manager = Manager((str(root),), EchoModel(chunks=3), store=store)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            conn, theirs, reader, counting = await _connect_initialized(
                nursery, manager, counting=True
            )
            assert counting is not None
            new = {"cwd": str(root), "mcpServers": []}
            await theirs.send_all(_line({"id": 2, "method": "session/new", "params": new}))
            session_id = (await reader.next())["result"]["sessionId"]
            for n in range(3):
                await trio.testing.wait_all_tasks_blocked()
                before = counting.writes
                assert conn.peer is not None and conn.peer._nursery is not None
                tasks = len(conn.peer._nursery.child_tasks)
                prompt = {"sessionId": session_id, "prompt": [{"type": "text", "text": "a b c"}]}
                await theirs.send_all(
                    _line({"id": 10 + n, "method": "session/prompt", "params": prompt})
                )
                # 3 chunks (and, the first time, the session's title), then the answer.
                updates = 4 if n == 0 else 3
                got = [await reader.next() for _ in range(updates + 1)]
                assert [m.get("method") for m in got[:updates]] == ["session/update"] * updates
                assert got[updates] == {
                    "jsonrpc": "2.0",
                    "id": 10 + n,
                    "result": {"stopReason": "end_turn"},
                }
                # The only running turn: the sqlite store commits it at once (alone=True),
                # so its updates and answer leave in one write with either store (over a
                # NowSender, as a WebSocket, sqlite's go in two: see the test below).
                assert counting.writes == before + 1
                assert len(conn.peer._nursery.child_tasks) == tasks  # no handler task
            nursery.cancel_scope.cancel()


async def test_turns_committed_together_each_leave_in_one_write(tmp_path: Path) -> None:
    """Several clients' turns finishing together share the sqlite store's group commit;
    each turn's last updates are held until that commit and leave with the answer, so
    every connection still gets one write per short turn (not the updates while the
    group gathers and the answer after it)."""
    root = Path(await trio.Path(tmp_path).resolve())
    async with open_sqlite_store(root / "store.db") as store:
        manager = Manager((str(root),), EchoModel(chunks=3), store=store)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            clients = [await _connect_initialized(nursery, manager, counting=True) for _ in "abc"]
            sessions = []
            for _, theirs, reader, _ in clients:
                new = {"cwd": str(root), "mcpServers": []}
                await theirs.send_all(_line({"id": 2, "method": "session/new", "params": new}))
                sessions.append((await reader.next())["result"]["sessionId"])
            await trio.testing.wait_all_tasks_blocked()
            before = [counting.writes for *_, counting in clients if counting is not None]
            prompt = [{"type": "text", "text": "a b c"}]
            for (_, theirs, _, _), session_id in zip(clients, sessions, strict=True):
                params = {"sessionId": session_id, "prompt": prompt}
                await theirs.send_all(
                    _line({"id": 3, "method": "session/prompt", "params": params})
                )
            for _, _, reader, _ in clients:
                got = [await reader.next() for _ in range(5)]  # 3 chunks, the title, the answer
                assert [m.get("method") for m in got[:4]] == ["session/update"] * 4
                assert got[4]["result"] == {"stopReason": "end_turn"}
            after = [counting.writes for *_, counting in clients if counting is not None]
            assert after == [n + 1 for n in before]
            nursery.cancel_scope.cancel()


async def test_cancel_of_a_turn_whose_start_waits_for_room_still_reaches_it(
    tmp_path: Path, monkeypatch: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """With the worker's command channel full, a prompt's StartTurn waits in the worker's
    backlog; a session/cancel read before it is sent must still cancel the turn (its
    CancelTurn waits behind it, in order)."""
    from punie_trio.hub import _manager
    from punie_trio.worker import CancelTurn, ScriptModel, StartTurn

    monkeypatch.setattr(_manager, "WORKER_COMMAND_BUFFER", 1)
    waited: list[type] = []
    send_backlog = Manager._send_backlog

    async def recording(self: Manager, handle: Any) -> None:
        waited.extend(type(command) for command in handle.backlog)
        await send_backlog(self, handle)

    monkeypatch.setattr(Manager, "_send_backlog", recording)
    root = Path(await trio.Path(tmp_path).resolve())
    model = ScriptModel([[{"text": "working"}, {"sleep": 3600}]])
    manager = Manager((str(root),), model)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        _, theirs, reader, _ = await _connect_initialized(nursery, manager)
        sessions = []
        for i in range(3):
            new = {"cwd": str(root), "mcpServers": []}
            await theirs.send_all(_line({"id": 2 + i, "method": "session/new", "params": new}))
            sessions.append((await reader.next())["result"]["sessionId"])
        await trio.testing.wait_all_tasks_blocked()
        # One read: three prompts (the first is handed to the waiting worker, the second
        # fills the channel, the third must wait) and a cancel of the third.
        batch = b"".join(
            _line(
                {
                    "id": 10 + i,
                    "method": "session/prompt",
                    "params": {"sessionId": s, "prompt": [{"type": "text", "text": "x"}]},
                }
            )
            for i, s in enumerate(sessions)
        ) + _line({"method": "session/cancel", "params": {"sessionId": sessions[2]}})
        await theirs.send_all(batch)
        answers: dict[int, Any] = {}
        with trio.fail_after(60):
            while 12 not in answers:
                msg = await reader.next()
                if "id" in msg:
                    answers[msg["id"]] = msg["result"]
        assert answers[12] == {"stopReason": "cancelled"}
        assert 10 not in answers and 11 not in answers  # still working
        # The third start waited for room (its cancel behind it, or sent after it).
        assert waited[:1] == [StartTurn] and set(waited) <= {StartTurn, CancelTurn}
        nursery.cancel_scope.cancel()


async def test_turns_cut_by_a_cancelled_manager_are_recorded_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The manager's nursery cancelled with turns running (their relays cancelled too):
    each relay still commits its turn, as cancelled, with the real sqlite store's group
    commit (a relay puts a shield around the commit only when it is already cancelled)."""
    from punie_trio.worker import ScriptModel

    root = Path(await trio.Path(tmp_path).resolve())
    model = ScriptModel([[{"text": "working"}, {"sleep": 3600}]])
    async with open_sqlite_store(root / "store.db") as store:
        manager = Manager((str(root),), model, store=store)
        sessions = []
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            _, theirs, reader, _ = await _connect_initialized(nursery, manager)
            for i in range(3):
                new = {"cwd": str(root), "mcpServers": []}
                await theirs.send_all(_line({"id": 2 + i, "method": "session/new", "params": new}))
                sessions.append((await reader.next())["result"]["sessionId"])
            for i, s in enumerate(sessions):
                prompt = {"sessionId": s, "prompt": [{"type": "text", "text": "x"}]}
                await theirs.send_all(
                    _line({"id": 10 + i, "method": "session/prompt", "params": prompt})
                )
            for _ in sessions:
                assert (await reader.next())["method"] == "session/update"
            await trio.testing.wait_all_tasks_blocked()
            assert manager._running_turns == 3
            nursery.cancel_scope.cancel()
        for s in sessions:
            entries = await store.transcript(s)
            assert [e.kind for e in entries] == [
                "user_message_chunk",
                "agent_message_chunk",
                "session_info_update",  # its first turn named it
                "stop",
            ]
            assert entries[-1].payload["stopReason"] == "cancelled"
            rec = await store.get_session(s)
            assert rec is not None and rec.turns == 1


@pytest.mark.parametrize(
    ("slow_commit", "chunks", "early"),
    [(True, EARLY_WRITE_UPDATES, True), (True, EARLY_WRITE_UPDATES - 1, False), (False, 8, False)],
)
async def test_a_lone_turns_updates_leave_before_a_slow_commit(
    tmp_path: Path, slow_commit: bool, chunks: int, early: bool
) -> None:
    """The only running turn on a store whose commit takes time (``slow_commit``, as
    SQLite's), with EARLY_WRITE_UPDATES or more updates held: they are written before the
    commit, so the client reads them while it runs, and the answer follows it. Fewer, or
    on a store whose commit is immediate, they are held and leave with the answer."""
    from .test_peer import NowStream, Raw

    root = Path(await trio.Path(tmp_path).resolve())
    seen_at_commit: list[list[str]] = []

    class Store(MemoryStore):
        async def append_turn(self, *args: Any, **kwargs: Any) -> None:
            seen_at_commit.append([json.loads(t).get("method", "answer") for t in stream.now])
            await super().append_turn(*args, **kwargs)

    store = Store()
    store.slow_commit = slow_commit  # type: ignore[misc]
    manager = Manager((str(root),), EchoModel(chunks=chunks), store=store)
    ours, theirs = memory_message_stream_pair()
    stream = NowStream(ours, room=1_000_000)
    raw = Raw(theirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = ClientConnection(manager, transport="memory")
        await nursery.start(conn.run, stream)
        await raw.send({"id": 1, "method": "initialize", "params": {"protocolVersion": 1}})
        await raw.recv()
        new = {"cwd": str(root), "mcpServers": []}
        await raw.send({"id": 2, "method": "session/new", "params": new})
        session_id = (await raw.recv())["result"]["sessionId"]
        text = " ".join(f"w{i}" for i in range(chunks))
        prompt = {"sessionId": session_id, "prompt": [{"type": "text", "text": text}]}
        # A first turn names the session (one more update); the second is the one measured.
        await raw.send({"id": 4, "method": "session/prompt", "params": prompt})
        await trio.testing.wait_all_tasks_blocked()
        stream.now.clear()
        seen_at_commit.clear()
        await raw.send({"id": 3, "method": "session/prompt", "params": prompt})
        await trio.testing.wait_all_tasks_blocked()
        # Written by the relay itself (the writer was idle), in two writes or in one.
        got = [json.loads(t) for t in stream.now]
        assert [m.get("method") for m in got[:chunks]] == ["session/update"] * chunks
        answer = {"jsonrpc": "2.0", "id": 3, "result": {"stopReason": "end_turn"}}
        assert got[chunks:] == [answer]
        assert seen_at_commit == [["session/update"] * chunks if early else []]
        nursery.cancel_scope.cancel()
