"""Direct WebSocket text frames: the same bytes Hypercorn's path sends, and the fallback.

A real Hypercorn (trio worker, port 0) with :class:`FastSendTCPServer`, and a client that is
wsproto over a real socket, so the frames and the negotiated extensions are the real ones.
"""

from __future__ import annotations

from typing import Any, cast

import h11
import hypercorn.config
import hypercorn.trio
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from punie_trio.web._asgi_ws import AsgiWebSocketStream
from punie_trio.web._direct import DirectChunks, DirectFrames, DirectReader, text_frame
from punie_trio.web._fast_send import FastSendTCPServer

from ..integration._support import settle_until
from ._hypercorn import lifespan, serving

MESSAGES = ["a", "é" * 200, '{"jsonrpc":"2.0"}', "x" * 70_000, ""]


class App:
    """Accepts, sends :data:`MESSAGES` (a batch, one by one, then written synchronously
    with ``send_messages_now``, its rest by ``finish_sending``), records the paths used."""

    def __init__(self) -> None:
        self.direct: list[bool] = []
        self.now: list[bool] = []
        self.done = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        stream = AsgiWebSocketStream(receive, send)
        self.direct.append(stream._direct_frames() is not None)
        await stream.send_messages(MESSAGES)
        for text in MESSAGES:
            await stream.send_message(text)
        pending = stream.send_messages_now(MESSAGES)
        self.now.append(pending is not None)
        if pending is None:
            await stream.send_messages(MESSAGES)
        elif pending:
            await stream.finish_sending()
        await stream.close()
        self.done.set()


async def receive_all(address: tuple[str, int], *, deflate: bool) -> tuple[list[str], bool]:
    """Connect with wsproto, read every text message until the close; return them and
    whether permessage-deflate was negotiated."""
    stream = await trio.open_tcp_stream(*address)
    ws = WSConnection(ConnectionType.CLIENT)
    extensions = [PerMessageDeflate()] if deflate else []
    await stream.send_all(ws.send(Request(host="x", target="/", extensions=extensions)))
    texts: list[str] = []
    partial = ""
    negotiated = False
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            assert data, "server closed without a close frame"
            ws.receive_data(data)
            event: Event
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    negotiated = bool(event.extensions)
                elif isinstance(event, TextMessage):
                    partial += event.data
                    if event.message_finished:
                        texts.append(partial)
                        partial = ""
                elif isinstance(event, CloseConnection):
                    return texts, negotiated


def test_text_frame_matches_wsproto() -> None:
    from wsproto.frame_protocol import FrameProtocol

    proto = FrameProtocol(client=False, extensions=[])
    for text in [*MESSAGES, "y" * 125, "y" * 126, "y" * 65_535, "y" * 65_536]:
        assert text_frame(text) == proto.send_data(text, fin=True)


@pytest.mark.parametrize("fast_send", [True, False])
async def test_frames_arrive_intact_and_in_order(
    fast_send: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stock Hypercorn explicitly: another test may have installed the writer process-wide.
    server_class = FastSendTCPServer if fast_send else hypercorn.trio.tcp_server.TCPServer
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", server_class)
    app = App()
    async with serving(app) as address:
        texts, negotiated = await receive_all(address, deflate=False)
        await app.done.wait()
    assert not negotiated
    assert texts == MESSAGES * 3
    # Direct only over punie-trio's socket writer; stock Hypercorn takes its own path.
    assert app.direct == app.now == [fast_send]


async def test_permessage_deflate_takes_hypercorns_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    app = App()
    async with serving(app) as address:
        texts, negotiated = await receive_all(address, deflate=True)
        await app.done.wait()
    assert negotiated
    assert texts == MESSAGES * 3
    assert app.direct == app.now == [False]


def test_find_refuses_anything_but_hypercorns_stream() -> None:
    async def send(message: Any) -> None:  # pragma: no cover - never called
        pass

    assert DirectFrames.find(send) is None
    assert DirectFrames.find(print) is None


# -- DirectChunks: a streamed HTTP/1.1 response -----------------------------------------------

CHUNKS = [b"data: one\n\n", b"x" * 70_000, b"", b"data: \xc3\xa9\n\n"]


class StreamApp:
    """Streams :data:`CHUNKS` (the first through Hypercorn, as the SSE stream does), then
    ends the response through Hypercorn; records whether the direct path was usable."""

    def __init__(self) -> None:
        self.usable: list[bool] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"opening\n", "more_body": True})
        direct = DirectChunks.find(send)
        usable = direct is not None and direct.usable()
        self.usable.append(usable)
        for chunk in CHUNKS:
            if direct is not None and usable:
                await direct.send_chunk(chunk)
            else:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"end", "more_body": False})


