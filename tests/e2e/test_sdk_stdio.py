"""End to end with the official ACP Python SDK (asyncio) as the client, over stdio.

``punie-trio serve --stdio --no-http`` runs as a real subprocess spawned by
``acp.spawn_agent_process``. Every message the SDK receives is recorded through a connection
observer and validated against the ACP schema afterwards (observer exceptions are swallowed
by the SDK, so validation cannot happen inside the observer).

These are plain (non-Trio) tests: each runs its own asyncio loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import acp
from acp import spawn_agent_process, text_block
from acp.connection import StreamEvent
from acp.schema import (
    AgentMessageChunk,
    ClientCapabilities,
    FileSystemCapabilities,
    Implementation,
    ReadTextFileResponse,
    SessionInfoUpdate,
    TextContentBlock,
)

from ..acp_schema import SchemaChecker

TIMEOUT = 60.0


class RecordingClient:
    """An ACP client that records the agent's text chunks, synchronously (in order)."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[str]] = {}
        self.kinds: list[str] = []
        self.titles: list[str | None] = []
        self.first_chunk = asyncio.Event()
        self.wire: list[tuple[str, dict[str, Any]]] = []

    def observe(self, event: StreamEvent) -> None:
        self.wire.append((event.direction.value, event.message))

    async def session_update(self, session_id: str, update: Any, **kw: Any) -> None:
        self.kinds.append(update.session_update)
        if isinstance(update, SessionInfoUpdate):
            self.titles.append(update.title)
        if isinstance(update, AgentMessageChunk) and isinstance(update.content, TextContentBlock):
            self.chunks.setdefault(session_id, []).append(update.content.text)
            self.first_chunk.set()

    async def read_text_file(
        self, session_id: str, path: str, line: Any = None, limit: Any = None, **kw: Any
    ) -> ReadTextFileResponse:
        content = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
        return ReadTextFileResponse(content=content)

    def text(self, session_id: str) -> str:
        return "".join(self.chunks.get(session_id, []))


def serve_args(project: Path, model: str = "echo") -> list[str]:
    return [
        sys.executable,
        "-m",
        "punie_trio",
        "serve",
        "--stdio",
        "--no-http",
        "--model",
        model,
        "--project",
        str(project),
    ]


def agent_env(tmp_path: Path) -> dict[str, str]:
    # The SDK does not inherit the environment: pass all of it (venv, PYTHONPATH, ...).
    # Isolated from the user's PUNIE_* variables and config file.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PUNIE_")}
    return dict(clean, PUNIE_DATA_DIR=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))


def check_wire(client: RecordingClient, checker: SchemaChecker) -> None:
    """Replay the recorded traffic through the schema checker, in order."""
    for direction, message in client.wire:
        if direction == "outgoing":
            checker.client_sent(message)
        else:
            checker.agent_sent(message)


async def _session(
    client: RecordingClient, project: Path, model: str, tmp_path: Path
) -> dict[str, Any]:
    """Run the scenario; return what the test asserts on."""
    out: dict[str, Any] = {}
    async with spawn_agent_process(
        client,
        *serve_args(project, model),
        env=agent_env(tmp_path),
        transport_kwargs={"stderr": subprocess.DEVNULL},
        observers=[client.observe],
    ) as (conn, proc):
        out["init"] = await conn.initialize(
            protocol_version=acp.PROTOCOL_VERSION,
            client_capabilities=ClientCapabilities(
                fs=FileSystemCapabilities(read_text_file=True, write_text_file=False)
            ),
            client_info=Implementation(name="sdk-e2e", version="0"),
        )
        session = await conn.new_session(cwd=str(project), mcp_servers=[])
        out["session"] = session.session_id
        if model == "echo":
            prompts = ["hello from the official sdk", "a second prompt,\nwith two lines"]
            out["prompts"] = prompts
            out["stops"] = []
            out["texts"] = []
            for text in prompts:
                before = client.text(session.session_id)
                response = await conn.prompt(
                    session_id=session.session_id, prompt=[text_block(text)]
                )
                out["stops"].append(response.stop_reason)
                out["texts"].append(client.text(session.session_id)[len(before) :])
        else:
            task = asyncio.create_task(
                conn.prompt(session_id=session.session_id, prompt=[text_block("go slowly")])
            )
            await client.first_chunk.wait()
            await conn.cancel(session_id=session.session_id)
            out["cancelled"] = (await task).stop_reason
            # The session is still usable after a cancelled turn (the script's next turn).
            response = await conn.prompt(session_id=session.session_id, prompt=[text_block("x")])
            out["after"] = response.stop_reason
        out["proc"] = proc
    out["returncode"] = proc.returncode
    return out


