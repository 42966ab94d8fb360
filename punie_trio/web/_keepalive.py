"""A keep-alive timer for Hypercorn's trio connections that starts no task per request.

Why: Hypercorn's ``TCPServer`` closes an HTTP/1.1 connection that stays idle for
``keep_alive_timeout`` with a ``TrioSingleTask``: every time the connection goes idle (each
response finished) it cancels the previous timer task and starts a new one with
``nursery.start``, and every request that begins cancels it again. On a keep-alive
connection that is a task start, two cancellations and a lock per request: about 15% of the
dev app's CPU when it serves a small page (py-spy, 16 keep-alive clients).

:class:`KeepAliveTimer` has the same two methods (``restart``, ``stop``) and the same
behaviour, with one watcher task for the connection's whole life: going idle moves the
deadline of the scope the watcher waits in, a request starting moves it to infinity. Neither
starts a task, cancels anything or checkpoints.

Behaviour kept from Hypercorn's ``TCPServer._idle_timeout``: an idle connection is closed
once ``keep_alive_timeout`` passes without a new request, or at once when the worker
terminates (shutdown); a connection with a request running is never closed by the timer,
and one that is busy when the worker terminates is closed as soon as it goes idle.

Resource handling: the watcher lives in the connection's task group (as Hypercorn's timer
task did) and ends when it closes the connection or when :meth:`KeepAliveTimer.close` is
called because the connection closed otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio


class _Connection(Protocol):
    """What the timer needs from Hypercorn's ``TCPServer``."""

    config: Any
    context: Any

    async def _initiate_server_close(self) -> None: ...


class KeepAliveTimer:
    """Drop-in for the ``TrioSingleTask`` Hypercorn's ``TCPServer`` uses as ``idle_task``."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._scope: trio.CancelScope | None = None
        self._idle = False
        self._closed = False
        #: The watcher was ended by :meth:`retire`; a later :meth:`restart` starts a new one.
        self._retired = False
        #: Set when the connection goes idle, while the watcher waits for that.
        self._went_idle: trio.Event | None = None

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        """The connection is idle: (re)start the countdown. ``action`` is Hypercorn's own
        ``_idle_timeout``, whose behaviour the watcher reproduces; it is not called."""
        self._idle = True
        deadline = trio.current_time() + self._connection.config.keep_alive_timeout
        if self._scope is None or self._retired:
            self._retired = False
            self._scope = trio.CancelScope(deadline=deadline)
            task_group._nursery.start_soon(self._watch, self._scope)
        else:
            self._scope.deadline = deadline
        if self._went_idle is not None:
            self._went_idle.set()
            self._went_idle = None

    async def stop(self) -> None:
        """A request is running: no countdown until the connection is idle again."""
        self._idle = False
        if self._scope is not None:
            self._scope.deadline = math.inf

    def retire(self) -> None:
        """The connection became a WebSocket and will not be idle again: end the watcher
        now rather than keep a parked task (about 2 KiB) for the connection's life."""
        if self._scope is not None and not self._retired:
            self._retired = True
            self._scope.cancel()
        if self._went_idle is not None:
            self._went_idle.set()
            self._went_idle = None

    def close(self) -> None:
        """The connection closed some other way: end the watcher without closing again."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        if self._went_idle is not None:
            self._went_idle.set()

    async def _watch(self, scope: trio.CancelScope) -> None:
        terminated = self._connection.context.terminated
        while True:
            with scope:
                await terminated.wait()
            if self._closed or self._retired or self._scope is not scope:
                return  # closed, retired, or retired and replaced by a newer watcher
            if self._idle:
                if terminated.is_set() or trio.current_time() >= scope.deadline:
                    break  # idle for keep_alive_timeout, or the worker is terminating
                # The deadline fired, but a request came and went before we ran, and the
                # countdown started again: keep counting.
                self._scope = scope = trio.CancelScope(deadline=scope.deadline)
                continue
            # A request began as the deadline passed, or the worker is terminating while a
            # request runs: wait until the connection is idle again, then look again (a
            # terminating worker closes it at once then).
            self._scope = scope = trio.CancelScope()
            self._went_idle = trio.Event()
            await self._went_idle.wait()  # (close() and retire() cancel the new scope: we return)
        with trio.CancelScope(shield=True):
            await self._connection._initiate_server_close()
