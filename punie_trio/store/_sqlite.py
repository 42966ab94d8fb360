"""``SqliteStore``: sessions and transcripts in one SQLite file, for Trio.

Two connections, each bound to one thread (sqlite3 keeps its same-thread check on):

- **Writes** run synchronously on the event-loop thread, on the writer connection. A turn's
  commit is bounded CPU work: WAL with ``synchronous=NORMAL`` appends to the WAL file
  through the page cache and never fsyncs on commit, and automatic checkpoints (which do
  fsync) are switched off on this connection. A turn is one ``turns`` row and nothing
  else: measured, a 20-entry turn costs about 25-35 us this way stand-alone (schema
  version 2, which also updated ``sessions``: 32-40 us); through a thread it cost about
  330 us (with schema version 1's 60 us commit: a thread hop is ~100 us each way on this
  machine, plus GIL hand-offs per statement). The event loop runs one write at a time, so
  there is a single writer. Nothing can cancel a write half-way: the SQL of a write is not
  interruptible at all. The exception is a session's delete, whose cost grows with the
  session: it runs on the owner thread, and writes wait for it (:meth:`delete_session`).
- **Each session's key and tail** (recorded turns, next ``seq``) are kept in memory once
  known, so a turn's transaction is ``BEGIN``, ``PRAGMA data_version``, one ``INSERT``,
  ``COMMIT``: no read, and (schema version 3) no write to ``sessions``. While
  ``data_version`` has not moved since the store's last turn transaction, no other
  connection has written and the plain ``INSERT`` is enough. Once it has moved, the
  guarded ``INSERT`` only writes while no turn at or after the believed count is
  recorded, and its foreign key only lets it while the session with the remembered key
  exists; if another process changed the session, it writes nothing and both are read
  from the file instead, in the same transaction (and what is remembered of the other
  sessions is dropped). The memory copy changes only once the transaction that wrote it
  has committed, so a write that fails or is rolled back leaves it as it was.
- **Group commit**: turns that finish close together share one transaction. Most of a
  commit's cost is per transaction (six ``fcntl`` locks, the WAL frames' ``pwrite`` calls,
  ``BEGIN``/``COMMIT``), and turns of one transaction share their pages: measured in the
  server, one turn's commit takes about 68 us and each further turn in the group about
  20 us. The first turn to arrive leads a group: it yields to the tasks about to run (so
  the turns they finish can join), for at most :data:`GROUP_PASSES` scheduler passes and
  only while the loop has other work; an idle loop commits after two passes. With ten
  clients prompting, groups hold 1-9 turns and turns/s rise by about 10%.
- **Reads** (a session, a page of sessions, a transcript of 20,000 rows) and the
  **checkpoints** run on one :class:`~punie_trio.store._thread.OwnerThread`, on the
  reader connection, so a large read never stalls the event loop. WAL gives readers a
  consistent snapshot that includes every commit made before the read began.

Input is validated on the Trio side before anything touches the database.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import outcome
import trio

from .._paths import (
    NotASmallFile,
    closed_marker,
    read_small_file,
    replace_file,
    sync_directory,
)
from . import _sql
from ._model import (
    UNSET,
    Payload,
    SessionRecord,
    StoreError,
    TranscriptEntry,
    Unset,
    check_limit,
    check_record,
    check_title,
    check_turn,
    page_start,
    session_changes,
)
from ._schema import WRITER_BUSY_TIMEOUT_MS, CheckStop, connect, out_of_room
from ._sql import PageCursor, Row, Tail
from ._thread import OwnerThread, Started

#: Posts a PASSIVE checkpoint to the owner thread after this many writes, a turn counting
#: one per entry plus one (SQLite's own automatic checkpoint, off on the writer, runs every
#: 1,000 pages; 5,000 is about 230 typical turns, about 950 WAL frames at 4 a turn).
CHECKPOINT_EVERY_ROWS = 5_000
#: A group commit's leader waits at most this many scheduler passes for turns to join, and
#: only while other tasks are about to run (a busy loop); an idle one commits after two.
GROUP_PASSES = 8
#: Most turns in one group commit (one transaction).
GROUP_MAX = 64
#: Past this many bytes of frames (as a checkpoint counts them: since the WAL last started
#: over), commits wait for the next checkpoint so that the WAL starts over: it stays near
#: this size plus what two checkpoint intervals (CHECKPOINT_EVERY_ROWS) write.
WAL_SETTLE_BYTES = 32 * 1024 * 1024
#: Bytes of WAL file kept after the log starts over (``PRAGMA journal_size_limit``).
WAL_SIZE_LIMIT = 64 * 1024 * 1024

T = TypeVar("T")
#: A file's (device, inode), None for no file.
FileId = tuple[int, int] | None

log = logging.getLogger(__name__)


def _translated(
    job: Callable[[sqlite3.Connection], T], path: Path
) -> Callable[[sqlite3.Connection], T]:
    """Wrap a job so a raw ``sqlite3.Error`` (or text SQLite cannot take: a string that is
    not valid UTF-8, which ``sqlite3`` reports as ``UnicodeEncodeError``) reaches the
    caller as ``StoreError``; one for want of room (a full disk, the file size limit)
    names the store ``path`` and says so (:func:`~._schema.out_of_room`)."""

    def run(conn: sqlite3.Connection) -> T:
        try:
            return job(conn)
        except sqlite3.Error as exc:
            room = out_of_room(path, exc)
            if room is not None:
                what, remedy = room
                raise StoreError(f"{path}: {what} (SQLite: {exc}); {remedy}") from exc
            raise StoreError(f"session store: {exc}") from exc
        except UnicodeError as exc:
            raise StoreError(f"session store: {exc}") from exc

    return run


@attrs.define(eq=False, slots=True)
class _GroupedTurn:
    """A turn in a group commit: what to write, who waits for it (None: the group's leader,
    which commits it itself) and how it ended."""

    session_id: str
    turn: int
    rows: list[tuple[str, str]]
    title: str | None = None
    task: trio.lowlevel.Task | None = None
    error: Exception | None = None


def _hand_outcomes(group: Sequence[_GroupedTurn]) -> None:
    """Wake each turn waiting in ``group`` with its outcome: done, or its error."""
    for item in group:
        if item.task is not None:
            result = outcome.Value(None) if item.error is None else outcome.Error(item.error)
            trio.lowlevel.reschedule(item.task, result)


def _not_recorded(item: _GroupedTurn, exc: BaseException) -> StoreError:
    """What a turn is told whose commit ``exc`` interrupted before it reached the file."""
    return StoreError(
        f"session store: turn {item.turn} of session {item.session_id!r} was not"
        f" recorded: its commit was interrupted ({type(exc).__name__})"
    )


@attrs.define(eq=False)
class SqliteStore:
    """A :class:`~punie_trio.store.Store` on a SQLite file; make one with
    :func:`open_sqlite_store`, which also closes it."""

    slow_commit = True  # (a lone turn's commit: 60-80 us in the server)

    path: Path
    clock: Callable[[], float] = time.time
    _owner: OwnerThread[sqlite3.Connection] = attrs.field(init=False)
    _writer: sqlite3.Connection | None = attrs.field(init=False, default=None)
    _rows_since_checkpoint: int = attrs.field(init=False, default=0)
    #: Committed ``(turns, next_seq)`` of the sessions this store has written or read.
    _tails: dict[str, Tail] = attrs.field(init=False, factory=dict)
    #: The ``sessions.key`` of the same sessions: fixed for a session's life (and never
    #: reused). Both are dropped when the session is deleted or the hub lets it go
    #: (:meth:`forget`).
    _keys: dict[str, int] = attrs.field(init=False, factory=dict)
    #: Test hook: runs inside ``append_turn``'s transaction, after the writes and before
    #: ``COMMIT``. Production code leaves it ``None``.
    _before_commit: Callable[[], None] | None = attrs.field(init=False, default=None)
    #: The writer's ``PRAGMA data_version`` as of its last turn transaction: unchanged, no
    #: other connection has written since, and the tails and keys are exact (see
    #: ``_sql.append_turns``). Read first when the writer opens.
    _data_version: int | None = attrs.field(init=False, default=None)
    #: The turns of the group commit being gathered (None: no group is open).
    _gathering: list[_GroupedTurn] | None = attrs.field(init=False, default=None)
    #: The WAL's frames (bytes) since it last started over, as the last checkpoint saw
    #: them (set on the owner thread: one int, read here).
    _wal_bytes: int = attrs.field(init=False, default=0)
    #: A checkpoint job is queued or running (cleared by the owner thread when it ends).
    _checkpoint_busy: bool = attrs.field(init=False, default=False)
    #: The job on the owner thread that writes on the loop wait for (None: none): a
    #: settling checkpoint, or a session's delete (which holds the write lock).
    _writes_wait_for: Started[Any] | None = attrs.field(init=False, default=None)
    #: The (device, inode) of the opened database and of its WAL (None: none there), and
    #: where the WAL is (beside the file a symlinked path leads to): every write checks
    #: the paths still name them (:meth:`_check_file`).
    _db_id: FileId = attrs.field(init=False, default=None)
    _wal_id: FileId = attrs.field(init=False, default=None)
    _wal_path: str = attrs.field(init=False, default="")
    #: The WAL was found deleted, and what it held copied into the database.
    _wal_saved: bool = attrs.field(init=False, default=False)
    #: Stopped (on the Trio thread) when the open is cancelled: the start-up check, on
    #: the owner thread, ends (see ``_schema.CheckStop``).
    _check_stop: CheckStop = attrs.field(init=False, factory=CheckStop)

    def __attrs_post_init__(self) -> None:
        self._owner = OwnerThread(f"punie-store:{self.path.name}")

    async def _open(self) -> None:
        # The reader opens first: it creates and migrates the file, off the event loop.
        try:
            await self._owner.open(self._connect_reader, on_cancel=self._check_stop.stop)
        except StoreError:
            if self._check_stop.stopped:
                # The check stopped for a cancellation (a signal at start): that is how
                # this open ends, not with an error of the store's.
                await trio.lowlevel.checkpoint()
            raise
        self._db_id = _file_id(self.path)
        writer = connect(self.path)
        self._wal_path = _wal_of(self.path)
        self._wal_id = _file_id(self._wal_path)  # (the open made it: WAL mode, migrated)
        try:
            writer.execute(f"PRAGMA busy_timeout = {WRITER_BUSY_TIMEOUT_MS}")
            writer.execute("PRAGMA wal_autocheckpoint = 0")
            # The WAL file is reused from its start after each checkpoint (see
            # _wait_for_thread_job); this trims it back when a burst made it larger.
            writer.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            # Nothing is remembered yet: whatever changes from here on is another's write.
            self._data_version = writer.execute("PRAGMA data_version").fetchone()[0]
        except BaseException:
            writer.close()
            raise
        self._writer = writer

    def _connect_reader(self) -> sqlite3.Connection:
        conn = connect(
            self.path, left_as_closed=lambda: _left_as_closed(self.path), stop=self._check_stop
        )
        # Its checkpoints are the store's (_count_rows), never one in a write's commit: a
        # delete's commit would otherwise copy the whole WAL before writes could go on.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read (or a checkpoint) on the owner thread."""
        self._check_open()
        return await self._owner.run(_translated(job, self.path))

    async def _write(self, job: Callable[[sqlite3.Connection], T], rows: int = 1) -> T:
        """Run a write on the writer connection, here on the event-loop thread.

        A cancellation point before the write (a cancelled caller writes nothing); none
        after it, so a committed write is always reported to its caller.
        """
        await self._ready_to_write()
        assert self._writer is not None
        try:
            result = _translated(job, self.path)(self._writer)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # (KeyboardInterrupt: see _interrupted)
                self._interrupted((), exc)
            raise
        self._count_rows(rows)
        return result

    async def _ready_to_write(self) -> None:
        """Before a write: a cancelled caller stops here, having written nothing; then wait
        for the owner thread's job that writes wait for, and check the store is open."""
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._wait_for_thread_job()
        self._check_open()
        self._check_file()

    def _count_rows(self, rows: int) -> None:
        """Start a checkpoint on the owner thread every :data:`CHECKPOINT_EVERY_ROWS`;
        once the WAL has passed :data:`WAL_SETTLE_BYTES`, one that writes wait for (see
        :meth:`_wait_for_thread_job`)."""
        self._rows_since_checkpoint += rows
        if (
            self._rows_since_checkpoint >= CHECKPOINT_EVERY_ROWS
            and self._writes_wait_for is None
            and not self._owner.closing
        ):
            self._rows_since_checkpoint = 0
            if self._checkpoint_busy:
                return  # the thread is still at the last one: no queue of them
            self._checkpoint_busy = True
            if self._wal_bytes > WAL_SETTLE_BYTES:  # as the last checkpoint found it
                self._writes_wait_for = self._owner.start(self._checkpoint_job)
            else:
                self._owner.post(self._checkpoint_job)  # nobody waits for this one

    def _checkpoint_job(self, conn: sqlite3.Connection) -> None:
        """On the owner thread. (The two attributes are set there, and read on the event
        loop's thread without waiting for the job's result to be delivered: a loop busy
        committing would otherwise not learn that it ended.)"""
        try:
            self._wal_bytes = _checkpoint(conn)
        finally:
            self._checkpoint_busy = False

    async def _wait_for_thread_job(self) -> None:
        """Wait for the owner thread's job that writes wait for (a settling checkpoint, a
        delete), and for any that another task started meanwhile, before writing.

        Why, for a delete: it holds SQLite's write lock, and the loop's writer meeting it
        would block the whole event loop in SQLite's busy handler.

        Why, for a checkpoint: the WAL starts over from its beginning only when a write
        finds it wholly copied into the database. Checkpoints racing a stream of commits
        never copy all of it, so under steady load the WAL grew without end (hundreds of
        MB for a 13 MB database). So once the WAL passes :data:`WAL_SETTLE_BYTES`, commits
        wait for the next checkpoint to finish (the event loop does not: it runs on the
        owner thread), the next write restarts the WAL, and ``journal_size_limit`` trims
        the file. The checkpoints before it, which nobody waits for, have copied most of
        the WAL by then, so the wait is short.
        """
        while (started := self._writes_wait_for) is not None:
            await started.wait()  # (several writers may wait; each job reports its errors)
            if self._writes_wait_for is started:
                self._writes_wait_for = None

    def _check_open(self) -> None:
        if self._owner.closing or self._writer is None:
            raise StoreError("store is closed")

    def _check_file(self) -> None:
        """Before a write: refuse it (``StoreError``) if the path no longer names the file
        the store opened (deleted, replaced, or moved away with its directory), or its
        WAL was deleted or replaced.

        Why: SQLite writes on to the files it has open, unlinked or not. A store deleted
        while the server ran took every later turn with it, each answered as saved, when
        the process ended (a restart found an empty store). A WAL deleted (a "stale" file
        cleaned up) held every turn since the last checkpoint until the process ended:
        after a ``kill -9`` the store had no tables at all. So the first write that finds
        the WAL gone also has the owner thread copy what the unlinked WAL holds into the
        database (a checkpoint: its connections still have it open), where it survives
        any end of the process. One ``stat`` of each (about 1 us each) per transaction,
        not per turn of a group. A path put back (the directory moved back) is the store
        again. A ``stat`` that fails otherwise (no permission to search the directory)
        cannot tell, and the write goes on: the open files are still the store.
        """
        try:
            db = _file_id(self.path)
            wal = _file_id(self._wal_path)
        except OSError:
            return
        if db != self._db_id:
            raise StoreError(
                f"{self.path}: the session store was deleted or replaced while the server ran,"
                " so nothing more can be saved to it; restart the server"
            )
        if wal != self._wal_id:
            if not self._wal_saved:
                self._wal_saved = True
                self._owner.post(_checkpoint)
            raise StoreError(
                f"{self._wal_path}: the session store's write-ahead log was deleted or replaced"
                " while the server ran, so nothing more can be saved to it (what it held is"
                f" copied into {self.path.name}); restart the server"
            )

    async def create_session(self, rec: SessionRecord) -> None:
        self._check_open()
        rec = check_record(rec)

        def job(conn: sqlite3.Connection) -> None:
            self._keys[rec.id] = _sql.insert_session(conn, rec)
            self._tails[rec.id] = (rec.turns, 0)  # committed: a new session has no entries

        await self._write(job)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return await self._run(lambda conn: _sql.select_session(conn, session_id))

    async def update_session(
        self,
        session_id: str,
        *,
        title: str | Unset | None = UNSET,
        mode: str | Unset | None = UNSET,
        config: dict[str, Any] | Unset = UNSET,
        client_id: str | Unset | None = UNSET,
        updated_at: float | Unset = UNSET,
        additional_directories: Sequence[str] | Unset = UNSET,
    ) -> None:
        self._check_open()
        changes = session_changes(
            title=title,
            mode=mode,
            config=config,
            client_id=client_id,
            updated_at=updated_at,
            additional_directories=additional_directories,
        )
        await self._write(lambda conn: _sql.update_session(conn, session_id, changes))

    async def list_sessions(
        self,
        *,
        cwd: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
        roots: Sequence[str] | None = None,
    ) -> tuple[list[SessionRecord], str | None]:
        self._check_open()
        check_limit(limit)
        page_start(cursor, cwd)  # fail fast on the Trio side
        return await self._run(
            lambda conn: _sql.select_sessions(
                conn, cwd=cwd, cursor=cursor, limit=limit, roots=roots
            )
        )

    async def delete_session(self, session_id: str) -> bool:
        """Delete the session and its transcript, on the owner thread's connection.

        Why not on the event loop like other writes: a delete's cost grows with the
        session (every page holding one of its turns is rewritten, and ``secure_delete``
        zeroes the freed ones): measured, 9 ms for 1,000 turns and 104 ms for 10,000, all
        of it a stall for every client when it ran on the loop. Writes on the loop wait
        for it (as for a settling checkpoint), so the loop's connection never meets its
        lock. Not interruptible once started, like every write; the writer's next turn
        transaction sees another connection's commit (``data_version``) and re-reads
        what it remembered.
        """
        await self._ready_to_write()  # (cancellable: nothing has started yet)
        started = self._owner.start(
            _translated(lambda conn: _sql.delete_session(conn, session_id), self.path)
        )
        self._writes_wait_for = started  # writes wait for it from now on
        try:
            with trio.CancelScope(shield=True):  # once started, the delete is reported
                found = await started.result()
        finally:
            # Not while it still runs: a KeyboardInterrupt reaches this wait through the
            # shield (Trio delivers it at any checkpoint), and the writes after it stopped
            # waiting, so the next one met the delete's lock in SQLite's busy handler,
            # blocking the event loop. Left set, they wait (_wait_for_thread_job).
            if self._writes_wait_for is started and started.ended:
                self._writes_wait_for = None
            self._tails.pop(session_id, None)
            self._keys.pop(session_id, None)
        # It rewrote pages all over the file (60 MB of WAL for 10,000 turns): checkpoint.
        self._count_rows(CHECKPOINT_EVERY_ROWS)
        return found

    async def append_turn(
        self,
        session_id: str,
        turn: int,
        entries: Sequence[tuple[str, Payload]],
        *,
        alone: bool = False,
        title: str | None = None,
    ) -> None:
        """Record a turn (and ``title``, if given, as the session's, in the same
        transaction); return once it is committed (group commit, see the module).

        The first turn to arrive while no group is gathering leads one: it lets the tasks
        already runnable in this scheduler pass run (one shielded schedule point), so the
        turns they finish join its group, then commits the group in one transaction and
        wakes the others. A turn that joins waits for that commit (not interruptible, like
        every write: it is at most one scheduler pass away). A group that fails is retried
        a turn at a time, so one bad turn fails alone. A turn recorded ``alone`` (no other
        turn runs: nothing could join) is committed at once, without the leader's passes.
        """
        await trio.lowlevel.checkpoint_if_cancelled()  # first: a cancelled caller writes nothing
        self._check_open()
        rows = check_turn(turn, entries)
        check_title(title)
        item = _GroupedTurn(session_id, turn, rows, title)
        group = self._gathering
        if group is not None:
            item.task = trio.lowlevel.current_task()
            group.append(item)
            await trio.lowlevel.wait_task_rescheduled(
                lambda _raise_cancel: trio.lowlevel.Abort.FAILED
            )
            return
        if alone:
            if self._writes_wait_for is not None:
                with trio.CancelScope(shield=True):  # (a commit is not interruptible either)
                    await self._wait_for_thread_job()
            self._commit_group([item])
            if item.error is not None:
                raise item.error
            return
        group = self._gathering = [item]
        try:
            for passes in range(1, GROUP_PASSES + 1):
                await trio.lowlevel.cancel_shielded_checkpoint()
                if len(group) >= GROUP_MAX:
                    break
                # Two passes at least: the tasks that were runnable when we yielded have
                # all run by then (Trio runs a pass's tasks in any order, and the ones left
                # in the current pass are not counted as runnable).
                if passes >= 2 and not trio.lowlevel.current_statistics().tasks_runnable:
                    break  # nothing else is about to run that could join
            # Shielded: the turns that joined wait for this leader's commit, uncancellably.
            # (The scope only when there is a checkpoint to wait for: one costs ~6 us.)
            if self._writes_wait_for is not None:
                with trio.CancelScope(shield=True):
                    await self._wait_for_thread_job()  # (more turns may join meanwhile)
        except BaseException as exc:
            # (KeyboardInterrupt, in the leader's own code: nothing is written yet. The
            # turns that joined are told so, or they waited for ever: see _commit_group.)
            self._gathering = None
            self._wake(group, exc)
            raise
        finally:
            self._gathering = None
        self._commit_group(group)
        if item.error is not None:
            raise item.error

    def _commit_group(self, group: list[_GroupedTurn]) -> None:
        """Commit ``group`` in one transaction (or, if that fails and it holds more than
        one turn, each turn in its own) and hand every waiting turn its outcome.

        Every waiting turn gets one, whatever happens here: they are parked beyond the
        reach of cancellation. A ``KeyboardInterrupt`` (a program that runs the store
        without watching SIGINT: Python raises it in whatever code runs) went up through
        the leader alone, and the turns that had joined its group waited for ever, so
        the nursery never exited and ``trio.run`` hung on the Ctrl-C. Such turns now
        hear what the file says of them (:meth:`_interrupted`)."""
        try:
            try:
                self._commit_turns(group)
            except Exception as exc:
                if len(group) == 1:
                    group[0].error = exc
                else:
                    for item in group:
                        try:
                            self._commit_turns([item])
                        except Exception as one:
                            item.error = one
        except BaseException as exc:
            self._interrupted(group, exc)
            raise
        finally:
            _hand_outcomes(group)

    @staticmethod
    def _wake(group: Sequence[_GroupedTurn], exc: BaseException) -> None:
        """Tell the turns waiting in ``group``, whose leader was interrupted by ``exc``
        before it wrote anything, that they were not recorded."""
        for item in group:
            if item.task is not None:
                item.error = _not_recorded(item, exc)
        _hand_outcomes(group)

    def _interrupted(self, group: Sequence[_GroupedTurn], exc: BaseException) -> None:
        """After a write cut short by a ``BaseException`` (``KeyboardInterrupt``):
        nothing tells how far it got. So a transaction it left open is rolled back (left
        open, every later write failed to ``BEGIN``), what is remembered of the sessions
        is dropped (a commit that landed before the interruption left it stale: the next
        turn would have reused ``seq``s), and each waiting turn of ``group`` is told
        what the file holds: recorded (done), or not (failed), never the other way.

        Every such turn is marked unknown (failed, "cannot be told") before the file is
        asked, and cleared only once the file says it holds it: a second interruption
        here (Ctrl-C pressed twice) once left the turns not yet asked about with no
        error, and :meth:`_commit_group` woke them as recorded."""
        asked = [item for item in group if item.task is not None and item.error is None]
        for item in asked:
            item.error = StoreError(
                f"session store: turn {item.turn} of session {item.session_id!r} was"
                f" interrupted ({type(exc).__name__}) and whether it was recorded"
                " cannot be told"
            )
        self._keys.clear()
        self._tails.clear()
        self._data_version = None  # (the next turn transaction reads what it needs)
        writer = self._writer
        rolled_back: Exception | None = None
        try:
            if writer is not None and writer.in_transaction:
                writer.execute("ROLLBACK")
        except Exception as error:  # (then the reads below cannot tell either)
            rolled_back = error
        for item in asked:
            try:
                if rolled_back is not None:
                    raise rolled_back
                recorded = writer is not None and _sql.turn_recorded(
                    writer, item.session_id, item.turn, item.rows
                )
            except Exception as error:  # (the file cannot say: the write is not known done)
                item.error = StoreError(f"{item.error} ({error})")
                continue
            item.error = None if recorded else _not_recorded(item, exc)

    def _commit_turns(self, group: list[_GroupedTurn]) -> None:
        """One transaction for ``group``; on success remember keys and tails and mark each
        (on failure nothing is remembered: the transaction was rolled back)."""
        self._check_open()
        self._check_file()
        assert self._writer is not None
        keys, tails = self._keys, self._tails
        writes: list[_sql.TurnWrite] = [
            (t.session_id, t.turn, t.rows, keys.get(t.session_id), tails.get(t.session_id))
            for t in group
        ]
        hook = self._before_commit
        titles = [t.title for t in group]
        done, version = _translated(
            lambda conn: _sql.append_turns(
                conn, writes, self.clock(), hook, self._data_version, titles
            ),
            self.path,
        )(self._writer)
        if version != self._data_version:
            # Another connection wrote: what is remembered of other sessions may be stale.
            # Theirs are read again when they next write; this group's were checked
            # against the file just now.
            keys.clear()
            tails.clear()
            self._data_version = version
        for t, (key, tail) in zip(group, done, strict=True):
            keys[t.session_id] = key
            tails[t.session_id] = tail
        # Counted in entries, as when each was a row: a checkpoint every ~230 typical turns.
        self._count_rows(sum(len(t.rows) + 1 for t in group))

    async def transcript(self, session_id: str) -> list[TranscriptEntry]:
        return await self._run(lambda conn: _sql.select_transcript(conn, session_id))

    async def transcript_rows(
        self, session_id: str, page_size: int = 1000
    ) -> AsyncGenerator[list[tuple[int, str, str]], None]:
        check_limit(page_size)
        self._check_open()

        def read_page(cursor: PageCursor | None) -> Started[tuple[list[Row], PageCursor | None]]:
            page = functools.partial(
                _sql.select_transcript_page, session_id=session_id, cursor=cursor,
                limit=page_size,
            )  # fmt: skip
            return self._owner.start(_translated(page, self.path))

        pending = read_page(None)
        while True:
            rows, cursor = await pending.result()
            if cursor is None:
                return
            # Read ahead: the owner thread reads the next page while the caller uses this one.
            pending = read_page(cursor)
            yield rows

    def forget(self, session_id: str) -> None:
        """Drop the session's remembered key and tail (about 200 bytes), which otherwise
        stayed for the server's life, one pair per session it ever wrote. A turn of it
        committing afterwards remembers them again (they are committed values, so nothing
        is wrong, but they would stay): the hub forgets such a session once more after
        that commit."""
        self._keys.pop(session_id, None)
        self._tails.pop(session_id, None)

    async def aclose(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        # The reader closes last: as the last connection it checkpoints and removes the WAL.
        await self._owner.close(functools.partial(self._close_reader, writer is not None))

    def _close_reader(self, opened: bool, conn: sqlite3.Connection) -> None:
        """On the owner thread: close the reader, then (for a store that was open, and
        whose path still names the file it opened) leave the marker of a clean close."""
        conn.close()
        if not opened:
            return
        try:
            same = _file_id(self.path) == self._db_id
        except OSError as exc:
            # (A data directory replaced by a symlink loop, or one the user may no longer
            # search: the OSError ended serve's clean shutdown with a traceback, status 1.)
            log.warning(
                "cannot look at %s as it closes (%s): no marker, the next start checks it",
                self.path,
                exc,
            )
            return
        if same:
            _mark_closed(self.path)


def _identity(path: Path) -> str | None:
    """What says the file ``path`` is the one a clean close left: device, inode, size,
    and the times of its last change (content or status), then the same of its WAL
    (``-``: none, or an empty one); None for no file.

    Why the WAL too: SQLite replays whatever valid WAL it finds beside the file, and a
    WAL is not tied to its database (only the page size must agree). Another store's
    WAL put beside a store closed cleanly and left alone (a copy of the data directory's
    files, a backup restored in part) was replayed without a check, and its pages
    written into the file by the next checkpoint: ``quick_check`` then found it damaged
    ("Page 232 is never used", ...), and the marker the run's clean close left named the
    damaged file, so no later start checked it either."""
    return _identity_of(*_store_files(path))


def _store_files(path: Path) -> tuple[os.stat_result | None, os.stat_result | None]:
    """The store's file and its WAL as ``stat`` sees them now (None: no file; the WAL
    None too when it is empty)."""
    wal = _stat(_wal_of(path))
    return _stat(path), wal if wal is not None and wal.st_size else None


def _identity_of(st: os.stat_result | None, wal: os.stat_result | None) -> str | None:
    """:func:`_identity` of the files :func:`_store_files` saw."""
    if st is None:
        return None
    return f"{_said(st)} {'-' if wal is None else _said(wal)}\n"


def _stat(path: Path | str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _said(st: os.stat_result) -> str:
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


#: How long a close waits for the file system's clock to pass the store's last change
#: (:func:`_mark_closed`): a tick of a file system with 1-second times, and some; past
#: it, no marker is left (the next start checks).
CLOSE_WAITS_FOR_THE_CLOCK = 1.5
#: How often it looks again meanwhile.
CLOCK_POLL_SECONDS = 0.05
#: What the marker holds while the close waits for the clock: no store's identity.
PENDING_MARKER = b"pending\n"


def _mark_closed(path: Path) -> None:
    """Leave :func:`closed_marker` saying the store's file is as this close left it. Not
    written (a full disk), the next open checks the store: logged, not raised.

    Only once the file system's clock (the marker's own time) is past the store's last
    change (and its WAL's). Why: a file system whose times are coarse (1 s: ext2 or
    ext3 with 128-byte inodes, HFS+, some NFS; 2 s: FAT) gives a change made in the
    same tick as the close the times the marker holds, and the size often stays:
    measured on ext2, a page overwritten just after a clean close slipped past the
    check 20 times in 20. So a marker that names nothing (:data:`PENDING_MARKER`) is
    written first, and its time read: until it is past the store's times ("racy"), it is
    written again a moment later (at most :data:`CLOSE_WAITS_FOR_THE_CLOCK`, on the
    owner thread); then the identity is. Any change after that has a later time. Where
    times are fine (ext4 with nanosecond times) there is no wait, and the first write
    costs about 0.6 ms.
    """
    marker = closed_marker(path)
    deadline = time.monotonic() + CLOSE_WAITS_FOR_THE_CLOCK
    try:
        while True:
            # First a marker that names nothing (a kill now leaves one that never
            # matches), whose time is the file system's clock now.
            replace_file(marker, PENDING_MARKER, 0o600)
            now = os.stat(marker).st_mtime_ns
            files = _store_files(path)  # (one look: the identity and its times agree)
            identity = _identity_of(*files)
            if identity is None:
                break
            if now > _newest_time(*files):  # (else racy: a change now would keep the times)
                replace_file(marker, identity.encode(), 0o600)
                return
            if time.monotonic() >= deadline:
                log.info(
                    "%s: the file system's clock did not pass the store's last change "
                    "within %g s: no marker, the next start checks the store",
                    marker,
                    CLOSE_WAITS_FOR_THE_CLOCK,
                )
                break
            time.sleep(CLOCK_POLL_SECONDS)
    except OSError as exc:
        log.warning("cannot write %s (%s): the next start checks the store", marker, exc)
    with contextlib.suppress(OSError):
        os.unlink(marker)


def _newest_time(st: os.stat_result | None, wal: os.stat_result | None) -> int:
    """The latest time (ns) :func:`_identity_of` holds for the files :func:`_store_files`
    saw: of the store's last change, content or status, and of its WAL's; 0 for none."""
    return max(
        (t for f in (st, wal) if f is not None for t in (f.st_mtime_ns, f.st_ctime_ns)), default=0
    )


def _left_as_closed(path: Path) -> bool:
    """Whether the store ``path`` is exactly as a clean close left it (its marker is
    there and names it), or new (no file, or an empty one): nothing to check. The marker
    is taken away, so a run that ends without closing the store (``kill -9``, a crash,
    a power loss) leaves none, and the next open checks the file.

    Why not check at every open: the check reads the whole file, 1.5-2 s per 100 MB from
    the disk (after a reboot, the usual case), about 70-85 ms from the page cache. Damage
    comes with an end that was not clean, or with a change made to the file or its WAL
    while no server ran (a copy cut short, a tool writing into it, another file or
    another store's WAL put in place), which the marker's identity (device, inode, size,
    times of both: :func:`_identity`) tells. What it
    cannot tell is a disk that damages a file it was not asked to change: run
    ``PRAGMA integrity_check`` by hand for that (docs/sessions-store.md).
    """
    marker = closed_marker(path)
    try:
        said: str | None = read_small_file(marker, 256).decode("ascii", "replace")
    except FileNotFoundError:
        said = None
    except (OSError, NotASmallFile):
        said = ""  # (unreadable, or no file: no proof of a clean close)
    if said is not None:
        try:
            os.unlink(marker)
            sync_directory(marker.parent)  # (gone for good: a power loss must not bring it back)
        except FileNotFoundError:
            pass
        except OSError:
            # (A directory that takes no change, where the store cannot be written either:
            # checked, and its open says what is wrong.)
            said = ""
    identity = _identity(path)
    if identity is None or identity.split()[2] == "0":
        return True  # a new store: nothing in it to check
    return said == identity


def _wal_of(path: Path) -> str:
    """Where SQLite keeps the WAL of the database ``path``: beside the file a symlink
    leads to."""
    return os.path.realpath(path) + "-wal"


def _file_id(path: Path | str) -> FileId:
    """The (device, inode) of the file ``path`` names; None if there is none (``OSError``
    if that cannot be told)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _checkpoint(conn: sqlite3.Connection) -> int:
    """Copy committed WAL content into the database (PASSIVE: never waits for, nor blocks,
    the writer; what it cannot copy now the next one will). Returns the WAL's bytes of
    frames since it last started over (0 if unknown)."""
    try:
        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    except sqlite3.Error as exc:  # pragma: no cover - logged, retried by the next one
        log.warning("session store checkpoint failed: %s", exc)
        return 0
    return max(0, int(frames)) * int(page_size)


@asynccontextmanager
async def open_sqlite_store(
    path: Path | str, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[SqliteStore]:
    """Open (creating and migrating if needed) the store at ``path``; close it on exit.

    The parent directory must exist (see ``punie_trio._paths.ensure_data_dir``). A file
    written by a newer punie-trio, or one that is not a SQLite database, is a
    ``StoreError`` here, before the server starts accepting sessions.
    """
    store = SqliteStore(Path(path), clock)
    try:
        await store._open()
        yield store
    finally:
        await store.aclose()
