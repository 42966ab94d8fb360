"""FastSendTCPServer: Hypercorn's socket write without a checkpoint when the kernel takes it.

Real sockets (a connected pair), so the fast path, the partial write and the full-buffer
fallback are the kernel's real behaviour, not a fake's.
"""

from __future__ import annotations

import socket
from typing import Any

import hypercorn.config
import hypercorn.trio.run
import pytest
import trio
import trio.testing
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.worker_context import WorkerContext

from punie_trio.web import _fast_send
from punie_trio.web._fast_send import FastSendTCPServer


class _Protocol:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def handle(self, event: Event) -> None:
        self.events.append(event)


def _server(sock: socket.socket) -> tuple[FastSendTCPServer, _Protocol]:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    config = hypercorn.config.Config()
    config.graceful_timeout = 3.0
    server = FastSendTCPServer(None, config, WorkerContext(None), {}, stream)  # type: ignore[arg-type]
    protocol = _Protocol()
    server.protocol = protocol  # type: ignore[assignment]
    return server, protocol


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


async def test_small_writes_go_out_without_a_checkpoint() -> None:
    a, b = _pair()
    server, protocol = _server(a)
    with b:
        with trio.testing.assert_no_checkpoints():
            for i in range(10):
                await server.protocol_send(RawData(data=b"frame %d;" % i))
        b.setblocking(False)
        assert b.recv(4096) == b"".join(b"frame %d;" % i for i in range(10))
    assert protocol.events == []
    await server.stream.aclose()


async def test_full_buffer_falls_back_and_keeps_byte_order() -> None:
    a, b = _pair()
    server, protocol = _server(a)
    chunks = [bytes([65 + i % 26]) * 3000 for i in range(200)]  # 600 kB >> the buffers
    received = bytearray()
    reader = trio.SocketStream(trio.socket.from_stdlib_socket(b))

    async def write_all() -> None:
        for chunk in chunks:
            await server.protocol_send(RawData(data=chunk))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_all)
        # The writer fills the kernel buffers and then waits in Hypercorn's own path.
        await trio.testing.wait_all_tasks_blocked()
        assert server.send_lock.locked()
        while len(received) < sum(map(len, chunks)):
            received += await reader.receive_some(65536)
    assert bytes(received) == b"".join(chunks)
    assert protocol.events == []
    await server.stream.aclose()
    await reader.aclose()


@pytest.mark.parametrize("coalesced", [False, True])
async def test_the_rest_of_a_write_now_goes_before_any_later_write(coalesced: bool) -> None:
    """``write_now`` with a full socket keeps the rest ahead of everything: another task's
    write (Hypercorn answering a ping from its reader) made before the rest is flushed
    lands after it, never inside the frame it cut; so does a coalesced block's."""
    a, b = _pair()
    server, protocol = _server(a)
    frame = bytes(range(256)) * 1000  # 256 kB >> the buffers
    pong = b"PONG"
    received = bytearray()
    reader = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    assert server.write_now(frame) is True  # the kernel took part: the rest is kept
    assert server.send_now(b"x") is None  # nothing may overtake it

    async def other_task() -> None:
        if coalesced:
            async with _fast_send.coalesced_writes():
                await server.protocol_send(RawData(data=pong))
        else:
            await server.protocol_send(RawData(data=pong))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(server.flush_gathered)  # the peer's writer, woken later
        while len(received) < len(frame) + len(pong):
            received += await reader.receive_some(65536)
    assert bytes(received) == frame + pong
    assert protocol.events == []
    await server.stream.aclose()
    await reader.aclose()


async def test_write_now_all_at_once_keeps_nothing() -> None:
    a, b = _pair()
    server, _ = _server(a)
    with b:
        assert server.write_now(b"small") is False
        assert not server._gathered
        b.setblocking(False)
        assert b.recv(100) == b"small"
    await server.stream.aclose()


