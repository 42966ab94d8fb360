"""Opening a store database: pragmas, schema version and migrations.

The schema version lives in SQLite's header (``PRAGMA user_version``), not in a table, so it
is readable before we know anything else about the file and changes atomically with the
migration that sets it. ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``;
they run in order, each in its own ``BEGIN IMMEDIATE`` transaction, so two processes opening
the same new file cannot both migrate it, and a crash mid-migration leaves the old version.
A migration's steps are SQL statements or Python functions of the connection (for data
conversions SQL cannot express), run inside that transaction. Never edit a released
migration: append a new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

from .._paths import create_private
from ._model import StoreError
from ._sql import read_transaction

log = logging.getLogger(__name__)

#: One step of a migration: a SQL statement, or a function run on the connection.
Step = str | Callable[[sqlite3.Connection], None]


def _transcript_to_turns(conn: sqlite3.Connection) -> None:
    """Migration 2: convert version 1's ``transcript`` (a row per entry) into ``turns`` (a row
    per turn), keeping every entry's ``seq``: a turn's entries must be consecutive there,
    as version 1 always wrote them.

    Rows the store could not have written itself (a kind with a tab or newline, a payload
    with a raw newline, a turn whose entries are not consecutive) stop the migration with a
    ``StoreError``; the file then stays at version 1, untouched. Rows of a session that no
    longer exists (only possible with foreign keys off) are dropped: nothing could read
    them.
    """
    rows = conn.execute(
        "SELECT s.key, t.session_id, t.turn, t.seq, t.kind, t.payload"
        " FROM transcript AS t JOIN sessions AS s ON s.id = t.session_id"
        " ORDER BY t.session_id, t.seq"
    )
    # The turn being gathered: (session key, session id, turn), its first seq, its entries.
    turn_of: tuple[int, str, int] | None = None
    first_seq = 0
    lines: list[str] = []
    for key, session_id, turn, seq, kind, payload in rows:
        if "\t" in kind or "\n" in kind or "\n" in payload:
            raise StoreError(
                f"session {session_id!r}, entry {seq}: a kind with a tab or newline, or a "
                "payload with a raw newline, cannot be converted"
            )
        if turn_of != (key, session_id, turn):
            if turn_of is not None:
                _insert_turn(conn, turn_of, first_seq, lines)
            turn_of, first_seq, lines = (key, session_id, turn), seq, []
        elif seq != first_seq + len(lines):
            raise StoreError(
                f"session {session_id!r}: the entries of turn {turn} are not consecutive"
            )
        lines.append(kind + "\t" + payload)
    if turn_of is not None:
        _insert_turn(conn, turn_of, first_seq, lines)


def _insert_turn(
    conn: sqlite3.Connection, turn_of: tuple[int, str, int], first_seq: int, lines: list[str]
) -> None:
    key, session_id, turn = turn_of
    try:
        conn.execute(
            "INSERT INTO turns (session, turn, first_seq, count, entries) VALUES (?, ?, ?, ?, ?)",
            (key, turn, first_seq, len(lines), "\n".join(lines)),
        )
    except sqlite3.IntegrityError:  # the turn's entries came in two runs
        raise StoreError(
            f"session {session_id!r}: the entries of turn {turn} are not consecutive"
        ) from None


MIGRATIONS: Final[Sequence[Sequence[Step]]] = (
    # 1: sessions and their transcripts.
    (
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY NOT NULL,
            root TEXT NOT NULL,
            cwd TEXT NOT NULL,
            client_id TEXT,
            title TEXT,
            mode TEXT,
            config TEXT NOT NULL DEFAULT '{}',
            additional_directories TEXT NOT NULL DEFAULT '[]',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            turns INTEGER NOT NULL DEFAULT 0
        )
        """,
        # session/list: newest first, optionally for one cwd, keyset-paginated.
        "CREATE INDEX sessions_by_updated ON sessions (updated_at DESC, id DESC)",
        "CREATE INDEX sessions_by_cwd ON sessions (cwd, updated_at DESC, id DESC)",
        """
        CREATE TABLE transcript (
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            turn INTEGER NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            PRIMARY KEY (session_id, seq)
        ) WITHOUT ROWID
        """,
    ),
    # 2: one row per turn, keyed by an integer session key (docs/sessions-store.md: a turn's
    # commit writes about half the pages and takes about half the time).
    (
        # The old table keeps its data under another name; renaming it first lets the new
        # tables be created with their final names (and REFERENCES clauses) directly.
        "DROP INDEX sessions_by_updated",
        "DROP INDEX sessions_by_cwd",
        "ALTER TABLE sessions RENAME TO sessions_v1",
        """
        CREATE TABLE sessions (
            key INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            root TEXT NOT NULL,
            cwd TEXT NOT NULL,
            client_id TEXT,
            title TEXT,
            mode TEXT,
            config TEXT NOT NULL DEFAULT '{}',
            additional_directories TEXT NOT NULL DEFAULT '[]',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            turns INTEGER NOT NULL DEFAULT 0
        )
        """,
        """
        INSERT INTO sessions (id, root, cwd, client_id, title, mode, config,
            additional_directories, created_at, updated_at, turns)
        SELECT id, root, cwd, client_id, title, mode, config,
            additional_directories, created_at, updated_at, turns
        FROM sessions_v1 ORDER BY rowid
        """,
        """
        CREATE TABLE turns (
            session INTEGER NOT NULL REFERENCES sessions (key) ON DELETE CASCADE,
            turn INTEGER NOT NULL,
            first_seq INTEGER NOT NULL,
            count INTEGER NOT NULL,
            entries TEXT NOT NULL,
            PRIMARY KEY (session, turn)
        )
        """,
        _transcript_to_turns,
        "DROP TABLE transcript",
        "DROP TABLE sessions_v1",
        "CREATE INDEX sessions_by_updated ON sessions (updated_at DESC, id DESC)",
        "CREATE INDEX sessions_by_cwd ON sessions (cwd, updated_at DESC, id DESC)",
    ),
    # 3: a turn's commit no longer writes `sessions` (docs/sessions-store.md: 4 WAL frames a
    # turn, was 7). Each turn row carries its commit time, `at`; a session's turns and
    # updated_at are derived from its last turn row (see _sql.py), so the two indexes on
    # updated_at, which every turn had to update, go. `at` is placed before `entries`, so
    # reading it never walks a large turn's overflow pages: the table is rebuilt (ALTER
    # TABLE ADD COLUMN could only append it after `entries`).
    (
        "ALTER TABLE turns RENAME TO turns_v2",
        """
        CREATE TABLE turns (
            session INTEGER NOT NULL REFERENCES sessions (key) ON DELETE CASCADE,
            turn INTEGER NOT NULL,
            first_seq INTEGER NOT NULL,
            count INTEGER NOT NULL,
            at REAL,
            entries TEXT NOT NULL,
            PRIMARY KEY (session, turn)
        )
        """,
        # Version 2's rows keep at NULL: sessions.turns and updated_at, which version 2
        # updated with every turn, already account for them.
        """
        INSERT INTO turns (session, turn, first_seq, count, at, entries)
        SELECT session, turn, first_seq, count, NULL, entries FROM turns_v2 ORDER BY rowid
        """,
        "DROP TABLE turns_v2",
        "DROP INDEX sessions_by_updated",
        "DROP INDEX sessions_by_cwd",
        # session/list's cwd filter; ordering is by a derived value, so no column after cwd.
        "CREATE INDEX sessions_cwd ON sessions (cwd)",
    ),
    # 4: the cwd as the client sent it, which session/list reports ("cwd is immutable after
    # session setup"); `cwd` keeps the resolved form the session was checked in, which the
    # list's filter and session/load compare. NULL (a session of an older version): the
    # resolved one is reported.
    ("ALTER TABLE sessions ADD COLUMN cwd_sent TEXT",),
)

