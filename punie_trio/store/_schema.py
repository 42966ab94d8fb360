"""Opening a store database: pragmas, schema version and migrations.

The schema version lives in SQLite's header (``PRAGMA user_version``), not in a table, so it
is readable before we know anything else about the file and changes atomically with the
migration that sets it. ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``;
they run in order, each in its own ``BEGIN IMMEDIATE`` transaction, so two processes opening
the same new file cannot both migrate it, and a crash mid-migration leaves the old version.
Never edit a released migration: append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ._model import StoreError

MIGRATIONS: Final[Sequence[Sequence[str]]] = (
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


def migrate(
    conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]] = MIGRATIONS
) -> int:
    """Bring the schema up to ``len(migrations)``; return the version found on disk.

    ``migrations`` is a parameter only so tests can run a longer list than the released one.
    """
    target = len(migrations)
    found = _user_version(conn)
    _refuse_newer(found, path, target)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = _user_version(conn)
            _refuse_newer(version, path, target)
            if version == target:
                conn.execute("COMMIT")
                return found
            for statement in migrations[version]:
                conn.execute(statement)
            # PRAGMA does not take parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def connect(path: Path, *, cached_statements: int = 128) -> sqlite3.Connection:
    """Open (creating if needed) a read-write store database and migrate it.

    Durability: WAL with ``synchronous=NORMAL``. A commit appends the transaction to the WAL
    with ``write()``, and ``fsync`` happens only at checkpoints. Once ``COMMIT`` returns the
    bytes are in the OS page cache, which a process crash (``kill -9``, OOM kill, a segfault)
    cannot take back: the next open replays the WAL and the turn is there. That is the rule
    we promise ("an answered turn is never lost" across process crashes). Only a kernel crash
    or power loss can drop the last few commits, and even then the database stays consistent
    (WAL is never torn). ``FULL`` would add an ``fsync`` per turn - milliseconds on many
    disks - to cover power loss, which nothing here promises.

    ``cached_statements`` sizes sqlite3's prepared-statement cache (the writer's holds a
    multi-row INSERT per distinct turn length).
    """
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=True, cached_statements=cached_statements
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: could not enable WAL journal mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"{path}: cannot open session store: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open an existing store for reading only (the CLI): never creates or migrates a file.

    A database that is missing, not yet migrated, or newer than this code is a
    ``StoreError`` with a message fit for the terminal.
    """
    if not path.is_file():
        raise StoreError(f"no session store at {path}")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open session store: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = _user_version(conn)
        _refuse_newer(version, path)
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"{path}: session store schema version {version} is older than "
                f"{SCHEMA_VERSION}; run the server once to upgrade it"
            )
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"{path}: cannot read session store: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn
