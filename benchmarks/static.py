"""Static serving throughput: the dev app vs its peers and two baselines, in one run.

Servers, each in its own process on 127.0.0.1, all serving the same two files: a 10 KB HTML
page (every dev server injects its reload script into it) and a 100 KB CSS file.

* **DevApp**: ``python -m punie_trio serve --site DIR --no-watch``, as a user runs it
  (Hypercorn's trio worker with punie-trio's socket writer; the dev app behind the ACP routes).
* **DevApp, plain Hypercorn**: the same ``DevApp`` on stock ``hypercorn.trio.serve``, to show
  what the socket writer contributes.
* Baselines: a **raw Hypercorn-trio file app** (reads the file in a thread and sends it: no
  validators, no injection, stock Hypercorn) and **``python -m http.server``**.
* Peers, when installed (see ``_peers.py``; skipped with a note otherwise): mkdocs serve,
  sphinx-autobuild, python-livereload, Bengal.

The load generator (this process, Trio) keeps CONNECTIONS connections busy, alive where the
server allows it (``http.server`` and mkdocs' server speak HTTP/1.0 and close after each
response, so the generator reconnects: that is how those servers behave). Every request sends
``Accept-Encoding: identity`` so every server sends the bytes as they are, and no validators, so
every response is a 200 with a body. Noise control: all servers are started first; then each
round loads every server in turn (shuffled order) for DURATION seconds per file, and the report
gives the median over the rounds, with the ratio to each baseline taken round by round (the
baselines are measured in the same run, seconds apart), plus the CPU each server used.

Usage: python benchmarks/static.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import _peers
import trio

CONNECTIONS = 16
DURATION = 2.0
ROUNDS = 5
FILES = ("/page.html", "/style.css")
RAW = "raw Hypercorn-trio file app"
DEVAPP = "DevApp (punie-trio serve)"
HTTP_SERVER = "python -m http.server"


def make_site(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    para = "<p>" + "lorem ipsum dolor sit amet " * 3 + "</p>\n"
    body = para * (10_000 // len(para))
    (root / "page.html").write_text(
        f"<!doctype html><html><head><title>page</title></head><body>{body}</body></html>"
    )
    rule = ".c{color:#123456;margin:0 auto;padding:1px}\n"
    (root / "style.css").write_text(rule * (100_000 // len(rule)))
    (root / "index.html").write_text("<!doctype html><html><head></head><body>i</body></html>")


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


async def serve(kind: str, site: Path, port: int) -> None:
    """Child process: the raw app, or the DevApp, on stock Hypercorn-trio; until killed."""
    import hypercorn.config
    import hypercorn.trio

    from punie_trio.web.dev import DevApp

    closing = trio.Event()
    app: Any = raw_app
    if kind == "dev-plain":
        app = DevApp(site_dir=site, project_root=site, closing=closing, no_watch=True)
    os.environ["SITE"] = str(site)
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    await hypercorn.trio.serve(app, config, shutdown_trigger=closing.wait)


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bool, int]:
    """Read one response: (status, whether the server keeps the connection, body length)."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    keep = lines[0].startswith(b"HTTP/1.1") and headers.get(b"connection") != b"close"
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(rest) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError
            rest += chunk
    else:  # no length: the body ends with the connection
        keep = False
        while chunk := await stream.receive_some(65536):
            rest += chunk
        length = len(rest)
    buffer[:] = rest[length:]
    return status, keep, length


async def load(host: str, port: int, target: str, duration: float) -> tuple[float, int]:
    """(requests per second over ``duration``, body length) with CONNECTIONS workers."""
    count = 0
    size = 0
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n\r\n".encode()

    async def worker() -> None:
        nonlocal count, size
        stream: trio.SocketStream | None = None
        buffer = bytearray()
        try:
            while True:
                if stream is None:
                    stream = await trio.open_tcp_stream(host, port)
                    buffer.clear()
                await stream.send_all(request)
                status, keep, size = await read_response(stream, buffer)
                assert status == 200, status
                count += 1
                if not keep:
                    await stream.aclose()
                    stream = None
        finally:
            if stream is not None:
                await stream.aclose()

    t0 = time.perf_counter()
    with trio.move_on_after(duration):
        async with trio.open_nursery() as nursery:
            for _ in range(CONNECTIONS):
                nursery.start_soon(worker)
    return count / (time.perf_counter() - t0), size


