"""Live-reload latency: file saved -> SSE event received, by 1 and by 1,000 clients.

Runs the real DevApp under Hypercorn's trio worker on 127.0.0.1 (port 0) in a child process
(so the server has its own core of the two), with raw-socket SSE clients in this process; this
process also saves the file and takes the times. Two configurations: no build command (the site
file itself is edited) and a trivial build command (``cp``). ``debounce`` is set to 0: the quiet
period is a configured wait, not overhead; the watcher's own 10 ms batching step remains.

Baselines, measured in the same run on the same loop:
* one HTTP/1.1 keep-alive GET round trip to the same server (a 20-byte file): what a client
  pays to ask at all; the single-client ratio is against it;
* a Trio memory-channel fan-out of one message to 1,000 receiving tasks (time until the last
  one has it): the floor for in-process fan-out; the 1,000-client ratio is against it.

Bounded: a fixed number of trials, each under a timeout. Usage: python benchmarks/reload_latency.py
"""

from __future__ import annotations

import functools
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hypercorn.config
import hypercorn.trio
import trio
import trio.testing

from punie_trio.web.dev import DevApp

TRIALS_ONE = 40
TRIALS_MANY = 6
MANY = 1000
TRIAL_TIMEOUT = 10.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class SSEClient:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.buffer = b""
        self.stream: trio.SocketStream | None = None

    async def connect(self) -> None:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        await self.stream.send_all(
            b"GET /__reload__ HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
        )
        while b": punie-trio live reload\n\n" not in self.buffer:
            self.buffer += await self.stream.receive_some(65536)
        self.buffer = b""

    async def wait_for(self, generation: int) -> float:
        needle = b"id: %d\nevent: reload" % generation
        assert self.stream is not None
        while needle not in self.buffer:
            self.buffer += await self.stream.receive_some(65536)
        arrived = time.perf_counter()
        self.buffer = self.buffer[self.buffer.index(needle) + len(needle) :]
        return arrived


async def http_round_trips(host: str, port: int, count: int) -> list[float]:
    stream = await trio.open_tcp_stream(host, port)
    times = []
    async with stream:
        for _ in range(count):
            t0 = time.perf_counter()
            await stream.send_all(
                b"GET /small.txt HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n"
            )
            data = b""
            while not (data.endswith(b"0123456789abcdefghij")):
                data += await stream.receive_some(65536)
            times.append(time.perf_counter() - t0)
    return times


async def channel_fanout(receivers: int, trials: int) -> list[float]:
    results = []
    for _ in range(trials):
        done = 0
        all_done = trio.Event()
        channels = [trio.open_memory_channel[float](1) for _ in range(receivers)]

        async def receive(ch: trio.MemoryReceiveChannel[float], finished: trio.Event) -> None:
            nonlocal done
            await ch.receive()
            done += 1
            if done == receivers:
                finished.set()

        async with trio.open_nursery() as nursery:
            for _, r in channels:
                nursery.start_soon(receive, r, all_done)
            await trio.testing.wait_all_tasks_blocked()
            t0 = time.perf_counter()
            for s, _ in channels:
                s.send_nowait(t0)
            await all_done.wait()
            results.append(time.perf_counter() - t0)
    return results


async def serve(root: Path, build: bool) -> None:
    """Child process: the dev app on a free port; prints its URL, runs until stdin closes."""
    site = root / "site"
    dev = DevApp(
        site_dir=site,
        project_root=root,
        closing=trio.Event(),
        build_cmd="cp src/index.html site/index.html" if build else None,
        watch=[root / "src"] if build else [site],
        debounce=0.0,
    )
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.backlog = 2048
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        binds = await nursery.start(
            functools.partial(hypercorn.trio.serve, dev, config, shutdown_trigger=dev.closing.wait)
        )
        print(binds[0], flush=True)
        await trio.wrap_file(sys.stdin).read()
        dev.closing.set()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()


async def measure(
    label: str, root: Path, build: bool
) -> tuple[list[float], list[float], list[float], list[float]]:
    site = root / "site"
    src = root / "src"
    site.mkdir(parents=True)
    src.mkdir()
    (site / "index.html").write_text("<html><body>0</body></html>")
    (site / "small.txt").write_text("0123456789abcdefghij")
    (src / "index.html").write_text("<html><body>0</body></html>")
    edited = src / "index.html" if build else site / "index.html"
    counter = 0

    async def trial(clients: list[SSEClient]) -> list[float]:
        nonlocal counter
        counter += 1
        generation = counter  # every edit changes the output: one generation each
        arrivals: list[float] = []

        async def one(c: SSEClient) -> None:
            arrivals.append(await c.wait_for(generation))

        with trio.fail_after(TRIAL_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(one, c)
                await trio.testing.wait_all_tasks_blocked(0.01)
                t0 = time.perf_counter()
                edited.write_text(f"<html><body>{counter}</body></html>")
        return [a - t0 for a in arrivals]

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, __file__, "--serve", str(root), "1" if build else "0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )
        line = b""
        while not line.endswith(b"\n"):
            line += await server.stdout.receive_some(1024)
        host, port = line.decode().strip().removeprefix("http://").rsplit(":", 1)
        rtt = await http_round_trips(host, int(port), 200)
        one = SSEClient(host, int(port))
        await one.connect()
        single = [(await trial([one]))[0] for _ in range(TRIALS_ONE)]
        assert one.stream is not None
        await one.stream.aclose()
        many_clients = [SSEClient(host, int(port)) for _ in range(MANY)]
        async with trio.open_nursery() as connecting:
            for c in many_clients:
                connecting.start_soon(c.connect)
        all_notified: list[float] = []
        per_client: list[float] = []
        for _ in range(TRIALS_MANY):
            latencies = await trial(many_clients)
            assert len(latencies) == MANY
            all_notified.append(max(latencies))
            per_client.extend(latencies)
        for c in many_clients:
            assert c.stream is not None
            await c.stream.aclose()
        await server.stdin.aclose()
    print(f"\n== {label} ==")
    return single, per_client, all_notified, rtt


def ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


async def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    fanout = await channel_fanout(MANY, 20)
    print(f"baseline memory-channel fan-out to {MANY} tasks: p50 {ms(pct(fanout, 0.5))}")
    for label, build in (("no build command", False), ("trivial build command (cp)", True)):
        with tempfile.TemporaryDirectory() as tmp:
            single, per_client, all_notified, rtt = await measure(label, Path(tmp), build)
        rtt50 = pct(rtt, 0.5)
        print(
            f"baseline HTTP GET round trip (keep-alive): p50 {ms(rtt50)} p99 {ms(pct(rtt, 0.99))}"
        )
        s50 = pct(single, 0.5)
        print(
            f"1 client: p50 {ms(s50)} p99 {ms(pct(single, 0.99))} "
            f"(x{s50 / rtt50:.0f} an HTTP round trip; n={len(single)})"
        )
        worst = pct(all_notified, 0.5)
        print(
            f"{MANY} clients: per-client p50 {ms(pct(per_client, 0.5))} "
            f"p99 {ms(pct(per_client, 0.99))}; all notified p50 {ms(worst)} "
            f"max {ms(max(all_notified))} (fan-out part over channel baseline: "
            f"x{(worst - pct(per_client, 0.0)) / statistics.median(fanout):.0f}; "
            f"n={len(all_notified)} trials)"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        trio.run(serve, Path(sys.argv[2]), sys.argv[3] == "1")
    else:
        print(f"Python {sys.version.split()[0]}, trio {trio.__version__}")
        trio.run(main)
