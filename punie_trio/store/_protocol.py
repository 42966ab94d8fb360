"""The ``Store`` interface the hub programs against.

A ``typing.Protocol`` rather than a base class: ``MemoryStore`` and ``SqliteStore`` share no
code path worth inheriting, and a test double needs no import from here to qualify.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

from ._model import UNSET, Payload, SessionRecord, TranscriptEntry, Unset


class Store(Protocol):
    """Sessions and their transcripts.

    Errors are :class:`~punie_trio.store.StoreError`; an operation on a session id that is
    not stored raises :class:`~punie_trio.store.UnknownSessionError` (a ``StoreError``),
    except ``get_session`` (``None``) and ``delete_session`` (``False``).
    """

    @property
    def slow_commit(self) -> bool:
        """Whether :meth:`append_turn` takes real time (a disk write, tens of microseconds).
        The hub then sends a lone turn's last updates before the commit, so the client
        reads them while it runs, rather than in one write with the answer after it."""
        ...

    async def create_session(self, rec: SessionRecord) -> None:
        """Store a new session; a duplicate id is a ``StoreError``."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

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
        """Change only the fields given (``None`` is a value, ``UNSET`` means untouched)."""
        ...

    async def list_sessions(
        self,
        *,
        cwd: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
        roots: Sequence[str] | None = None,
    ) -> tuple[list[SessionRecord], str | None]:
        """A page of sessions, newest ``updated_at`` first (ties: id descending), and the
        cursor of the next page or ``None`` at the end. ``cwd`` keeps sessions whose cwd
        equals it; ``roots`` those whose cwd is one of them or lies under one (a server's
        project roots: filtered in the query, so every page is full and the last one ends
        the listing). An invalid cursor is a ``StoreError``."""
        ...

    async def delete_session(self, session_id: str) -> bool:
        """Remove a session and its transcript; ``False`` if it was not stored."""
        ...

    async def append_turn(
        self,
        session_id: str,
        turn: int,
        entries: Sequence[tuple[str, Payload]],
        *,
        alone: bool = False,
        title: str | None = None,
    ) -> None:
        """Record one finished turn atomically: its entries in order, ``turns`` raised to
        ``turn + 1`` and ``updated_at`` set to now, and ``title`` (unless None) as the
        session's title, in the same transaction (the turn that names a session records
        the name with it: saved apart, a crash between the two left a transcript naming
        the session and a record without the title). Once this returns the turn is durable
        across a process crash; until it returns, none of it may be. A ``turn`` below the
        session's ``turns`` (already recorded) is a ``StoreError``, and so is an invalid
        entry (see ``check_turn``: among others, a kind with a tab or newline, or a payload
        given as JSON text with a raw newline).

        ``alone``: the caller knows no other turn is about to be recorded (none other is
        running), so a store that gathers turns into one commit need not wait for more.

        Cancellation: a caller cancelled before the call records nothing (``Cancelled``
        at once). Once the call has begun it is not interruptible: it records the turn
        (or fails) and returns within a bounded time, then the cancellation lands at the
        caller's next checkpoint. The manager relies on this and puts no cancel scope
        around a turn's commit (each would cost ~9 us a prompt)."""
        ...

    async def transcript(self, session_id: str) -> list[TranscriptEntry]:
        """Every entry of the session in ``seq`` order; an unknown session raises
        ``UnknownSessionError`` (an empty list means a session with no turns yet)."""
        ...

    def transcript_rows(
        self, session_id: str, page_size: int = 1000
    ) -> AsyncGenerator[list[tuple[int, str, str]], None]:
        """The entries of :meth:`transcript` as ``(seq, kind, payload_json)`` rows, in pages
        of at most ``page_size`` read one at a time (the SQLite store reads the next page
        while the caller uses this one). The pages are the transcript as of the first page:
        turns committed meanwhile are not included. An unknown session raises
        ``UnknownSessionError`` from the first iteration. For ``session/load``, which
        splices each payload into its replay without decoding it. A caller that may stop
        before the end (cancelled) closes it (``contextlib.aclosing``), rather than leave
        it to the garbage collector."""
        ...

    def forget(self, session_id: str) -> None:
        """The caller holds the session no more (closed, or its client left): drop what is
        kept in memory only to speed up its writes. It stays stored; a later write reads
        what it needs again. Never fails."""
        ...

    async def aclose(self) -> None:
        """Release resources; idempotent. Later calls raise ``StoreError``."""
        ...
