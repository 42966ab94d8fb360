"""What only the SQLite store has: a file, pragmas, migrations, reads on one owner thread
and writes on the event loop, atomic turns under cancellation and failure, and durability
across ``kill -9``."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import outcome
import pytest
import trio
import trio.testing

import punie_trio
from punie_trio.store import (
    SCHEMA_VERSION,
    SessionRecord,
    StoreError,
    TranscriptEntry,
    UnknownSessionError,
    _schema,
    _sql,
    _sqlite,
    open_sqlite_store,
    read_session,
    read_sessions,
    read_transcript,
)
from punie_trio.store._schema import MIGRATIONS, check_writable, connect, migrate

from .conftest import StepClock, make_record, sample_turn

REPO = Path(punie_trio.__file__).resolve().parent.parent


async def test_pragmas_wal_normal_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        got = await store._run(
            lambda conn: tuple(
                conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "secure_delete")
            )
        )
        assert got == ("wal", 1, 1, 1)  # synchronous: 1 == NORMAL
    # WAL is persistent: a fresh connection sees it too.
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_new_file_is_migrated_to_current_version(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path):
        pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        columns = [r[1] for r in conn.execute("PRAGMA table_info(turns)")]
    assert {"sessions", "turns", "sessions_cwd"} <= names
    assert not names & {"transcript", "sessions_v1", "turns_v2"}
    assert not names & {"sessions_by_updated", "sessions_by_cwd"}
    # ``at`` before ``entries``: reading it never walks a large turn's overflow pages.
    assert columns == ["session", "turn", "first_seq", "count", "at", "entries"]


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=r"newer than this punie-trio understands"):
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    with pytest.raises(StoreError, match="newer"):
        read_sessions(path)


async def test_a_newer_store_is_refused_without_a_byte_changed(tmp_path: Path) -> None:
    """Switching to WAL came before the version check and rewrote a newer file's header
    (one in rollback-journal mode): the docs promise it is never modified."""
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer"):
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    assert path.read_bytes() == before


async def test_a_newer_store_closed_cleanly_keeps_its_marker_when_refused(tmp_path: Path) -> None:
    """The marker of a clean close was taken away before the version was read: a start of
    this version on a store a newer one had closed cleanly was refused, and the newer
    version's next start then checked the whole store (10.4 s for 618 MB from the disk)
    for nothing. The store and its marker are now left as they were."""
    path = tmp_path / "s.db"
    await _fill(path, sessions=1, turns=2)
    with sqlite3.connect(path) as conn:  # (what a newer version would have written)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    _sqlite._mark_closed(path)  # (the newer version's clean close)
    marker = tmp_path / "s.db-closed"
    said, before = marker.read_bytes(), path.read_bytes()
    for _ in range(2):
        with pytest.raises(StoreError, match="newer than this punie-trio understands"):
            async with open_sqlite_store(path):
                pass  # pragma: no cover
        assert path.read_bytes() == before
        assert marker.read_bytes() == said
        assert _sqlite._left_as_closed(path)  # (what the newer version will find)
        marker.write_bytes(said)  # (_left_as_closed takes it)


async def test_another_programs_database_is_not_taken_over(tmp_path: Path) -> None:
    """A version-0 file with tables is not ours: our tables were added to it silently."""
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
        conn.execute("INSERT INTO notes VALUES ('precious')")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"not a punie-trio session store \(it holds notes\)"):
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    assert path.read_bytes() == before


async def list_all(store: Any, page_size: int) -> list[SessionRecord]:
    """Every session ``store`` lists, page by page (at most 10 pages)."""
    listed: list[SessionRecord] = []
    cursor = None
    for _ in range(10):
        page, cursor = await store.list_sessions(cursor=cursor, limit=page_size)
        listed += page
        if cursor is None:
            return listed
    raise AssertionError(f"more than 10 pages: {[r.id for r in listed]}")


def _damage(path: Path, sql: str, *params: Any) -> None:
    """Edit the file behind the store's back (by hand, or a damaged disk)."""
    with sqlite3.connect(path) as conn:
        conn.execute(sql, params)
    conn.close()


@pytest.mark.parametrize(
    ("column", "value"),
    [("config", "{not json"), ("created_at", "yesterday"), ("additional_directories", "[1]")],
)
async def test_a_damaged_session_row_fails_alone_and_is_left_out_of_lists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, column: str, value: str
) -> None:
    """One row that did not decode took every listing with it (the server's -32603, the
    CLI's traceback); now only reading that session fails, naming it."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        for i in range(3):
            await store.create_session(make_record(f"s{i}", updated_at=float(i + 1)))
    _damage(path, f"UPDATE sessions SET {column} = ? WHERE id = 's1'", value)
    async with open_sqlite_store(path) as store:
        page, cursor = await store.list_sessions(limit=2)
        assert [r.id for r in page] == ["s2"] and cursor is not None  # s1 left out
        rest, end = await store.list_sessions(cursor=cursor, limit=2)
        assert [r.id for r in rest] == ["s0"] and end is None
        with pytest.raises(StoreError, match="stored session 's1' is damaged"):
            await store.get_session("s1")
    assert [r.id for r in read_sessions(path)] == ["s2", "s0"]
    assert "stored session 's1' is damaged" in caplog.text and "left out" in caplog.text


@pytest.mark.parametrize("column", ["updated_at", "created_at"])
@pytest.mark.parametrize("value", [1e20, -1e20, float("inf"), float("-inf")])
async def test_a_session_time_no_date_can_hold_fails_alone_and_is_left_out_of_lists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, column: str, value: float
) -> None:
    """A stored time out of any date's range (only an edited or damaged file holds one)
    made every session/list fail (-32603 "timestamp out of range for platform time_t",
    formatting ``updatedAt``) and the CLI's listing print a traceback; an infinite one as
    the first page's newest made every later page's cursor invalid. Now that session is
    left out of listings, which page on, and reading it fails naming it."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        for i in range(3):
            await store.create_session(make_record(f"s{i}", updated_at=float(i + 1)))
    _damage(path, f"UPDATE sessions SET {column} = ? WHERE id = 's1'", value)
    async with open_sqlite_store(path) as store:
        listed = await list_all(store, page_size=1)
        assert [r.id for r in listed] == ["s2", "s0"]
        for record in listed:
            datetime.fromtimestamp(record.updated_at, UTC)  # (what session/list sends)
            datetime.fromtimestamp(record.created_at, UTC)
        with pytest.raises(StoreError, match="stored session 's1' is damaged"):
            await store.get_session("s1")
    assert [r.id for r in read_sessions(path)] == ["s2", "s0"]


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ('agent_message_chunk\t{"sessionUpdate":"agent_message_chunk"', "Expecting"),
        ("agent_message_chunk\t[1,2]", "not a JSON object"),
        ('agent_message_chunk\t{"sessionUpdate":"agent_message_chunk"}{"x":1}', "Extra data"),
        ("no tab here", "no tab after its kind"),
    ],
)
async def test_a_damaged_transcript_entry_is_named_not_replayed(
    tmp_path: Path, entry: str, why: str
) -> None:
    """A load spliced stored payloads into its notifications unread: a damaged one put a
    line on the wire that was not JSON. Every reader now checks each entry and names the
    first bad one; other sessions read as before."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        for name in ("bad", "good"):
            await store.create_session(make_record(name))
            await store.append_turn(name, 0, sample_turn(0))
    _damage(
        path,
        "UPDATE turns SET entries = ? WHERE session = (SELECT key FROM sessions WHERE id = 'bad')",
        "user_message_chunk\t{}\n" + entry,
    )
    damaged = rf"session 'bad' is damaged at entry 1 \(turn 1\): .*{why}"
    async with open_sqlite_store(path) as store:
        with pytest.raises(StoreError, match=damaged):
            async for _ in store.transcript_rows("bad"):
                pass  # pragma: no cover
        with pytest.raises(StoreError, match=damaged):
            await store.transcript("bad")
        assert len(await store.transcript("good")) == 5
    with pytest.raises(StoreError, match=damaged):
        read_transcript(path, "bad")


async def test_an_entry_with_whitespace_before_its_object_reads_as_stored(
    tmp_path: Path,
) -> None:
    """The fast entry check refuses whitespace before the object; the full read it falls
    back to takes it (JSON allows it), so such an entry is not called damaged."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record("s"))
        await store.append_turn("s", 0, sample_turn(0))
    _damage(path, "UPDATE turns SET entries = ?", 'plan\t {"sessionUpdate":"plan"}')
    async with open_sqlite_store(path) as store:
        pages = [rows async for rows in store.transcript_rows("s")]
    assert pages == [[(0, "plan", ' {"sessionUpdate":"plan"}')]]


async def test_a_stored_nan_reads_as_null(tmp_path: Path) -> None:
    """The update encoder let NaN through before it became strict: such a store must still
    load, and what it replays must be JSON (NaN is not)."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record("s"))
        await store.append_turn("s", 0, sample_turn(0))
    _damage(
        path,
        "UPDATE turns SET entries = ?",
        'tool_call\t{"sessionUpdate":"tool_call","rawInput":{"x":NaN,"y":[-Infinity,1]}}',
    )
    expected = '{"sessionUpdate":"tool_call","rawInput":{"x":null,"y":[null,1]}}'
    async with open_sqlite_store(path) as store:
        pages = [rows async for rows in store.transcript_rows("s")]
        assert pages == [[(0, "tool_call", expected)]]
    assert [e.payload_json for e in read_transcript(path, "s")] == [expected]


async def test_a_page_of_rows_with_bad_times_hides_no_session(tmp_path: Path) -> None:
    """A row whose time is not a number sorts before every other and no cursor points past
    it: a first page of only such rows ended the listing, hiding every good session."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        for i in range(5):
            await store.create_session(make_record(f"s{i}", updated_at=float(i + 1)))
    _damage(path, "UPDATE sessions SET updated_at = 'soon' WHERE id IN ('s3', 's4')")
    async with open_sqlite_store(path) as store:
        listed = await list_all(store, page_size=2)
    assert [r.id for r in listed] == ["s2", "s1", "s0"]


async def test_two_openers_of_a_new_store_do_not_refuse_each_other(tmp_path: Path) -> None:
    """The version and the tables were read in two statements: another opener creating
    the schema between them made a new store look like another program's database. Both
    reads are one snapshot now, which the other opener must wait for (here it cannot: it
    runs in the same thread, with no busy timeout, and gives up)."""
    path = tmp_path / "s.db"
    real_refuse_unknown = _schema._refuse_unknown
    others: list[str] = []

    def another_opener_first(
        conn: sqlite3.Connection, version: int, at: Path, known: int = SCHEMA_VERSION
    ) -> None:
        if others:  # (called again by the migration, under the write lock)
            real_refuse_unknown(conn, version, at, known)
            return
        others.append("trying")
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            other.execute("PRAGMA journal_mode = WAL")
            migrate(other, path)
            others.append("migrated")
        except sqlite3.OperationalError as exc:
            others.append(str(exc))
        finally:
            other.close()
        real_refuse_unknown(conn, version, at, known)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_schema, "_refuse_unknown", another_opener_first)
        async with open_sqlite_store(path) as store:
            await store.create_session(make_record("s"))
    assert others == ["trying", "database is locked"]


def test_a_read_only_store_is_refused_at_open(tmp_path: Path) -> None:
    """What SQLite gives for a write-protected file: a connection on which reads and even
    ``BEGIN IMMEDIATE`` succeed. ``check_writable`` refuses it, and leaves a writable
    store as it was (the probe's write is rolled back)."""
    path = tmp_path / "s.db"
    connect(path).close()  # (the last connection to close empties the WAL)
    writable = connect(path)  # (connect runs the probe)
    try:
        check_writable(writable, path)
        wal = tmp_path / "s.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0  # not one frame written
    finally:
        writable.close()
    readonly = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        with pytest.raises(StoreError, match=r"the session store is read-only \(attempt to"):
            check_writable(readonly, path)
        assert not readonly.in_transaction
    finally:
        readonly.close()