class _CountingSocket:
    """A real socket's fd and ``recv``, counting the ``recv`` calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recvs = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        self.recvs += 1
        return self.sock.recv(size)


async def test_a_drained_socket_is_waited_on_before_it_is_read() -> None:
    """``_receive``: after a short read the next one waits first, so the ``recv`` that
    trio's ``receive_some`` would make and see fail (EAGAIN) is never made."""
    a, b = socket.socketpair()
    a.setblocking(False)
    counting = _CountingSocket(a)
    with a, b:
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def read() -> None:
                got.append(await _fast_send._receive(counting, drained=True))  # type: ignore[arg-type]

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert counting.recvs == 0  # waiting, not reading
            b.send(b"frame")
        assert got == [b"frame"] and counting.recvs == 1
        b.send(b"more")
        assert await _fast_send._receive(counting, drained=False) == b"more"  # reads at once
        b.close()
        assert await _fast_send._receive(counting, drained=True) == b""  # EOF


async def test_receive_on_a_closed_socket_raises_closed_resource_error() -> None:
    a, b = socket.socketpair()
    a.close()
    b.close()
    for drained in (True, False):
        with pytest.raises(trio.ClosedResourceError):
            await _fast_send._receive(a, drained=drained)


async def test_peer_gone_closes_the_socket_and_the_read_loop_reports_closed() -> None:
    """The writer does not tell the protocol itself: Hypercorn's WebSocket stream would then
    wait to hand the app its disconnect in a full channel that only the app's reader, itself
    waiting for this writer, empties (see ``_write_lost``). It closes the socket; the read
    loop, woken by that, reports ``Closed``."""
    a, b = _pair()
    server, protocol = _server(a)
    b.close()
    await server.protocol_send(RawData(data=b"x" * 100))
    await server.protocol_send(RawData(data=b"x" * 100))
    assert server.write_failed
    assert server.stream.socket.fileno() == -1
    assert protocol.events == []
    await server._read_data()
    assert len(protocol.events) == 1 and isinstance(protocol.events[0], Closed)


async def test_install_is_idempotent(monkeypatch: Any) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", hypercorn.trio.run.TCPServer)
    original = hypercorn.trio.run.TCPServer
    if original is FastSendTCPServer:  # an earlier test in this process served already
        original = FastSendTCPServer.__mro__[1]
        monkeypatch.setattr(hypercorn.trio.run, "TCPServer", original)
    assert _fast_send.install()
    assert _fast_send.install()
    assert hypercorn.trio.run.TCPServer is FastSendTCPServer


async def test_install_refuses_unknown_hypercorn(monkeypatch: Any) -> None:
    class Other:
        pass

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", Other)
    assert not _fast_send.install()
    assert hypercorn.trio.run.TCPServer is Other


async def test_coalesced_writes_leave_together_at_the_end_of_the_block() -> None:
    a, b = _pair()
    b.setblocking(False)
    server, protocol = _server(a)
    async with _fast_send.coalesced_writes():
        for i in range(5):
            await server.protocol_send(RawData(data=b"frame %d;" % i))
        with pytest.raises(BlockingIOError):  # nothing written yet
            b.recv(4096)
    assert b.recv(4096) == b"".join(b"frame %d;" % i for i in range(5))
    assert protocol.events == []
    await server.stream.aclose()
    b.close()


async def test_a_write_outside_the_block_goes_after_what_was_gathered() -> None:
    a, b = _pair()
    b.setblocking(False)
    server, _ = _server(a)
    gathered = trio.Event()
    done = trio.Event()

    async def coalescing_writer() -> None:
        async with _fast_send.coalesced_writes():
            await server.protocol_send(RawData(data=b"first;"))
            gathered.set()
            await done.wait()  # still inside the block when the other task writes

    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescing_writer)
        await gathered.wait()
        await server.protocol_send(RawData(data=b"second;"))  # e.g. Hypercorn's pong
        done.set()
    assert b.recv(4096) == b"first;second;"
    await server.stream.aclose()
    b.close()


