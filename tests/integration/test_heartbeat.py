"""Heartbeats on ``/acp``: a silent peer is pinged, then dropped (its sessions wait out the
grace period), a connection that never initializes is closed with 1008, and a client that
answers pings stays. A real server on a real port, on a MockClock moved by hand."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Request

from punie_trio.hub import Limits
from punie_trio.web._heartbeat import INITIALIZE_WITHIN, PING_AFTER, SWEEP_EVERY
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ._support import acp_ws_client, received_so_far, settle_until
from .conftest import StartServer


class RawClient:
    """A WebSocket client that answers nothing by itself (wsproto, no pongs)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        # A stdlib view of the same socket, to read what has arrived without waiting.
        self.peek = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []
        self.eof = False

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        client = cls(await trio.open_tcp_stream(host, int(port)))
        await client.stream.send_all(client.ws.send(Request(host=host, target="/acp")))
        while not any(isinstance(e, AcceptConnection) for e in client.events):
            client._take(await client.stream.receive_some(65536))
        return client

    def _take(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        self.ws.receive_data(data)
        self.events += list(self.ws.events())

    def read_ready(self) -> None:
        """Take whatever the server sent so far, without waiting (and without answering)."""
        if not self.eof:
            for data in received_so_far(self.peek):
                self._take(data)

    async def send_json(self, msg: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(Message(data=json.dumps(msg))))

    async def open_session(self, client_id: str, cwd: Path) -> None:
        """Send ``initialize`` (with ``client_id``) and ``session/new`` (ids 1 and 2),
        without reading the answers."""
        meta = {"punie-trio/clientId": client_id}
        await self.send_json(
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": 1, "_meta": meta}}
        )  # fmt: skip
        await self.send_json(
            {"jsonrpc": "2.0", "id": 2, "method": "session/new",
             "params": {"cwd": str(cwd), "mcpServers": []}}
        )  # fmt: skip

    def pings(self) -> int:
        return sum(isinstance(e, Ping) for e in self.events)

    def closed_with(self) -> tuple[int, str] | None:
        for e in self.events:
            if isinstance(e, CloseConnection):
                return e.code, e.reason
        return None


async def settle() -> None:
    """Let the server and the in-process clients act on what just happened (loopback
    bytes are in the receiver's buffer once sent; each pass polls for them)."""
    for _ in range(4):
        await trio.testing.wait_all_tasks_blocked()


async def test_silent_peers_are_pinged_then_dropped_and_lazy_ones_closed(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    async with start_server(limits=Limits(grace_seconds=300)) as running:
        manager = running.manager
        assert running.url is not None
        async with acp_ws_client(running.url, acp_schema) as (live, _):
            await live.initialize()  # trio-websocket answers pings by itself
            live_session = await live.new_session(str(tmp_path))
            silent = await RawClient.connect(running.url)
            await silent.open_session("laptop", tmp_path)
            lazy = await RawClient.connect(running.url)  # never sends initialize
            await settle_until(lambda: len(manager.sessions) == 2)
            assert len(manager.connections) == 3

            def step_to(t: float) -> None:
                mock_clock.jump(t - trio.current_time())

            start = trio.current_time()
            step_to(start + SWEEP_EVERY)
            await settle()
            for raw in (silent, lazy):
                raw.read_ready()
                assert raw.pings() == 0 and not raw.eof
            # Silent past PING_AFTER: pinged. The live client's pong counts as heard.
            step_to(start + PING_AFTER)
            await settle()
            for raw in (silent, lazy):
                raw.read_ready()
                assert raw.pings() == 1, raw.events
            # INITIALIZE_WITHIN after it was accepted, the lazy one is closed (1008).
            step_to(start + INITIALIZE_WITHIN)
            await settle()
            lazy.read_ready()
            assert lazy.closed_with() == (1008, "initialize not received within 30 s")
            assert lazy.eof
            assert len(manager.connections) == 2
            # The silent one is dropped once silent for DROP_AFTER; the live one stays.
            for t in range(40, 70, 10):
                step_to(start + t)
                await settle()
            silent.read_ready()
            assert silent.eof and silent.pings() >= 3
            await settle_until(lambda: len(manager.connections) == 1)
            # Its sessions wait for its client id (the grace period), as after any drop.
            laptop = [s for s in manager.sessions.values() if s.detached_client == "laptop"]
            assert len(laptop) == 1
            assert await live.prompt(live_session, "still here") == "end_turn"
            for raw in (silent, lazy):
                raw.peek.close()
                await raw.stream.aclose()


async def test_an_answer_sent_after_a_1009_close_is_kept_for_the_client(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Once the server has sent its close (1009 for a message over the bound), Hypercorn
    drops the app's sends without a word. A prompt's answer sent then was taken as
    delivered; it is now kept, and a client re-attaching within grace gets it."""
    model = ScriptModel([[{"text": "working"}, {"sleep": 1}, {"text": "done"}]])
    limits = Limits(grace_seconds=300)
    async with start_server(model, max_message_bytes=4096, limits=limits) as running:
        manager = running.manager
        assert running.url is not None
        raw = await RawClient.connect(running.url)
        await raw.open_session("ide", tmp_path)
        await settle_until(lambda: len(manager.sessions) == 1)
        (session_id,) = manager.sessions
        prompt = [{"type": "text", "text": "go"}]
        await raw.send_json(
            {"jsonrpc": "2.0", "id": 3, "method": "session/prompt",
             "params": {"sessionId": session_id, "prompt": prompt}}
        )  # fmt: skip
        await settle_until(lambda: manager.sessions[session_id].turn is not None)
        await raw.stream.send_all(raw.ws.send(Message(data="x" * 5000)))  # over the bound
        await settle()
        raw.read_ready()
        assert raw.closed_with() == (1009, "message over the 4096-byte limit")
        mock_clock.jump(2)  # the turn ends and answers while the connection is closing
        await settle_until(lambda: manager.sessions[session_id].turn is None)
        await settle()
        raw.read_ready()
        received = [json.loads(e.data).get("id") for e in raw.events if isinstance(e, Message)]
        assert 3 not in received
        raw.peek.close()
        await raw.stream.aclose()
        await settle_until(lambda: len(manager.connections) == 0)
        # (The schema checker validates answers against the requests it saw sent.)
        acp_schema.client_sent({"jsonrpc": "2.0", "id": 3, "method": "session/prompt"})
        async with acp_ws_client(running.url, acp_schema) as (again, _):
            meta = {"punie-trio/clientId": "ide", "punie-trio/awaiting": [3]}
            await again.request("initialize", {"protocolVersion": 1, "_meta": meta})
            await settle()  # (no waiting for it: on a MockClock a missing answer would hang)
            answers = [m for m in again.received if m.get("id") == 3]
        assert [a.get("result") for a in answers] == [{"stopReason": "end_turn"}]
