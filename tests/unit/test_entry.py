"""The entry point catches the signals that arrive while the CLI is still being imported
(most of start-up): one line and an exit status, not a traceback or a silent death."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from punie_trio import _entry


def _importing_gets(exc: BaseException | None, signum: int | None = None) -> Any:
    def import_module(name: str) -> Any:
        assert name == "punie_trio.cli"
        if signum is not None:
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # the handler runs between two bytecodes, soon
                pass
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
def test_sigterm_or_sighup_while_importing_exits_0_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    monkeypatch.setattr(_entry.importlib, "import_module", _importing_gets(None, signum))
    assert _entry.main() == 0
    assert capsys.readouterr().err == f"punie-trio: received {name} before starting, exiting\n"
    assert signal.getsignal(signum) is before  # the process's own handling is back


def test_the_cli_runs_once_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["punie-trio", "--version"])
    with pytest.raises(SystemExit) as done:
        _entry.main()
    assert done.value.code == 0


async def test_after_a_shutdown_signal_a_second_one_still_means_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The receiver restores the default handlers when it closes, before the store's close
    and the interpreter's exit: a second SIGTERM there killed the process by signal (143),
    where the docs promise "second signal, exiting now" (1)."""
    import trio
    import trio.testing

    from punie_trio import server

    timers: list[tuple[float, Any]] = []

    class Timer:  # the watchdog, which would os._exit this test process
        def __init__(self, timeout: float, _function: Any, args: Any) -> None:
            timers.append((timeout, args[1]))
            self.daemon = False

        def start(self) -> None:
            pass

    monkeypatch.setattr(server.threading, "Timer", Timer)
    before = {signum: signal.getsignal(signum) for signum in server.SHUTDOWN_SIGNALS}
    closing = trio.Event()
    stage = server._Stage()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._watch_signals, closing, 5.0, stage)
            await trio.testing.wait_all_tasks_blocked()
            os.kill(os.getpid(), signal.SIGTERM)
            await closing.wait()
            nursery.cancel_scope.cancel()
        assert timers == [(5.0 + server.FORCE_EXIT_GRACE, stage)]
        for signum in server.SHUTDOWN_SIGNALS:
            assert signal.getsignal(signum) is server._second_signal
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


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
