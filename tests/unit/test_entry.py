"""The entry point catches the signals that arrive while the CLI is still being imported
(most of start-up): one line and an exit status, not a traceback or a silent death."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from punie_trio import _entry


async def _serve_stopped_while_opening(tmp_path: Path, data: Path) -> None:
    """Run serve on ``data``, which a signal stops while it opens the store: it ends
    without listening (the GC settings serve changes are restored after)."""
    import trio

    from punie_trio import server
    from punie_trio.worker import EchoModel

    config = server.ServeConfig(projects=(tmp_path,), model=EchoModel(), port=0, data_dir=data)
    gc_threshold = gc.get_threshold()
    try:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(server.serve, config)
    finally:
        gc.unfreeze()
        gc.set_threshold(*gc_threshold)
    assert running.url is None and running.closing.is_set()


class _Timer:
    """The shutdown watchdog's ``threading.Timer``, never started (a real one would
    ``os._exit`` this test process if it fired): what serve made it with."""

    def __init__(self, timeout: float, function: Any, args: Any) -> None:
        self.timeout, self.stage, self.cancelled = timeout, args[1], False
        self.daemon = False

    def start(self) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled = True


def _fake_timers(monkeypatch: pytest.MonkeyPatch) -> list[_Timer]:
    """Make serve's watchdog timers :class:`_Timer`; the list gets each one made."""
    from punie_trio import server

    timers: list[_Timer] = []

    class Timer(_Timer):
        def __init__(self, timeout: float, function: Any, args: Any) -> None:
            super().__init__(timeout, function, args)
            timers.append(self)

    monkeypatch.setattr(server.threading, "Timer", Timer)
    return timers


def _importing_gets(exc: BaseException | None, signum: int | None = None) -> Any:
    def import_module(name: str) -> Any:
        assert name == "punie_trio.cli"
        if signum is not None:
            # (raise_signal runs the Python handler before it returns: no waiting.)
            signal.raise_signal(signum)
        if exc is not None:
            raise exc
        raise AssertionError("the signal's handler did not run")

    return import_module


def test_ctrl_c_while_importing_is_130_and_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_entry.importlib, "import_module", _importing_gets(KeyboardInterrupt()))
    assert _entry.main() == 130
    assert capsys.readouterr().err == "punie-trio: interrupted\n"


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize(
    ("argv", "serving"),
    [(["serve", "--port", "0"], True), (["sessions", "export", "s1"], False), ([], False)],
)
def test_sigterm_or_sighup_while_importing_is_one_line_and_a_status(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    argv: list[str],
    serving: bool,
) -> None:
    """0 for ``serve`` (a graceful shutdown's status); for another command the status the
    signal gives once it runs (128 + its number): a ``sessions export`` stopped so exited 0
    with nothing written."""
    signum = getattr(signal, name)
    # (The signal's default, as a command started from a terminal has it: run under
    # nohup, the test run inherits an ignored SIGHUP, which main rightly leaves ignored,
    # and these cases failed with "the signal's handler did not run".)
    inherited = signal.signal(signum, signal.SIG_DFL)
    try:
        before = signal.getsignal(signum)
        monkeypatch.setattr(_entry.importlib, "import_module", _importing_gets(None, signum))
        assert _entry.main(argv) == (0 if serving else 128 + signum)
        assert capsys.readouterr().err == f"punie-trio: received {name} before starting, exiting\n"
        assert signal.getsignal(signum) is before  # the process's own handling is back
    finally:
        signal.signal(signum, inherited)


def test_an_imports_except_exception_does_not_swallow_the_signal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def import_module(name: str) -> Any:
        try:  # (as some modules guard optional imports)
            signal.raise_signal(signal.SIGTERM)
        except Exception:  # pragma: no cover - the bug
            pass
        raise AssertionError("the import went on")

    monkeypatch.setattr(_entry.importlib, "import_module", import_module)
    assert _entry.main(["serve"]) == 0
    assert "received SIGTERM before starting" in capsys.readouterr().err


def test_an_ignored_sighup_stays_ignored_while_importing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under nohup (SIGHUP ignored) a hang-up during the import stopped the command."""
    ran: list[bool] = []

    class Cli:
        @staticmethod
        def main(argv: Any = None) -> int:
            ran.append(True)
            return 0

    def import_module(name: str) -> Any:
        signal.raise_signal(signal.SIGHUP)
        return Cli

    monkeypatch.setattr(_entry.importlib, "import_module", import_module)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert _entry.main() == 0
        assert ran == [True] and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_the_cli_runs_once_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["punie-trio", "--version"])
    with pytest.raises(SystemExit) as done:
        _entry.main()
    assert done.value.code == 0


async def test_a_signal_driven_shutdown_leaves_no_watchdog_nor_handlers_behind(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve is public: a program running it in-process lives on after it returns. The
    watchdog of a signal-driven shutdown was never cancelled (it ended the host with
    os._exit a few seconds later), and a second signal must end only a running shutdown."""
    import trio
    import trio.testing

    from punie_trio import server
    from punie_trio.worker import EchoModel

    timers = _fake_timers(monkeypatch)
    before = {signum: signal.getsignal(signum) for signum in server.SHUTDOWN_SIGNALS}
    config = server.ServeConfig(
        projects=(tmp_path,), model=EchoModel(), port=0, shutdown_timeout=5.0
    )
    gc_threshold = gc.get_threshold()
    try:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(server.serve, config)
            os.kill(os.getpid(), signal.SIGTERM)
            await running.closing.wait()
    finally:
        # (serve with handle_signals, as the CLI runs it, freezes and tunes the collector
        # for the process: not for the rest of this test run.)
        gc.unfreeze()
        gc.set_threshold(*gc_threshold)
    (watchdog,) = timers
    assert watchdog.timeout == 5.0 + server.FORCE_EXIT_GRACE and watchdog.cancelled
    assert {signum: signal.getsignal(signum) for signum in server.SHUTDOWN_SIGNALS} == before


