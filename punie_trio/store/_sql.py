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


def insert_session(conn: sqlite3.Connection, rec: SessionRecord) -> int:
    """Insert a new session; return its key (``sessions.key``, what ``turns`` refers to)."""
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
            cur = conn.execute(
                f"INSERT INTO sessions ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", params
            )
    except sqlite3.IntegrityError:
        raise StoreError(f"session {rec.id!r} already exists") from None
    assert cur.lastrowid is not None
    return cur.lastrowid


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
        # ON DELETE CASCADE removes the session's turns in the same transaction.
        cur = conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cur.rowcount > 0


#: A session's ``(turns, next_seq)``: its recorded turns and the ``seq`` its next entry gets.
Tail = tuple[int, int]

#: A transcript row as the pages return it: ``(seq, kind, payload_json)``.
Row = tuple[int, str, str]

#: Where a transcript read's next page starts: the session's key, the turn to resume at,
#: the last ``seq`` returned so far and the last ``seq`` of the snapshot being read.
PageCursor = tuple[int, int, int, int]


def encode_entries(rows: Sequence[tuple[str, str]]) -> str:
    """A turn's ``(kind, payload_json)`` pairs as its ``turns.entries`` text: one line per
    entry, ``kind TAB payload_json`` (``check_turn`` guarantees no kind holds a tab or a
    newline and no payload a newline, so the text splits back without decoding JSON)."""
    return "\n".join(map("\t".join, rows))


def append_turn(
    conn: sqlite3.Connection,
    session_id: str,
    turn: int,
    rows: Sequence[tuple[str, str]],
    now: float,
    key: int | None = None,
    tail: Tail | None = None,
    before_commit: Callable[[], None] | None = None,
) -> tuple[int, Tail]:
    """Record one turn's ``(kind, payload_json)`` rows as one ``turns`` row and bump the
    session, atomically; return the session's key and new tail.

    ``key`` and ``tail`` are what the caller believes the session's key and tail to be
    (``SqliteStore`` keeps them in memory: it is the only writer). They save reading them:
    the ``UPDATE`` that bumps the session matches only while ``turns`` is still the expected
    value, so a stale belief (another process appended to the session, or removed it; keys
    are never reused) matches no row and both are read from the database instead, in the
    same transaction. With either None they are always read.

    A turn without entries writes no ``turns`` row (only the bump). The primary key
    ``(session, turn)`` refuses a turn recorded twice, should the checks here be bypassed.

    ``before_commit`` runs inside the transaction after every write; tests use it to hold
    a turn mid-transaction (to cancel its caller, or to fail it) and check all-or-nothing.
    """
    entries = encode_entries(rows)
    with transaction(conn):
        if key is not None and tail is not None:
            _check_new_turn(session_id, turn, tail[0])
            if not _bump_session(conn, key, turn, now, expected_turns=tail[0]):
                tail = None
        if key is None or tail is None:
            key, turns, next_seq = _read_tail(conn, session_id)
            tail = (turns, next_seq)
            _check_new_turn(session_id, turn, turns)
            _bump_session(conn, key, turn, now)
        if rows:
            conn.execute(
                "INSERT INTO turns (session, turn, first_seq, count, entries)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, turn, tail[1], len(rows), entries),
            )
        if before_commit is not None:
            before_commit()
    return key, (turn + 1, tail[1] + len(rows))


def _check_new_turn(session_id: str, turn: int, turns: int) -> None:
    if turn < turns:
        raise StoreError(f"session {session_id!r} already has turn {turn} recorded")


def _bump_session(
    conn: sqlite3.Connection,
    key: int,
    turn: int,
    now: float,
    expected_turns: int | None = None,
) -> bool:
    """Set ``turns = turn + 1`` and ``updated_at``; False if no row matched (with
    ``expected_turns``, only a session whose ``turns`` is that value matches)."""
    if expected_turns is None:
        cur = conn.execute(
            "UPDATE sessions SET turns = ?, updated_at = ? WHERE key = ?", (turn + 1, now, key)
        )
    else:
        cur = conn.execute(
            "UPDATE sessions SET turns = ?, updated_at = ? WHERE key = ? AND turns = ?",
            (turn + 1, now, key, expected_turns),
        )
    return cur.rowcount > 0


def _read_tail(conn: sqlite3.Connection, session_id: str) -> tuple[int, int, int]:
    """The session's key, recorded turns and the ``seq`` its next entry gets (in the
    caller's transaction); ``UnknownSessionError`` if it is not stored. A session's seqs
    grow with its turns, so its last turn row ends where the next entry starts."""
    row = conn.execute(
        "SELECT key, turns, COALESCE((SELECT first_seq + count FROM turns"
        " WHERE session = sessions.key ORDER BY turn DESC LIMIT 1), 0)"
        " FROM sessions WHERE id = ?",
        (session_id,),
    ).fetchone()
    if row is None:
        raise UnknownSessionError(session_id)
    return int(row[0]), int(row[1]), int(row[2])


def select_transcript(conn: sqlite3.Connection, session_id: str) -> list[TranscriptEntry]:
    # One read transaction: the existence check and the rows see the same snapshot.
    with _read(conn):
        row = conn.execute("SELECT key FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise UnknownSessionError(session_id)
        turns = conn.execute(
            "SELECT turn, first_seq, entries FROM turns WHERE session = ? ORDER BY turn",
            (row[0],),
        ).fetchall()
    out: list[TranscriptEntry] = []
    for turn, first_seq, entries in turns:
        for seq, line in enumerate(entries.split("\n"), first_seq):
            kind, payload = line.split("\t", 1)
            out.append(TranscriptEntry(session_id, seq, turn, kind, payload))
    return out


def select_transcript_page(
    conn: sqlite3.Connection, session_id: str, cursor: PageCursor | None, limit: int
) -> tuple[list[Row], PageCursor | None]:
    """The next (at most ``limit``) entries after ``cursor`` and the cursor after them, or
    ``([], None)`` at the end. The first page (``cursor is None``) checks the session exists
    and fixes the snapshot's last ``seq``, so the pages together are the transcript as it
    was when the first one was read: a turn committed later starts after it. The cursor
    carries the session's key, so a session deleted (even recreated) meanwhile ends the
    read, and the turn the page stopped in, where the next one starts by primary key.

    Rows are plain tuples split out of each turn's text (about 0.2 us an entry, no JSON
    decoding), which is what lets a 20,000-entry ``session/load`` keep pace.
    """
    with _read(conn):
        if cursor is None:
            key, _, next_seq = _read_tail(conn, session_id)
            cursor = (key, 0, -1, next_seq - 1)
        key, resume_turn, after, upto = cursor
        rows: list[Row] = []
        if after < upto:
            found = conn.execute(
                "SELECT turn, first_seq, entries FROM turns"
                " WHERE session = ? AND turn >= ? AND first_seq <= ? ORDER BY turn",
                (key, resume_turn, upto),
            )
            try:
                for turn, first_seq, entries in found:
                    resume_turn = turn  # the next page starts in this turn (or after it)
                    # This turn's entries with after < seq <= upto, as many as still fit.
                    start = max(after + 1 - first_seq, 0)
                    stop = min(upto + 1 - first_seq, start + limit - len(rows))
                    for seq, line in enumerate(entries.split("\n")[start:stop], first_seq + start):
                        kind, payload = line.split("\t", 1)
                        rows.append((seq, kind, payload))
                    if len(rows) >= limit:
                        break
            finally:
                found.close()
    if not rows:
        return rows, None
    return rows, (key, resume_turn, rows[-1][0], upto)


@contextmanager
def _read(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