#: The schema version this code writes and understands.
SCHEMA_VERSION: Final = len(MIGRATIONS)

BUSY_TIMEOUT_MS: Final = 5_000
#: The writer connection runs on the event loop: it must never wait long for a lock. Only
#: another process writing the same file (two servers on one data directory) can make it.
WRITER_BUSY_TIMEOUT_MS: Final = 200


def _user_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def _refuse_newer(version: int, path: Path, known: int = SCHEMA_VERSION) -> None:
    if version > known:
        raise StoreError(
            f"{path}: session store schema version {version} is newer than this punie-trio "
            f"understands (version {known}); upgrade punie-trio to open it"
        )


def _refuse_unknown(
    conn: sqlite3.Connection, version: int, path: Path, known: int = SCHEMA_VERSION
) -> None:
    """Refuse a file this code must not touch: one newer than it understands, or one at
    schema version 0 that already holds tables (another program's SQLite database, which
    would otherwise get our tables added to it without a word; a new store is empty)."""
    _refuse_newer(version, path, known)
    if version != 0:
        return
    names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master LIMIT 3")]
    if names:
        raise StoreError(
            f"{path}: not a punie-trio session store (it holds {', '.join(names)}); "
            "move it away or use another --data-dir"
        )


def migrate(
    conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[Step]] = MIGRATIONS
) -> int:
    """Bring the schema up to ``len(migrations)``; return the version found on disk.

    ``migrations`` is a parameter only so tests can run a longer list than the released one.
    """
    target = len(migrations)
    found = _user_version(conn)
    _refuse_newer(found, path, target)
    with _alone(conn, path, found, target) if 0 < found < target else contextlib.nullcontext():
        return _migrate(conn, path, migrations, found)


