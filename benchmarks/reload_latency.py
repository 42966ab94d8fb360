"""Live-reload latency: file saved -> reload notification received, by 1 and by 1,000 clients.

Servers, each in its own process on 127.0.0.1 (the clients, the edits and the clock are in this
process):

* **DevApp**: ``DevApp`` under Hypercorn's trio worker with punie-trio's socket writer installed,
  as ``punie-trio serve`` runs it, with ``debounce=0`` (the quiet period is a configured wait,
  not overhead; on Linux its inotify watcher hands a save over once the file is closed).
  Clients read ``/__reload__`` (SSE). A single-client row with the shipped default
  ``debounce=0.2`` shows what the CLI gives.
* Peers, when installed (``_peers.py``; skipped with a note otherwise), each speaking its own
  protocol: mkdocs serve (long polling), sphinx-autobuild (WebSocket ``refresh``),
  python-livereload (LiveReload protocol 7 over WebSocket), Bengal serve 0.1.2 (SSE at
  ``/__bengal_reload__``; under its own Python >= 3.13, ``$PUNIE_BENGAL_PYTHON``). Bengal's
  build handler waits ``DEBOUNCE_DELAY`` (0.2 s) after a change: it runs with 0, like the
  DevApp, and (full mode) a single-client row shows its default.

Two configurations: **no build command** (the served file itself is edited; each server
watches the site) and a **trivial build** (a source file is edited, the build copies it into the
site): every server runs the same command, ``cp src/index.html site/index.html``, as a process
started without a shell (the DevApp's ``--build``; each peer's build callback, python-livereload
through its own ``shell()``). In full mode each peer is measured a second time with its build
callback copying in-process (``shutil.copyfile``): a reference no server running a build
*command* can reach, since starting a process alone costs about 1 ms here.

Measured: for one client, p50/p99 over the trials; for 1,000 clients, per trial the time until
the *last* client has it ("all notified"), and per client. Baselines, in the same run: one
HTTP/1.1 keep-alive GET round trip to the DevApp server (the single-client ratio), and a Trio
memory-channel fan-out to 1,000 tasks in one process (the floor for the fan-out).

Also checked (full mode): whether a second save one second after a reload reaches the client
(python-livereload ignores changes for 3 s after a reload; its trials are spaced for that).
Long polling (mkdocs) is armed before each edit, and the edit waits until the server holds
every poll (a thread each), at most READY_TIMEOUT; a server that does not notify every client
within TRIAL_TIMEOUT is reported as such, with how many it reached.

Where the spread comes from: the DevApp child records its full (generation 2) garbage
collections, and this process its own; each 1,000-client trial is printed with any full GC that
overlapped it, on either side.

Bounded: a fixed number of trials, each under a timeout. Usage:
python benchmarks/reload_latency.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import _peers
import hypercorn.config
import hypercorn.trio
import trio
import trio.testing

from punie_trio.web import _fast_send
from punie_trio.web.dev import DevApp

MANY = 1000
TRIAL_TIMEOUT = 20.0
#: (single-client trials, 1,000-client trials) per server and configuration.
TRIALS = {"DevApp": (40, 10), "peer": (12, 2)}
QUICK_TRIALS = {"DevApp": (10, 3), "peer": (3, 0)}
#: Pause after a peer's notification before the next edit, so a late duplicate notification
#: cannot be taken for the next trial's.
PEER_SETTLE = 0.3
#: Longest wait for a long-polling server to hold every poll before an edit.
READY_TIMEOUT = 30.0
#: How long to wait for the notification of a save made one second after a reload.
FOLLOWUP_WAIT = 2.5
PAGE = "<!doctype html><html><head><title>t</title></head><body>{}</body></html>"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


# -- GC diagnostics ----------------------------------------------------------------------------

FULL_GCS: list[tuple[float, float]] = []  # (start, duration) of generation-2 collections
_gc_started = 0.0


def _on_gc(phase: str, info: dict[str, int]) -> None:
    global _gc_started
    if info["generation"] != 2:
        return
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        FULL_GCS.append((_gc_started, time.perf_counter() - _gc_started))


def overlapping(gcs: list[tuple[float, float]], t0: float, t1: float) -> list[float]:
    return [d for s, d in gcs if s < t1 and s + d > t0]


# -- the DevApp --------------------------------------------------------------------------------


async def serve(root: Path, build: bool, debounce: float) -> None:
    """Child process: the dev app on a free port; prints its URL, runs until stdin closes, then
    prints its full GCs (perf_counter is CLOCK_MONOTONIC: comparable across processes)."""
    gc.callbacks.append(_on_gc)
    _fast_send.install()  # what punie-trio serve does
    gc_setting = _gc_experiment()
    site = root / "site"
    dev = DevApp(
        site_dir=site,
        project_root=root,
        closing=trio.Event(),
        build_cmd="cp src/index.html site/index.html" if build else None,
        watch=[root / "src"] if build else [site],
        debounce=debounce,
    )
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.backlog = 2048
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        if "freeze" in gc_setting:
            gc.freeze()  # everything alive once the server is up leaves the collector's view
        binds = await nursery.start(
            functools.partial(hypercorn.trio.serve, dev, config, shutdown_trigger=dev.closing.wait)
        )
        if not gc_setting:
            gc.freeze()  # as punie-trio serve does once it is serving
        print(binds[0], flush=True)
        await trio.wrap_file(sys.stdin).read()
        print(json.dumps(FULL_GCS), flush=True)
        dev.closing.set()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()


def _gc_experiment() -> str:
    """``$PUNIE_BENCH_GC``: an experiment with the server's collector, for measuring what a
    setting in ``punie-trio serve`` would do. Unset: as ``serve`` runs (``gc.freeze()`` once
    serving). Otherwise comma-separated: ``none`` (Python's defaults), ``freeze``
    (``gc.freeze()`` once the app is started) and/or ``threshold=A:B:C``
    (``gc.set_threshold(A, B, C)``)."""
    setting = os.environ.get("PUNIE_BENCH_GC", "")
    for part in setting.split(","):
        if part.startswith("threshold="):
            gc.set_threshold(*(int(x) for x in part.removeprefix("threshold=").split(":")))
    return setting


class SSEClient(_peers.RawSSEClient):
    """The DevApp's ``/__reload__`` stream."""

    PATH = b"/__reload__"
    OPENING = b": punie-trio live reload\n\n"

    async def wait_reload(self, generation: int) -> None:
        """Until the reload event of ``generation`` (every edit is one generation)."""
        needle = b".%d\nevent: reload" % generation  # the end of ``id: <run>.<generation>``
        while needle not in self.buffer:
            await self.read_more()
        self.buffer = self.buffer[self.buffer.index(needle) + len(needle) :]


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


# -- servers as the trials see them --------------------------------------------------------------


class Target:
    """One server under test: how to start it, and its clients' protocol."""

    name = ""
    single_only = False  # no 1,000-client trials (a row showing a default setting)
    reload_gap = 0.0  # the server refuses a reload this soon after the previous one
    settle = 0.0  # pause after a notification before the next edit
    server_gcs: list[tuple[float, float]] | None = None

    def server(self, root: Path, build: bool) -> Any:
        raise NotImplementedError

    def client(self, host: str, port: int) -> Any:
        raise NotImplementedError

    async def connect(self, client: Any) -> None:
        await client.connect()

    #: Clients connecting (or re-polling) at once.
    concurrency = 64

    async def arm(self, client: Any) -> None:
        """Before each trial (long polling: send the poll)."""

    async def ready(self, pid: int, clients: int) -> str:
        """Before each edit: until the server holds every client's request, where that can be
        observed (long polling: a thread per parked poll). Returns a note if it did not."""
        return ""

    async def wait(self, client: Any, edit: int) -> None:
        """Until the notification of the ``edit``-th edit of this server's run."""
        raise NotImplementedError


class DevAppTarget(Target):
    def __init__(self, debounce: float = 0.0) -> None:
        self.debounce = debounce
        self.name = "DevApp" if debounce == 0 else f"DevApp, debounce {debounce:g} s (default)"
        self.single_only = debounce != 0
        self.rtt: list[float] = []

    @asynccontextmanager
    async def server(self, root: Path, build: bool) -> AsyncIterator[tuple[str, int, int]]:
        argv = [sys.executable, __file__, "--serve", str(root), str(int(build)), str(self.debounce)]
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                functools.partial(
                    trio.run_process, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
            )
            out = b""
            while not out.endswith(b"\n"):
                out += await proc.stdout.receive_some(1024)
            host, port = out.decode().strip().removeprefix("http://").rsplit(":", 1)
            self.rtt = await http_round_trips(host, int(port), 200)
            try:
                yield host, int(port), proc.pid
            finally:
                with trio.CancelScope(shield=True):
                    await proc.stdin.aclose()
                    out = b""
                    while chunk := await proc.stdout.receive_some(65536):
                        out += chunk
                    self.server_gcs = [tuple(x) for x in json.loads(out.splitlines()[0])]

    def client(self, host: str, port: int) -> SSEClient:
        return SSEClient(host, port)

    async def wait(self, client: Any, edit: int) -> None:
        await client.wait_reload(edit)


class PeerTarget(Target):
    def __init__(
        self,
        peer: _peers.Peer,
        python: str,
        *,
        env: dict[str, str] | None = None,
        name: str = "",
        single_only: bool = False,
        in_process_build: bool = False,
    ) -> None:
        self.peer, self.python = peer, python
        build = {"PUNIE_BENCH_PEER_BUILD": "copy" if in_process_build else "command"}
        self.env = {**(env or {}), **build}
        self.name = name or peer.title
        if in_process_build:
            self.name += ", in-process copy"
        self.single_only = single_only
        #: Only measured with a build (the variant whose build is a Python call, not a
        #: command: a reference, as no server can run a command that fast).
        self.build_only = in_process_build
        self.reload_gap = peer.reload_gap
        self.settle = PEER_SETTLE

    @asynccontextmanager
    async def server(self, root: Path, build: bool) -> AsyncIterator[tuple[str, int, int]]:
        src = root / "src" if build else None
        peer = _peers.run_peer(self.peer, self.python, root / "site", src, env=self.env)
        async with peer as server:
            self.server_gcs = None
            if self.reload_gap:  # its throttle counts from its start: let it pass
                await trio.sleep(self.reload_gap)
            yield server

    def client(self, host: str, port: int) -> Any:
        if self.peer.key == "mkdocs":
            return _peers.LongPollClient(host, port)
        if self.peer.key == "bengal":
            return _peers.BengalSSEClient(host, port)
        return _peers.WebSocketClient(host, port)

    async def connect(self, client: Any) -> None:
        if self.peer.key == "mkdocs":
            await client.connect("/index.html")
        elif self.peer.key == "bengal":
            await client.connect()
        elif self.peer.key == "sphinx-autobuild":
            await client.connect("/websocket-reload")
        else:
            await client.connect("/livereload")
            await _peers.livereload_handshake(client)

    async def arm(self, client: Any) -> None:
        if self.peer.key == "mkdocs":
            await client.arm()
        elif self.peer.key == "bengal":
            client.discard()  # a late second message for the previous save

    async def ready(self, pid: int, clients: int) -> str:
        if self.peer.key != "mkdocs":
            return ""  # the connection handshakes already proved the server holds the client
        base = 4  # main, serve, watchdog emitter and observer threads
        with trio.move_on_after(READY_TIMEOUT):
            while _threads(pid) - base < clients:  # noqa: ASYNC110 (polling another process)
                await trio.sleep(0.05)
            return ""
        held = max(0, _threads(pid) - base)
        return (
            f"when the file was saved the server held only {held} of the {clients} polls, "
            f"{READY_TIMEOUT:.0f} s after they were sent (its listen backlog is 5: the rest "
            "wait for SYN-ACK retransmits)"
        )

    async def wait(self, client: Any, edit: int) -> None:
        if self.peer.key in ("mkdocs", "bengal"):
            await client.wait_reload()
        elif self.peer.key == "sphinx-autobuild":
            await client.wait_for(lambda text: text == "refresh")
        else:
            await client.wait_for(_peers.is_livereload_reload)


def _threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(f.read().split("Threads:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


# -- trials -----------------------------------------------------------------------------------


async def _all(clients: list[Any], fn: Callable[[Any], Awaitable[None]], limit: int) -> None:
    """``fn`` on every client, at most ``limit`` at once."""
    gate = trio.Semaphore(limit)

    async def one(c: Any) -> None:
        async with gate:
            await fn(c)

    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(one, c)


class Run:
    """One server in one configuration: its trials' latencies and context."""

    def __init__(self, target: Target, build: bool) -> None:
        self.target, self.build = target, build
        self.single: list[float] = []
        self.many: list[list[float]] = []  # per trial, every client's latency
        self.windows: list[tuple[float, float]] = []  # per 1,000-client trial: (t0, last)
        self.server_gcs: list[tuple[float, float]] = []
        self.rtt: list[float] = []
        self.note = ""
        #: Clients notified in a trial that did not reach all of them within TRIAL_TIMEOUT.
        self.incomplete: int | None = None
        self.readiness = ""
        #: Whether a save one second after a reload was delivered (None: not checked).
        self.followup: bool | None = None


async def measure(target: Target, build: bool, one: int, many: int, followup: bool) -> Run:
    run = Run(target, build)
    with tempfile.TemporaryDirectory(prefix="punie-bench-reload-") as tmp:
        root = Path(tmp)
        site, src = root / "site", root / "src"
        site.mkdir()
        src.mkdir()
        for d in (site, src):
            (d / "index.html").write_text(PAGE.format(0))
        (site / "small.txt").write_text("0123456789abcdefghij")
        edited = (src if build else site) / "index.html"
        counter = 0
        last_reload = 0.0

        async def trial(clients: list[Any], pid: int) -> tuple[float, list[float]]:
            """One edit; the latencies of the clients notified within TRIAL_TIMEOUT."""
            nonlocal counter, last_reload
            counter += 1
            wait_until = max(last_reload + target.reload_gap, time.perf_counter()) + target.settle
            await trio.sleep(max(0.0, wait_until - time.perf_counter()))
            await _all(clients, target.arm, target.concurrency)
            readiness = await target.ready(pid, len(clients))
            if readiness:
                run.readiness = readiness
            arrivals: list[float] = []

            async def receive(c: Any) -> None:
                await target.wait(c, counter)
                arrivals.append(time.perf_counter())

            with trio.move_on_after(TRIAL_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for c in clients:
                        nursery.start_soon(receive, c)
                    await trio.testing.wait_all_tasks_blocked(0.01)
                    t0 = time.perf_counter()
                    edited.write_text(PAGE.format(counter))
            last_reload = max(arrivals, default=time.perf_counter())
            return t0, [a - t0 for a in arrivals]

        async def second_save(client: Any, pid: int) -> bool:
            """A save one second after a reload: is it delivered (within FOLLOWUP_WAIT)?"""
            nonlocal counter, last_reload
            await trial([client], pid)
            await trio.sleep(1.0)
            counter += 1
            await target.arm(client)
            edited.write_text(PAGE.format(counter))
            with trio.move_on_after(FOLLOWUP_WAIT) as scope:
                await target.wait(client, counter)
            last_reload = time.perf_counter()
            return not scope.cancelled_caught

        async with target.server(root, build) as (host, port, pid):
            client = target.client(host, port)
            await target.connect(client)
            for _ in range(one):
                _, latencies = await trial([client], pid)
                if not latencies:
                    run.note = f"(no notification within {TRIAL_TIMEOUT:.0f} s)"
                    break
                run.single.append(latencies[0])
            if followup and run.single:
                run.followup = await second_save(client, pid)
            await client.aclose()
            if many:
                clients = [target.client(host, port) for _ in range(MANY)]
                await _all(clients, target.connect, target.concurrency)
                for _ in range(many):
                    t0, latencies = await trial(clients, pid)
                    if len(latencies) < MANY:  # clients left waiting: no further trial
                        run.incomplete = len(latencies)
                        break
                    run.many.append(latencies)
                    run.windows.append((t0, t0 + max(latencies)))
                for c in clients:
                    await c.aclose()
        run.rtt = getattr(target, "rtt", [])
    run.server_gcs = target.server_gcs or []
    return run


def report(runs: list[Run], fanout: list[float]) -> None:
    for build in (False, True):
        group = [r for r in runs if r.build == build]
        if not group:
            continue
        print(f"\n== {'trivial build (cp one file)' if build else 'no build command'} ==")
        dev = next((r for r in group if r.target.name == "DevApp"), None)
        dev50 = pct(dev.single, 0.5) if dev and dev.single else None
        rtt = dev.rtt if dev else []
        if rtt:
            print(f"baseline: HTTP keep-alive GET round trip p50 {ms(pct(rtt, 0.5))}")
        print("1 client:")
        for r in group:
            if not r.single:
                print(f"  {r.target.name:34} {r.note}")
                continue
            s50 = pct(r.single, 0.5)
            parts = [f"x{s50 / pct(rtt, 0.5):.0f} a round trip"] if rtt else []
            if dev50 is not None and r is not dev:
                parts.append(f"x{s50 / dev50:.1f} the DevApp's")
            parts.append(f"n={len(r.single)}")
            print(
                f"  {r.target.name:34} p50 {ms(s50):>9}  p99 {ms(pct(r.single, 0.99)):>9}  "
                f"max {ms(max(r.single)):>9}  ({'; '.join(parts)})"
            )
        checked = [r for r in group if r.followup is not None]
        if checked:
            print("a second save 1 s after a reload (same client, notified within "
                  f"{FOLLOWUP_WAIT:g} s?):")  # fmt: skip
            for r in checked:
                print(f"  {r.target.name:34} {'yes' if r.followup else 'NO: not delivered'}")
        print(f"{MANY} clients, all notified (baseline: Trio channel fan-out to {MANY} tasks in "
              f"one process p50 {ms(statistics.median(fanout))}):")  # fmt: skip
        dev_all = [max(t) for t in dev.many] if dev and dev.many else []
        for r in group:
            if r.incomplete is not None:
                print(
                    f"  {r.target.name:34} NOT all notified: {r.incomplete} of {MANY} within "
                    f"{TRIAL_TIMEOUT:.0f} s in trial {len(r.many) + 1} (trials stopped there)"
                )
                if r.readiness:
                    print(f"  {'':34} ({r.readiness})")
            if not r.many:
                if r.note and r.incomplete is None:
                    print(f"  {r.target.name:34} {r.note}")
                continue
            worst = [max(t) for t in r.many]
            per = [x for t in r.many for x in t]
            versus = ""
            if dev_all and r is not dev:
                versus = f", x{statistics.median(worst) / statistics.median(dev_all):.1f} DevApp's"
            print(
                f"  {r.target.name:34} p50 {ms(statistics.median(worst)):>9}  "
                f"max {ms(max(worst)):>9}  per client p50 {ms(pct(per, 0.5))} "
                f"p99 {ms(pct(per, 0.99))}  (n={len(worst)} trials{versus})"
            )
            trials = []
            for (t0, t1), w in zip(r.windows, worst, strict=True):
                causes = [f"server full GC {ms(d)}" for d in overlapping(r.server_gcs, t0, t1)]
                causes += [f"client full GC {ms(d)}" for d in overlapping(FULL_GCS, t0, t1)]
                trials.append(ms(w) + (f" ({', '.join(causes)})" if causes else ""))
            print(f"  {'':34} trials: {'; '.join(trials)}")


async def main(quick: bool, only: list[str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    gc.callbacks.append(_on_gc)
    trials = QUICK_TRIALS if quick else TRIALS
    fanout = await channel_fanout(MANY, 20)
    targets: list[Target] = [DevAppTarget(0.0)]
    if not quick:
        targets.append(DevAppTarget(0.2))
    for peer in _peers.PEERS:
        python, note = _peers.find_peer(peer)
        print(note)
        if python is None:
            pass
        elif peer.key == "bengal":
            debounce = {"PUNIE_BENCH_BENGAL_DEBOUNCE": "0"}
            targets.append(PeerTarget(peer, python, env=debounce))
            if not quick:
                targets.append(PeerTarget(peer, python, env=debounce, in_process_build=True))
                default = {"PUNIE_BENCH_BENGAL_DEBOUNCE": "0.2"}
                name = f"{peer.title}, DEBOUNCE_DELAY 0.2 s (default)"
                targets.append(PeerTarget(peer, python, env=default, name=name, single_only=True))
        else:
            targets.append(PeerTarget(peer, python))
            if not quick:
                targets.append(PeerTarget(peer, python, in_process_build=True))
    if only:
        targets = [t for t in targets if any(o.lower() in t.name.lower() for o in only)]
    runs = []
    for build in (False, True):
        for target in targets:
            if getattr(target, "build_only", False) and not build:
                continue
            one, many = trials["DevApp" if isinstance(target, DevAppTarget) else "peer"]
            if target.single_only:
                many = 0
            print(f"measuring {target.name}, {'trivial build' if build else 'no build'}...",
                  flush=True)  # fmt: skip
            run = await measure(target, build, one, many, followup=not quick)
            if not many:
                run.note = (
                    "(--quick: 1,000-client runs of peers skipped)"
                    if quick and isinstance(target, PeerTarget)
                    else "(single client only)"
                )
            runs.append(run)
    report(runs, fanout)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        trio.run(serve, Path(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("--quick", action="store_true", help="fewer trials (under a minute)")
        parser.add_argument("--only", nargs="*", default=[], help="servers whose name contains")
        args = parser.parse_args()
        print(f"Python {sys.version.split()[0]}, trio {trio.__version__}")
        trio.run(main, args.quick, args.only)
