"""The servers the dev-app benchmarks compare against, and clients that speak their protocols.

Not a benchmark itself. Used by ``static.py`` and ``reload_latency.py``.

* :data:`PEERS` and :func:`find_peer`: which peer dev servers are installed. A peer runs under
  its *own* Python (they are never dependencies of this project), the first of these that
  imports it: the peer's own ``$PUNIE_<KEY>_PYTHON`` (``PUNIE_MKDOCS_PYTHON``,
  ``PUNIE_SPHINX_AUTOBUILD_PYTHON``, ``PUNIE_LIVERELOAD_PYTHON``, ``PUNIE_BENGAL_PYTHON``: Bengal
  needs Python >= 3.13, so it usually lives apart from the others), the interpreters listed in
  ``$PUNIE_PEERS_PYTHON`` (one, or several separated by ``os.pathsep``), this interpreter, and
  the interpreter named in the ``#!`` line of the peer's command found on ``PATH``. A peer that
  none of them can import is skipped with a note saying how to install it.
* :func:`run_peer`: start one (``_peer_server.py`` under the peer's Python) on a free port.
* :func:`run_punie_serve`: ``python -m punie_trio serve --site`` exactly as a user runs it.
* Clients, one per reload protocol, on raw Trio sockets like the dev app's SSE client, so the
  client side costs the same kind of work for every server: :class:`LongPollClient` (mkdocs),
  :class:`WebSocketClient` (sphinx-autobuild's ``refresh``, python-livereload's protocol 7),
  :class:`BengalSSEClient` (Bengal's ``/__bengal_reload__``).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

HERE = Path(__file__).resolve().parent


@attrs.frozen
class Peer:
    key: str
    title: str
    module: str
    command: str
    install: str
    #: Seconds the peer refuses a second reload after one (python-livereload: 3 s).
    reload_gap: float = 0.0


PEERS = (
    Peer("mkdocs", "mkdocs serve", "mkdocs", "mkdocs", "pip install mkdocs"),
    Peer(
        "sphinx-autobuild",
        "sphinx-autobuild",
        "sphinx_autobuild",
        "sphinx-autobuild",
        'pip install sphinx-autobuild "uvicorn[standard]"',
    ),
    Peer(
        "livereload",
        "python-livereload",
        "livereload",
        "livereload",
        "pip install livereload pyinotify",
        reload_gap=3.0,
    ),
    Peer(
        "bengal",
        "Bengal serve",
        "bengal",
        "bengal",
        'pip install "bengal<0.1.3" into a Python >= 3.13 virtualenv (0.1.3 onward needs '
        "Python >= 3.14; the benchmarks drive 0.1.2's dev server) and set PUNIE_BENGAL_PYTHON "
        "to its python",
    ),
)


def python_env_var(peer: Peer) -> str:
    """The variable naming the peer's own Python: ``PUNIE_BENGAL_PYTHON`` and the like."""
    return "PUNIE_" + re.sub(r"[^A-Z0-9]", "_", peer.key.upper()) + "_PYTHON"


def _shebang_python(command: str) -> str | None:
    path = shutil.which(command)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    interpreter = first[2:].strip().split()[0]
    return interpreter if "python" in os.path.basename(interpreter) else None


def find_peer(peer: Peer) -> tuple[str | None, str]:
    """(a Python that imports the peer, or None; a note on what was found or how to install)."""
    candidates = [os.environ.get(python_env_var(peer))]
    candidates += os.environ.get("PUNIE_PEERS_PYTHON", "").split(os.pathsep)
    candidates += [sys.executable, _shebang_python(peer.command)]
    tried = []
    error = ""
    for python in dict.fromkeys(c for c in candidates if c):
        tried.append(python)
        check = subprocess.run(
            [python, "-c", f"import {peer.module}, importlib.metadata as m; "
             f"print(m.version({peer.command!r}))"],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if check.returncode == 0:
            return python, f"{peer.title} {check.stdout.strip()} (under {python})"
        lines = check.stderr.strip().splitlines()
        error = lines[-1] if lines else f"exit status {check.returncode}"
    return None, (
        f"{peer.title}: skipped, not importable by {', '.join(tried)} ({error}). "
        f"Install: {peer.install}, into this environment or any on PATH "
        f"(or set {python_env_var(peer)} or PUNIE_PEERS_PYTHON)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_answering(port: int, target: str, deadline: float = 60.0) -> None:
    """Poll until ``GET target`` on 127.0.0.1:port gets a status line (the server is up)."""
    with trio.fail_after(deadline):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            async with stream:
                request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                try:
                    await stream.send_all(request.encode())
                    if (await stream.receive_some(64)).startswith(b"HTTP/"):
                        return
                except trio.BrokenResourceError:
                    pass
            await trio.sleep(0.05)


@asynccontextmanager
async def _process(
    argv: list[str], port: int, probe: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, int, int]]:
    """Run a server process; yield (host, port, pid) once it answers; SIGTERM, then SIGKILL."""
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
                start_new_session=True,
                env=env,
            )
        )
        try:
            await wait_answering(port, probe)
            yield "127.0.0.1", port, proc.pid
        finally:
            with trio.CancelScope(shield=True):
                for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    with trio.move_on_after(wait):
                        await proc.wait()
                        break


