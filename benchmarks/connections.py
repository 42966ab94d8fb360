"""Idle connections: server memory per connection and time to connect them all.

For N = 1,000 and 5,000 (``--quick``: 200): open N WebSocket connections to punie-trio,
each initialized and holding one session (``initialize`` + ``session/new``), 50 handshakes
in flight at a time; read the server's VmRSS before and after (after a 1 s settle) and
divide by N. Baseline, same run: N idle raw WebSocket connections to a minimal
Hypercorn-trio echo ASGI app (benchmarks/_raw_server.py). Target: <= 32 KB per connection.

    python benchmarks/connections.py [--quick] [--n 1000 --n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from _common import (
    AcpClient,
    CpuMeter,
    Server,
    header,
    raise_nofile,
    rss_kib,
    tmpdirs,
    versions,
    ws_connect,
)

CONCURRENT_HANDSHAKES = 50
TARGET_BYTES = 32 * 1024


async def open_many(server: Server, n: int, project: Path | None) -> list[object]:
    """Open n connections (ACP with a session when ``project`` is given, else raw)."""
    gate = asyncio.Semaphore(CONCURRENT_HANDSHAKES)

    async def one() -> object:
        async with gate:
            if project is not None:
                return await AcpClient.open(server.url("/acp"), cwd=project)
            return await ws_connect(server.url("/echo"))

    return list(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 600))


def abort_all(conns: list[object]) -> None:
    for c in conns:
        ws = c.ws if isinstance(c, AcpClient) else c
        ws.transport.abort()  # type: ignore[attr-defined]


async def measure(server: Server, n: int, project: Path | None) -> dict[str, float]:
    # Warm-up: the first connections import and allocate one-off things (codecs, caches).
    warm = await open_many(server, 20, project)
    abort_all(warm)
    await asyncio.sleep(1.0)
    before = rss_kib(server.pid)
    with CpuMeter(server.pid) as cpu:
        conns = await open_many(server, n, project)
    await asyncio.sleep(1.0)
    after = rss_kib(server.pid)
    if project is not None:
        assert all(isinstance(c, AcpClient) and c.session_id for c in conns)
    abort_all(conns)
    await asyncio.sleep(0.5)
    return {
        "n": n,
        "before_kib": before,
        "after_kib": after,
        "per_conn_bytes": (after - before) * 1024 / n,
        "connect_s": cpu.wall,
        "conn_per_s": n / cpu.wall,
        "server_cpu_pct": 100 * cpu.server / cpu.wall,
        "client_cpu_pct": 100 * cpu.client / cpu.wall,
    }


def show(label: str, r: dict[str, float]) -> None:
    print(
        f"{label:<22} N={r['n']:>5}: RSS {r['before_kib'] / 1024:6.1f} -> "
        f"{r['after_kib'] / 1024:6.1f} MiB = {r['per_conn_bytes'] / 1024:5.1f} KiB/conn; "
        f"connect all {r['connect_s']:.2f} s ({r['conn_per_s']:.0f}/s; CPU server "
        f"{r['server_cpu_pct']:.0f}%, client {r['client_cpu_pct']:.0f}%)",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 200 only")
    parser.add_argument("--n", type=int, action="append", help="connection counts")
    args = parser.parse_args()
    counts = args.n or ([200] if args.quick else [1000, 5000])
    limit = raise_nofile()
    header("connections: idle initialized connections with one session each")
    print(versions(), f"RLIMIT_NOFILE {limit}", sep="; ")
    results = []
    for n in counts:
        holder, project, data = tmpdirs("conns")
        with holder:
            with Server.raw() as raw:
                base = await measure(raw, n, None)
            show("raw hypercorn-trio", base)
            punie = Server.punie(
                project,
                data,
                "--max-connections", str(n + 100),
                "--max-sessions-per-connection", "4",
            )  # fmt: skip
            with punie:
                ours = await measure(punie, n, project)
            show("punie-trio (sqlite)", ours)
        ratio = ours["per_conn_bytes"] / base["per_conn_bytes"]
        verdict = "MET" if ours["per_conn_bytes"] <= TARGET_BYTES else "MISSED"
        print(
            f"  -> N={n}: punie-trio {ours['per_conn_bytes'] / 1024:.1f} KiB/conn vs raw "
            f"{base['per_conn_bytes'] / 1024:.1f} KiB/conn: ratio {ratio:.2f}x; "
            f"target <= 32 KiB: {verdict}; connect time ratio "
            f"{ours['connect_s'] / base['connect_s']:.2f}x",
            flush=True,
        )
        results.append((n, base, ours))
        await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