def test_the_watchdog_says_what_the_shutdown_was_doing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It blamed a client that stopped reading even while the store's final checkpoint
    ran (a large WAL on a slow disk)."""
    from punie_trio import server

    exits: list[int] = []
    monkeypatch.setattr(server.os, "_exit", exits.append)
    server._force_exit(6.0, server._Stage("closing the session store"))
    assert exits == [1]
    assert capsys.readouterr().err == (
        "punie-trio: shutdown did not finish within 6 s (closing the session store), exiting now\n"
    )


def test_the_defaults_come_back_where_signals_cannot_be_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows has no pthread_sigmask: the entry point crashed every command there."""
    monkeypatch.delattr(signal, "pthread_sigmask")
    monkeypatch.setattr("sys.argv", ["punie-trio", "--version"])
    with pytest.raises(SystemExit) as done:
        _entry.main()
    assert done.value.code == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_a_signal_during_the_start_up_check_stops_it_and_serve_ends_cleanly(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's start-up check reads the whole file (10.4 s for 618 MB from the disk)
    and could not be stopped: a SIGTERM then waited for it, and past the shutdown
    timeout the watchdog ended serve, status 1, blaming "a client stopped reading?".
    Now the signal interrupts the check, and serve ends as for a signal a moment later:
    nothing served, no watchdog left, the store as it was (and checked at the next
    start: no marker of a clean close)."""

    from ..store.test_sqlite_store import _fill, slow_check

    timers = _fake_timers(monkeypatch)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store = data / "sessions.sqlite3"
    await _fill(store, sessions=1, turns=3)
    (data / "sessions.sqlite3-closed").unlink()  # (as a kill -9 leaves it)
    before = store.read_bytes()
    ended = slow_check(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    await _serve_stopped_while_opening(tmp_path, data)
    assert len(ended) == 1 and str(ended[0]) == "interrupted"
    (watchdog,) = timers
    assert watchdog.cancelled
    assert store.read_bytes() == before
    assert not (data / "sessions.sqlite3-closed").exists()


async def test_a_signal_during_a_migration_stops_it_and_serve_ends_cleanly(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old store's upgrade takes seconds (11 s for 100,000 turns from version 1) and
    could not be stopped: a SIGTERM then waited for it, and past the shutdown timeout the
    watchdog ended serve, status 1 (`shutdown did not finish within 7 s (opening the
    session store)`). Now the signal interrupts the migration, which is rolled back, and
    serve ends as for a signal a moment later: the store still at its old version, to be
    upgraded at the next start."""
    import sqlite3

    from ..store.test_sqlite_store import _v2_file, slow_migration

    timers = _fake_timers(monkeypatch)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store = data / "sessions.sqlite3"
    _v2_file(store).close()
    before = store.read_bytes()
    ended = slow_migration(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    await _serve_stopped_while_opening(tmp_path, data)
    assert len(ended) == 1 and str(ended[0]) == "interrupted"
    (watchdog,) = timers
    assert watchdog.cancelled
    assert store.read_bytes() == before
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


async def test_serve_watches_its_signals_before_the_store_opens(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal watcher was started with ``start_soon``, and the store's open ran first:
    it hands the start-up check to the store's thread before its task yields, so a
    signal as the check began met the system's default (the test above, which sends one
    there, killed the test run with SIGTERM in 9 of 40 runs). The watcher is now in
    place before the store is opened."""
    import trio

    from punie_trio import server
    from punie_trio.worker import EchoModel

    timers = _fake_timers(monkeypatch)
    before = {signum: signal.getsignal(signum) for signum in server.SHUTDOWN_SIGNALS}
    watched_at_open: list[dict[int, bool]] = []
    open_store = server.open_sqlite_store

    def opening(path: Any) -> Any:
        watched_at_open.append(
            {signum: signal.getsignal(signum) is not before[signum] for signum in before}
        )
        return open_store(path)

    monkeypatch.setattr(server, "open_sqlite_store", opening)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config = server.ServeConfig(projects=(tmp_path,), model=EchoModel(), port=0, data_dir=data)
    gc_threshold = gc.get_threshold()
    try:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(server.serve, config)
            running.closing.set()
    finally:
        gc.unfreeze()
        gc.set_threshold(*gc_threshold)
    assert watched_at_open == [{signum: True for signum in before}]
    assert not timers
    assert {signum: signal.getsignal(signum) for signum in server.SHUTDOWN_SIGNALS} == before
