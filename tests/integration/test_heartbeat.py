"""Heartbeats on ``/acp``: a silent peer is pinged, then dropped (its sessions wait out the
grace period), a connection that never initializes is closed with 1008, and a client that
answers pings stays. A connection whose client id a new connection names is probed at once
(ping, :data:`PROBE_WITHIN` to answer): silent, it is dropped and the new connection gets
its sessions; alive, the new one is refused. A real server on a real port, on a MockClock
moved by hand."""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
)

from punie_trio.hub import MAX_ON_PROBATION, PROBATION_INITIALIZE_WITHIN, Limits, Manager
from punie_trio.web._heartbeat import INITIALIZE_WITHIN, PING_AFTER, PROBE_WITHIN, SWEEP_EVERY
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ._support import TOKEN, acp_ws_client, received_so_far, settle_until, ws_url
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
    async def connect(cls, url: str, token: str | None = None) -> RawClient:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        client = cls(await trio.open_tcp_stream(host, int(port)))
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        request = Request(host=host, target="/acp", extra_headers=headers)
        await client.stream.send_all(client.ws.send(request))
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

    def messages(self) -> list[dict[str, Any]]:
        """The JSON-RPC messages received so far (call :meth:`read_ready` first); a
        message wsproto handed over in parts (a large one) once it is whole."""
        messages, parts = [], []
        for e in self.events:
            if isinstance(e, Message):
                parts.append(e.data)
                if e.message_finished:
                    messages.append(json.loads("".join(parts)))
                    parts = []
        return messages

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
        assert raw.closed_with() == (1009, "message over the 4096-byte limit (5000 bytes)")
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


def chunks(messages: list[dict[str, Any]], session_id: str) -> list[str]:
    """The agent message chunks of ``session_id`` among ``messages``, in order."""
    return [
        m["params"]["update"]["content"]["text"]
        for m in messages
        if m.get("method") == "session/update"
        and m["params"]["sessionId"] == session_id
        and m["params"]["update"]["sessionUpdate"] == "agent_message_chunk"
    ]


async def half_open_client(
    running: Any, client_id: str, cwd: Path, acp_schema: SchemaChecker, token: str | None = None
) -> tuple[RawClient, str]:
    """A client (``client_id``) with a session whose prompt (id 3) runs its turn, which
    then stops reading and answers nothing, pings included: what a network flap or a
    laptop's sleep leaves, a connection the server still thinks open."""
    manager = running.manager
    raw = await RawClient.connect(running.url, token)
    await raw.open_session(client_id, cwd)
    await settle_until(lambda: len(manager.sessions) == 1)
    (session_id,) = manager.sessions
    prompt = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "session/prompt",
        "params": {"sessionId": session_id, "prompt": [{"type": "text", "text": "go"}]},
    }
    acp_schema.client_sent(prompt)  # (its answer is to come on another connection)
    await raw.send_json(prompt)
    await settle_until(lambda: manager.sessions[session_id].turn is not None)
    await settle()
    return raw, session_id


def initialize_request(request_id: str, client_id: str, awaiting: list[Any]) -> dict[str, Any]:
    meta = {"punie-trio/clientId": client_id, "punie-trio/awaiting": awaiting}
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {"protocolVersion": 1, "_meta": meta},
    }


def answer_to(client: Any, request_id: str | int) -> dict[str, Any] | None:
    return next((m for m in client.received if m.get("id") == request_id), None)