def run(client: RecordingClient, project: Path, model: str, tmp_path: Path) -> dict[str, Any]:
    async def guarded() -> dict[str, Any]:
        return await asyncio.wait_for(_session(client, project, model, tmp_path), TIMEOUT)

    return asyncio.run(guarded())


def test_sdk_stdio_echo_prompts(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    project = tmp_path / "project"
    project.mkdir()
    client = RecordingClient()
    out = run(client, project, "echo", tmp_path)

    init = out["init"]
    assert init.protocol_version == 1
    assert init.agent_info is not None and init.agent_info.name == "punie-trio"
    assert init.agent_capabilities.prompt_capabilities.embedded_context is True
    assert out["session"]
    assert out["stops"] == ["end_turn", "end_turn"]
    assert out["texts"] == out["prompts"]
    # The first answer also names the session, after its first prompt's first line.
    assert client.kinds == ["agent_message_chunk", "session_info_update", "agent_message_chunk"]
    assert client.titles == [out["prompts"][0].split("\n")[0]]
    # The agent exited by itself at stdin EOF, cleanly.
    assert out["returncode"] == 0
    # The data directory came from PUNIE_DATA_DIR.
    assert (tmp_path / "data").is_dir()

    check_wire(client, acp_schema)
    incoming = [m for d, m in client.wire if d == "incoming"]
    assert sum(1 for m in incoming if m.get("method") == "session/update") >= 2
    assert sum(1 for m in incoming if "result" in m) == 4  # initialize, new, 2 prompts


def test_sdk_stdio_cancel_slow_scripted_prompt(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    project = tmp_path / "project"
    project.mkdir()
    script = tmp_path / "slow.json"
    script.write_text(
        json.dumps(
            [
                [{"text": "starting"}, {"sleep": 60}, {"text": "never sent"}],
                [{"text": "quick"}],
            ]
        ),
        encoding="utf-8",
    )
    client = RecordingClient()
    out = run(client, project, f"script:{script}", tmp_path)

    assert out["cancelled"] == "cancelled"
    assert out["after"] == "end_turn"
    assert client.text(out["session"]) == "startingquick"
    assert out["returncode"] == 0
    check_wire(client, acp_schema)


def test_sdk_stdio_scripted_tool_call_reads_through_the_client(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("the notes", encoding="utf-8")
    script = tmp_path / "tool.json"
    script.write_text(
        json.dumps(
            {
                "turns": [
                    [
                        {"thought": "reading"},
                        {"plan": ["read notes.txt"]},
                        {"tool": "read_file", "input": {"path": "notes.txt"}},
                        {"text": "done"},
                    ]
                ]
            }
        ),
        encoding="utf-8",
    )
    client = RecordingClient()

    async def scenario() -> tuple[str, list[dict[str, Any]]]:
        async with spawn_agent_process(
            client,
            *serve_args(project, f"script:{script}"),
            env=agent_env(tmp_path),
            transport_kwargs={"stderr": subprocess.DEVNULL},
            observers=[client.observe],
        ) as (conn, _proc):
            await conn.initialize(
                protocol_version=acp.PROTOCOL_VERSION,
                client_capabilities=ClientCapabilities(
                    fs=FileSystemCapabilities(read_text_file=True)
                ),
            )
            session = await conn.new_session(cwd=str(project), mcp_servers=[])
            response = await conn.prompt(session_id=session.session_id, prompt=[text_block("go")])
        return response.stop_reason, [m for d, m in client.wire if d == "incoming"]

    async def guarded() -> tuple[str, list[dict[str, Any]]]:
        return await asyncio.wait_for(scenario(), TIMEOUT)

    stop, incoming = asyncio.run(guarded())
    assert stop == "end_turn"
    assert client.kinds == [
        "agent_thought_chunk",
        "plan",
        "tool_call",
        "tool_call_update",
        "tool_call_update",
        "agent_message_chunk",
        "session_info_update",
    ]
    assert client.titles == ["go"]
    reads = [m for m in incoming if m.get("method") == "fs/read_text_file"]
    assert len(reads) == 1
    assert reads[0]["params"]["path"] == str((project / "notes.txt").resolve())
    completed = [
        m["params"]["update"]
        for m in incoming
        if m.get("method") == "session/update"
        and m["params"]["update"].get("status") == "completed"
    ]
    assert completed[0]["content"][0]["content"]["text"] == "the notes"
    check_wire(client, acp_schema)
