"""One ``serve`` per data directory: a second is refused at start (exit status 1, naming the
first's pid), and the first goes on unharmed. Two once shared the token file (each start
overwrote it), the WAL (which then grew without end) and the sessions."""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from ..acp_schema import SchemaChecker
from ..integration._support import (
    TOKEN,
    acp_ws_client,
    serve_command,
    server_env,
    server_process,
)


async def test_a_second_serve_on_the_same_data_dir_is_refused(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    with trio.fail_after(60):
        async with server_process(tmp_path) as first:
            second = await trio.run_process(
                serve_command(tmp_path, token=None),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=server_env(),
            )
            assert second.returncode == 1
            message = second.stderr.decode()
            assert message.startswith("punie-trio: error: another punie-trio serve (pid ")
            assert f"(pid {first.process.pid})" in message
            assert str(tmp_path / "data") in message and "--data-dir" in message
            # It left the first's files alone: no token written over the first's.
            assert not (tmp_path / "data" / "token").exists()
            assert first.url is not None
            async with acp_ws_client(first.url, acp_schema, token=TOKEN) as (client, _):
                await client.initialize()
                session_id = await client.new_session(str(tmp_path))
                assert await client.prompt(session_id, "still mine") == "end_turn"
            first.process.send_signal(signal.SIGTERM)
            assert await first.process.wait() == 0

        # Once it has gone (by any way: the lock dies with the process), the next one starts.
        async with server_process(tmp_path) as third:
            assert third.url is not None
            async with httpx.AsyncClient(base_url=third.url) as http:
                assert (await http.get("/health")).status_code == 200
            third.process.kill()
            await third.process.wait()
        async with server_process(tmp_path) as fourth:
            assert fourth.url is not None


def test_the_read_only_commands_do_not_need_the_lock(tmp_path: Path) -> None:
    """``punie-trio token`` and ``sessions ...`` read beside a running server."""
    data = tmp_path / "data"
    server = subprocess.Popen(
        serve_command(tmp_path, token=None),
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=server_env(),
    )
    try:
        assert server.stderr is not None
        assert b"listening" in server.stderr.readline()
        for args in (["token"], ["sessions", "list"]):
            done = subprocess.run(
                [sys.executable, "-m", "punie_trio", *args, "--data-dir", str(data)],
                capture_output=True,
                env=server_env(),
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert server.stderr is not None
        server.stderr.close()


def serve_stdio_once(tmp_path: Path, data: Path) -> subprocess.CompletedProcess[bytes]:
    """``serve`` over stdio on ``data``, its stdin at EOF: a server that starts ends at once
    (it does not hang the test); one refused says why on stderr."""
    return subprocess.run(
        serve_command(tmp_path, "--stdio", "--no-http", data_dir=data),
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env=server_env(),
        timeout=60,
    )


def test_a_symlink_planted_as_the_lock_file_is_not_followed(tmp_path: Path) -> None:
    """Someone who can write to a shared data directory plants ``serve.lock`` as a link to
    a file of the user's: ``serve`` truncated that file and wrote its pid into it. Now it
    refuses to start (exit 1) and says why; the file is untouched."""
    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    victim = tmp_path / "notes.txt"
    victim.write_text("precious\n")
    (data / "serve.lock").symlink_to(victim)
    done = serve_stdio_once(tmp_path, data)
    assert done.returncode == 1
    message = done.stderr.decode()
    assert f"cannot lock the data directory ({data / 'serve.lock'}): " in message
    assert "is a symbolic link" in message and "Traceback" not in message
    assert victim.read_text() == "precious\n"
    # A dangling one would have been created through: not either.
    (data / "serve.lock").unlink()
    (data / "serve.lock").symlink_to(tmp_path / "made.txt")
    done = serve_stdio_once(tmp_path, data)
    assert done.returncode == 1 and b"is a symbolic link" in done.stderr
    assert not (tmp_path / "made.txt").exists()


def test_what_the_lock_file_says_is_shown_only_if_it_is_a_pid(tmp_path: Path) -> None:
    """The refusal names the holder's pid as read from ``serve.lock``; in a data directory
    others can write to, that file may hold anything: escape sequences went to the
    terminal raw. Now only a number is shown."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    lock = data / "serve.lock"
    lock.write_bytes(b"\x1b]0;owned\x07\x1b[2J\n")
    with lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = serve_stdio_once(tmp_path, data)
    assert done.returncode == 1
    assert b"\x1b" not in done.stderr and b"\x07" not in done.stderr
    assert done.stderr.startswith(b"punie-trio: error: another punie-trio serve is using")


def test_serve_removes_the_token_temporary_a_killed_start_left(tmp_path: Path) -> None:
    """A ``serve`` killed while it wrote the token (between the temporary file and its
    rename) left ``.token.<16 hex digits>.tmp`` in the data directory for good, holding a
    token (and one killed while it closed the store, the store marker's). The next start
    removes them (only a name of exactly that form), once it holds
    the directory's lock, so never another running server's."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / ".token.0123456789abcdef.tmp").write_text("half-written token\n")
    (data / ".sessions.sqlite3-closed.0123456789abcdef.tmp").write_text("1 2 3 4 5\n")
    (data / ".token.tmp").write_text("the user's\n")
    done = serve_stdio_once(tmp_path, data)
    assert done.returncode == 0, done.stderr
    assert not (data / ".token.0123456789abcdef.tmp").exists()
    assert not (data / ".sessions.sqlite3-closed.0123456789abcdef.tmp").exists()
    assert (data / ".token.tmp").read_text() == "the user's\n"


def test_serve_refuses_a_damaged_store_with_what_to_do(tmp_path: Path) -> None:
    """A store with a page damaged at rest made ``serve`` start and serve, and fail
    only a later read. It now exits 1 at start, naming the file and what to do, without
    a traceback and without changing a byte of it."""
    from ..store.test_sqlite_store import _fill, _overwrite_a_middle_page

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store = data / "sessions.sqlite3"
    trio.run(_fill, store)
    _overwrite_a_middle_page(store)
    damaged = store.read_bytes()
    done = serve_stdio_once(tmp_path, data)
    assert done.returncode == 1
    message = done.stderr.decode()
    assert f"punie-trio: error: {store}: the session store is damaged (" in message
    assert f"sqlite3 {store} .dump" in message and "Traceback" not in message
    assert store.read_bytes() == damaged
