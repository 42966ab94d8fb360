"""The store's SQL, as plain synchronous functions of a ``sqlite3.Connection``.

``SqliteStore`` runs the writes on its writer connection and the reads on its owner thread;
the CLI's read-only helpers call the read functions directly. Connections are in autocommit
mode (``isolation_level=None``) and every write spells out its own transaction
(:func:`transaction`), so what is one transaction is visible in the code, not inferred by
the sqlite3 module.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._model import (
    SessionRecord,
    StoreError,
    TranscriptEntry,
    UnknownSessionError,
    decode_cursor,
    dump_json,
    encode_cursor,
    load_json,
)

_COLUMNS = (
    "id, root, cwd, client_id, title, mode, config, additional_directories, "
    "created_at, updated_at, turns"
)

_PLACEHOLDERS = ", ".join("?" * len(_COLUMNS.split(",")))

#: Columns ``update_session`` may set.
UPDATABLE = frozenset({"title", "mode", "config", "client_id", "updated_at"})


# Rows per multi-row INSERT: 5 parameters each stays under SQLite's historical limit of 999
# bound parameters per statement.
_ROWS_PER_INSERT = 150


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception.

    IMMEDIATE takes the write lock up front, so a transaction never fails half-way for
    having to upgrade a read lock (and waits ``busy_timeout`` for another process instead).
    A ``COMMIT`` that fails is rolled back too, so no transaction is ever left open.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # Checked: on some errors (disk full, I/O) SQLite has already rolled back.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _record(row: sqlite3.Row | tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(
        id=row[0],
        root=row[1],
        cwd=row[2],
        client_id=row[3],
        title=row[4],
        mode=row[5],
        config=load_json(row[6]),
        additional_directories=tuple(load_json(row[7])),
        created_at=float(row[8]),
        updated_at=float(row[9]),
        turns=int(row[10]),
    )


def insert_session(conn: sqlite3.Connection, rec: SessionRecord) -> None:
    params = (
        rec.id,
        rec.root,
        rec.cwd,
        rec.client_id,
        rec.title,
        rec.mode,
        dump_json(rec.config, "session config"),
        dump_json(list(rec.additional_directories), "additional directories"),
        rec.created_at,
        rec.updated_at,
        rec.turns,
    )
    try:
        with transaction(conn):
            conn.execute(f"INSERT INTO sessions ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", params)
    except sqlite3.IntegrityError:
        raise StoreError(f"session {rec.id!r} already exists") from None


def select_session(conn: sqlite3.Connection, session_id: str) -> SessionRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return None if row is None else _record(row)


def update_session(conn: sqlite3.Connection, session_id: str, changes: dict[str, Any]) -> None:
    """Set the given columns (keys of :data:`UPDATABLE`; ``config`` already a dict)."""
    assignments: list[str] = []
    params: list[Any] = []
    for column, value in changes.items():
        if column not in UPDATABLE:  # pragma: no cover - guarded by the callers
            raise StoreError(f"cannot update {column!r}")
        assignments.append(f"{column} = ?")
        params.append(dump_json(value, "session config") if column == "config" else value)
    with transaction(conn):
        if assignments:
            cur = conn.execute(
                f"UPDATE sessions SET {', '.join(assignments)} WHERE id = ?", (*params, session_id)
            )
            found = cur.rowcount > 0
        else:
            found = conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if not found:
            raise UnknownSessionError(session_id)


def select_sessions(
    conn: sqlite3.Connection, *, cwd: str | None, cursor: str | None, limit: int
) -> tuple[list[SessionRecord], str | None]:
    """One page, newest first; reads ``limit + 1`` rows to know whether another page exists."""
    where: list[str] = []
    params: list[Any] = []
    if cwd is not None:
        where.append("cwd = ?")
        params.append(cwd)
    if cursor is not None:
        updated_at, last_id = decode_cursor(cursor)
        where.append("(updated_at < ? OR (updated_at = ? AND id < ?))")
        params += [updated_at, updated_at, last_id]
    sql = f"SELECT {_COLUMNS} FROM sessions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
    rows = conn.execute(sql, (*params, limit + 1)).fetchall()
    page = [_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    return page, (encode_cursor(page[-1].updated_at, page[-1].id) if more else None)


def delete_session(conn: sqlite3.Connection, session_id: str) -> bool:
    with transaction(conn):
        # ON DELETE CASCADE removes the transcript in the same transaction.
        cur = conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cur.rowcount > 0


#: A session's ``(turns, next_seq)``: its recorded turns and the ``seq`` its next entry gets.
Tail = tuple[int, int]


def append_turn(
    conn: sqlite3.Connection,
    session_id: str,
    turn: int,
    rows: Sequence[tuple[str, str]],
    now: float,
    tail: Tail | None = None,
    before_commit: Callable[[], None] | None = None,
) -> Tail:
    """Insert one turn's ``(kind, payload_json)`` rows and bump the session, atomically;
    return the session's new tail.

    ``tail`` is what the caller believes the session's tail to be (``SqliteStore`` keeps
    each session's in memory: it is the only writer). It saves reading it: the ``UPDATE``
    that bumps the session matches only while ``turns`` is still the expected value, so a
    stale belief (another process appended to the session, or removed it) matches no row
    and the tail is read from the database instead, in the same transaction. With ``tail``
    None it is always read.

    ``before_commit`` runs inside the transaction after every write; tests use it to hold
    a turn mid-transaction (to cancel its caller, or to fail it) and check all-or-nothing.
    """
    with transaction(conn):
        if tail is not None:
            _check_new_turn(session_id, turn, tail[0])
            if not _bump_session(conn, session_id, turn, now, expected_turns=tail[0]):
                tail = None
        if tail is None:
            tail = _turns_and_next_seq(conn, session_id)
            _check_new_turn(session_id, turn, tail[0])
            _bump_session(conn, session_id, turn, now)
        next_seq = tail[1]
        # Multi-row INSERTs rather than executemany: one statement step per chunk instead of
        # one per row (measured, 20 rows: about 60 us against 90 us a turn).
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start : start + _ROWS_PER_INSERT]
            params: list[object] = []
            for seq, (kind, payload) in enumerate(chunk, next_seq + start):
                params += (session_id, seq, turn, kind, payload)
            conn.execute(_insert_sql(len(chunk)), params)
        if before_commit is not None:
            before_commit()
    return turn + 1, next_seq + len(rows)


def _check_new_turn(session_id: str, turn: int, turns: int) -> None:
    if turn < turns:
        raise StoreError(f"session {session_id!r} already has turn {turn} recorded")


def _bump_session(
    conn: sqlite3.Connection,
    session_id: str,
    turn: int,
    now: float,
    expected_turns: int | None = None,
) -> bool:
    """Set ``turns = turn + 1`` and ``updated_at``; False if no row matched (with
    ``expected_turns``, only a session whose ``turns`` is that value matches)."""
    if expected_turns is None:
        cur = conn.execute(
            "UPDATE sessions SET turns = ?, updated_at = ? WHERE id = ?",
            (turn + 1, now, session_id),
        )
    else:
        cur = conn.execute(
            "UPDATE sessions SET turns = ?, updated_at = ? WHERE id = ? AND turns = ?",
            (turn + 1, now, session_id, expected_turns),
        )
    return cur.rowcount > 0


_INSERT_SQL: dict[int, str] = {}


def _insert_sql(rows: int) -> str:
    """The text of a ``rows``-row INSERT, built once per row count: the same string object
    each time, so sqlite3's statement cache finds it without rebuilding it."""
    sql = _INSERT_SQL.get(rows)
    if sql is None:
        values = ", ".join(["(?, ?, ?, ?, ?)"] * rows)
        sql = f"INSERT INTO transcript (session_id, seq, turn, kind, payload) VALUES {values}"
        _INSERT_SQL[rows] = sql
    return sql


