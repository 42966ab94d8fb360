"""A Manager with any number of client connections over in-memory streams, for tests that
need several clients on one hub, drop a client and reconnect it, or a MockClock (grace
periods, rate limits). Real-server tests use ``tests/integration/_support.py`` instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from punie_trio.hub import ClientConnection, Limits, Manager
from punie_trio.store import MemoryStore, Store
from punie_trio.transport import MemoryMessageStream, memory_message_stream_pair
from punie_trio.worker import Model

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..integration._support import fresh_ids

CLIENT_ID_META = "punie-trio/clientId"
AWAITING_META = "punie-trio/awaiting"


@attrs.define(eq=False)
class Link:
    """One client connected to the hub."""

    client: AcpTestClient
    stream: MemoryMessageStream
    connection: ClientConnection

    async def drop(self) -> None:
        """Disconnect abruptly, like a closed socket: the agent's reader sees end of stream."""
        await self.stream.aclose()


@attrs.define(eq=False)
class Hub:
    manager: Manager
    nursery: trio.Nursery
    checker: SchemaChecker
    root: Path

    async def connect(
        self, *, buffer: int = 64, on_probation: bool = False, **client_kw: Any
    ) -> Link:
        """A client connected to the hub; ``on_probation`` as the app lets one in past a
        full ``max_connections`` (``Manager.admit_upgrade``)."""
        agent_side, client_side = memory_message_stream_pair(buffer)
        connection = ClientConnection(self.manager, transport="memory", on_probation=on_probation)
        await self.nursery.start(connection.run, agent_side)
        client = AcpTestClient(client_side, self.checker, ids=fresh_ids(), **client_kw)
        await self.nursery.start(client.run)
        return Link(client, client_side, connection)

    async def settle(self) -> None:
        """Let the hub finish reacting (e.g. to a disconnect) before the test goes on."""
        await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def open_hub(
    root: Path,
    checker: SchemaChecker,
    model: Model,
    *,
    limits: Limits | None = None,
    store: Store | None = None,
    roots: tuple[Path, ...] | None = None,
) -> AsyncIterator[Hub]:
    root = Path(await trio.Path(root).resolve())
    manager = Manager(
        tuple(str(r) for r in (roots or (root,))),
        model,
        limits=limits or Limits(),
        store=store if store is not None else MemoryStore(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield Hub(manager, nursery, checker, root)
        nursery.cancel_scope.cancel()


async def initialize(
    client: AcpTestClient,
    *,
    client_id: str | None = None,
    awaiting: list[Any] | None = None,
    **caps: Any,
) -> dict[str, Any]:
    """``initialize``, optionally saying who the client is (for reconnects) and which
    answers it still awaits from its previous connection."""
    params: dict[str, Any] = {
        "protocolVersion": 1,
        "clientInfo": {"name": "test", "version": "0"},
    }
    if caps:
        params["clientCapabilities"] = caps
    meta: dict[str, Any] = {}
    if client_id is not None:
        meta[CLIENT_ID_META] = client_id
    if awaiting is not None:
        meta[AWAITING_META] = awaiting
    if meta:
        params["_meta"] = meta
    result: dict[str, Any] = await client.request("initialize", params)
    return result


def prompt_params(session_id: str, text: str) -> dict[str, Any]:
    return {"sessionId": session_id, "prompt": [{"type": "text", "text": text}]}


async def send_prompt(client: AcpTestClient, request_id: str, session_id: str, text: str) -> None:
    """Send a ``session/prompt`` without waiting for its answer (which may arrive on
    another connection); the answer carries ``request_id``."""
    await client.send(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "session/prompt",
            "params": prompt_params(session_id, text),
        }
    )


async def expect_error(client: AcpTestClient, method: str, params: Any) -> dict[str, Any]:
    answer = await client.request_raw(method, params)
    assert "error" in answer, answer
    error: dict[str, Any] = answer["error"]
    return error


def summary(update: dict[str, Any]) -> tuple[str, str]:
    """(kind, text or status) of a ``session/update``, for comparing streams."""
    kind = update["sessionUpdate"]
    content = update.get("content")
    if isinstance(content, dict):
        return kind, str(content.get("text"))
    return kind, str(update.get("status") or update.get("title") or "")


def has_update(session_id: str, kind: str, text: str | None = None) -> Any:
    """A ``wait_for`` predicate: a ``session/update`` of ``kind`` (with ``text``)."""

    def check(msg: dict[str, Any]) -> bool:
        if msg.get("method") != "session/update" or msg["params"]["sessionId"] != session_id:
            return False
        update = msg["params"]["update"]
        if update["sessionUpdate"] != kind:
            return False
        return text is None or update.get("content", {}).get("text") == text

    return check


async def prompt_then_drop(
    hub: Hub,
    client_id: str,
    request_id: str,
    first_chunk: str,
    *,
    text: str = "go",
    buffer: int = 64,
    **caps: Any,
) -> tuple[Link, str]:
    """Connect as ``client_id`` (advertising ``caps``), open a session, send it a prompt
    (``request_id``), wait for the turn's ``first_chunk`` and drop the connection mid-turn
    (its turn runs on within grace). Returns the dropped link (what its client got) and the
    session id."""
    link = await hub.connect(buffer=buffer)
    await initialize(link.client, client_id=client_id, **caps)
    session_id = await link.client.new_session(str(hub.root))
    await send_prompt(link.client, request_id, session_id, text)
    await link.client.wait_for(has_update(session_id, "agent_message_chunk", first_chunk))
    await link.drop()
    return link, session_id
