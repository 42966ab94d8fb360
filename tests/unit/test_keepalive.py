"""KeepAliveTimer: Hypercorn's keep-alive behaviour without a task start per request.

A real Hypercorn (trio worker, port 0) with :class:`FastSendTCPServer`, real sockets, and
Trio's autojump clock, so "five seconds idle" is exact and instant.
"""

from __future__ import annotations

import math
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import hypercorn.config
import hypercorn.trio
import hypercorn.trio.run
import pytest
import trio
import trio.testing
from hypercorn.trio.worker_context import WorkerContext

from punie_trio.web import _h2_idle as h2_idle
from punie_trio.web import _h2_requests as h2_requests
from punie_trio.web._fast_send import FastSendTCPServer
from punie_trio.web._keepalive import KeepAliveTimer

from . import _hypercorn
from ._hypercorn import lifespan

KEEP_ALIVE = 5.0


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Close the test's client sockets (they were left to the garbage collector)."""
    yield
    while Client.opened:
        await Client.opened.pop().stream.aclose()


@pytest.fixture(autouse=True)
def _fast_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    h2_idle.install()  # (as the server does)
    h2_requests.install()


class App:
    """``/fast`` answers at once; ``/slow`` once :attr:`release` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.slow_started = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        if scope["path"] == "/slow":
            self.slow_started.set()
            await self.release.wait()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})


def serving(app: Any, closing: trio.Event) -> AbstractAsyncContextManager[tuple[str, int]]:
    return _hypercorn.serving(app, closing, keep_alive_timeout=KEEP_ALIVE, graceful_timeout=60)


class Client:
    #: Every client a test opened, closed after it (``_close_clients``).
    opened: list[Client] = []

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> Client:
        client = cls(await trio.open_tcp_stream(*address))
        cls.opened.append(client)
        return client

    async def send(self, path: str) -> None:
        await self.stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    async def response(self) -> bytes:
        """Read one response (the test app's bodies are ``ok``)."""
        while b"\r\n\r\nok" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            assert chunk, f"connection closed mid-response: {self.buffer!r}"
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\nok")
        return head

    async def get(self, path: str) -> bytes:
        await self.send(path)
        return await self.response()

    async def closed_after(self) -> float:
        """Seconds (Trio's clock) until the server closes the connection."""
        start = trio.current_time()
        assert await self.stream.receive_some(65536) == b""
        return trio.current_time() - start


async def test_an_idle_connection_closes_after_the_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(App(), trio.Event()) as address:
        client = await Client.connect(address)
        assert (await client.get("/fast")).startswith(b"HTTP/1.1 200")
        assert await client.closed_after() == pytest.approx(KEEP_ALIVE, abs=0.01)


async def test_each_request_starts_the_countdown_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(App(), trio.Event()) as address:
        client = await Client.connect(address)
        for _ in range(5):
            await client.get("/fast")
            await trio.sleep(KEEP_ALIVE * 0.8)  # 20 s in all: more than the timeout
        assert await client.closed_after() == pytest.approx(KEEP_ALIVE * 0.2, abs=0.01)


async def test_a_running_request_is_never_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = App()
    async with serving(app, trio.Event()) as address:
        client = await Client.connect(address)
        await client.get("/fast")
        await client.send("/slow")
        await app.slow_started.wait()
        await trio.sleep(KEEP_ALIVE * 10)
        app.release.set()
        assert (await client.response()).startswith(b"HTTP/1.1 200")
        assert await client.closed_after() == pytest.approx(KEEP_ALIVE, abs=0.01)


async def test_shutdown_closes_idle_connections_at_once_and_busy_ones_when_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = App()
    closing = trio.Event()
    async with serving(app, closing) as address:
        idle, busy = await Client.connect(address), await Client.connect(address)
        await idle.get("/fast")
        await busy.send("/slow")
        await app.slow_started.wait()
        closing.set()
        assert await idle.closed_after() < 0.01
        await trio.sleep(1)
        app.release.set()
        assert (await busy.response()).startswith(b"HTTP/1.1 200")
        assert await busy.closed_after() < 0.01


def _all_tasks() -> Iterator[trio.lowlevel.Task]:
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        assert task is not None
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


async def test_a_connection_the_client_closes_leaves_no_task_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(App(), trio.Event()) as address:
        await trio.testing.wait_all_tasks_blocked()
        before = sum(1 for _ in _all_tasks())
        client = await Client.connect(address)
        await client.get("/fast")
        assert sum(1 for _ in _all_tasks()) > before
        # From here the clock stands still: the connection's tasks must end because it
        # closed, not because its keep-alive timeout ran out.
        autojump_clock.autojump_threshold = math.inf
        start = trio.current_time()
        await client.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert sum(1 for _ in _all_tasks()) == before
        assert trio.current_time() == start
        autojump_clock.autojump_threshold = 0


async def test_a_websocket_retires_the_watcher_and_keeps_no_task_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After the upgrade the connection never idles again: the watcher task ends (memory
    per idle WebSocket), and the WebSocket is not closed by a keep-alive timeout."""
    from punie_trio.web._asgi_ws import AsgiWebSocketStream

    watchers: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        stream = AsgiWebSocketStream(receive, send)
        await trio.testing.wait_all_tasks_blocked()
        watchers.append(sum(1 for t in _all_tasks() if t.name.endswith("KeepAliveTimer._watch")))
        await trio.sleep(KEEP_ALIVE * 10)
        await stream.send_message("still open")
        await stream.close()

    async with serving(cast(App, app), trio.Event()) as address:
        client = await Client.connect(address)
        await client.stream.send_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        received = b""
        while b"still open" not in received:
            chunk = await client.stream.receive_some(65536)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 101")
    assert watchers == [0]


async def test_a_retired_watcher_replaced_at_once_leaves_one_watcher(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """retire() then restart() before the old watcher ran: the old one ends, the new one
    times the connection out (once)."""
    closes: list[float] = []

    class Connection:
        config = hypercorn.config.Config()
        context = WorkerContext(None)

        async def _initiate_server_close(self) -> None:
            closes.append(trio.current_time())

    Connection.config.keep_alive_timeout = KEEP_ALIVE
    timer = KeepAliveTimer(Connection())
    async with trio.open_nursery() as nursery:
        group = types.SimpleNamespace(_nursery=nursery)
        await timer.restart(group, _never_called)
        await trio.testing.wait_all_tasks_blocked()
        timer.retire()
        await timer.restart(group, _never_called)  # before the retired watcher has run
        await trio.testing.wait_all_tasks_blocked()
        assert sum(1 for t in _all_tasks() if t.name.endswith("KeepAliveTimer._watch")) == 1
    assert closes == [KEEP_ALIVE]


async def _never_called() -> None:  # pragma: no cover
    raise AssertionError("the timer reproduces Hypercorn's action, it does not call it")


async def _open_http2(address: tuple[str, int]) -> Client:
    """A connection that speaks HTTP/2 with prior knowledge (its preface and SETTINGS) and
    has sent no request."""
    import h2.config
    import h2.connection

    client = await Client.connect(address)
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    await client.stream.send_all(h2c.data_to_send())
    return client


async def _ends_idle(client: Client, end: str, closing: trio.Event) -> None:
    """``client``'s connection is idle: the keep-alive timeout closes it on time, or a
    shutdown (``closing``) at once."""
    if end == "keep-alive":
        assert await _closed_after_reading(client) == pytest.approx(KEEP_ALIVE, abs=0.01)
    else:
        await trio.sleep(1)
        closing.set()
        assert await _closed_after_reading(client) < 0.01


async def _closed_after_reading(client: Client) -> float:
    """Seconds (Trio's clock) until the server closes the connection, reading (and dropping)
    what it sends first (an HTTP/2 server's SETTINGS)."""
    start = trio.current_time()
    while await client.stream.receive_some(65536):
        pass
    return trio.current_time() - start


@pytest.mark.parametrize("end", ["keep-alive", "shutdown"])
async def test_an_http2_connection_without_a_request_is_idle(
    autojump_clock: trio.testing.MockClock, end: str
) -> None:
    """Hypercorn's h11 protocol says "busy" when it reads the HTTP/2 preface (as for any
    request), then hands the connection to its h2 protocol, which says "idle" only when a
    stream ends. A connection that never sent a request was therefore never idle: the
    keep-alive timeout never closed it, and at shutdown it held the server for the whole
    graceful timeout (a live ``serve --shutdown-timeout 5``: exit after 5.02 s, 0.02 s
    without it)."""
    closing = trio.Event()
    with trio.fail_after(KEEP_ALIVE * 4):  # (Trio's clock: without the fix, it waited for good)
        async with serving(App(), closing) as address:
            client = await _open_http2(address)
            await _ends_idle(client, end, closing)


@pytest.mark.parametrize("end", ["keep-alive", "shutdown"])
async def test_an_http2_connection_whose_request_was_refused_is_idle(
    autojump_clock: trio.testing.MockClock, end: str
) -> None:
    """A request ``_h2_requests`` answers 400 itself (a non-ASCII ``:path``) opens no
    stream, and Hypercorn says "busy" after every request it reads (the keep-alive timer
    stops), and "idle" only when a stream ends: a connection whose last request was
    refused was never idle again. The keep-alive timeout never closed it (one bad request
    held a connection open for good), and at shutdown it held the server for the whole
    graceful timeout."""
    import h2.config
    import h2.connection

    closing = trio.Event()
    with trio.fail_after(KEEP_ALIVE * 4):  # (Trio's clock: without the fix, it waited for good)
        async with serving(App(), closing) as address:
            client = await Client.connect(address)
            h2c = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding=None)
            )
            h2c.initiate_connection()
            h2c.send_headers(
                1,
                [
                    (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/\xc3\xbcber"),
                    (b":authority", b"x"),
                ],
                end_stream=True,
            )  # fmt: skip
            await client.stream.send_all(h2c.data_to_send())
            await _ends_idle(client, end, closing)
