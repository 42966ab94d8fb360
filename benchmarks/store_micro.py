"""Micro-benchmark: the SQLite session store against the in-memory baseline.

Times, in one run, (1) ``append_turn`` of a 20-entry turn, 1,000 times, awaited one after
another as the server does (each is a committed transaction), and (2) ``transcript()`` of
the resulting 1,000-turn session (20,000 entries). Prints each figure for both stores and
the SQLite / memory ratio.

    python benchmarks/store_micro.py [--turns N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from punie_trio.store import MemoryStore, SessionRecord, Store, open_sqlite_store

ENTRIES_PER_TURN = 20


def make_turn(turn: int) -> list[tuple[str, dict[str, Any]]]:
    """A realistic turn: a user message, streamed agent chunks, a tool call, a stop."""
    entries: list[tuple[str, dict[str, Any]]] = [
        (
            "user_message_chunk",
            {"sessionUpdate": "user_message_chunk", "content": {"type": "text", "text": "q"}},
        ),
        (
            "tool_call",
            {
                "sessionUpdate": "tool_call",
                "toolCallId": f"call_{turn}",
                "title": "Reading src/main.py",
                "kind": "read",
                "status": "pending",
            },
        ),
    ]
    while len(entries) < ENTRIES_PER_TURN - 1:
        text = f"chunk {turn}.{len(entries)} of a streamed answer, about sixty characters"
        entries.append(
            (
                "agent_message_chunk",
                {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": text}},
            )
        )
    entries.append(("stop", {"stopReason": "end_turn"}))
    return entries


async def measure(store: Store, turns: int) -> tuple[float, float]:
    await store.create_session(SessionRecord(id="bench", root="/proj", cwd="/proj"))
    payloads = [make_turn(t) for t in range(turns)]
    start = time.perf_counter()
    for turn, entries in enumerate(payloads):
        await store.append_turn("bench", turn, entries)
    append_s = time.perf_counter() - start
    start = time.perf_counter()
    entries_read = await store.transcript("bench")
    read_s = time.perf_counter() - start
    assert len(entries_read) == turns * ENTRIES_PER_TURN
    return append_s, read_s


async def main(turns: int) -> None:
    memory = await measure(MemoryStore(), turns)
    with tempfile.TemporaryDirectory() as tmp:
        async with open_sqlite_store(Path(tmp) / "bench.sqlite3") as store:
            sqlite = await measure(store, turns)
    rows = [
        (f"append_turn x{turns} ({ENTRIES_PER_TURN} entries)", memory[0], sqlite[0], turns),
        (f"transcript() of {turns} turns", memory[1], sqlite[1], 1),
    ]
    print(f"{'operation':<36} {'memory':>12} {'sqlite':>12} {'ratio':>8}")
    for name, mem_s, sql_s, n in rows:
        print(f"{name:<36} {mem_s * 1e3:>9.1f} ms {sql_s * 1e3:>9.1f} ms {sql_s / mem_s:>7.1f}x")
        if n > 1:
            print(f"{'  per turn':<36} {mem_s / n * 1e6:>9.1f} us {sql_s / n * 1e6:>9.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1_000)
    trio.run(main, parser.parse_args().turns)
