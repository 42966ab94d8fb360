"""Baseline server: the official ACP Python SDK's ASGI app (``acp.http.asgi.create_asgi_app``)
with an echo agent streaming the same chunks as punie-trio's EchoModel (``echo_chunks``, into
``BENCH_ECHO_CHUNKS`` chunks),
under uvicorn with ``ws_per_message_deflate=False`` (no compression, like the clients).

uvicorn runs as installed by ``pip install uvicorn`` (asyncio loop, h11, the ``websockets``
WebSocket protocol); no uvloop/httptools. Prints ``sdk listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from typing import Any

import acp
import uvicorn
from acp import (
    Agent,
    InitializeResponse,
    NewSessionResponse,
    PromptResponse,
    update_agent_message_text,
)
from acp.http.asgi import create_asgi_app

from punie_trio.worker._models import echo_chunks

# As punie-trio's --model echo:N (1: one chunk, like the SDK's own example echo agent).
ECHO_CHUNKS = int(os.environ.get("BENCH_ECHO_CHUNKS", "16"))


class EchoAgent(Agent):
    def on_connect(self, conn: Any) -> None:
        self._conn = conn

    async def initialize(
        self, protocol_version: int, client_capabilities: Any = None, client_info: Any = None,
        **kw: Any,
    ) -> InitializeResponse:  # fmt: skip
        return InitializeResponse(protocol_version=acp.PROTOCOL_VERSION)

    async def new_session(self, cwd: str, mcp_servers: Any = None, **kw: Any) -> NewSessionResponse:
        return NewSessionResponse(session_id=f"sess_{uuid.uuid4().hex}")

    async def prompt(self, session_id: str, prompt: list[Any], **kw: Any) -> PromptResponse:
        text = "".join(getattr(b, "text", "") for b in prompt)
        for chunk in echo_chunks(text, ECHO_CHUNKS):
            await self._conn.session_update(session_id, update_agent_message_text(chunk))
        return PromptResponse(stop_reason="end_turn")

    async def cancel(self, session_id: str, **kw: Any) -> None:
        pass


app = create_asgi_app(lambda conn: EchoAgent())


def main() -> None:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when
    # sock.proto is IPPROTO_TCP (a proto-0 socket left Nagle on: 40 ms per prompt).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        ws=os.environ.get("BENCH_UVICORN_WS", "auto"),
        ws_max_size=16 * 1024 * 1024,
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        backlog=4096,
    )
    server = uvicorn.Server(config)
    print(f"sdk listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
