"""Trio's "accept returned EMFILE ... retrying" error, logged once per
:data:`ACCEPT_ERROR_LOG_EVERY` seconds with a count of the ones left out, not ten times a
second.

Why: when the process runs out of file descriptors (or the system of memory for sockets),
``trio.serve_listeners``, under Hypercorn, logs the failed ``accept`` with its traceback
and retries every 0.1 s: an audit that exhausted the descriptors got ten tracebacks a
second on stderr and in the log file for as long as it lasted, burying everything else.

:func:`install` adds :class:`AcceptErrorFilter` to the ``trio.serve_listeners`` logger
(idempotent), for the whole process; that logger logs nothing else. Its state (when it
last let a record through, how many it has left out since) is kept per Trio run, on that
run's clock, so servers in several runs of one process (tests) do not share it.
"""

from __future__ import annotations

import logging

import attrs
import trio

#: The logger ``trio.serve_listeners`` reports failed accepts to.
LOGGER_NAME = "trio.serve_listeners"
#: Seconds between two logged accept errors; those in between are counted.
ACCEPT_ERROR_LOG_EVERY = 10.0


@attrs.define
class _Window:
    next_at: float = float("-inf")
    left_out: int = 0


_window: trio.lowlevel.RunVar[_Window] = trio.lowlevel.RunVar("punie_trio_accept_errors")


class AcceptErrorFilter(logging.Filter):
    """Lets one record through per :data:`ACCEPT_ERROR_LOG_EVERY` seconds of the Trio
    run's clock; the next one let through says how many were left out. Outside a Trio run
    it lets everything through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            now = trio.current_time()
        except RuntimeError:
            return True
        try:
            window = _window.get()
        except LookupError:
            window = _Window()
            _window.set(window)
        if now < window.next_at:
            window.left_out += 1
            return False
        if window.left_out:
            record.msg = (
                f"{record.getMessage()} ({window.left_out} more like it since the last one logged)"
            )
            record.args = None
            window.left_out = 0
        window.next_at = now + ACCEPT_ERROR_LOG_EVERY
        return True


def install() -> None:
    """Rate-limit the failed-accept log (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, AcceptErrorFilter) for f in logger.filters):
        logger.addFilter(AcceptErrorFilter())