async def test_a_cancelled_block_still_writes_what_it_gathered() -> None:
    a, b = _pair()
    b.setblocking(False)
    server, _ = _server(a)
    with trio.CancelScope() as scope:
        async with _fast_send.coalesced_writes():
            await server.protocol_send(RawData(data=b"sent;"))
            scope.cancel()
            await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert b.recv(4096) == b"sent;"
    await server.stream.aclose()
    b.close()


async def test_a_peer_that_stops_reading_is_dropped_once_the_server_terminates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without this, a write to a peer that never reads waits forever, shielded, and holds
    the server's shutdown past its timeout."""
    a, b = _pair()
    server, protocol = _server(a)
    blocked_at: list[float] = []

    async def flood() -> None:
        for _ in range(1000):  # far more than the socket buffers hold
            await server.protocol_send(RawData(data=b"x" * 4096))
            if server.write_failed:
                return

    with b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            assert server.send_lock.locked()  # stuck on the full socket
            await trio.sleep(60)  # not terminating: it keeps waiting, however long
            assert protocol.events == []
            blocked_at.append(trio.current_time())
            await server.context.terminated.set()
        # Dropped within the stall limit (plus one check interval); the read loop tells the
        # protocol.
        assert trio.current_time() - blocked_at[0] <= 1.0 + 2 * _fast_send.STALL_CHECK
        assert server.write_failed
        assert server.stream.socket.fileno() == -1
        await server._read_data()
        assert protocol.events and isinstance(protocol.events[0], Closed)


async def test_an_error_escaping_a_connection_ends_that_connection_only(
    monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Hypercorn lets some errors out of a connection's task: here an app whose accept
    fails after Hypercorn marked the stream connected (its clean-up then fails too). That
    once took the whole server down; now it closes that connection and is logged."""
    from . import _hypercorn

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", hypercorn.trio.run.TCPServer)
    _fast_send.install()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await _hypercorn.lifespan(scope, receive, send):
            return
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept", "subprotocol": "never-offered"})
            return
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with trio.fail_after(10):
        async with _hypercorn.serving(app) as address:
            async with await trio.open_tcp_stream(*address) as broken:
                await broken.send_all(upgrade)
                while await broken.receive_some(65536):
                    pass  # closed by the server
            async with await trio.open_tcp_stream(*address) as fine:
                await fine.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while not reply.endswith(b"ok"):
                    chunk = await fine.receive_some(65536)
                    assert chunk, reply
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
    assert "connection failed and was closed" in caplog.text


async def test_a_request_pipelined_behind_a_response_does_not_hold_the_shutdown(
    monkeypatch: Any,
) -> None:
    """A response that ends once the server is terminating, with a request pipelined behind
    it: Hypercorn closes the connection, but its h11 protocol, paused on the pipelined
    request, waited inside the read loop for a wake-up that never came, so the connection
    (and with it the shutdown) waited for ``graceful_timeout``. Measured against a live
    ``serve --site``: a download finishing during shutdown with a request pipelined behind
    it held the exit for the whole ``--shutdown-timeout`` (5.04 s; 0.86 s without)."""
    from . import _hypercorn

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", hypercorn.trio.run.TCPServer)
    _fast_send.install()
    requested = trio.Event()
    release = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await _hypercorn.lifespan(scope, receive, send):
            return
        requested.set()
        await release.wait()  # still answering when the server starts terminating
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    config.graceful_timeout = 3600.0  # (what the shutdown must not wait for)
    closing = trio.Event()
    served = trio.Event()

    async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn.trio.serve(
            app,  # type: ignore[arg-type]
            config,
            shutdown_trigger=closing.wait,
            task_status=task_status,
        )
        served.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve)
            host, port = binds[0].removeprefix("http://").rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as client:
                await client.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
                await requested.wait()
                closing.set()
                await trio.testing.wait_all_tasks_blocked()  # Hypercorn is terminating
                release.set()
                reply = b""
                while chunk := await client.receive_some(65536):
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok")
                for _ in range(8):  # (the connection's tasks end; then serve returns)
                    await trio.testing.wait_all_tasks_blocked()
                assert served.is_set()
            nursery.cancel_scope.cancel()  # (without the fix: rather than an hour)