def select_transcript(conn: sqlite3.Connection, session_id: str) -> list[TranscriptEntry]:
    # One read transaction: the existence check and the rows see the same snapshot.
    with _read(conn):
        if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
            raise UnknownSessionError(session_id)
        rows = conn.execute(
            "SELECT seq, turn, kind, payload FROM transcript WHERE session_id = ? ORDER BY seq",
            (session_id,),
        ).fetchall()
    return [
        TranscriptEntry(session_id, int(seq), int(turn), kind, payload)
        for seq, turn, kind, payload in rows
    ]


def _turns_and_next_seq(conn: sqlite3.Connection, session_id: str) -> Tail:
    """The session's recorded turns and the ``seq`` its next entry gets (in the caller's
    transaction); ``UnknownSessionError`` if it is not stored."""
    row = conn.execute(
        "SELECT turns, (SELECT COALESCE(MAX(seq) + 1, 0) FROM transcript"
        " WHERE session_id = ?) FROM sessions WHERE id = ?",
        (session_id, session_id),
    ).fetchone()
    if row is None:
        raise UnknownSessionError(session_id)
    return int(row[0]), int(row[1])


def select_transcript_page(
    conn: sqlite3.Connection, session_id: str, after: int, upto: int | None, limit: int
) -> tuple[list[tuple[int, str, str]], int]:
    """Entries with ``after < seq <= upto`` (at most ``limit``), and ``upto``. The first page
    (``upto is None``) checks the session exists and fixes ``upto`` at its last entry, so
    the pages together are the transcript as it was when the first one was read."""
    with _read(conn):
        if upto is None:
            upto = _turns_and_next_seq(conn, session_id)[1] - 1
        # Plain tuples: sqlite3 builds them in C (about 0.6 us a row, against 4 us with a
        # TranscriptEntry each), which is what lets a 20,000-entry load keep pace.
        rows: list[tuple[int, str, str]] = conn.execute(
            "SELECT seq, kind, payload FROM transcript"
            " WHERE session_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (session_id, after, upto, limit),
        ).fetchall()
    return rows, upto


@contextmanager
def _read(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
