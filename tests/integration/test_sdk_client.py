"""The official ACP Python SDK's WebSocket client (asyncio) against ``/acp`` of a server
started as a subprocess."""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import acp
from acp import connect_to_agent, text_block
from acp.schema import (
    AgentMessageChunk,
    ClientCapabilities,
    CloseSessionResponse,
    FileSystemCapabilities,
    ReadTextFileResponse,
    ResumeSessionResponse,
    SessionInfoUpdate,
    TextContentBlock,
)
from acp.ws import create_websocket_stream

from ._support import LISTENING, TOKEN, serve_command, server_env, write_script

T = TypeVar("T")


class RecordingClient:
    """Records the agent's text chunks (synchronously, so their order is kept)."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.kinds: list[str] = []
        self.titles: list[str | None] = []

    async def session_update(self, session_id: str, update: Any, **kw: Any) -> None:
        self.kinds.append(update.session_update)
        if isinstance(update, SessionInfoUpdate):
            self.titles.append(update.title)
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


@contextmanager
def sdk_server(tmp_path: Path, *extra: str) -> Iterator[str]:
    """``punie-trio serve`` as a subprocess; yields its ``/acp`` URL, then SIGTERMs it and
    checks that it exits 0."""
    process = subprocess.Popen(
        serve_command(tmp_path, *extra),
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
        yield f"ws://{match.group(1)}:{match.group(2)}/acp"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def run_sdk(coroutine: Coroutine[Any, Any, T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coroutine, 30)

    return asyncio.run(guarded())


def test_sdk_websocket_client(tmp_path: Path) -> None:
    with sdk_server(tmp_path) as url:
        init, session, response, client = run_sdk(sdk_round_trip(url, str(tmp_path)))
    assert init.protocol_version == 1
    assert init.agent_info is not None and init.agent_info.name == "punie-trio"
    assert re.fullmatch(r"\S+", session.session_id)
    assert response.stop_reason == "end_turn"
    assert "".join(client.chunks) == "hello from the sdk"
    # The first answer names the session (parsed by the SDK as its SessionInfoUpdate).
    assert client.kinds[-1] == "session_info_update"
    assert set(client.kinds[:-1]) == {"agent_message_chunk"}
    assert client.titles == ["hello from the sdk"]


class EditorClient(RecordingClient):
    """Answers ``fs/read_text_file`` from an "unsaved buffer" and keeps every update whole
    (as the SDK parsed and validated it)."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[Any] = []
        self.reads: list[tuple[str, str]] = []

    async def session_update(self, session_id: str, update: Any, **kw: Any) -> None:
        self.updates.append(update.model_dump(mode="json", by_alias=True, exclude_none=True))
        await super().session_update(session_id, update, **kw)

    async def read_text_file(
        self, session_id: str, path: str, line: int | None = None, limit: int | None = None,
        **kw: Any,
    ) -> ReadTextFileResponse:  # fmt: skip
        self.reads.append((session_id, path))
        return ReadTextFileResponse(content="unsaved buffer text")


async def sdk_lifecycle(url: str, cwd: str) -> dict[str, Any]:
    """Every session method the agent advertises, through the SDK's own models: a turn with
    a thought, a plan and a client-side file read; list; then, on a second connection,
    load (replay), prompt the loaded session, resume and close."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    seen: dict[str, Any] = {}
    first = EditorClient()
    conn = connect_to_agent(first, await create_websocket_stream(url, headers=headers))
    try:
        init = await conn.initialize(
            protocol_version=acp.PROTOCOL_VERSION,
            client_capabilities=ClientCapabilities(fs=FileSystemCapabilities(read_text_file=True)),
        )
        seen["capabilities"] = init.agent_capabilities
        session = await conn.new_session(cwd=cwd, mcp_servers=[])
        sid = session.session_id
        seen["first"] = await conn.prompt(session_id=sid, prompt=[text_block("read it")])
        seen["streamed"] = list(first.updates)
        seen["reads"] = first.reads
        seen["listed"] = await conn.list_sessions(cwd=cwd)
        seen["listed_elsewhere"] = await conn.list_sessions(cwd=str(Path(cwd) / "nowhere"))
    finally:
        await conn.close()
    second = EditorClient()
    conn = connect_to_agent(second, await create_websocket_stream(url, headers=headers))
    try:
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        seen["loaded"] = await conn.load_session(cwd=cwd, session_id=sid, mcp_servers=[])
        seen["replayed"] = list(second.updates)
        seen["second"] = await conn.prompt(session_id=sid, prompt=[text_block("again")])
        seen["second_chunks"] = second.chunks[len(first.chunks) :]
        seen["closed"] = await conn.close_session(session_id=sid)
        seen["resumed"] = await conn.resume_session(session_id=sid, cwd=cwd)
        seen["closed_again"] = await conn.close_session(session_id=sid)
    finally:
        await conn.close()
    return seen


def test_sdk_client_through_the_session_lifecycle(tmp_path: Path) -> None:
    """The SDK validates every message against its pydantic models: a field the schema does
    not allow, or a missing one, fails here as it would in an IDE built on it."""
    (tmp_path / "notes.txt").write_text("on disk")
    script = write_script(
        tmp_path / "script.json",
        [
            [
                {"thought": "Let me look."},
                {"plan": [{"content": "read notes", "priority": "high", "status": "pending"}]},
                {"tool": "read_file", "input": {"path": "notes.txt"}},
                {"text": "Read it."},
            ],
            [{"text": "Still here."}],
        ],
    )
    with sdk_server(tmp_path, "--model", f"script:{script}") as url:
        seen = run_sdk(sdk_lifecycle(url, str(tmp_path)))
    caps = seen["capabilities"]
    assert caps.load_session is True
    assert caps.session_capabilities is not None
    assert seen["first"].stop_reason == "end_turn"
    kinds = [u["sessionUpdate"] for u in seen["streamed"]]
    assert kinds == [
        "agent_thought_chunk", "plan", "tool_call", "tool_call_update", "tool_call_update",
        "agent_message_chunk", "session_info_update",
    ]  # fmt: skip
    assert seen["streamed"][-1]["title"] == "read it"
    done = seen["streamed"][4]
    assert done["status"] == "completed"
    assert done["content"][0]["content"]["text"] == "unsaved buffer text"  # the client's
    assert seen["reads"] == [(seen["listed"].sessions[0].session_id, str(tmp_path / "notes.txt"))]
    listed = seen["listed"].sessions
    assert [s.cwd for s in listed] == [str(tmp_path)] and seen["listed"].next_cursor is None
    assert seen["listed_elsewhere"].sessions == []
    # session/load replays what was streamed (the user's prompt first), then answers.
    replayed = seen["replayed"]
    assert replayed[0]["sessionUpdate"] == "user_message_chunk"
    assert replayed[0]["content"]["text"] == "read it"
    assert replayed[1:] == seen["streamed"]
    assert seen["second"].stop_reason == "end_turn"
    assert seen["second_chunks"] == ["Still here."]  # the loaded session went on
    assert [s.title for s in listed] == ["read it"]
    # Close, resume after the close, close again: each answered with the SDK's model.
    assert isinstance(seen["closed"], CloseSessionResponse)
    assert isinstance(seen["resumed"], ResumeSessionResponse)
    assert isinstance(seen["closed_again"], CloseSessionResponse)
