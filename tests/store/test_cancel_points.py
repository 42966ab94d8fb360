"""Cancellation at every checkpoint of the SQLite store's operations (a seeded harness).

An :class:`_Cancel` instrument counts the steps (scheduler passes) of one task, or of all
of them, and cancels a scope as the Nth begins: the cancellation lands at that task's
next checkpoint. Each seed picks an operation mix (a group commit of several turns with
a settling checkpoint or a delete in flight, turns recorded alone, a delete, a store
open, a close) and a victim (one caller, or the whole nursery as a shutdown does); N
runs over the whole range, from before the first checkpoint to past the last. What
must hold for every N:

- a turn is in the store whole or not at all, and exactly when its ``append_turn``
  returned (a committed write is never reported as failed, nor a failed one as done);
  likewise a delete;
- the nursery exits (no task left parked), with no exception but ``Cancelled``;
- no thread and no file descriptor is left behind once the store is closed;
- the store reopens and ``PRAGMA integrity_check`` says ``ok``.

Run more seeds by hand with ``CANCEL_SEEDS=0-300``.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing

from punie_trio.store import StoreError, _sql, open_sqlite_store
from punie_trio.store._sqlite import SqliteStore
from punie_trio.store._thread import Started

from .conftest import make_record, sample_turn


def _seeds(default: int = 6) -> list[int]:
    spec = os.environ.get("CANCEL_SEEDS")
    if not spec:
        return list(range(default))
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


@attrs.define(eq=False)
class _Cancel(trio.abc.Instrument):
    """Cancels ``scope`` as the ``at``-th step of the task named ``name`` (None: of any
    task) begins."""

    scope: trio.CancelScope
    at: int
    name: str | None = None
    steps: int = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.name is not None and task.name != self.name:
            return
        self.steps += 1
        if self.steps == self.at:
            self.scope.cancel()


def open_files(path: Path) -> list[str]:
    """This process's descriptors open on the store ``path`` (its file, WAL, shared
    memory). Only those: counting every descriptor failed at random in a full test run,
    where another test's socket was closed by the garbage collector meanwhile."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (gone meanwhile)
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                found.append(target)
    return found


def _store_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("punie-store")]


@attrs.define(eq=False)
class _Op:
    """One caller: what it did, and how it ended ("done", "cancelled", "failed: ...")."""

    name: str
    session_id: str
    turn: int = 0
    ended: str = "running"


