"""Work for a peer that has gone stops: large files, pipelined requests, one compression.

Found by an abuse audit: 500 connections, each pipelining 50 requests for a 2.7 MB text file
(gzip accepted), never reading, then closing, kept the server busy for 25 s after they left
(every queued request was read, compressed and sent to a closed socket) and took 1.2 GB.

Through a real Hypercorn on port 0 with punie-trio's socket writer (what ``punie-trio
serve`` installs), and a real socket that stops reading and then resets. Deterministic: the
test waits with ``wait_all_tasks_blocked`` until the server is stuck writing to the client
(a response started and not finished, every task blocked), and after the reset until the
connection's task has ended; then it counts what the server started after the reset.
"""

from __future__ import annotations

import base64
import gzip
import os
import random
import socket
import struct
from pathlib import Path
from typing import Any

import hypercorn.trio.run
import pytest
import trio
import trio.testing
from devsupport import serve_app

from punie_trio.web._fast_send import FastSendTCPServer
from punie_trio.web.dev import DevApp, _static
from punie_trio.web.dev._asgi import Receive, Scope, Send

PIPELINED = 20


@pytest.fixture(autouse=True)
def _fast_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", FastSendTCPServer)


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    rng = random.Random(7)
    noise = rng.randbytes(2_400_000)
    # Text that gzip shrinks only to about 3/4: responses far larger than socket buffers.
    (site / "big.txt").write_bytes(base64.encodebytes(noise))
    (site / "big.bin").write_bytes(noise)  # not compressible: streamed from the file
    return site


class Recorder:
    """Wraps the app: the status of every response started, and how many have ended."""

    def __init__(self, app: DevApp) -> None:
        self.app = app
        self.statuses: list[int] = []
        self.ended = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, _RecordingSend(send, self.statuses))
        finally:
            self.ended += 1


class _RecordingSend:
    """Records response statuses, and still leads to Hypercorn's stream as its bound
    ``app_send`` does (``__self__``), which the app's departed() check follows."""

    def __init__(self, send: Send, statuses: list[int]) -> None:
        self.__self__ = getattr(send, "__self__", None)
        self._send = send
        self._statuses = statuses

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self._statuses.append(message["status"])
        await self._send(message)


def _connection_tasks() -> int:
    """Hypercorn's connection tasks still running (trio's ``serve_listeners`` handlers)."""
    count = 0
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        count += task.name.endswith("_run_handler")
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return count


@pytest.mark.parametrize("name", ["big.txt", "big.bin"])
async def test_pipelined_requests_of_a_peer_that_left_are_dropped(
    tmp_path: Path, name: str
) -> None:
    dev = DevApp(
        site_dir=_site(tmp_path),
        project_root=tmp_path,
        closing=trio.Event(),
        no_watch=True,
    )
    recorder = Recorder(dev)
    async with serve_app(recorder, dev.closing) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        request = f"GET /{name} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: gzip\r\n\r\n"
        await sock.send(request.encode() * PIPELINED)
        # Until the server is stuck writing to us: a response started, not ended, all blocked.
        while len(recorder.statuses) <= recorder.ended:
            await trio.testing.wait_all_tasks_blocked()
        started_before = len(recorder.statuses)
        assert started_before < PIPELINED
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset: unread data, and linger 0
        while _connection_tasks():
            await trio.testing.wait_all_tasks_blocked()
        after = recorder.statuses[started_before:]
        # The response in flight ends; the next request is refused at once and closes the
        # connection; the rest of the pipelined requests are never served.
        assert after == [503]
        assert recorder.ended == len(recorder.statuses)
        if name == "big.txt":
            assert dev.static.compressions == 1