@asynccontextmanager
async def _child(argv: Callable[[int], list[str]]) -> AsyncIterator[tuple[str, int, int]]:
    """A server process given its command line for a free port; yields (host, port, pid)."""
    port = _peers.free_port()
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            functools.partial(
                trio.run_process,
                argv(port),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        try:
            await _peers.wait_answering(port, "/index.html")
            yield "127.0.0.1", port, proc.pid
        finally:
            proc.kill()


def _hypercorn_child(kind: str, site: Path) -> Callable[[int], list[str]]:
    return lambda port: [sys.executable, __file__, "--serve", kind, str(site), str(port)]


def _http_server(site: Path) -> Callable[[int], list[str]]:
    return lambda port: [
        sys.executable, "-m", "http.server", str(port),
        "--bind", "127.0.0.1", "--directory", str(site),
    ]  # fmt: skip


Starter = Callable[[], AbstractAsyncContextManager[tuple[str, int, int]]]


def servers(site: Path) -> list[tuple[str, Starter]]:
    """(label, starter) for every server of the run; peers that are not installed are skipped."""
    out: list[tuple[str, Starter]] = [
        (DEVAPP, functools.partial(_peers.run_punie_serve, site)),
        ("DevApp, plain Hypercorn", functools.partial(_child, _hypercorn_child("dev-plain", site))),
        (RAW, functools.partial(_child, _hypercorn_child("raw", site))),
        (HTTP_SERVER, functools.partial(_child, _http_server(site))),
    ]
    for peer in _peers.PEERS:
        python, note = _peers.find_peer(peer)
        print(note)
        if python is not None:
            out.append((peer.title, functools.partial(_peers.run_peer, peer, python, site)))
    return out


async def main(quick: bool, only: list[str]) -> None:
    rounds, duration = (2, 1.0) if quick else (ROUNDS, DURATION)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        make_site(site)
        chosen = servers(site)
        if only:
            chosen = [c for c in chosen if any(o.lower() in c[0].lower() for o in only)]
        rates: dict[tuple[str, str], list[float]] = {}
        sizes: dict[tuple[str, str], int] = {}
        cpu: dict[str, float] = {}
        busy: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            running: dict[str, tuple[str, int, int]] = {}
            stop = trio.Event()

            async def keep(label: str, start: Starter, *, task_status: Any) -> None:
                async with start() as server:
                    task_status.started(server)
                    await stop.wait()

            for label, start in chosen:
                running[label] = await nursery.start(keep, label, start)
            print(
                f"\n{CONNECTIONS} connections, identity encoding, {rounds} rounds x "
                f"{duration:.0f} s per server and file",
                flush=True,
            )
            for _ in range(rounds):
                order = list(running)
                random.shuffle(order)
                for label in order:
                    host, port, pid = running[label]
                    c0, t0 = _peers.cpu_seconds(pid), time.perf_counter()
                    for target in FILES:
                        rps, size = await load(host, port, target, duration)
                        rates.setdefault((label, target), []).append(rps)
                        sizes[label, target] = size
                    busy[label] = busy.get(label, 0.0) + time.perf_counter() - t0
                    cpu[label] = cpu.get(label, 0.0) + _peers.cpu_seconds(pid) - c0
            stop.set()
    report(list(running), rates, sizes, cpu, busy)


def _paired(xs: list[float], base: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(xs, base, strict=True))


def report(
    labels: list[str],
    rates: dict[tuple[str, str], list[float]],
    sizes: dict[tuple[str, str], int],
    cpu: dict[str, float],
    busy: dict[str, float],
) -> None:
    baselines = [b for b in (RAW, HTTP_SERVER) if b in labels]
    names = {RAW: "raw", HTTP_SERVER: "http.server"}
    if DEVAPP in labels:  # the peers against the DevApp, round by round too
        baselines.append(DEVAPP)
        names[DEVAPP] = "DevApp"
    for target in FILES:
        print(f"\n{target}  (req/s: median of rounds [min-max]; x: median per-round ratio)")
        for label in labels:
            xs = rates[label, target]
            ratios = "  ".join(
                f"x{_paired(xs, rates[base, target]):.2f} {names[base]}"
                for base in baselines
                if base != label
            )
            print(
                f"  {label:30} {statistics.median(xs):7.0f} [{min(xs):5.0f}-{max(xs):5.0f}]  "
                f"{ratios}  ({sizes[label, target]} B/response)"
            )
    print("\nserver CPU while loaded (% of one core):")
    for label in labels:
        print(f"  {label:30} {100 * cpu[label] / busy[label]:4.0f}%")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        trio.run(serve, sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s (about 40 s)")
        parser.add_argument("--only", nargs="*", default=[], help="servers whose name contains")
        args = parser.parse_args()
        print(f"Python {sys.version.split()[0]}, trio {trio.__version__}, cores {os.cpu_count()}")
        trio.run(main, args.quick, args.only)