@contextlib.contextmanager
def _alone(conn: sqlite3.Connection, path: Path, version: int, target: int) -> Iterator[None]:
    """Hold the store ``path`` alone (``conn`` in ``EXCLUSIVE`` locking mode) while it is
    upgraded from ``version`` to ``target``; a ``StoreError`` if another process keeps it
    open past the busy timeout, with nothing changed.

    Why: punie-trio's releases at schema versions 1 and 2 took no lock on the data
    directory. One still serving (upgrading the package does not stop it) had its store
    upgraded under it by a newer ``serve``, and every later turn of it failed (`the turn
    was not saved: session store: no such table: transcript`). In WAL mode every open
    connection holds a shared lock on the file, so the exclusive one waits for readers
    (``sessions ...`` commands) and fails while such a server runs.
    """
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    try:
        conn.execute("BEGIN IMMEDIATE")  # (takes the file's exclusive lock, and keeps it)
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        # Only closing lets go of the lock half taken: in this mode SQLite keeps the
        # PENDING lock it got, and every new reader (the one that keeps the store's files
        # as found while this open fails, a ``sessions`` command) waited its busy timeout.
        conn.close()
        if _primary_code(exc) != sqlite3.SQLITE_BUSY:
            raise
        raise StoreError(
            f"{path}: cannot upgrade the session store from schema version {version} "
            f"to {target}: another process has it open (a punie-trio serve of a release "
            "that wrote version 1 or 2, which takes no lock on the data directory, or "
            "a tool reading it); nothing was changed: stop it, then start again"
        ) from exc
    try:
        yield
    finally:
        conn.execute("PRAGMA locking_mode = NORMAL")
        # (The lock goes at the connection's next access of the file.)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()


def _migrate(
    conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[Step]], found: int
) -> int:
    """:func:`migrate`'s migrations, each in its own transaction."""
    target = len(migrations)
    started: float | None = None
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = _user_version(conn)
            _refuse_unknown(conn, version, path, target)
            if version == target:
                conn.execute("COMMIT")
                if started is not None:
                    log.info(
                        "session store %s: upgraded to schema version %d in %.2f s",
                        path,
                        target,
                        time.perf_counter() - started,
                    )
                return found
            if started is None and found > 0:  # (0: a new store, set up, not upgraded)
                # Why: it takes seconds for a large store, and the start said nothing.
                log.warning(
                    "session store %s: upgrading it from schema version %d to %d, once "
                    "(a large store takes seconds: 11 s for 100,000 turns from version 1)",
                    path,
                    version,
                    target,
                )
                started = time.perf_counter()
            for step in migrations[version]:
                if isinstance(step, str):
                    conn.execute(step)
                    continue
                try:
                    step(conn)
                except StoreError as exc:
                    raise StoreError(
                        f"{path}: cannot upgrade the session store to schema version "
                        f"{version + 1}: {exc}"
                    ) from exc
            # PRAGMA does not take parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def damaged(path: Path, problem: str) -> StoreError:
    """The error for a store SQLite finds damaged: it names the file, and says what to do
    (docs/sessions-store.md, "A damaged store", has the recovery step by step)."""
    return StoreError(
        f"{path}: the session store is damaged ({problem}); nothing was changed in it. "
        f"Keep a copy of {path} (and its -wal, if any), then either recover what can be "
        f'read into a new store (`sqlite3 {path} .dump`: see "A damaged store" in '
        "punie-trio's docs/sessions-store.md) or move it away to start with an empty one"
    )


