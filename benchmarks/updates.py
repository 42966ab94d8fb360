"""Streaming throughput: one prompt streaming 10,000 ``agent_message_chunk`` updates.

punie-trio runs a ``script:`` model (a file with one turn of 10,000 ``{"text": ...}`` steps,
written here); the client times the prompt from sending it to its answer and counts the
updates. Reported: updates/s to the last update (streaming) and to the answer (which, with
the sqlite store, waits for the 10,001-entry transcript to be committed). Baseline, same
run: the raw Hypercorn-trio app (benchmarks/_raw_server.py ``/push``) sending 10,000
equivalent session/update frames (each ``json.dumps``-ed) and an answer.
Target: >= 20,000 updates/s.

    python benchmarks/updates.py [--quick] [--chunks 10000] [--repeat 5]
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

from _common import (
    AcpClient,
    CpuMeter,
    Server,
    _is_update,
    header,
    raise_nofile,
    tmpdirs,
    versions,
    ws_connect,
)

TARGET = 20_000


def chunk_text(i: int) -> str:
    return f"chunk {i:05d} of a long streamed answer. "  # 40 characters


def write_script(path: Path, chunks: int) -> None:
    steps = [{"text": chunk_text(i)} for i in range(chunks)]
    path.write_text(json.dumps({"turns": [steps]}))


async def one_prompt(client: AcpClient, params: dict[str, Any], method: str) -> dict[str, float]:
    request_id = client.next_id
    client.next_id += 1
    frame = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
    updates = 0
    t0 = time.perf_counter()
    first = last = t0
    await client.ws.send(frame)
    while True:
        text = await client.ws.recv()
        if _is_update(text):
            updates += 1
            last = time.perf_counter()
            if updates == 1:
                first = last
            continue
        msg = json.loads(text)
        if msg.get("id") == request_id:
            if "error" in msg:
                raise RuntimeError(msg["error"])
            break
    done = time.perf_counter()
    return {
        "updates": updates,
        "first_ms": (first - t0) * 1000,
        "stream_s": last - t0,
        "total_s": done - t0,
    }


async def measure(
    server: Server, url: str, cwd: Path | None, params: dict[str, Any], method: str, repeat: int
) -> dict[str, Any]:
    if cwd is not None:
        client = await AcpClient.open(url, cwd=cwd)
        params = {**params, "sessionId": client.session_id}
    else:
        client = AcpClient(await ws_connect(url))
    await one_prompt(client, params, method)  # warm-up
    runs = []
    with CpuMeter(server.pid) as cpu:
        for _ in range(repeat):
            runs.append(await one_prompt(client, params, method))
    await client.close()
    n = runs[0]["updates"]
    stream = statistics.median(r["stream_s"] for r in runs)
    total = statistics.median(r["total_s"] for r in runs)
    return {
        "n": n,
        "stream_rate": n / stream,
        "total_rate": n / total,
        "first_ms": statistics.median(r["first_ms"] for r in runs),
        "total_s": total,
        "stream_s": stream,
        "cpu": cpu.describe(),
    }


def show(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label:<22} {r['n']} updates: to last update {r['stream_s'] * 1000:7.1f} ms = "
        f"{r['stream_rate']:7.0f}/s; to answer {r['total_s'] * 1000:7.1f} ms = "
        f"{r['total_rate']:7.0f}/s; first update {r['first_ms']:.2f} ms ({r['cpu']})",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 chunks, 2 repeats")
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5, help="measured prompts (median)")
    args = parser.parse_args()
    chunks, repeat = (2_000, 2) if args.quick else (args.chunks, args.repeat)
    raise_nofile()
    header(f"updates: one prompt streaming {chunks} chunks (median of {repeat})")
    print(versions(), f"load average at start {os.getloadavg()[0]:.2f}", sep="; ")
    holder, project, data = tmpdirs("updates")
    with holder:
        script = data.parent / "script.json"
        write_script(script, chunks)
        prompt = {"prompt": [{"type": "text", "text": "stream please"}]}
        with Server.raw() as raw:
            push = {"sessionId": "sess_raw", "n": chunks, "text": chunk_text(0)}
            base = await measure(raw, raw.url("/push"), None, push, "push", repeat)
        show("raw hypercorn-trio", base)
        results = {}
        for store in ("memory", "sqlite"):
            store_dir = data / store
            store_dir.mkdir()
            extra = ("--model", f"script:{script}", "--store", store, "--prompts-per-minute",
                     "1000000")  # fmt: skip
            with Server.punie(project, store_dir, *extra) as punie:
                r = await measure(punie, punie.url(), project, prompt, "session/prompt", repeat)
            show(f"punie-trio ({store})", r)
            results[store] = r
    for store, r in results.items():
        print(
            f"  -> punie-trio ({store}): {r['stream_rate']:.0f} updates/s streamed "
            f"({r['stream_rate'] / base['stream_rate']:.2f}x raw), {r['total_rate']:.0f}/s to "
            f"the answer ({r['total_rate'] / base['total_rate']:.2f}x raw); target >= 20,000/s: "
            f"{'MET' if r['total_rate'] >= TARGET else 'MISSED'}",
            flush=True,
        )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
