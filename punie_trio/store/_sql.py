"""The store's SQL, as plain synchronous functions of a ``sqlite3.Connection``.

``SqliteStore`` runs the writes on its writer connection and the reads on its owner thread;
the CLI's read-only helpers call the read functions directly. Connections are in autocommit
mode (``isolation_level=None``) and every write spells out its own transaction
(:func:`transaction`), so what is one transaction is visible in the code, not inferred by
the sqlite3 module.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .. import _json
from ._model import (
    MAX_TIME,
    MIN_TIME,
    SessionRecord,
    StoreError,
    TranscriptEntry,
    UnknownSessionError,
    dump_json,
    load_json,
    next_cursor,
    page_start,
    root_prefix,
    stored_time,
)

log = logging.getLogger(__name__)

_COLUMNS = (
    "id, root, cwd, client_id, title, mode, config, additional_directories, "
    "created_at, updated_at, turns, cwd_sent"
)

_PLACEHOLDERS = ", ".join("?" * len(_COLUMNS.split(",")))

# A turn's commit writes only its ``turns`` row (schema version 3): ``sessions.turns`` and
# ``sessions.updated_at`` are the session's values as of its last metadata write (creation,
# ``update_session``, the migration). The true values add the session's last turn row
# ``t`` (joined by ``_LAST_TURN``, NULL columns if it has none: the covering ``(session,
# turn)`` index gives its rowid, one more B-tree descent its row; ``at`` comes before
# ``entries``, so a large turn's overflow pages are never read):
#
# - turns: ``max(s.turns, t.turn + 1)``. A session created with ``turns = n`` and never
#   appended to has no row; every appended turn, even an empty one, has one.
# - updated_at: ``t.at`` if ``t`` was appended after the last metadata write, else
#   ``s.updated_at``. ``update_session`` folds the true values into the row, so a turn is
#   "after" it exactly when ``t.turn >= s.turns``: the last write wins, whichever it was,
#   as when every turn set ``updated_at`` itself (and as ``MemoryStore`` does). Version 2's
#   rows have ``at`` NULL and ``turn < s.turns`` (it bumped ``sessions`` with every turn).
_LAST_TURN = (
    "LEFT JOIN turns AS t"
    " ON t.rowid = (SELECT rowid FROM turns WHERE session = s.key ORDER BY turn DESC LIMIT 1)"
)
_TRUE_UPDATED_AT = (
    "CASE WHEN t.turn >= s.turns THEN COALESCE(t.at, s.updated_at) ELSE s.updated_at END"
)
_TRUE_TURNS = "max(s.turns, COALESCE(t.turn + 1, 0))"
#: ``_COLUMNS`` with the true ``updated_at`` and ``turns``, from ``sessions AS s`` and
#: ``_LAST_TURN``.
_TRUE_COLUMNS = (
    "s.id, s.root, s.cwd, s.client_id, s.title, s.mode, s.config, s.additional_directories,"
    f" s.created_at, {_TRUE_UPDATED_AT} AS updated_at, {_TRUE_TURNS} AS turns, s.cwd_sent"
)

#: Columns ``update_session`` may set.
UPDATABLE = frozenset(
    {"title", "mode", "config", "client_id", "updated_at", "additional_directories"}
)


# (Named like the function it replaced: ``with transaction(conn):``.)
class transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception.

    IMMEDIATE takes the write lock up front, so a transaction never fails half-way for
    having to upgrade a read lock (and waits ``busy_timeout`` for another process instead).
    A ``COMMIT`` that fails is rolled back too, so no transaction is ever left open.

    A class, not a generator-based context manager: every turn's commit enters one, and
    the generator machinery cost a few us of it.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        conn = self._conn
        try:
            if exc_type is None:
                conn.execute("COMMIT")
                return
        except BaseException:
            _roll_back(conn)
            raise
        _roll_back(conn)


def _roll_back(conn: sqlite3.Connection) -> None:
    # Checked: on some errors (disk full, I/O) SQLite has already rolled back.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class DamagedRow(StoreError):
    """What the file holds is not what this store writes (edited by hand, or damaged): a
    session row whose columns do not decode, or a transcript entry that is not a JSON
    object. Names the session (and the entry), so one bad row fails only what reads it."""


def _record(row: sqlite3.Row | tuple[Any, ...]) -> SessionRecord:
    try:
        config = load_json(row[6])
        directories = load_json(row[7])
        if not isinstance(directories, list) or not all(isinstance(d, str) for d in directories):
            raise ValueError("additional_directories is not a list of strings")
        return SessionRecord(
            id=row[0],
            root=row[1],
            cwd=row[2],
            client_id=row[3],
            title=row[4],
            mode=row[5],
            config=config,
            additional_directories=tuple(directories),
            created_at=stored_time(row[8]),
            updated_at=stored_time(row[9]),
            turns=int(row[10]),
            cwd_sent=row[11],
        )
    except (ValueError, TypeError) as exc:
        raise DamagedRow(f"stored session {row[0]!r} is damaged: {exc}") from None


def _damaged_entry(session_id: str, seq: int, turn: int, why: str) -> DamagedRow:
    return DamagedRow(
        f"the stored transcript of session {session_id!r} is damaged at entry {seq}"
        f" (turn {turn + 1}): {why}"
    )


def _entry_rows(
    session_id: str, turn: int, first_seq: int, entries: str, start: int, stop: int | None
) -> list[Row]:
    """The ``(seq, kind, payload_json)`` rows of a turn's entries ``start:stop``, each
    checked to be ``kind``, a tab, and a JSON object: ``session/load`` splices payloads
    into its notifications unread, so a damaged one would put a line on the wire that is
    not JSON (or an ``update`` that is not an object). About 0.9 us an entry (the fast
    check, :func:`~punie_trio._json.is_object_text`); an entry it refuses is read again
    with ``loads``, for the reason or a repair."""
    rows: list[Row] = []
    is_object = _json.is_object_text
    for seq, line in enumerate(entries.split("\n")[start:stop], first_seq + start):
        kind, tab, payload = line.partition("\t")
        if not tab:
            raise _damaged_entry(session_id, seq, turn, "no tab after its kind")
        if not is_object(payload):
            payload = _checked_slowly(session_id, seq, turn, payload)
        rows.append((seq, kind, payload))
    return rows


def _checked_slowly(session_id: str, seq: int, turn: int, payload: str) -> str:
    """An entry's payload the fast check refused: fine after all (whitespace before it),
    repaired (:func:`_repaired`), or damaged (``DamagedRow`` naming why)."""
    try:
        if type(_json.loads(payload)) is not dict:
            raise ValueError("not a JSON object")
    except ValueError as exc:
        repaired = _repaired(payload)
        if repaired is None:
            raise _damaged_entry(session_id, seq, turn, str(exc)) from None
        return repaired
    return payload


def _repaired(payload: str) -> str | None:
    """A payload with ``NaN`` or ``Infinity`` in it (stored before the server's update
    encoder became strict: a script's tool input, say) as strict JSON, those written
    ``null`` as the server writes them now; None if it is something else."""
    try:
        value = json.loads(payload)
        return _json.dumps_finite(value) if type(value) is dict else None
    except (ValueError, RecursionError):
        return None


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
        rec.cwd_sent,
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
    row = conn.execute(
        f"SELECT {_TRUE_COLUMNS} FROM sessions AS s {_LAST_TURN} WHERE s.id = ?", (session_id,)
    ).fetchone()
    return None if row is None else _record(row)


def select_ids_starting_with(
    conn: sqlite3.Connection, prefix: str, limit: int
) -> tuple[list[str], int]:
    """The first ``limit`` session ids (in order) that start with ``prefix``, and how many
    start so in all. (``substr``, not ``LIKE``: ``_`` and ``%`` in a prefix are its own.)"""
    rows = conn.execute(
        "SELECT id, count(*) OVER () FROM sessions WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT ?",
        (len(prefix), prefix, limit),
    ).fetchall()
    return [row[0] for row in rows], (rows[0][1] if rows else 0)


def update_session(conn: sqlite3.Connection, session_id: str, changes: dict[str, Any]) -> None:
    """Set the given columns (keys of :data:`UPDATABLE`; ``config`` already a dict).

    The same write folds the session's true ``turns`` and ``updated_at`` (unless given) into
    its row: a turn appended later is then the one with ``turn >= sessions.turns``.
    """
    for column in changes:
        if column not in UPDATABLE:  # pragma: no cover - guarded by the callers
            raise StoreError(f"cannot update {column!r}")
    with transaction(conn):
        row = conn.execute(
            f"SELECT s.key, {_TRUE_UPDATED_AT}, {_TRUE_TURNS} FROM sessions AS s {_LAST_TURN}"
            " WHERE s.id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            raise UnknownSessionError(session_id)
        if not changes:
            return
        key, updated_at, turns = row
        values = {"updated_at": updated_at, "turns": turns, **changes}
        assignments = ", ".join(f"{column} = ?" for column in values)
        params = [
            dump_json(value, "session config")
            if column == "config"
            else dump_json(list(value), "additional directories")
            if column == "additional_directories"
            else value
            for column, value in values.items()
        ]
        conn.execute(f"UPDATE sessions SET {assignments} WHERE key = ?", (*params, key))


def select_sessions(
    conn: sqlite3.Connection,
    *,
    cwd: str | None,
    cursor: str | None,
    limit: int | None,
    roots: Sequence[str] | None = None,
) -> tuple[list[SessionRecord], str | None]:
    """One page, newest first; reads ``limit + 1`` rows to know whether another page exists.
    ``limit=None`` reads every session (after ``cursor``) at once: the CLI's listing.

    The order is by a derived value (the true ``updated_at``), so no index serves it: each
    page computes it for every session (of ``cwd``, found by index) and sorts them, about
    2 us a session (docs/sessions-store.md).
    """
    params: list[Any] = []
    start = page_start(cursor, cwd)
    last, last_id, as_of = start
    # Each session's place: its updated_at as of the listing's moment (``as_of``, the first
    # page's newest), so a session touched between pages keeps its place (listed_position).
    position = "updated_at"
    if as_of is not None:
        # Touched since: the later of its last turn committed by then and its last metadata
        # write's value, each if not after as_of, else its creation (the rows are few: only
        # sessions touched since the listing began take this branch).
        earlier_turn = (
            "(SELECT at FROM turns WHERE session = skey AND at <= ? ORDER BY turn DESC LIMIT 1)"
        )
        meta = "CASE WHEN meta_at <= ? THEN meta_at END"
        position = (
            f"CASE WHEN updated_at <= ? THEN updated_at ELSE COALESCE(max({earlier_turn},"
            f" {meta}), {earlier_turn}, {meta}, created_at) END"
        )
        params += [as_of] * position.count("?")  # (textually first: the outer SELECT's)
    sql = (
        f"SELECT {_TRUE_COLUMNS}, s.key AS skey, s.updated_at AS meta_at"
        f" FROM sessions AS s {_LAST_TURN}"
    )
    where: list[str] = []
    if cwd is not None:
        where.append("s.cwd = ?")
        params.append(cwd)
    if roots is not None:
        # (_model.under_roots, in SQL: the root itself, or a path starting with its prefix)
        where.append(
            "(" + " OR ".join(["s.cwd = ? OR substr(s.cwd, 1, ?) = ?"] * len(roots)) + ")"
            if roots
            else "0"
        )
        for root in roots:
            prefix = root_prefix(root)
            params += [root, len(prefix), prefix]
    if where:
        sql += " WHERE " + " AND ".join(where)
    # (A row whose time is not a number, or no date (_model.stored_time), which only
    # editing the file can make, sorts before every other and no cursor could point past
    # it (an infinite one, the first page's newest, made every later cursor invalid): not
    # listed at all. Its load fails naming it.)
    in_range = f"BETWEEN {MIN_TIME!r} AND {MAX_TIME!r}"
    sql = (
        f"SELECT * FROM (SELECT {_COLUMNS}, {position} AS position FROM ({sql})"
        f" WHERE typeof(updated_at) IN ('integer', 'real') AND updated_at {in_range})"
        f" WHERE position {in_range}"
    )
    if last is not None:
        sql = f"SELECT * FROM ({sql}) WHERE (position < ? OR (position = ? AND id < ?))"
        params += [last, last, last_id]
    sql += " ORDER BY position DESC, id DESC LIMIT ?"
    rows = conn.execute(sql, (*params, -1 if limit is None else limit + 1)).fetchall()
    if limit is None:
        return _readable(rows), None
    page = _readable(rows[:limit])
    if len(rows) <= limit:
        return page, None
    # After the page's last row, read or not (its place in the order is all a cursor needs).
    for row in reversed(rows[:limit]):
        if isinstance(row[0], str):
            newest = float(rows[0][-1])
            return page, next_cursor(float(row[-1]), row[0], start, newest=newest, cwd=cwd)
    return page, None


def _readable(rows: list[Any]) -> list[SessionRecord]:
    """The rows' records, leaving out (with a warning) a row that does not decode: one
    damaged session must not take every listing with it (loading it still fails, naming
    it)."""
    records: list[SessionRecord] = []
    for row in rows:
        try:
            records.append(_record(row))
        except DamagedRow as exc:
            log.warning("%s: left out of the list", exc)
    return records


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


#: A turn's row, written only while no turn at or after ``:tail`` (the session's recorded
#: turns, as the caller believes) is recorded: one statement, no separate read. The subquery
#: seeks the ``(session, turn)`` index where the insert lands anyway. Named parameters, with
#: a mapping: numbered ones (``?1``) bound from a sequence warn from Python 3.12 and fail
#: from 3.14.
_INSERT_TURN_IF_TAIL = (
    "INSERT INTO turns (session, turn, first_seq, count, at, entries)"
    " SELECT :session, :turn, :first_seq, :count, :at, :entries"
    " WHERE NOT EXISTS (SELECT 1 FROM turns WHERE session = :session AND turn >= :tail)"
)
_INSERT_TURN = (
    "INSERT INTO turns (session, turn, first_seq, count, at, entries) VALUES (?, ?, ?, ?, ?, ?)"
)


def write_turn(
    conn: sqlite3.Connection,
    session_id: str,
    turn: int,
    rows: Sequence[tuple[str, str]],
    now: float,
    key: int | None = None,
    tail: Tail | None = None,
) -> tuple[int, Tail]:
    """Write one turn's ``(kind, payload_json)`` rows as one ``turns`` row, stamped ``at =
    now``, in the caller's transaction (see :func:`append_turns`); return the session's key
    and new tail. The row is all a turn writes: the session's turns and updated_at derive
    from it (schema version 3).

    ``key`` and ``tail`` are what the caller believes the session's key and tail to be
    (``SqliteStore`` keeps them in memory: it is the only writer). They save reading them:
    the ``INSERT`` (:data:`_INSERT_TURN_IF_TAIL`) writes only while no turn at or after the
    believed count is recorded, and its foreign key only while the session with that key
    exists (keys are never reused). A stale belief (another process appended to the
    session, or removed it) writes nothing or fails the statement alone, and then key and
    tail are read from the database and checked, in the same transaction: the errors are
    the ones a fresh read gives. With either None they are always read. A turn the belief
    says is already recorded is read again too before it is refused.

    Every turn writes a row, one without entries too (``count`` 0, ``entries`` ''), so the
    last row always has the turn count and the next ``seq``. The primary key ``(session,
    turn)`` refuses a turn recorded twice, should the checks here be bypassed.

    An error leaves the statement's own writes undone (SQLite's statement rollback), not
    the transaction's: the caller rolls back.
    """
    entries = encode_entries(rows)
    written = False
    if key is not None and tail is not None and turn >= tail[0]:
        try:
            cur = conn.execute(
                _INSERT_TURN_IF_TAIL,
                {
                    "session": key,
                    "turn": turn,
                    "first_seq": tail[1],
                    "count": len(rows),
                    "at": now,
                    "entries": entries,
                    "tail": tail[0],
                },
            )
        except sqlite3.IntegrityError:  # the session with this key is gone
            pass  # only the statement was rolled back; the transaction goes on
        else:
            written = cur.rowcount > 0
    if not written:
        key, turns, next_seq = _read_tail(conn, session_id)
        tail = (turns, next_seq)
        _check_new_turn(session_id, turn, turns)
        conn.execute(_INSERT_TURN, (key, turn, next_seq, len(rows), now, entries))
    assert key is not None and tail is not None
    return key, (turn + 1, tail[1] + len(rows))


#: One turn for :func:`append_turns`: session id, turn, ``(kind, payload_json)`` rows, and
#: the session's key and tail as the caller believes them (or None).
TurnWrite = tuple[str, int, Sequence[tuple[str, str]], "int | None", "Tail | None"]


def append_turns(
    conn: sqlite3.Connection,
    turns: Sequence[TurnWrite],
    now: float,
    before_commit: Callable[[], None] | None = None,
    data_version: int | None = None,
    titles: Sequence[str | None] = (),
) -> tuple[list[tuple[int, Tail]], int]:
    """Record several turns (of different sessions) in one transaction, all or none; return
    each one's key and new tail (see :func:`write_turn`), and the connection's ``PRAGMA
    data_version`` read in the transaction. One transaction for many turns is the point: a
    commit's cost is mostly per transaction (locks, WAL frame writes), and turns of one
    transaction share their pages.

    ``data_version``: the connection's ``PRAGMA data_version`` as the caller last read it
    (what this returned for its last turn transaction, or read when it opened). While
    it is unchanged no other connection has committed since (SQLite's guarantee; a
    connection's own commits leave it as it was), so the caller's beliefs, remembered from
    its own commits, are exact: when every turn has them and each session appears once, the
    rows go in with one ``executemany`` of the plain ``INSERT``, without the guard's
    subquery (about 10 us a turn less in the server). The primary and foreign keys still
    stand behind them. Otherwise each turn goes through :func:`write_turn`.

    ``titles``: empty, or for each turn None or the title it gives its session, set in
    the same transaction (the session's ``turns`` and ``updated_at`` columns are left
    alone: a title is no metadata write for the derived values, see ``update_session``).

    ``before_commit`` runs inside the transaction after every write; tests use it to hold
    a turn mid-transaction (to cancel its caller, or to fail it) and check all-or-nothing.
    """
    with transaction(conn):
        version: int = conn.execute("PRAGMA data_version").fetchone()[0]
        known = _known_tails(turns) if version == data_version else None
        if known is not None:
            params = []
            done = []
            for (_, turn, rows, _, _), (key, tail) in zip(turns, known, strict=True):
                params.append((key, turn, tail[1], len(rows), now, encode_entries(rows)))
                done.append((key, (turn + 1, tail[1] + len(rows))))
            conn.executemany(_INSERT_TURN, params)
        else:
            done = [
                write_turn(conn, session_id, turn, rows, now, key, tail)
                for session_id, turn, rows, key, tail in turns
            ]
        if any(title is not None for title in titles):
            conn.executemany(
                "UPDATE sessions SET title = ? WHERE key = ?",
                [(t, key) for t, (key, _) in zip(titles, done, strict=True) if t is not None],
            )
        if before_commit is not None:
            before_commit()
    return done, version


def turn_recorded(
    conn: sqlite3.Connection, session_id: str, turn: int, rows: Sequence[tuple[str, str]]
) -> bool:
    """Whether the session's ``turn`` is in the file with these ``rows``: asked only after
    a commit was interrupted (``SqliteStore._interrupted``), when nothing else can tell.

    Why the rows too: a turn of that number may be in the file from another write (a
    turn recorded twice, whose second write is refused as "already recorded"); asked by
    number alone, an interruption before that refusal reported the refused turn recorded.
    """
    row = conn.execute(
        "SELECT 1 FROM turns AS t JOIN sessions AS s ON t.session = s.key"
        " WHERE s.id = ? AND t.turn = ? AND t.count = ? AND t.entries = ?",
        (session_id, turn, len(rows), encode_entries(rows)),
    ).fetchone()
    return row is not None


def _known_tails(turns: Sequence[TurnWrite]) -> list[tuple[int, Tail]] | None:
    """Each turn's session key and tail, if every turn comes with them, is not below its
    tail (a turn recorded already is refused by :func:`write_turn`, after a fresh read) and
    is its session's only one (two would take the same ``first_seq``); else None."""
    known: list[tuple[int, Tail]] = []
    for _, turn, _, key, tail in turns:
        if key is None or tail is None or turn < tail[0]:
            return None
        known.append((key, tail))
    if len({session_id for session_id, *_ in turns}) != len(turns):
        return None
    return known


def _check_new_turn(session_id: str, turn: int, turns: int) -> None:
    if turn < turns:
        raise StoreError(f"session {session_id!r} already has turn {turn} recorded")


def _read_tail(conn: sqlite3.Connection, session_id: str) -> tuple[int, int, int]:
    """The session's key, recorded turns and the ``seq`` its next entry gets (in the
    caller's transaction); ``UnknownSessionError`` if it is not stored. A session's seqs
    grow with its turns, so its last turn row ends where the next entry starts."""
    row = conn.execute(
        f"SELECT s.key, {_TRUE_TURNS}, COALESCE(t.first_seq + t.count, 0)"
        f" FROM sessions AS s {_LAST_TURN} WHERE s.id = ?",
        (session_id,),
    ).fetchone()
    if row is None:
        raise UnknownSessionError(session_id)
    return int(row[0]), int(row[1]), int(row[2])


def select_transcript(conn: sqlite3.Connection, session_id: str) -> list[TranscriptEntry]:
    # One read transaction: the existence check and the rows see the same snapshot.
    with read_transaction(conn):
        row = conn.execute("SELECT key FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise UnknownSessionError(session_id)
        turns = conn.execute(
            "SELECT turn, first_seq, entries FROM turns"
            " WHERE session = ? AND count > 0 ORDER BY turn",
            (row[0],),
        ).fetchall()
    out: list[TranscriptEntry] = []
    for turn, first_seq, entries in turns:
        for seq, kind, payload in _entry_rows(session_id, turn, first_seq, entries, 0, None):
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

    Rows are plain tuples split out of each turn's text, each payload checked to be a JSON
    object (:func:`_entry_rows`) but not kept decoded.
    """
    with read_transaction(conn):
        if cursor is None:
            key, _, next_seq = _read_tail(conn, session_id)
            cursor = (key, 0, -1, next_seq - 1)
        key, resume_turn, after, upto = cursor
        rows: list[Row] = []
        if after < upto:
            found = conn.execute(
                "SELECT turn, first_seq, entries FROM turns"
                " WHERE session = ? AND turn >= ? AND first_seq <= ? AND count > 0"
                " ORDER BY turn",
                (key, resume_turn, upto),
            )
            try:
                for turn, first_seq, entries in found:
                    resume_turn = turn  # the next page starts in this turn (or after it)
                    # This turn's entries with after < seq <= upto, as many as still fit.
                    start = max(after + 1 - first_seq, 0)
                    stop = min(upto + 1 - first_seq, start + limit - len(rows))
                    rows += _entry_rows(session_id, turn, first_seq, entries, start, stop)
                    if len(rows) >= limit:
                        break
            finally:
                found.close()
    if not rows:
        return rows, None
    return rows, (key, resume_turn, rows[-1][0], upto)


@contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One read snapshot for the reads inside (``conn`` in autocommit mode). Inside a
    transaction already, the reads join it: its snapshot, and its owner commits (the CLI
    reads a session and its transcript in one, :func:`read_session_with_transcript`)."""
    owner = not conn.in_transaction
    if owner:
        conn.execute("BEGIN")
    try:
        yield
    finally:
        if owner and conn.in_transaction:
            conn.execute("COMMIT")