#: Less room than this left where SQLite failed a write: it failed for want of room (a
#: commit needs a few 4 KiB WAL frames, the ``-shm`` file grows by 32 KiB, a checkpoint
#: grows the database by what the WAL holds).
NO_ROOM_BELOW: Final = 1024 * 1024


def out_of_room(path: Path, exc: sqlite3.Error) -> tuple[str, str] | None:
    """Why SQLite could not write the store ``path``, and what to do, when the cause can be
    seen: the file system holding it is (nearly) full, or one of its files is at the
    process's file size limit (``RLIMIT_FSIZE``: a write past it fails with ``EFBIG``);
    None otherwise, and for an error that is no failed write. A file system is said
    full only if it gives its size (a ramfs gives 0 blocks, 0 free).

    Why: SQLite names neither. A full disk is ``database or disk is full`` where a write
    fails, but ``disk I/O error`` where its ``-shm`` file cannot grow (a store being made
    with 16-32 KiB left), and the file size limit is ``disk I/O error`` everywhere:
    ``serve`` said "cannot open session store: disk I/O error", and a prompt "the turn was
    not saved: session store: disk I/O error".
    """
    if _primary_code(exc) not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return None
    real = os.path.realpath(path)
    try:
        fs = os.statvfs(os.path.dirname(real))
    except (OSError, AttributeError):  # (AttributeError: Windows has no statvfs)
        fs = None
    # (0 blocks: a file system that gives no size, a ramfs, a tmpfs of size=0, some FUSE
    # ones; its 0 free is no measure. Said full, the file size limit was hidden behind
    # "free some space".)
    if fs is not None and fs.f_blocks > 0 and fs.f_bavail * fs.f_frsize < NO_ROOM_BELOW:
        free = fs.f_bavail * fs.f_frsize // 1024
        return (
            f"the file system holding the session store is full, with {free} KiB free",
            "free some space",
        )
    limit = _file_size_limit()
    if limit is not None:
        largest = 0
        for name in (real, real + "-wal", real + "-shm"):
            with contextlib.suppress(OSError):
                largest = max(largest, os.stat(name).st_size)
        if limit - largest < NO_ROOM_BELOW:
            return (
                f"the session store reached the file size limit of {limit} bytes (ulimit -f)",
                "raise the limit",
            )
    return None


def _file_size_limit() -> int | None:
    """The process's file size limit in bytes (``RLIMIT_FSIZE``); None: no limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _primary_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code for ``exc`` (the low byte of its extended code), or
    None where the error carries none."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _is_damaged(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed ``exc`` because the file is damaged (``SQLITE_CORRUPT``)."""
    return _primary_code(exc) == sqlite3.SQLITE_CORRUPT


