"""The official ACP Python SDK's WebSocket client (asyncio) against ``/acp`` of a server
started as a subprocess."""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import acp
from acp import connect_to_agent, text_block
from acp.schema import AgentMessageChunk, TextContentBlock
from acp.ws import create_websocket_stream

from ._support import LISTENING, TOKEN, serve_command, server_env


class RecordingClient:
    """Records the agent's text chunks (synchronously, so their order is kept)."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.kinds: list[str] = []

    async def session_update(self, session_id: str, update: Any, **kw: Any) -> None:
        self.kinds.append(update.session_update)
        if isinstance(update, AgentMessageChunk) and isinstance(update.content, TextContentBlock):
            self.chunks.append(update.content.text)


async def sdk_round_trip(url: str, cwd: str) -> tuple[Any, Any, Any, RecordingClient]:
    client = RecordingClient()
    transport = await create_websocket_stream(url, headers={"Authorization": f"Bearer {TOKEN}"})
    conn = connect_to_agent(client, transport)
    try:
        init = await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        session = await conn.new_session(cwd=cwd, mcp_servers=[])
        response = await conn.prompt(
            session_id=session.session_id, prompt=[text_block("hello from the sdk")]
        )
    finally:
        await conn.close()
    return init, session, response, client


def test_sdk_websocket_client(tmp_path: Path) -> None:
    process = subprocess.Popen(
        serve_command(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(),
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=30)
            assert line is not None, "server exited before listening"
            match = LISTENING.search(line)
            if match:
                break
        url = f"ws://{match.group(1)}:{match.group(2)}/acp"

        async def guarded() -> tuple[Any, Any, Any, RecordingClient]:
            return await asyncio.wait_for(sdk_round_trip(url, str(tmp_path)), 30)

        init, session, response, client = asyncio.run(guarded())
        assert init.protocol_version == 1
        assert init.agent_info is not None and init.agent_info.name == "punie-trio"
        assert re.fullmatch(r"\S+", session.session_id)
        assert response.stop_reason == "end_turn"
        assert "".join(client.chunks) == "hello from the sdk"
        assert set(client.kinds) == {"agent_message_chunk"}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
