"""Helpers for the integration tests: real servers (in-process or as a subprocess) and real
clients (trio-websocket, NDJSON over pipes, httpx)."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from punie_trio.server import Running, ServeConfig, serve
from punie_trio.transport import NdjsonStream
from punie_trio.worker import Model

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient

LISTENING = re.compile(r"punie-trio listening on http://(\S+):(\d+) \(ACP: ws://\S+/acp\)")

# Every test client gets its own block of request ids, so several clients can share one
# SchemaChecker (it maps request ids to methods to validate the answers).
_id_blocks = itertools.count(1)


def fresh_ids() -> itertools.count[int]:
    return itertools.count(next(_id_blocks) * 1_000_000)


def ws_url(http_url: str, path: str = "/acp") -> str:
    return "ws" + http_url.removeprefix("http") + path


@attrs.define(eq=False)
class WsStream:
    """A trio-websocket connection as the client's ``send_message``/``receive_message``."""

    ws: WebSocketConnection

    async def send_message(self, text: str) -> None:
        await self.ws.send_message(text)

    async def receive_message(self) -> str | bytes:
        try:
            return await self.ws.get_message()
        except ConnectionClosed:
            raise trio.EndOfChannel from None


@asynccontextmanager
async def acp_ws_client(
    http_url: str,
    checker: SchemaChecker,
    *,
    path: str = "/acp",
    max_message_size: int = 64 * 1024 * 1024,
    token: str | None = None,
    **client_kw: Any,
) -> AsyncIterator[tuple[AcpTestClient, WebSocketConnection]]:
    """An :class:`AcpTestClient` over a real WebSocket, its reader running while in the block."""
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
    async with open_websocket_url(
        ws_url(http_url, path), max_message_size=max_message_size, extra_headers=headers
    ) as ws:
        client = AcpTestClient(WsStream(ws), checker, ids=fresh_ids(), **client_kw)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            yield client, ws
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def in_process_server(tmp_path: Path, model: Model, **config: Any) -> AsyncIterator[Running]:
    """``punie_trio.server.serve`` on port 0 in the test's own Trio run; shut down on exit."""
    (tmp_path / "data").mkdir(exist_ok=True)
    serve_config = ServeConfig(
        projects=(tmp_path,),
        model=model,
        port=0,
        handle_signals=False,
        data_dir=tmp_path / "data",
        **config,
    )
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(serve, serve_config)
        try:
            yield running
        finally:
            running.closing.set()