#: Most of ``integrity_check``'s findings said in the error (the first ones tell the kind).
CHECK_SAID = 3


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """Read the whole file with ``PRAGMA integrity_check`` and refuse a damaged one
    (:func:`damaged`).

    Why: a page damaged at rest (a disk error, a tool writing into the file) was found
    only when a read reached it: the server started, listed its sessions, and failed the
    ``session/load`` of the session on that page, much later. ``integrity_check`` checks
    every page and record of every b-tree, and that each index matches its table.

    Why not ``quick_check`` (the same, but for the indexes): an index that disagrees
    with its table is lost data here, as every read goes through one (a session's turns
    through the ``turns`` key). Another store's WAL replayed into a store passed it,
    and the server then served sessions whose ``turns`` said 5, 10 and 15 with 20 turns
    each read through the index (15 in the table). Measured on a 618 MB store: 11.1 s
    from the disk for both, 0.62-0.74 s from the page cache against 0.52-0.54 s.
    """
    log.warning(
        "session store %s: not closed cleanly by the last run (or changed since), so "
        "checking it whole before serving (PRAGMA integrity_check)",
        path,
    )
    started = time.perf_counter()
    try:
        rows = conn.execute(f"PRAGMA integrity_check({CHECK_SAID})").fetchall()
    except sqlite3.DatabaseError as exc:
        if not _is_damaged(exc):
            raise
        raise damaged(path, str(exc)) from exc
    found = [str(row[0]) for row in rows]
    if found != ["ok"]:
        raise damaged(path, "; ".join(found))
    log.info("session store %s: checked in %.2f s", path, time.perf_counter() - started)