async def _run_op(op: _Op, work: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    with scope:
        try:
            result = await work()
        except StoreError as exc:
            op.ended = f"failed: {exc}"
            return
        except trio.Cancelled:
            op.ended = "cancelled"
            raise
        op.ended = "done" if result is not False else "done: not found"


def _recorded(path: Path) -> dict[str, list[int]]:
    """Each session's recorded turns (and whether each is whole: its count of entries)."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        got: dict[str, list[int]] = {}
        for sid, turn, count in conn.execute(
            "SELECT s.id, t.turn, t.count FROM sessions AS s"
            " LEFT JOIN turns AS t ON t.session = s.key ORDER BY s.id, t.turn"
        ):
            got.setdefault(sid, [])
            if turn is not None:
                assert count == 5, (sid, turn, count)  # whole: sample_turn(n=3) is 5 entries
                got[sid].append(turn)
        return got
    finally:
        conn.close()


async def _scenario(path: Path, seed: int, at: int) -> tuple[bool, str]:
    """One run: the seed's mix, cancelled at step ``at``; check everything; return whether
    the cancel fired (False: ``at`` is past the run's last step) and what was done."""
    rng = random.Random(seed)
    mix = rng.choice(["group", "group", "alone", "delete", "settling", "open", "close"])
    victim_is_all = rng.random() < 0.3
    async with open_sqlite_store(path) as first:
        for sid in ("a", "b", "c", "d"):
            await first.create_session(make_record(sid))
            await first.append_turn(sid, 0, sample_turn(0), alone=True)
    threads = _store_threads()
    ops: list[_Op] = []
    shutdown = trio.CancelScope()
    instrument = _Cancel(shutdown, at)
    fired = False
    store: SqliteStore | None = None
    try:
        with shutdown:
            async with trio.open_nursery() as nursery:
                plan: list[tuple[_Op, Callable[[], Awaitable[object]]]] = []
                if mix == "open":

                    async def open_and_write() -> None:
                        async with open_sqlite_store(path) as opened:
                            await opened.append_turn("a", 1, sample_turn(1), alone=True)

                    plan.append((_Op("open+append", "a", 1), open_and_write))
                else:
                    store = SqliteStore(path)
                    await store._open()
                    opened_store = store
                    if mix == "close":
                        plan.append((_Op("close", "-"), opened_store.aclose))
                    if mix in ("group", "settling", "delete", "close"):
                        for sid in rng.sample(["a", "b", "c"], rng.randint(1, 3)):
                            plan.append((_Op("append", sid, 1), _appender(store, sid, 1, False)))
                    if mix == "alone":
                        plan.append((_Op("append", "a", 1), _appender(store, "a", 1, True)))
                    if mix == "delete":
                        plan.append((_Op("delete", "d"), lambda: opened_store.delete_session("d")))
                rng.shuffle(plan)
                victim = rng.randrange(len(plan))
                settling: Started[None] | None = None
                if mix == "settling":
                    assert store is not None
                    settling = Started()
                    store._writes_wait_for = settling
                if not victim_is_all:
                    instrument.name = "victim"
                trio.lowlevel.add_instrument(instrument)
                for i, (op, work) in enumerate(plan):
                    scope = trio.CancelScope()
                    if i == victim and not victim_is_all:
                        instrument.scope = scope
                    ops.append(op)
                    nursery.start_soon(
                        _run_op, op, work, scope, name="victim" if i == victim else f"op{i}"
                    )
                if settling is not None:
                    # (Shielded: it stands for the owner thread's job, which ends whatever
                    # is cancelled on the loop.)
                    with trio.CancelScope(shield=True):
                        await trio.testing.wait_all_tasks_blocked()
                    settling.set(outcome.Value(None))
            trio.lowlevel.remove_instrument(instrument)
        fired = instrument.steps >= at
    finally:
        with trio.CancelScope(shield=True):
            if store is not None:
                await store.aclose()
    assert not any(op.ended == "running" for op in ops), ops
    assert _store_threads() == threads
    assert open_files(path) == []
    got = _recorded(path)
    for op in ops:
        if op.name in ("append", "open+append"):
            stored = op.turn in got.get(op.session_id, [])
            assert stored == (op.ended == "done"), (mix, at, op, got)
        elif op.name == "delete":
            assert (op.session_id not in got) == (op.ended == "done"), (mix, at, op, got)
    return fired, mix


def _appender(
    store: SqliteStore, sid: str, turn: int, alone: bool
) -> Callable[[], Awaitable[None]]:
    return lambda: store.append_turn(sid, turn, sample_turn(turn), alone=alone)


@pytest.mark.parametrize("seed", _seeds())
async def test_cancelled_at_every_checkpoint_the_store_keeps_its_word(
    tmp_path: Path, seed: int
) -> None:
    at = 1
    while True:
        path = tmp_path / f"s{at}.db"
        with trio.fail_after(20):
            fired, _ = await _scenario(path, seed, at)
        if not fired:
            break
        at += 1
        assert at < 200


@pytest.mark.parametrize(
    "where", ["while gathering", "after BEGIN", "before COMMIT", "after COMMIT"]
)
async def test_a_keyboard_interrupt_in_a_group_commit_leaves_no_turn_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A ``KeyboardInterrupt`` (Ctrl-C in a program that runs the store without watching
    its signals: Python raises it in whatever code runs) in a group's commit ends the
    leader's commit. The turns that had joined the group are parked uncancellably: they
    waited for ever (the nursery never exited, ``trio.run`` hung on the Ctrl-C). Now each
    hears what the file holds: not recorded (failed) when the interruption came before
    the ``COMMIT``, recorded (done) after it. The store stays right for the turns after
    (no transaction left open, no stale tail)."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        for sid in ("a", "b", "c"):
            await store.create_session(make_record(sid))
            await store.append_turn(sid, 0, sample_turn(0), alone=True)
        groups: list[list[Any]] = []
        ended: dict[str, str] = {}

        async def join(sid: str) -> None:
            assert store._gathering is not None  # it joins the group led below
            groups.append(store._gathering)
            try:
                await store.append_turn(sid, 1, sample_turn(1))
            except StoreError as exc:
                ended[sid] = f"failed: {exc}"
            else:
                ended[sid] = "done"

        def interrupt() -> None:
            raise KeyboardInterrupt

        real_enter, real_exit = _sql.transaction.__enter__, _sql.transaction.__exit__

        def enter(self: _sql.transaction) -> None:
            real_enter(self)
            if where == "after BEGIN":
                interrupt()

        def exit_(self: _sql.transaction, *exc_info: Any) -> None:
            real_exit(self, *exc_info)
            if where == "after COMMIT" and exc_info[0] is None:
                interrupt()

        left_waiting = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(join, "b")  # (they run in the pass the leader yields)
            nursery.start_soon(join, "c")
            if where == "before COMMIT":
                store._before_commit = interrupt
            elif where == "while gathering":
                # (In the leader's own code: here its wait for a settling checkpoint.)
                async def wait_for_thread_job(self: SqliteStore) -> None:
                    interrupt()

                store._writes_wait_for = Started()
                monkeypatch.setattr(SqliteStore, "_wait_for_thread_job", wait_for_thread_job)
            monkeypatch.setattr(_sql.transaction, "__enter__", enter)
            monkeypatch.setattr(_sql.transaction, "__exit__", exit_)
            with pytest.raises(KeyboardInterrupt):
                await store.append_turn("a", 1, sample_turn(1))  # this task leads
            monkeypatch.undo()
            store._before_commit = None
            store._writes_wait_for = None
            await trio.testing.wait_all_tasks_blocked()
            # Free what still waits (the defect), so the test fails rather than hangs.
            for item in groups[0]:
                if item.task is not None and item.session_id not in ended:
                    left_waiting.append(item.session_id)
                    trio.lowlevel.reschedule(item.task, outcome.Error(StoreError("freed")))
        assert left_waiting == []
        committed = where == "after COMMIT"
        assert sorted(ended) == ["b", "c"]
        for how in ended.values():
            assert how == "done" if committed else how.startswith("failed: "), ended
        assert store._writer is not None
        assert not store._writer.in_transaction
        # What the store remembers agrees with the file: the next turns go in right.
        for sid in ("a", "b", "c"):
            turn = 2 if committed else 1
            await store.append_turn(sid, turn, sample_turn(turn))
    whole = [0, 1, 2] if committed else [0, 1]
    assert _recorded(path) == {"a": whole, "b": whole, "c": whole}
    conn = sqlite3.connect(path)
    try:  # and the seqs of each session run on without a gap or an overlap
        for (sid,) in conn.execute("SELECT id FROM sessions"):
            seqs = conn.execute(
                "SELECT t.first_seq, t.count FROM turns AS t JOIN sessions AS s"
                " ON t.session = s.key WHERE s.id = ? ORDER BY t.turn",
                (sid,),
            ).fetchall()
            assert [first for first, _ in seqs] == [5 * i for i in range(len(seqs))]
    finally:
        conn.close()


async def test_a_keyboard_interrupt_does_not_report_a_refused_turn_as_recorded(
    tmp_path: Path,
) -> None:
    """A joined turn whose number is already recorded (its own write refused: "already
    recorded") is not reported done because the file holds a turn of that number: the
    group's transaction failed on it, the leader's turn, retried alone, was interrupted
    (``KeyboardInterrupt``) before the refused turn's own retry, and the file's turn is
    another write's, not this one's. It was reported recorded."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        for sid in ("a", "b"):
            await store.create_session(make_record(sid))
        await store.append_turn("b", 0, sample_turn(0), alone=True)
        ended: dict[str, str] = {}

        async def join() -> None:
            assert store._gathering is not None  # it joins the group led below
            try:  # turn 0 of b again, with other entries: refused
                await store.append_turn("b", 0, sample_turn(7))
            except StoreError as exc:
                ended["b"] = f"failed: {exc}"
            else:
                ended["b"] = "done"

        def interrupt() -> None:
            raise KeyboardInterrupt

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join)  # (it runs in the pass the leader yields)
            # The group's transaction fails on b's turn before its commit hook; a's,
            # retried alone, reaches it and is interrupted.
            store._before_commit = interrupt
            with pytest.raises(KeyboardInterrupt):
                await store.append_turn("a", 0, sample_turn(0))  # this task leads
            store._before_commit = None
        assert ended["b"].startswith("failed: "), ended
    assert _recorded(path) == {"a": [], "b": [0]}
    conn = sqlite3.connect(path)
    try:  # the turn 0 of b in the file is the first write's
        (entries,) = conn.execute("SELECT entries FROM turns").fetchone()
        assert "question 0" in entries
    finally:
        conn.close()


async def test_a_second_keyboard_interrupt_reports_no_unwritten_turn_as_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second ``KeyboardInterrupt`` (Ctrl-C pressed twice) that lands while the store
    asks the file about the turns the first one cut short leaves their outcomes unknown:
    each is told so (failed, "cannot be told"), never recorded. A turn not yet asked
    about was reported done, though its commit never landed."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        for sid in ("a", "b"):
            await store.create_session(make_record(sid))
        ended: dict[str, str] = {}

        async def join() -> None:
            assert store._gathering is not None  # it joins the group led below
            try:
                await store.append_turn("b", 0, sample_turn(0))
            except StoreError as exc:
                ended["b"] = f"failed: {exc}"
            else:
                ended["b"] = "done"

        def interrupt(*_: object) -> bool:
            raise KeyboardInterrupt

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join)  # (it runs in the pass the leader yields)
            store._before_commit = interrupt
            monkeypatch.setattr(_sql, "turn_recorded", interrupt)  # the second one
            with pytest.raises(KeyboardInterrupt):
                await store.append_turn("a", 0, sample_turn(0))  # this task leads
            store._before_commit = None
            monkeypatch.undo()
        assert ended["b"].startswith("failed: "), ended
        assert "cannot be told" in ended["b"], ended
        assert store._writer is not None
        assert not store._writer.in_transaction
    assert _recorded(path) == {"a": [], "b": []}
