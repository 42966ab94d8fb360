"""Shared helpers for the end-to-end benchmarks (not a benchmark itself).

- :func:`raise_nofile`: lift RLIMIT_NOFILE to the hard limit (children inherit it).
- :class:`Server`: start a server subprocess (punie-trio, the raw Hypercorn-trio baseline,
  or the ACP SDK under uvicorn), parse its port from stderr, measure its RSS and CPU time,
  stop it with SIGTERM.
- :class:`AcpClient`: a minimal ACP client on asyncio ``websockets`` (no compression, no
  size limit, no keepalive pings): cheap enough to be the load generator.
- :func:`percentile`, :func:`cpu_seconds`, :func:`rss_kib`, :func:`report`.

The load generators run on asyncio ``websockets`` (sans-I/O core with a C frame-masking
speedup) rather than trio-websocket (pure-Python wsproto): on a 2-core box the client must
stay well below one core while the server saturates the other. Every benchmark prints the
client's and the server's CPU use over the measured interval so that can be checked.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

HERE = Path(__file__).resolve().parent
TOKEN = "bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LISTENING = re.compile(r"listening on http://([^\s:/]+|\[[^\]]+\]):(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# How an echo prompt is written by every prompt benchmark: 16 words. ``--model echo``
# answers it in one chunk (like the SDK's reference echo agent); ``echo:16`` streams one word
# per chunk. The raw and SDK baselines stream the same chunks (env BENCH_ECHO_CHUNKS).
PROMPT_TEXT = " ".join(f"word{i:02d}" for i in range(16))


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Server:
    """A server subprocess that prints ``... listening on http://HOST:PORT`` to stderr."""

    def __init__(self, argv: list[str], *, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=50)

    @classmethod
    def punie(
        cls,
        project: Path,
        data_dir: Path,
        *extra: str,
        name: str = "punie-trio",
    ) -> Server:
        argv = [
            sys.executable, "-m", "punie_trio", "serve",
            "--port", "0",
            "--project", str(project),
            "--data-dir", str(data_dir),
            "--token", TOKEN,
            *extra,
        ]  # fmt: skip
        # An empty config file keeps a developer's own config out of the figures.
        env = dict(os.environ)
        for key in list(env):
            if key.startswith("PUNIE_"):
                del env[key]
        config = data_dir.parent / f"{data_dir.name}.toml"
        config.write_text("")
        argv[4:4] = ["--config", str(config)]
        return cls(argv, name=name, env=env)

    @classmethod
    def raw(cls, echo_chunks: int = 16) -> Server:
        return cls(
            [sys.executable, str(HERE / "_raw_server.py")],
            name="raw hypercorn-trio",
            env={**os.environ, "BENCH_ECHO_CHUNKS": str(echo_chunks)},
        )

    @classmethod
    def sdk(cls, echo_chunks: int = 16) -> Server:
        return cls(
            [sys.executable, str(HERE / "_sdk_server.py")],
            name="ACP SDK + uvicorn",
            env={**os.environ, "BENCH_ECHO_CHUNKS": str(echo_chunks)},
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str = "/acp") -> str:
        return f"ws://{self.host}:{self.port}{path}"

    def start(self, timeout: float = 30.0) -> Server:
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=HERE.parent,
        )
        assert self.proc.stderr is not None
        found = threading.Event()

        def drain() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr_tail.append(line.rstrip())
                if not found.is_set():
                    m = LISTENING.search(line)
                    if m:
                        self.host = m.group(1).strip("[]")
                        self.port = int(m.group(2))
                        found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(timeout):
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.stderr_tail))
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tmpdirs(prefix: str) -> tuple[tempfile.TemporaryDirectory[str], Path, Path]:
    """(holder, project dir, data dir) under one temporary directory."""
    holder = tempfile.TemporaryDirectory(prefix=f"punie-bench-{prefix}-")
    root = Path(holder.name)
    project = root / "project"
    data = root / "data"
    project.mkdir()
    data.mkdir()
    return holder, project.resolve(), data


