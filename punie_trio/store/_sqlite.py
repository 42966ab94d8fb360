"""``SqliteStore``: sessions and transcripts in one SQLite file, for Trio.

All database work happens on one :class:`~punie_trio.store._thread.OwnerThread`, which
also gives the store a single writer: turns from every session are committed one after
another in the order their callers submitted them. Input is validated on the Trio side
before a job is queued, so a bad call fails fast without a round-trip to the thread.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs

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
    check_turn,
    decode_cursor,
    session_changes,
)
from ._schema import connect
from ._thread import OwnerThread

T = TypeVar("T")


def _translated(job: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """Wrap a job so a raw ``sqlite3.Error`` reaches the caller as ``StoreError``."""

    def run(conn: sqlite3.Connection) -> T:
        try:
            return job(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"session store: {exc}") from exc

    return run


@attrs.define(eq=False)
class SqliteStore:
    """A :class:`~punie_trio.store.Store` on a SQLite file; make one with
    :func:`open_sqlite_store`, which also closes it."""

    path: Path
    clock: Callable[[], float] = time.time
    _owner: OwnerThread[sqlite3.Connection] = attrs.field(init=False)
    #: Test hook: runs inside ``append_turn``'s transaction, on the owner thread, after the
    #: writes and before ``COMMIT``. Production code leaves it ``None``.
    _before_commit: Callable[[], None] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._owner = OwnerThread(f"punie-store:{self.path.name}")

    async def _open(self) -> None:
        await self._owner.open(lambda: connect(self.path))

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        return await self._owner.run(_translated(job))

    def _check_open(self) -> None:
        if self._owner.closing:
            raise StoreError("store is closed")

    async def create_session(self, rec: SessionRecord) -> None:
        self._check_open()
        rec = check_record(rec)
        await self._run(lambda conn: _sql.insert_session(conn, rec))

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
    ) -> None:
        self._check_open()
        changes = session_changes(
            title=title, mode=mode, config=config, client_id=client_id, updated_at=updated_at
        )
        await self._run(lambda conn: _sql.update_session(conn, session_id, changes))

    async def list_sessions(
        self, *, cwd: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[SessionRecord], str | None]:
        self._check_open()
        check_limit(limit)
        if cursor is not None:
            decode_cursor(cursor)  # fail fast on the Trio side
        return await self._run(
            lambda conn: _sql.select_sessions(conn, cwd=cwd, cursor=cursor, limit=limit)
        )

    async def delete_session(self, session_id: str) -> bool:
        return await self._run(lambda conn: _sql.delete_session(conn, session_id))

    async def append_turn(
        self, session_id: str, turn: int, entries: Sequence[tuple[str, Payload]]
    ) -> None:
        self._check_open()
        rows = check_turn(turn, entries)
        hook = self._before_commit

        def job(conn: sqlite3.Connection) -> None:
            _sql.append_turn(conn, session_id, turn, rows, self.clock(), hook)

        await self._run(job)

    async def transcript(self, session_id: str) -> list[TranscriptEntry]:
        return await self._run(lambda conn: _sql.select_transcript(conn, session_id))

    async def aclose(self) -> None:
        await self._owner.close(lambda conn: conn.close())


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
