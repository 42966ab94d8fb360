"""Bounds on what clients may ask for. Each refusal is a clear JSON-RPC error (or, for the
connection limit, an HTTP 503 before the upgrade) and never affects another client.
Rate limits run on a MockClock."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, open_websocket_url

from punie_trio.hub import Limits
from punie_trio.worker import EchoModel, ScriptModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..integration._support import (
    TOKEN,
    acp_ws_client,
    fresh_ids,
    server_process,
    settle_until,
    ws_url,
)
from ..integration.conftest import StartServer
from ._hub import expect_error, initialize, open_hub, prompt_params


async def test_prompt_size_limit(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    async with open_hub(
        tmp_path, acp_schema, EchoModel(), limits=Limits(max_prompt_bytes=16)
    ) as hub:
        a, b = await hub.connect(), await hub.connect()
        await initialize(a.client)
        await initialize(b.client)
        sa = await a.client.new_session(str(hub.root))
        sb = await b.client.new_session(str(hub.root))
        error = await expect_error(a.client, "session/prompt", prompt_params(sa, "é" * 9))
        assert error["code"] == -32602
        assert "18 bytes" in error["message"] and "16-byte limit" in error["message"]
        assert a.client.updates(sa) == []  # refused before the turn started
        assert await a.client.prompt(sa, "x" * 16) == "end_turn"
        assert await b.client.prompt(sb, "b is fine") == "end_turn"


async def test_sessions_per_connection(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    limits = Limits(max_sessions_per_connection=2)
    async with open_hub(tmp_path, acp_schema, EchoModel(), limits=limits) as hub:
        a, b = await hub.connect(), await hub.connect()
        await initialize(a.client)
        await initialize(b.client)
        first = await a.client.new_session(str(hub.root))
        await a.client.new_session(str(hub.root))
        error = await expect_error(
            a.client, "session/new", {"cwd": str(hub.root), "mcpServers": []}
        )
        assert error["code"] == -32600
        assert "Session limit" in error["message"] and "max 2" in error["message"]
        # Loading counts too.
        theirs = await b.client.new_session(str(hub.root))
        await b.client.request("session/close", {"sessionId": theirs})
        error = await expect_error(
            a.client, "session/load", {"sessionId": theirs, "cwd": str(hub.root), "mcpServers": []}
        )
        assert error["code"] == -32600 and "Session limit" in error["message"]
        # Others are unaffected; closing one frees a slot.
        await b.client.new_session(str(hub.root))
        await b.client.new_session(str(hub.root))
        await a.client.request("session/close", {"sessionId": first})
        await a.client.new_session(str(hub.root))
        assert len(hub.manager.sessions) == 4


async def test_sessions_taken_back_from_grace_count_on_the_new_connection(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that comes back under its client id takes its sessions back, and they
    count: it cannot open a limit's worth more on top (a reconnect does not reset the
    count). Another client is unaffected meanwhile, and a session closed frees a slot."""
    limits = Limits(max_sessions_per_connection=2)
    async with open_hub(tmp_path, acp_schema, EchoModel(), limits=limits) as hub:
        a = await hub.connect()
        await initialize(a.client, client_id="ide-1")
        first = await a.client.new_session(str(hub.root))
        second = await a.client.new_session(str(hub.root))
        await a.drop()
        await settle_until(lambda: not hub.manager.connections)
        other = await hub.connect()
        await initialize(other.client)
        theirs = await other.client.new_session(str(hub.root))
        again = await hub.connect()
        await initialize(again.client, client_id="ide-1")
        owned = {s.id for s in hub.manager.sessions.values() if s.owner is again.connection}
        assert owned == {first, second}
        error = await expect_error(
            again.client, "session/new", {"cwd": str(hub.root), "mcpServers": []}
        )
        assert error["code"] == -32600
        assert "2 sessions open on this connection (max 2)" in error["message"]
        assert len(hub.manager.sessions) == 3  # nothing left behind by the refusal
        assert await again.client.prompt(first, "still mine") == "end_turn"
        assert await other.client.prompt(theirs, "fine") == "end_turn"
        await again.client.request("session/close", {"sessionId": second})
        await again.client.new_session(str(hub.root))


