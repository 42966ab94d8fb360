"""``kill -9`` in the middle of a turn: every answered turn survives, the unanswered one
leaves no trace, and the store opens cleanly for the CLI and for the next server."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
from pathlib import Path

import trio

from ..acp_schema import SchemaChecker
from ..integration._support import (
    TOKEN,
    acp_ws_client,
    run_punie,
    server_process,
    write_script,
)
from ._hub import has_update, send_prompt, summary

TURNS = [
    [{"text": "answer one"}],
    [{"thought": "thinking"}, {"text": "answer two"}],
    [{"text": "partial "}, {"sleep": 60}, {"text": "never sent"}],
]


async def test_kill_9_mid_turn_keeps_every_answered_turn(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = Path(await trio.Path(tmp_path).resolve())
    script = write_script(tmp_path / "script.json", TURNS)
    data_dir = tmp_path / "data"
    with trio.fail_after(60):
        async with (
            server_process(tmp_path, "--model", f"script:{script}") as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (client, _),
        ):
            await client.initialize()
            session_id = await client.new_session(str(root))
            assert await client.prompt(session_id, "first") == "end_turn"
            assert await client.prompt(session_id, "second") == "end_turn"
            answered = client.updates(session_id)
            await send_prompt(client, "third", session_id, "third")
            await client.wait_for(has_update(session_id, "agent_message_chunk", "partial "))
            server.process.send_signal(signal.SIGKILL)
            assert await server.process.wait() == -signal.SIGKILL
            await client.closed.wait()
            assert not any(m.get("id") == "third" for m in client.received)

        # The read-only CLI sees both answered turns and nothing of the third.
        shown = await run_punie("sessions", "show", session_id, "--data-dir", str(data_dir))
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout.decode()
        assert "turns    2" in text
        for line in ("user: first", "agent: answer one", "user: second", "agent: answer two"):
            assert line in text
        assert "third" not in text and "partial" not in text

        # A new server opens the store and replays exactly what was answered.
        async with (
            server_process(tmp_path, "--model", f"script:{script}") as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (client, _),
        ):
            await client.initialize()
            await client.request(
                "session/load", {"sessionId": session_id, "cwd": str(root), "mcpServers": []}
            )
            replayed = client.updates(session_id)
            assert (
                [summary(u) for u in replayed]
                == [
                    ("user_message_chunk", "first"),
                    *[summary(u) for u in answered[:2]],  # its answer, then the session's title
                    ("user_message_chunk", "second"),
                    *[summary(u) for u in answered[2:]],
                ]
            )
            assert summary(answered[1]) == ("session_info_update", "first")
            listed = await client.request("session/list", {})
            assert [s["sessionId"] for s in listed["sessions"]] == [session_id]
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0

    with contextlib.closing(sqlite3.connect(data_dir / "sessions.sqlite3")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