async def fetch(address: tuple[str, int], method: str, version: str) -> tuple[bytes, bool]:
    """The response body as an h11 client reads it, and whether the server kept the
    connection (it must stay usable for a next request after a chunked body)."""
    stream = await trio.open_tcp_stream(*address)
    request = f"{method} / HTTP/{version}\r\nHost: x\r\n\r\n".encode()
    await stream.send_all(request)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    body = b""
    async with stream:
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return body, client.their_state is h11.DONE


@pytest.mark.parametrize("fast_send", [True, False])
async def test_chunks_arrive_intact_and_the_connection_stays_usable(
    fast_send: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_class = FastSendTCPServer if fast_send else hypercorn.trio.tcp_server.TCPServer
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", server_class)
    app = StreamApp()
    async with serving(cast(App, app)) as address:
        body, kept = await fetch(address, "GET", "1.1")
    assert body == b"opening\n" + b"".join(CHUNKS) + b"end"
    assert kept
    assert app.usable == [fast_send]


@pytest.mark.parametrize(("method", "version"), [("HEAD", "1.1"), ("GET", "1.0")])
async def test_no_direct_chunks_without_chunked_framing(
    method: str, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEAD has no body, and an HTTP/1.0 response is delimited by the close, not chunked."""
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    app = StreamApp()
    async with serving(cast(App, app)) as address:
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(f"{method} / HTTP/{version}\r\nHost: x\r\n\r\n".encode())
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
                if method == "HEAD" and b"\r\n\r\n" in received:
                    break
    assert app.usable == [False]
    if method == "GET":
        assert received.endswith(b"opening\n" + b"".join(CHUNKS) + b"end")


# -- DirectReader: a client's frames read past wsproto ----------------------------------------


class _Passes:
    """A task that counts the scheduler passes it gets (one each: it only checkpoints)."""

    count = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await trio.lowlevel.checkpoint()


class ReadingApp:
    """Accepts, records every message the stream receives (and whether the direct reader
    was installed and active at the end), until the client leaves."""

    def __init__(self, gate: trio.Event | None = None, stamp: Any = None) -> None:
        self.received: list[str | bytes] = []
        #: ``stamp()`` when each message was received (if ``stamp`` is given).
        self.stamp = stamp
        self.stamps: list[int] = []
        self.got_end = trio.Event()  # set when the message "end" arrives
        self.reader_active: list[bool] = []
        self.done = trio.Event()
        self.gate = gate  # if given, the stream (and its reader) is made once it is set
        self.server: Any = None
        self.reader: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        if self.gate is not None:
            await self.gate.wait()
        stream = AsgiWebSocketStream(receive, send)
        self.server = stream._direct.server if stream._direct is not None else None
        reader = getattr(self.server, "frame_reader", None)
        self.reader = reader
        try:
            while True:
                message = await stream.receive_message()
                self.received.append(message)
                if self.stamp is not None:
                    self.stamps.append(self.stamp())
                if message == "end":
                    self.got_end.set()
        except trio.EndOfChannel:
            pass
        finally:
            self.reader_active.append(isinstance(reader, DirectReader) and reader.active)
            await stream.close()
            self.done.set()


async def talk(
    address: tuple[str, int], frames: list[bytes], *, early: bytes = b""
) -> tuple[list[Event], int | None]:
    """Upgrade with wsproto (``early`` bytes right behind the request, before the 101),
    send ``frames`` (raw client frames) once accepted, then a close; return what the server
    sent and the close code it sent (None if it sent none)."""
    stream = await trio.open_tcp_stream(*address)
    ws = WSConnection(ConnectionType.CLIENT)
    events: list[Event] = []
    async with stream:
        await stream.send_all(ws.send(Request(host="x", target="/")) + early)
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return events, None
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    await stream.send_all(b"".join(frames))
                    await stream.send_all(ws.send(CloseConnection(1000)))
                elif isinstance(event, CloseConnection):
                    return events, event.code
                else:
                    events.append(event)


def client_frames() -> Any:
    from wsproto.frame_protocol import FrameProtocol

    return FrameProtocol(client=True, extensions=[])


async def test_client_frames_read_past_wsproto(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages, a binary frame, a ping between them (answered), a fragmented message (which
    wsproto reassembles): all arrive in order, and the direct reader stayed active."""
    from wsproto.events import Pong

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    proto = client_frames()
    frames = [
        proto.send_data("one", fin=True),
        proto.send_data(b'{"bin":1}', fin=True),
        proto.ping(b"hb"),
        proto.send_data("frag", fin=False),
        proto.send_data("mented", fin=True),
        proto.send_data("é" * 40_000, fin=True),
        proto.send_data("last", fin=True),
    ]
    app = ReadingApp()
    async with serving(app) as address:
        events, code = await talk(address, frames)
        await app.done.wait()
    assert app.received == ["one", b'{"bin":1}', "fragmented", "é" * 40_000, "last"]
    assert app.reader_active == [True]
    assert any(isinstance(e, Pong) and e.payload == b"hb" for e in events)
    assert code == 1000


async def test_the_reader_takes_over_only_at_a_frame_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes wsproto already holds when the reader is installed (here: the start of a
    frame) stay wsproto's; the reader takes over once wsproto holds nothing."""
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    proto = client_frames()
    split = proto.send_data("split " * 100, fin=True)
    later = proto.send_data("later", fin=True)
    gate = trio.Event()
    app = ReadingApp(gate)
    async with serving(app) as address:
        stream = await trio.open_tcp_stream(*address)
        ws = WSConnection(ConnectionType.CLIENT)
        async with stream:
            await stream.send_all(ws.send(Request(host="x", target="/")))
            while not any(isinstance(e, AcceptConnection) for e in ws.events()):
                ws.receive_data(await stream.receive_some(65536))
            await stream.send_all(split[:50])
            await trio.testing.wait_all_tasks_blocked()  # wsproto has the first 50 bytes
            gate.set()  # the reader is installed now, in the middle of a frame
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(split[50:])
            await trio.testing.wait_all_tasks_blocked()
            assert not app.reader.active  # wsproto finished that frame itself
            await stream.send_all(later)
            await trio.testing.wait_all_tasks_blocked()
            assert app.reader.active and app.server.frame_reader is app.reader
            await stream.send_all(ws.send(CloseConnection(1000)))
            await app.done.wait()
    assert app.received == ["split " * 100, "later"]


@pytest.mark.parametrize("server", ["fast_send", "stock", "refusals"])
@pytest.mark.parametrize(
    ("first_byte", "masked", "payload", "code"),
    # Stock Hypercorn answers a protocol error by dropping the connection (wsproto reports
    # 1002 or 1007, but Hypercorn sends no close frame); punie-trio's reader sends the close
    # frame first, and what still reaches wsproto is answered by web/_ws_refusals.py. A
    # message over the bound is closed with 1009 either way.
    [
        (0x81, True, b"\xff\xfe not utf-8", 1007),
        (0x81, False, b"unmasked", 1002),
        (0xC1, True, b"reserved bit", 1002),
        (0x81, True, b"x" * 2000, 1009),
    ],
)
async def test_bad_frames_fail_the_connection_with_a_close_frame(
    first_byte: int,
    masked: bool,
    payload: bytes,
    code: int,
    server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hypercorn.protocol import ws_stream
    from wsproto.connection import Connection

    from punie_trio.web._ws_refusals import _Connection

    fast_send = server == "fast_send"
    server_class = FastSendTCPServer if fast_send else hypercorn.trio.tcp_server.TCPServer
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", server_class)
    # (Set either way: a server started earlier in this process installed the patch.)
    connection = _Connection if server == "refusals" else Connection
    monkeypatch.setattr(ws_stream, "Connection", connection)
    from punie_trio.web._frames import unmask

    mask = b"\x01\x02\x03\x04" if masked else b""
    n = len(payload)
    flag = 0x80 if masked else 0
    header = (
        bytes((first_byte, flag | 126)) + n.to_bytes(2, "big")
        if n > 125
        else bytes((first_byte, flag | n))
    )
    bad = header + mask + (unmask(payload, mask) if masked else payload)
    app = ReadingApp()
    async with serving(app, websocket_max_message_size=1000) as address:
        _, got = await talk(address, [client_frames().send_data("fine", fin=True), bad])
        await app.done.wait()
    assert app.received == ["fine"]
    assert got == (None if server == "stock" and code != 1009 else code)


async def test_a_send_after_the_connection_was_lost_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the client reset the connection, Hypercorn drops every send without a word,
    and the app's ``receive`` hears of it only later. A prompt's answer sent in between
    was taken as delivered: a client re-attaching within grace never got it."""
    import socket
    import struct

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    go, done = trio.Event(), trio.Event()
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        stream = seen["stream"] = AsgiWebSocketStream(receive, send)
        await go.wait()
        try:
            await stream.send_message("after the reset")
            seen["raised"] = False
        except trio.BrokenResourceError:
            seen["raised"] = True
        seen["disconnected"] = stream.disconnected
        done.set()

    with trio.fail_after(10):
        async with serving(app) as address:
            tcp = await trio.open_tcp_stream(*address)
            ws = WSConnection(ConnectionType.CLIENT)
            await tcp.send_all(ws.send(Request(host="x", target="/")))
            while not any(isinstance(e, AcceptConnection) for e in ws.events()):
                ws.receive_data(await tcp.receive_some(65536))
            linger = struct.pack("ii", 1, 0)  # close with a reset (RST), not a FIN
            tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            await tcp.aclose()
            # Until Hypercorn has seen the reset (it closes the stream at once):
            await settle_until(lambda: "stream" in seen and seen["stream"]._direct.stream.closed)
            go.set()
            await done.wait()
    assert seen == {"stream": seen["stream"], "raised": True, "disconnected": False}


# -- Floods of tiny frames: one pong per read, and the reader lets other tasks run ---------


async def open_raw(address: tuple[str, int]) -> trio.SocketStream:
    """A TCP connection upgraded to a WebSocket (the server's 101 read, nothing after it)."""
    stream = await trio.open_tcp_stream(*address)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="x", target="/")))
    while not any(isinstance(e, AcceptConnection) for e in ws.events()):
        ws.receive_data(await stream.receive_some(65536))
    return stream


async def read_server_frames(stream: trio.SocketStream) -> list[tuple[int, bytes]]:
    """Every frame (opcode, payload) the server sends until it closes the connection."""
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    frames = []
    pos = 0
    while pos < len(data):
        assert data[pos + 1] < 126  # the server sends only short frames here, unmasked
        end = pos + 2 + data[pos + 1]
        frames.append((data[pos] & 0x0F, data[pos + 2 : end]))
        pos = end
    assert pos == len(data)
    return frames


FLOOD = 2000


def flood(kind: str) -> tuple[bytes, list[str | bytes]]:
    """``start``, then 2,000 pings or a message in 2,000 fragments (a ping after every
    100th), then ``end``, as a client masks them; and the messages the app should get."""
    proto = client_frames()
    if kind == "pings":
        middle = b"".join(proto.ping(b"%d" % i) for i in range(FLOOD))
        expected: list[str | bytes] = ["start", "end"]
    else:
        parts = []
        for i in range(FLOOD):
            parts.append(proto.send_data("x", fin=i == FLOOD - 1))
            if i % 100 == 99:
                parts.append(proto.ping(b"%d" % i))
        middle = b"".join(parts)
        expected = ["start", "x" * FLOOD, "end"]
    start, end = proto.send_data("start", fin=True), proto.send_data("end", fin=True)
    return start + middle + end, expected


@pytest.mark.parametrize("kind", ["pings", "fragments"])
async def test_a_flood_of_tiny_frames_yields_to_other_tasks_and_gets_one_pong(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read of thousands of tiny frames (pings, or one message's fragments with pings
    between) is decoded a bounded step at a time: another task runs between the steps (a
    probe counts its passes: it runs once per scheduler pass). Before, the whole read was
    handled in one pass (each ping answered through wsproto and Hypercorn, with its own
    write), and an audit's other clients waited up to a second. The pings read together
    get one pong, to the last of them, payload exact."""
    from punie_trio.web._frames import FRAMES_PER_STEP

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    passes = _Passes()

    data, expected = flood(kind)
    app = ReadingApp(stamp=lambda: passes.count)
    with trio.fail_after(10):
        async with serving(app) as address:
            stream = await open_raw(address)
            async with stream:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(passes.run)
                    # One write: on loopback the kernel has it all before the server's next
                    # read (up to 64 KiB), so the server reads the whole flood at once.
                    await stream.send_all(data)
                    await app.got_end.wait()
                    nursery.cancel_scope.cancel()
                await stream.send_all(client_frames().close(1000))
                sent = await read_server_frames(stream)
            await app.done.wait()
    assert app.received == expected
    steps = (FLOOD + FLOOD // 100 + 2) // FRAMES_PER_STEP
    assert app.stamps[-1] - app.stamps[0] >= steps - 2, app.stamps
    assert sent == [(0xA, b"%d" % (FLOOD - 1)), (0x8, (1000).to_bytes(2, "big"))]


def test_pings_in_a_row_reach_hypercorn_as_one_ping_the_last() -> None:
    """Where wsproto reads (a compressed WebSocket), Hypercorn answers every Ping event
    with a pong: punie-trio's wsproto connection hands it only the last of a run."""
    from wsproto.connection import Connection
    from wsproto.events import Ping, TextMessage

    from punie_trio.web._ws_refusals import _Connection

    proto = client_frames()
    data = (
        b"".join(proto.ping(b"%d" % i) for i in range(100))
        + proto.send_data("between", fin=True)
        + proto.ping(b"a")
        + proto.ping(b"\x00b\xff")
    )
    events = []
    for connection_class in (Connection, _Connection):
        connection = connection_class(ConnectionType.SERVER)
        connection.receive_data(data)
        events.append(list(connection.events()))
    assert len(events[0]) == 103  # wsproto alone: every ping
    assert events[1] == [
        Ping(payload=b"99"),
        TextMessage(data="between", frame_finished=True, message_finished=True),
        Ping(payload=b"\x00b\xff"),
    ]


async def test_hypercorns_read_path_yields_between_pieces_of_a_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With permessage-deflate the direct reader is off and Hypercorn reads every frame
    (wsproto): the socket reader hands it a read 4 KiB at a time, a checkpoint between,
    and the pings of each piece get one pong, to the last."""
    from hypercorn.protocol import ws_stream

    from punie_trio.web._fast_send import HANDLE_STEP
    from punie_trio.web._ws_refusals import _Connection

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    monkeypatch.setattr(ws_stream, "Connection", _Connection)
    passes = _Passes()

    data, expected = flood("pings")
    app = ReadingApp(stamp=lambda: passes.count)
    with trio.fail_after(10):
        async with serving(app) as address:
            stream = await trio.open_tcp_stream(*address)
            ws = WSConnection(ConnectionType.CLIENT)
            request = Request(host="x", target="/", extensions=[PerMessageDeflate()])
            await stream.send_all(ws.send(request))
            accepted: list[Event] = []
            while not accepted:
                ws.receive_data(await stream.receive_some(65536))
                accepted = [e for e in ws.events() if isinstance(e, AcceptConnection)]
            assert isinstance(accepted[0], AcceptConnection) and accepted[0].extensions
            async with stream:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(passes.run)
                    await stream.send_all(data)  # one read (see the test above)
                    await app.got_end.wait()
                    nursery.cancel_scope.cancel()
                await stream.send_all(client_frames().close(1000))
                sent = await read_server_frames(stream)
            await app.done.wait()
    assert app.received == expected and app.reader_active == [False]
    pieces = -(-len(data) // HANDLE_STEP)
    assert app.stamps[-1] - app.stamps[0] >= pieces - 2, app.stamps
    pongs = [payload for opcode, payload in sent if opcode == 0xA]
    assert 1 <= len(pongs) <= pieces and pongs[-1] == b"%d" % (FLOOD - 1)
    assert sent[len(pongs) :] == [(0x8, (1000).to_bytes(2, "big"))]


async def test_a_whole_frame_inside_a_fragmented_message_fails_the_connection_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A text frame that starts a new message while a fragmented one is open is a protocol
    error (1002), after which nothing more may be processed (RFC 6455 7.1.7). The frame
    reader joins fragments itself, so wsproto, handed the bad bytes, never knew a message
    was open: it took the frame for a message, the app got it, and the connection stayed
    until the app's close timeout (a review)."""
    from .test_frames import masked_frame

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)
    app = ReadingApp()
    with trio.fail_after(10):
        async with serving(app) as address:
            stream = await open_raw(address)
            async with stream:
                # "start" whole, then half a message, then a whole one inside it.
                await stream.send_all(
                    masked_frame(0x81, b"start")
                    + masked_frame(0x01, b"half of")
                    + masked_frame(0x81, b"smuggled")
                )
                sent = await read_server_frames(stream)  # to the server's end of it
            await app.done.wait()
    assert app.received == ["start"]
    assert [opcode for opcode, _ in sent] == [0x8]
    assert int.from_bytes(sent[0][1][:2], "big") == 1002
