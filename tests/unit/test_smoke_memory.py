"""The agent end to end over an in-memory stream pair: the seam every transport shares."""

from __future__ import annotations

from pathlib import Path

import trio

from punie_trio.hub import ClientConnection, Manager
from punie_trio.transport import memory_message_stream_pair
from punie_trio.worker import EchoModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient


async def test_echo_prompt_over_memory_streams(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    manager = Manager((str(tmp_path),), EchoModel())
    agent_side, client_side = memory_message_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await nursery.start(ClientConnection(manager, transport="memory").run, agent_side)
        client = AcpTestClient(client_side, acp_schema)
        await nursery.start(client.run)
        init = await client.initialize()
        assert init["protocolVersion"] == 1
        session = await client.new_session(str(tmp_path))
        assert await client.prompt(session, "hello brave new world") == "end_turn"
        assert client.agent_text(session) == "hello brave new world"
        # Echo answers in one chunk; the first answer also names the session.
        chunk, title = client.updates(session)
        assert chunk["sessionUpdate"] == "agent_message_chunk"
        assert title == {"sessionUpdate": "session_info_update", "title": "hello brave new world"}
        nursery.cancel_scope.cancel()