async def test_a_new_store_and_its_wal_are_private(tmp_path: Path) -> None:
    """0600 whatever the umask allows (SQLite would make them 0644 under umask 022); an
    existing file's mode is the user's and is left alone."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "s.db"
        async with open_sqlite_store(path) as store:
            await store.create_session(make_record("s1"))
            for name in ("s.db", "s.db-wal", "s.db-shm"):
                assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        shared = tmp_path / "shared.db"
        shared.touch(mode=0o640)
        shared.chmod(0o640)
        async with open_sqlite_store(shared):
            pass
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


async def test_a_new_store_through_a_symlink_is_private(tmp_path: Path) -> None:
    """``sessions.sqlite3`` a symlink to where the store is to live (another disk), not
    yet there: the store made there is 0600, as any new store (the exclusive create saw
    the link, left it, and SQLite then made the target 0644, readable by every user)."""
    old_umask = os.umask(0o022)
    try:
        (tmp_path / "elsewhere").mkdir()
        link = tmp_path / "s.db"
        link.symlink_to(tmp_path / "elsewhere" / "real.db")
        async with open_sqlite_store(link) as store:
            await store.create_session(make_record("s1"))
            for name in ("real.db", "real.db-wal", "real.db-shm"):
                mode = (tmp_path / "elsewhere" / name).stat().st_mode
                assert stat.S_IMODE(mode) == 0o600, name
        assert link.is_symlink()
    finally:
        os.umask(old_umask)


# SQLite's locks on the database file: a SHARED lock is a read lock on one byte of this
# range (the file format's fixed lock bytes, past 1 GiB).
_SHARED_FIRST = 0x40000000 + 2
_SHARED_SIZE = 510


async def test_opening_the_store_keeps_every_connections_locks(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops all of the process's POSIX locks on it. The
    writer's connect once opened and closed the database (to create it private) and so
    dropped the reader's SHARED lock: another process could then lock the file
    exclusively, believe itself the last user, and delete the WAL under this store."""
    path = tmp_path / "s.db"
    probe = textwrap.dedent(
        f"""
        import fcntl, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, {_SHARED_SIZE}, {_SHARED_FIRST})
        except OSError:
            sys.exit(0)  # blocked: a SHARED lock is held
        sys.exit(1)
        """
    )
    for i in range(2):  # a new file, then an existing one
        async with open_sqlite_store(path) as store:
            await store.create_session(make_record(f"s{i}"))
            done = await trio.run_process([sys.executable, "-c", probe], check=False)
            assert done.returncode == 0, "another process could lock the store exclusively"


async def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        async with open_sqlite_store(path):
            pass  # pragma: no cover


async def _fill(path: Path, sessions: int = 3, turns: int = 20) -> None:
    """A store of a few hundred KB, written through the store and closed cleanly."""
    async with open_sqlite_store(path) as store:
        for s in range(sessions):
            await store.create_session(make_record(f"s{s}"))
            for turn in range(turns):
                await store.append_turn(f"s{s}", turn, sample_turn(turn, 40), alone=True)


def _overwrite_a_middle_page(path: Path) -> None:
    """What a disk error or a tool does to a file at rest: one 4 KiB page in the middle
    of the file overwritten (with bytes no page starts with)."""
    size = path.stat().st_size
    assert size > 50 * 4096  # (so the middle is a page of turns, not the schema)
    with path.open("r+b") as file:
        file.seek(size // 2 // 4096 * 4096)
        file.write(bytes(range(256)) * 16)


def _assert_damaged(message: str, path: Path) -> None:
    assert message.startswith(f"{path}: the session store is damaged (")
    assert f"Keep a copy of {path}" in message and f"sqlite3 {path} .dump" in message
    assert "move it away to start with an empty one" in message


async def test_a_store_damaged_at_rest_is_refused_at_open(tmp_path: Path) -> None:
    """A page damaged while no server ran went unnoticed until a read reached it: the
    store opened, listed its sessions and served, and only the ``session/load`` of the
    session on that page failed. ``PRAGMA quick_check`` now runs at open whenever the
    file is not exactly as a clean close left it, and a damaged store is refused
    (``StoreError`` naming the file and what to do), the file untouched."""
    path = tmp_path / "s.db"
    await _fill(path)
    _overwrite_a_middle_page(path)
    damaged = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    _assert_damaged(str(caught.value), path)
    assert path.read_bytes() == damaged


async def test_a_half_copied_store_is_refused_at_open(tmp_path: Path) -> None:
    """A file cut short (a copy that stopped half-way, a tool that truncated it)."""
    path = tmp_path / "s.db"
    await _fill(path)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(StoreError) as caught:
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    _assert_damaged(str(caught.value), path)


async def test_the_check_runs_unless_the_store_was_closed_cleanly_and_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The check reads the whole file (about 70 ms per 100 MB from the page cache, 2 s
    from the disk), so it runs only where damage may be: after a run that did not close
    the store (``kill -9``, a crash, a power loss: a clean close leaves a marker, which
    the open removes) or on a file changed since that close."""
    path = tmp_path / "s.db"
    marker = tmp_path / "s.db-closed"
    caplog.set_level(logging.INFO, logger="punie_trio.store._schema")

    def checked() -> bool:
        found = any("checking it" in r.getMessage() for r in caplog.records)
        caplog.clear()
        return found

    await _fill(path, sessions=1, turns=1)
    assert not checked()  # (a new store: nothing in it to check)
    assert marker.exists()
    async with open_sqlite_store(path):
        assert not checked()
        assert not marker.exists()  # (a run that ends without a close leaves none)
    async with open_sqlite_store(path):
        assert not checked()
    marker.unlink()  # (as a kill -9 leaves it)
    async with open_sqlite_store(path):
        assert checked()
    os.utime(path, ns=(0, 0))  # changed since its clean close
    async with open_sqlite_store(path):
        assert checked()


def another_stores_wal(path: Path, tmp_path: Path) -> None:
    """Put beside the store ``path`` the WAL of another store, as a run killed with turns
    in it left it: committed, not yet copied into its file."""
    other = tmp_path / "other" / "s.db"
    other.parent.mkdir()
    trio.run(_fill, other, 4, 15)
    conn = sqlite3.connect(other, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("UPDATE turns SET entries = entries || ' '")
    wal = Path(f"{other}-wal").read_bytes()
    conn.close()
    Path(f"{path}-wal").write_bytes(wal)


def test_another_stores_wal_beside_a_store_closed_cleanly_is_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The marker named the file alone: another store's WAL put beside a store closed
    cleanly and left alone (a copy of the data directory's files, a backup restored in
    part) was replayed without a check, and the close's checkpoint wrote its pages into
    the file, which ``quick_check`` then found damaged ("Page 232 is never used"); the
    marker that close left named the damaged file, so no start checked it again. The
    marker names the WAL too now (none, or an empty one, after a clean close): the
    start checks."""
    path = tmp_path / "s.db"
    trio.run(_fill, path)
    assert (tmp_path / "s.db-closed").exists()
    another_stores_wal(path, tmp_path)
    caplog.set_level(logging.WARNING, logger="punie_trio.store._schema")
    with contextlib.suppress(StoreError):  # (refused as damaged where the check sees it)
        trio.run(_open_and_close, path)
    assert any("checking it whole" in r.getMessage() for r in caplog.records)


def test_an_index_that_disagrees_with_its_table_is_refused_at_open(tmp_path: Path) -> None:
    """The check was ``quick_check``, which leaves out whether each index matches its
    table: another store's WAL replayed into a store passed it, and the store served
    sessions whose records said 5, 10 and 15 turns with 20 turns each read through the
    ``turns`` key (15 in the table). ``integrity_check`` (as fast from the disk) refuses
    it."""
    path = tmp_path / "s.db"
    trio.run(_fill, path)
    (tmp_path / "s.db-closed").unlink()  # (checked either way: see the test above)
    another_stores_wal(path, tmp_path)
    with pytest.raises(StoreError) as caught:
        trio.run(_open_and_close, path)
    _assert_damaged(str(caught.value), path)
    assert "missing from index" in str(caught.value)


def _killed_with_a_wal(path: Path) -> None:
    """A process writes into the store ``path`` and is killed (``kill -9``) before any
    checkpoint: its commit is only in the ``-wal`` it leaves, with no marker."""
    child = textwrap.dedent(
        """
        import os, signal, sqlite3, sys
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("UPDATE sessions SET title = 'only in the WAL'")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", child, str(path)], check=False)
    assert done.returncode == -signal.SIGKILL
    assert Path(f"{path}-wal").stat().st_size > 0
    path.with_name(path.name + "-closed").unlink(missing_ok=True)


@pytest.mark.parametrize("damage", ["a damaged page", "another store's WAL"])
def test_a_store_refused_as_damaged_keeps_its_file_and_its_wal(tmp_path: Path, damage: str) -> None:
    """The refusal says "nothing was changed in it. Keep a copy of PATH (and its -wal,
    if any)"; but the checking connection, closing as the store's last, checkpointed the
    WAL into the damaged file and removed it. A damaged file (after a ``kill -9``) took
    the WAL's pages, and a good store with another's WAL beside it was damaged for
    good (without that WAL, it had been whole). Now both files are left as they were."""
    path = tmp_path / "s.db"
    trio.run(_fill, path)
    if damage == "a damaged page":
        _killed_with_a_wal(path)
        _overwrite_a_middle_page(path)
    else:
        (tmp_path / "s.db-closed").unlink()
        another_stores_wal(path, tmp_path)
    wal = Path(f"{path}-wal")
    before = path.read_bytes(), wal.read_bytes()
    with pytest.raises(StoreError) as caught:
        trio.run(_open_and_close, path)
    _assert_damaged(str(caught.value), path)
    assert (path.read_bytes(), wal.read_bytes()) == before
    if damage == "another store's WAL":  # (the store itself was whole all along)
        wal.unlink()
        trio.run(_open_and_close, path)


async def _open_and_close(path: Path) -> None:
    async with open_sqlite_store(path):
        pass


def test_an_empty_wal_a_reader_left_is_no_reason_to_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``punie-trio sessions ...`` beside a stopped server leaves an empty ``-wal`` (and
    ``-shm``): no change to the store, and no check at the next start."""
    path = tmp_path / "s.db"
    trio.run(_fill, path)
    with contextlib.closing(_schema.connect_readonly(path)) as conn:
        conn.execute("SELECT count(*) FROM turns").fetchone()
    assert Path(f"{path}-wal").stat().st_size == 0
    caplog.set_level(logging.WARNING, logger="punie_trio.store._schema")
    trio.run(_open_and_close, path)
    assert not any("checking it whole" in r.getMessage() for r in caplog.records)


#: A query that runs for seconds (about 3 s here) unless interrupted: a start-up check of
#: a large store from the disk (10.4 s for 618 MB), without the store.
A_LONG_CHECK = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000)"
    " SELECT count(*) FROM c"
)


def slow_check(
    monkeypatch: pytest.MonkeyPatch, started: Callable[[], object]
) -> list[BaseException | None]:
    """Make the start-up check :data:`A_LONG_CHECK`, calling ``started()`` (on the owner
    thread) as it begins; what it ended in is appended to the list returned."""
    ended: list[BaseException | None] = []

    def check(conn: sqlite3.Connection, path: Path) -> None:
        started()
        try:
            conn.execute(A_LONG_CHECK).fetchall()
        except BaseException as exc:
            ended.append(exc)
            raise
        ended.append(None)

    monkeypatch.setattr(_schema, "check_integrity", check)
    return ended