class CheckStop:
    """Stops the start-up check and the migrations of :func:`connect` from another thread
    (:meth:`stop`).

    Why: the check of a large store takes seconds (10.4 s for 618 MB from the disk), and
    a SIGINT or SIGTERM at start waited for it to end: past the shutdown timeout, the
    watchdog ended ``serve`` (status 1, "shutdown did not finish within 7 s (a client
    stopped reading?)"). Stopping it loses nothing: it only reads, and the next start
    checks again (the marker of a clean close was taken away). ``sqlite3_interrupt``
    stops it within a millisecond; a progress handler would not do: the check
    walks the b-trees within one step of SQLite's virtual machine (measured, the
    handler's calls all came in the last 0.4 s of a 12 s check).

    The migrations of an old store take seconds too (11 s for 100,000 turns from
    version 1, 4.4 s from version 2), and a signal during them met the same watchdog
    (status 1 after 7 s). Stopping one loses nothing either: its transaction is rolled
    back, the file keeps the version it had, and the next start upgrades it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checking: sqlite3.Connection | None = None
        self.stopped = False

    def stop(self) -> None:
        """Stop the check running (or about to run); any thread."""
        with self._lock:
            self.stopped = True
            if self._checking is not None:
                self._checking.interrupt()

    @contextlib.contextmanager
    def running(self, conn: sqlite3.Connection, path: Path) -> Iterator[None]:
        """The check runs on ``conn`` inside: :meth:`stop` interrupts it there.

        A statement is kept running meanwhile: SQLite forgets an interrupt that comes
        while no statement runs (here, one between this and the check's first step,
        which then ran whole), and keeps one for statements started while another runs
        ("as if they had been running prior to the sqlite3_interrupt() call")."""
        running = conn.execute("SELECT 1 UNION ALL SELECT 2")
        try:
            running.fetchone()  # (one row of two: the statement is not done)
            with self._lock:
                if self.stopped:
                    raise StoreError(f"{path}: cannot open session store: its check was stopped")
                self._checking = conn
            try:
                yield
            finally:
                with self._lock:
                    self._checking = None
        finally:
            running.close()

    @contextlib.contextmanager
    def upgrading(self, conn: sqlite3.Connection, path: Path) -> Iterator[None]:
        """The migrations run on ``conn`` inside: :meth:`stop` interrupts them there.

        No statement can be kept running across them as :meth:`running` does (SQLite
        refuses a ``DROP TABLE`` while another statement of the connection runs), so a
        progress handler also ends the statement running when :meth:`stop` was called
        between two of them, where the interrupt is forgotten. (A handler alone would not
        do: a ``DROP TABLE`` of a large table is one step of SQLite's virtual machine.)"""
        with self._lock:
            if self.stopped:
                raise StoreError(f"{path}: cannot open session store: its upgrade was stopped")
            self._checking = conn
        conn.set_progress_handler(lambda: self.stopped, UPGRADE_STEPS_PER_LOOK)
        try:
            yield
        finally:
            # (An upgrade that found the store held by another process closed ``conn``.)
            with contextlib.suppress(sqlite3.ProgrammingError):
                conn.set_progress_handler(None, 0)
            with self._lock:
                self._checking = None


#: SQLite virtual machine steps between two looks of a migration at :class:`CheckStop`
#: (a Python call each: well under 1% of a migration's time).
UPGRADE_STEPS_PER_LOOK: Final = 10_000


def connect(
    path: Path,
    *,
    check: bool = False,
    stop: CheckStop | None = None,
    left_as_closed: Callable[[], bool] | None = None,
) -> sqlite3.Connection:
    """Open (creating if needed) a read-write store database and migrate it; with
    ``check``, first check the whole file (:func:`check_integrity`), before anything
    writes to it. ``left_as_closed`` is asked once the file is known to be a store this
    code opens (not a newer one, nor another program's database), before the check:
    whether it is as a clean close left it (taking that proof away); if not, it is checked.
    (Asked before, it took away a newer version's marker of its clean close from the store
    it then refused, and that version's next start checked the whole store for nothing.)
    Once ``stop`` is stopped (from another thread), the check or the migration running
    ends and the open fails (``StoreError``), the file at the version it had (a migration
    stopped is rolled back).

    Durability: WAL with ``synchronous=NORMAL``. A commit appends the transaction to the WAL
    with ``write()``, and ``fsync`` happens only at checkpoints. Once ``COMMIT`` returns the
    bytes are in the OS page cache, which a process crash (``kill -9``, OOM kill, a segfault)
    cannot take back: the next open replays the WAL and the turn is there. That is the rule
    we promise ("an answered turn is never lost" across process crashes). Only a kernel crash
    or power loss can drop the last few commits, and even then the database stays consistent
    (WAL is never torn). ``FULL`` would add an ``fsync`` per turn - milliseconds on many
    disks - to cover power loss, which nothing here promises.
    """
    # A new store (and so its -wal and -shm) is private to the user. Where that fails,
    # SQLite's own open below fails too, and its message is the one reported.
    with contextlib.suppress(OSError):
        create_private(path)
    try:
        # (Fails here for a path that is a directory: "unable to open database file".)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open session store: {exc}") from exc
    upgrading: tuple[int, int] | None = None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Before anything writes: switching the journal mode rewrites the file's header,
        # and a newer store, or another program's database, is refused untouched.
        # (One snapshot: another opener may be creating the schema between two reads.)
        with read_transaction(conn):
            _refuse_unknown(conn, _user_version(conn), path)
            if left_as_closed is not None and not left_as_closed():
                check = True
            if check:  # (once the file is known to be a store: another's is refused as such)
                with stop.running(conn, path) if stop else contextlib.nullcontext():
                    check_integrity(conn, path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"{path}: cannot open session store: could not enable WAL journal mode "
                f"(got {mode!r})"
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        # A deleted session's text is overwritten, not left in free pages of the file (the
        # default of some SQLite builds, not of others).
        conn.execute("PRAGMA secure_delete = ON")
        old = _user_version(conn)
        # (The version and the size it had: where an upgrade finds no room, both are said.)
        upgrading = (old, _database_bytes(conn)) if 0 < old < SCHEMA_VERSION else None
        with stop.upgrading(conn, path) if stop else contextlib.nullcontext():
            migrate(conn, path)
        upgrading = None
        check_writable(conn, path)
    except sqlite3.Error as exc:
        left = _version_left(conn) if upgrading is not None else None
        _close_failed(conn, path, upgrading, left, exc)
        if _is_readonly(exc):  # (the directory will not take the -wal: the WAL switch)
            raise StoreError(f"{path}: the session store is read-only ({exc})") from exc
        if _is_damaged(exc):  # (a page the open itself reads: the schema, the end)
            raise damaged(path, str(exc)) from exc
        room = out_of_room(path, exc)
        if room is not None and upgrading is not None:
            raise StoreError(_no_room_to_upgrade(path, upgrading, left, room, exc)) from exc
        if room is not None:  # (making a new store, or replaying a WAL: no room for it)
            what, remedy = room
            raise StoreError(
                f"{path}: cannot open session store: {what} (SQLite: {exc}); {remedy}, "
                "then start again"
            ) from exc
        raise StoreError(f"{path}: cannot open session store: {exc}") from exc
    except BaseException:
        left = _version_left(conn) if upgrading is not None else None
        _close_failed(conn, path, upgrading, left, None)
        raise
    return conn


def _close_failed(
    conn: sqlite3.Connection,
    path: Path,
    upgrading: tuple[int, int] | None,
    left: int | None,
    exc: sqlite3.Error | None,
) -> None:
    """Close ``conn``, an open that failed (``exc``, if SQLite's): as any last connection
    closes where an upgrade (``upgrading``: the version and size it had) failed and kept
    nothing (the store ``left`` at the version it had), else as found
    (:func:`_close_as_found`).

    Why: every failed open closed as found, an upgrade's too, so the WAL it had written
    stayed beside the store with its -shm, holding only the pages rolled back: 1 MiB for
    a 1 MiB store refused at the file size limit (about 830 MB for a 365 MB one), taking
    the very room the message asks the user to free. Closed as the last connection, SQLite
    checkpoints (nothing of the upgrade's is committed: none of it is copied, and the file
    stays byte for byte as it was unless a run killed before a checkpoint left rows
    committed in the WAL, which are copied in as any close copies them) and removes both.
    Where a migration before the one that failed was kept, the WAL holds it, and where
    the store is damaged or read-only the file must not take a checkpoint: those close as
    found."""
    kept_nothing = upgrading is not None and left == upgrading[0]
    if kept_nothing and not (exc is not None and (_is_damaged(exc) or _is_readonly(exc))):
        with contextlib.suppress(sqlite3.Error):
            conn.close()
    else:
        _close_as_found(conn, path)


#: What an upgrade needs while it runs, measured from version 1 (10.9 and 365 MB stores)
#: and 2 (12.4 MB): free room of 3.3-3.6 and 2.6-2.9 times the store's size. The new
#: tables are written beside the old ones, and the old ones' pages overwritten
#: (``secure_delete``), all in one transaction, so the WAL holds both.
UPGRADE_ROOM_FACTOR: Final = 3.5


def _database_bytes(conn: sqlite3.Connection) -> int:
    """The size of ``conn``'s database (its pages, the WAL's included)."""
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    return pages * int(conn.execute("PRAGMA page_size").fetchone()[0])


def _version_left(conn: sqlite3.Connection) -> int | None:
    """The schema version of ``conn``'s store once a migration failed (and was rolled
    back); None where it cannot be read."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return _user_version(conn)
    except sqlite3.Error:
        return None


def _no_room_to_upgrade(
    path: Path,
    upgrading: tuple[int, int],
    left: int | None,
    room: tuple[str, str],
    exc: sqlite3.Error,
) -> str:
    """The message for an upgrade of the store ``path`` that found no room: ``upgrading``
    is the version and size it had, ``left`` the version it was left at (each migration
    is a transaction of its own: those done stay, the one that failed is rolled back),
    ``room`` :func:`out_of_room`'s cause and remedy.

    Why: it was the message of a store that could not be made (``cannot open session
    store: the file system holding the session store is full, with 0 KiB free``), and
    once the refused start had ended the disk could have room again (the upgrade's WAL
    gone): nothing said that the upgrade needed it, nor how much, nor what was kept."""
    what, remedy = room
    version, size = upgrading
    if left == version:
        kept = f"it was rolled back, and the store is as it was (version {version})"
    elif left is not None:
        kept = (
            f"the store is whole, at version {left} (the migrations before the one that "
            "failed stay, that one was rolled back)"
        )
    else:
        kept = "the migration that failed was rolled back"
    mib = size / (1024 * 1024)
    return (
        f"{path}: cannot upgrade the session store from schema version {version} to "
        f"{SCHEMA_VERSION}: {what} (SQLite: {exc}); {kept}. An upgrade needs free room "
        f"of about {UPGRADE_ROOM_FACTOR:g} times the store's size while it runs "
        f"({mib:.1f} MiB here: about {mib * UPGRADE_ROOM_FACTOR:.0f} MiB), and leaves the "
        f"store about twice as large: {remedy}, then start again"
    )


def _close_as_found(conn: sqlite3.Connection, path: Path) -> None:
    """Close ``conn``, an open that failed, leaving the store's files as they are.

    Why: the last connection to close a store checkpoints its WAL into the file and
    removes it. A store refused as damaged was changed so, just after the message said
    "nothing was changed in it. Keep a copy of PATH (and its -wal, if any)": a damaged
    file took the WAL's pages, the -wal was gone, and a store whole but for another
    store's WAL beside it was damaged for good. So a read-only connection holds the
    store while ``conn`` closes (``conn`` is then not the last), and closes after it
    (a read-only one never checkpoints). (Python 3.12 has ``setconfig`` for SQLite's
    ``SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE``; 3.11 has not.) Where that connection cannot
    be made or read (no file, page 1 unreadable), ``conn`` closes as it would have.
    """
    keeper: sqlite3.Connection | None = None
    try:
        keeper = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        keeper.execute("PRAGMA schema_version").fetchone()  # (its hold on the WAL)
    except (sqlite3.Error, OSError):
        pass
    try:
        conn.close()
    finally:
        if keeper is not None:
            keeper.close()


def _is_readonly(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed ``exc`` because it may only read the store (any of
    ``SQLITE_READONLY``'s extended codes: the file, its directory, a recovery)."""
    return _primary_code(exc) == sqlite3.SQLITE_READONLY


def check_writable(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a store SQLite opened read-only (``StoreError``), at open.

    Why: SQLite opens a write-protected file (or one in a directory where the ``-wal`` and
    ``-shm`` files cannot be made) read-only without a word, and reads, migrations already
    done and even ``BEGIN IMMEDIATE`` all succeed; the first write fails. Without this the
    server started and then failed every ``session/new``. The probe rewrites the schema
    version inside a transaction it rolls back, so a writable store is left untouched.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"PRAGMA user_version = {_user_version(conn)}")
    except sqlite3.OperationalError as exc:
        raise StoreError(f"{path}: the session store is read-only ({exc})") from exc
    finally:
        conn.execute("ROLLBACK")


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open an existing store for reading only (the CLI): never creates or migrates a file.

    A database that is missing, not yet migrated, or newer than this code is a
    ``StoreError`` with a message fit for the terminal.
    """
    # (os.stat, not Path.exists: that raises any errno but "missing" - a data directory
    # the user may not search, a name too long - and its OSError was a traceback.)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise StoreError(f"no session store at {path}") from None
    except NotADirectoryError:  # a file given for the data directory (as serve says)
        raise StoreError(
            f"cannot use data directory {path.parent}: it is not a directory"
        ) from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot open session store: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise StoreError(f"{path}: the session store is not a file")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open session store: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        with read_transaction(conn):  # (one snapshot, as in connect)
            version = _user_version(conn)
            # Another program's database is named so, as serve names it (not "older").
            _refuse_unknown(conn, version, path)
        if version == 0:
            # No tables (_refuse_unknown named any): a store no serve set up (one killed as
            # it made it, a ``touch``), which was "schema version 0 is older than 4".
            raise StoreError(
                f"{path}: the session store is empty (no serve has set it up: it holds no "
                "sessions); start the server once to set it up"
            )
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"{path}: session store schema version {version} is older than "
                f"{SCHEMA_VERSION}; run the server once to upgrade it"
            )
    except sqlite3.Error as exc:
        conn.close()
        if _primary_code(exc) == sqlite3.SQLITE_BUSY:
            # (Only a connection holding the file alone keeps a reader out in WAL mode:
            # an upgrade, _alone. It said "database is locked", naming no cause.)
            raise StoreError(
                f"{path}: cannot read session store: another process holds it alone (a "
                "serve upgrading it from an older schema version, which takes seconds for "
                "a large store); try again once that serve has started"
            ) from exc
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY_DIRECTORY:
            # (A store closed cleanly has no -shm; reading a WAL store needs one.)
            raise StoreError(
                f"{path}: cannot read session store: SQLite must make its -shm file to read"
                " it, and the directory does not let it (make the directory writable, or"
                " read while the server runs)"
            ) from exc
        raise StoreError(f"{path}: cannot read session store: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn
