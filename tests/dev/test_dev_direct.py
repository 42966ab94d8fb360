"""A broadcast writes to parked SSE streams itself, and leaves a partial chunk to the writer.

A real Hypercorn (trio worker, port 0) with punie-trio's socket writer, the dev app, and raw
socket clients parsed with h11, so the chunked framing on the wire is checked for real.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from pathlib import Path
from typing import Any

import h11
import hypercorn.trio.run
import pytest
import trio
import trio.testing
from devsupport import serve_app

from punie_trio.web._fast_send import FastSendTCPServer
from punie_trio.web.dev import DevApp


@pytest.fixture(autouse=True)
def _fast_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)


class RawSSE:
    """An SSE client on a raw socket: h11 for the HTTP framing, then ``id:``/``data:``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)
        self.text = ""

    @classmethod
    async def open(cls, url: str, *, rcvbuf: int | None = None) -> RawSSE:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, int(port)))
        client = cls(trio.SocketStream(sock))
        request = h11.Request(method="GET", target="/__reload__", headers=[("Host", host)])
        await client.stream.send_all(
            client.http.send(request) + client.http.send(h11.EndOfMessage())
        )
        await client.read_until(": punie-trio live reload")
        return client

    async def read_until(self, needle: str) -> None:
        while needle not in self.text:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                self.text += bytes(event.data).decode()
            else:
                assert isinstance(event, h11.Response), event

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for block in self.text.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "id" in fields and fields.get("event") == "reload":
                out.append((int(fields["id"].rpartition(".")[2]), json.loads(fields["data"])))
        return out


def _dev(tmp_path: Path) -> DevApp:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html><body>x</body></html>")
    return DevApp(site_dir=site, project_root=tmp_path, closing=trio.Event(), no_watch=True)


async def test_a_broadcast_writes_to_parked_streams_without_waking_them(tmp_path: Path) -> None:
    dev = _dev(tmp_path)
    async with serve_app(dev, dev.closing) as url, contextlib.AsyncExitStack() as stack:
        clients = [await RawSSE.open(url) for _ in range(3)]
        for client in clients:
            stack.push_async_callback(client.stream.aclose)
        await trio.testing.wait_all_tasks_blocked()
        subscribers = list(dev.broadcaster._subscribers)
        assert len(subscribers) == 3
        dev.broadcaster.publish_reload("reload", ("index.html",))
        # Written by the offer itself: every writer is still parked, nothing is pending.
        assert all(s._waiter is not None and not s.pending for s in subscribers)
        for client in clients:
            await client.read_until(f"\n\nid: {dev.broadcaster.run}.1\n")
            await client.read_until('"generation":1}\n\n')
            assert client.events() == [
                (1, {"action": "reload", "paths": ["index.html"], "generation": 1})
            ]


async def test_a_partial_write_is_finished_by_the_writer_in_order(tmp_path: Path) -> None:
    dev = _dev(tmp_path)
    async with serve_app(dev, dev.closing) as url, contextlib.AsyncExitStack() as stack:
        client = await RawSSE.open(url, rcvbuf=4096)  # a client that is slow to read
        stack.push_async_callback(client.stream.aclose)
        await trio.testing.wait_all_tasks_blocked()
        (subscriber,) = dev.broadcaster._subscribers
        paths = tuple(f"page-{i:03d}-{'x' * 80}.html" for i in range(150))
        partial = False
        for _ in range(2000):  # ~20 KB each: the kernel's buffers fill long before
            dev.broadcaster.publish_reload("reload", paths)
            if subscriber._unfinished:
                partial = True
                break
        assert partial, "the socket never filled"
        for _ in range(3):  # queued behind the partial chunk, merged
            dev.broadcaster.publish_reload("reload", paths)
        last = dev.broadcaster.generation
        await client.read_until(f'"generation":{last}}}\n\n')
        ids = [event_id for event_id, _ in client.events()]
        assert ids == sorted(ids) and ids[-1] == last
        assert all(data["paths"] == list(paths) for _, data in client.events())


async def test_a_build_status_and_its_reload_go_out_together(tmp_path: Path) -> None:
    dev = _dev(tmp_path)
    async with serve_app(dev, dev.closing) as url, contextlib.AsyncExitStack() as stack:
        client = await RawSSE.open(url)
        stack.push_async_callback(client.stream.aclose)
        await trio.testing.wait_all_tasks_blocked()
        (subscriber,) = dev.broadcaster._subscribers
        ok = dev.broadcaster.publish_status("build_ok", command="make", announce=False)
        assert not subscriber.pending  # recorded, not announced on its own
        dev.broadcaster.publish_reload("reload", ("index.html",), status=ok)
        assert subscriber._waiter is not None and not subscriber.pending
        await client.read_until('"generation":1}\n\n')
        assert client.text.index("event: build_ok") < client.text.index("event: reload")


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_stream_whose_client_reset_is_let_go(tmp_path: Path, pipelined: bool) -> None:
    """A failed write closes the socket and tells the protocol ``Closed`` from a task of
    its own. Left to the read loop alone (which the closed socket wakes), a stream whose
    client had pipelined a request behind it and then reset lived on: h11 is paused on the
    pipelined request, and the read loop waits on the protocol, not the socket (a review)."""
    dev = _dev(tmp_path)
    async with serve_app(dev, dev.closing) as url:
        client = await RawSSE.open(url)
        if pipelined:  # a second request queued behind the stream (HTTP/1.1 pipelining)
            await client.stream.send_all(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        assert dev.broadcaster.subscriber_count == 1
        sock = client.stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        with trio.fail_after(10):
            while dev.broadcaster.subscriber_count:
                dev.broadcaster.publish_reload("reload", ("index.html",))  # writes that fail
                await trio.testing.wait_all_tasks_blocked()
