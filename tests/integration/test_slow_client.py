"""A client that stops reading slows only itself: its turn waits on its own bounded channels
while another client on the same project worker keeps completing prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from trio_websocket import open_websocket_url

from punie_trio.worker import EchoModel, TurnContext

from ..acp_schema import SchemaChecker
from ._support import acp_ws_client, ws_url
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
