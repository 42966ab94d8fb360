"""Synchronous, read-only access to a store file, for the command line.

The CLI inspects a store that a running server may be writing. It opens the file read-only
(``mode=ro``): it never creates a database where there was none, never migrates one, and
WAL lets it read a consistent snapshot while the server commits. No Trio needed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from . import _sql
from ._model import SessionRecord, StoreError, TranscriptEntry
from ._schema import connect_readonly


@contextmanager
def _reading(path: Path | str) -> Iterator[sqlite3.Connection]:
    with closing(connect_readonly(Path(path))) as conn:
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot read session store: {exc}") from exc


def read_sessions(path: Path | str, *, cwd: str | None = None) -> list[SessionRecord]:
    """Every session in the store, newest first (ties: id descending).

    One query, so one sort: a session's order derives from its last turn (schema version
    3), and each page of a paged read would compute it for every session again.
    """
    with _reading(path) as conn:
        sessions, _ = _sql.select_sessions(conn, cwd=cwd, cursor=None, limit=None)
        return sessions


def read_session(path: Path | str, session_id: str) -> SessionRecord | None:
    with _reading(path) as conn:
        return _sql.select_session(conn, session_id)


def read_session_with_transcript(
    path: Path | str, session_id: str
) -> tuple[SessionRecord, list[TranscriptEntry]] | None:
    """The session and its transcript as of one moment, or None if there is no such id.

    Why one read transaction: read through two connections while a server appended turns,
    ``sessions show`` printed ``turns 4392`` above 4393 rendered turns, and ``export`` a
    session of 3936 turns with a transcript to turn 3940."""
    with _reading(path) as conn, _sql.read_transaction(conn):
        record = _sql.select_session(conn, session_id)
        if record is None:
            return None
        return record, _sql.select_transcript(conn, session_id)


def read_session_count(path: Path | str) -> int:
    """How many sessions the store holds (``list`` says so when its filter matched none)."""
    with _reading(path) as conn:
        return int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])


def read_ids_starting_with(path: Path | str, prefix: str, *, limit: int) -> tuple[list[str], int]:
    """The first ``limit`` session ids that start with ``prefix``, and how many do.

    Why: ids are 37 characters, and ``sessions show`` took only a whole one; a prefix of
    one id now names it, as git takes a commit's (see ``_cli_sessions._load``)."""
    with _reading(path) as conn:
        return _sql.select_ids_starting_with(conn, prefix, limit)


def read_transcript(path: Path | str, session_id: str) -> list[TranscriptEntry]:
    """The session's transcript in order; ``UnknownSessionError`` if there is no such id."""
    with _reading(path) as conn:
        return _sql.select_transcript(conn, session_id)
