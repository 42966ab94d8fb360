"""What a WebSocket connection holds is given back when it ends, at once: not when the
collector next runs (the server runs it rarely, ``server.GC_THRESHOLDS``). An audit saw
RSS reach 3 GB over rounds of 40 connections that each left a 16 MiB message unfinished
and closed, while their file descriptors were all back.

The tests switch the collector off, so whatever a closed connection still holds is held
until the test looks: no timing, no margins."""

from __future__ import annotations

import gc
import json
import socket
import weakref
import zlib
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from punie_trio.hub import ClientConnection, Limits
from punie_trio.server import Running
from punie_trio.web._asgi_ws import AsgiWebSocketStream
from punie_trio.web._direct import DirectReader
from punie_trio.web._frames import unmask
from punie_trio.worker import TurnContext

from ._support import settle_until
from .conftest import StartServer

#: An unfinished message: the server buffers it until its last fragment, which never comes.
PARTIAL = 1024 * 1024


@contextmanager
def collector_off() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@attrs.define(eq=False)
class RawClient:
    """A WebSocket client made of wsproto and a TCP stream: it can leave a message half
    sent, which the usual clients cannot."""

    stream: trio.SocketStream
    ws: WSConnection
    deflate: bool

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event:
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some(65536)
            assert data, "the server closed the connection"
            self.ws.receive_data(data)

    async def send_unfinished(self, size: int) -> None:
        """The first fragment of a text message of ``size`` characters (compressed, with
        the extension: flushed, so the server can inflate all of it at once)."""
        payload, rsv1 = b"a" * size, 0
        if self.deflate:
            compressor = zlib.compressobj(wbits=-15)
            payload = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
            rsv1 = 0x40
        await self.stream.send_all(client_frame(0x01 | rsv1, payload))

    async def call(self, request_id: int, method: str, params: dict[str, Any]) -> Any:
        msg = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        await self.send(TextMessage(json.dumps(msg)))
        while True:
            event = await self.next_event()
            assert isinstance(event, TextMessage)
            answer = json.loads(event.data)
            if answer.get("id") == request_id:
                return answer["result"]


def client_frame(first: int, payload: bytes) -> bytes:
    """A masked frame (RFC 6455 5.2) whose first byte is ``first`` (FIN clear)."""
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = b"\x01\x02\x03\x04"
    return head + mask + unmask(payload, mask)


@asynccontextmanager
async def raw_client(server: Running, *, deflate: bool = False) -> Any:
    assert server.url is not None
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    ws = WSConnection(ConnectionType.CLIENT)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        client = RawClient(stream, ws, deflate)
        extensions = [PerMessageDeflate()] if deflate else []
        await client.send(Request(host=f"{host}:{port}", target="/acp", extensions=extensions))
        accepted = await client.next_event()
        assert isinstance(accepted, AcceptConnection)
        assert bool(accepted.extensions) is deflate
        yield client


def the_connection(server: Running) -> tuple[ClientConnection, Any]:
    """The server's one connection, and Hypercorn's WebSocket stream under it."""
    (conn,) = server.manager.connections
    assert conn.peer is not None and isinstance(conn.peer.stream, AsgiWebSocketStream)
    direct = conn.peer.stream._direct
    assert direct is not None
    return conn, direct.stream


async def partial_message(stream: Any) -> weakref.ref[Any]:
    """Once the server holds all of the unfinished message: what holds it. That is
    Hypercorn's ``stream``'s buffer where wsproto reads (permessage-deflate), else the
    direct reader, whose frame reader joins the fragments (in a ``bytearray``, which takes
    no weak reference; nothing else holds the reader or its frame reader)."""
    reader = stream.send.__self__.send.__self__.frame_reader
    if isinstance(reader, DirectReader):
        await settle_until(lambda: reader.frames.message_bytes == PARTIAL)
        return weakref.ref(reader)
    await settle_until(lambda: stream.buffer.length == PARTIAL)
    return weakref.ref(stream.buffer.value)


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "permessage-deflate"])
async def test_a_closed_connection_is_freed_without_the_collector(
    server: Running, deflate: bool
) -> None:
    """A connection that leaves a large message unfinished and closes: the message's
    buffer and every object of the connection (Hypercorn's, wsproto's, ours) are freed as
    soon as it has ended. They sat in reference cycles only a full collection freed."""
    with collector_off(), trio.fail_after(10):
        async with raw_client(server, deflate=deflate) as client:
            await client.call(1, "initialize", {"protocolVersion": 1})
            await client.send_unfinished(PARTIAL)
            conn, stream = the_connection(server)
            held = {
                "partial message": await partial_message(stream),
                "Hypercorn's stream": weakref.ref(stream),
                "socket writer": weakref.ref(stream.send.__self__.send.__self__),
                "client connection": weakref.ref(conn),
                "peer": weakref.ref(conn.peer),
            }
            del conn, stream
        await settle_until(lambda: not server.manager.connections)
        await trio.testing.wait_all_tasks_blocked()
        assert [name for name, ref in held.items() if ref() is not None] == []