async def settle_until(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds, re-checking each time every task is blocked (the
    server runs in this process, so "everything is blocked" means it has done its work)."""
    while not predicate():
        await trio.testing.wait_all_tasks_blocked()


def task_tree() -> collections.Counter[str]:
    """The names of every task in this Trio run (walking nurseries from the root task)."""
    names: collections.Counter[str] = collections.Counter()

    def walk(task: trio.lowlevel.Task) -> None:
        names[task.name] += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


def write_script(path: Path, turns: list[list[dict[str, Any]]]) -> Path:
    path.write_text(json.dumps(turns), encoding="utf-8")
    return path


# -- raw HTTP/1.1 ------------------------------------------------------------------------------


@attrs.frozen
class HttpAnswer:
    """One response as it came off the wire (header names lowercase; the last of a name)."""

    status: int
    headers: dict[str, str]
    body: bytes


def parse_answers(data: bytes) -> list[HttpAnswer]:
    """The complete responses at the start of ``data`` (1xx ones included)."""
    answers: list[HttpAnswer] = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        length = int(headers.get("content-length", "0")) if status >= 200 else 0
        if len(rest) < length:
            break
        answers.append(HttpAnswer(status, headers, rest[:length]))
        data = rest[length:]
    return answers


@attrs.define(eq=False)
class RawHttp:
    """One TCP connection for requests httpx will not send (a body that stops short, a
    path as it is on the wire). :meth:`read_ready` takes what has arrived without waiting
    (for a server on a MockClock); :meth:`answer` waits for a whole response."""

    stream: trio.SocketStream
    received: bytes = b""
    eof: bool = False
    #: How many final responses :meth:`answer` has returned.
    returned: int = 0

    @classmethod
    async def connect(cls, url: str) -> RawHttp:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)))

    @classmethod
    async def exchange(cls, url: str, data: bytes) -> HttpAnswer:
        """Send ``data`` on a connection of its own, and return the answer once the server
        has closed the connection (a refusal that ends it, as every refused handshake)."""
        client = await cls.connect(url)
        try:
            await client.send(data)
            answer = await client.answer()
            await client.wait_closed()
        finally:
            await client.aclose()
        return answer

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def answers(self) -> list[HttpAnswer]:
        return parse_answers(self.received)

    def read_ready(self) -> list[HttpAnswer]:
        """Take whatever the server sent so far, without waiting; the answers in it."""
        with socket.socket(fileno=os.dup(self.stream.socket.fileno())) as sock:
            for data in received_so_far(sock):
                self._take(data)
        return self.answers()

    async def answer(self) -> HttpAnswer:
        """The next final (non-1xx) response, waiting until it is complete."""
        while True:
            final = [a for a in self.answers() if a.status >= 200]
            if len(final) > self.returned:
                self.returned += 1
                return final[self.returned - 1]
            assert not self.eof, f"the server closed the connection: {self.received!r}"
            self._take(await self.stream.receive_some(65536))

    async def wait_closed(self) -> None:
        """Read until the server closes the connection."""
        while not self.eof:
            self._take(await self.stream.receive_some(65536))

    def _take(self, data: bytes) -> None:
        if data:
            self.received += data
        else:
            self.eof = True

    async def aclose(self) -> None:
        await self.stream.aclose()


def received_so_far(sock: socket.socket) -> Iterator[bytes]:
    """What has arrived on ``sock``, without waiting (for a server on a MockClock): its
    chunks, then ``b""`` if the peer has closed (or reset) the connection."""
    while True:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except ConnectionError:
            data = b""
        yield data
        if not data:
            return


async def settle_loopback() -> None:
    """Let an in-process server and its raw clients act on what was just sent (loopback
    bytes are in the receiver's buffer once sent; each pass polls for them)."""
    for _ in range(4):
        await trio.testing.wait_all_tasks_blocked()


# -- a server as a real subprocess -------------------------------------------------------------


@attrs.define(eq=False)
class ServerProcess:
    """``python -m punie_trio serve`` with pipes; stderr is collected by a task."""

    process: trio.Process
    url: str = ""
    stderr_lines: list[str] = attrs.field(factory=list)
    stderr_changed: trio.Event = attrs.field(factory=trio.Event)
    stderr_done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    async def collect_stderr(self, task_status: trio.TaskStatus[None]) -> None:
        assert self.process.stderr is not None
        task_status.started()
        buffer = b""
        try:
            while True:
                data = await self.process.stderr.receive_some(65536)
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.stderr_lines.append(line.decode(errors="replace"))
                self.stderr_changed.set()
                self.stderr_changed = trio.Event()
        finally:
            if buffer:
                self.stderr_lines.append(buffer.decode(errors="replace"))
            self.stderr_done.set()
            self.stderr_changed.set()

    async def wait_stderr(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        """Wait for a stderr line matching ``pattern``."""
        regex = re.compile(pattern)
        seen = 0
        while True:
            for line in self.stderr_lines[seen:]:
                match = regex.search(line)
                if match:
                    return match
            seen = len(self.stderr_lines)
            if self.stderr_done.is_set():
                raise AssertionError(
                    f"server stderr ended without {regex.pattern!r}:\n{self.stderr}"
                )
            await self.stderr_changed.wait()

    def stdio(self) -> NdjsonStream:
        assert self.process.stdout is not None and self.process.stdin is not None
        return NdjsonStream(self.process.stdout, self.process.stdin)


TOKEN = "integration-test-token"


def server_env() -> dict[str, str]:
    """Our environment without PUNIE_* settings, so only the command line configures."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PUNIE_")}


async def run_punie(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``punie-trio ARGS`` to completion (for the read-only commands), output captured."""
    return await trio.run_process(
        [sys.executable, "-m", "punie_trio", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=server_env(),
    )


def serve_command(
    tmp_path: Path, *extra: str, data_dir: Path | None = None, token: str | None = TOKEN
) -> list[str]:
    """``punie-trio serve`` on port 0 for ``tmp_path``; ``token=None`` lets it generate one."""
    command = [
        sys.executable,
        "-m",
        "punie_trio",
        "serve",
        "--port",
        "0",
        "--project",
        str(tmp_path),
        "--data-dir",
        str(data_dir if data_dir is not None else tmp_path / "data"),
    ]
    if token is not None:
        command += ["--token", token]
    return [*command, *extra]


@asynccontextmanager
async def server_process(
    tmp_path: Path, *extra: str, wait_listening: bool = True
) -> AsyncIterator[ServerProcess]:
    """Start the server as a subprocess; kill it on exit if it is still running."""
    command = serve_command(tmp_path, *extra)
    async with command_process(command, server_env(), wait_listening=wait_listening) as server:
        yield server


@asynccontextmanager
async def command_process(
    command: list[str],
    env: dict[str, str],
    *,
    wait_listening: bool = True,
    stdin: int = subprocess.PIPE,
    cwd: str | None = None,
) -> AsyncIterator[ServerProcess]:
    """:func:`server_process` for a command line and environment of the test's own (a
    config file, ``PUNIE_*`` variables, a working directory)."""
    process = await trio.lowlevel.open_process(
        command,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    server = ServerProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.collect_stderr)
            if wait_listening:
                match = await server.wait_stderr(LISTENING)
                server.url = f"http://{match.group(1)}:{match.group(2)}"
            yield server
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()
