"""A minimal ACP *client* for tests, over any MessageStream-like transport.

It records every message the agent sends (validated against the ACP schema), answers the
agent's ``fs/*`` requests from a dict or a callback, and exposes ``request``/``notify``.
A reader task runs in the caller's nursery (``connect``) so notifications and agent requests
are handled while a test awaits a prompt's answer.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from .acp_schema import SchemaChecker


class TextStream(Protocol):
    async def send_message(self, text: str) -> None: ...

    async def receive_message(self) -> str | bytes: ...


AgentRequestHandler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class AgentError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('message')} (code {error.get('code')})")
        self.code: int = error["code"]
        self.message: str = error["message"]


@attrs.define(eq=False)
class AcpTestClient:
    stream: TextStream
    checker: SchemaChecker | None = None
    files: dict[str, str] = attrs.field(factory=dict)
    on_agent_request: AgentRequestHandler | None = None
    received: list[dict[str, Any]] = attrs.field(factory=list)
    agent_requests: list[dict[str, Any]] = attrs.field(factory=list)
    closed: trio.Event = attrs.field(factory=trio.Event)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    _waiting: dict[Any, trio.MemorySendChannel[dict[str, Any]]] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            try:
                while True:
                    try:
                        raw = await self.stream.receive_message()
                    except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    except Exception as exc:  # trio-websocket's ConnectionClosed and kin
                        if type(exc).__name__ == "ConnectionClosed":
                            return
                        raise
                    msg = json.loads(raw)
                    if self.checker is not None:
                        self.checker.agent_sent(msg)
                    self.received.append(msg)
                    self._changed.set()
                    self._changed = trio.Event()
                    if "method" in msg and "id" in msg:
                        self.agent_requests.append(msg)
                        nursery.start_soon(self._answer, msg)
                    elif "method" not in msg:
                        waiter = self._waiting.pop(msg.get("id"), None)
                        if waiter is not None:
                            waiter.send_nowait(msg)
            finally:
                self.closed.set()
                nursery.cancel_scope.cancel()

    async def _answer(self, msg: dict[str, Any]) -> None:
        method, params = msg["method"], msg.get("params", {})
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": msg["id"]}
        try:
            if self.on_agent_request is not None:
                reply["result"] = await self.on_agent_request(method, params)
            elif method == "fs/read_text_file" and params["path"] in self.files:
                reply["result"] = {"content": self.files[params["path"]]}
            elif method == "fs/write_text_file":
                self.files[params["path"]] = params["content"]
                reply["result"] = {}
            else:
                reply["error"] = {"code": -32002, "message": f"not found: {params.get('path')}"}
        except AgentError as exc:
            reply["error"] = {"code": exc.code, "message": exc.message}
        try:
            await self.send_raw(json.dumps(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the agent left before the answer: as the reader, the client just ends
        except Exception as exc:  # trio-websocket's ConnectionClosed, as in run
            # (An answer released once the server had gone, before the reader saw its
            # close: it raised out of the client, at random under load.)
            if type(exc).__name__ != "ConnectionClosed":
                raise

    async def send_raw(self, text: str) -> None:
        await self.stream.send_message(text)

    async def send(self, msg: dict[str, Any]) -> None:
        if self.checker is not None:
            self.checker.client_sent(msg)
        await self.send_raw(json.dumps(msg))

    async def request_raw(self, method: str, params: Any = None) -> dict[str, Any]:
        """Send a request; return the whole answer message (result or error)."""
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        return await receive.receive()

    async def request(self, method: str, params: Any = None) -> Any:
        answer = await self.request_raw(method, params)
        if "error" in answer:
            raise AgentError(answer["error"])
        return answer["result"]

    async def notify(self, method: str, params: Any = None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait until a received message satisfies ``predicate`` (checks past ones too)."""
        seen = 0
        while True:
            for msg in self.received[seen:]:
                if predicate(msg):
                    return msg
            seen = len(self.received)
            if self.closed.is_set():
                raise AssertionError("connection closed before the expected message")
            await self._changed.wait()

    # -- ACP conveniences ---------------------------------------------------------------------

    async def initialize(self, **caps: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "protocolVersion": 1,
            "clientInfo": {"name": "test", "version": "0"},
        }
        if caps:
            params["clientCapabilities"] = caps
        result: dict[str, Any] = await self.request("initialize", params)
        return result

    async def new_session(self, cwd: str, **extra: Any) -> str:
        result = await self.request("session/new", {"cwd": cwd, "mcpServers": [], **extra})
        session_id: str = result["sessionId"]
        return session_id

    async def prompt(self, session_id: str, text: str) -> str:
        result = await self.request(
            "session/prompt", {"sessionId": session_id, "prompt": [{"type": "text", "text": text}]}
        )
        stop: str = result["stopReason"]
        return stop

    def updates(self, session_id: str) -> list[dict[str, Any]]:
        return [
            m["params"]["update"]
            for m in self.received
            if m.get("method") == "session/update" and m["params"]["sessionId"] == session_id
        ]

    def agent_text(self, session_id: str) -> str:
        return "".join(
            u["content"]["text"]
            for u in self.updates(session_id)
            if u["sessionUpdate"] == "agent_message_chunk"
        )
