"""A client that stops reading slows only itself: its turn waits on its own bounded channels
while another client on the same project worker keeps completing prompts."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from punie_trio.hub import Limits
from punie_trio.worker import EchoModel, TurnContext

from ..acp_schema import SchemaChecker
from ..unit.test_frames import masked_frame
from ._support import acp_ws_client, settle_until, task_tree, ws_url
from .conftest import StartServer

FLOOD_CHUNKS = 1500
CHUNK = "x" * 65536  # 1500 x 64 KiB: far more than socket buffers and our bounded channels


@attrs.define(eq=False)
class FloodModel:
    """``flood`` streams a huge answer; anything else is echoed."""

    name: str = "flood"
    emitted: int = 0
    echo: EchoModel = attrs.field(factory=EchoModel)

    async def run_turn(self, ctx: TurnContext) -> str:
        if ctx.prompt_text != "flood":
            return await self.echo.run_turn(ctx)
        for _ in range(FLOOD_CHUNKS):
            await ctx.text(CHUNK)
            self.emitted += 1
        return "end_turn"


async def test_slow_reader_does_not_delay_other_clients(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    model = FloodModel()
    async with start_server(model) as running:
        manager = running.manager
        with trio.fail_after(60):
            async with open_websocket_url(
                ws_url(running.url),
                max_message_size=1 << 20,
                message_queue_size=1,
                receive_buffer_size=1 << 20,
            ) as slow:

                async def call(request_id: int, method: str, params: dict[str, Any]) -> Any:
                    msg = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
                    acp_schema.client_sent(msg)
                    await slow.send_message(json.dumps(msg))
                    answer = json.loads(await slow.get_message())
                    acp_schema.agent_sent(answer)
                    assert answer["id"] == request_id
                    return answer["result"]

                await call(1, "initialize", {"protocolVersion": 1})
                slow_session = (
                    await call(2, "session/new", {"cwd": str(tmp_path), "mcpServers": []})
                )["sessionId"]
                prompt = {"sessionId": slow_session, "prompt": [{"type": "text", "text": "flood"}]}
                acp_schema.client_sent(
                    {"jsonrpc": "2.0", "id": 3, "method": "session/prompt", "params": prompt}
                )
                await slow.send_message(
                    json.dumps(
                        {"jsonrpc": "2.0", "id": 3, "method": "session/prompt", "params": prompt}
                    )
                )
                # From here on the slow client reads nothing. Once everything is blocked, the
                # flood is stuck on the slow client's backpressure, part-way through.
                await trio.testing.wait_all_tasks_blocked()
                stuck_at = model.emitted
                assert 0 < stuck_at < FLOOD_CHUNKS
                assert manager.sessions[slow_session].turn is not None

                async with acp_ws_client(running.url, acp_schema) as (fast, _):
                    await fast.initialize()
                    fast_session = await fast.new_session(str(tmp_path))
                    for i in range(10):
                        text = f"round trip {i}"
                        assert await fast.prompt(fast_session, text) == "end_turn"
                    assert fast.agent_text(fast_session) == "".join(
                        f"round trip {i}" for i in range(10)
                    )
                # All of that happened while the slow turn stayed stuck on its backpressure.
                # (Not necessarily at exactly ``stuck_at``: the kernel may compact the
                # unread receive queue and open the window by a few frames; 96 MiB it won't.)
                await trio.testing.wait_all_tasks_blocked()
                assert stuck_at <= model.emitted < FLOOD_CHUNKS
                assert manager.sessions[slow_session].turn is not None

                # Reading again lets the slow turn finish, with nothing lost.
                chunks = 0
                while True:
                    msg = json.loads(await slow.get_message())
                    update = msg.get("params", {}).get("update", {})
                    if update.get("sessionUpdate") == "session_info_update":
                        assert chunks == FLOOD_CHUNKS  # the first answer names the session
                        continue
                    if msg.get("id") == 3:
                        assert msg["result"] == {"stopReason": "end_turn"}
                        break
                    assert update["content"]["text"] == CHUNK
                    chunks += 1
                assert chunks == FLOOD_CHUNKS


async def _upgraded(stream: trio.SocketStream, url: str) -> trio.SocketStream:
    """``stream`` (an unconnected socket's) connected to ``url``'s ``/acp`` as a raw
    WebSocket: the upgrade done with wsproto, and nothing read past it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    await stream.socket.connect((host, int(port)))
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"{host}:{port}", target="/acp")))
    accepted = False
    while not accepted:
        ws.receive_data(await stream.receive_some(65536))
        accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
    return stream


async def test_a_client_that_stopped_reading_and_reset_is_let_go(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A client that stops reading fills its outbox and then resets the TCP connection
    (an IDE that reads slowly, then loses its network). The reader waited on the full
    outbox; the writer, seeing the reset, told Hypercorn, which waited to hand the app its
    ``websocket.disconnect`` in a channel only that reader empties: deadlocked for good,
    the connection counted and its client id refused ("in use") until a restart."""
    async with start_server(limits=Limits(outbox_limit=4)) as running:
        manager = running.manager
        await trio.testing.wait_all_tasks_blocked()
        before = task_tree()
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        await _upgraded(trio.SocketStream(sock), running.url)
        hello = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": 1, "_meta": {"punie-trio/clientId": "ide-1"}},
        }
        await sock.send(masked_frame(0x81, json.dumps(hello, separators=(",", ":")).encode()))
        junk = masked_frame(0x81, b"x") * 1000  # each one answered -32700, never read

        async def flood() -> None:
            while True:
                await sock.send(junk)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                # Everything blocks once the server stops reading: its outbox is full.
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
            assert len(manager.connections) == 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
            # The connection ends whole: Hypercorn's tasks for it too (they waited to hand
            # the app a disconnect that it returned without reading, holding what they read).
            await settle_until(lambda: not manager.connections and task_tree() == before)
            # The client id is free again: a reconnect gets its sessions back.
            async with acp_ws_client(running.url, acp_schema) as (client, _):
                again = await client.request_raw(
                    "initialize", {"protocolVersion": 1, "_meta": {"punie-trio/clientId": "ide-1"}}
                )
                assert again["result"]["protocolVersion"] == 1, again


async def test_at_shutdown_a_client_that_ignores_the_close_frame_is_dropped_at_once(
    start_server: StartServer,
) -> None:
    """After its close frame the handler reads on until the client's disconnect (see the
    test above), for at most CLOSE_TIMEOUT; at shutdown the connection is dropped at once,
    as before: a client that ignored close frames made every shutdown take 5 s."""
    async with start_server() as running:
        stream = await _upgraded(trio.SocketStream(trio.socket.socket()), running.url)
        await trio.testing.wait_all_tasks_blocked()
        assert len(running.manager.connections) == 1
        running.closing.set()
        received = b""
        with trio.fail_after(3):  # (CLOSE_TIMEOUT is 5 s)
            while data := await stream.receive_some(65536):  # never answering the close
                received += data
        assert received.startswith(b"\x88")  # the close frame, 1001, then the end
        assert int.from_bytes(received[2:4], "big") == 1001
        await stream.aclose()
