"""The server's shutdown delivered at every checkpoint of a turn, a ``session/load``, a
``close`` and a ``delete``, on the hub with the SQLite store (a seeded harness).

Each seed picks what two clients do at once (prompts, a ``session/cancel``, a load of a
stored session, a close, a delete) and how the shutdown comes: ``closing`` set (the
graceful path: turns cancelled and answered, connections drained), the root cancelled
(the shutdown's time ran out), or both, one after the other. A
:class:`~tests.store.test_cancel_points._Cancel`-like instrument delivers it as the Nth
scheduler step of the run begins, for N over the whole range. What must hold for every N:

- every turn is in the store whole or not at all, and every prompt answered with a stop
  reason is stored (``turns`` and the transcript agree);
- a ``session/delete`` answered ``{}`` left nothing stored; one answered with an error
  left the session stored (a committed write is never reported as failed, nor a failed
  one as done);
- the hub's nursery exits with nothing but ``Cancelled``, no thread or file descriptor of
  the store is left, and the store reopens with ``PRAGMA integrity_check`` ok.

Run more seeds by hand with ``SHUTDOWN_SEEDS=0-200``.
"""

from __future__ import annotations

import gc
import os
import random
import sqlite3
import threading
import warnings
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from punie_trio.hub import ClientConnection, Limits, Manager
from punie_trio.store import STOP, open_sqlite_store
from punie_trio.transport import memory_message_stream_pair
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..integration._support import fresh_ids
from ..store.test_cancel_points import open_files
from ._hub import prompt_params


def _seeds() -> list[int]:
    spec = os.environ.get("SHUTDOWN_SEEDS")
    if not spec:
        return [0, 2, 5]  # (the root cancelled; closing set; both)
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


@attrs.define(eq=False)
class _Shutdown(trio.abc.Instrument):
    """As the ``at``-th scheduler step of any task begins: ``how`` the shutdown comes."""

    at: int
    how: str
    closing: trio.Event
    root: trio.CancelScope
    steps: int = 0
    past: bool = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.steps == self.at:
            if self.how in ("closing", "both"):
                self.closing.set()
            if self.how == "cancel":
                self.root.cancel()
        elif self.how == "both" and self.steps == self.at * 2:
            self.root.cancel()


TURN = [{"text": f"chunk {i} "} for i in range(6)]


def _store_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("punie-store")]


