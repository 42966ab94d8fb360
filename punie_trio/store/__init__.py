"""Session persistence: session records and their transcripts.

The hub talks to a :class:`Store`. ``open_sqlite_store`` gives the production one (one
SQLite file, WAL, one owner thread); ``MemoryStore`` has identical behaviour for tests.
``read_sessions`` / ``read_session`` / ``read_transcript`` / ``read_session_with_transcript``
read a store file synchronously and read-only, for the CLI. See ``docs/sessions-store.md``.
"""

from ._memory import MemoryStore
from ._model import (
    STOP,
    TRANSCRIPT_KINDS,
    UNSET,
    BadCursor,
    Payload,
    SessionRecord,
    StoreError,
    TranscriptEntry,
    UnknownSessionError,
    Unset,
    under_roots,
)
from ._protocol import Store
from ._readonly import (
    read_ids_starting_with,
    read_session,
    read_session_count,
    read_session_with_transcript,
    read_sessions,
    read_transcript,
)
from ._schema import SCHEMA_VERSION
from ._sqlite import SqliteStore, open_sqlite_store

__all__ = [
    "SCHEMA_VERSION",
    "STOP",
    "TRANSCRIPT_KINDS",
    "UNSET",
    "BadCursor",
    "MemoryStore",
    "Payload",
    "SessionRecord",
    "SqliteStore",
    "Store",
    "StoreError",
    "TranscriptEntry",
    "UnknownSessionError",
    "Unset",
    "open_sqlite_store",
    "read_ids_starting_with",
    "read_session",
    "read_session_count",
    "read_session_with_transcript",
    "read_sessions",
    "read_transcript",
    "under_roots",
]
