"""Malformed and refused input on ``/acp``: each gets its JSON-RPC error (or, for an oversized
frame, close code 1009) and never disturbs the other clients."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from punie_trio.rpc import MAX_ERROR_MESSAGE_CHARS
from punie_trio.server import Running
from punie_trio.web._app import _bad_extension_offer
from punie_trio.web._deflate import BoundedPerMessageDeflate
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ._support import acp_ws_client, settle_until, ws_url
from .conftest import StartServer


async def exchange(client: AcpTestClient, text: str | bytes) -> dict[str, Any]:
    """Send one raw frame and return the next message the agent sends."""
    old = {id(m) for m in client.received}
    if isinstance(text, bytes):
        await client.stream.ws.send_message(text)  # type: ignore[attr-defined]
    else:
        await client.send_raw(text)
    return await client.wait_for(lambda m: id(m) not in old)


async def test_every_bad_input_gets_its_error(
    server: Running, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    with trio.fail_after(10):
        async with (
            acp_ws_client(server.url, acp_schema) as (bystander, _),
            acp_ws_client(server.url, acp_schema) as (client, ws),
        ):
            await bystander.initialize()
            bystander_session = await bystander.new_session(str(tmp_path))

            # Not JSON: -32700 with id null, and the socket stays open.
            answer = await exchange(client, '{"jsonrpc": "2.0", "method": "initialize", ')
            assert answer["id"] is None
            assert answer["error"]["code"] == -32700
            assert answer["error"]["message"]
            # A request whose JSON breaks after its id: the -32700 carries that id (with a
            # null one the client could not tell which of its requests it was).
            answer = await exchange(client, '{"jsonrpc": "2.0", "id": 1, "method": ')
            assert answer["id"] == 1
            assert answer["error"]["code"] == -32700
            assert answer["error"]["message"]
            init = await client.initialize()
            assert init["protocolVersion"] == 1

            # Not UTF-8 (binary frame): a parse error too.
            answer = await exchange(client, b"\xff\xfe{}")
            assert answer["id"] is None and answer["error"]["code"] == -32700

            # JSON but not an object, and batches: -32600.
            for text in ("42", '"hello"', "null"):
                answer = await exchange(client, text)
                assert answer["id"] is None and answer["error"]["code"] == -32600, text
            batch = json.dumps([{"jsonrpc": "2.0", "method": "session/cancel"}])
            answer = await exchange(client, batch)
            assert answer["id"] is None and answer["error"]["code"] == -32600
            assert "batch" in answer["error"]["message"].lower()
            # A request in a batch is refused under its own id (with a null one, the
            # client could not tell which, and waited for its answer for good).
            batch = json.dumps([{"jsonrpc": "2.0", "id": 5, "method": "session/new"}])
            answer = await exchange(client, batch)
            assert answer["id"] == 5 and answer["error"]["code"] == -32600
            assert "batch" in answer["error"]["message"].lower()
            # An object that is not JSON-RPC 2.0: -32600 correlated by its id.
            answer = await exchange(client, json.dumps({"id": 6, "method": "initialize"}))
            assert answer["id"] == 6 and answer["error"]["code"] == -32600

            # Unknown method: -32601 naming it.
            answer = await client.request_raw("no/such_method", {})
            assert answer["error"]["code"] == -32601
            assert "no/such_method" in answer["error"]["message"]

            # Bad params: -32602 naming the field.
            cases = [
                ("session/new", {"cwd": "relative/dir", "mcpServers": []}, "cwd"),
                ("session/new", {"cwd": str(tmp_path)}, "mcpServers"),
                ("session/new", {"cwd": 7, "mcpServers": []}, "cwd"),
                ("session/prompt", {"prompt": []}, "sessionId"),
                (
                    "session/prompt",
                    {"sessionId": "s", "prompt": [{"type": "bogus"}]},
                    "prompt[0].type",
                ),
                (
                    "session/prompt",
                    {"sessionId": "s", "prompt": [{"type": "text"}]},
                    "prompt[0].text",
                ),
                ("session/new", [1, 2], "object"),
            ]
            for method, params, field in cases:
                answer = await client.request_raw(method, params)
                assert answer["error"]["code"] == -32602, (method, params, answer)
                assert field in answer["error"]["message"], (field, answer)

            # initialize once per connection: a second one could name another client id
            # and take that client's sessions on top of its own.
            again = await client.request_raw("initialize", {"protocolVersion": 1})
            assert again["error"]["code"] == -32600
            assert "already initialized" in again["error"]["message"]

            # Still open and working after all of that.
            session = await client.new_session(str(tmp_path))
            assert await client.prompt(session, "still here") == "end_turn"
            assert client.agent_text(session) == "still here"
            assert ws.closed is None

            # The bystander never saw any of it.
            assert not any("error" in m for m in bystander.received)
            assert await bystander.prompt(bystander_session, "unaffected") == "end_turn"
            assert bystander.agent_text(bystander_session) == "unaffected"

    registry = server.manager.metrics.registry
    assert (
        registry.get_sample_value("punie_errors_total", {"code": "-32700", "name": "parse_error"})
        == 3
    )


async def test_oversized_frame_closes_1009_others_unaffected(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    async with start_server(max_message_bytes=4096) as running:
        with trio.fail_after(10):
            async with acp_ws_client(running.url, acp_schema) as (bystander, _):
                await bystander.initialize()
                session = await bystander.new_session(str(tmp_path))
                async with acp_ws_client(running.url, acp_schema) as (client, ws):
                    await client.initialize()
                    # Just under the bound is fine...
                    text = "a" * 3000
                    fits = await client.request_raw(
                        "session/prompt",
                        {"sessionId": "nope", "prompt": [{"type": "text", "text": text}]},
                    )
                    assert fits["error"]["code"] == -32002
                    # ...one frame over it closes the socket with 1009.
                    await client.send_raw(
                        json.dumps(
                            {
                                "jsonrpc": "2.0",
                                "id": 99,
                                "method": "session/new",
                                "params": {"cwd": str(tmp_path), "mcpServers": [], "x": "b" * 5000},
                            }
                        )
                    )
                    await client.closed.wait()
                    assert ws.closed is not None and ws.closed.code == 1009
                await settle_until(lambda: len(running.manager.connections) == 1)
                assert await bystander.prompt(session, "still fine") == "end_turn"
                assert bystander.agent_text(session) == "still fine"


@pytest.mark.parametrize(
    ("name", "frame", "code"),
    [
        ("text not UTF-8", b"\x81\x82" + b"\x00" * 4 + b"\xff\xfe", 1007),
        ("unmasked", b"\x81\x02{}", 1002),
        ("reserved bit", b"\xc1\x82" + b"\x00" * 4 + b"{}", 1002),
        # Close frames go to wsproto, whose refusals Hypercorn once answered by dropping
        # the connection (an audit): a reserved code, and a reason that is not UTF-8.
        ("close with code 1005", b"\x88\x82" + b"\x00" * 4 + b"\x03\xed", 1002),
        ("close reason not UTF-8", b"\x88\x83" + b"\x00" * 4 + b"\x03\xe8\xff", 1007),
    ],
)
async def test_a_broken_frame_closes_with_its_code_others_unaffected(
    server: Running, tmp_path: Path, acp_schema: SchemaChecker, name: str, frame: bytes, code: int
) -> None:
    """RFC 6455 asks for a close frame naming the protocol error; Hypercorn alone dropped
    the TCP connection without one."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request

    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(10):
        async with acp_ws_client(server.url, acp_schema) as (bystander, _):
            await bystander.initialize()
            session = await bystander.new_session(str(tmp_path))
            ws = WSConnection(ConnectionType.CLIENT)
            closed: CloseConnection | None = None
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(ws.send(Request(host=f"{host}:{port}", target="/acp")))
                while closed is None:
                    data = await stream.receive_some(65536)
                    assert data, f"{name}: the server dropped the connection without a close"
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, AcceptConnection):
                            await stream.send_all(frame)
                        elif isinstance(event, CloseConnection):
                            closed = event
            assert (closed.code, bool(closed.reason)) == (code, True), name
            await settle_until(lambda: len(server.manager.connections) == 1)
            assert await bystander.prompt(session, "still fine") == "end_turn"


