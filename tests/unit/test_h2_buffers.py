"""HTTP/2 flow control holds a response back: a client that grants no window makes the
app wait, not the server buffer the whole response.

A real Hypercorn (trio worker, port 0) and a real HTTP/2 client (prior knowledge) that
reads the initial window and grants nothing more."""

from __future__ import annotations

from typing import Any

import h2.events
import pytest
import trio
import trio.testing

from punie_trio.web import _h2_buffers as h2_buffers

from . import _hypercorn
from ._hypercorn import h2_get, read_initial_window

BODY_PIECE = 64 * 1024
PIECES = 160  # 10 MiB


async def test_a_client_that_grants_no_window_holds_the_response_back() -> None:
    """Hypercorn's stream buffer let its producer go on whenever its sender took less than
    a frame, and with the window closed it takes nothing at all: every send of the app
    returned at once, and the whole response piled up in memory (a live ``serve --site``:
    a 200 MB file over HTTP/2 to such a client, +192 MB of RSS in 8 s, for one stream)."""
    h2_buffers.install()
    sent = 0
    blocked = trio.Event()
    sending = trio.CancelScope()  # (ended by the test: the client never reads the rest)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal sent
        if await _hypercorn.lifespan(scope, receive, send):
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        with sending:
            for _ in range(PIECES):
                piece = {"type": "http.response.body", "body": b"z" * BODY_PIECE, "more_body": True}
                await send(piece)
                sent += BODY_PIECE
            blocked.set()

    with trio.fail_after(10):
        async with _hypercorn.serving(app) as (host, port):  # noqa: SIM117 (needs the port)
            async with await trio.open_tcp_stream(host, port) as sock:
                client = await h2_get(sock, f"{host}:{port}")
                await read_initial_window(sock, client)
                for _ in range(10):
                    await trio.testing.wait_all_tasks_blocked()
                # What the window let out, one piece waiting in Hypercorn's buffer, and the
                # app's send waiting for room: not the other 9.8 MiB.
                assert sent <= 65535 + 2 * BODY_PIECE
                assert not blocked.is_set()
                sending.cancel()


async def test_a_slow_client_reading_steadily_gets_a_whole_final_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The send that ends a response (``_fast_send.final_send``: shielded, bounded) over
    HTTP/2 waits until the client has read the whole body it carries. Bounded by 5 s in
    all, it was cut for a client that read steadily, only slowly (here 1 MiB at 64 KiB a
    second): the app returned before the end of the body was queued, and the stream never
    ended. The bound counts from the client's last progress: only one that stops reading
    is cut (and any once the server shuts down)."""
    from punie_trio.web._http import respond

    h2_buffers.install()
    body = bytes(range(256)) * (4 * 1024)  # 1 MiB
    window = 65535

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await _hypercorn.lifespan(scope, receive, send):
            return
        await respond(send, 200, body, b"application/octet-stream")

    with trio.fail_after(120):
        async with _hypercorn.serving(app) as (host, port):  # noqa: SIM117 (needs the port)
            async with await trio.open_tcp_stream(host, port) as sock:
                client = await h2_get(sock, f"{host}:{port}")
                received = bytearray()
                unacknowledged = 0
                ended = False
                while not ended:
                    try:
                        data = await sock.receive_some(65536)
                    except trio.BrokenResourceError:
                        data = b""
                    assert data, (
                        f"the connection ended after {trio.current_time():.1f} s, with "
                        f"{len(received)} bytes of {len(body)} read"
                    )
                    for event in client.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            received += event.data
                            unacknowledged += event.flow_controlled_length
                        elif isinstance(event, h2.events.StreamEnded):
                            ended = True
                    if unacknowledged >= window and not ended:
                        await trio.sleep(1)  # a window's worth a second
                        client.increment_flow_control_window(unacknowledged)
                        client.increment_flow_control_window(unacknowledged, stream_id=1)
                        unacknowledged = 0
                    await sock.send_all(client.data_to_send())
                assert bytes(received) == body
                assert trio.current_time() > 10  # (slowly indeed)


async def test_a_final_send_to_a_client_that_stops_reading_ends_its_bound_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The other side of the bound from the last progress: a client that stops granting
    window holds the final send (and the app's task) for ``FINAL_SEND_TIMEOUT`` after the
    last data it took, not for good."""
    from punie_trio.web._fast_send import FINAL_SEND_TIMEOUT
    from punie_trio.web._http import respond

    h2_buffers.install()
    body = b"z" * (1024 * 1024)
    returned: list[float] = []
    done = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await _hypercorn.lifespan(scope, receive, send):
            return
        await respond(send, 200, body, b"application/octet-stream")
        returned.append(trio.current_time())
        done.set()

    async with _hypercorn.serving(app) as (host, port):  # noqa: SIM117 (needs the port)
        async with await trio.open_tcp_stream(host, port) as sock:
            client = await h2_get(sock, f"{host}:{port}")
            await read_initial_window(sock, client)
            last_progress = trio.current_time()
            with trio.fail_after(FINAL_SEND_TIMEOUT * 4):
                await done.wait()
            assert returned[0] - last_progress == pytest.approx(FINAL_SEND_TIMEOUT, abs=0.01)
