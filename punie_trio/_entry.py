"""The ``punie-trio`` command's entry point (and ``python -m punie_trio``'s): the CLI's
imports run under it.

Why: importing the CLI imports the server (Hypercorn, h2, wsproto, the ACP layers), most
of the command's start-up (about 0.25 s here). A Ctrl-C then was a ``KeyboardInterrupt``
traceback, and a SIGTERM or SIGHUP killed the process without a word, before
:func:`punie_trio.cli.main` could catch anything. Nothing has started yet, so there is
nothing to shut down: Ctrl-C exits 130 as it does until ``serve`` watches its signals,
SIGTERM and SIGHUP exit 0 as a graceful shutdown does, each with one line on stderr.
"""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

#: Asks to stop before the CLI is imported (SIGINT is Python's KeyboardInterrupt already).
EARLY_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


def main() -> int:
    """Import the CLI with the early signals caught, then run it."""
    previous = {signum: signal.signal(signum, _stop) for signum in EARLY_SIGNALS}
    try:
        cli = importlib.import_module("punie_trio.cli")
    except KeyboardInterrupt:
        print("punie-trio: interrupted", file=sys.stderr)
        return 130
    except _Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        print(f"punie-trio: received {name} before starting, exiting", file=sys.stderr)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    run: Callable[[], Any] = cli.main
    status: int = run()
    return status
