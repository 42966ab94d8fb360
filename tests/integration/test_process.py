"""The server as a real subprocess (``python -m punie_trio serve``): stdio and WebSocket
clients on one manager, signals and graceful shutdown, a busy port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..unit._hypercorn import h2_get, read_initial_window
from ._support import (
    TOKEN,
    ServerProcess,
    acp_ws_client,
    command_process,
    fresh_ids,
    run_punie,
    serve_command,
    server_env,
    server_process,
    write_script,
    ws_url,
)


async def test_stdio_and_websocket_share_one_manager(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    with trio.fail_after(30):
        async with server_process(tmp_path, "--stdio") as server, trio.open_nursery() as nursery:
            stdio = AcpTestClient(server.stdio(), acp_schema, ids=fresh_ids())
            await nursery.start(stdio.run)
            async with acp_ws_client(server.url, acp_schema, token=TOKEN) as (ws, _):
                await stdio.initialize()
                await ws.initialize()
                stdio_session = await stdio.new_session(str(tmp_path))
                ws_session = await ws.new_session(str(tmp_path))
                stops: dict[str, str] = {}

                async def prompt(client: AcpTestClient, session: str, text: str) -> None:
                    stops[text] = await client.prompt(session, text)

                async with trio.open_nursery() as prompts:
                    prompts.start_soon(prompt, stdio, stdio_session, "over stdio")
                    prompts.start_soon(prompt, ws, ws_session, "over websocket")
                assert stops == {"over stdio": "end_turn", "over websocket": "end_turn"}
                assert stdio.agent_text(stdio_session) == "over stdio"
                assert ws.agent_text(ws_session) == "over websocket"
                assert stdio.updates(ws_session) == [] and ws.updates(stdio_session) == []
                async with httpx.AsyncClient(base_url=server.url) as http:
                    health = (await http.get("/health")).json()
                assert health["connections"] == 2
                assert health["sessions"] == 2
                assert health["workers"] == 1
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
            nursery.cancel_scope.cancel()


async def test_a_session_moves_between_stdio_and_websocket_through_the_store(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A session made over WebSocket is loaded over stdio once its client has left (open
    there, it is refused as another connection's), and one made over stdio is loaded over
    WebSocket once stdin has ended: each replays its transcript and takes new prompts."""
    load = {"cwd": str(tmp_path), "mcpServers": []}
    with trio.fail_after(30):
        async with server_process(tmp_path, "--stdio") as server, trio.open_nursery() as nursery:
            stdio = AcpTestClient(server.stdio(), acp_schema, ids=fresh_ids())
            await nursery.start(stdio.run)
            await stdio.initialize()
            mine = await stdio.new_session(str(tmp_path))
            assert await stdio.prompt(mine, "over stdio") == "end_turn"
            async with acp_ws_client(server.url, acp_schema, token=TOKEN) as (ws, _):
                await ws.initialize()
                theirs = await ws.new_session(str(tmp_path))
                assert await ws.prompt(theirs, "over websocket") == "end_turn"
                held = await stdio.request_raw("session/load", {"sessionId": theirs, **load})
                assert held["error"]["code"] == -32600, held
                assert "open on another connection" in held["error"]["message"]
            while "result" not in (
                answer := await stdio.request_raw("session/load", {"sessionId": theirs, **load})
            ):  # (the WebSocket's end is seen a moment after its close)
                assert "open on another connection" in answer["error"]["message"], answer
            assert stdio.agent_text(theirs) == "over websocket"  # replayed
            assert await stdio.prompt(theirs, "and on") == "end_turn"
            assert server.process.stdin is not None
            await server.process.stdin.aclose()  # stdin EOF: the stdio connection ends
            await stdio.closed.wait()
            async with acp_ws_client(server.url, acp_schema, token=TOKEN) as (ws, _):
                await ws.initialize()
                await ws.request("session/load", {"sessionId": mine, **load})
                assert ws.agent_text(mine) == "over stdio"  # replayed
                assert await ws.prompt(mine, "over websocket now") == "end_turn"
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
async def test_sigterm_shuts_down_gracefully(
    tmp_path: Path, acp_schema: SchemaChecker, signum: signal.Signals
) -> None:
    """And SIGINT and SIGHUP the same way (SIGHUP, a closed terminal, once killed the
    process on the spot: no answers, no close frames, the running turns not recorded)."""
    script = write_script(tmp_path / "slow.json", [[{"text": "started"}, {"sleep": 60}]])
    shutdown_timeout = 10.0
    with trio.fail_after(30):
        async with (
            server_process(
                tmp_path, "--model", f"script:{script}", "--shutdown-timeout", str(shutdown_timeout)
            ) as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (busy, busy_ws),
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (idle, idle_ws),
        ):
            await busy.initialize()
            await idle.initialize()
            session = await busy.new_session(str(tmp_path))
            await idle.new_session(str(tmp_path))
            stop: list[str] = []
            async with trio.open_nursery() as nursery:

                async def run_prompt() -> None:
                    stop.append(await busy.prompt(session, "take your time"))

                nursery.start_soon(run_prompt)
                await busy.wait_for(lambda m: m.get("method") == "session/update")
                server.process.send_signal(signum)
                await busy.closed.wait()
                await idle.closed.wait()
            assert stop == ["cancelled"]
            assert busy_ws.closed is not None and busy_ws.closed.code == 1001
            assert idle_ws.closed is not None and idle_ws.closed.code == 1001
            # (That the turns are cancelled at once, not at the timeout, is checked on a
            # MockClock in-process: test_agent.py::test_manager_shutdown_cancels_turns.)
            assert await server.process.wait() == 0
            await server.wait_stderr(f"received {signum.name}, shutting down")
        shown = await run_punie("sessions", "show", session, "--data-dir", str(tmp_path / "data"))
        assert "stop: cancelled" in shown.stdout.decode()  # the running turn was recorded