async def test_a_client_back_while_its_old_connection_is_half_open_takes_its_sessions_over(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """The old connection is probed at once (a ping) and, silent for PROBE_WITHIN, dropped
    as a dead peer is; the client's new connection then gets its initialize answer, every
    update of the running turn exactly once and in order (those the old connection wrote
    before the probe are its; nothing is written to it during the probe), and the
    prompt's answer. Before, it was refused (-32600) until the sweep
    dropped the old connection, 60-70 s later. A request pipelined behind the initialize
    is handled after it, as with no probe."""
    model = ScriptModel(
        [[{"text": "1 "}, {"sleep": 1}, {"text": "2 "}, {"sleep": 2}, {"text": "3 "},
          {"sleep": 4}, {"text": "4 "}, {"sleep": 1}, {"text": "5"}],
         [{"text": "again"}]]
    )  # fmt: skip
    async with start_server(model, limits=Limits(grace_seconds=300)) as running:
        manager = running.manager
        assert running.url is not None
        old, session_id = await half_open_client(running, "ide", tmp_path, acp_schema)
        mock_clock.jump(1)
        await settle()  # ("2 " written to the old connection)
        async with acp_ws_client(running.url, acp_schema) as (new, _):
            await new.send(initialize_request("init", "ide", [3]))
            await new.send({"jsonrpc": "2.0", "id": "list", "method": "session/list"})
            await settle()
            old.read_ready()
            assert old.pings() == 1 and not old.eof  # probed at once
            assert new.received == []  # the initialize waits for the probe
            mock_clock.jump(2)
            await settle()  # ("3 " comes; the old connection holds the session still)
            assert new.received == []
            old.read_ready()  # Nothing more is written to a connection being probed:
            assert chunks(old.messages(), session_id) == ["1 ", "2 "]  # (lost, half-open)
            mock_clock.jump(PROBE_WITHIN - 2)
            await settle_until(lambda: answer_to(new, "list") is not None)
            old.read_ready()
            assert old.eof  # dropped, as the heartbeat drops a dead peer
            assert "protocolVersion" in new.received[0]["result"]  # the answer comes first
            listed = answer_to(new, "list")
            assert listed is not None
            assert [s["sessionId"] for s in listed["result"]["sessions"]] == [session_id]
            assert manager.sessions[session_id].owner in manager.connections
            for _ in range(4):
                mock_clock.jump(1)
                await settle()
            answer = answer_to(new, 3)
            assert answer is not None and answer["result"] == {"stopReason": "end_turn"}
            old.read_ready()
            assert chunks(old.messages(), session_id) == ["1 ", "2 "]
            assert chunks(new.received, session_id) == ["3 ", "4 ", "5"]  # (kept for it)
            assert [m.get("id") for m in new.received].count(3) == 1
            # The new connection serves on.
            assert await new.prompt(session_id, "again") == "end_turn"
        old.peek.close()
        await old.stream.aclose()


async def test_a_client_id_whose_connection_answers_the_probe_is_still_refused(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """The guard stays: a connection that answers the ping (trio-websocket pongs by
    itself) is alive, and a second connection naming its client id gets -32600 at once
    (no time passes), while the first serves on, its sessions its own."""
    async with start_server(limits=Limits(grace_seconds=300)) as running:
        manager = running.manager
        assert running.url is not None
        async with (
            acp_ws_client(running.url, acp_schema) as (first, _),
            acp_ws_client(running.url, acp_schema) as (second, _),
        ):
            await first.request("initialize", initialize_request("", "ide", [])["params"])
            session_id = await first.new_session(str(tmp_path))
            start = trio.current_time()
            await second.send(initialize_request("init", "ide", []))
            await settle_until(lambda: answer_to(second, "init") is not None)
            refused = answer_to(second, "init")
            assert refused is not None and refused["error"]["code"] == -32600
            assert "answered a ping" in refused["error"]["message"]
            assert trio.current_time() == start
            assert manager.sessions[session_id].owner is not None
            assert len(manager.connections) == 2
            assert await first.prompt(session_id, "still mine") == "end_turn"


async def test_two_connections_racing_for_a_half_open_client_id_do_not_both_win(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Two connections name the id of a half-open one at once: one probes it, the other is
    refused at once (-32600: being taken over); the first gets the sessions. A third
    naming the id later probes the winner, which answers: refused."""
    model = ScriptModel([[{"text": "1 "}, {"sleep": 30}, {"text": "2"}]])
    async with start_server(model, limits=Limits(grace_seconds=300)) as running:
        manager = running.manager
        assert running.url is not None
        old, session_id = await half_open_client(running, "ide", tmp_path, acp_schema)
        async with (
            acp_ws_client(running.url, acp_schema) as (one, _),
            acp_ws_client(running.url, acp_schema) as (two, _),
            acp_ws_client(running.url, acp_schema) as (three, _),
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one.send, initialize_request("init-1", "ide", [3]))
                nursery.start_soon(two.send, initialize_request("init-2", "ide", [3]))
            ids = {one: "init-1", two: "init-2"}
            await settle_until(lambda: any(answer_to(c, i) is not None for c, i in ids.items()))
            await settle()
            (loser,) = [c for c, i in ids.items() if answer_to(c, i) is not None]
            (winner,) = [c for c in ids if c is not loser]
            refused = answer_to(loser, ids[loser])
            assert refused is not None and "being taken over" in refused["error"]["message"]
            mock_clock.jump(PROBE_WITHIN)
            await settle_until(lambda: answer_to(winner, ids[winner]) is not None)
            accepted = answer_to(winner, ids[winner])
            assert accepted is not None and "protocolVersion" in accepted["result"]
            owner = manager.sessions[session_id].owner
            assert owner is not None and owner.client_id == "ide"
            assert [c.client_id for c in manager.connections].count("ide") == 1
            await three.send(initialize_request("init-3", "ide", []))
            await settle_until(lambda: answer_to(three, "init-3") is not None)
            late = answer_to(three, "init-3")
            assert late is not None and "answered a ping" in late["error"]["message"]
            assert manager.sessions[session_id].owner is owner
            mock_clock.jump(30)
            await settle_until(lambda: answer_to(winner, 3) is not None)
        old.read_ready()
        assert old.eof
        old.peek.close()
        await old.stream.aclose()


async def test_a_live_client_reading_a_long_write_is_not_taken_for_dead(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A client that reads (a turn streams 20 MB to it, more than the socket buffers
    hold) but sends nothing while another connection names its client id: the ping
    cannot go out while that write waits for room, and the probe took the client for
    dead though it read all the while: it was dropped and its sessions taken over. What
    the peer takes off a write that waited for room is heard from it now: alive, the new
    connection is refused and the client gets its turn, every update once."""
    model = ScriptModel([[{"text": f"{i:02} " + "x" * 500_000} for i in range(40)]])
    async with start_server(model, limits=Limits(grace_seconds=300)) as running:
        manager = running.manager
        assert running.url is not None
        reader = await RawClient.connect(running.url)
        await reader.open_session("ide", tmp_path)
        await settle_until(lambda: len(manager.sessions) == 1)
        (session_id,) = manager.sessions
        prompt = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "session/prompt",
            "params": {"sessionId": session_id, "prompt": [{"type": "text", "text": "go"}]},
        }
        await reader.send_json(prompt)
        await settle()  # (the socket buffers are full: a write waits for room)
        async with acp_ws_client(running.url, acp_schema) as (other, _):
            await other.send(initialize_request("init", "ide", []))
            await settle()
            for _ in range(100):  # (no time passes)
                reader.read_ready()  # the client reads on, and sends nothing
                await settle()
            mock_clock.jump(PROBE_WITHIN)
            await settle_until(lambda: answer_to(other, "init") is not None)
            refused = answer_to(other, "init")
            assert refused is not None and refused["error"]["code"] == -32600
            await settle_until(lambda: manager.sessions[session_id].turn is None)
            while not any(m.get("id") == 3 for m in reader.messages()):
                reader.read_ready()
                await settle()
            assert not reader.eof
            assert manager.sessions[session_id].owner in manager.connections
            texts = chunks(reader.messages(), session_id)
            assert [t[:2] for t in texts] == [f"{i:02}" for i in range(40)]
            assert [m.get("id") for m in reader.messages()].count(3) == 1
        reader.peek.close()
        await reader.stream.aclose()


async def test_a_connection_whose_client_closes_it_during_the_probe_is_not_alive(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A client reconnecting closes its old connection, and the close frame can come in
    behind the new connection's initialize (two TCP connections): what the probe heard
    was its goodbye. It was taken as an answer, and the new connection refused (-32600,
    "alive") while the old one ended a moment later, its id free. It is not alive: the
    new connection waits for its end and gets the sessions (no time passes)."""
    model = ScriptModel([[{"text": "1 "}, {"sleep": 30}]])
    async with start_server(model, limits=Limits(grace_seconds=300)) as running:
        manager = running.manager
        assert running.url is not None
        old, session_id = await half_open_client(running, "ide", tmp_path, acp_schema)
        async with acp_ws_client(running.url, acp_schema) as (new, _):
            start = trio.current_time()
            await new.send(initialize_request("init", "ide", [3]))
            await settle()
            await old.stream.send_all(old.ws.send(CloseConnection(code=1000)))
            await settle_until(lambda: answer_to(new, "init") is not None)
            accepted = answer_to(new, "init")
            assert accepted is not None and "protocolVersion" in accepted["result"], accepted
            assert trio.current_time() == start
            owner = manager.sessions[session_id].owner
            assert owner is not None and owner in manager.connections
            assert len(manager.connections) == 1
            mock_clock.jump(30)
            await settle_until(lambda: answer_to(new, 3) is not None)
        old.peek.close()
        await old.stream.aclose()


async def test_a_client_back_at_a_full_server_takes_over_its_half_open_connection(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """At a full server (``max_connections`` 1, held by the client's own half-open
    connection) the client coming back under its client id is let in on probation: its
    initialize probes the old connection, which, silent, is dropped, and the new one takes
    its place (and its sessions, with the running turn's updates and answer). Before, its
    upgrade was refused with HTTP 503 before its client id could be read, and it was locked
    out of its own sessions until the sweep dropped the old connection, 60-70 s later."""
    model = ScriptModel(
        [[{"text": "1 "}, {"sleep": 1}, {"text": "2 "}, {"sleep": 8}, {"text": "3"}],
         [{"text": "again"}]]
    )  # fmt: skip
    limits = Limits(grace_seconds=300, max_connections=1)
    async with start_server(model, limits=limits, token=TOKEN) as running:
        manager = running.manager
        assert running.url is not None
        old, session_id = await half_open_client(running, "ide", tmp_path, acp_schema, TOKEN)
        with pytest.raises(ConnectionRejected) as wrong:  # (the token first, as ever)
            async with open_websocket_url(ws_url(running.url) + "?token=wrong"):
                pass
        assert wrong.value.status_code == 401
        async with acp_ws_client(running.url, acp_schema, token=TOKEN) as (new, _):
            await new.send(initialize_request("init", "ide", [3]))
            await new.send({"jsonrpc": "2.0", "id": "list", "method": "session/list"})
            await settle()
            old.read_ready()
            assert old.pings() == 1 and not old.eof  # probed at once
            assert new.received == []
            assert len(manager.connections) == 2  # the limit, and one on probation
            mock_clock.jump(PROBE_WITHIN)
            await settle_until(lambda: answer_to(new, "list") is not None)
            accepted = answer_to(new, "init")
            assert accepted is not None and "protocolVersion" in accepted["result"], accepted
            assert new.received[0] is accepted  # (then the pipelined request's answer)
            listed = answer_to(new, "list")
            assert listed is not None
            assert [s["sessionId"] for s in listed["result"]["sessions"]] == [session_id]
            old.read_ready()
            assert old.eof
            assert len(manager.connections) == 1
            owner = manager.sessions[session_id].owner
            assert owner is not None and owner in manager.connections
            mock_clock.jump(10)
            await settle_until(lambda: answer_to(new, 3) is not None)
            answer = answer_to(new, 3)
            assert answer is not None and answer["result"] == {"stopReason": "end_turn"}
            assert chunks(old.messages(), session_id) + chunks(new.received, session_id) == [
                "1 ", "2 ", "3"
            ]  # fmt: skip
            assert await new.prompt(session_id, "again") == "end_turn"
        old.peek.close()
        await old.stream.aclose()


async def refused_on_probation(
    url: str, acp_schema: SchemaChecker, first: dict[str, Any]
) -> tuple[dict[str, Any], tuple[int, str]]:
    """Upgrade at a full server (let in on probation), send ``first``, and return its
    answer and the WebSocket close that follows it."""
    async with acp_ws_client(url, acp_schema) as (client, ws):
        await client.send(first)
        await settle_until(lambda: client.closed.is_set())
        answer = answer_to(client, first["id"])
        assert answer is not None, client.received
        closed = ws.closed
        assert closed is not None
        return answer, (closed.code, closed.reason)


async def test_at_a_full_server_only_a_claim_to_a_dead_connection_is_let_in(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A connection let in on probation past a full limit that has no claim to a dead
    connection's place is refused, with -32600 naming the limit and why, and closed
    with 1013 (Try Again Later) naming the limit: an initialize with no client id, one
    naming a client id no connection holds, one naming the id of a live connection (it
    answers the probe at once: no time passes), and any other request first. The
    connection that holds the limit serves on, its sessions its own, and the server is
    back at its limit after each."""
    async with start_server(limits=Limits(grace_seconds=300, max_connections=1)) as running:
        manager = running.manager
        assert running.url is not None
        async with acp_ws_client(running.url, acp_schema) as (live, _):
            await live.request("initialize", initialize_request("", "ide", [])["params"])
            session_id = await live.new_session(str(tmp_path))
            start = trio.current_time()
            no_id = {"jsonrpc": "2.0", "id": "a", "method": "initialize",
                     "params": {"protocolVersion": 1}}  # fmt: skip
            cases = [
                (no_id, "name its client id in initialize _meta.punie-trio/clientId"),
                (initialize_request("b", "nobody", []), "no open connection holds client id"),
                (initialize_request("c", "ide", []), "in use by another open connection"),
                ({"jsonrpc": "2.0", "id": "d", "method": "session/list"}, "not session/list"),
            ]
            for first, why in cases:
                answer, closed = await refused_on_probation(running.url, acp_schema, first)
                error = answer["error"]
                assert error["code"] == -32600
                assert error["message"].startswith("Connection limit reached (1): "), error
                assert why in error["message"], error
                assert closed == (1013, "connection limit reached (1)")
                await settle_until(lambda: len(manager.connections) == 1)
                assert not manager.on_probation
            # Bad params keep their -32602 (naming the field), the limit in front.
            bad = initialize_request("e", "ide", [])
            bad["params"]["_meta"]["punie-trio/clientId"] = 5
            answer, closed = await refused_on_probation(running.url, acp_schema, bad)
            assert answer["error"]["code"] == -32602
            assert answer["error"]["message"].startswith(
                "Connection limit reached (1): Invalid params: _meta.punie-trio/clientId"
            )
            assert closed == (1013, "connection limit reached (1)")
            assert trio.current_time() == start
            assert manager.sessions[session_id].owner in manager.connections
            assert await live.prompt(session_id, "still mine") == "end_turn"


async def test_probation_past_a_full_limit_is_bounded_and_brief(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """At most MAX_ON_PROBATION connections are let in past the limit at once; the next
    upgrade gets the 503 as before. One that sends nothing is closed (1013) once
    PROBATION_INITIALIZE_WITHIN has passed, and its place is free again. With no
    connection holding a client id, no probe could free a place: 503 at once."""
    async with start_server(limits=Limits(grace_seconds=300, max_connections=1)) as running:
        manager = running.manager
        assert running.url is not None
        url = ws_url(running.url)

        async def refused_with_503() -> bytes:
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(url):
                    pass
            assert refused.value.status_code == 503
            return refused.value.body or b""

        async with acp_ws_client(running.url, acp_schema) as (anonymous, _):
            await anonymous.initialize()  # (no client id)
            assert b"connection limit reached (1)" in await refused_with_503()
        await settle_until(lambda: not manager.connections)
        async with acp_ws_client(running.url, acp_schema) as (live, _):
            await live.request("initialize", initialize_request("", "ide", [])["params"])
            silent = [await RawClient.connect(running.url) for _ in range(MAX_ON_PROBATION)]
            await settle_until(lambda: len(manager.on_probation) == MAX_ON_PROBATION)
            assert len(manager.connections) == 1 + MAX_ON_PROBATION
            assert b"connection limit reached (1)" in await refused_with_503()
            mock_clock.jump(PROBATION_INITIALIZE_WITHIN)
            await settle_until(lambda: len(manager.connections) == 1)
            for raw in silent:
                await settle_until(lambda raw=raw: raw.read_ready() or raw.closed_with())
                assert raw.closed_with() == (
                    1013, "connection limit reached (1): initialize not received within 5 s"
                )  # fmt: skip
                raw.peek.close()
                await raw.stream.aclose()
            answer, _ = await refused_on_probation(
                running.url, acp_schema, initialize_request("x", "ide", [])
            )
            assert "in use by another open connection" in answer["error"]["message"]
            session_id = await live.new_session(str(tmp_path))
            assert await live.prompt(session_id, "unaffected") == "end_turn"


async def test_the_503_of_a_full_server_says_when_to_try_again(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """The 503 refusing an upgrade at a full server carries ``Retry-After`` (it had none,
    so a client could only guess, or hammer). With every place on probation taken, a
    place on probation is free again within PROBATION_INITIALIZE_WITHIN (its initialize)
    and PROBE_WITHIN (the probe it starts): 10 s. With no connection that a probe could
    free, only a place coming free helps, which the server brings about itself at the
    heartbeat's INITIALIZE_WITHIN (a connection that never initialized is closed then):
    30 s. Honoured, it gets the client in."""
    async with start_server(limits=Limits(grace_seconds=300, max_connections=1)) as running:
        manager = running.manager
        assert running.url is not None
        url = ws_url(running.url)

        async def retry_after() -> str:
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(url):
                    pass
            assert refused.value.status_code == 503
            headers = dict(refused.value.headers)
            return headers.get(b"retry-after", b"(none)").decode()

        # A place held by a connection that never initializes: free at 30 s.
        silent = await RawClient.connect(running.url)
        assert await retry_after() == str(int(INITIALIZE_WITHIN))
        mock_clock.jump(INITIALIZE_WITHIN)
        await settle_until(lambda: not manager.connections)
        silent.peek.close()
        await silent.stream.aclose()
        async with acp_ws_client(running.url, acp_schema) as (live, _):
            await live.request("initialize", initialize_request("", "ide", [])["params"])
            on_probation = [await RawClient.connect(running.url) for _ in range(MAX_ON_PROBATION)]
            await settle_until(lambda: len(manager.on_probation) == MAX_ON_PROBATION)
            assert await retry_after() == str(int(PROBATION_INITIALIZE_WITHIN + PROBE_WITHIN))
            mock_clock.jump(PROBATION_INITIALIZE_WITHIN + PROBE_WITHIN)
            await settle_until(lambda: not manager.on_probation)
            answer, _ = await refused_on_probation(
                running.url, acp_schema, initialize_request("x", "ide", [])
            )
            assert "in use by another open connection" in answer["error"]["message"]
            for raw in on_probation:
                raw.peek.close()
                await raw.stream.aclose()
            session_id = await live.new_session(str(tmp_path))
            assert await live.prompt(session_id, "unaffected") == "end_turn"


async def test_two_connections_racing_for_a_half_open_client_id_at_a_full_server(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Both on probation, both naming the half-open connection's client id: one probes
    it and takes its place and its sessions; the other is refused at once (being taken
    over) and closed (1013). The server is back at its limit, with one connection under
    the id."""
    model = ScriptModel([[{"text": "1 "}, {"sleep": 30}, {"text": "2"}]])
    limits = Limits(grace_seconds=300, max_connections=1)
    async with start_server(model, limits=limits) as running:
        manager = running.manager
        assert running.url is not None
        old, session_id = await half_open_client(running, "ide", tmp_path, acp_schema)
        async with (
            acp_ws_client(running.url, acp_schema) as (one, ws_one),
            acp_ws_client(running.url, acp_schema) as (two, ws_two),
        ):
            assert len(manager.on_probation) == 2
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one.send, initialize_request("init-1", "ide", [3]))
                nursery.start_soon(two.send, initialize_request("init-2", "ide", [3]))
            ids = {one: "init-1", two: "init-2"}
            await settle_until(lambda: any(answer_to(c, i) is not None for c, i in ids.items()))
            await settle()
            (loser,) = [c for c, i in ids.items() if answer_to(c, i) is not None]
            (winner,) = [c for c in ids if c is not loser]
            refused = answer_to(loser, ids[loser])
            assert refused is not None
            assert refused["error"]["message"].startswith("Connection limit reached (1): ")
            assert "being taken over" in refused["error"]["message"]
            await settle_until(lambda: loser.closed.is_set())
            ws: WebSocketConnection = ws_one if loser is one else ws_two
            assert ws.closed is not None and ws.closed.code == 1013
            assert len(manager.connections) == 2  # (the half-open one and the winner)
            mock_clock.jump(PROBE_WITHIN)
            await settle_until(lambda: answer_to(winner, ids[winner]) is not None)
            accepted = answer_to(winner, ids[winner])
            assert accepted is not None and "protocolVersion" in accepted["result"]
            assert len(manager.connections) == 1 and not manager.on_probation
            owner = manager.sessions[session_id].owner
            assert owner is not None and owner.client_id == "ide"
            mock_clock.jump(30)
            await settle_until(lambda: answer_to(winner, 3) is not None)
        old.peek.close()
        await old.stream.aclose()


@asynccontextmanager
async def _a_place_comes_free(
    start_server: StartServer, acp_schema: SchemaChecker
) -> AsyncIterator[tuple[Manager, AcpTestClient]]:
    """A full server (``max_connections`` 2: a client with a client id and a raw one), a
    third client let in on probation, and then the raw one gone: the third is on
    probation with a place free. Yields the manager and the third client."""
    async with start_server(limits=Limits(grace_seconds=300, max_connections=2)) as running:
        manager = running.manager
        assert running.url is not None
        async with acp_ws_client(running.url, acp_schema) as (live, _):
            await live.request("initialize", initialize_request("", "ide", [])["params"])
            leaving = await RawClient.connect(running.url)
            await leaving.send_json(
                {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                 "params": {"protocolVersion": 1}}
            )  # fmt: skip
            await settle_until(lambda: all(c.initialized for c in manager.connections))
            async with acp_ws_client(running.url, acp_schema) as (late, _):
                assert len(manager.on_probation) == 1
                leaving.peek.close()
                await leaving.stream.aclose()
                await settle_until(lambda: len(manager.connections) == 2)
                yield manager, late


async def _served_as_any_other(manager: Manager, late: AcpTestClient, root: Path) -> None:
    """``late``, let in on probation, is open and one like any other: it initializes,
    opens a session and runs a turn."""
    await settle()
    assert not late.closed.is_set() and not manager.on_probation
    await late.initialize()
    session_id = await late.new_session(str(root))
    assert await late.prompt(session_id, "in") == "end_turn"


async def test_a_connection_on_probation_takes_a_place_that_comes_free(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Let in on probation, a connection whose initialize comes after another client
    left is one like any other: it needs no claim to a dead connection's place."""
    async with _a_place_comes_free(start_server, acp_schema) as (manager, late):
        await late.initialize()  # (no client id)
        assert not manager.on_probation
        session_id = await late.new_session(str(tmp_path))
        assert await late.prompt(session_id, "in") == "end_turn"


async def test_an_initialize_with_bad_params_after_a_place_came_free_is_answered_as_anywhere(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Let in on probation, a connection whose initialize (bad params) comes after another
    client left is one like any other (as the docs say, "whatever its initialize"): its
    -32602 names the field, not the connection limit, and it stays open to try again. It
    was answered "Connection limit reached (2): Invalid params: ..." and closed with 1013,
    with a place free."""
    async with _a_place_comes_free(start_server, acp_schema) as (manager, late):
        bad = initialize_request("bad", "other", [])
        bad["params"]["_meta"]["punie-trio/clientId"] = 5
        await late.send(bad)
        await settle_until(lambda: answer_to(late, "bad") is not None)
        answer = answer_to(late, "bad")
        assert answer is not None
        assert answer["error"]["code"] == -32602
        assert answer["error"]["message"].startswith("Invalid params: _meta.punie-trio/clientId"), (
            answer
        )
        await _served_as_any_other(manager, late, tmp_path)


async def test_a_request_before_initialize_after_a_place_came_free_is_answered_as_anywhere(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Let in on probation, a connection whose first request (not initialize) comes after
    another client left is one like any other: told to call initialize first, and open
    to do so. It was answered "Connection limit reached (2): ..." with a place free,
    and closed with 1013."""
    async with _a_place_comes_free(start_server, acp_schema) as (manager, late):
        await late.send({"jsonrpc": "2.0", "id": "early", "method": "session/list"})
        await settle_until(lambda: answer_to(late, "early") is not None)
        answer = answer_to(late, "early")
        assert answer is not None
        assert answer["error"] == {
            "code": -32600,
            "message": "Invalid request: call initialize before session/list",
        }
        await _served_as_any_other(manager, late, tmp_path)


async def test_on_probation_nothing_pipelined_behind_a_refusal_is_read(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """On probation, a refused request is the last one read: an initialize naming the
    half-open connection's client id, sent in the same write behind a refused one, is
    neither answered nor acted on (the old connection is not probed, its sessions stay
    its own), and the refusal is written before the close (1013)."""
    model = ScriptModel([[{"text": "1 "}, {"sleep": 30}]])
    limits = Limits(grace_seconds=300, max_connections=1)
    async with start_server(model, limits=limits) as running:
        manager = running.manager
        assert running.url is not None
        old, session_id = await half_open_client(running, "ide", tmp_path, acp_schema)
        new = await RawClient.connect(running.url)
        first = {"jsonrpc": "2.0", "id": "a", "method": "session/list"}
        second = initialize_request("b", "ide", [3])
        data = new.ws.send(Message(data=json.dumps(first)))
        data += new.ws.send(Message(data=json.dumps(second)))
        await new.stream.send_all(data)
        await settle_until(lambda: new.read_ready() or new.closed_with() is not None)
        await settle()
        new.read_ready()
        answers = new.messages()
        assert [m.get("id") for m in answers] == ["a"], answers
        acp_schema.client_sent(first)
        acp_schema.agent_sent(answers[0])
        assert answers[0]["error"]["code"] == -32600
        assert new.closed_with() == (1013, "connection limit reached (1)")
        old.read_ready()
        assert old.pings() == 0 and not old.eof
        owner = manager.sessions[session_id].owner
        assert owner is not None and owner.client_id == "ide"
        for raw in (old, new):
            raw.peek.close()
            await raw.stream.aclose()


async def test_a_silent_connection_on_probation_takes_a_place_that_came_free(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A connection on probation that has not spoken by PROBATION_INITIALIZE_WITHIN, when
    a place has come free meanwhile, takes it: it is one like any other (the heartbeat's
    30 s to initialize). It was closed with 1013 "connection limit reached (2): initialize
    not received within 5 s", with a place free."""
    async with _a_place_comes_free(start_server, acp_schema) as (manager, late):
        mock_clock.jump(PROBATION_INITIALIZE_WITHIN)
        await _served_as_any_other(manager, late, tmp_path)


async def test_a_shutdown_during_a_probe_at_a_full_server_closes_as_a_shutdown(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A shutdown does not wait for a probe: the initialize of the connection on
    probation is refused (the server is shutting down) and it is closed as every other
    connection is at a shutdown, 1001 (going away), not 1013 (try again later)."""
    model = ScriptModel([[{"text": "1 "}, {"sleep": 30}]])
    limits = Limits(grace_seconds=300, max_connections=1)
    async with start_server(model, limits=limits) as running:
        assert running.url is not None
        old, _ = await half_open_client(running, "ide", tmp_path, acp_schema)
        async with acp_ws_client(running.url, acp_schema) as (new, ws):
            await new.send(initialize_request("init", "ide", [3]))
            await settle()
            assert running.manager.on_probation and new.received == []
            running.closing.set()
            await settle_until(lambda: new.closed.is_set())
            refused = answer_to(new, "init")
            assert refused is not None and "shutting down" in refused["error"]["message"]
            assert ws.closed is not None and ws.closed.code == 1001
        old.peek.close()
        await old.stream.aclose()


async def test_at_a_full_server_a_connection_closed_by_its_client_during_the_probe_gives_its_place(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A client reconnecting closes its old connection, and the close comes in behind the
    new connection's initialize; at a full server the new connection, on probation, takes
    the old one's place as it ends (no time passes), not only when a probe drops it."""
    model = ScriptModel([[{"text": "1 "}, {"sleep": 30}]])
    limits = Limits(grace_seconds=300, max_connections=1)
    async with start_server(model, limits=limits) as running:
        manager = running.manager
        assert running.url is not None
        old, session_id = await half_open_client(running, "ide", tmp_path, acp_schema)
        async with acp_ws_client(running.url, acp_schema) as (new, _):
            start = trio.current_time()
            await new.send(initialize_request("init", "ide", [3]))
            await settle()
            assert manager.on_probation
            await old.stream.send_all(old.ws.send(CloseConnection(code=1000)))
            await settle_until(lambda: answer_to(new, "init") is not None)
            accepted = answer_to(new, "init")
            assert accepted is not None and "protocolVersion" in accepted["result"], accepted
            assert trio.current_time() == start
            assert len(manager.connections) == 1 and not manager.on_probation
            assert manager.sessions[session_id].owner in manager.connections
            mock_clock.jump(30)
            await settle_until(lambda: answer_to(new, 3) is not None)
        old.peek.close()
        await old.stream.aclose()


class _Dialer:
    """A raw client of the random test below: it answers a probe (a notification sent for
    each ping) while ``answers``, and remembers what it sent."""

    def __init__(self, raw: RawClient, answers: bool) -> None:
        self.raw = raw
        self.answers = answers
        self.client_id: str | None = None
        self.init_id: str | None = None
        self.pongs = 0
        self.gone = False

    def answer(self) -> dict[str, Any] | None:
        if self.init_id is None:
            return None
        return next((m for m in self.raw.messages() if m.get("id") == self.init_id), None)

    def closed(self) -> bool:
        return self.gone or self.raw.eof or self.raw.ws.state is not ConnectionState.OPEN

    def ended(self) -> bool:
        """Whether it is closed, with what arrived so far taken."""
        if not self.gone:
            self.raw.read_ready()
        return self.closed()

    def answered(self) -> bool:
        """Whether its initialize is answered, with what arrived so far taken."""
        self.raw.read_ready()
        return self.answer() is not None

    async def close(self) -> None:
        if not self.gone:
            self.gone = True
            self.raw.peek.close()
            await self.raw.stream.aclose()


async def _dial(url: str) -> RawClient | bytes:
    """Upgrade: the client, or the body of the refusal (any status but 503 fails)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    raw = RawClient(await trio.open_tcp_stream(host, int(port)))
    await raw.stream.send_all(raw.ws.send(Request(host=host, target="/acp")))
    while True:
        if any(isinstance(e, AcceptConnection) for e in raw.events):
            return raw
        rejected = [e for e in raw.events if isinstance(e, RejectConnection)]
        if rejected and (
            raw.eof or any(isinstance(e, RejectData) and e.body_finished for e in raw.events)
        ):
            assert rejected[0].status_code == 503, rejected
            body = b"".join(e.data for e in raw.events if isinstance(e, RejectData))
            raw.peek.close()
            await raw.stream.aclose()
            return body
        assert not raw.eof, raw.events
        raw._take(await raw.stream.receive_some(65536))


@pytest.mark.parametrize("seed", range(12))
async def test_a_full_server_under_random_reconnects_keeps_its_bounds(
    start_server: StartServer,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    seed: int,
) -> None:
    """Seeded random connects, initializes (three client ids, or none), drops, closes,
    handshakes cut, half-open clients (they stop answering pings), time passing and (a
    third of the seeds) a shutdown, at a full server (2 places). After every step: at most
    ``max_connections`` connections counted and at most MAX_ON_PROBATION more on
    probation, no upgrade counted once its handshake is over, one connection per client
    id. A client whose connection is half-open, back, gets its place at once the probe is
    over. At the end every initialize is answered or its connection closed, each with a
    clear reason, and once every client has gone the counts are all 0. (400 seeds held:
    351 clients back at a full server, each let in.)"""
    rng = random.Random(seed)
    limit = 2
    ids = ["a", "b", "c", None]
    async with start_server(limits=Limits(grace_seconds=300, max_connections=limit)) as running:
        manager = running.manager
        assert running.url is not None
        url = running.url
        dialers: list[_Dialer] = []
        refusals: list[bytes] = []
        serial = itertools.count()

        def check() -> None:
            counted = len(manager.connections) - len(manager.on_probation)
            assert counted <= limit, (counted, limit)
            assert len(manager.on_probation) <= MAX_ON_PROBATION
            assert manager.on_probation <= manager.connections
            assert manager.upgrading == manager.upgrading_on_probation == 0
            held = [c.client_id for c in manager.connections if c.initialized and c.client_id]
            assert len(held) == len(set(held)), held

        async def step() -> None:
            await settle()
            for d in dialers:  # (the live ones answer the probes: bytes heard)
                if d.gone:
                    continue
                d.raw.read_ready()
                if d.answers and not d.closed() and d.raw.pings() > d.pongs:
                    d.pongs = d.raw.pings()
                    await d.raw.send_json({"jsonrpc": "2.0", "method": "_heard"})
            await settle()
            check()

        async def back(client_id: str) -> None:
            """The client whose connection under ``client_id`` is half-open comes back: its
            new connection gets the place (and is answered) once the probe is over."""
            dialed = await _dial(url)
            if isinstance(dialed, bytes):  # (the places on probation taken)
                return
            new = _Dialer(dialed, answers=True)
            dialers.append(new)
            await initialize(new, client_id)
            await step()
            mock_clock.jump(PROBE_WITHIN)
            await step()
            await settle_until(new.answered)
            answer = new.answer()
            assert answer is not None and "result" in answer, (seed, client_id, answer)

        async def initialize(d: _Dialer, client_id: str | None) -> None:
            d.client_id, d.init_id = client_id, f"init-{next(serial)}"
            msg: dict[str, Any] = {"jsonrpc": "2.0", "id": d.init_id, "method": "initialize",
                                   "params": {"protocolVersion": 1}}  # fmt: skip
            if client_id is not None:
                msg["params"]["_meta"] = {"punie-trio/clientId": client_id}
            await d.raw.send_json(msg)

        shutdown_at = rng.randrange(80) if seed % 3 == 2 else None
        for n in range(80):
            if n == shutdown_at:
                # A shutdown at a random point: every connection ends (1001), none is
                # let in any more, and nothing stays counted.
                running.closing.set()
                await step()
                for d in dialers:
                    await settle_until(d.ended)
                    close = d.raw.closed_with()
                    assert close is None or close[0] in (1000, 1001, 1008, 1013), close
                await settle_until(lambda: not manager.connections)
                assert manager.upgrading == manager.upgrading_on_probation == 0
                for d in dialers:
                    await d.close()
                return
            action = rng.choice(
                ["open", "open", "init", "drop", "bye", "cut", "silence", "wake", "tick", "back"]
            )
            open_ = [d for d in dialers if not d.closed()]
            # Client ids held by a connection that answers no more (and no one probing it).
            dead = [
                c.client_id
                for c in manager.connections
                if c.initialized
                and c.client_id
                and c.client_id not in manager._claims
                and not any(d.answers for d in open_ if d.client_id == c.client_id)
            ]
            if action == "open":
                dialed = await _dial(url)
                if isinstance(dialed, bytes):
                    assert b"connection limit reached (2)" in dialed, dialed
                    refusals.append(dialed)
                else:
                    d = _Dialer(dialed, answers=rng.random() < 0.6)
                    dialers.append(d)
                    if rng.random() < 0.8:
                        await initialize(d, rng.choice(ids))
            elif action == "init" and (fresh := [d for d in open_ if d.init_id is None]):
                await initialize(rng.choice(fresh), rng.choice(ids))
            elif action == "drop" and open_:
                await rng.choice(open_).close()
            elif action == "bye" and open_:  # (its client closes it: a close frame)
                d = rng.choice(open_)
                await d.raw.stream.send_all(d.raw.ws.send(CloseConnection(code=1000)))
            elif action == "cut":  # (a client gone during its handshake)
                host, port = url.removeprefix("http://").rsplit(":", 1)
                stream = await trio.open_tcp_stream(host, int(port))
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send_all(ws.send(Request(host=host, target="/acp")))
                await stream.aclose()
            elif action in ("silence", "wake") and open_:
                rng.choice(open_).answers = action == "wake"
            elif action == "tick":
                mock_clock.jump(rng.choice([1.0, PROBE_WITHIN, SWEEP_EVERY]))
            elif action == "back" and dead:
                await back(rng.choice(dead))
            await step()
        # Let every probe, deadline and sweep run out.
        for _ in range(10):
            mock_clock.jump(SWEEP_EVERY)
            await step()
        for d in dialers:
            if d.init_id is None or d.gone:
                continue
            answer = d.answer()
            assert answer is not None or d.closed(), (seed, d.init_id, d.raw.messages())
            if answer is not None and "error" in answer:
                error = answer["error"]
                assert error["code"] in (-32600, -32602) and error["message"], error
            close = d.raw.closed_with()
            if close is not None:
                assert close[0] in (1000, 1008, 1013), close
                assert close[0] != 1013 or close[1].startswith("connection limit reached (2)")
        for d in dialers:
            await d.close()
        await settle_until(lambda: not manager.connections)
        check()
        assert not manager.on_probation
