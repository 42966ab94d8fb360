"""Test support for the dev app: a real Hypercorn on port 0, an SSE client, and a site."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import trio

from punie_trio.web.dev import DevApp


def hypercorn_config() -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 3
    return config


@asynccontextmanager
async def serve_app(app: Any, closing: trio.Event) -> AsyncIterator[str]:
    """Serve ``app`` with Hypercorn's trio worker on a free port; yield its base URL."""
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(
                hypercorn.trio.serve, app, hypercorn_config(), shutdown_trigger=closing.wait
            )
        )
        try:
            yield binds[0]
        finally:
            closing.set()


@asynccontextmanager
async def running(dev: DevApp, *, run: bool = True) -> AsyncIterator[str]:
    """Start ``dev.run`` (unless ``run`` is false) and serve ``dev``; tear both down after."""
    async with trio.open_nursery() as nursery:
        if run:
            await nursery.start(dev.run)
        async with serve_app(dev, dev.closing) as url:
            yield url
        nursery.cancel_scope.cancel()


@attrs.frozen
class SSEEvent:
    event: str
    id: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


@attrs.define(eq=False)
class SSEClient:
    """Reads a ``text/event-stream`` response into events (and remembers comments)."""

    response: httpx.Response
    _lines: AsyncIterator[str]
    comments: list[str] = attrs.field(factory=list)
    retry: int | None = None

    async def next(self) -> SSEEvent:
        event, event_id, data = "message", None, []
        async for line in self._lines:
            if not line:
                if data or event != "message":
                    return SSEEvent(event, event_id, "\n".join(data))
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "id":
                event_id = value
            elif field == "data":
                data.append(value)
            elif field == "retry":
                self.retry = int(value)
        raise EOFError("stream ended")

    async def wait_open(self) -> None:
        """Read the opening (``retry:`` and a comment): the server has subscribed us."""
        async for line in self._lines:
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif line.startswith("retry:"):
                self.retry = int(line.partition(":")[2])
            elif not line and self.comments:
                return
        raise EOFError("stream ended")

    async def next_named(self, *names: str) -> SSEEvent:
        """The next event with one of ``names`` (others are skipped)."""
        while True:
            event = await self.next()
            if event.event in names:
                return event


@asynccontextmanager
async def sse(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[SSEClient]:
    async with (
        client.stream("GET", url, headers=headers or {}) as response,
        contextlib.aclosing(response.aiter_lines()) as lines,  # (closed, not left to the gc)
    ):
        yield SSEClient(response, lines)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


BUILD_SCRIPT = """
import pathlib, sys, time
root = pathlib.Path.cwd()
out = root / "_site"
out.mkdir(exist_ok=True)
counter = pathlib.Path(sys.argv[1])
with counter.open("a") as f:
    f.write("build\\n")
gate = pathlib.Path(sys.argv[2])
while not gate.exists():
    time.sleep(0.01)
src = root / "src"
if (src / "fail").exists():
    print("<b>boom</b> the build failed")
    sys.exit(3)
for p in sorted(src.rglob("*")):
    if p.is_file():
        target = out / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = p.read_bytes()
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
"""


@attrs.frozen
class BuildProject:
    """A project whose build copies ``src/`` into ``_site/`` (and can be held at a gate)."""

    root: Path
    counter: Path
    gate: Path

    @classmethod
    def create(cls, tmp_path: Path) -> BuildProject:
        root = tmp_path / "proj"
        write(root / "src" / "index.html", "<html><body><h1>v1</h1></body></html>")
        write(root / "src" / "style.css", "h1 { color: red; }")
        script = tmp_path / "build.py"
        script.write_text(BUILD_SCRIPT)
        gate = tmp_path / "gate"
        gate.touch()
        return cls(root, tmp_path / "builds.log", gate)

    @property
    def site(self) -> Path:
        return self.root / "_site"

    def command(self) -> str:
        script = self.root.parent / "build.py"
        return f'"{sys.executable}" "{script}" "{self.counter}" "{self.gate}"'

    def builds(self) -> int:
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0

    def dev_app(self, build_cmd: str | None = None, **options: Any) -> DevApp:
        """A dev app serving this project's site, built by :meth:`command` (or
        ``build_cmd``), with ``options`` (``debounce``, ``no_watch``, ...)."""
        return DevApp(
            site_dir=self.site,
            project_root=self.root,
            closing=trio.Event(),
            build_cmd=self.command() if build_cmd is None else build_cmd,
            **options,
        )


async def raw_get(base_url: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` byte for byte (no client-side normalisation of dot segments)."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def process_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped has ended: this container's
    init does not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