async def test_a_cancelled_open_stops_its_check_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of a large store takes seconds from the disk, and the open could not be
    cancelled while it ran (a SIGTERM at start waited for it; ``serve``'s watchdog
    ended the process, status 1). A cancelled open now interrupts it at once: the open
    ends in ``Cancelled``, the file is as it was, and with no marker the next open
    checks again."""
    path = tmp_path / "s.db"
    await _fill(path, sessions=1, turns=3)
    (tmp_path / "s.db-closed").unlink()  # (as a kill -9 leaves it)
    before = path.read_bytes()
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:
        ended = slow_check(monkeypatch, lambda: token.run_sync_soon(scope.cancel))
        async with open_sqlite_store(path):
            raise AssertionError("the open was cancelled")
    assert scope.cancelled_caught
    assert len(ended) == 1 and isinstance(ended[0], sqlite3.OperationalError)
    assert str(ended[0]) == "interrupted"
    assert path.read_bytes() == before
    assert not (tmp_path / "s.db-closed").exists()
    monkeypatch.undo()
    async with open_sqlite_store(path) as store:  # (checked, and whole)
        sessions, _ = await store.list_sessions()
        assert [record.id for record in sessions] == ["s0"]


def slow_migration(
    monkeypatch: pytest.MonkeyPatch, started: Callable[[], object]
) -> list[BaseException | None]:
    """Make the migration from version 2 (its first step) :data:`A_LONG_CHECK`, as a
    large store's takes seconds (11 s for 100,000 turns from version 1), calling
    ``started()`` (on the owner thread) as it begins; what that step ended in is appended
    to the list returned."""
    ended: list[BaseException | None] = []

    def step(conn: sqlite3.Connection) -> None:
        started()
        try:
            conn.execute(A_LONG_CHECK).fetchall()
        except BaseException as exc:
            ended.append(exc)
            raise
        ended.append(None)

    slow = [*MIGRATIONS[:2], (step, *MIGRATIONS[2]), *MIGRATIONS[3:]]
    monkeypatch.setattr(_schema, "migrate", functools.partial(migrate, migrations=slow))
    return ended


async def test_a_cancelled_open_stops_a_migration_and_leaves_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade of a large store takes seconds (11 s for 100,000 turns from version 1)
    and, unlike the check before it, could not be stopped: a SIGTERM at start waited for
    it, and past the shutdown timeout ``serve``'s watchdog ended the process, status 1.
    A cancelled open now interrupts it: the open ends in ``Cancelled``, the migration is
    rolled back (the file still at version 2, as it was), and the next open upgrades it."""
    path = tmp_path / "s.db"
    _v2_file(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO sessions (id, root, cwd, created_at, updated_at) "
                   "VALUES ('s1', '/proj', '/proj', 1, 2)")  # fmt: skip
    db.close()
    before = path.read_bytes()
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:
        ended = slow_migration(monkeypatch, lambda: token.run_sync_soon(scope.cancel))
        async with open_sqlite_store(path):
            raise AssertionError("the open was cancelled")
    assert scope.cancelled_caught
    assert len(ended) == 1 and isinstance(ended[0], sqlite3.OperationalError)
    assert str(ended[0]) == "interrupted"
    assert path.read_bytes() == before
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()
    monkeypatch.undo()
    async with open_sqlite_store(path) as store:
        assert [r.id for r in (await store.list_sessions())[0]] == ["s1"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


@contextlib.contextmanager
def one_second_times(path: Path) -> Iterator[Path]:
    """A file system at ``path`` whose times are whole seconds (ext2 with 128-byte
    inodes, on a loop device); skips the test where it cannot be made and mounted (not
    root, no ``mke2fs``, no loop devices)."""
    image = path.with_name(path.name + ".img")
    path.mkdir()
    made = None
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mke2fs"):
        with image.open("wb") as file:
            file.truncate(16 * 1024 * 1024)
        made = subprocess.run(
            ["mke2fs", "-q", "-t", "ext2", "-I", "128", "-F", str(image)],
            capture_output=True,
            check=False,
        )
    if made is not None and made.returncode == 0:
        made = subprocess.run(
            ["mount", "-o", "loop", str(image), str(path)], capture_output=True, check=False
        )
    if made is None or made.returncode != 0:
        pytest.skip("needs root, mke2fs and a loop device to mount a file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_change_in_the_second_of_a_clean_close_is_seen_where_times_are_coarse(
    tmp_path: Path,
) -> None:
    """Where file times are whole seconds (ext2 or ext3 with 128-byte inodes, HFS+, some
    NFS; FAT's are 2 s), a page overwritten just after a clean close kept the times and
    the size the marker held, and slipped past the check (20 times in 20, measured). The
    close now leaves its marker only once the file system's clock has passed the
    store's last change (about a second here), so any later change is seen."""
    with one_second_times(tmp_path / "disk") as disk:
        path = disk / "s.db"
        trio.run(_fill, path)
        assert (disk / "s.db-closed").exists()
        _overwrite_a_middle_page(path)  # (in the same second, but for a slow machine)
        with pytest.raises(StoreError) as caught:
            trio.run(_open_and_close, path)
        _assert_damaged(str(caught.value), path)


async def test_a_close_where_the_store_cannot_be_looked_at_ends_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The close looks at the store's path to leave its marker; where that fails other
    than "no file" (the data directory replaced by a symlink loop; for a user other than
    root, one whose search permission was taken away), the ``OSError`` came out of the
    close: ``serve`` ended its clean shutdown with a traceback, status 1. Now the close
    ends cleanly, leaves no marker, and says so; the next open checks the store."""
    directory = tmp_path / "d"
    directory.mkdir()
    caplog.set_level(logging.WARNING, logger="punie_trio.store._sqlite")
    async with open_sqlite_store(directory / "s.db") as store:
        await store.create_session(make_record("s1"))
        directory.rename(tmp_path / "moved")
        directory.symlink_to("d")  # (d -> d: ELOOP)
    assert any("no marker" in r.getMessage() for r in caplog.records)
    directory.unlink()
    (tmp_path / "moved").rename(directory)
    assert not (directory / "s.db-closed").exists()
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="punie_trio.store._schema")
    async with open_sqlite_store(directory / "s.db") as store:
        assert await store.get_session("s1") is not None
    assert any("checking it whole" in r.getMessage() for r in caplog.records)


def test_migrations_apply_in_order_and_fail_atomically(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn, path) == 0
        conn.execute(
            "INSERT INTO sessions (id, root, cwd, created_at, updated_at) "
            "VALUES ('s1', '/r', '/r', 1, 1)"
        )
        later = [*MIGRATIONS, ("ALTER TABLE sessions ADD COLUMN pinned INTEGER",)]
        broken = [*later, ("CREATE TABLE extra (x)", "THIS IS NOT SQL")]
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, path, broken)
        # The next migration committed; the one after rolled back whole.
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(later)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "extra" not in tables
        assert conn.execute("SELECT id, pinned FROM sessions").fetchall() == [("s1", None)]
        assert migrate(conn, path, later) == len(later)  # already current: no-op
        with pytest.raises(StoreError, match="newer"):
            migrate(conn, path, MIGRATIONS)
    finally:
        conn.close()


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record(title="kept"))
        await store.append_turn("s1", 0, sample_turn(0))
        before = await store.transcript("s1"), await store.get_session("s1")
    async with open_sqlite_store(path) as store:
        assert (await store.transcript("s1"), await store.get_session("s1")) == before
        await store.append_turn("s1", 1, sample_turn(1))
        assert [e.seq for e in await store.transcript("s1")] == list(range(10))


async def test_reads_run_on_one_owner_thread_and_writes_on_the_loop(tmp_path: Path) -> None:
    idents: set[int] = set()
    loop_thread = threading.get_ident()
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record())

        async def probe() -> None:
            for _ in range(5):
                idents.add(await store._run(lambda conn: threading.get_ident()))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(probe)
        writes: set[int] = set()
        store._before_commit = lambda: writes.add(threading.get_ident())
        await store.append_turn("s1", 0, sample_turn(0))
        thread = store._owner._thread
    assert len(idents) == 1
    assert idents != {loop_thread}
    assert writes == {loop_thread}
    assert not thread.is_alive()  # closing the store ends its thread


async def test_writer_never_checkpoints_itself(tmp_path: Path) -> None:
    """Checkpoints fsync, so the writer (on the event loop) leaves them to the owner thread."""
    async with open_sqlite_store(tmp_path / "s.db") as store:
        assert store._writer is not None
        assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        await store.create_session(make_record())
        store._rows_since_checkpoint = _sqlite.CHECKPOINT_EVERY_ROWS - 1
        await store.append_turn("s1", 0, sample_turn(0))
        assert store._rows_since_checkpoint == 0
        # The posted checkpoint ran before this read (jobs run in order): the WAL is copied.
        busy, wal_pages, copied = await store._run(
            lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        )
        assert busy == 0 and wal_pages == copied


async def test_a_cancel_during_the_write_lands_after_the_commit(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record())
        returned = False
        with trio.CancelScope() as scope:
            store._before_commit = scope.cancel  # cancelled mid-transaction
            await store.append_turn("s1", 0, sample_turn(0))
            returned = True
            await trio.lowlevel.checkpoint()  # the pending cancellation lands here
        assert returned and scope.cancelled_caught
        store._before_commit = None
        assert len(await store.transcript("s1")) == 5
        rec = await store.get_session("s1")
        assert rec is not None and rec.turns == 1


async def test_caller_cancelled_before_the_write_writes_nothing(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record())
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.append_turn("s1", 0, sample_turn(0))
        assert scope.cancelled_caught
        assert await store.transcript("s1") == []


async def test_failure_inside_a_turn_rolls_it_back_whole(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record())

        def explode() -> None:
            raise RuntimeError("disk on fire")

        store._before_commit = explode
        with pytest.raises(RuntimeError, match="disk on fire"):
            await store.append_turn("s1", 0, sample_turn(0))
        with pytest.raises(RuntimeError, match="disk on fire"):  # and the title it gives
            await store.append_turn("s1", 0, sample_turn(0), title="named")
        store._before_commit = None
        assert await store.transcript("s1") == []
        assert await store.get_session("s1") == make_record()
        await store.append_turn("s1", 0, sample_turn(0))  # the store is still usable
        assert len(await store.transcript("s1")) == 5


async def test_a_write_locked_out_by_another_process_fails_fast(tmp_path: Path) -> None:
    """The writer runs on the event loop: a lock held elsewhere (a second server on the same
    file) costs at most WRITER_BUSY_TIMEOUT_MS of the loop and fails the write cleanly."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record())
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # holds the write lock
            with pytest.raises(StoreError, match="locked"):
                await store.append_turn("s1", 0, sample_turn(0))
            other.execute("ROLLBACK")
        finally:
            other.close()
        await store.append_turn("s1", 0, sample_turn(0))
        assert len(await store.transcript("s1")) == 5


_CHILD = textwrap.dedent(
    """
    import sys, trio
    from punie_trio.store import SessionRecord, open_sqlite_store

    async def main(path):
        async with open_sqlite_store(path) as store:
            await store.create_session(SessionRecord(id="s", root="/r", cwd="/r"))
            turn = 0
            while True:
                entries = [
                    ("agent_message_chunk", {"sessionUpdate": "agent_message_chunk",
                     "content": {"type": "text", "text": f"{turn}.{i} " + "x" * 4000}})
                    for i in range(20)
                ] + [("stop", {"stopReason": "end_turn"})]
                await store.append_turn("s", turn, entries)
                print(turn, flush=True)  # acknowledged: the turn is committed
                turn += 1

    trio.run(main, sys.argv[1])
    """
)


def test_kill_9_mid_write_loses_no_committed_turn(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    acked = -1
    try:
        while acked < 30:
            line = proc.stdout.readline()
            if not line:
                _, err = proc.communicate()
                pytest.fail(f"child exited early ({proc.returncode}): {err}")
            acked = int(line)
        # The child is looping on append_turn, so the kill lands during or between writes.
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert path.with_name(path.name + "-wal").exists()  # recovery has work to do

    rec = read_session(path, "s")
    assert rec is not None and rec.turns >= acked + 1
    entries = read_transcript(path, "s")
    assert [e.seq for e in entries] == list(range(len(entries)))
    assert len(entries) == 21 * rec.turns  # every recorded turn is whole
    for turn in range(rec.turns):
        chunk = entries[21 * turn : 21 * turn + 21]
        assert {e.turn for e in chunk} == {turn}
        assert chunk[-1].kind == "stop"
        assert chunk[0].payload["content"]["text"].startswith(f"{turn}.0 ")
    trio.run(_reopen_and_append, path, rec.turns)


async def _reopen_and_append(path: Path, turns: int) -> None:
    async with open_sqlite_store(path) as store:
        await store.append_turn("s", turns, [("stop", {"stopReason": "end_turn"})])
        rec = await store.get_session("s")
        assert rec is not None and rec.turns == turns + 1


def test_read_helpers_never_create_a_database(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "s.db"
    with pytest.raises(StoreError, match="no session store"):
        read_sessions(path)
    with pytest.raises(StoreError, match="no session store"):
        read_session(path, "x")
    assert not path.exists() and not path.parent.exists()


async def test_read_helpers_see_a_live_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record("s1", updated_at=1.0))
        await store.create_session(make_record("s2", updated_at=2.0, cwd="/other"))
        await store.append_turn("s1", 0, sample_turn(0))
        assert [r.id for r in read_sessions(path)] == ["s1", "s2"]  # s1 bumped by the turn
        assert [r.id for r in read_sessions(path, cwd="/other")] == ["s2"]
        assert read_transcript(path, "s1") == await store.transcript("s1")
    # And after a clean close, when SQLite has removed the -wal and -shm files.
    assert read_session(path, "s2") is not None


# -- the in-memory tails (turns, next seq) ---------------------------------------------------


def _seqs(entries: list[TranscriptEntry]) -> list[int]:
    return [e.seq for e in entries]


#: The statements of a group commit of two turns (sessions whose tails are known): one
#: transaction, one ``data_version`` read, a row each.
TWO_TURN_GROUP = ["BEGIN IMMEDIATE", "PRAGMA data_version", "INSERT INTO", "INSERT INTO", "COMMIT"]


def _verbs(statements: list[str]) -> list[str]:
    """Each traced statement's first two words ("BEGIN IMMEDIATE", "INSERT INTO", ...)."""
    return [" ".join(sql.split()[:2]) for sql in statements]


async def test_tails_stay_right_with_two_sessions_interleaved(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record("a"))
        await store.create_session(make_record("b", turns=2))  # created with turns: no entries
        for turn in range(3):
            await store.append_turn("a", turn, sample_turn(turn))
            await store.append_turn("b", turn + 2, sample_turn(turn, n=turn))
        assert _seqs(await store.transcript("a")) == list(range(15))
        assert _seqs(await store.transcript("b")) == list(range(2 + 3 + 4))
        assert store._tails == {"a": (3, 15), "b": (5, 9)}
        with pytest.raises(StoreError, match="already has turn 4"):
            await store.append_turn("b", 4, sample_turn(4))
        assert _seqs(await store.transcript("b")) == list(range(9))


async def test_tails_survive_rollback_cancel_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record())
        await store.append_turn("s1", 0, sample_turn(0))

        def explode() -> None:
            raise RuntimeError("disk on fire")

        store._before_commit = explode
        with pytest.raises(RuntimeError):
            await store.append_turn("s1", 1, sample_turn(1))
        store._before_commit = None
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.append_turn("s1", 1, sample_turn(1))
        assert scope.cancelled_caught
        assert store._tails["s1"] == (1, 5)  # neither moved it
        await store.append_turn("s1", 1, sample_turn(1))
        assert _seqs(await store.transcript("s1")) == list(range(10))
    async with open_sqlite_store(path) as store:  # a new process: nothing remembered yet
        assert store._tails == {}
        await store.append_turn("s1", 2, sample_turn(2))
        assert store._tails["s1"] == (3, 15)
        with pytest.raises(StoreError, match="already has turn 1"):
            await store.append_turn("s1", 1, sample_turn(1))
        assert _seqs(await store.transcript("s1")) == list(range(15))


async def test_a_failed_commit_leaves_no_transaction_and_no_tail(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record())
        await store.append_turn("s1", 0, sample_turn(0))
        writer = store._writer
        assert writer is not None

        def orphan_row() -> None:  # a deferred foreign-key violation fails the COMMIT itself
            writer.execute("PRAGMA defer_foreign_keys = ON")
            writer.execute(
                "INSERT INTO turns (session, turn, first_seq, count, entries) "
                "VALUES (999, 0, 0, 1, 'stop\t{}')"
            )

        store._before_commit = orphan_row
        with pytest.raises(StoreError, match="FOREIGN KEY"):
            await store.append_turn("s1", 1, sample_turn(1))
        store._before_commit = None
        assert not writer.in_transaction
        assert store._tails["s1"] == (1, 5)
        await store.append_turn("s1", 1, sample_turn(1))
        assert _seqs(await store.transcript("s1")) == list(range(10))
        rec = await store.get_session("s1")
        assert rec is not None and rec.turns == 2


async def test_a_session_changed_by_another_process_is_reread(tmp_path: Path) -> None:
    """The store is meant to be the file's only writer, but a second process writing the
    same session must not make it reuse a seq or accept a recorded turn."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record())
        await store.create_session(make_record("gone"))
        await store.append_turn("s1", 0, sample_turn(0))
        await store.append_turn("gone", 0, sample_turn(0))
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("PRAGMA foreign_keys = ON")
            other.execute("BEGIN IMMEDIATE")
            other.execute(
                "INSERT INTO turns (session, turn, first_seq, count, entries) "
                "SELECT key, 1, 5, 1, 'stop' || char(9) || '{\"stopReason\":\"end_turn\"}' "
                "FROM sessions WHERE id = 's1'"
            )
            other.execute("UPDATE sessions SET turns = 2 WHERE id = 's1'")
            other.execute("DELETE FROM sessions WHERE id = 'gone'")
            other.execute("COMMIT")
        finally:
            other.close()
        assert store._tails["s1"] == (1, 5)  # stale now
        with pytest.raises(StoreError, match="already has turn 1"):
            await store.append_turn("s1", 1, sample_turn(1))
        await store.append_turn("s1", 2, sample_turn(2))
        assert store._tails["s1"] == (3, 11)
        entries = await store.transcript("s1")
        assert _seqs(entries) == list(range(11))
        assert [e.turn for e in entries] == [0] * 5 + [1] + [2] * 5
        with pytest.raises(UnknownSessionError):
            await store.append_turn("gone", 1, sample_turn(1))


async def test_a_deleted_and_recreated_session_starts_at_seq_0(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record())
        await store.append_turn("s1", 0, sample_turn(0))
        old_key = store._keys["s1"]
        assert await store.delete_session("s1")
        assert "s1" not in store._tails and "s1" not in store._keys
        with pytest.raises(UnknownSessionError):
            await store.append_turn("s1", 1, sample_turn(1))
        await store.create_session(make_record())
        await store.append_turn("s1", 0, sample_turn(0, n=1))
        assert _seqs(await store.transcript("s1")) == [0, 1, 2]
        assert store._keys["s1"] > old_key  # keys are never reused


async def test_a_session_recreated_by_another_process_gets_a_new_key(tmp_path: Path) -> None:
    """Keys are never reused (AUTOINCREMENT), so a remembered key of a session that another
    process deleted and created again (same id, same turns) matches nothing: the store
    reads the new session's key and tail instead of appending after the old one's."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record())
        await store.append_turn("s1", 0, sample_turn(0))
        old_key = store._keys["s1"]
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("PRAGMA foreign_keys = ON")
            other.execute("DELETE FROM sessions WHERE id = 's1'")
            other.execute(
                "INSERT INTO sessions (id, root, cwd, created_at, updated_at, turns) "
                "VALUES ('s1', '/proj', '/proj', 1, 1, 1)"
            )
        finally:
            other.close()
        await store.append_turn("s1", 1, sample_turn(1))
        assert store._keys["s1"] != old_key
        assert store._tails["s1"] == (2, 5)
        entries = await store.transcript("s1")
        assert [(e.seq, e.turn) for e in entries] == [(seq, 1) for seq in range(5)]


# -- schema version 2: one row per turn ------------------------------------------------------


async def test_a_turn_is_one_row_written_without_a_read(tmp_path: Path, clock: StepClock) -> None:
    """Schema version 3: the turn's row is the transaction's only write (``sessions`` is
    not touched), and the transaction is ``BEGIN IMMEDIATE``, one ``INSERT``, ``COMMIT``."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path, clock=clock) as store:
        await store.create_session(make_record())
        await store.append_turn("s1", 0, sample_turn(0))
        assert store._writer is not None
        statements: list[str] = []
        store._writer.set_trace_callback(statements.append)
        await store.append_turn("s1", 1, sample_turn(1, n=1))
        store._writer.set_trace_callback(None)
        await store.append_turn("s1", 2, [])  # no entries: still a row
        await store.append_turn("s1", 4, sample_turn(4, n=0))
        key = store._keys["s1"]
    verbs = _verbs(statements)
    assert verbs == ["BEGIN IMMEDIATE", "PRAGMA data_version", "INSERT INTO", "COMMIT"]
    assert "NOT EXISTS" not in statements[2]  # nothing else wrote: the plain INSERT
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT session, turn, first_seq, count, at, entries FROM turns ORDER BY turn"
        ).fetchall()
        session = conn.execute("SELECT turns, updated_at FROM sessions").fetchone()
    start = clock() - 4  # the four turns' readings
    assert [row[:5] for row in rows] == [
        (key, 0, 0, 5, start),
        (key, 1, 5, 3, start + 1),
        (key, 2, 8, 0, start + 2),
        (key, 4, 8, 2, start + 3),
    ]
    assert rows[2][5] == ""
    assert session == (0, 100.0)  # as created: no turn wrote it
    lines = rows[1][5].split("\n")
    assert [line.split("\t", 1)[0] for line in lines] == [k for k, _ in sample_turn(1, n=1)]
    assert [json.loads(line.split("\t", 1)[1]) for line in lines] == [
        p for _, p in sample_turn(1, n=1)
    ]


async def test_a_write_by_another_connection_makes_the_next_turns_check_the_file(
    tmp_path: Path,
) -> None:
    """Once another connection has committed (``PRAGMA data_version`` moved), the next turn
    transaction writes through the guarded ``INSERT`` and what was remembered of every
    other session is dropped (read again when it next writes); after that, the plain
    ``INSERT`` again."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        for session_id in ("s1", "s2"):
            await store.create_session(make_record(session_id))
            await store.append_turn(session_id, 0, sample_turn(0))
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("UPDATE sessions SET title = 'elsewhere' WHERE id = 's2'")
        finally:
            other.close()
        assert store._writer is not None
        statements: list[str] = []
        store._writer.set_trace_callback(statements.append)
        await store.append_turn("s1", 1, sample_turn(1))
        assert "NOT EXISTS" in statements[2]
        assert set(store._tails) == {"s1"} and set(store._keys) == {"s1"}
        statements.clear()
        await store.append_turn("s2", 1, sample_turn(1))  # its tail is read again
        assert any(sql.startswith("SELECT") for sql in statements)
        statements.clear()
        await store.append_turn("s1", 2, sample_turn(2))
        store._writer.set_trace_callback(None)
        assert _verbs(statements) == [
            "BEGIN IMMEDIATE", "PRAGMA data_version", "INSERT INTO", "COMMIT",
        ]  # fmt: skip
        assert "NOT EXISTS" not in statements[2]
        assert _seqs(await store.transcript("s1")) == list(range(15))
        assert _seqs(await store.transcript("s2")) == list(range(10))


async def test_a_read_in_pages_ends_if_the_session_is_deleted_meanwhile(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record())
        for turn in range(3):
            await store.append_turn("s1", turn, sample_turn(turn))
        old = [(e.seq, e.kind, e.payload_json) for e in await store.transcript("s1")]
        pages = []
        async for page in store.transcript_rows("s1", page_size=2):
            pages.append(page)
            if len(pages) == 1:  # deleted and created again: the read never mixes the two
                await store.delete_session("s1")
                await store.create_session(make_record())
                await store.append_turn("s1", 0, sample_turn(9, n=20))
        # The read-ahead page may or may not have been read before the delete; nothing after.
        rows = [r for p in pages for r in p]
        assert rows in (old[:2], old[:4])


def _v1_file(path: Path) -> sqlite3.Connection:
    """A store file as punie-trio wrote it at schema version 1."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    assert migrate(conn, path, MIGRATIONS[:1]) == 0
    return conn


def _v1_session(conn: sqlite3.Connection, session_id: str, updated_at: float, **extra: Any) -> None:
    fields = {"id": session_id, "root": "/proj", "cwd": "/proj", "created_at": 1.0}
    fields |= {"updated_at": updated_at, **extra}
    conn.execute(
        f"INSERT INTO sessions ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
        tuple(fields.values()),
    )


def _v1_turn(
    conn: sqlite3.Connection, session_id: str, turn: int, entries: list[tuple[str, Any]]
) -> None:
    """Version 1's ``append_turn``: a row per entry, seqs continuing the session's."""
    conn.execute("BEGIN IMMEDIATE")
    (next_seq,) = conn.execute(
        "SELECT COALESCE(MAX(seq) + 1, 0) FROM transcript WHERE session_id = ?", (session_id,)
    ).fetchone()
    for seq, (kind, payload) in enumerate(entries, next_seq):
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        conn.execute(
            "INSERT INTO transcript (session_id, seq, turn, kind, payload) VALUES (?, ?, ?, ?, ?)",
            (session_id, seq, turn, kind, text),
        )
    conn.execute(
        "UPDATE sessions SET turns = ?, updated_at = updated_at + 1 WHERE id = ?",
        (turn + 1, session_id),
    )
    conn.execute("COMMIT")


async def test_migration_from_version_1_keeps_transcripts_and_seqs(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    conn = _v1_file(path)
    try:
        _v1_session(conn, "old", 10.0, title="Old one", config='{"model":"m1"}')
        _v1_session(conn, "new", 20.0, cwd="/proj/sub", client_id="c1", mode="code")
        _v1_session(conn, "none", 5.0, turns=2)  # created with turns, never appended to
        _v1_session(conn, "gone", 6.0)
        for turn in range(3):
            _v1_turn(conn, "old", turn, sample_turn(turn, n=turn))
        _v1_turn(conn, "old", 3, [])  # a turn without entries: no rows
        raw = '{"sessionUpdate":"agent_message_chunk",\t"content":{"text":"tab\\n é"}}'
        _v1_turn(conn, "old", 5, [("agent_message_chunk", raw), *sample_turn(5)[-1:]])
        _v1_turn(conn, "new", 0, sample_turn(0, n=30))
        _v1_turn(conn, "gone", 0, sample_turn(0))
        conn.execute("DELETE FROM sessions WHERE id = 'gone'")
        expected = {
            sid: [
                TranscriptEntry(sid, seq, turn, kind, payload)
                for seq, turn, kind, payload in conn.execute(
                    "SELECT seq, turn, kind, payload FROM transcript WHERE session_id = ?"
                    " ORDER BY seq",
                    (sid,),
                )
            ]
            for sid in ("old", "new", "none")
        }
        records = {sid: read_session_v1(conn, sid) for sid in expected}
    finally:
        conn.close()
    assert [e.seq for e in expected["old"]] == list(range(11))

    async with open_sqlite_store(path) as store:
        for sid, entries in expected.items():
            assert await store.transcript(sid) == entries
            assert await store.get_session(sid) == records[sid]
            pages = [p async for p in store.transcript_rows(sid, page_size=7)]
            assert [r for p in pages for r in p] == [
                (e.seq, e.kind, e.payload_json) for e in entries
            ]
        listed, _ = await store.list_sessions()
        assert [r.id for r in listed] == ["new", "old", "none"]
        assert await store.get_session("gone") is None
        # New turns continue each session's turns and seqs.
        await store.append_turn("old", 6, sample_turn(6))
        await store.append_turn("none", 2, sample_turn(2))
        with pytest.raises(StoreError, match="already has turn 5"):
            await store.append_turn("old", 5, sample_turn(5))
        old = await store.transcript("old")
        assert old[:11] == expected["old"]
        assert [(e.seq, e.turn) for e in old[11:]] == [(seq, 6) for seq in range(11, 16)]
        assert _seqs(await store.transcript("none")) == list(range(5))
        assert await store.delete_session("new")
    assert read_transcript(path, "old") == old
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert "transcript" not in names and "sessions_v1" not in names
        assert "sessions_cwd" in names and "sessions_by_updated" not in names
        # One row per turn with entries; the deleted session took its rows with it.
        turns = db.execute(
            "SELECT s.id, t.turn, t.first_seq, t.count FROM turns AS t"
            " JOIN sessions AS s ON s.key = t.session ORDER BY s.id, t.turn"
        ).fetchall()
    assert turns == [
        ("none", 2, 0, 5),
        *[("old", t, f, c) for t, f, c in [(0, 0, 2), (1, 2, 3), (2, 5, 4), (5, 9, 2)]],
        ("old", 6, 11, 5),
    ]


def _steps_after_version_1() -> list[tuple[int, int]]:
    """(migration, step) for every step of the migrations after version 1."""
    return [(m, step) for m in range(1, len(MIGRATIONS)) for step in range(len(MIGRATIONS[m]))]


@pytest.mark.parametrize(("failing", "after"), _steps_after_version_1())
async def test_a_migration_failing_at_any_step_keeps_the_versions_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int, after: int
) -> None:
    """An error after any step of any migration (here after step ``after`` of migration
    ``failing``) rolls that migration back whole: the store is at the version before it
    (the migrations before it are done), whole, and the next open upgrades the rest with
    every record and transcript as version 1 had them."""
    path = tmp_path / "s.db"
    conn = _v1_file(path)
    try:
        _v1_session(conn, "old", 10.0, title="Old ✓", config='{"model":"m1"}')
        _v1_session(conn, "empty", 5.0, additional_directories='["/x"]', cwd="/proj/sub")
        for turn in range(3):
            _v1_turn(conn, "old", turn, sample_turn(turn, n=turn))
        _v1_turn(conn, "old", 3, [])
        expected = {sid: read_session_v1(conn, sid) for sid in ("old", "empty")}
        entries = [
            (seq, turn, kind, payload)
            for seq, turn, kind, payload in conn.execute(
                "SELECT seq, turn, kind, payload FROM transcript ORDER BY seq"
            )
        ]
    finally:
        conn.close()

    def fail(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("injected")

    steps = list(MIGRATIONS[failing])
    steps.insert(after + 1, fail)
    broken = [*MIGRATIONS[:failing], steps, *MIGRATIONS[failing + 1 :]]
    monkeypatch.setattr(_schema, "migrate", functools.partial(migrate, migrations=broken))
    with pytest.raises(StoreError, match="cannot open session store: injected"):
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == failing
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    monkeypatch.undo()
    async with open_sqlite_store(path) as store:
        for sid, record in expected.items():
            assert await store.get_session(sid) == record
        got = [(e.seq, e.turn, e.kind, e.payload_json) for e in await store.transcript("old")]
        assert got == entries
        assert await store.transcript("empty") == []


async def test_an_upgrade_under_another_process_that_has_the_store_open_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """punie-trio's releases at schema versions 1 and 2 took no lock on the data directory:
    one still serving (a package upgrade does not stop it) had its store upgraded under it
    by a newer ``serve``, and every later turn of it failed (``the turn was not saved:
    session store: no such table: transcript``). The upgrade now holds the file alone,
    and refuses (after the busy timeout) while another process has it open, changing
    nothing; once that process is gone, the next start upgrades it."""
    path = tmp_path / "s.db"
    conn = _v1_file(path)
    try:
        _v1_session(conn, "s1", 1.0)
        _v1_turn(conn, "s1", 0, sample_turn(0))
    finally:
        conn.close()
    child = textwrap.dedent("""
        import sqlite3, sys
        conn = sqlite3.connect(sys.argv[1])
        conn.execute("SELECT count(*) FROM transcript").fetchall()
        print("open", flush=True)
        sys.stdin.read()
    """)
    other = await trio.lowlevel.open_process(  # (an old serve: its connection stays open)
        [sys.executable, "-c", child, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        said = b""
        while not said.endswith(b"\n"):
            said += await other.stdout.receive_some()
        assert said == b"open\n"
        before = path.read_bytes()
        monkeypatch.setattr(_schema, "BUSY_TIMEOUT_MS", 0)  # (5 s: a reader that ends in time)
        with pytest.raises(StoreError, match="from schema version 1 to 4: another process") as err:
            async with open_sqlite_store(path):
                pass  # pragma: no cover
        assert "nothing was changed" in str(err.value)
        assert path.read_bytes() == before
    finally:
        if other.stdin is not None:
            await other.stdin.aclose()
        with trio.fail_after(10):
            await other.wait()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    monkeypatch.undo()
    async with open_sqlite_store(path) as store:
        assert _seqs(await store.transcript("s1")) == list(range(5))


def test_a_read_while_a_serve_upgrades_the_store_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade holds the store alone, seconds for a large one: ``sessions ...`` said
    ``cannot read session store: database is locked`` after its busy timeout (5 s), which
    named no cause and no remedy. It now says what holds the store and what to do."""
    path = tmp_path / "s.db"
    upgrading = _v1_file(path)  # (as the upgrade holds it)
    try:
        upgrading.execute("PRAGMA locking_mode = EXCLUSIVE")
        upgrading.execute("BEGIN IMMEDIATE")
        monkeypatch.setattr(_schema, "BUSY_TIMEOUT_MS", 0)
        with pytest.raises(StoreError) as err:
            read_sessions(path)
    finally:
        upgrading.close()
    assert str(err.value) == (
        f"{path}: cannot read session store: another process holds it alone (a serve "
        "upgrading it from an older schema version, which takes seconds for a large store);"
        " try again once that serve has started"
    )


def read_session_v1(conn: sqlite3.Connection, session_id: str) -> SessionRecord | None:
    """A record as versions 1 and 2 read it: ``sessions`` held the true values."""
    columns = _sql._COLUMNS.replace("cwd_sent", "NULL AS cwd_sent")  # (version 4's)
    row = conn.execute(f"SELECT {columns} FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return None if row is None else _sql._record(row)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([(0, 0, "plan\tx", "{}")], "tab or newline"),
        ([(0, 0, "plan", '{"a":\n1}')], "raw newline"),
        ([(0, 0, "plan", "{}"), (2, 0, "stop", "{}")], "turn 0 .* not consecutive"),
        ([(0, 0, "plan", "{}"), (1, 1, "plan", "{}"), (2, 0, "stop", "{}")], "not consecutive"),
    ],
)
async def test_migration_refuses_rows_it_cannot_convert(
    tmp_path: Path, rows: list[tuple[int, int, str, str]], match: str
) -> None:
    """Rows version 1 could not have written itself: the upgrade stops with a message and
    leaves the file at version 1, whole."""
    path = tmp_path / "s.db"
    conn = _v1_file(path)
    try:
        _v1_session(conn, "s1", 1.0, turns=2)
        conn.executemany(
            "INSERT INTO transcript (session_id, seq, turn, kind, payload)"
            " VALUES ('s1', ?, ?, ?, ?)",
            rows,
        )
    finally:
        conn.close()
    with pytest.raises(StoreError, match=f"cannot upgrade .* to schema version 2: .*{match}"):
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("SELECT seq, turn, kind, payload FROM transcript").fetchall() == rows
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert names == {"sessions", "transcript", "sessions_by_updated", "sessions_by_cwd"} | {
        n for n in names if n.startswith("sqlite_autoindex")
    }
    with pytest.raises(StoreError, match=f"older than {SCHEMA_VERSION}"):
        read_sessions(path)


