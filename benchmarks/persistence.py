"""What persistence costs: turns/s with ``--store sqlite`` vs ``--store memory``, and the
time of ``session/load`` for a 1,000-turn session.

1. Turns/s: a scripted model (one turn of 20 ``{"text": ...}`` steps of 60 characters, written
   here) run by 1 client (N turns one after another) and by 10 concurrent clients (each its
   own connection and session), against a memory-store server and a sqlite-store server
   started side by side and measured back to back in each of ``--rounds`` rounds (default
   24, the order alternating; each run is 400 turns at 1 client, 200 a client at 10). The
   verdict is the median of the per-round sqlite/memory ratios, which a drift of the
   machine's speed over the run (tens of percent on a shared VM) does not move the way a
   ratio of totals does; their quartiles are printed beside it, and the server's CPU time
   per turn. Target: sqlite costs < 10%.

   Why 24 short rounds: one round's ratio moves by +-10% on this 2-core VM (its speed
   changes from second to second), so the median of 6 (the earlier default) moved by about
   5 points between runs and a cost near the target read as met in one run and missed in
   the next. The median of 24 is steadier within a run, but runs minutes apart still
   differ by more than that (the machine's speed changes over minutes, and the rounds of
   one run share it: -1.5% and 15.2% in two runs 20 minutes apart): read several runs,
   and the server's CPU per turn beside each. Each run prints the hypervisor's steal
   (``/proc/stat``); a round where either run lost more than 10% of the machine to it is
   measured again (up to 3 times).
2. ``session/load``: a session of 1,000 turns (20 transcript entries each: the user's
   prompt, a tool call and its update, 16 agent chunks, the stop) is written straight into
   a store file with ``open_sqlite_store`` + ``append_turn``; a server is started on that
   data directory and ``session/load`` is timed from request to answer, its 19,000 replayed
   updates included (fresh connection each time, median). Reference, same run: reading the
   transcript in-process with ``store.transcript()``. Target: < 200 ms.

    python benchmarks/persistence.py [--quick] [--rounds 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import trio
from _common import (
    AcpClient,
    CpuMeter,
    RpcFailure,
    Server,
    header,
    raise_nofile,
    tmpdirs,
    versions,
)

from punie_trio._paths import store_path
from punie_trio.store import SessionRecord, open_sqlite_store

TEXT_STEPS = 20
LOAD_TURNS = 1000
LOAD_TARGET_MS = 200.0
#: A round in which the hypervisor took more than this share of the machine from either run
#: is measured again, at most STEAL_ATTEMPTS times in all (then kept): the criterion is
#: outside what is measured, so it removes noise without favouring either store.
STEAL_RETRY = 0.10
STEAL_ATTEMPTS = 3


def write_script(path: Path) -> None:
    steps = [
        {"text": f"step {i:02d}: a sentence of a realistic streamed answer, 60 ch. "[:60]}
        for i in range(TEXT_STEPS)
    ]
    path.write_text(json.dumps({"turns": [steps]}))


async def turns_rate(
    server: Server, project: Path, clients: int, per_client: int
) -> dict[str, Any]:
    conns = await asyncio.gather(
        *(AcpClient.open(server.url(), cwd=project) for _ in range(clients))
    )

    async def worker(c: AcpClient, n: int) -> None:
        for _ in range(n):
            stop, updates = await c.prompt("a question about the code")
            assert stop == "end_turn" and updates == TEXT_STEPS, (stop, updates)

    await asyncio.gather(*(worker(c, 3) for c in conns))  # warm-up
    with CpuMeter(server.pid) as cpu:
        await asyncio.gather(*(worker(c, per_client) for c in conns))
    await asyncio.gather(*(c.close() for c in conns))
    turns = clients * per_client
    return {
        "rate": turns / cpu.wall,
        "cpu_per_turn": cpu.server / turns,
        "cpu": cpu.describe(),
        "steal": cpu.steal,
    }


def turn_entries(turn: int) -> list[tuple[str, dict[str, Any]]]:
    def chunk(text: str) -> dict[str, Any]:
        return {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": text}}

    call_id = f"call_{turn}"
    entries: list[tuple[str, dict[str, Any]]] = [
        (
            "user_message_chunk",
            {
                "sessionUpdate": "user_message_chunk",
                "content": {"type": "text", "text": f"question {turn}: what does main.py do?"},
            },
        ),
        (
            "tool_call",
            {
                "sessionUpdate": "tool_call",
                "toolCallId": call_id,
                "title": "Read src/main.py",
                "kind": "read",
                "status": "pending",
                "rawInput": {"path": "src/main.py"},
                "locations": [{"path": "src/main.py"}],
            },
        ),
        (
            "tool_call_update",
            {
                "sessionUpdate": "tool_call_update",
                "toolCallId": call_id,
                "status": "completed",
                "content": [
                    {"type": "content", "content": {"type": "text", "text": "def main(): ..."}}
                ],
            },
        ),
    ]
    for i in range(16):
        text = f"turn {turn} chunk {i:02d}: part of a streamed answer, sixty chars. "[:60]
        entries.append(("agent_message_chunk", chunk(text)))
    # As the server writes it: the turn's history rides on its stop entry.
    agent = "".join(e[1]["content"]["text"] for e in entries if e[0] == "agent_message_chunk")
    question = entries[0][1]["content"]["text"]
    entries.append(("stop", {"stopReason": "end_turn", "history": [question, agent]}))
    return entries


async def build_store(path: Path, project: Path, session_id: str) -> tuple[float, float, int]:
    """Write the 1,000-turn session; return (build seconds, transcript() seconds, entries)."""
    async with open_sqlite_store(path) as store:
        now = time.time()
        await store.create_session(
            SessionRecord(
                id=session_id,
                root=str(project),
                cwd=str(project),
                title="a long session",
                created_at=now,
                updated_at=now,
            )
        )
        t0 = time.perf_counter()
        for turn in range(LOAD_TURNS):
            await store.append_turn(session_id, turn, turn_entries(turn))
        built = time.perf_counter() - t0
    async with open_sqlite_store(path) as store:  # a fresh connection: a cold-ish read
        t0 = time.perf_counter()
        entries = await store.transcript(session_id)
        read = time.perf_counter() - t0
    return built, read, len(entries)


async def time_load(server: Server, project: Path, session_id: str) -> tuple[float, int]:
    client = await AcpClient.open(server.url())
    params = {"sessionId": session_id, "cwd": str(project), "mcpServers": []}
    for _ in range(50):
        try:
            t0 = time.perf_counter()
            _, updates = await client.call("session/load", params)
            elapsed = time.perf_counter() - t0
            break
        except RpcFailure as exc:  # the previous connection's session not yet dropped
            if "another connection" not in str(exc):
                raise
            await asyncio.sleep(0.1)
    else:
        raise RuntimeError("session stayed open on another connection")
    await client.close()
    await asyncio.sleep(0.2)
    return elapsed, updates


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns and loads")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="memory/sqlite rounds per level, the verdict their median (24; --quick 4)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (4 if args.quick else 24)
    raise_nofile()
    # Turns per run: at 1 client, and per client at 10.
    single, multi, loads = (50, 10, 3) if args.quick else (400, 200, 7)
    header("persistence: sqlite vs memory store, and session/load of 1,000 turns")
    print(versions(), f"load average at start {os.getloadavg()[0]:.2f}", sep="; ")
    holder, project, data = tmpdirs("persist")
    with holder:
        script = data.parent / "script.json"
        write_script(script)
        extra = ("--model", f"script:{script}", "--prompts-per-minute", "100000000",
                 "--max-connections", "1000")  # fmt: skip
        (data / "mem").mkdir()
        (data / "sql").mkdir()
        servers = {
            "memory": Server.punie(project, data / "mem", *extra, "--store", "memory"),
            "sqlite": Server.punie(project, data / "sql", *extra, "--store", "sqlite"),
        }
        try:
            for s in servers.values():
                s.start()
            for clients, per_client in ((1, single), (10, multi)):
                rates: dict[str, list[float]] = {"memory": [], "sqlite": []}
                cpu: dict[str, list[float]] = {"memory": [], "sqlite": []}
                steal: list[float] = []
                retried = 0
                for rnd in range(rounds):
                    # Each round measures both stores back to back, in alternating order, so a
                    # drift of the machine's speed (it moves by tens of percent over minutes
                    # on a shared VM) hits both; the verdict is the median of the rounds.
                    order = list(servers.items())
                    if rnd % 2:
                        order.reverse()
                    for attempt in range(1, STEAL_ATTEMPTS + 1):
                        runs: dict[str, dict[str, Any]] = {}
                        for name, server in order:
                            runs[name] = r = await turns_rate(server, project, clients, per_client)
                            print(
                                f"{clients:>2} client(s), round {rnd + 1}, {name:<6}: "
                                f"{r['rate']:7.1f} turns/s ({r['cpu']})",
                                flush=True,
                            )
                        stolen = max((r["steal"] or 0.0) for r in runs.values())
                        if stolen <= STEAL_RETRY or attempt == STEAL_ATTEMPTS:
                            break
                        retried += 1
                        print(f"    (steal {100 * stolen:.0f}%: round measured again)")
                    for name, r in runs.items():
                        rates[name].append(r["rate"])
                        cpu[name].append(r["cpu_per_turn"])
                        if r["steal"] is not None:
                            steal.append(r["steal"])
                ratios = [q / m for q, m in zip(rates["sqlite"], rates["memory"], strict=True)]
                cpu_ratios = [q / m for q, m in zip(cpu["sqlite"], cpu["memory"], strict=True)]
                mem, sql = statistics.mean(rates["memory"]), statistics.mean(rates["sqlite"])
                cost = 1 - statistics.median(ratios)
                q1, _, q3 = statistics.quantiles(ratios, n=4) if rounds > 1 else ratios * 3
                print(
                    f"  -> {clients} client(s): memory {mem:.1f} turns/s, sqlite {sql:.1f} turns/s"
                    f" (means); per-round sqlite/memory ratios over {len(ratios)} rounds:"
                    f" quartiles {q1:.3f} / {q3:.3f}, median {statistics.median(ratios):.3f},"
                    f" persistence costs {100 * cost:.1f}%; target < 10%: "
                    f"{'MET' if cost < 0.10 else 'MISSED'}",
                    flush=True,
                )
                print(
                    f"     server CPU per turn: memory {1e6 * statistics.median(cpu['memory']):.0f}"
                    f" us, sqlite {1e6 * statistics.median(cpu['sqlite']):.0f} us (medians);"
                    f" per-round ratio median {statistics.median(cpu_ratios):.3f}",
                    flush=True,
                )
                if steal:
                    print(
                        "     hypervisor steal over the runs: median"
                        f" {100 * statistics.median(steal):.0f}%,"
                        f" max {100 * max(steal):.0f}% of the machine; {retried} round(s) measured"
                        f" again for steal over {100 * STEAL_RETRY:.0f}%",
                        flush=True,
                    )
        finally:
            for s in servers.values():
                s.stop()

        # -- session/load of a 1,000-turn session ------------------------------------------
        load_data = data / "load"
        load_data.mkdir()
        session_id = "sess_bench_1000_turns"
        built, read, n_entries = trio.run(build_store, store_path(load_data), project, session_id)
        size = store_path(load_data).stat().st_size
        print(
            f"\nstore written in {built:.2f} s ({LOAD_TURNS} turns, {n_entries} entries, "
            f"{size / 1e6:.1f} MB); in-process store.transcript(): {read * 1000:.1f} ms",
            flush=True,
        )
        with Server.punie(project, load_data) as server:
            times = []
            with CpuMeter(server.pid) as meter:
                for _ in range(loads):
                    elapsed, updates = await time_load(server, project, session_id)
                    times.append(elapsed * 1000)
            assert updates == n_entries - LOAD_TURNS, updates
        med = statistics.median(times)
        print(
            f"session/load ({updates} updates replayed): median {med:.0f} ms, min "
            f"{min(times):.0f} ms, max {max(times):.0f} ms over {loads} loads "
            f"({updates / (med / 1000):.0f} updates/s; {meter.describe()})",
            flush=True,
        )
        print(
            f"  -> session/load {med:.0f} ms vs in-process transcript read {read * 1000:.0f} ms:"
            f" ratio {med / (read * 1000):.1f}x; target < {LOAD_TARGET_MS:.0f} ms: "
            f"{'MET' if med < LOAD_TARGET_MS else 'MISSED'}",
            flush=True,
        )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