async def test_a_large_file_is_compressed_once_for_concurrent_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests for the same version of a large file wait for the one compression running
    (they all read and compressed it, each holding it whole: 1.2 GB for 500 requests)."""
    site = StaticSiteFixture(tmp_path)
    calls = 0
    gate = trio.Event()
    real = _static._gzip_file
    token = trio.lowlevel.current_trio_token()

    def gated(path: str, version: _static.Identity) -> tuple[bytes, bool]:
        nonlocal calls
        calls += 1
        trio.from_thread.run(gate.wait, trio_token=token)
        return real(path, version)

    monkeypatch.setattr(_static, "_gzip_file", gated)
    found = await site.static.find("/big.txt")
    results: list[bytes] = []

    async def fetch() -> None:
        results.append(await site.static._gzipped(found))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(fetch)
        await trio.testing.wait_all_tasks_blocked()  # all past the cache, one compressing
        gate.set()
    assert calls == 1
    assert len(results) == 5 and all(r is results[0] for r in results)
    # The next request is a cache hit: no file is read.
    assert await site.static._gzipped(found) is results[0] and calls == 1


async def test_a_large_file_rewritten_with_its_size_and_mtime_is_compressed_again(
    tmp_path: Path,
) -> None:
    """The compressed copy is kept per version of the file: its whole identity, not size
    and mtime alone, which a copy that keeps them (``cp -p``, ``rsync -t``, ``tar x``)
    leaves as they were (a review: the old content was served gzipped)."""
    site = StaticSiteFixture(tmp_path)
    big = tmp_path / "site" / "big.txt"
    old = await site.static._gzipped(await site.static.find("/big.txt"))
    st = big.stat()
    new_content = bytes(b ^ 1 for b in big.read_bytes())  # same size, other bytes
    replacement = big.with_name("big.txt.new")
    replacement.write_bytes(new_content)
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, big)  # as cp -p through a new file, or tar x
    found = await site.static.find("/big.txt")
    assert (found.size, found.mtime_ns) == (st.st_size, st.st_mtime_ns)
    fresh = await site.static._gzipped(found)
    assert fresh != old
    assert gzip.decompress(fresh) == new_content


class StaticSiteFixture:
    def __init__(self, tmp_path: Path) -> None:
        self.static = _static.StaticSite(_site(tmp_path))


class _RaiseRecorder(Recorder):
    """A :class:`Recorder` that also keeps what the app raised (Hypercorn would log it as
    "Error in ASGI Framework" with its traceback; the tests' Hypercorn has no error log)."""

    def __init__(self, app: DevApp) -> None:
        super().__init__(app)
        self.raised: list[BaseException] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as exc:
            self.raised.append(exc)
            raise


async def test_a_large_file_that_shrinks_while_sent_ends_its_connection_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A build that rewrites a large asset (truncating it first) while a browser downloads
    it: the body cannot reach its declared length. The app raised h11's "Too little data
    for declared Content-Length" (an ERROR with a traceback in the terminal), and with a
    request pipelined behind it the connection's task waited for good. Now the connection
    is closed (the client sees a short body, which it cannot take for the file), the
    request behind it is refused, one line says why, and the connection's task ends."""
    dev = DevApp(
        site_dir=_site(tmp_path),
        project_root=tmp_path,
        closing=trio.Event(),
        no_watch=True,
    )
    recorder = _RaiseRecorder(dev)
    big = tmp_path / "site" / "big.bin"
    size = big.stat().st_size
    async with serve_app(recorder, dev.closing) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        request = f"GET /big.bin HTTP/1.1\r\nHost: {host}\r\n\r\n"
        await sock.send(request.encode() * 2)
        while len(recorder.statuses) <= recorder.ended:
            await trio.testing.wait_all_tasks_blocked()
        os.truncate(big, 1000)  # as open(..., "w") does before the new content comes
        received = b""
        while data := await sock.recv(65536):
            received += data
        sock.close()
        while _connection_tasks():
            await trio.testing.wait_all_tasks_blocked()
    assert recorder.raised == []
    assert recorder.statuses == [200, 503]
    assert recorder.ended == 2
    head, _, body = received.partition(b"\r\n\r\n")
    assert f"content-length: {size}".encode() in head
    assert len(body) < size  # cut short: no padding passed off as the file
    assert "big.bin changed while it was being sent" in caplog.text


async def test_a_large_file_whose_read_fails_while_sent_ends_its_connection_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk's read that fails after the response has started (``EIO``: a ``soft`` NFS
    mount whose server stopped answering, a disk error; ``ESTALE``: the file replaced on
    another NFS client) left the app as the ``OSError``: an ERROR with its traceback and,
    after h11's own "Too little data" error, a response ended who knows how. Now it ends
    as for a file that shrank: the connection is closed, one line names the error."""
    dev = DevApp(
        site_dir=_site(tmp_path),
        project_root=tmp_path,
        closing=trio.Event(),
        no_watch=True,
    )
    recorder = _RaiseRecorder(dev)
    big = tmp_path / "site" / "big.bin"
    size = big.stat().st_size
    real_pread = os.pread
    reads = 0

    def pread(fd: int, length: int, offset: int) -> bytes:
        nonlocal reads
        reads += 1
        if reads == 2:
            raise OSError(5, "Input/output error")
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    async with serve_app(recorder, dev.closing) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        await sock.connect((host, int(port)))
        await sock.send(f"GET /big.bin HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        received = b""
        while data := await sock.recv(65536):
            received += data
        sock.close()
        while _connection_tasks():
            await trio.testing.wait_all_tasks_blocked()
    assert recorder.raised == []
    assert (recorder.statuses, recorder.ended) == ([200], 1)
    head, _, body = received.partition(b"\r\n\r\n")
    assert f"content-length: {size}".encode() in head
    assert 0 < len(body) < size  # cut short: no padding passed off as the file
    assert "big.bin could not be read while it was being sent" in caplog.text
    assert "Input/output error" in caplog.text