async def test_a_refused_migration_leaves_no_wal_beside_the_store(tmp_path: Path) -> None:
    """The upgrade refused (rows it cannot convert) and rolled back left the WAL it wrote
    and its -shm beside the store, though they held nothing kept: removed now."""
    path = tmp_path / "s.db"
    conn = _v1_file(path)
    try:
        _v1_session(conn, "s1", 1.0, turns=2)
        conn.execute(
            "INSERT INTO transcript (session_id, seq, turn, kind, payload)"
            " VALUES ('s1', 0, 0, 'plan\tx', '{}')"
        )
    finally:
        conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="cannot upgrade"):
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    assert os.listdir(tmp_path) == ["s.db"]
    assert path.read_bytes() == before


async def test_a_refused_migration_copies_in_what_a_killed_run_committed_to_the_wal(
    tmp_path: Path,
) -> None:
    """The store is left "byte for byte as it was" only where its WAL held nothing
    committed. A run killed before a checkpoint leaves committed rows in the WAL; a
    refused upgrade closes as the last connection, so they are copied into the file (as
    any close does) and the WAL goes: the file changed, and no row is lost."""
    made = tmp_path / "made"
    made.mkdir()
    conn = _v1_file(made / "s.db")
    try:
        _v1_session(conn, "s1", 1.0, turns=2)
        conn.execute(
            "INSERT INTO transcript (session_id, seq, turn, kind, payload)"
            " VALUES ('s1', 0, 0, 'plan\tx', '{}')"
        )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _v1_session(conn, "s2", 2.0, turns=0)  # (committed to the WAL only)
        killed = tmp_path / "killed"  # (the files as a kill -9 left them: the WAL hot)
        shutil.copytree(made, killed)
    finally:
        conn.close()
    path = killed / "s.db"
    assert (killed / "s.db-wal").stat().st_size > 0
    before = path.read_bytes()
    with pytest.raises(StoreError, match="cannot upgrade"):
        async with open_sqlite_store(path):
            pass  # pragma: no cover
    assert os.listdir(killed) == ["s.db"]
    assert path.read_bytes() != before
    check = sqlite3.connect(path)
    try:
        assert sorted(check.execute("SELECT id FROM sessions")) == [("s1",), ("s2",)]
    finally:
        check.close()


