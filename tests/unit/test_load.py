"""session/load when something goes wrong half-way: a delete from another connection, a
``$/cancel_request``, a close, a failed write of the roots. The session a failed load
opened is dropped (no leaked session or worker, nothing left open without its history);
one that was open keeps what it had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from punie_trio.hub import ClientConnection, Manager
from punie_trio.store import MemoryStore, StoreError
from punie_trio.transport import memory_message_stream_pair
from punie_trio.worker import EchoModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient


class GatedReplayStore:
    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.gate = trio.Event()
        self.reading = trio.Event()
        self.armed = False
        self.deleting = trio.Event()
        self.delete_gate = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def delete_session(self, session_id: str) -> bool:
        self.deleting.set()
        await self.delete_gate.wait()
        return await self.inner.delete_session(session_id)

    async def transcript_rows(self, session_id: str, page_size: int = 1000):
        if self.armed:
            self.reading.set()
            await self.gate.wait()
        async for rows in self.inner.transcript_rows(session_id, page_size):
            yield rows


async def test_a_load_that_fails_in_its_replay_drops_what_it_opened(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = Path(await trio.Path(tmp_path).resolve())
    store = GatedReplayStore()
    manager = Manager((str(root),), EchoModel(), store=store)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        clients = []
        for _ in range(2):
            agent_side, client_side = memory_message_stream_pair()
            await nursery.start(ClientConnection(manager, transport="memory").run, agent_side)
            client = AcpTestClient(client_side, acp_schema)
            await nursery.start(client.run)
            await client.initialize()
            clients.append(client)
        a, b = clients
        session = await a.new_session(str(root))
        await a.request("session/close", {"sessionId": session})
        assert session not in manager.sessions and not manager.workers
        store.armed = True
        answers: dict[str, Any] = {}

        async def load() -> None:
            answers["load"] = await a.request_raw(
                "session/load", {"sessionId": session, "cwd": str(root), "mcpServers": []}
            )

        async with trio.open_nursery() as n:

            async def delete() -> None:
                answers["delete"] = await b.request_raw("session/delete", {"sessionId": session})

            n.start_soon(delete)
            await store.deleting.wait()  # b's delete found no live session, is deleting
            n.start_soon(load)
            await store.reading.wait()  # a's load has opened the session, replay under way
            store.delete_gate.set()
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()
        assert answers["delete"]["result"] == {}
        assert answers["load"]["error"]["code"] == -32002  # the load failed ...
        # ... and the session it opened is dropped, its worker with it:
        assert session not in manager.sessions
        assert not manager.workers
        nursery.cancel_scope.cancel()


async def test_a_cancelled_load_drops_what_it_opened(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = Path(await trio.Path(tmp_path).resolve())
    store = GatedReplayStore()
    manager = Manager((str(root),), EchoModel(), store=store)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        agent_side, client_side = memory_message_stream_pair()
        await nursery.start(ClientConnection(manager, transport="memory").run, agent_side)
        a = AcpTestClient(client_side, acp_schema)
        await nursery.start(a.run)
        await a.initialize()
        session = await a.new_session(str(root))
        await a.request("session/close", {"sessionId": session})
        store.armed = True
        await a.send(
            {
                "jsonrpc": "2.0",
                "id": "L",
                "method": "session/load",
                "params": {"sessionId": session, "cwd": str(root), "mcpServers": []},
            }
        )
        await store.reading.wait()
        await a.notify("$/cancel_request", {"requestId": "L"})
        answer = await a.wait_for(lambda m: m.get("id") == "L")
        assert "error" in answer and answer["error"]["code"] == -32800
        assert session not in manager.sessions  # not left open without its history
        nursery.cancel_scope.cancel()


async def test_a_close_during_a_load_is_refused(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    root = Path(await trio.Path(tmp_path).resolve())
    store = GatedReplayStore()
    manager = Manager((str(root),), EchoModel(), store=store)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        agent_side, client_side = memory_message_stream_pair()
        await nursery.start(ClientConnection(manager, transport="memory").run, agent_side)
        a = AcpTestClient(client_side, acp_schema)
        await nursery.start(a.run)
        await a.initialize()
        await a.new_session(str(root))  # keeps the worker alive
        session = await a.new_session(str(root))
        await a.prompt(session, "hello")
        await a.request("session/close", {"sessionId": session})
        store.armed = True
        answers: dict[str, Any] = {}

        async def load() -> None:
            params = {"sessionId": session, "cwd": str(root), "mcpServers": []}
            answers["load"] = await a.request_raw("session/load", params)

        async with trio.open_nursery() as n:
            n.start_soon(load)
            await store.reading.wait()
            answers["close"] = await a.request_raw("session/close", {"sessionId": session})
            store.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        # Refused as a prompt is (it once went ahead, and the load then seeded the worker
        # with the history of a session no longer open): the load completes.
        assert answers["close"]["error"]["code"] == -32600
        assert "still loading" in answers["close"]["error"]["message"]
        assert answers["load"]["result"] == {}
        worker = manager.workers[str(root)].worker
        assert session in manager.sessions and session in worker._history
        await a.request("session/close", {"sessionId": session})  # and closes after it
        nursery.cancel_scope.cancel()


class FailingWriteStore(GatedReplayStore):
    async def update_session(self, *a: Any, **k: Any) -> None:
        if self.armed:
            raise StoreError("disk full")
        await self.inner.update_session(*a, **k)


async def test_a_failed_roots_write_rolls_back(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    """The store cannot write the roots: a session the load opened is dropped, and one
    already open keeps the roots it had."""
    root = Path(await trio.Path(tmp_path).resolve())
    (root / "x").mkdir()
    store = FailingWriteStore()
    store.gate.set()
    manager = Manager((str(root),), EchoModel(), store=store)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        agent_side, client_side = memory_message_stream_pair()
        await nursery.start(ClientConnection(manager, transport="memory").run, agent_side)
        a = AcpTestClient(client_side, acp_schema)
        await nursery.start(a.run)
        await a.initialize()
        session = await a.new_session(str(root))
        await a.request("session/close", {"sessionId": session})
        store.armed = True
        params = {
            "sessionId": session,
            "cwd": str(root),
            "mcpServers": [],
            "additionalDirectories": [str(root / "x")],
        }
        ans = await a.request_raw("session/load", params)
        assert "error" in ans
        assert session not in manager.sessions and not manager.workers
        store.armed = False
        await a.request("session/load", {**params, "additionalDirectories": []})
        store.armed = True
        ans = await a.request_raw("session/load", params)
        assert "error" in ans and manager.sessions[session].additional_directories == ()
        assert not manager.sessions[session].loading
        nursery.cancel_scope.cancel()