async def test_a_signal_during_the_first_build_stops_it_and_exits_0(tmp_path: Path) -> None:
    """The dev app's first build runs before the server listens; a signal then once waited
    for the watchdog (exit 1 after --shutdown-timeout) and left the build running."""
    site = tmp_path / "site"
    site.mkdir()
    fifo = tmp_path / "build.pid"
    os.mkfifo(fifo)  # the build writes its pid into it once it runs; reading waits for that
    build = f"echo $$ > {fifo}; exec sleep 60"
    with trio.fail_after(30):
        async with server_process(
            tmp_path,
            "--site", str(site), "--build", build, "--no-watch", "--shutdown-timeout", "20",
            wait_listening=False,
        ) as server:  # fmt: skip
            build_pid = int(await trio.to_thread.run_sync(fifo.read_text))
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
            await server.wait_stderr("received SIGTERM, shutting down")
            assert "listening" not in "".join(server.stderr_lines)
    with pytest.raises(ProcessLookupError):  # the build went with it
        os.kill(build_pid, 0)


async def test_the_stdio_client_is_served_during_the_first_build(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The dev app's first build (minutes, for a real site) runs before the HTTP server
    listens; the stdio client, which needs neither, was not read until it ended: an IDE's
    ``initialize`` waited for the whole build."""
    site = tmp_path / "site"
    site.mkdir()
    gate = tmp_path / "gate"
    os.mkfifo(gate)  # the build waits for the test to open it for writing
    with trio.fail_after(30):
        async with (
            server_process(
                tmp_path, "--stdio", "--site", str(site), "--build", f"cat {gate}", "--no-watch",
                wait_listening=False,
            ) as server,
            trio.open_nursery() as nursery,
        ):  # fmt: skip
            stdio = AcpTestClient(server.stdio(), acp_schema, ids=fresh_ids())
            await nursery.start(stdio.run)
            assert (await stdio.initialize())["protocolVersion"] == 1
            session = await stdio.new_session(str(tmp_path))
            assert await stdio.prompt(session, "during the build") == "end_turn"
            assert "listening" not in "".join(server.stderr_lines)  # (still building)
            await trio.to_thread.run_sync(gate.write_text, "")  # the build ends
            await server.wait_stderr("punie-trio listening on")
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
            nursery.cancel_scope.cancel()


async def _a_stdio_turn_streaming(
    server: ServerProcess, nursery: trio.Nursery, acp_schema: SchemaChecker, tmp_path: Path
) -> tuple[AcpTestClient, str, list[str]]:
    """Over ``server``'s stdio (its client run in ``nursery``): a session, and a prompt
    whose first update has come. Returns the client, the session's id and the list the
    prompt's stop reason is appended to."""
    stdio = AcpTestClient(server.stdio(), acp_schema, ids=fresh_ids())
    await nursery.start(stdio.run)
    await stdio.initialize()
    session = await stdio.new_session(str(tmp_path))
    stops: list[str] = []

    async def prompt() -> None:
        stops.append(await stdio.prompt(session, "go"))

    nursery.start_soon(prompt)
    await stdio.wait_for(lambda m: m.get("method") == "session/update")
    return stdio, session, stops


async def test_a_signal_during_the_first_build_ends_a_stdio_turn_as_any_shutdown(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """Served during the first build, the stdio client's turn is wound down as in any
    shutdown when a signal abandons the start-up: answered "cancelled" and recorded."""
    site = tmp_path / "site"
    site.mkdir()
    gate = tmp_path / "gate"
    os.mkfifo(gate)  # never opened for writing: the build runs until it is stopped
    script = write_script(tmp_path / "slow.json", [[{"text": "started"}, {"sleep": 600}]])
    args = ["--stdio", "--site", str(site), "--build", f"cat {gate}", "--no-watch"]
    with trio.fail_after(30):
        async with (
            server_process(
                tmp_path, *args, "--model", f"script:{script}", wait_listening=False
            ) as server,
            trio.open_nursery() as nursery,
        ):
            stdio, session, stops = await _a_stdio_turn_streaming(
                server, nursery, acp_schema, tmp_path
            )
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
            await stdio.closed.wait()
            assert stops == ["cancelled"]
            assert "listening" not in "".join(server.stderr_lines)
        shown = await run_punie("sessions", "show", session, "--data-dir", str(tmp_path / "data"))
        assert "stop: cancelled" in shown.stdout.decode()


@pytest.mark.parametrize("http", [True, False], ids=["http", "no-http"])
async def test_stdin_eof_during_the_first_build(
    tmp_path: Path, acp_schema: SchemaChecker, http: bool
) -> None:
    """stdin ends while the dev app's first build runs (the stdio client is served from
    the start): its answers drain; under ``--no-http`` that ends the server, status 0, the
    build stopped with it (at once, not after --shutdown-timeout); with the HTTP server,
    the build goes on and the server listens once it ends."""
    site = tmp_path / "site"
    site.mkdir()
    fifo = tmp_path / "build.pid"
    os.mkfifo(fifo)  # the build writes its pid into it once it runs; reading waits for that
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    build = f"echo $$ > {fifo}; exec cat {gate}"
    args = ["--stdio", "--site", str(site), "--build", build, "--no-watch"]
    args += ["--shutdown-timeout", "60"] + ([] if http else ["--no-http"])
    with trio.fail_after(30):
        async with (
            server_process(tmp_path, *args, wait_listening=False) as server,
            trio.open_nursery() as nursery,
        ):
            build_pid = int(await trio.to_thread.run_sync(fifo.read_text))
            stdio = AcpTestClient(server.stdio(), acp_schema, ids=fresh_ids())
            await nursery.start(stdio.run)
            await stdio.initialize()
            session = await stdio.new_session(str(tmp_path))
            assert server.process.stdin is not None
            await server.process.stdin.aclose()
            await stdio.closed.wait()
            if http:
                os.kill(build_pid, 0)  # (still building)
                await trio.to_thread.run_sync(gate.write_text, "")  # the build ends
                await server.wait_stderr("punie-trio listening on")
                server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
            assert "Traceback" not in "".join(server.stderr_lines)
            nursery.cancel_scope.cancel()
        shown = await run_punie("sessions", "show", session, "--data-dir", str(tmp_path / "data"))
        assert shown.returncode == 0
    if not http:
        with pytest.raises(ProcessLookupError):  # the build went with it
            os.kill(build_pid, 0)


async def test_the_http_server_failing_to_start_after_the_first_build_ends_a_stdio_turn(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The stdio client is served during the dev app's first build, and the HTTP server
    then cannot listen (its port taken): the server ends, status 1, saying why, and the
    stdio client's turn is wound down as in any shutdown (answered "cancelled", recorded).
    It ended with no answer: the client's prompt was left unanswered on a closed stdout."""
    site = tmp_path / "site"
    site.mkdir()
    gate = tmp_path / "gate"
    os.mkfifo(gate)  # the build waits for the test to open it for writing
    script = write_script(tmp_path / "slow.json", [[{"text": "started"}, {"sleep": 600}]])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # (port 0: the server is then told to use this one)
        taken.listen()
        port = str(taken.getsockname()[1])
        args = ["--stdio", "--site", str(site), "--build", f"cat {gate}", "--no-watch"]
        args += ["--model", f"script:{script}", "--port", port]
        with trio.fail_after(30):
            async with (
                server_process(tmp_path, *args, wait_listening=False) as server,
                trio.open_nursery() as nursery,
            ):
                stdio, session, stops = await _a_stdio_turn_streaming(
                    server, nursery, acp_schema, tmp_path
                )
                await trio.to_thread.run_sync(gate.write_text, "")  # the build ends
                assert await server.process.wait() == 1
                await stdio.closed.wait()
                await server.wait_stderr(f"cannot listen on 127.0.0.1:{port}")
                assert "Traceback" not in "".join(server.stderr_lines)
                assert stops == ["cancelled"]
                nursery.cancel_scope.cancel()
    shown = await run_punie("sessions", "show", session, "--data-dir", str(tmp_path / "data"))
    assert "stop: cancelled" in shown.stdout.decode()


async def test_a_browser_that_stays_open_does_not_hold_the_exit(tmp_path: Path) -> None:
    """``serve --open`` opens the site with ``webbrowser.open`` in a thread. With
    ``$BROWSER`` set (or a console browser) that call waits for the browser process to
    exit, and the thread was neither abandoned on cancel nor cancelled when ``serve``
    returned: a server told to stop shut down, then waited until the user closed the
    browser (the process was still there 12 s after SIGINT). It exits 0 now, and the
    browser it started stays open."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html><body>x</body></html>")
    fifo = tmp_path / "browser.pid"
    os.mkfifo(fifo)  # the browser writes its pid into it once it runs
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\necho $$ > {fifo}\nexec sleep 60\n")
    browser.chmod(0o755)
    command = serve_command(tmp_path, "--site", str(site), "--no-watch", "--open")
    env = {**server_env(), "BROWSER": str(browser)}
    browser_pid = None
    try:
        with trio.fail_after(30):
            async with command_process(command, env) as server:
                browser_pid = int(await trio.to_thread.run_sync(fifo.read_text))
                server.process.send_signal(signal.SIGINT)
                assert await server.process.wait() == 0
                await server.wait_stderr("received SIGINT, shutting down")
        os.kill(browser_pid, 0)  # (still open: the user's, not the server's to close)
    finally:
        if browser_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(browser_pid, signal.SIGKILL)


async def test_second_signal_exits_at_once(tmp_path: Path, acp_schema: SchemaChecker) -> None:
    # A stdio client that stops reading while a turn floods it: the graceful shutdown then
    # waits (up to the long --shutdown-timeout) for an answer it cannot deliver.
    chunk = "y" * 65536
    script = write_script(tmp_path / "flood.json", [[{"text": chunk}] * 100])
    with trio.fail_after(30):
        async with server_process(
            tmp_path,
            "--stdio",
            "--model",
            f"script:{script}",
            "--outbox-limit",
            "4",
            "--shutdown-timeout",
            "300",
        ) as server:
            async with trio.open_nursery() as nursery:
                stdio = AcpTestClient(server.stdio(), acp_schema, ids=fresh_ids())
                await nursery.start(stdio.run)
                await stdio.initialize()
                session = await stdio.new_session(str(tmp_path))
                nursery.start_soon(stdio.prompt, session, "flood")
                await stdio.wait_for(lambda m: m.get("method") == "session/update")
                nursery.cancel_scope.cancel()  # stop reading stdout
            server.process.send_signal(signal.SIGINT)
            await server.wait_stderr("received SIGINT, shutting down")
            assert server.process.returncode is None  # still draining, not exited
            server.process.send_signal(signal.SIGINT)
            assert await server.process.wait() == 1  # (docs/cli.md: a second signal is 1)
            await server.wait_stderr("second signal, exiting now")


async def test_busy_port_exits_1_naming_the_port(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with trio.fail_after(30):
            async with server_process(
                tmp_path, "--port", str(port), wait_listening=False
            ) as server:
                assert await server.process.wait() == 1
                await server.stderr_done.wait()
    assert f"127.0.0.1:{port}" in server.stderr
    assert "punie-trio: error:" in server.stderr
    assert "listening on" not in server.stderr
    assert serve_command(tmp_path)[1:4] == ["-m", "punie_trio", "serve"]


async def test_shutdown_bounded_with_a_client_that_never_reads(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    chunk = "z" * 65536
    script = write_script(tmp_path / "flood.json", [[{"text": chunk}] * 300])
    shutdown_timeout = 3.0
    with trio.fail_after(30):
        async with (
            server_process(
                tmp_path,
                "--model",
                f"script:{script}",
                "--outbox-limit",
                "4",
                "--shutdown-timeout",
                str(shutdown_timeout),
            ) as server,
            open_websocket_url(
                ws_url(server.url),
                extra_headers=[(b"authorization", f"Bearer {TOKEN}".encode())],
                max_message_size=1 << 20,
                message_queue_size=1,
            ) as stuck,
        ):

            async def call(request_id: int, method: str, params: dict[str, Any]) -> Any:
                msg = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
                acp_schema.client_sent(msg)
                await stuck.send_message(json.dumps(msg))
                answer = json.loads(await stuck.get_message())
                acp_schema.agent_sent(answer)
                return answer["result"]

            await call(1, "initialize", {"protocolVersion": 1})
            new = await call(2, "session/new", {"cwd": str(tmp_path), "mcpServers": []})
            prompt = {"sessionId": new["sessionId"], "prompt": [{"type": "text", "text": "go"}]}
            await stuck.send_message(
                json.dumps(
                    {"jsonrpc": "2.0", "id": 3, "method": "session/prompt", "params": prompt}
                )
            )
            first = json.loads(await stuck.get_message())  # the flood has started
            assert first["method"] == "session/update"
            # ...and from now on this client reads nothing. Socket writes are shielded (a frame
            # must not be cut short), but once the server terminates, a write that makes no
            # progress for a second is abandoned and that connection closed: the shutdown
            # finishes in time and cleanly, without the watchdog.
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0  # (the watchdog's exit is 1)
            await server.stderr_done.wait()
            assert "shutdown did not finish within" not in server.stderr


def _still_running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to an init that does not reap is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat.rpartition(b")")[2].split()[0] not in (b"Z", b"X")


@pytest.mark.parametrize("exit_by", ["second signal", "shutdown timeout"])
async def test_a_build_that_ignores_sigterm_does_not_outlive_the_server(
    tmp_path: Path, exit_by: str
) -> None:
    """A build stopped by a shutdown gets SIGTERM, then SIGKILL. It got the SIGKILL after
    5 s, whatever the --shutdown-timeout: past a shorter one the watchdog ended the process
    (status 1, 'shutdown did not finish'), and the build, which ignored SIGTERM, ran on
    for good in a session of its own; so it did after a second signal. Now the build gets
    half the shutdown timeout, and an exit at once SIGKILLs it first."""
    site = tmp_path / "site"
    site.mkdir()
    fifo = tmp_path / "build.pid"
    os.mkfifo(fifo)
    build = f"trap '' TERM; echo $$ > {fifo}; exec sleep 60"
    timeout = "30" if exit_by == "second signal" else "0.2"
    with trio.fail_after(30):
        async with server_process(
            tmp_path,
            "--site", str(site), "--build", build, "--no-watch", "--shutdown-timeout", timeout,
            wait_listening=False,
        ) as server:  # fmt: skip
            build_pid = int(await trio.to_thread.run_sync(fifo.read_text))
            try:
                server.process.send_signal(signal.SIGTERM)
                await server.wait_stderr("received SIGTERM, shutting down")
                if exit_by == "second signal":
                    server.process.send_signal(signal.SIGTERM)
                    await server.wait_stderr("second signal, exiting now")
                    assert await server.process.wait() == 1
                else:
                    assert await server.process.wait() == 0
                    await server.stderr_done.wait()
                    assert "shutdown did not finish within" not in server.stderr
                while _still_running(build_pid):  # noqa: ASYNC110 (not our child: polled)
                    await trio.sleep(0.01)
            finally:
                with contextlib.suppress(ProcessLookupError):  # (a failed test's build)
                    os.kill(build_pid, signal.SIGKILL)


async def test_a_websocket_over_http2_that_stops_reading_does_not_hold_the_shutdown(
    tmp_path: Path,
) -> None:
    """/acp over HTTP/2 (extended CONNECT, prior knowledge) with a turn streaming to a
    client that grants no more flow-control window. The shutdown's time runs out; the
    close frame, sent shielded, then waited for good for Hypercorn to drain the stream
    (its send task, cancelled by then, never did): the watchdog ended the process, status
    1. The close is bounded now, and the shutdown ends in time, status 0."""
    import h2.config
    import h2.connection
    import h2.events

    def frame(msg: dict[str, Any]) -> bytes:  # a masked client text frame
        data = json.dumps(msg).encode()
        assert 126 <= len(data) < 65536
        mask = os.urandom(4)
        head = bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big") + mask
        return head + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    script = write_script(tmp_path / "flood.json", [[{"text": "z" * 60000}] * 100])
    with trio.fail_after(30):
        async with server_process(
            tmp_path, "--model", f"script:{script}", "--shutdown-timeout", "1"
        ) as server:
            host, port = server.url.removeprefix("http://").rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as sock:
                config = h2.config.H2Configuration(client_side=True, header_encoding=None)
                client = h2.connection.H2Connection(config)
                client.initiate_connection()
                client.send_headers(
                    1,
                    [
                        (b":method", b"CONNECT"), (b":protocol", b"websocket"),
                        (b":scheme", b"http"), (b":path", b"/acp"),
                        (b":authority", f"{host}:{port}".encode()),
                        (b"sec-websocket-version", b"13"),
                        (b"authorization", f"Bearer {TOKEN}".encode()),
                    ],
                )  # fmt: skip
                await sock.send_all(client.data_to_send())
                received = b""
                sent = 0
                session: str | None = None
                while b'"agent_message_chunk"' not in received:
                    data = await sock.receive_some(65536)
                    assert data, received
                    for event in client.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived):
                            assert dict(event.headers)[b":status"] == b"200"
                            client.send_data(1, frame({
                                "jsonrpc": "2.0", "id": 1, "method": "initialize",
                                "params": {
                                    "protocolVersion": 1,
                                    "clientInfo": {"name": "h2", "version": "0"},
                                },
                            }))  # fmt: skip
                            sent += 1
                        elif isinstance(event, h2.events.DataReceived):
                            received += event.data
                            if session is None:  # (then no more window is granted)
                                client.acknowledge_received_data(
                                    event.flow_controlled_length, event.stream_id
                                )
                    if sent == 1 and b'"agentInfo"' in received:
                        client.send_data(1, frame({
                            "jsonrpc": "2.0", "id": 2, "method": "session/new",
                            "params": {"cwd": str(tmp_path), "mcpServers": []},
                        }))  # fmt: skip
                        sent += 1
                    if session is None and b'"sessionId":"' in received:
                        start = received.index(b'"sessionId":"') + 13
                        session = received[start : received.index(b'"', start)].decode()
                        client.send_data(1, frame({
                            "jsonrpc": "2.0", "id": 3, "method": "session/prompt",
                            "params": {
                                "sessionId": session,
                                "prompt": [{"type": "text", "text": "go"}],
                            },
                        }))  # fmt: skip
                    await sock.send_all(client.data_to_send())
                server.process.send_signal(signal.SIGTERM)
                assert await server.process.wait() == 0  # (the watchdog's exit is 1)
            await server.stderr_done.wait()
            assert "shutdown did not finish within" not in server.stderr


@pytest.mark.parametrize("with_sse", [False, True], ids=["download", "download and SSE"])
async def test_a_download_over_http2_that_stops_reading_does_not_hold_the_shutdown(
    tmp_path: Path, with_sse: bool
) -> None:
    """The dev app sends a file over HTTP/2 to a client that grants no more flow-control
    window (Hypercorn buffers the rest of it and the response's last send waits for the
    drain; on the same connection, the live-reload stream's last event at shutdown waits
    too). That last send, shielded for up to 5 s to end Hypercorn's bookkeeping, outlived
    the shutdown: the watchdog ended the process, status 1, at any --shutdown-timeout
    under 4 s. It gets a short time once the server shuts down now."""

    site = tmp_path / "site"
    site.mkdir()
    (site / "big.bin").write_bytes(b"z" * 4_000_000)
    with trio.fail_after(30):
        async with server_process(
            tmp_path, "--site", str(site), "--no-watch", "--shutdown-timeout", "0.5"
        ) as server:
            host, port = server.url.removeprefix("http://").rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as sock:
                client = await h2_get(sock, f"{host}:{port}", b"/big.bin")
                if with_sse:
                    client.send_headers(
                        3,
                        [
                            (b":method", b"GET"), (b":scheme", b"http"),
                            (b":path", b"/__reload__"),
                            (b":authority", f"{host}:{port}".encode()),
                        ],
                        end_stream=True,
                    )  # fmt: skip
                    await sock.send_all(client.data_to_send())
                await read_initial_window(sock, client)  # (and no more window granted)
                server.process.send_signal(signal.SIGTERM)
                assert await server.process.wait() == 0  # (the watchdog's exit is 1)
            await server.stderr_done.wait()
            assert "shutdown did not finish within" not in server.stderr


#: Runs ``punie-trio serve`` (its entry point, as ``python -m punie_trio`` does) with a
#: SIGINT raised at one point of serve: "start", as the signal watcher starts (before its
#: receiver is in place: Python's handler, Trio's KeyboardInterrupt); "end", once the
#: watcher has ended (a SIGTERM's shutdown done, the store closed, serve returning);
#: "serving", while it serves (the watcher's: a graceful shutdown).
_SIGINT_AT = """
import signal, sys

# As in a terminal (a shell's background job, such as a test run, inherits it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
from punie_trio import _entry, server

where = sys.argv[1]
real_watch = server._watch_signals

async def watch(*args, **kwargs):
    if where == "start":
        signal.raise_signal(signal.SIGINT)
    try:
        await real_watch(*args, **kwargs)
    finally:
        if where == "end":
            signal.raise_signal(signal.SIGINT)

real_serve = server._serve

async def serve(config, store, stdio, closing, task_status):
    if where == "serving":
        signal.raise_signal(signal.SIGINT)
    elif where == "end":
        signal.raise_signal(signal.SIGTERM)  # (the shutdown that ends the watcher)
    await real_serve(config, store, stdio, closing, task_status)

server._watch_signals = watch
server._serve = serve
sys.exit(_entry.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("where", "status", "said"),
    [
        ("start", 130, "punie-trio: interrupted"),
        ("serving", 0, "received SIGINT, shutting down"),
        ("end", 130, "punie-trio: interrupted"),
    ],
)
async def test_a_ctrl_c_at_any_point_of_serve_ends_it_with_its_status_and_no_traceback(
    tmp_path: Path, where: str, status: int, said: str
) -> None:
    """A Ctrl-C that lands before serve watches its signals, or after it stopped watching
    them, is Python's ``KeyboardInterrupt``, raised in whatever task runs: inside serve's
    nurseries it came out wrapped in an exception group, which the CLI did not take for
    an interrupt: a traceback and status 1, not ``punie-trio: interrupted`` and 130. The
    store, opened or not, is left closed cleanly either way."""
    command = serve_command(tmp_path)
    data = tmp_path / "data"
    with trio.fail_after(30):
        done = await trio.run_process(
            [command[0], "-c", _SIGINT_AT, where, *command[3:]],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=server_env(),
        )
    stderr = done.stderr.decode()
    assert done.returncode == status, stderr
    assert said in stderr
    assert "Traceback" not in stderr
    if (data / "sessions.sqlite3").exists():
        assert not (data / "sessions.sqlite3-wal").exists()  # (closed: its WAL copied in)
        shown = await run_punie("sessions", "list", "--data-dir", str(data))
        assert shown.returncode == 0, shown.stderr