# -- schema version 3: a turn writes only its row ---------------------------------------------


async def test_an_empty_turn_is_a_row_and_counts_after_reopen(
    tmp_path: Path, clock: StepClock
) -> None:
    path = tmp_path / "s.db"
    async with open_sqlite_store(path, clock=clock) as store:
        await store.create_session(make_record())
        await store.append_turn("s1", 0, sample_turn(0))
        await store.append_turn("s1", 1, [])
        empty_at = clock() - 1
    rec = read_session(path, "s1")
    assert rec is not None and (rec.turns, rec.updated_at) == (2, empty_at)
    assert [(r.id, r.turns) for r in read_sessions(path)] == [("s1", 2)]
    async with open_sqlite_store(path, clock=clock) as store:  # nothing remembered
        assert await store.get_session("s1") == rec
        assert _seqs(await store.transcript("s1")) == list(range(5))
        assert [r[0] for p in [p async for p in store.transcript_rows("s1")] for r in p] == list(
            range(5)
        )
        with pytest.raises(StoreError, match="already has turn 1"):
            await store.append_turn("s1", 1, sample_turn(1))
        await store.append_turn("s1", 2, [])
        await store.append_turn("s1", 3, sample_turn(3))
        entries = await store.transcript("s1")
        assert [(e.seq, e.turn) for e in entries] == [(s, 0) for s in range(5)] + [
            (s, 3) for s in range(5, 10)
        ]
        rec = await store.get_session("s1")
        assert rec is not None and (rec.turns, rec.updated_at) == (4, clock() - 1)