@asynccontextmanager
async def run_peer(
    peer: Peer,
    python: str,
    site: Path,
    src: Path | None = None,
    probe: str = "/",
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[str, int, int]]:
    """The peer serving ``site`` (and building from ``src``, see ``_peer_server.py``);
    ``env`` is added to its environment."""
    port = free_port()
    argv = [python, str(HERE / "_peer_server.py"), peer.key, str(port), str(site)]
    if src is not None:
        argv.append(str(src))
    full_env = {**os.environ, **env} if env else None
    async with _process(argv, port, probe, full_env) as server:
        yield server


@asynccontextmanager
async def run_punie_serve(site: Path, probe: str = "/") -> AsyncIterator[tuple[str, int, int]]:
    """``python -m punie_trio serve --site SITE --no-watch`` as a user runs it: the ACP server
    with the dev app as its fallback, Hypercorn with punie-trio's socket writer, in-memory
    store, an empty config file (a developer's own config stays out of the figures)."""
    with tempfile.TemporaryDirectory(prefix="punie-bench-dev-") as tmp:
        root = Path(tmp)
        (root / "project").mkdir()
        (root / "config.toml").write_text("")
        port = free_port()
        argv = [
            sys.executable, "-m", "punie_trio", "serve",
            "--config", str(root / "config.toml"),
            "--port", str(port),
            "--project", str(root / "project"),
            "--data-dir", str(root / "data"),
            "--store", "memory",
            "--token", "bench",
            "--site", str(site),
            "--no-watch",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUNIE_")}
        async with _process(argv, port, probe, env) as server:
            yield server


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- protocol clients ------------------------------------------------------------------------


class LongPollClient:
    """mkdocs serve's browser side: the page embeds ``livereload(epoch, id)``; the script asks
    ``GET /livereload/<epoch>/<id>``, which the server holds until a newer build is visible
    (or 60 s pass) and answers with that build's epoch."""

    _SCRIPT = re.compile(rb"livereload\((\d+), (\d+)\)")

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.epoch = 0
        self.request_id = 0
        self.stream: trio.SocketStream | None = None

    async def _get(self, target: str) -> bytes:
        stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream:
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk  # HTTP/1.0 server: the body ends with the connection
        return data.partition(b"\r\n\r\n")[2]

    async def connect(self, page: str = "/index.html") -> None:
        found = self._SCRIPT.search(await self._get(page))
        assert found is not None, "mkdocs did not inject its script"
        self.epoch, self.request_id = int(found[1]), int(found[2])

    async def arm(self) -> None:
        """Send the long poll (what the page's script keeps open)."""
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        target = f"/livereload/{self.epoch}/{self.request_id}"
        await self.stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    async def wait_reload(self) -> None:
        """Until the poll answers with a newer epoch (re-polling if it times out)."""
        while True:
            assert self.stream is not None
            data = b""
            async with self.stream:
                while chunk := await self.stream.receive_some(65536):
                    data += chunk
            epoch = int(data.partition(b"\r\n\r\n")[2] or b"0")
            if epoch > self.epoch:
                self.epoch = epoch
                return
            await self.arm()

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


class WebSocketClient:
    """A minimal RFC 6455 client: the upgrade, masked text frames out, text frames in (pings
    answered). Enough for sphinx-autobuild (the server sends ``refresh``) and python-livereload
    (``hello`` handshake, ``info``, then ``{"command": "reload", ...}``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.buffer = bytearray()
        self.stream: trio.SocketStream | None = None

    async def connect(self, path: str) -> None:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        await self.stream.send_all(
            (
                f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: http://{self.host}:{self.port}\r\n\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("closed during the WebSocket upgrade")
            self.buffer += chunk
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"upgrade refused: {head.splitlines()[0]!r}")
        self.buffer = bytearray(rest)

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        assert self.stream is not None
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.stream.send_all(header + mask + masked)

    async def send_text(self, text: str) -> None:
        await self._send_frame(0x1, text.encode())

    def _frame(self) -> tuple[int, bytes] | None:
        """One complete frame from the buffer (server frames are not masked), or None."""
        buf = self.buffer
        if len(buf) < 2:
            return None
        n, at = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, at = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, at = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < at + n:
            return None
        opcode, payload = buf[0] & 0x0F, bytes(buf[at : at + n])
        del buf[: at + n]
        return opcode, payload

    async def receive_text(self) -> str:
        assert self.stream is not None
        while True:
            frame = self._frame()
            if frame is None:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError("WebSocket closed")
                self.buffer += chunk
                continue
            opcode, payload = frame
            if opcode == 0x1:
                return payload.decode()
            if opcode == 0x9:
                await self._send_frame(0xA, payload)
            elif opcode == 0x8:
                raise EOFError("WebSocket closed by the server")

    async def wait_for(self, matches: Callable[[str], bool]) -> None:
        while not matches(await self.receive_text()):
            pass

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


async def livereload_handshake(client: WebSocketClient) -> None:
    """LiveReload protocol 7 as livereload.js speaks it. The server registers the tab on
    ``info``; a second ``hello`` answered proves it has handled that ``info``."""
    hello = {"command": "hello", "protocols": ["http://livereload.com/protocols/official-7"]}
    await client.send_text(json.dumps(hello))
    await client.wait_for(lambda text: json.loads(text).get("command") == "hello")
    info = {"command": "info", "plugins": {}, "url": f"http://{client.host}:{client.port}/"}
    await client.send_text(json.dumps(info))
    await client.send_text(json.dumps(hello))
    await client.wait_for(lambda text: json.loads(text).get("command") == "hello")


def is_livereload_reload(text: str) -> bool:
    return json.loads(text).get("command") == "reload"


class RawSSEClient:
    """An SSE stream read from a raw socket: ``connect`` sends ``GET PATH`` and waits for
    the server's opening comment (``OPENING``); subclasses look for their events."""

    PATH = b"/"
    OPENING = b""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.buffer = b""
        self.stream: trio.SocketStream | None = None

    async def connect(self) -> None:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        await self.stream.send_all(
            b"GET %b HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n" % self.PATH
        )
        while self.OPENING not in self.buffer:
            await self.read_more()
        self.buffer = b""

    async def read_more(self) -> None:
        assert self.stream is not None
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"the server closed the SSE stream {self.PATH.decode()}")
        self.buffer += chunk

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


class BengalSSEClient(RawSSEClient):
    """Bengal's browser side: ``new EventSource('/__bengal_reload__')``. The server (HTTP/1.0,
    a thread per stream) opens with ``retry: 2000`` and ``: connected``, then sends
    ``data: reload`` (or ``reload-css``, ``reload-page``) after each rebuild and ``: keepalive``
    every 10 s. There is no event id and no catch-up: a message is "the generation changed"."""

    PATH = b"/__bengal_reload__"
    OPENING = b": connected\n\n"
    _MESSAGE = re.compile(rb"^data: (reload|reload-css|reload-page)\n\n", re.M)

    def discard(self) -> None:
        """Drop whatever arrived since the last reload without waiting (a second message for
        one save must not count as the next save's)."""
        assert self.stream is not None
        self.buffer = b""
        fd = self.stream.socket.fileno()  # non-blocking: trio sockets are
        while True:
            try:
                if not os.read(fd, 65536):
                    return
            except BlockingIOError:
                return

    async def wait_reload(self) -> None:
        while (found := self._MESSAGE.search(self.buffer)) is None:
            await self.read_more()
        self.buffer = self.buffer[found.end() :]
