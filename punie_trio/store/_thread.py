"""``OwnerThread``: one thread that owns a resource and runs jobs on it, for Trio callers.

Why a dedicated thread and not ``trio.to_thread.run_sync`` under ``CapacityLimiter(1)``:
``sqlite3`` objects are bound to the thread that made them. ``to_thread`` picks any idle
worker from Trio's cache, so it would need ``check_same_thread=False`` and an argument that
the limiter serialises every access, including ``close()``. Here the connection is created,
used and closed by one thread, so sqlite3's own thread check stays on as a tripwire; jobs
run strictly in submission order (FIFO, one at a time); and store traffic never competes
with other ``to_thread`` users for the default limiter's 40 tokens.

How a Trio task waits: it puts ``(job, task, token)`` on a ``queue.SimpleQueue`` and parks
with ``wait_task_rescheduled``; the thread runs the job, captures its outcome and hands it
back with ``token.run_sync_soon(reschedule, task, outcome)``. ``run_sync_soon`` callbacks
only run once the Trio loop regains control, i.e. after the task has parked, so the wake-up
cannot be lost. The park's abort function answers ``Abort.FAILED``: a cancelled caller keeps
waiting until its job has finished (``abandon_on_cancel=False`` semantics) and sees
``Cancelled`` at its next checkpoint. A job is therefore never half-observed: it is either
not submitted (the caller was cancelled before) or it ran to completion, committed or
rolled back, before the caller moves on.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

R = TypeVar("R")
T = TypeVar("T")

# A job, and where its outcome goes: a callback run on the Trio thread (through the token),
# or nowhere (posted jobs; their errors are logged).
_Job = tuple[
    Callable[[Any], Any],
    "trio.lowlevel.TrioToken | None",
    "Callable[[outcome.Outcome[Any]], object] | None",
]
_STOP = None

log = logging.getLogger(__name__)


class Started(Generic[T]):
    """The result-to-be of :meth:`OwnerThread.start`."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._outcome: outcome.Outcome[T] | None = None

    def set(self, result: outcome.Outcome[T]) -> None:  # on the Trio thread
        self._outcome = result
        self._done.set()

    @property
    def ended(self) -> bool:
        """Whether the job has ended (its outcome delivered to the Trio thread)."""
        return self._done.is_set()

    async def wait(self) -> None:
        """Wait for the job to end, leaving its outcome alone (any number of tasks may
        wait; only one may take :meth:`result`)."""
        await self._done.wait()

    async def result(self) -> T:
        """Wait for the job; return its value or raise its exception (once)."""
        await self._done.wait()
        assert self._outcome is not None
        return self._outcome.unwrap()


class OwnerThread(Generic[R]):
    """Runs ``job(resource)`` callables on a private thread that created ``resource``.

    ``open`` builds the resource on the thread; ``close`` runs a final job there and ends
    the thread. Calls after ``close`` has started raise ``RuntimeError``.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._resource: R | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def closing(self) -> bool:
        return self._closing

    def _main(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job, token, deliver = item
            result = outcome.capture(job, self._resource)
            if token is not None and deliver is not None:
                token.run_sync_soon(deliver, result)
            elif isinstance(result, outcome.Error):  # posted: nobody waits for it
                log.error("background job on %s failed", self._thread.name, exc_info=result.error)

    def start(self, job: Callable[[R], T]) -> Started[T]:
        """Queue ``job(resource)`` and return at once; ``await started.result()`` later.

        For read-ahead: the thread runs the job while the caller does something else. If
        nobody awaits the result, the job still runs and its result is dropped.
        """
        if self._closing:
            raise RuntimeError("owner thread is closed")
        started: Started[T] = Started()
        self._jobs.put((job, trio.lowlevel.current_trio_token(), started.set))
        return started

    def post(self, job: Callable[[R], object]) -> None:
        """Queue ``job(resource)`` without waiting for it (its errors are logged). It runs
        after the jobs queued before it; ignored once :meth:`close` has started."""
        if not self._closing:
            self._jobs.put((job, None, None))

    async def open(
        self, factory: Callable[[], R], *, on_cancel: Callable[[], object] | None = None
    ) -> None:
        """Create the resource on the owner thread (an exception propagates here).

        ``on_cancel`` is called (on the Trio thread) if the caller is cancelled while the
        factory runs: the caller still waits for it to end, so the factory must see the
        request and end soon (the store's start-up check reads a whole file, 10 s for
        600 MB from the disk, and is stopped so).
        """

        def build(_: object) -> None:
            self._resource = factory()

        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing:
            raise RuntimeError("owner thread is closed")
        await self._submit(build, on_cancel)

    async def run(self, job: Callable[[R], T]) -> T:
        """Run ``job(resource)`` on the owner thread and return its result.

        Cancellation is honoured only before the job is queued; once queued, the caller
        waits for it to finish (see the module docstring).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing:
            raise RuntimeError("owner thread is closed")
        return await self._submit(job)

    async def _submit(
        self, job: Callable[[R], T], on_cancel: Callable[[], object] | None = None
    ) -> T:
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        self._jobs.put((job, token, functools.partial(trio.lowlevel.reschedule, task)))

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            if on_cancel is not None:
                on_cancel()  # (the job is told; the caller still waits for it to end)
            return trio.lowlevel.Abort.FAILED

        # No await between put() and the park: the wake-up is queued behind our parking.
        value: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return value

    async def close(self, final: Callable[[R], None]) -> None:
        """Run ``final(resource)`` after every job already queued, then stop the thread.

        Idempotent, and not interruptible by cancellation: it is cleanup, and a
        half-closed owner thread would leak an open database.
        """
        if self._closing:
            return
        self._closing = True
        try:
            if self._resource is not None:
                await self._submit(final)
        finally:
            self._resource = None
            self._jobs.put(_STOP)
            # The thread's last act was handing us our result; it is (about to be) done.
            self._thread.join()
