"""Baseline server for the benchmarks: a minimal ASGI WebSocket app under Hypercorn's trio
worker, with none of punie-trio's layers (no JSON-RPC peer, no manager, no worker).

Paths (the mode is chosen by the client):

- ``/echo``: send every frame straight back (one frame in, one frame out).
- ``/stream``: for each JSON-RPC request frame, send the session/update frames an echo
  prompt would stream (``echo_chunks`` of its text into ``BENCH_ECHO_CHUNKS`` chunks, default
  16, the same JSON punie-trio sends), then
  the ``{"stopReason": "end_turn"}`` answer: the same wire traffic as a punie-trio echo
  prompt with only the JSON work left.
- ``/push``: for each request frame with ``params.n``, send ``n`` agent_message_chunk
  updates (each ``json.dumps``-ed like punie-trio does) and then the answer.

Prints ``raw listening on http://127.0.0.1:PORT`` to stderr. SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from punie_trio.worker._models import echo_chunks

# How many chunks /stream answers a prompt with (as punie-trio's --model echo:N).
ECHO_CHUNKS = int(os.environ.get("BENCH_ECHO_CHUNKS", "16"))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _update(session_id: str, text: str) -> str:
    return _dumps(
        {
            "jsonrpc": "2.0",
            "method": "session/update",
            "params": {
                "sessionId": session_id,
                "update": {
                    "sessionUpdate": "agent_message_chunk",
                    "content": {"type": "text", "text": text},
                },
            },
        }
    )


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    mode = scope["path"]
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        text = event.get("text")
        if text is None:
            text = (event.get("bytes") or b"").decode()
        if mode == "/echo":
            await send({"type": "websocket.send", "text": text})
            continue
        msg = json.loads(text)
        params = msg.get("params") or {}
        session_id = params.get("sessionId", "sess_raw")
        if mode == "/stream":
            prompt = "".join(b.get("text", "") for b in params.get("prompt", []))
            for chunk in echo_chunks(prompt, ECHO_CHUNKS):
                await send({"type": "websocket.send", "text": _update(session_id, chunk)})
        elif mode == "/push":
            text_chunk = params.get("text", "x")
            for _ in range(int(params.get("n", 0))):
                await send({"type": "websocket.send", "text": _update(session_id, text_chunk)})
        answer = {"jsonrpc": "2.0", "id": msg.get("id"), "result": {"stopReason": "end_turn"}}
        await send({"type": "websocket.send", "text": _dumps(answer)})


async def main() -> None:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.websocket_max_message_size = 16 * 1024 * 1024
    config.accesslog = None
    config.graceful_timeout = 2.0
    closing = trio.Event()

    async def watch() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                closing.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        binds = await nursery.start(
            lambda task_status: hypercorn.trio.serve(
                app, config, shutdown_trigger=closing.wait, task_status=task_status
            )
        )
        print(f"raw listening on {binds[0]}", file=sys.stderr, flush=True)
        await closing.wait()
        nursery.cancel_scope.deadline = trio.current_time() + 3


if __name__ == "__main__":
    trio.run(main)