async def test_the_message_bound_is_in_bytes_not_characters(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """Hypercorn counts a message's characters against its bound: 1,500 emoji (6,000
    bytes) passed a 4,096-byte --max-message-bytes. The direct reader measures bytes."""
    async with start_server(max_message_bytes=4096) as running:
        with trio.fail_after(10):
            async with acp_ws_client(running.url, acp_schema) as (client, ws):
                await client.initialize()
                params = {"cwd": str(tmp_path), "mcpServers": [], "x": "😀" * 1500}
                await client.send_raw(
                    json.dumps({"jsonrpc": "2.0", "id": 9, "method": "session/new",
                                "params": params}, ensure_ascii=False)
                )  # fmt: skip
                await client.closed.wait()
                assert ws.closed is not None and ws.closed.code == 1009
                assert "4096-byte limit" in (ws.closed.reason or "")
            await settle_until(lambda: len(running.manager.connections) == 0)
            assert running.manager.sessions == {}


async def test_binary_frames_with_utf8_json(
    server: Running, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    with trio.fail_after(10):
        async with open_websocket_url(ws_url(server.url)) as ws:

            async def call(request_id: int, method: str, params: dict[str, Any]) -> Any:
                msg = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
                acp_schema.client_sent(msg)
                await ws.send_message(json.dumps(msg, ensure_ascii=False).encode("utf-8"))
                while True:
                    answer = json.loads(await ws.get_message())
                    acp_schema.agent_sent(answer)
                    if answer.get("id") == request_id:
                        return answer["result"]

            assert (await call(1, "initialize", {"protocolVersion": 1}))["protocolVersion"] == 1
            new = await call(2, "session/new", {"cwd": str(tmp_path), "mcpServers": []})
            text = "héllo wörld ✓"
            prompt = {"sessionId": new["sessionId"], "prompt": [{"type": "text", "text": text}]}
            assert await call(3, "session/prompt", prompt) == {"stopReason": "end_turn"}
            await ws.aclose()
            try:
                await ws.get_message()
            except ConnectionClosed:
                pass


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_model_output_that_is_not_valid_unicode_is_sent_and_stored(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker, store: str
) -> None:
    """A model's text with a lone surrogate (badly decoded output) cannot be UTF-8 as it
    is; it is written as its JSON escape, so the update reaches the client, the turn is
    stored and answered, and the server goes on (it once took the whole server down)."""
    model = ScriptModel([[{"text": "a\ud800b"}], [{"text": "ok"}]])
    async with start_server(model, store=store) as running:
        with trio.fail_after(10):
            async with acp_ws_client(running.url, acp_schema) as (client, _):
                await client.initialize()
                session = await client.new_session(str(tmp_path))
                assert await client.prompt(session, "first") == "end_turn"
                assert client.agent_text(session) == "a\ud800b"
                assert await client.prompt(session, "second") == "end_turn"
            records = await running.manager.store.transcript(session)
            assert any("\\ud800" in r.payload_json for r in records)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_prompt_that_is_not_valid_unicode_is_answered_and_stored(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker, store: str
) -> None:
    """``"\\ud800"`` in a prompt's text is valid JSON but no UTF-8: it once failed the
    prompt's size check with -32603. The prompt runs, the title (an SQLite parameter) gets
    U+FFFD in its place, and a load replays the prompt as it was sent."""
    async with start_server(ScriptModel([[{"text": "ok"}]]), store=store) as running:
        with trio.fail_after(10):
            async with acp_ws_client(running.url, acp_schema) as (client, _):
                await client.initialize()
                session = await client.new_session(str(tmp_path))
                assert await client.prompt(session, "a\ud800b") == "end_turn"
                listed = await client.request("session/list", {})
                assert [s["title"] for s in listed["sessions"]] == ["a\ufffdb"]
            async with acp_ws_client(running.url, acp_schema) as (client, _):
                await client.initialize()
                await client.request(
                    "session/load", {"sessionId": session, "cwd": str(tmp_path), "mcpServers": []}
                )
                user = [
                    u["content"]["text"]
                    for u in client.updates(session)
                    if u["sessionUpdate"] == "user_message_chunk"
                ]
                assert user == ["a\ud800b"]


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; client_max_window_bits=zz",
        "permessage-deflate; server_max_window_bits=",
    ],
)
async def test_a_malformed_extension_offer_is_refused_and_the_server_goes_on(
    server: Running, tmp_path: Path, acp_schema: SchemaChecker, offer: str
) -> None:
    """A window size that is not a number once failed inside Hypercorn's accept and took
    the whole server down: it is a 400 with the reason now, and other clients go on."""
    with trio.fail_after(10):
        async with acp_ws_client(server.url, acp_schema) as (bystander, _):
            await bystander.initialize()
            headers = [(b"sec-websocket-extensions", offer.encode())]
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(ws_url(server.url), extra_headers=headers):
                    pass  # pragma: no cover - the handshake fails
            assert info.value.status_code == 400
            assert b"Sec-WebSocket-Extensions" in (info.value.body or b"")
            session = await bystander.new_session(str(tmp_path))
            assert await bystander.prompt(session, "still here") == "end_turn"
            # A well-formed offer passes the check (Hypercorn then turns compression on).
            scope = {"headers": [(b"sec-websocket-extensions", b"permessage-deflate; x, y")]}
            assert _bad_extension_offer(scope) is None


