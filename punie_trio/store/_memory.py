"""``MemoryStore``: the store in a dict, for tests and as the benchmark baseline.

It follows ``SqliteStore`` to the letter (same validation, same JSON copying, same errors,
same scheduling), so a hub test that passes against it says something about production, and
the benchmarks' memory-store baseline differs from sqlite only by the SQL. Reads checkpoint
once, like SqliteStore's reads on its thread; writes are a cancellation point but do not
yield, like SqliteStore's writes on the event loop (so a turn's commit never lets the writer
send its last updates ahead of its answer).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import attrs
import trio

from ._model import (
    UNSET,
    Payload,
    SessionRecord,
    StoreError,
    TranscriptEntry,
    UnknownSessionError,
    Unset,
    after_cursor,
    check_config,
    check_limit,
    check_record,
    check_title,
    check_turn,
    listed_position,
    next_cursor,
    page_start,
    session_changes,
    under_roots,
)


@attrs.define(eq=False)
class MemoryStore:
    """An in-process :class:`~punie_trio.store.Store`; nothing survives the object."""

    slow_commit = False  # (a turn is appended to a list)

    clock: Callable[[], float] = time.time
    _sessions: dict[str, SessionRecord] = attrs.field(init=False, factory=dict)
    # Payloads are kept as JSON text, as SQLite keeps them: every read hands out a fresh
    # copy, so a caller mutating a returned payload cannot corrupt the transcript.
    _transcripts: dict[str, list[tuple[int, str, str]]] = attrs.field(init=False, factory=dict)
    # What SQLite keeps beside the record, for a listing's positions (listed_position): each
    # turn's commit time, and ``updated_at`` as of the last metadata write.
    _turn_times: dict[str, list[float]] = attrs.field(init=False, factory=dict)
    _meta_updated_at: dict[str, float] = attrs.field(init=False, factory=dict)
    _closed: bool = attrs.field(init=False, default=False)

    async def _enter(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StoreError("store is closed")

    async def _enter_write(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise StoreError("store is closed")

    def _get(self, session_id: str) -> SessionRecord:
        rec = self._sessions.get(session_id)
        if rec is None:
            raise UnknownSessionError(session_id)
        return rec

    async def create_session(self, rec: SessionRecord) -> None:
        await self._enter_write()
        rec = check_record(rec)
        if rec.id in self._sessions:
            raise StoreError(f"session {rec.id!r} already exists")
        self._sessions[rec.id] = rec
        self._transcripts[rec.id] = []
        self._turn_times[rec.id] = []
        self._meta_updated_at[rec.id] = rec.updated_at

    async def get_session(self, session_id: str) -> SessionRecord | None:
        await self._enter()
        rec = self._sessions.get(session_id)
        return None if rec is None else _fresh(rec)

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
        await self._enter_write()
        # Checked before the lookup: both stores report bad input before an unknown session.
        changes = session_changes(
            title=title,
            mode=mode,
            config=config,
            client_id=client_id,
            updated_at=updated_at,
            additional_directories=additional_directories,
        )
        rec = self._get(session_id)
        rec = self._sessions[session_id] = attrs.evolve(rec, **changes)
        self._meta_updated_at[session_id] = rec.updated_at

    async def list_sessions(
        self,
        *,
        cwd: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
        roots: Sequence[str] | None = None,
    ) -> tuple[list[SessionRecord], str | None]:
        await self._enter()
        check_limit(limit)
        start = page_start(cursor, cwd)
        last, last_id, as_of = start
        placed = sorted(
            (
                (
                    listed_position(
                        rec, as_of, self._turn_times[rec.id], self._meta_updated_at[rec.id]
                    ),
                    rec.id,
                    rec,
                )
                for rec in self._sessions.values()
                if (cwd is None or rec.cwd == cwd) and under_roots(rec.cwd, roots)
            ),
            key=lambda p: (p[0], p[1]),
            reverse=True,
        )
        if last is not None:
            placed = [p for p in placed if after_cursor(p[0], p[1], (last, last_id))]
        page = placed[:limit]
        after = None
        if len(placed) > limit:
            after = next_cursor(page[-1][0], page[-1][1], start, newest=placed[0][0], cwd=cwd)
        return [_fresh(rec) for _, _, rec in page], after

    async def delete_session(self, session_id: str) -> bool:
        await self._enter_write()
        self._transcripts.pop(session_id, None)
        self._turn_times.pop(session_id, None)
        self._meta_updated_at.pop(session_id, None)
        return self._sessions.pop(session_id, None) is not None

    async def append_turn(
        self,
        session_id: str,
        turn: int,
        entries: Sequence[tuple[str, Payload]],
        *,
        alone: bool = False,
        title: str | None = None,
    ) -> None:
        await self._enter_write()
        rows = check_turn(turn, entries)
        check_title(title)
        rec = self._get(session_id)
        if turn < rec.turns:
            raise StoreError(f"session {session_id!r} already has turn {turn} recorded")
        log = self._transcripts[session_id]
        log.extend((turn, kind, payload) for kind, payload in rows)
        at = self.clock()
        if title is not None:
            rec = attrs.evolve(rec, title=title)
        self._sessions[session_id] = attrs.evolve(rec, turns=turn + 1, updated_at=at)
        self._turn_times[session_id].append(at)

    async def transcript(self, session_id: str) -> list[TranscriptEntry]:
        await self._enter()
        self._get(session_id)
        return [
            TranscriptEntry(session_id, seq, turn, kind, payload)
            for seq, (turn, kind, payload) in enumerate(self._transcripts[session_id])
        ]

    async def transcript_rows(
        self, session_id: str, page_size: int = 1000
    ) -> AsyncGenerator[list[tuple[int, str, str]], None]:
        check_limit(page_size)
        rows = [(e.seq, e.kind, e.payload_json) for e in await self.transcript(session_id)]
        for start in range(0, len(rows), page_size):
            yield rows[start : start + page_size]

    def forget(self, session_id: str) -> None:
        """Nothing to drop: this store's memory is the sessions themselves."""

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.cancel_shielded_checkpoint()


def _fresh(rec: SessionRecord) -> SessionRecord:
    """A copy whose ``config`` the caller may mutate without touching the store."""
    return attrs.evolve(rec, config=check_config(rec.config))