async def test_update_session_folds_the_turns_into_the_session_row(
    tmp_path: Path, clock: StepClock
) -> None:
    """``sessions.turns`` and ``updated_at`` hold the values as of the last metadata write;
    turns after it are read from their rows."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path, clock=clock) as store:
        await store.create_session(make_record())
        await store.append_turn("s1", 0, sample_turn(0))
        await store.append_turn("s1", 1, sample_turn(1))
        last_turn = clock() - 1
        await store.update_session("s1", title="first question")
        await store.append_turn("s1", 2, sample_turn(2))
        rec = await store.get_session("s1")
    assert rec is not None and (rec.title, rec.turns, rec.updated_at) == (
        "first question",
        3,
        clock() - 1,
    )
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT title, turns, updated_at FROM sessions").fetchone()
    assert row == ("first question", 2, last_turn)


async def test_another_store_on_the_same_file_appending_or_deleting(
    tmp_path: Path, clock: StepClock
) -> None:
    """Two stores (two servers) writing one file: each one's remembered tails go stale, and
    the guarded INSERT, the primary key and the foreign key still give the errors a fresh
    read would, never a reused seq or a turn recorded twice."""
    path = tmp_path / "s.db"
    async with (
        open_sqlite_store(path, clock=clock) as a,
        open_sqlite_store(path, clock=clock) as b,
    ):
        await a.create_session(make_record())
        await a.create_session(make_record("gone"))
        await a.append_turn("s1", 0, sample_turn(0))
        await a.append_turn("gone", 0, sample_turn(0))
        await b.append_turn("s1", 1, sample_turn(1, n=1))  # b reads the tail: seqs 5-7
        assert a._tails["s1"] == (1, 5)  # stale now
        with pytest.raises(StoreError, match="already has turn 1 recorded"):  # the same turn
            await a.append_turn("s1", 1, sample_turn(1))
        await b.append_turn("s1", 3, [])  # a gap, and no entries
        with pytest.raises(StoreError, match="already has turn 2 recorded"):  # a later turn
            await a.append_turn("s1", 2, sample_turn(2))
        assert a._tails["s1"] == (1, 5)  # a refused turn remembers nothing
        await a.append_turn("s1", 4, sample_turn(4))
        assert a._tails["s1"] == (5, 13)
        await b.append_turn("s1", 5, sample_turn(5, n=0))  # b's tail is stale too
        assert b._tails["s1"] == (6, 15)
        entries = await a.transcript("s1")
        assert _seqs(entries) == list(range(15))
        assert [e.turn for e in entries] == [0] * 5 + [1] * 3 + [4] * 5 + [5] * 2
        last_at = clock() - 1
        for store in (a, b):
            rec = await store.get_session("s1")
            assert rec is not None and (rec.turns, rec.updated_at) == (6, last_at)
        assert await b.delete_session("gone")
        with pytest.raises(UnknownSessionError):  # the foreign key refuses the old key
            await a.append_turn("gone", 1, sample_turn(1))
        assert await a.get_session("gone") is None
        # Deleted and created again elsewhere: a's next turn goes to the new session.
        assert await b.delete_session("s1")
        await b.create_session(make_record())
        await a.append_turn("s1", 6, sample_turn(6))
        assert a._keys["s1"] == b._keys["s1"]
        assert [(e.seq, e.turn) for e in await b.transcript("s1")] == [(seq, 6) for seq in range(5)]
        rec = await b.get_session("s1")
        assert rec is not None and rec.turns == 7


def _v2_file(path: Path) -> sqlite3.Connection:
    """A store file as punie-trio wrote it at schema version 2."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    assert migrate(conn, path, MIGRATIONS[:2]) == 0
    return conn


def _v2_turn(
    conn: sqlite3.Connection,
    session_id: str,
    turn: int,
    entries: list[tuple[str, Any]],
    now: float,
) -> None:
    """Version 2's ``append_turn``: bump the session, one row if the turn has entries."""
    conn.execute("BEGIN IMMEDIATE")
    key, next_seq = conn.execute(
        "SELECT key, COALESCE((SELECT first_seq + count FROM turns"
        " WHERE session = sessions.key ORDER BY turn DESC LIMIT 1), 0)"
        " FROM sessions WHERE id = ?",
        (session_id,),
    ).fetchone()
    conn.execute(
        "UPDATE sessions SET turns = ?, updated_at = ? WHERE key = ?", (turn + 1, now, key)
    )
    if entries:
        lines = [
            kind + "\t" + json.dumps(payload, separators=(",", ":")) for kind, payload in entries
        ]
        conn.execute(
            "INSERT INTO turns (session, turn, first_seq, count, entries) VALUES (?, ?, ?, ?, ?)",
            (key, turn, next_seq, len(entries), "\n".join(lines)),
        )
    conn.execute("COMMIT")


def _v2_transcript(conn: sqlite3.Connection, session_id: str) -> list[TranscriptEntry]:
    out: list[TranscriptEntry] = []
    for turn, first_seq, entries in conn.execute(
        "SELECT turn, first_seq, entries FROM turns"
        " WHERE session = (SELECT key FROM sessions WHERE id = ?) ORDER BY turn",
        (session_id,),
    ):
        for seq, line in enumerate(entries.split("\n"), first_seq):
            kind, payload = line.split("\t", 1)
            out.append(TranscriptEntry(session_id, seq, turn, kind, payload))
    return out


