"""ACP over the ``/acp`` WebSocket of a real in-process server: lifecycle, routing,
ownership, disconnects."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from punie_trio.server import Running
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ..client import AgentError
from ._support import acp_ws_client, settle_until, task_tree, ws_url
from .conftest import StartServer


async def test_single_client_initialize_new_session_echo(
    server: Running, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    with trio.fail_after(10):
        async with acp_ws_client(server.url, acp_schema) as (client, ws):
            headers = {k.lower(): v for k, v in ws.handshake_headers}
            conn_id = headers.get(b"acp-connection-id")
            assert conn_id is not None, ws.handshake_headers
            assert str(uuid.UUID(conn_id.decode())) == conn_id.decode()  # the RFD's <uuid>
            init = await client.initialize()
            assert init["protocolVersion"] == 1
            assert init["agentInfo"]["name"] == "punie-trio"
            session = await client.new_session(str(tmp_path))
            assert await client.prompt(session, "hello over the wire") == "end_turn"
            assert client.agent_text(session) == "hello over the wire"
            assert {c.id for c in server.manager.connections} == {conn_id.decode()}


async def test_ws_alias_path(server: Running, tmp_path: Path, acp_schema: SchemaChecker) -> None:
    with trio.fail_after(10):
        async with acp_ws_client(server.url, acp_schema, path="/ws") as (client, ws):
            assert any(k.lower() == b"acp-connection-id" for k, _ in ws.handshake_headers)
            await client.initialize()
            session = await client.new_session(str(tmp_path))
            assert await client.prompt(session, "alias works") == "end_turn"
            assert client.agent_text(session) == "alias works"


async def test_connection_ids_are_distinct(server: Running) -> None:
    async with (
        open_websocket_url(ws_url(server.url)) as a,
        open_websocket_url(ws_url(server.url)) as b,
    ):
        ids = [
            dict((k.lower(), v) for k, v in ws.handshake_headers)[b"acp-connection-id"]
            for ws in (a, b)
        ]
        assert ids[0] != ids[1]


async def test_three_clients_two_sessions_each_in_parallel(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    model = ScriptModel(
        [[{"text": "one "}, {"text": "two "}, {"thought": "hmm"}, {"text": "three"}]]
    )
    async with start_server(model) as running:
        with trio.fail_after(20):
            async with (
                acp_ws_client(running.url, acp_schema) as (c1, _),
                acp_ws_client(running.url, acp_schema) as (c2, _),
                acp_ws_client(running.url, acp_schema) as (c3, _),
            ):
                clients = [c1, c2, c3]
                sessions: dict[int, list[str]] = {}
                for i, client in enumerate(clients):
                    await client.initialize()
                    sessions[i] = [await client.new_session(str(tmp_path)) for _ in range(2)]
                assert len(running.manager.sessions) == 6
                assert len(running.manager.workers) == 1  # one worker per project root
                stops: dict[str, str] = {}

                async def prompt(client_index: int, session: str) -> None:
                    stops[session] = await clients[client_index].prompt(session, "go")

                async with trio.open_nursery() as nursery:
                    for i, ids in sessions.items():
                        for session in ids:
                            nursery.start_soon(prompt, i, session)
                assert len(stops) == 6 and set(stops.values()) == {"end_turn"}
                for i, client in enumerate(clients):
                    mine = set(sessions[i])
                    seen = {
                        m["params"]["sessionId"]
                        for m in client.received
                        if m.get("method") == "session/update"
                    }
                    assert seen == mine  # only its own sessions' updates
                    for session in mine:
                        assert client.agent_text(session) == "one two three"


async def test_client_request_routed_to_prompting_connection(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("on disk, not in the editor")
    model = ScriptModel([[{"tool": "read_file", "input": {"path": "notes.txt"}}, {"text": "done"}]])
    async with start_server(model) as running:
        with trio.fail_after(10):
            async with (
                acp_ws_client(
                    running.url, acp_schema, files={str(target): "from the editor buffer"}
                ) as (a, _),
                acp_ws_client(running.url, acp_schema, files={str(target): "WRONG CLIENT"}) as (
                    b,
                    _,
                ),
            ):
                await a.initialize(fs={"readTextFile": True})
                await b.initialize(fs={"readTextFile": True})
                session_a = await a.new_session(str(tmp_path))
                session_b = await b.new_session(str(tmp_path))
                assert await a.prompt(session_a, "read it") == "end_turn"
                assert [r["method"] for r in a.agent_requests] == ["fs/read_text_file"]
                assert a.agent_requests[0]["params"] == {
                    "sessionId": session_a,
                    "path": str(target),
                }
                assert b.agent_requests == []
                updates = a.updates(session_a)
                completed = [
                    u
                    for u in updates
                    if u["sessionUpdate"] == "tool_call_update" and u.get("status") == "completed"
                ]
                assert len(completed) == 1
                assert completed[0]["content"][0]["content"]["text"] == "from the editor buffer"
                assert completed[0]["rawOutput"] == {"output": "from the editor buffer"}
                assert a.agent_text(session_a) == "done"
                assert b.updates(session_b) == []
                assert not any(m.get("method") for m in b.received)


async def test_a_session_of_another_connection_is_refused_as_held_there(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    model = ScriptModel([[{"text": "started"}, {"sleep": 60}]])
    async with start_server(model) as running:
        with trio.fail_after(10):
            async with (
                acp_ws_client(running.url, acp_schema) as (a, _),
                acp_ws_client(running.url, acp_schema) as (b, _),
            ):
                await a.initialize()
                await b.initialize()
                session_a = await a.new_session(str(tmp_path))
                with pytest.raises(AgentError) as prompt_err:
                    await b.prompt(session_a, "mine now")
                assert prompt_err.value.code == -32600
                assert f"{session_a} is open on another connection" in prompt_err.value.message

                async with trio.open_nursery() as nursery:
                    stop: list[str] = []

                    async def run_a() -> None:
                        stop.append(await a.prompt(session_a, "long"))

                    nursery.start_soon(run_a)
                    await a.wait_for(lambda m: m.get("method") == "session/update")
                    # As a request (the only form that can be answered): refused, named.
                    answer = await b.request_raw("session/cancel", {"sessionId": session_a})
                    assert answer["error"]["code"] == -32600, answer
                    assert "open on another connection" in answer["error"]["message"]
                    # As the notification it normally is: no effect on A's turn.
                    await b.notify("session/cancel", {"sessionId": session_a})
                    await trio.testing.wait_all_tasks_blocked()
                    assert running.manager.sessions[session_a].turn is not None
                    assert not stop
                    # The owner can cancel it.
                    await a.notify("session/cancel", {"sessionId": session_a})
                assert stop == ["cancelled"]


async def test_disconnect_mid_prompt_cleans_up(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    model = ScriptModel([[{"text": "working"}, {"sleep": 60}]])
    async with start_server(model) as running:
        manager = running.manager
        await trio.testing.wait_all_tasks_blocked()
        before = task_tree()
        with trio.fail_after(10):
            async with acp_ws_client(running.url, acp_schema) as (client, ws):
                await client.initialize()
                session = await client.new_session(str(tmp_path))
                await client.send(
                    {
                        "jsonrpc": "2.0",
                        "id": 77,
                        "method": "session/prompt",
                        "params": {"sessionId": session, "prompt": [{"type": "text", "text": "x"}]},
                    }
                )
                await client.wait_for(lambda m: m.get("method") == "session/update")
                assert manager.sessions[session].turn is not None
                assert len(manager.workers) == 1
                await ws.aclose()
            registry = manager.metrics.registry

            def recorded() -> bool:
                # The turn's relay outlives the connection until the cancelled turn is
                # committed (a store write in the store's thread), then counts it.
                sample = registry.get_sample_value(
                    "punie_prompts_total", {"stop_reason": "cancelled"}
                )
                return not manager.connections and sample == 1

            await settle_until(recorded)
            await trio.testing.wait_all_tasks_blocked()
        assert manager.connections == set()
        assert manager.sessions == {}
        assert manager.workers == {}
        after = task_tree()
        assert after == before, f"leaked: {after - before}, gone: {before - after}"


async def test_an_accepted_websocket_reads_without_a_cancel_scope(
    server: Running, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The read loop's cancel scope (ended when the protocol closes the connection, for a
    request pipelined behind a response at shutdown) stays with the HTTP phase: once the
    WebSocket is accepted its frames go to the frame reader, and an idle connection held
    a CancelScope and its CancelStatus for its whole life, about 0.65 KiB (``connections``
    at 5,000: 30.6 -> 31.3 KiB a connection)."""
    import gc

    from punie_trio.web._fast_send import FastSendTCPServer

    assert server.url is not None
    with trio.fail_after(10):
        async with acp_ws_client(server.url, acp_schema) as (client, _):
            await client.initialize()
            await client.new_session(str(tmp_path))
            (connection,) = [
                o
                for o in gc.get_objects()
                # (Not isinstance: a dead weak proxy raises ReferenceError.)
                if type(o) is FastSendTCPServer and o.frame_reader is not None
            ]
            assert connection._reading is None
