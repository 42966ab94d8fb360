"""The session store deleted while ``serve`` runs: SQLite writes on into the unlinked file,
so every later turn was answered as saved and vanished with the process. Now each write
fails with a message naming the store, and the server goes on serving."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from ..acp_schema import SchemaChecker
from ..integration._support import TOKEN, acp_ws_client, run_punie, server_process
from ._hub import expect_error, prompt_params


async def test_a_store_deleted_under_a_running_server_fails_writes_loudly(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    root = Path(await trio.Path(tmp_path).resolve())
    data_dir = tmp_path / "data"
    with trio.fail_after(60):
        async with (
            server_process(tmp_path) as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (client, _),
        ):
            await client.initialize()
            session_id = await client.new_session(str(root))
            assert await client.prompt(session_id, "saved") == "end_turn"
            for path in data_dir.glob("sessions.sqlite3*"):
                path.unlink()

            error = await expect_error(
                client, "session/prompt", prompt_params(session_id, "into the void")
            )
            assert error["code"] == -32603
            assert "the turn was not saved" in error["message"]
            assert "deleted or replaced while the server ran" in error["message"]
            error = await expect_error(client, "session/new", {"cwd": str(root), "mcpServers": []})
            assert error["code"] == -32603 and "deleted or replaced" in error["message"]
            # Still serving, and reads see what was there.
            listed = await client.request("session/list", {})
            assert [s["sessionId"] for s in listed["sessions"]] == [session_id]
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0

        # Nothing pretends otherwise: the store is gone, and the next server starts afresh.
        listed_cli = await run_punie("sessions", "list", "--data-dir", str(data_dir))
        assert listed_cli.returncode == 1
        assert b"no session store" in listed_cli.stderr