async def test_migration_from_version_2_keeps_records_transcripts_and_order(
    tmp_path: Path, clock: StepClock
) -> None:
    path = tmp_path / "s.db"
    conn = _v2_file(path)
    try:
        _v1_session(conn, "old", 10.0, title="Old one", config='{"model":"m1"}')
        _v1_session(conn, "new", 20.0, cwd="/proj/sub", client_id="c1", mode="code")
        _v1_session(conn, "none", 5.0, turns=2)  # created with turns, never appended to
        _v1_session(conn, "tie", 5.0)  # same updated_at as "none": the id breaks the tie
        _v1_session(conn, "renamed", 1.0, cwd="/proj/sub")
        for turn in range(3):
            _v2_turn(conn, "old", turn, sample_turn(turn, n=turn), 100.0 + turn)
        _v2_turn(conn, "old", 3, [], 103.0)  # no entries: no row at version 2
        _v2_turn(conn, "new", 0, sample_turn(0, n=30), 200.0)
        _v2_turn(conn, "renamed", 0, sample_turn(0), 300.0)
        _v2_turn(conn, "renamed", 2, sample_turn(2), 301.0)  # a gap
        # update_session after the turns, with an updated_at older than them: it wins.
        conn.execute("UPDATE sessions SET title = 'R', updated_at = 7.5 WHERE id = 'renamed'")
        ids = ["old", "new", "none", "tie", "renamed"]
        records: dict[str, SessionRecord] = {}
        for sid in ids:
            rec = read_session_v1(conn, sid)
            assert rec is not None
            records[sid] = rec
        transcripts = {sid: _v2_transcript(conn, sid) for sid in ids}
    finally:
        conn.close()
    order = ["new", "old", "renamed", "tie", "none"]
    assert sorted(ids, key=lambda i: (records[i].updated_at, i), reverse=True) == order
    assert [len(transcripts[sid]) for sid in ids] == [2 + 3 + 4, 32, 0, 0, 10]
    with pytest.raises(StoreError, match="version 2 is older than 4; run the server"):
        read_sessions(path)  # the CLI never migrates

    async with open_sqlite_store(path, clock=clock) as store:
        for sid in ids:
            assert await store.get_session(sid) == records[sid]
            assert await store.transcript(sid) == transcripts[sid]
            pages = [p async for p in store.transcript_rows(sid, page_size=4)]
            assert [r for p in pages for r in p] == [
                (e.seq, e.kind, e.payload_json) for e in transcripts[sid]
            ]
        for cwd, expected in [(None, order), ("/proj/sub", ["new", "renamed"])]:
            for limit in (1, 2, 50):
                listed: list[SessionRecord] = []
                cursor: str | None = None
                while True:
                    page, cursor = await store.list_sessions(cwd=cwd, cursor=cursor, limit=limit)
                    listed += page
                    if cursor is None:
                        break
                assert listed == [records[sid] for sid in expected]
        # New turns continue each session's turns and seqs, and move it to the front.
        with pytest.raises(StoreError, match="already has turn 3"):
            await store.append_turn("old", 3, sample_turn(3))
        await store.append_turn("old", 4, sample_turn(4))
        await store.append_turn("none", 2, [])
        with pytest.raises(StoreError, match="already has turn 2"):
            await store.append_turn("renamed", 2, sample_turn(2))
        # The clock's readings: one per append_turn, the refused ones too.
        old_at, none_at = clock.start + 1, clock.start + 2
        old = await store.get_session("old")
        assert old is not None and (old.turns, old.updated_at) == (5, old_at)
        assert [(e.seq, e.turn) for e in (await store.transcript("old"))[9:]] == [
            (seq, 4) for seq in range(9, 14)
        ]
        listed, _ = await store.list_sessions()
        assert [(r.id, r.turns) for r in listed] == [
            ("none", 3),
            ("old", 5),
            ("new", 1),
            ("renamed", 3),
            ("tie", 0),
        ]
    assert [r.id for r in read_sessions(path)] == ["none", "old", "new", "renamed", "tie"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        at = db.execute(
            "SELECT s.id, t.turn, t.at FROM turns AS t JOIN sessions AS s ON s.key = t.session"
            " ORDER BY s.id, t.turn"
        ).fetchall()
    assert "turns_v2" not in names and "sessions_cwd" in names
    assert not names & {"sessions_by_updated", "sessions_by_cwd"}
    assert at == [
        ("new", 0, None),
        ("none", 2, none_at),
        *[("old", turn, None) for turn in range(3)],
        ("old", 4, old_at),
        ("renamed", 0, None),
        ("renamed", 2, None),
    ]


async def test_an_upgrade_says_so_and_how_long_it_took(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade of a large store takes seconds (11 s for 100,000 turns from version 1)
    and said nothing: the start-up check before it says why a start takes longer, and
    ``serve`` then sat silent for the rest. Both are said now, and nothing when there is
    nothing to upgrade."""
    path = tmp_path / "s.db"
    _v2_file(path).close()
    caplog.set_level(logging.INFO, logger="punie_trio.store._schema")
    caplog.clear()  # (making the file migrated it from 1 to 2, and said so)
    async with open_sqlite_store(path):
        pass
    said = [r.getMessage() for r in caplog.records if ": upgrad" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0] == (
        f"session store {path}: upgrading it from schema version 2 to {SCHEMA_VERSION}, "
        "once (a large store takes seconds: 11 s for 100,000 turns from version 1)"
    )
    assert said[1].startswith(f"session store {path}: upgraded to schema version 4 in ")
    caplog.clear()
    async with open_sqlite_store(path):
        pass
    async with open_sqlite_store(tmp_path / "new.db"):  # (set up: no upgrade)
        pass
    assert not [r for r in caplog.records if ": upgrad" in r.getMessage()]


async def test_turns_finishing_together_share_one_transaction(tmp_path: Path) -> None:
    """Group commit: turns appended in the same scheduler pass commit in one transaction,
    each caller returns once it is committed, and every tail is right."""
    async with open_sqlite_store(tmp_path / "s.db") as store:
        ids = [f"g{i}" for i in range(5)]
        for session_id in ids:
            await store.create_session(make_record(session_id))
        assert store._writer is not None
        statements: list[str] = []
        store._writer.set_trace_callback(statements.append)
        returned: list[str] = []

        async def append(session_id: str) -> None:
            await store.append_turn(session_id, 0, sample_turn(0))
            returned.append(session_id)

        async with trio.open_nursery() as nursery:
            for session_id in ids:
                nursery.start_soon(append, session_id)
        store._writer.set_trace_callback(None)
        verbs = _verbs(statements)
        assert verbs == ["BEGIN IMMEDIATE", "PRAGMA data_version", *["INSERT INTO"] * 5, "COMMIT"]
        assert sorted(returned) == ids
        for session_id in ids:
            assert store._tails[session_id] == (1, 5)
            assert _seqs(await store.transcript(session_id)) == list(range(5))


async def test_a_bad_turn_in_a_group_fails_alone(tmp_path: Path) -> None:
    """A group whose transaction fails is retried a turn at a time: the others commit."""
    async with open_sqlite_store(tmp_path / "s.db") as store:
        for session_id in ("a", "b", "c"):
            await store.create_session(make_record(session_id))
        await store.append_turn("b", 0, sample_turn(0))
        outcomes: dict[str, str] = {}

        async def append(session_id: str) -> None:
            try:
                await store.append_turn(session_id, 0, sample_turn(0))  # b: recorded already
            except StoreError as exc:
                outcomes[session_id] = str(exc)
            else:
                outcomes[session_id] = "ok"

        async with trio.open_nursery() as nursery:
            for session_id in ("a", "b", "c"):
                nursery.start_soon(append, session_id)
        assert outcomes["a"] == outcomes["c"] == "ok"
        assert "already has turn 0" in outcomes["b"]
        assert _seqs(await store.transcript("a")) == list(range(5))
        assert _seqs(await store.transcript("b")) == list(range(5))


async def test_a_turn_waiting_in_a_group_is_not_cancelled_half_way(tmp_path: Path) -> None:
    """A caller cancelled while its turn waits in another's group still sees it committed
    (the cancellation lands at its next checkpoint), as for any write."""
    async with open_sqlite_store(tmp_path / "s.db") as store:
        for session_id in ("a", "b"):
            await store.create_session(make_record(session_id))
        assert store._writer is not None
        statements: list[str] = []
        store._writer.set_trace_callback(statements.append)
        returned = False
        scope = trio.CancelScope()

        async def follower() -> None:
            nonlocal returned
            with scope:
                assert store._gathering is not None  # it joins the group led below
                await store.append_turn("b", 0, sample_turn(0))
                returned = True
                await trio.lowlevel.checkpoint()

        store._before_commit = scope.cancel  # cancels the follower while it waits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower)  # runs in the pass the leader's append yields
            await store.append_turn("a", 0, sample_turn(0))  # this task leads the group
        store._before_commit = None
        store._writer.set_trace_callback(None)
        assert returned and scope.cancelled_caught
        verbs = _verbs(statements)
        assert verbs == TWO_TURN_GROUP
        assert _seqs(await store.transcript("b")) == list(range(5))


async def test_a_turn_recorded_alone_commits_without_waiting_for_a_group(
    tmp_path: Path,
) -> None:
    """``alone=True`` (the hub knows no other turn runs): committed in its own transaction
    before any other task runs; a group already gathering is joined all the same."""
    async with open_sqlite_store(tmp_path / "s.db") as store:
        for session_id in ("a", "b", "c"):
            await store.create_session(make_record(session_id))
        assert store._writer is not None
        statements: list[str] = []
        store._writer.set_trace_callback(statements.append)
        ran: list[str] = []

        async def other() -> None:
            ran.append("other")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)  # runnable, but no pass happens before the commit
            await store.append_turn("a", 0, sample_turn(0), alone=True)
            assert ran == []
            assert store._tails["a"] == (1, 5)
        verbs = _verbs(statements)
        assert verbs == ["BEGIN IMMEDIATE", "PRAGMA data_version", "INSERT INTO", "COMMIT"]

        statements.clear()

        async def joiner() -> None:
            assert store._gathering is not None
            await store.append_turn("c", 0, sample_turn(0), alone=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(joiner)  # runs while the leader below gathers
            await store.append_turn("b", 0, sample_turn(0))
        store._writer.set_trace_callback(None)
        verbs = _verbs(statements)
        assert verbs == TWO_TURN_GROUP
        assert _seqs(await store.transcript("c")) == list(range(5))


async def test_the_wal_starts_over_under_steady_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints racing a stream of commits never copied the whole WAL, so it never
    started over: hundreds of MB for a small database under steady load. Once it passes
    WAL_SETTLE_BYTES, writes now wait for one checkpoint; the WAL stays near that."""
    from punie_trio.store import _sqlite

    monkeypatch.setattr(_sqlite, "CHECKPOINT_EVERY_ROWS", 50)
    # Every checkpoint settles (waited for), so the test does not depend on how fast the
    # owner thread gets through the ones nobody waits for.
    monkeypatch.setattr(_sqlite, "WAL_SETTLE_BYTES", -1)
    path = tmp_path / "s.db"
    wal = tmp_path / "s.db-wal"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record())
        largest = 0
        for turn in range(1500):  # 7,500 rows: a checkpoint every 10 turns
            await store.append_turn("s1", turn, sample_turn(turn), alone=True)
            largest = max(largest, wal.stat().st_size)
        assert len(await store.transcript("s1")) == 1500 * 5
    # One checkpoint interval's frames (10 turns), not the 14 MB of 1,500 turns' it reached.
    assert largest < 100 * 4096


async def test_writes_wait_for_a_checkpoint_only_past_the_settle_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below WAL_SETTLE_BYTES (as the last checkpoint measured the WAL) a checkpoint is
    posted and nobody waits for it; past it, the next write waits for the one it starts.
    (The test above sets the size to -1: every checkpoint settles.)"""
    from punie_trio.store import _sqlite

    monkeypatch.setattr(_sqlite, "CHECKPOINT_EVERY_ROWS", 1)
    monkeypatch.setattr(_sqlite, "WAL_SETTLE_BYTES", 1_000_000)
    async with open_sqlite_store(tmp_path / "s.db") as store:
        await store.create_session(make_record())

        async def owner_thread_idle() -> None:  # (its queue is FIFO: a no-op job's turn)
            await store._owner.start(lambda conn: None).result()

        await owner_thread_idle()
        store._wal_bytes = 999_999
        await store.append_turn("s1", 0, sample_turn(0), alone=True)
        assert store._writes_wait_for is None  # posted, not waited for
        await owner_thread_idle()
        store._wal_bytes = 1_000_001
        await store.append_turn("s1", 1, sample_turn(1), alone=True)
        settling = store._writes_wait_for
        assert settling is not None  # the next write waits for this one
        await store.append_turn("s1", 2, sample_turn(2), alone=True)
        assert store._writes_wait_for is not settling  # waited for, and let go


def _hold_deletes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    """Make every session delete wait for the returned event (on whichever thread runs
    it, whose name goes into the returned list); one on the event loop's thread fails."""
    release = threading.Event()
    threads: list[str] = []
    real_delete = _sql.delete_session

    def held_delete(conn: sqlite3.Connection, session_id: str) -> bool:
        threads.append(threading.current_thread().name)
        if threading.current_thread() is threading.main_thread():
            raise AssertionError("the delete ran on the event loop's thread")
        release.wait(10)
        return real_delete(conn, session_id)

    monkeypatch.setattr(_sql, "delete_session", held_delete)
    return release, threads


async def test_delete_runs_off_the_event_loop_and_writes_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete's cost grows with the session (104 ms for 10,000 turns), so it runs on the
    owner thread: the event loop goes on meanwhile, and writes wait for it rather than
    meeting its lock in SQLite's busy handler, which would block the loop."""
    release, threads = _hold_deletes(monkeypatch)
    async with open_sqlite_store(tmp_path / "s.db") as store:
        for session_id in ("a", "b"):
            await store.create_session(make_record(session_id))
            await store.append_turn(session_id, 0, sample_turn(0), alone=True)
        done: list[str] = []

        async def delete() -> None:
            assert await store.delete_session("a")
            done.append("deleted a")

        async def record() -> None:
            await store.append_turn("b", 1, sample_turn(1), alone=True)
            done.append("b turn 1")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(delete)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(record)
                await trio.testing.wait_all_tasks_blocked()
                assert done == []  # the loop runs; the turn waits for the delete
                release.set()
        assert sorted(done) == ["b turn 1", "deleted a"]
        assert threads and threads[0].startswith("punie-store")
        assert await store.get_session("a") is None
        assert [e.turn for e in await store.transcript("b")] == [0] * 5 + [1] * 5
        # The next turn after another connection's commit re-reads what it remembered.
        await store.append_turn("b", 2, sample_turn(2), alone=True)
        assert (await store.get_session("b")).turns == 3  # type: ignore[union-attr]


async def test_a_delete_cancelled_once_started_is_done_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like every write: cancelled before it starts (here, while it waits for a settling
    checkpoint) it deletes nothing; cancelled while it runs on the owner thread, it is
    done and its caller gets its answer, then ``Cancelled`` at its next checkpoint."""
    release, _ = _hold_deletes(monkeypatch)
    async with open_sqlite_store(tmp_path / "s.db") as store:
        for session_id in ("a", "b"):
            await store.create_session(make_record(session_id))
        answers: list[bool] = []

        async def delete(session_id: str, scope: trio.CancelScope) -> None:
            with scope:
                answers.append(await store.delete_session(session_id))
                await trio.lowlevel.checkpoint()
                answers.append(False)  # not reached: the cancellation lands here

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                running, waiting = trio.CancelScope(), trio.CancelScope()
                nursery.start_soon(delete, "a", running)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(delete, "b", waiting)  # waits for "a"'s delete
                await trio.testing.wait_all_tasks_blocked()
                running.cancel()
                waiting.cancel()
                await trio.testing.wait_all_tasks_blocked()
                release.set()
        assert answers == [True]
        assert running.cancelled_caught and waiting.cancelled_caught
        assert await store.get_session("a") is None
        assert await store.get_session("b") is not None
        assert store._writes_wait_for is None


async def test_a_keyboard_interrupt_in_a_running_delete_leaves_writes_waiting_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``KeyboardInterrupt`` (Ctrl-C in a program that runs the store without watching
    its signals) reaches the task waiting for its delete even through the shield: Trio
    delivers it at a checkpoint, shielded or not. The delete goes on on the owner thread,
    holding SQLite's write lock. The writes after it still wait for it: they stopped
    waiting, and the next one met its lock in SQLite's busy handler, blocking the whole
    event loop, then failed ("database is locked")."""
    from punie_trio.store._thread import Started

    release, _ = _hold_deletes(monkeypatch)
    real_result = Started.result
    interrupt = [True]

    async def result(self: Started[Any]) -> Any:
        if interrupt and interrupt.pop():  # (as Trio delivers it: at the checkpoint)
            await trio.lowlevel.checkpoint()
            raise KeyboardInterrupt
        return await real_result(self)

    async with open_sqlite_store(tmp_path / "s.db") as store:
        for session_id in ("a", "b"):
            await store.create_session(make_record(session_id))
            await store.append_turn(session_id, 0, sample_turn(0), alone=True)
        done: list[str] = []

        async def record() -> None:
            await store.append_turn("b", 1, sample_turn(1), alone=True)
            done.append("b turn 1")

        monkeypatch.setattr(Started, "result", result)
        with pytest.raises(KeyboardInterrupt):
            await store.delete_session("a")  # still running on the owner thread
        monkeypatch.setattr(Started, "result", real_result)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(record)
                await trio.testing.wait_all_tasks_blocked()
                assert done == []  # the loop runs; the turn waits for the delete
                release.set()
        assert done == ["b turn 1"]
        assert await store.get_session("a") is None
        assert [e.turn for e in await store.transcript("b")] == [0] * 5 + [1] * 5


async def test_a_deleted_transcript_is_not_left_in_the_file(tmp_path: Path) -> None:
    """``secure_delete`` is set, not left to the SQLite build (Debian's has it on, others
    off): once the store is closed (its last connection checkpoints and removes the WAL),
    a deleted session's text is nowhere in the file."""
    path = tmp_path / "s.db"
    secret = "sk-this-was-pasted-by-mistake-0123456789"
    async with open_sqlite_store(path) as store:
        for session_id in ("keep", "gone"):
            await store.create_session(make_record(session_id))
        text = {"sessionUpdate": "agent_message_chunk", "content": {"type": "text"}}
        for turn in range(50):
            for session_id, word in (("keep", "kept text"), ("gone", secret)):
                entry = {**text, "content": {"type": "text", "text": f"{word} {turn}"}}
                await store.append_turn(
                    session_id, turn, [("agent_message_chunk", entry)], alone=True
                )
        assert await store.delete_session("gone")
    assert not path.with_name("s.db-wal").exists()
    data = path.read_bytes()
    assert b"kept text 49" in data
    assert secret.encode() not in data


async def test_several_writes_wait_for_one_settling_checkpoint(tmp_path: Path) -> None:
    """Writers waiting on the same checkpoint each go on when it ends (taking its result
    twice once raised AlreadyUsedError in the second and failed its write)."""
    release = threading.Event()
    async with open_sqlite_store(tmp_path / "s.db") as store:

        def slow_checkpoint(conn: sqlite3.Connection) -> None:
            release.wait(10)

        store._writes_wait_for = store._owner.start(slow_checkpoint)
        written: list[str] = []

        async def create(session_id: str) -> None:
            await store.create_session(make_record(session_id))
            written.append(session_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create, "s1")
            nursery.start_soon(create, "s2")
            await trio.testing.wait_all_tasks_blocked()
            assert written == []  # both wait for the checkpoint
            release.set()
        assert sorted(written) == ["s1", "s2"]
        assert await store.get_session("s1") is not None
        assert await store.get_session("s2") is not None
        assert store._writes_wait_for is None


@pytest.mark.parametrize("alone", [False, True])
async def test_turns_cancelled_while_a_checkpoint_is_awaited_are_all_recorded(
    tmp_path: Path, alone: bool
) -> None:
    """``append_turn`` is not interruptible once begun (the Store protocol; the hub puts no
    cancel scope around it): callers cancelled while their group (or a turn recorded
    alone) waits for a settling checkpoint are all committed, and each sees its
    cancellation afterwards. Without the shield around that wait the leader left with
    ``Cancelled`` and the turns that had joined it waited for ever."""
    from punie_trio.store._thread import Started

    async with open_sqlite_store(tmp_path / "s.db") as store:
        sessions = ["a"] if alone else ["a", "b", "c"]
        for session_id in sessions:
            await store.create_session(make_record(session_id))
        settling: Started[None] = Started()
        store._writes_wait_for = settling  # as when the WAL has grown past WAL_SETTLE_BYTES
        scopes = {session_id: trio.CancelScope() for session_id in sessions}
        returned: list[str] = []

        async def record(session_id: str) -> None:
            with scopes[session_id]:
                await store.append_turn(session_id, 0, sample_turn(0), alone=alone)
                returned.append(session_id)
                await trio.lowlevel.checkpoint()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for session_id in sessions:
                    nursery.start_soon(record, session_id)
                await trio.testing.wait_all_tasks_blocked()  # all wait for the checkpoint
                assert returned == []
                group = store._gathering
                assert (group is None) == alone
                for scope in scopes.values():
                    scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                if group is not None and store._gathering is None:
                    # The leader was interrupted (the defect): free the turns that had
                    # joined it, which cannot be cancelled, so the test fails, not hangs.
                    for item in group:
                        if item.task is not None:
                            trio.lowlevel.reschedule(item.task, outcome.Value(None))
                    raise AssertionError("the group's leader left while its turns waited")
                assert returned == []  # still waiting: not interruptible
                settling.set(outcome.Value(None))
        assert sorted(returned) == sessions
        assert all(scope.cancelled_caught for scope in scopes.values())
        for session_id in sessions:
            assert _seqs(await store.transcript(session_id)) == list(range(5))


@pytest.mark.parametrize("how", ["deleted", "replaced", "data dir moved"])
async def test_writes_fail_once_the_store_file_is_gone(tmp_path: Path, how: str) -> None:
    """A store deleted (``rm sessions.sqlite3*``), replaced by another file, or moved away
    with its data directory while the server runs: SQLite goes on writing to the file it
    has open, so every turn was answered as saved and then vanished with the process (a
    restart found nothing, or the other file). Writes fail instead, naming it; reads still
    see what was there."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record("s1"))
        await store.append_turn("s1", 0, sample_turn(0))
        if how == "deleted":
            for name in ("s.db", "s.db-wal", "s.db-shm"):
                (data / name).unlink()
        elif how == "replaced":
            (data / "other.db").write_bytes(b"")
            os.replace(data / "other.db", path)
        else:
            data.rename(tmp_path / "moved")
        with pytest.raises(StoreError, match="deleted or replaced while the server ran"):
            await store.append_turn("s1", 1, sample_turn(1))
        with pytest.raises(StoreError, match="deleted or replaced"):
            await store.append_turn("s1", 1, sample_turn(1), alone=True)
        with pytest.raises(StoreError, match="deleted or replaced"):
            await store.create_session(make_record("s2"))
        with pytest.raises(StoreError, match="deleted or replaced"):
            await store.update_session("s1", title="t")
        with pytest.raises(StoreError, match="deleted or replaced"):
            await store.delete_session("s1")
        rec = await store.get_session("s1")
        assert rec is not None and rec.turns == 1 and rec.title is None
        if how == "data dir moved":
            # Put back where it was, it is the store again: nothing was lost meanwhile.
            (tmp_path / "moved").rename(data)
            await store.append_turn("s1", 1, sample_turn(1))
    if how == "data dir moved":
        assert read_session(path, "s1") is not None
        assert [e.turn for e in read_transcript(path, "s1")][-1] == 1


async def test_a_wal_deleted_under_the_store_fails_writes_and_is_saved(tmp_path: Path) -> None:
    """``rm sessions.sqlite3-wal`` while the server runs (a "stale" file cleaned up): the
    connections write on into the unlinked WAL, where every turn since the last
    checkpoint then lived only until the process ended; after a ``kill -9`` the store
    held no tables at all. Writes now fail, naming it, and what the unlinked WAL holds is
    checkpointed into the database at once: the file alone has every committed turn."""
    path = tmp_path / "s.db"
    async with open_sqlite_store(path) as store:
        await store.create_session(make_record("s1"))
        for turn in range(3):
            await store.append_turn("s1", turn, sample_turn(turn))
        (tmp_path / "s.db-wal").unlink()
        with pytest.raises(StoreError, match=r"s\.db-wal.* deleted or replaced"):
            await store.append_turn("s1", 3, sample_turn(3))
        with pytest.raises(StoreError, match="deleted or replaced"):
            await store.create_session(make_record("s2"))
        rec = await store.get_session("s1")  # (after the checkpoint: one owner thread)
        assert rec is not None and rec.turns == 3
        # As a crash would leave it: the database file without any WAL.
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        (crashed / "s.db").write_bytes(path.read_bytes())
    assert read_session(crashed / "s.db", "s1") is not None
    assert [e.turn for e in read_transcript(crashed / "s.db", "s1")][-1] == 2
