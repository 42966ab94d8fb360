"""``serve`` when the data directory's disk is full, or its files reach the file size limit:
at start (the store cannot be made) a message naming the store and the cause, exit 1;
while serving, a turn that cannot be committed is answered -32603 naming the cause, and
the server goes on serving reads and, once there is room again, writes.

Two ways to fill a disk: ``RLIMIT_FSIZE`` (a write past it fails with ``EFBIG``), which
runs everywhere, and a 1 MiB tmpfs (``ENOSPC``, the real thing), which needs root to
mount and is skipped without it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from punie_trio.store import read_transcript

from ..acp_schema import SchemaChecker
from ..integration._support import (
    TOKEN,
    acp_ws_client,
    command_process,
    serve_command,
    server_env,
)
from ._hub import expect_error, prompt_params


def limited(command: list[str], max_bytes: int) -> list[str]:
    """``command`` (a Python one) run with ``RLIMIT_FSIZE`` at ``max_bytes``. (Python
    ignores ``SIGXFSZ``, so a write past the limit fails with ``EFBIG``.)"""
    assert command[0] == sys.executable
    setup = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_bytes}, {max_bytes})); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    return [sys.executable, "-c", setup, *command[1:]]


def serve_once(
    tmp_path: Path, data: Path, max_bytes: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``serve --stdio --no-http`` on ``data`` with nothing to read (it starts, then ends
    at end of input), its file size limited to ``max_bytes`` if given (:func:`limited`)."""
    command = serve_command(tmp_path, "--stdio", "--no-http", data_dir=data)
    return subprocess.run(
        command if max_bytes is None else limited(command, max_bytes),
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env=server_env(),
        timeout=60,
    )


def test_a_store_that_cannot_be_made_past_the_file_size_limit_is_said_at_start(
    tmp_path: Path,
) -> None:
    """SQLite's own word for it was ``disk I/O error``."""
    data = tmp_path / "data"
    done = serve_once(tmp_path, data, 4096)
    assert done.returncode == 1
    message = done.stderr.decode()
    store = data / "sessions.sqlite3"
    assert f"punie-trio: error: {store}: cannot open session store: " in message
    assert (
        "the session store reached the file size limit of 4096 bytes (ulimit -f)" in message
        and "Traceback" not in message
    )


def ram_disk(path: Path) -> contextlib.AbstractContextManager[Path]:
    """A ramfs at ``path``: it has no size, and ``statvfs`` says 0 blocks, 0 free (skips
    the test where it cannot be mounted: not root)."""
    return _mounted(path, "ramfs", "mode=0700")


