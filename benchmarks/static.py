"""Static serving throughput: DevApp vs a minimal Hypercorn-trio file app vs ``http.server``.

Each server runs in its own child process on 127.0.0.1 (port 0 where it can pick one); this
process is a Trio load generator with CONNECTIONS concurrent HTTP/1.1 connections, kept alive
where the server allows it (``python -m http.server`` speaks HTTP/1.0 and closes after each
response, so the generator reconnects: that is how that server behaves). Every request sends
``Accept-Encoding: identity`` so all three send the same bytes. Files: a 10 KB HTML page (the
DevApp injects its script into it) and a 100 KB CSS file. Each run lasts DURATION seconds.

Usage: python benchmarks/static.py
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

CONNECTIONS = 16
DURATION = 3.0


def make_site(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    para = "<p>" + "lorem ipsum dolor sit amet " * 3 + "</p>\n"
    body = para * (10_000 // len(para))
    (root / "page.html").write_text(f"<!doctype html><html><body>{body}</body></html>")
    rule = ".c{color:#123456;margin:0 auto;padding:1px}\n"
    (root / "style.css").write_text(rule * (100_000 // len(rule)))


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The baseline: read the file in a thread, send it. No conditionals, no injection."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    site = os.environ["SITE"]
    path = os.path.join(site, scope["path"].lstrip("/"))
    try:
        body = await trio.to_thread.run_sync(Path(path).read_bytes)
        status = 200
    except OSError:
        body, status = b"not found", 404
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve(kind: str, site: Path) -> None:
    import hypercorn.config
    import hypercorn.trio

    from punie_trio.web.dev import DevApp

    closing = trio.Event()
    app: Any = raw_app
    if kind == "dev":
        app = DevApp(site_dir=site, project_root=site, closing=closing, no_watch=True)
    os.environ["SITE"] = str(site)
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(hypercorn.trio.serve, app, config, shutdown_trigger=closing.wait)
        )
        print(binds[0], flush=True)
        await trio.wrap_file(sys.stdin).read()
        closing.set()


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bool]:
    """Read one response; returns (status, whether the server keeps the connection)."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    length = int(headers.get(b"content-length", b"0"))
    keep = lines[0].startswith(b"HTTP/1.1") and headers.get(b"connection") != b"close"
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError
        rest += chunk
    buffer[:] = rest[length:]
    return status, keep


async def load(host: str, port: int, target: str) -> float:
    count = 0
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n\r\n".encode()

    async def worker() -> None:
        nonlocal count
        stream: trio.SocketStream | None = None
        buffer = bytearray()
        try:
            while True:
                if stream is None:
                    stream = await trio.open_tcp_stream(host, port)
                    buffer.clear()
                await stream.send_all(request)
                status, keep = await read_response(stream, buffer)
                assert status == 200, status
                count += 1
                if not keep:
                    await stream.aclose()
                    stream = None
        finally:
            if stream is not None:
                await stream.aclose()

    t0 = time.perf_counter()
    with trio.move_on_after(DURATION):
        async with trio.open_nursery() as nursery:
            for _ in range(CONNECTIONS):
                nursery.start_soon(worker)
    return count / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_server(kind: str, site: Path, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    if kind == "http.server":
        port = free_port()
        cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        cmd += ["--directory", str(site)]
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                functools.partial(
                    trio.run_process,
                    cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            )
            deadline = trio.current_time() + 10
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    assert trio.current_time() < deadline
                    await trio.sleep(0.05)
            task_status.started(f"http://127.0.0.1:{port}")
            try:
                await trio.sleep_forever()
            finally:
                proc.terminate()
    cmd = [sys.executable, __file__, "--serve", kind, str(site)]
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            functools.partial(
                trio.run_process, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False
            )
        )
        line = b""
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive_some(1024)
        task_status.started(line.decode().strip())
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await proc.stdin.aclose()


async def main() -> None:
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        make_site(site)
        for kind in ("raw", "dev", "http.server"):
            async with trio.open_nursery() as nursery:
                url = await nursery.start(run_server, kind, site)
                host, port = url.removeprefix("http://").rsplit(":", 1)
                for target in ("/page.html", "/style.css"):
                    results[kind, target] = await load(host, int(port), target)
                nursery.cancel_scope.cancel()
    print(f"{CONNECTIONS} connections, {DURATION:.0f} s per run, identity encoding")
    for target in ("/page.html", "/style.css"):
        raw = results["raw", target]
        for kind, name in (
            ("dev", "DevApp (Hypercorn)"),
            ("raw", "raw ASGI file app (Hypercorn)"),
            ("http.server", "python -m http.server"),
        ):
            rps = results[kind, target]
            print(f"{target:12} {name:32} {rps:8.0f} req/s  x{rps / raw:.2f} raw")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        trio.run(serve, sys.argv[2], Path(sys.argv[3]))
    else:
        print(f"Python {sys.version.split()[0]}, trio {trio.__version__}")
        trio.run(main)
