from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from punie_trio import _paths, cli, server


def test_data_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PUNIE_DATA_DIR", str(tmp_path / "d"))
    assert _paths.default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("PUNIE_DATA_DIR")
    assert _paths.default_data_dir().name == "punie-trio"
    assert _paths.default_config_path().name == "config.toml"
    assert _paths.token_path(tmp_path) == tmp_path / "token"


def test_ensure_data_dir_is_private(tmp_path: Path) -> None:
    path = _paths.ensure_data_dir(tmp_path / "a" / "b")
    assert path.is_dir()
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert _paths.ensure_data_dir(path) == path  # idempotent


def test_replace_file_never_writes_through_a_planted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who can write to the directory plants a symlink (to a file they can read)
    and a wide-mode file under the names the temporary file could take: the token still
    goes only to its own 0600 file (it once went through the link, or took the planted
    file's mode)."""
    leak = tmp_path / "leak.txt"
    leak.write_text("")
    (tmp_path / ".token.aaaa.tmp").symlink_to(leak)
    wide = tmp_path / ".token.bbbb.tmp"
    wide.write_text("")
    wide.chmod(0o666)
    names = iter(["aaaa", "bbbb", "cccc"])
    monkeypatch.setattr(_paths.secrets, "token_hex", lambda _n: next(names))
    token = tmp_path / "token"
    _paths.replace_file(token, b"s3cret\n", 0o600)
    assert token.read_bytes() == b"s3cret\n"
    assert not token.is_symlink()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert leak.read_text() == "" and wide.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".token.aaaa.tmp",
        ".token.bbbb.tmp",
        "leak.txt",
        "token",
    ]