async def test_a_compressed_connection_frees_its_zlib_streams_when_it_ends(
    server: Running, tmp_path: Path
) -> None:
    """``permessage-deflate`` (browsers and ``websockets`` offer it): once the connection
    ends, its compressor and decompressor are gone at once, not when the rarely-run
    collector gets to the connection's cycle (RSS once climbed 45 -> 331 MB over 14,000
    such connections)."""
    import asyncio
    import gc

    import websockets
    from wsproto.extensions import PerMessageDeflate

    def talk() -> str:
        async def run() -> str:
            async with websockets.connect(ws_url(server.url), compression="deflate") as ws:
                assert "permessage-deflate" in ws.response.headers["sec-websocket-extensions"]
                request = {"jsonrpc": "2.0", "id": 1, "method": "initialize"}
                await ws.send(json.dumps({**request, "params": {"protocolVersion": 1}}))
                return str(await ws.recv())

        return asyncio.run(run())

    with trio.fail_after(10):
        answer = await trio.to_thread.run_sync(talk)
        assert json.loads(answer)["result"]["protocolVersion"] == 1
        await settle_until(lambda: not server.manager.connections)
        await trio.testing.wait_all_tasks_blocked()
    held = [
        o
        for o in gc.get_objects()
        # (Not isinstance: dead weak proxies raise.)
        if type(o) in (PerMessageDeflate, BoundedPerMessageDeflate)
        and (o._compressor is not None or o._decompressor is not None)
    ]
    assert held == []