@contextlib.contextmanager
def _mounted(path: Path, kind: str, options: str) -> Iterator[Path]:
    """A file system of ``kind`` mounted at ``path`` with ``options`` for the test, and
    unmounted after it (skips the test where it cannot be mounted: not root)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", kind, "-o", options, kind, str(path)],
        capture_output=True,
        check=False,
    ) if hasattr(os, "geteuid") and os.geteuid() == 0 else None  # fmt: skip
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"needs root to mount a {kind}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_file_system_that_says_no_size_is_not_said_to_be_full(tmp_path: Path) -> None:
    """A ramfs (a tmpfs mounted with ``size=0``, some FUSE file systems) gives ``statvfs``
    0 blocks and 0 free: any failed write of SQLite's there was said as "the file system
    holding the session store is full, with 0 KiB free ...; free some space", here
    where the file size limit was the cause. A file system that gives no size is never
    said to be full."""
    with ram_disk(tmp_path / "ram") as disk:
        assert os.statvfs(disk).f_blocks == 0
        data = disk / "data"
        done = serve_once(tmp_path, data, 4096)
        assert done.returncode == 1
        message = done.stderr.decode()
        assert "is full" not in message, message
        assert "the session store reached the file size limit of 4096 bytes (ulimit -f)" in (
            message
        )


async def turns_fail_then_work_again(
    tmp_path: Path,
    acp_schema: SchemaChecker,
    command: list[str],
    store: Path,
    fill: Callable[[], object],
    free: Callable[[], object],
) -> str:
    """Serve, prompt once, ``fill()`` the disk: a prompt is answered -32603 saying why
    its turn was not saved, a second client still lists and loads, and after ``free()``
    prompts are saved again; the server then ends cleanly. Returns the prompt's error
    message."""
    root = Path(await trio.Path(tmp_path).resolve())
    with trio.fail_after(60):
        async with (
            command_process(command, server_env(), stdin=subprocess.DEVNULL) as server,
            acp_ws_client(server.url, acp_schema, token=TOKEN) as (client, _),
        ):
            await client.initialize()
            session_id = await client.new_session(str(root))
            assert await client.prompt(session_id, "saved") == "end_turn"
            fill()
            error = await expect_error(
                client, "session/prompt", prompt_params(session_id, "x" * 300_000)
            )
            assert error["code"] == -32603
            assert "the turn was not saved" in error["message"]
            assert f"{store}: " in error["message"]
            async with acp_ws_client(server.url, acp_schema, token=TOKEN) as (other, _):
                await other.initialize()
                listed = await other.request("session/list", {})
                assert [s["sessionId"] for s in listed["sessions"]] == [session_id]
            free()
            assert await client.prompt(session_id, "saved again") == "end_turn"
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
    return str(error["message"])


async def test_a_turn_past_the_file_size_limit_is_refused_and_serving_goes_on(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """The WAL reaches the limit (1 MiB) with a large turn. (Here the limit stays: "free"
    is a smaller turn, which fits in the WAL after a checkpoint has made room.)"""
    command = limited(serve_command(tmp_path), 1024 * 1024)
    store = tmp_path / "data" / "sessions.sqlite3"
    message = await turns_fail_then_work_again(
        tmp_path, acp_schema, command, store, lambda: None, lambda: None
    )
    assert "reached the file size limit of 1048576 bytes (ulimit -f)" in message
    assert message.endswith("; raise the limit")


def small_disk(path: Path) -> contextlib.AbstractContextManager[Path]:
    """A 1 MiB tmpfs at ``path`` (skips the test where it cannot be mounted: not root)."""
    return _mounted(path, "tmpfs", "size=1m,mode=0700")


def fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` up, leaving about ``leave`` bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with (disk / "filler").open("ab") as file, contextlib.suppress(OSError):
        file.write(b"\0" * max(0, free - leave))
        file.flush()


def test_a_store_that_cannot_be_made_on_a_full_disk_is_said_at_start(
    tmp_path: Path,
) -> None:
    """With 16 KiB left SQLite said ``disk I/O error`` (its shared-memory file could not
    grow), and with a little more ``database or disk is full``."""
    with small_disk(tmp_path / "disk") as disk:
        data = disk / "data"
        for leave in (16 * 1024, 64 * 1024):
            with contextlib.suppress(FileNotFoundError):
                (disk / "filler").unlink()
            shutil.rmtree(data, ignore_errors=True)
            fill(disk, leave)
            command = serve_command(tmp_path, "--stdio", "--no-http", data_dir=data)
            done = subprocess.run(
                command, capture_output=True, stdin=subprocess.DEVNULL, env=server_env(),
                timeout=60,
            )  # fmt: skip
            assert done.returncode == 1
            message = done.stderr.decode()
            store = data / "sessions.sqlite3"
            assert f"punie-trio: error: {store}: cannot open session store: " in message
            assert "the file system holding the session store is full, with " in message
            assert (
                "KiB free (SQLite: " in message and "free some space, then start again" in message
            )
            assert "Traceback" not in message


async def test_a_turn_on_a_full_disk_is_refused_and_serving_goes_on(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        command = serve_command(tmp_path, data_dir=disk / "data")
        store = disk / "data" / "sessions.sqlite3"
        message = await turns_fail_then_work_again(
            tmp_path, acp_schema, command, store, lambda: fill(disk), (disk / "filler").unlink
        )
        assert "the file system holding the session store is full, with " in message
        assert message.endswith("; free some space")


def old_store(data: Path, turns: int = 200) -> Path:
    """A store of schema version 1 (as punie-trio wrote it then) in ``data``, of about
    1 MB, closed; returns its path."""
    from ..store.test_sqlite_store import _v1_file, _v1_session, _v1_turn

    data.mkdir(mode=0o700, exist_ok=True)
    store = data / "sessions.sqlite3"
    conn = _v1_file(store)
    try:
        _v1_session(conn, "old", 1.0, title="Old ✓")
        for turn in range(turns):
            texts = [f"answer {turn}.{i} " * 8 for i in range(20)]
            _v1_turn(conn, "old", turn, [("agent_message_chunk", text_update(t)) for t in texts])
    finally:
        conn.close()
    return store


def text_update(text: str) -> dict[str, object]:
    return {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": text}}


def _version(store: Path) -> int:
    with contextlib.closing(sqlite3.connect(store)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _assert_upgrade_said(message: str, store: Path, cause: str) -> None:
    assert f"punie-trio: error: {store}: cannot upgrade the session store from schema " in message
    assert "version 1 to 4: " in message and cause in message, message
    if _version(store) == 1:
        assert "it was rolled back, and the store is as it was (version 1)" in message
    else:  # (migration 2 was done, one after it found no room)
        assert f"the store is whole, at version {_version(store)} (the migrations" in message
    assert "times the store's size while it runs" in message
    assert "then start again" in message and "Traceback" not in message


def test_an_upgrade_past_the_file_size_limit_says_so_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """An upgrade makes the store and its WAL each about 2.3 times as large while it
    runs: where that did not fit, the message was the one of a store that could not be
    made (`cannot open session store: ...`), and did not say that it was the upgrade
    that needed the room, nor how much. The store stays at its version, byte for byte,
    and a start with room upgrades it."""
    data = tmp_path / "data"
    store = old_store(data)
    before = store.read_bytes()
    done = serve_once(tmp_path, data, len(before) + 64 * 1024)
    assert done.returncode == 1
    _assert_upgrade_said(done.stderr.decode(), store, "reached the file size limit of ")
    assert store.read_bytes() == before and _version(store) == 1
    done = serve_once(tmp_path, data)
    assert done.returncode == 0, done.stderr.decode()
    assert _version(store) == 4


def test_an_upgrade_that_found_no_room_leaves_nothing_beside_the_store(
    tmp_path: Path,
) -> None:
    """A refused upgrade rolled back and left the store as it was, but beside it the
    upgrade's WAL (1 MiB for a 1 MiB store here; about 830 MB for a 365 MB one), holding
    only the rolled-back pages, and its -shm: the room the message asks the user to free
    was taken by the failed start itself. Where no migration was kept, it is removed now;
    the store is byte for byte as it was, and the next start with room upgrades it."""
    data = tmp_path / "data"
    store = old_store(data)
    before = store.read_bytes()
    done = serve_once(tmp_path, data, len(before) + 64 * 1024)
    assert done.returncode == 1
    # (Looked at first: the last connection to close a store, this test's too, removes
    # its WAL.)
    assert sorted(os.listdir(data)) == ["punie-trio.log", "serve.lock", "sessions.sqlite3"]
    assert store.read_bytes() == before
    _assert_upgrade_said(done.stderr.decode(), store, "reached the file size limit of ")
    assert "it was rolled back, and the store is as it was (version 1)" in done.stderr.decode()
    done = serve_once(tmp_path, data)
    assert done.returncode == 0, done.stderr.decode()
    assert _version(store) == 4


def test_an_upgrade_on_a_disk_without_room_for_it_says_so_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """A full disk as the upgrade runs was said `the file system holding the session
    store is full, with 0 KiB free`, and once the refused start had ended the disk had
    room again (the upgrade's WAL removed): nothing said that the upgrade needed it."""
    made = old_store(tmp_path / "made")
    with _mounted(tmp_path / "disk", "tmpfs", "size=3m,mode=0700") as disk:
        (disk / "data").mkdir(mode=0o700)
        store = disk / "data" / "sessions.sqlite3"
        shutil.copyfile(made, store)
        command = serve_command(tmp_path, "--stdio", "--no-http", data_dir=disk / "data")
        done = subprocess.run(
            command, capture_output=True, stdin=subprocess.DEVNULL, env=server_env(), timeout=60
        )
        assert done.returncode == 1
        _assert_upgrade_said(done.stderr.decode(), store, "is full, with ")
        with contextlib.closing(sqlite3.connect(store)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        done = subprocess.run(
            command, capture_output=True, stdin=subprocess.DEVNULL, env=server_env(), timeout=60
        )
        assert done.returncode == 0, done.stderr.decode()
        assert _version(store) == 4
        assert len(read_transcript(store, "old")) == 200 * 20