@attrs.define(eq=False)
class WaitingModel:
    """Every turn waits until the test lets it end."""

    name: str = "waiting"
    release: trio.Event = attrs.field(factory=trio.Event)

    async def run_turn(self, ctx: TurnContext) -> str:
        await self.release.wait()
        return "end_turn"


async def test_a_connection_held_by_its_running_turn_drops_its_partial_message(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A client with a client id leaves with a turn running: the turn runs on for it (the
    reconnect grace), and holds its connection until it ends. The message the client left
    unfinished is dropped when the connection ends all the same."""
    model = WaitingModel()
    async with start_server(model) as server:
        with collector_off(), trio.fail_after(10):
            async with raw_client(server) as client:
                meta = {"punie-trio/clientId": "ide-1"}
                await client.call(1, "initialize", {"protocolVersion": 1, "_meta": meta})
                session = await client.call(
                    2, "session/new", {"cwd": str(tmp_path), "mcpServers": []}
                )
                prompt = {"sessionId": session["sessionId"], "prompt": [{"type": "text"}]}
                prompt["prompt"][0]["text"] = "wait"
                msg = {"jsonrpc": "2.0", "id": 3, "method": "session/prompt", "params": prompt}
                await client.send(TextMessage(json.dumps(msg)))
                await client.send_unfinished(PARTIAL)
                conn, stream = the_connection(server)
                partial = await partial_message(stream)
                held_conn = weakref.ref(conn)
                del conn, stream
            await settle_until(lambda: not server.manager.connections)
            await trio.testing.wait_all_tasks_blocked()
            assert held_conn() is not None  # (the running turn has it)
            assert partial() is None
            model.release.set()


async def test_a_client_that_does_not_read_holds_a_bounded_backlog(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A client sends prompts whose answers stream back large (the echo model repeats
    them) and reads nothing: what the server queues for it stays within the outbox's byte
    budget (but for one message), where the message bound alone let 256 queue (an audit:
    120 prompts of 1 MiB, 300 MB held for one connection). Turns wait for room."""
    budget = 256 * 1024
    prompts, text = 40, "z" * (512 * 1024)
    async with start_server(limits=Limits(outbox_bytes=budget)) as server:
        with trio.fail_after(30):
            async with raw_client(server) as client:
                client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await client.call(1, "initialize", {"protocolVersion": 1})
                new = {"cwd": str(tmp_path), "mcpServers": []}
                sessions = [
                    (await client.call(10 + i, "session/new", new))["sessionId"]
                    for i in range(prompts)
                ]
                for i, session in enumerate(sessions):
                    params = {"sessionId": session, "prompt": [{"type": "text", "text": text}]}
                    msg = {"jsonrpc": "2.0", "id": 100 + i, "method": "session/prompt"}
                    await client.send(TextMessage(json.dumps({**msg, "params": params})))
                conn, _ = the_connection(server)
                assert conn.peer is not None
                outbox = conn.peer._outbox
                # Every prompt has arrived and its turn run (or waits for room).
                await settle_until(lambda: len(conn.prompt_times) == prompts)
                await trio.testing.wait_all_tasks_blocked()
                update = len(text) + 200  # one echoed update, in memory
                assert outbox.queued_bytes() <= budget + update
                waiting = [s for s in sessions if server.manager.sessions[s].turn is not None]
                assert waiting  # backpressure: their answers wait for the client