async def test_a_small_compressed_message_over_the_bound_gets_a_1009_close_frame(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A message over the bound that arrives compressed in one read (5 KB of text, a few
    dozen bytes on the wire) is refused by the bounded inflater, inside wsproto: the
    connection was dropped without a close frame, so the client saw 1006 (an audit)."""
    import asyncio

    import websockets

    message = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x", "params": "a" * 5000})

    def send(url: str) -> tuple[int | None, str | None]:
        async def run() -> tuple[int | None, str | None]:
            async with websockets.connect(url, compression="deflate", max_size=None) as ws:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(message)
                    while True:  # (the -32600 before the close)
                        await ws.recv()
                return ws.close_code, ws.close_reason

        return asyncio.run(run())

    async with start_server(max_message_bytes=4096) as server:
        with trio.fail_after(30):
            code, reason = await trio.to_thread.run_sync(send, ws_url(server.url))
            # (The reason names the bound applied: with several servers in this process
            # the inflater's is the largest, and Hypercorn's own bound on this server's
            # messages closes, with a reason of ours.)
            assert code == 1009 and (reason or "").startswith("message over the"), reason
            async with acp_ws_client(server.url, acp_schema) as (bystander, _):
                await bystander.initialize()
                session = await bystander.new_session(str(tmp_path))
                assert await bystander.prompt(session, "still here") == "end_turn"


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_a_message_over_the_bound_is_answered_minus_32600_counted_then_closed_1009(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker, compression: str | None
) -> None:
    """A message over ``--max-message-bytes`` gets, before its 1009 close, a -32600 with a
    null id naming its size and the limit, as on stdio (the close alone told a JSON-RPC
    client nothing it could match), and counts in ``punie_limits_hit_total{limit=
    "max_message_bytes"}`` (it counted only on stdio): through the direct frame reader
    and, with permessage-deflate negotiated, through wsproto and Hypercorn. A client that
    closes with 1009 itself is neither answered nor counted. Others go on."""
    import asyncio

    import websockets

    message = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "x", "params": "a" * 5000})

    def send(url: str, text: str | None, code: int = 1000) -> tuple[list[Any], int | None, str]:
        async def run() -> tuple[list[Any], int | None, str]:
            received: list[Any] = []
            async with websockets.connect(url, compression=compression, max_size=None) as ws:
                if text is None:
                    await ws.close(code, "client")
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(text or "")
                    while True:
                        received.append(json.loads(await ws.recv()))
                return received, ws.close_code, ws.close_reason or ""

        return asyncio.run(run())

    async with start_server(max_message_bytes=4096) as server:
        registry = server.manager.metrics.registry

        def counted() -> tuple[float | None, float | None]:
            return (
                registry.get_sample_value("punie_limits_hit_total", {"limit": "max_message_bytes"}),
                registry.get_sample_value(
                    "punie_errors_total", {"code": "-32600", "name": "invalid_request"}
                ),
            )

        with trio.fail_after(30):
            url = ws_url(server.url)
            assert counted() == (0, 0)
            received, code, reason = await trio.to_thread.run_sync(send, url, message)
            assert code == 1009 and reason.startswith("message over the"), reason
            (error,) = received
            assert error["id"] is None and error["error"]["code"] == -32600, error
            assert "byte limit" in error["error"]["message"], error
            if compression is None:  # (the direct reader knows the size: one frame)
                assert reason == f"message over the 4096-byte limit ({len(message)} bytes)"
                assert error["error"]["message"] == (
                    f"Invalid request: message over the 4096-byte limit ({len(message)} "
                    "bytes); the connection closes (1009)"
                )
            assert counted() == (1, 1)
            received, code, _ = await trio.to_thread.run_sync(send, url, None, 1009)
            assert (received, code) == ([], 1009)
            assert counted() == (1, 1)
            async with acp_ws_client(server.url, acp_schema) as (bystander, _):
                await bystander.initialize()
                session = await bystander.new_session(str(tmp_path))
                assert await bystander.prompt(session, "still here") == "end_turn"


async def test_a_compression_bomb_is_closed_1009_before_it_inflates(
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    acp_schema: SchemaChecker,
) -> None:
    """One compressed message of 64 MiB (about 64 KB on the wire) is refused with 1009
    after at most the size limit has been inflated, not after all of it (an audit saw 1 GiB
    inflated, RSS 1.2 GB and other clients stalled, before the 1009); others go on."""
    import asyncio

    import websockets

    inflated: list[int] = []
    bounded = BoundedPerMessageDeflate.frame_inbound_payload_data

    def counting(self: BoundedPerMessageDeflate, proto: Any, data: bytes) -> Any:
        out = bounded(self, proto, data)
        if isinstance(out, bytes) and self._inbound_compressed:
            inflated.append(len(out))
        return out

    monkeypatch.setattr(BoundedPerMessageDeflate, "frame_inbound_payload_data", counting)
    bomb = '{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"x": "' + (
        "a" * (64 * 1024 * 1024)
    )

    def send_bomb(url: str) -> int | None:
        async def run() -> int | None:
            async with websockets.connect(url, compression="deflate", max_size=None) as ws:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(bomb)
                    while True:  # (the -32600 before the close)
                        await ws.recv()
                return ws.close_code

        return asyncio.run(run())

    async with start_server(max_message_bytes=1024 * 1024) as server:
        with trio.fail_after(60):
            code = await trio.to_thread.run_sync(send_bomb, ws_url(server.url))
            assert code == 1009
            assert 0 < sum(inflated) <= BoundedPerMessageDeflate.limit + 1
            assert BoundedPerMessageDeflate.limit < len(bomb)
            async with acp_ws_client(server.url, acp_schema) as (bystander, _):
                await bystander.initialize()
                session = await bystander.new_session(str(tmp_path))
                assert await bystander.prompt(session, "still here") == "end_turn"


async def test_a_message_bound_past_what_zlib_takes_still_serves_compressed_clients(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bounded inflater handed zlib the message bound plus one as its output cap: past
    a C ``ssize_t`` (a bound of 2**63 - 1, which a TOML file could hold before the options
    were capped at 2**40, and which ``ServeConfig`` still takes) every compressed message
    was an ``OverflowError`` inside wsproto, and every browser's or ``websockets``'
    connection was closed before its first answer (an audit). They are answered."""
    import asyncio

    import websockets

    # (install() only grows the class's bound: it is put back for the tests after this one.)
    monkeypatch.setattr(BoundedPerMessageDeflate, "limit", BoundedPerMessageDeflate.limit)
    request = {"jsonrpc": "2.0", "id": 1, "method": "initialize"}

    def talk(url: str) -> Any:
        async def run() -> Any:
            async with websockets.connect(url, compression="deflate") as ws:
                assert "permessage-deflate" in ws.response.headers["sec-websocket-extensions"]
                await ws.send(json.dumps({**request, "params": {"protocolVersion": 1}}))
                return json.loads(await ws.recv())

        return asyncio.run(run())

    async with start_server(max_message_bytes=2**63 - 1) as server:
        with trio.fail_after(10):
            answer = await trio.to_thread.run_sync(talk, ws_url(server.url))
    assert answer["result"]["protocolVersion"] == 1


async def test_an_error_that_echoes_a_huge_value_stays_concise(
    server: Running, acp_schema: SchemaChecker
) -> None:
    """An error message names the bad value, but a megabyte of it is not "a concise single
    sentence" (the schema's ``Error.message``): the answer carried the whole value back,
    a 1 MB toast in an IDE. It is cut, and says how long it was."""
    huge = "x" * 1_000_000
    cases = [
        ("session/list", {"cursor": huge}, "Invalid params: cursor is not valid"),
        ("session/list", {"cwd": huge}, "Invalid params: cwd must be an absolute path"),
        ("session/new", {"cwd": "/" + huge, "mcpServers": []}, "Invalid params: cwd '/xxx"),
        ("session/prompt", {"sessionId": huge, "prompt": []}, "Session not found: xxx"),
        ("no/such_method" + huge, {}, "Method not found: no/such_methodxxx"),
    ]
    with trio.fail_after(20):
        async with acp_ws_client(server.url, acp_schema) as (client, _):
            await client.initialize()
            for method, params, start in cases:
                answer = await client.request_raw(method, params)
                message = answer["error"]["message"]
                assert message.startswith(start), (method, message[:100])
                assert len(message) <= MAX_ERROR_MESSAGE_CHARS, (method, len(message))
                assert message.endswith(" characters)"), message[-80:]
            assert (await client.request("session/list", {}))["sessions"] == []


async def test_a_request_id_past_its_bounds_is_refused_and_the_connection_goes_on(
    server: Running, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A request id had no bound but the message's: a prompt under a 1 MB id ran, its id
    held for the turn and echoed back whole. An id is a string of at most 1,024
    characters or a 64-bit integer; past that the request is answered -32600 naming the
    bound (id null: nothing to correlate it with), it does nothing, and the connection
    and every other client go on."""
    with trio.fail_after(10):
        async with (
            acp_ws_client(server.url, acp_schema) as (bystander, _),
            acp_ws_client(server.url, acp_schema) as (client, ws),
        ):
            await bystander.initialize()
            await client.initialize()
            session = await client.new_session(str(tmp_path))
            prompt = {"sessionId": session, "prompt": [{"type": "text", "text": "hi"}]}
            for bad in ("x" * 1_000_000, "x" * 1025, 2**63, -(2**63) - 1):
                text = json.dumps(
                    {"jsonrpc": "2.0", "id": bad, "method": "session/prompt", "params": prompt}
                )
                answer = await exchange(client, text)
                assert answer["id"] is None and answer["error"]["code"] == -32600
                assert answer["error"]["message"] == (
                    'Invalid request: "id" must be a string of at most 1024 characters, '
                    "or a 64-bit integer"
                )
            assert client.agent_text(session) == ""  # (no turn ran)
            # At the bounds, ids are taken and echoed (here in a -32601).
            for good in ("y" * 1024, 2**63 - 1, -(2**63)):
                text = json.dumps({"jsonrpc": "2.0", "id": good, "method": "no/such_method"})
                answer = await exchange(client, text)
                assert answer["id"] == good and answer["error"]["code"] == -32601
            assert await client.prompt(session, "still here") == "end_turn"
            assert ws.closed is None
            assert not any("error" in m for m in bystander.received)
            other = await bystander.new_session(str(tmp_path))
            assert await bystander.prompt(other, "unaffected") == "end_turn"