def _stored(path: Path) -> dict[str, int]:
    """Each stored session's recorded turns, every one checked whole (its entries end
    with the stop entry, its prompt first)."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        turns: dict[str, int] = {}
        for (sid,) in conn.execute("SELECT id FROM sessions"):
            turns[sid] = 0
        for sid, turn, count, entries in conn.execute(
            "SELECT s.id, t.turn, t.count, t.entries FROM turns AS t"
            " JOIN sessions AS s ON t.session = s.key ORDER BY s.id, t.turn"
        ):
            assert turn == turns[sid], (sid, turn)  # no gap
            lines = entries.split("\n")
            assert len(lines) == count >= 2, (sid, turn, count)
            assert lines[0].startswith("user_message_chunk\t"), (sid, turn, lines[0])
            assert lines[-1].startswith(f"{STOP}\t"), (sid, turn, lines[-1])
            turns[sid] = turn + 1
        return turns
    finally:
        conn.close()


async def _connect(
    manager: Manager, nursery: trio.Nursery, checker: SchemaChecker
) -> AcpTestClient:
    agent_side, client_side = memory_message_stream_pair(64)
    connection = ClientConnection(manager, transport="memory")
    await nursery.start(connection.run, agent_side)
    client = AcpTestClient(client_side, checker, ids=fresh_ids())
    await nursery.start(client.run)
    await client.initialize()
    return client


async def _shutdown_at(root: Path, data: Path, checker: SchemaChecker, seed: int, at: int) -> bool:
    """One run of the seed's requests with the shutdown at step ``at``; check it all.
    False once ``at`` is past the run's last step."""
    rng = random.Random(seed)
    how = rng.choice(["closing", "cancel", "both"])
    path = data / f"s{at}.db"
    model = ScriptModel([TURN])
    # Before: "kept" (stored, not live: loaded below) and two live sessions, a turn each.
    async with open_sqlite_store(path) as store:
        manager = Manager((str(root),), model, limits=Limits(), store=store)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            client = await _connect(manager, nursery, checker)
            kept = await client.new_session(str(root))
            await client.prompt(kept, "first")
            nursery.cancel_scope.cancel()
    threads = _store_threads()
    sent: list[tuple[str, str, str, AcpTestClient]] = []  # (request id, method, session, client)
    closing = trio.Event()
    root_scope = trio.CancelScope()
    shutdown = _Shutdown(at, how, closing, root_scope)
    async with open_sqlite_store(path) as store:
        manager = Manager((str(root),), model, limits=Limits(), store=store, closing=closing)
        with root_scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.run)
                a = await _connect(manager, nursery, checker)
                b = await _connect(manager, nursery, checker)
                sa = await a.new_session(str(root))
                sb = await b.new_session(str(root))
                await a.prompt(sa, "one")
                await b.prompt(sb, "one")
                actions = rng.sample(
                    ["prompt a", "prompt b", "cancel a", "load kept", "close b", "delete b"],
                    rng.randint(1, 4),
                )
                trio.lowlevel.add_instrument(shutdown)
                try:
                    for action in actions:
                        what, who = action.split()
                        client, sid = (a, sa) if who == "a" else (b, sb)
                        request_id = f"{seed}-{action}"
                        if what == "prompt":
                            method, params = "session/prompt", prompt_params(sid, "two")
                        elif what == "cancel":
                            await client.notify("session/cancel", {"sessionId": sid})
                            continue
                        elif what == "load":
                            method, params = (
                                "session/load",
                                {"sessionId": kept, "cwd": str(root), "mcpServers": []},
                            )
                            sid = kept
                        else:
                            method, params = f"session/{what}", {"sessionId": sid}
                        sent.append((request_id, method, sid, client))
                        await client.send(
                            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
                        )
                    # Everything done (and nothing waits for the store's thread) before
                    # step ``at``: past the range, so the shutdown comes now, and the
                    # run is the last.
                    while shutdown.steps < at:
                        await trio.testing.wait_all_tasks_blocked()
                        if shutdown.steps < at and store._owner._jobs.empty():
                            shutdown.past = True
                            closing.set()
                            root_scope.cancel()
                    with trio.fail_after(30):
                        await closing.wait()
                        # (As serve does once the connections have drained or its time
                        # ran out: the root's cancel ends it.)
                        await trio.testing.wait_all_tasks_blocked()
                        root_scope.cancel()
                        await trio.sleep_forever()
                finally:
                    trio.lowlevel.remove_instrument(shutdown)
    assert root_scope.cancelled_caught or closing.is_set()
    gc.collect()
    assert _store_threads() == threads
    assert open_files(path) == []
    stored = _stored(path)
    for request_id, method, sid, client in sent:
        answer = next((m for m in client.received if m.get("id") == request_id), None)
        if answer is None:
            continue
        if method == "session/prompt" and "result" in answer:
            deleted = any(m == "session/delete" and s == sid for _, m, s, _ in sent)
            if not (deleted and sid not in stored):  # (recorded, then deleted)
                assert stored.get(sid) == 2, (how, at, method, answer, stored)
        elif method == "session/delete":
            assert (sid not in stored) == ("result" in answer), (how, at, answer, stored)
    return not shutdown.past


@pytest.mark.parametrize("seed", _seeds())
async def test_the_shutdown_at_every_checkpoint_keeps_every_answer_true(
    tmp_path: Path, acp_schema: SchemaChecker, seed: int
) -> None:
    root = tmp_path / "project"
    root.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    gc.collect()  # (what earlier tests left, an unclosed socket, warns before, not here)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        at = 1
        while await _shutdown_at(root, data, acp_schema, seed, at):
            at += 1
            assert at < 2000
        gc.collect()
    assert [str(w.message) for w in caught] == []
