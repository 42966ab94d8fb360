"""The ``punie-trio`` command's entry point (and ``python -m punie_trio``'s): the CLI's
imports run under it.

Why: importing the CLI imports the server (Hypercorn, h2, wsproto, the ACP layers), most
of the command's start-up (about 0.25 s here). A Ctrl-C then was a ``KeyboardInterrupt``
traceback, and a SIGTERM or SIGHUP killed the process without a word, before
:func:`punie_trio.cli.main` could catch anything. Nothing has started yet, so there is
nothing to shut down: Ctrl-C exits 130 as it does until ``serve`` watches its signals;
SIGTERM and SIGHUP exit 0 for ``serve``, as its graceful shutdown does, and 128 + the
signal's number for the other commands, as the signal's default gives once they run (a
``sessions export`` stopped so had exited 0 with nothing written, which a script would
take for an empty export); each with one line on stderr.
"""

from __future__ import annotations

import importlib
import io
import signal
import sys
from collections.abc import Sequence
from types import FrameType

#: Asks to stop before the CLI is imported (SIGINT is Python's KeyboardInterrupt already).
EARLY_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class _Stopped(BaseException):  # (not caught by an import's ``except Exception``)
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


def _restore(caught: list[int]) -> None:
    """The defaults back, the signals held meanwhile: one arriving now gets the default
    (as after start-up), not a _Stopped raised out of the restoring."""
    mask = getattr(signal, "pthread_sigmask", None)  # (not on Windows)
    held = mask(signal.SIG_BLOCK, caught) if mask is not None else None
    try:
        for signum in caught:
            signal.signal(signum, signal.SIG_DFL)
    finally:
        if mask is not None and held is not None:
            mask(signal.SIG_SETMASK, held)


class _Nowhere(io.TextIOBase):
    """Where what is said on stderr goes when there is no stderr: nowhere."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


def keep_stderr_off_stdout() -> None:
    """Give ``sys.stderr`` a stand-in that drops what is written to it, if the process
    was started without a stderr (``2>&-``: Python makes ``sys.stderr`` None).

    Why: ``print(..., file=None)`` prints to stdout. Every line for the user printed to
    ``sys.stderr`` (a config warning, an error, "interrupted") then went to stdout: under
    ``serve --stdio`` into the ACP stream, a line no client can parse, and for
    ``sessions export`` into the export. (``sys.__stderr__`` stays None: the log setup and
    ``stdio_stream`` read it to know descriptor 2 is not stderr.)"""
    if sys.stderr is None:
        sys.stderr = _Nowhere()


def main(argv: Sequence[str] | None = None) -> int:
    """Import the CLI with the early signals caught, then run it (``argv``: the command
    line after the program's name, default ``sys.argv[1:]``)."""
    keep_stderr_off_stdout()
    # Only where the default would kill: an ignored SIGHUP (``nohup``) stays ignored.
    caught = [s for s in EARLY_SIGNALS if signal.getsignal(s) is signal.SIG_DFL]
    try:
        for signum in caught:
            signal.signal(signum, _stop)
        cli = importlib.import_module("punie_trio.cli")
        _restore(caught)
    except KeyboardInterrupt:
        _restore(caught)
        print("punie-trio: interrupted", file=sys.stderr)
        return 130
    except _Stopped as stopped:
        _restore(caught)
        name = signal.Signals(stopped.signum).name
        print(f"punie-trio: received {name} before starting, exiting", file=sys.stderr)
        command = sys.argv[1:] if argv is None else argv
        return 0 if command and command[0] == "serve" else 128 + stopped.signum
    except BaseException:  # (an import that failed: its traceback, under the defaults)
        _restore(caught)
        raise
    status: int = cli.main(argv)
    return status