async def test_connection_limit_is_http_503(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    async with start_server(limits=Limits(max_connections=1)) as running:
        url = ws_url(running.url)
        with trio.fail_after(10):
            async with acp_ws_client(running.url, acp_schema) as (first, _):
                await first.initialize()
                for _ in range(2):
                    try:
                        async with open_websocket_url(url):
                            raise AssertionError("a second connection was accepted")
                    except ConnectionRejected as exc:
                        assert exc.status_code == 503
                        assert b"connection limit reached (1)" in (exc.body or b"")
                session_id = await first.new_session(str(tmp_path))
                assert await first.prompt(session_id, "first is fine") == "end_turn"
            await settle_until(lambda: not running.manager.connections)
            async with acp_ws_client(running.url, acp_schema) as (again, _):
                await again.initialize()


async def _refused_as_full(url: str, limit: int) -> None:
    """A WebSocket upgrade to ``url`` (with the token) is refused with the full server's
    503, naming ``limit``."""
    with pytest.raises(ConnectionRejected) as refused:
        headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
        async with open_websocket_url(ws_url(url), extra_headers=headers):
            pass
    assert refused.value.status_code == 503
    assert f"connection limit reached ({limit})".encode() in (refused.value.body or b"")


async def test_the_stdio_connection_counts_toward_max_connections(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """``--max-connections`` counts every ACP connection, the ``--stdio`` one too (the docs
    said "WebSocket connections"): with ``--stdio --max-connections 2`` one WebSocket fits,
    and the second is refused with 503 while the stdio client goes on."""
    with trio.fail_after(30):
        async with (
            server_process(tmp_path, "--stdio", "--max-connections", "2") as server,
            trio.open_nursery() as nursery,
        ):
            stdio = AcpTestClient(server.stdio(), acp_schema, ids=fresh_ids())
            await nursery.start(stdio.run)
            await stdio.initialize()
            async with acp_ws_client(server.url, acp_schema, token=TOKEN) as (ws, _):
                await ws.initialize()
                await _refused_as_full(server.url, 2)
                session_id = await stdio.new_session(str(tmp_path))
                assert await stdio.prompt(session_id, "stdio goes on") == "end_turn"
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0


async def test_a_full_server_held_by_the_stdio_client_refuses_upgrades_with_503(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """With ``--stdio --max-connections 1`` and the stdio client under a client id, a
    WebSocket upgrade gets the 503 at once, as before probation: no probe can tell the
    stdio connection dead, so none could free its place. (It was let in on probation, to
    be refused with -32600 and closed with 1013 whatever its initialize.)"""
    with trio.fail_after(30):
        async with (
            server_process(tmp_path, "--stdio", "--max-connections", "1") as server,
            trio.open_nursery() as nursery,
        ):
            stdio = AcpTestClient(server.stdio(), acp_schema, ids=fresh_ids())
            await nursery.start(stdio.run)
            meta = {"punie-trio/clientId": "ide"}
            await stdio.request("initialize", {"protocolVersion": 1, "_meta": meta})
            await _refused_as_full(server.url, 1)
            session_id = await stdio.new_session(str(tmp_path))
            assert await stdio.prompt(session_id, "stdio goes on") == "end_turn"
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0


async def test_prompts_per_minute_per_connection(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    limits = Limits(prompts_per_minute=2)
    async with open_hub(tmp_path, acp_schema, EchoModel(), limits=limits) as hub:
        a, b = await hub.connect(), await hub.connect()
        await initialize(a.client)
        await initialize(b.client)
        sa = await a.client.new_session(str(hub.root))
        sa2 = await a.client.new_session(str(hub.root))
        sb = await b.client.new_session(str(hub.root))
        start = trio.current_time()
        assert await a.client.prompt(sa, "one") == "end_turn"
        await trio.sleep(10)
        assert await a.client.prompt(sa2, "two") == "end_turn"
        error = await expect_error(a.client, "session/prompt", prompt_params(sa, "three"))
        assert error["code"] == -32600
        assert "2 prompts per minute" in error["message"]
        retry = error["data"]["retryAfterSeconds"]
        assert 49 < retry <= 50  # the first prompt leaves the window 60 s after it started
        # Another connection has its own budget.
        assert await b.client.prompt(sb, "b") == "end_turn"
        assert await b.client.prompt(sb, "b again") == "end_turn"
        await trio.sleep_until(start + 60.0)
        assert await a.client.prompt(sa, "three") == "end_turn"
        error = await expect_error(a.client, "session/prompt", prompt_params(sa, "four"))
        assert error["code"] == -32600
        await trio.sleep(60)
        assert await a.client.prompt(sa, "four") == "end_turn"


async def test_a_client_that_waits_the_retry_it_was_told_is_let_in(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    """``retryAfterSeconds`` (and the message's "retry in S s") is rounded up, never down:
    59.9994 s was sent as 59.999 (and "59.9 s" for 59.94), and a client that waited just
    that long came back before its first prompt left the window and was refused again."""
    limits = Limits(prompts_per_minute=1)
    async with open_hub(tmp_path, acp_schema, EchoModel(), limits=limits) as hub:
        a = await hub.connect()
        await initialize(a.client)
        session = await a.client.new_session(str(hub.root))
        for early in (0.0006, 0.06):
            assert await a.client.prompt(session, "one") == "end_turn"
            await trio.sleep(early)
            error = await expect_error(a.client, "session/prompt", prompt_params(session, "2"))
            retry = error["data"]["retryAfterSeconds"]
            said = float(error["message"].rsplit("retry in ", 1)[1].removesuffix(" s"))
            assert retry >= 60 - early and said >= 60 - early, (retry, said)
            await trio.sleep(said)
            assert await a.client.prompt(session, "after the message's wait") == "end_turn"
            await trio.sleep(61)  # (the last prompt leaves the window)
            assert await a.client.prompt(session, "one") == "end_turn"
            await trio.sleep(early)
            await expect_error(a.client, "session/prompt", prompt_params(session, "2"))
            await trio.sleep(retry)
            assert await a.client.prompt(session, "after retryAfterSeconds") == "end_turn"
            await trio.sleep(61)  # (the last prompt leaves the window)


async def test_a_client_that_reconnects_goes_on_with_its_prompt_count(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that says who it is (a client id) keeps its count across a reconnect (it
    once started afresh, so reconnecting lifted the limit); a client without an id, or
    back after the window, starts with a full budget."""
    limits = Limits(prompts_per_minute=2)
    async with open_hub(tmp_path, acp_schema, EchoModel(), limits=limits) as hub:
        a = await hub.connect()
        await initialize(a.client, client_id="ide-1")
        session = await a.client.new_session(str(hub.root))
        assert await a.client.prompt(session, "one") == "end_turn"
        assert await a.client.prompt(session, "two") == "end_turn"
        await a.drop()
        await settle_until(lambda: not hub.manager.connections)
        again = await hub.connect()
        await initialize(again.client, client_id="ide-1")
        session = await again.client.new_session(str(hub.root))
        error = await expect_error(again.client, "session/prompt", prompt_params(session, "3"))
        assert error["code"] == -32600 and "2 prompts per minute" in error["message"]
        anonymous = await hub.connect()
        await initialize(anonymous.client)
        other = await anonymous.client.new_session(str(hub.root))
        assert await anonymous.client.prompt(other, "fresh") == "end_turn"
        await trio.sleep(61)
        assert await again.client.prompt(session, "three") == "end_turn"


def tool_updates(updates: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(status, text) of each tool call's final update."""
    done = [
        u
        for u in updates
        if u["sessionUpdate"] == "tool_call_update" and u.get("status") in ("failed", "completed")
    ]
    return [(u["status"], u["content"][0]["content"]["text"]) for u in done]


async def test_tool_calls_per_minute_per_session(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    (tmp_path / "f.txt").write_text("data")
    read = {"tool": "read_file", "input": {"path": "f.txt"}}
    model = ScriptModel([[read, read, read, {"text": "went on"}]])
    limits = Limits(tool_calls_per_minute=2)
    async with open_hub(tmp_path, acp_schema, model, limits=limits) as hub:
        a = await hub.connect()
        await initialize(a.client)
        first = await a.client.new_session(str(hub.root))
        other = await a.client.new_session(str(hub.root))
        assert await a.client.prompt(first, "read thrice") == "end_turn"
        results = tool_updates(a.client.updates(first))
        assert results[:2] == [("completed", "data"), ("completed", "data")]
        status, message = results[2]
        assert status == "failed"
        assert "rate limit: 2 tool calls per minute" in message and "retry in" in message
        refused = [u for u in a.client.updates(first) if u["sessionUpdate"] == "tool_call"][2]
        assert refused["status"] == "failed"
        assert a.client.agent_text(first) == "went on"  # the turn goes on

        # Another session is unaffected.
        assert await a.client.prompt(other, "read") == "end_turn"
        assert [s for s, _ in tool_updates(a.client.updates(other))] == [
            "completed",
            "completed",
            "failed",
        ]
        # Closing and resuming the session (its worker ends with the root's last session)
        # keeps its count: it once started over, 2 more calls a minute each time.
        await a.client.request("session/close", {"sessionId": other})
        await a.client.request("session/close", {"sessionId": first})
        assert hub.manager.workers == {}
        resume = {"sessionId": first, "cwd": str(hub.root), "mcpServers": []}
        await a.client.request("session/resume", resume)
        mark = len(a.client.updates(first))
        assert await a.client.prompt(first, "after resume") == "end_turn"
        assert [s for s, _ in tool_updates(a.client.updates(first)[mark:])] == ["failed"] * 3

        await trio.sleep(60)
        mark = len(a.client.updates(first))
        assert await a.client.prompt(first, "again") == "end_turn"
        again = tool_updates(a.client.updates(first)[mark:])
        assert [s for s, _ in again] == ["completed", "completed", "failed"]


async def test_small_outbox_still_delivers_everything(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    chunks = [f"{i} " for i in range(300)]
    model = ScriptModel([[{"text": c} for c in chunks]])
    async with open_hub(tmp_path, acp_schema, model, limits=Limits(outbox_limit=1)) as hub:
        a = await hub.connect(buffer=1)
        b = await hub.connect(buffer=1)
        await initialize(a.client)
        await initialize(b.client)
        sa = await a.client.new_session(str(hub.root))
        sb = await b.client.new_session(str(hub.root))
        stops: dict[str, str] = {}

        async def prompt(client: Any, session_id: str) -> None:
            stops[session_id] = await client.prompt(session_id, "go")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prompt, a.client, sa)
                nursery.start_soon(prompt, b.client, sb)
        assert stops == {sa: "end_turn", sb: "end_turn"}
        title = {"sessionUpdate": "session_info_update", "title": "go"}
        for client, session_id in ((a.client, sa), (b.client, sb)):
            *streamed, named = client.updates(session_id)
            assert [u["content"]["text"] for u in streamed] == chunks
            assert named == title


async def test_the_prompt_counts_kept_for_clients_gone_are_bounded(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    """Each client id that leaves keeps its prompt times for the window (a minute), for
    its reconnect. They were bounded by that minute alone: a token holder coming and
    going under fresh client ids (199 connections a second, each with one prompt, on
    this 2-core machine) left 3,984 entries in 20 s, about 343 bytes each, and every
    leave scanned them all (1 ms a leave at 4,000). At most ``max_connections`` client
    ids are kept now, the oldest to leave forgotten first (it starts with a fresh count,
    as a client away longer than the window does)."""
    limits = Limits(prompts_per_minute=1, max_connections=4)
    async with open_hub(tmp_path, acp_schema, EchoModel(), limits=limits) as hub:
        for i in range(20):
            link = await hub.connect()
            await initialize(link.client, client_id=f"churn-{i}")
            session = await link.client.new_session(str(hub.root))
            assert await link.client.prompt(session, "one") == "end_turn"
            await link.drop()
            await settle_until(lambda: not hub.manager.connections)
            assert len(hub.manager._left_prompt_times) <= 4
        assert list(hub.manager._left_prompt_times) == [f"churn-{i}" for i in range(16, 20)]
        for client_id, refused in (("churn-19", True), ("churn-0", False)):
            link = await hub.connect()
            await initialize(link.client, client_id=client_id)
            session = await link.client.new_session(str(hub.root))
            answer = await link.client.request_raw("session/prompt", prompt_params(session, "2"))
            assert ("error" in answer) == refused, (client_id, answer)
            await link.drop()
            await settle_until(lambda: not hub.manager.connections)
        # Gone longer than the window: swept as the next client leaves.
        await trio.sleep(61)
        link = await hub.connect()
        await initialize(link.client, client_id="late")
        session = await link.client.new_session(str(hub.root))
        assert await link.client.prompt(session, "one") == "end_turn"
        await link.drop()
        await settle_until(lambda: not hub.manager.connections)
        assert list(hub.manager._left_prompt_times) == ["late"]


async def test_a_client_taking_over_at_a_full_server_keeps_its_grace_as_another_leaves(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """At a full server (two connections: "other" and the client's old "ide"), the client
    comes back on probation and its probe finds the old connection gone; "other" leaves
    before the new connection has re-attached the sessions. The clients away ("ide" and
    "other") plus the connections must stay within the limit, and "ide" is counted once:
    by its new connection, not again as a client away (it lost its grace, and the
    sessions it came back for, when counted twice)."""
    limits = Limits(max_connections=2, grace_seconds=300)
    async with open_hub(tmp_path, acp_schema, EchoModel(), limits=limits) as hub:
        manager = hub.manager
        old = await hub.connect()
        await initialize(old.client, client_id="ide")
        session_id = await old.client.new_session(str(hub.root))
        other = await hub.connect()
        await initialize(other.client, client_id="other")
        await other.client.new_session(str(hub.root))

        async def alive(conn: Any) -> bool:
            # Shielded: the take-over waits for this to end, so "other" leaves after the
            # old connection did and before the sessions are re-attached.
            with trio.CancelScope(shield=True):
                await old.drop()
                await settle_until(lambda: old.connection not in manager.connections)
                await other.drop()
                await settle_until(lambda: other.connection not in manager.connections)
            return False

        manager.alive = alive
        back = await hub.connect(on_probation=True)
        assert not manager.has_room()
        await initialize(back.client, client_id="ide")
        assert not manager.on_probation
        assert manager.sessions[session_id].owner is back.connection
        assert await back.client.prompt(session_id, "still mine") == "end_turn"