def test_create_private_makes_0600_and_leaves_an_existing_file_alone(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "new"
        _paths.create_private(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes() == b""
        mine = tmp_path / "mine"
        mine.write_bytes(b"kept")
        mine.chmod(0o644)
        _paths.create_private(mine)
        assert stat.S_IMODE(mine.stat().st_mode) == 0o644
        assert mine.read_bytes() == b"kept"
        _paths.create_private(tmp_path)  # in the way: the caller's own open reports it
        assert tmp_path.is_dir()
    finally:
        os.umask(old_umask)


def test_the_log_file_and_its_backups_are_private(tmp_path: Path) -> None:
    """Rotation reopens the log: the new file is 0600 too, and the backups keep it."""
    old_umask = os.umask(0o022)
    handler = cli._PrivateRotatingFileHandler(
        tmp_path / "punie-trio.log", maxBytes=200, backupCount=2, encoding="utf-8"
    )
    try:
        for i in range(20):
            handler.emit(logging.makeLogRecord({"msg": f"line {i} " + "x" * 40}))
    finally:
        handler.close()
        os.umask(old_umask)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["punie-trio.log", "punie-trio.log.1", "punie-trio.log.2"]
    for name in names:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_the_log_is_one_line_not_a_traceback_a_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk made logging print "--- Logging error ---" and a traceback to stderr for
    every record (an audit saw them flood stderr while prompts failed to save)."""
    log = tmp_path / "punie-trio.log"
    handler = cli._PrivateRotatingFileHandler(log, encoding="utf-8")
    try:
        with open("/dev/full", "w", encoding="utf-8") as full:
            handler.stream, original = full, handler.stream
            for i in range(3):
                handler.emit(logging.makeLogRecord({"msg": f"lost {i}"}))
            # A bad log call meanwhile is no write that succeeded: no "again" for it.
            handler.emit(logging.makeLogRecord({"msg": "%d", "args": ("x",)}))
            handler.emit(logging.makeLogRecord({"msg": "lost 3"}))
            handler.stream = original
            handler.emit(logging.makeLogRecord({"msg": "kept"}))
            with contextlib.suppress(OSError):  # (its buffer still holds a line)
                full.close()
    finally:
        handler.close()
    err = capsys.readouterr().err
    full = (
        f"punie-trio: cannot write {log} ([Errno 28] No space left on device); its lines are"
        " dropped until it can\n"
    )
    assert err.startswith(full) and err.endswith(f"punie-trio: writing {log} again\n")
    assert err.count("again") == 1 and err.count("cannot write") == 1
    assert "--- Logging error ---" in err  # (the bad call's own report)
    assert log.read_text(encoding="utf-8") == "kept\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_the_log_is_said_through_the_stderr_thread(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log file's "cannot write" and "again" lines went to ``sys.stderr`` directly,
    from the server's thread: with stderr a pipe nobody reads (an IDE may ignore it), that
    write blocked the whole server for good, the very stall the stderr handler's thread
    exists to avoid; with stderr sharing the non-blocking ACP stdin/stdout (a terminal)
    it raised BlockingIOError out of the log call. They now wait in the stderr handler's
    queue like any log line. (Here ``sys.stderr`` is a full non-blocking pipe: a test
    cannot wait forever, and any direct write to it raises.)"""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"x" * 65536)
    full_pipe = io.TextIOWrapper(io.FileIO(write_end, "w", closefd=False), line_buffering=True)
    stderr = cli._StderrHandler("INFO")
    log = tmp_path / "punie-trio.log"
    handler = cli._PrivateRotatingFileHandler(log, encoding="utf-8")
    handler.stderr = stderr
    monkeypatch.setattr(sys, "stderr", full_pipe)
    try:
        with open("/dev/full", "w", encoding="utf-8") as full:
            handler.stream, original = full, handler.stream
            handler.emit(logging.makeLogRecord({"msg": "lost"}))
            handler.stream = original
            handler.emit(logging.makeLogRecord({"msg": "kept"}))
            with contextlib.suppress(OSError):  # (its buffer still holds a line)
                full.close()
    finally:
        monkeypatch.undo()
        handler.close()
        stderr.flush()
        stderr.close()
        os.close(read_end)
        os.close(write_end)
    err = capfd.readouterr().err
    assert err == (
        f"punie-trio: cannot write {log} ([Errno 28] No space left on device); its lines are"
        f" dropped until it can\npunie-trio: writing {log} again\n"
    )
    assert log.read_text(encoding="utf-8") == "kept\n"


def test_a_bad_log_call_still_gets_loggings_own_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only a failing write is the one-line report: a bad format string is a bug in the
    caller, and logging's traceback points at it."""
    handler = cli._PrivateRotatingFileHandler(tmp_path / "punie-trio.log", encoding="utf-8")
    try:
        handler.emit(logging.makeLogRecord({"msg": "%d items", "args": ("many",)}))
    finally:
        handler.close()
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err and "cannot write" not in err


def stderr_handler_on_a_full_pipe() -> tuple[cli._StderrHandler, int, int, int]:
    """A ``_StderrHandler`` (``%(message)s``) whose stderr is a pipe filled up: what it is
    given waits in its queue until the test reads ``read_end``. Returns the handler, the
    pipe's two ends and how many bytes fill it."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filled += os.write(write_end, b"x" * 4096)
    saved = os.dup(2)
    os.dup2(write_end, 2)
    try:
        stderr = cli._StderrHandler("INFO")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    stderr.setFormatter(logging.Formatter("%(message)s"))
    return stderr, read_end, write_end, filled


def test_the_listening_line_goes_out_after_the_log_lines_before_it_and_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve`` printed its "listening on" line to stderr directly while log lines logged
    before it still waited for the stderr thread: it came out before them, or glued to
    one (``... (ACP: ws://HOST:PORT/acp)2026-... INFO hypercorn.error: Running on ...``,
    4 starts in 12 at ``--log-level info``). It now goes through the same thread. (Here
    stderr is a full pipe, so the log line surely still waits when the line is told.)"""
    stderr, read_end, write_end, filled = stderr_handler_on_a_full_pipe()
    root = logging.getLogger()
    root.addHandler(stderr)
    direct = io.StringIO()
    monkeypatch.setattr(sys, "stderr", direct)
    try:
        logging.getLogger("punie_trio.test").warning("logged before")
        server._tell("punie-trio listening on http://127.0.0.1:1 (ACP: ws://127.0.0.1:1/acp)")
        assert direct.getvalue() == ""
        expected = b"logged before\npunie-trio listening on http://127.0.0.1:1 (ACP: ws://127.0.0.1:1/acp)\n"
        got = b""
        while len(got) < filled + len(expected):
            got += os.read(read_end, filled + len(expected) - len(got))
        assert got[filled:] == expected
    finally:
        root.removeHandler(stderr)
        stderr.close()
        os.close(read_end)
        os.close(write_end)


def test_an_error_after_serve_comes_after_the_log_lines_before_it(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's last line (``cannot write to stdout``, after ``serve`` returned) was
    printed to stderr directly while the log lines logged before it still waited for the
    stderr thread: it came first in 3 runs of 10 (or in the middle of one). It now waits
    for them (as long as the exit would: STDERR_FLUSH_SECONDS). Here the thread's write
    is held until the test lets it go, so the log line surely still waits."""
    stderr = cli._StderrHandler("INFO")
    stderr.setFormatter(logging.Formatter("%(message)s"))
    release, either = threading.Event(), threading.Event()
    real_write = os.write

    def held_write(fd: int, data: bytes) -> int:
        if fd == stderr._fd:
            release.wait()
        return real_write(fd, data)

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            either.set()
            return super().write(text)

    real_flush = stderr.flush

    def flush() -> None:
        either.set()
        real_flush()

    direct = Recorder()
    monkeypatch.setattr(os, "write", held_write)
    monkeypatch.setattr(stderr, "flush", flush)
    monkeypatch.setattr(sys, "stderr", direct)
    root = logging.getLogger()
    root.addHandler(stderr)
    try:
        logging.getLogger("punie_trio.test").warning("logged before")
        error = threading.Thread(target=cli._error, args=("cannot write to stdout", 1))
        error.start()
        either.wait()
        printed_early = direct.getvalue()
        release.set()
        error.join()
    finally:
        release.set()
        root.removeHandler(stderr)
        stderr.close()
        monkeypatch.undo()
    assert printed_early == ""
    assert direct.getvalue() == "punie-trio: error: cannot write to stdout\n"
    assert capfd.readouterr().err == "logged before\n"


def test_logging_set_up_twice_in_one_process_keeps_one_of_each_handler(tmp_path: Path) -> None:
    """A program (a test) running ``cli.main`` twice in one process set logging up twice:
    every line went to stderr and the file twice, and each stderr handler kept its thread
    and its copy of fd 2 for good. The second set-up now replaces the first's handlers,
    closed: the thread ends and closes its descriptor."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        cli._setup_logging("warning", tmp_path)
        first = [h for h in root.handlers if h not in before]
        cli._setup_logging("warning", tmp_path)
        second = [h for h in root.handlers if h not in before]
        assert len(first) == len(second) == 2
        assert not set(first) & set(second)
        stderr = next(h for h in first if isinstance(h, cli._StderrHandler))
        stderr._thread.join()
        assert stderr._fd is None
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


class _Exited(Exception):
    pass


def test_the_last_words_come_after_the_log_lines_before_them_and_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second signal's "exiting now" was printed directly, from a thread, while the
    "received SIGINT, shutting down" line logged a moment before still waited for the
    stderr thread: it came first, glued to it, or alone (the log line lost to the exit).
    It now goes through the same thread, after them, within LAST_WORDS_SECONDS. (Here
    stderr is a full pipe the test drains only once the line is told.)"""
    stderr, read_end, write_end, filled = stderr_handler_on_a_full_pipe()
    root = logging.getLogger()
    root.addHandler(stderr)
    direct = io.StringIO()
    expected = b"received SIGINT, shutting down\npunie-trio: second signal, exiting now\n"
    got = bytearray()

    def drain() -> None:
        while len(got) < filled + len(expected):
            data = os.read(read_end, filled + len(expected) - len(got))
            if not data:  # (the test is over: the handler and the test closed the pipe)
                return
            got.extend(data)

    def exit_(status: int) -> None:
        raise _Exited(status)

    monkeypatch.setattr(sys, "stderr", direct)
    monkeypatch.setattr(os, "_exit", exit_)
    drainer = threading.Thread(target=drain)
    try:
        logging.getLogger("punie_trio.test").warning("received SIGINT, shutting down")
        drainer.start()
        with pytest.raises(_Exited):
            server._exit_now("punie-trio: second signal, exiting now")
        assert direct.getvalue() == ""
        drainer.join()
    finally:
        monkeypatch.undo()
        root.removeHandler(stderr)
        stderr.close()
        os.close(write_end)
        drainer.join()
        os.close(read_end)
    assert direct.getvalue() == ""
    assert bytes(got[filled:]) == expected


def _record_syncs(monkeypatch: pytest.MonkeyPatch, module: object) -> list[tuple[str, str]]:
    """Spy on ``fsync`` and ``replace`` as ``module`` calls them: ``("fsync", path the
    descriptor names)`` and ``("replace", destination)``, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(module.os, "fsync", fsync)  # type: ignore[attr-defined]
    monkeypatch.setattr(module.os, "replace", replace)  # type: ignore[attr-defined]
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_replace_file_syncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token (and an export) was renamed into place unsynced: after a power loss the
    name could hold an empty file where the old token had been. Now the new file's data
    reaches the disk before the rename, and the directory (the rename) after it."""
    events = _record_syncs(monkeypatch, _paths)
    _paths.replace_file(tmp_path / "token", b"s3cret\n", 0o600)
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    temporary = events[0][1]
    assert Path(temporary).parent == tmp_path and Path(temporary).name.startswith(".token.")
    assert events[1:] == [("replace", str(tmp_path / "token")), ("fsync", str(tmp_path))]
    assert (tmp_path / "token").read_bytes() == b"s3cret\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_tool_write_syncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write_file`` replaces the user's file by a rename: unsynced, a power loss could
    leave the name holding an empty file instead of either version."""
    from punie_trio.worker import _tools

    (tmp_path / "f.txt").write_text("old")
    events = _record_syncs(monkeypatch, _tools)
    _tools._write_disk(tmp_path / "f.txt", (str(tmp_path),), "new")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert Path(events[0][1]).name.startswith(".punie-trio-")
    assert events[1:] == [("replace", "f.txt"), ("fsync", str(tmp_path))]
    assert (tmp_path / "f.txt").read_text() == "new"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_tool_write_into_a_file_syncs_it_before_the_call_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the file cannot be replaced (an owner or an attribute the server may not
    give a new file) it is written into: truncated, then written, and not synced, so the
    call reported "wrote N bytes" while a power loss could still leave the user's file
    empty. It is synced before the call reports now, as an editor's in-place save is."""
    from punie_trio.worker import _tools

    def cannot_replace(*args: object, **kwargs: object) -> None:
        raise _tools._CannotReplace  # (as for a file another user owns)

    (tmp_path / "f.txt").write_text("old")
    monkeypatch.setattr(_tools, "_replace", cannot_replace)
    events = _record_syncs(monkeypatch, _tools)
    _tools._write_disk(tmp_path / "f.txt", (str(tmp_path),), "new")
    assert events == [("fsync", str(tmp_path / "f.txt"))]
    assert (tmp_path / "f.txt").read_text() == "new"


def test_leftover_temporaries_are_removed_by_exact_name_only(tmp_path: Path) -> None:
    """A ``serve`` killed between creating the token's temporary file and renaming it
    (SIGKILL, a power loss) left ``.token.<16 hex digits>.tmp`` behind for good, holding a
    token. Only files of that exact name are removed, nothing else."""
    ours = [".token.0123456789abcdef.tmp", ".token.fedcba9876543210.tmp"]
    theirs = [
        ".token.tmp",
        ".token.0123456789abcde.tmp",  # 15 digits
        ".token.0123456789ABCDEF.tmp",  # (token_hex writes lower case)
        ".token.0123456789abcdeg.tmp",
        "x.token.0123456789abcdef.tmp",
        ".token.0123456789abcdef.tmp.bak",
        ".notes.0123456789abcdef.tmp",  # (not a file serve writes)
        "token",
    ]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    (tmp_path / ".token.00000000000000aa.tmp").mkdir()  # (a directory is not ours either)
    (tmp_path / ".token.00000000000000bb.tmp").symlink_to(tmp_path / "token")
    removed = _paths.remove_leftover_temporaries(tmp_path, ["token"])
    assert sorted(p.name for p in removed) == sorted([*ours, ".token.00000000000000bb.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*theirs, ".token.00000000000000aa.tmp"]
    )
    assert (tmp_path / "token").read_text() == "x"  # (the link went, not what it led to)