async def ws_connect(url: str, *, headers: dict[str, str] | None = None) -> ClientConnection:
    return await connect(
        url,
        additional_headers=headers or AUTH,
        compression=None,
        max_size=None,
        max_queue=None,
        ping_interval=None,
        open_timeout=60,
        close_timeout=5,
    )


class RpcFailure(Exception):
    pass


_INFO_UPDATE = '"sessionUpdate":"session_info_update"'


def _is_update(text: str | bytes) -> bool:
    # Cheap test instead of json.loads on every streamed frame (the client's hot path): a
    # notification carries "method" and no "id" near its start; responses are parsed.
    head = text[:80] if isinstance(text, str) else text[:80].decode(errors="replace")
    return '"session/update"' in head and '"id"' not in head


class AcpClient:
    """Just enough ACP: initialize, session/new, session/load, session/prompt; counts the
    ``session/update`` notifications that arrive before each answer."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.session_id: str | None = None

    @classmethod
    async def open(cls, url: str, *, cwd: Path | None = None) -> AcpClient:
        client = cls(await ws_connect(url))
        await client.call("initialize", {"protocolVersion": 1})
        if cwd is not None:
            result, _ = await client.call("session/new", {"cwd": str(cwd), "mcpServers": []})
            client.session_id = result["sessionId"]
        return client

    async def call(self, method: str, params: dict[str, Any]) -> tuple[Any, int]:
        """Send a request; return (result, number of session/update frames before it)."""
        request_id = self.next_id
        self.next_id += 1
        await self.ws.send(
            json.dumps(
                {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
                separators=(",", ":"),
            )
        )
        updates = 0
        while True:
            text = await self.ws.recv()
            if _is_update(text):
                # (A session's first answer also names it: not one of the turn's updates.)
                updates += not (isinstance(text, str) and _INFO_UPDATE in text)
                continue
            msg = json.loads(text)
            if msg.get("id") == request_id and "method" not in msg:
                if "error" in msg:
                    raise RpcFailure(f"{method}: {msg['error']}")
                return msg["result"], updates
            if msg.get("method") == "session/update":
                updates += 1
            elif "method" in msg and "id" in msg:
                raise RpcFailure(f"unexpected request from the agent: {msg['method']}")

    async def prompt(self, text: str = PROMPT_TEXT) -> tuple[str, int]:
        assert self.session_id is not None
        result, updates = await self.call(
            "session/prompt",
            {"sessionId": self.session_id, "prompt": [{"type": "text", "text": text}]},
        )
        return result["stopReason"], updates

    async def close(self) -> None:
        await self.ws.close()


def machine_ticks() -> tuple[int, int] | None:
    """(steal, total) clock ticks of every CPU since boot, from ``/proc/stat``; None where
    there is none. Steal is time the hypervisor gave this VM's CPUs to someone else: a run
    with much of it measured the neighbours as much as the code."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is counted in user)
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


class CpuMeter:
    """Client (this process) and server CPU seconds over an interval, wall time, and the
    share of the machine's CPU time stolen by the hypervisor (``steal``, None off Linux)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.steal: float | None = None

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.s0 = cpu_seconds(self.server_pid)
        self.m0 = machine_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.client = time.process_time() - self.c0
        self.server = cpu_seconds(self.server_pid) - self.s0
        m1 = machine_ticks()
        if self.m0 is not None and m1 is not None and m1[1] > self.m0[1]:
            self.steal = (m1[0] - self.m0[0]) / (m1[1] - self.m0[1])

    def describe(self) -> str:
        steal = "" if self.steal is None else f", steal {100 * self.steal:.0f}%"
        return (
            f"CPU over {self.wall:.2f} s: server {100 * self.server / self.wall:.0f}% "
            f"of a core, client {100 * self.client / self.wall:.0f}%{steal}"
        )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def header(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def versions() -> str:
    import hypercorn  # noqa: F401
    import trio

    from punie_trio._version import __version__

    return (
        f"python {sys.version.split()[0]}, punie-trio {__version__}, trio {trio.__version__}, "
        f"websockets {websockets.__version__} (client), cores {os.cpu_count()}"
    )
