"""Echo prompt round trips: 1, 10 and 100 concurrent clients.

Each client has its own WebSocket connection and session and sends echo prompts one after
another (a 16-word prompt, answered with ``--chunks`` ``session/update`` chunks, default 1
as the ACP SDK's reference echo agent does, then the answer); the round trip is from sending
``session/prompt`` to receiving its answer, the updates included. Reports p50/p99 and
prompts/s for, in the same run and interleaved level by level:

- punie-trio ``--model echo`` (``echo:N`` for ``--chunks N``; sqlite store, the default, and
  ``--store memory``);
- raw Hypercorn-trio ASGI WebSocket app, ``/echo`` (one frame back) and ``/stream`` (the
  same N + 1 frames punie-trio sends; benchmarks/_raw_server.py);
- the official ACP SDK's ASGI app under uvicorn, same echo chunks (benchmarks/_sdk_server.py).

Targets: punie-trio p50 within 2x of the raw echo; punie-trio ahead of the SDK on prompts/s.

Each level runs in ``--rounds`` rounds (default 3; the prompts are split between them), every
target once per round, the order rotating. p50/p99 are over all rounds' round trips; the
verdicts are the medians of the per-round ratios (each against the baseline measured
moments before or after in the same round), which a drift of the machine's speed over the
run does not move the way one pass per target does.

    python benchmarks/prompt_latency.py [--quick] [--chunks 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import (
    PROMPT_TEXT,
    AcpClient,
    CpuMeter,
    Server,
    header,
    percentile,
    raise_nofile,
    tmpdirs,
    versions,
    ws_connect,
)

LEVEL_DEADLINE = 60.0  # seconds of measuring per (target, level), at most
ECHO_FRAME = (
    '{"jsonrpc":"2.0","id":1,"method":"session/prompt","params":{"sessionId":"sess_raw",'
    f'"prompt":[{{"type":"text","text":"{PROMPT_TEXT}"}}]}}}}'
)

Op = Callable[[], Awaitable[None]]


class Target:
    def __init__(self, name: str, server: Server, open_client: Callable[[], Awaitable[Any]]):
        self.name = name
        self.server = server
        self.open_client = open_client


CHUNKS = 1  # set from --chunks


async def acp_op_factory(url: str, project: Path) -> tuple[Op, Callable[[], Awaitable[None]]]:
    client = await AcpClient.open(url, cwd=project)

    async def op() -> None:
        stop, updates = await client.prompt()
        if stop != "end_turn" or updates != CHUNKS:
            raise RuntimeError(f"bad echo turn: {stop} with {updates} updates")

    return op, client.close


async def stream_op_factory(url: str) -> tuple[Op, Callable[[], Awaitable[None]]]:
    client = AcpClient(await ws_connect(url))
    client.session_id = "sess_raw"

    async def op() -> None:
        stop, updates = await client.prompt()
        assert stop == "end_turn" and updates == CHUNKS

    return op, client.close


async def echo_op_factory(url: str) -> tuple[Op, Callable[[], Awaitable[None]]]:
    ws = await ws_connect(url)

    async def op() -> None:
        await ws.send(ECHO_FRAME)
        await ws.recv()

    return op, ws.close


async def run_level(target: Target, clients: int, per_client: int, warmup: int) -> dict[str, Any]:
    pairs = await asyncio.gather(*(target.open_client() for _ in range(clients)))
    latencies: list[float] = []
    deadline = time.perf_counter() + LEVEL_DEADLINE

    async def worker(op: Op, count: int, record: bool) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            await op()
            if record:
                latencies.append(time.perf_counter() - t0)
                if t0 > deadline:
                    return

    await asyncio.gather(*(worker(op, warmup, False) for op, _ in pairs))
    with CpuMeter(target.server.pid) as cpu:
        await asyncio.gather(*(worker(op, per_client, True) for op, _ in pairs))
    await asyncio.gather(*(close() for _, close in pairs))
    return {
        "n": len(latencies),
        "latencies": [x * 1000 for x in latencies],
        "p50": percentile(latencies, 50) * 1000,
        "p99": percentile(latencies, 99) * 1000,
        "rate": len(latencies) / cpu.wall,
        "cpu": cpu.describe(),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts")
    parser.add_argument(
        "--chunks", type=int, default=1, help="chunks per echo answer (default 1; 16 streams)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per level (verdicts: median of rounds)"
    )
    args = parser.parse_args()
    global CHUNKS
    CHUNKS = args.chunks
    raise_nofile()
    # (clients, prompts per client)
    levels = [(1, 200), (10, 50), (100, 10)] if args.quick else [(1, 3000), (10, 600), (100, 150)]
    header(f"prompt_latency: echo prompt round trips ({CHUNKS} chunk(s) + answer)")
    print(versions(), f"load average at start {os.getloadavg()[0]:.2f}", sep="; ")
    holder, project, data = tmpdirs("prompt")
    mem_data = data.parent / "data-mem"
    mem_data.mkdir()
    model = "echo" if CHUNKS == 1 else f"echo:{CHUNKS}"
    common = ("--model", model, "--prompts-per-minute", "100000000", "--max-connections", "1000")
    servers = {
        "raw": Server.raw(CHUNKS),
        "punie": Server.punie(project, data, *common),
        "punie-mem": Server.punie(project, mem_data, *common, "--store", "memory"),
        "sdk": Server.sdk(CHUNKS),
    }
    with holder:
        try:
            for s in servers.values():
                s.start()
            raw, punie, punie_mem, sdk = (servers[k] for k in ("raw", "punie", "punie-mem", "sdk"))
            stream_name = f"raw stream ({CHUNKS + 1} frames)"
            targets = [
                Target("raw echo (1 frame)", raw, lambda: echo_op_factory(raw.url("/echo"))),
                Target(stream_name, raw, lambda: stream_op_factory(raw.url("/stream"))),
                Target("punie-trio (sqlite)", punie, lambda: acp_op_factory(punie.url(), project)),
                Target(
                    "punie-trio (memory)",
                    punie_mem,
                    lambda: acp_op_factory(punie_mem.url(), project),
                ),
                Target("ACP SDK + uvicorn", sdk, lambda: acp_op_factory(sdk.url(), project)),
            ]
            for clients, per_client in levels:
                per_round = max(1, per_client // args.rounds)
                print(
                    f"\n-- {clients} concurrent client(s), {per_client} prompts each, in "
                    f"{args.rounds} rounds --"
                )
                rounds: list[dict[str, dict[str, Any]]] = []
                for rnd in range(args.rounds):
                    # Each round runs every target back to back, starting one further along
                    # each time: a drift of the machine's speed (tens of percent over a run
                    # on a shared VM) hits every target, and the verdicts are medians of
                    # the rounds' own ratios.
                    order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                    results: dict[str, dict[str, Any]] = {}
                    for target in order:
                        results[target.name] = await run_level(
                            target, clients, per_round, warmup=max(2, 50 // clients)
                        )
                    rounds.append(results)
                for target in targets:
                    runs = [r[target.name] for r in rounds]
                    pooled = sorted(x for run in runs for x in run["latencies"])
                    rate = statistics.median(run["rate"] for run in runs)
                    print(
                        f"{target.name:<24} p50 {percentile(pooled, 50):7.2f} ms  p99 "
                        f"{percentile(pooled, 99):7.2f} ms  {rate:7.0f} prompts/s "
                        f"(median of rounds; n={len(pooled)}; last round: {runs[-1]['cpu']})",
                        flush=True,
                    )
                for name in ("punie-trio (sqlite)", "punie-trio (memory)"):
                    p50_ratio = statistics.median(
                        r[name]["p50"] / r["raw echo (1 frame)"]["p50"] for r in rounds
                    )
                    stream_ratio = statistics.median(
                        r[name]["p50"] / r[stream_name]["p50"] for r in rounds
                    )
                    sdk_ratio = statistics.median(
                        r[name]["rate"] / r["ACP SDK + uvicorn"]["rate"] for r in rounds
                    )
                    listed = ", ".join(
                        f"{r[name]['rate'] / r['ACP SDK + uvicorn']['rate']:.2f}" for r in rounds
                    )
                    print(
                        f"  -> {name}: p50 {p50_ratio:.2f}x raw echo "
                        f"({'MET' if p50_ratio <= 2 else 'MISSED'} <= 2x), "
                        f"{stream_ratio:.2f}x raw stream; prompts/s {sdk_ratio:.2f}x the SDK "
                        f"(rounds {listed}; {'MET' if sdk_ratio > 1 else 'MISSED'}: ahead)",
                        flush=True,
                    )
        finally:
            for s in servers.values():
                s.stop()
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
