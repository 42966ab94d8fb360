"""Fan-out of reload and build events to every open ``/__reload__`` stream.

Policy (bounds and what happens when a subscriber is slow):

* The broadcaster never awaits. Publishing is plain synchronous code that updates each
  subscriber's *pending* state and sets its wakeup :class:`trio.Event`, so a slow or stuck
  client can never block the build loop or another client.
* Each subscriber holds at most **one pending reload** (merged by severity: ``reload`` beats
  ``reload-css``, paths united up to :data:`~._events.MAX_PATHS`) and **one pending status**
  (the newest replaces the older: status is state, not history). That is O(1) memory per
  subscriber however far behind it is, and nothing is ever dropped: a reload the client has not
  received yet is folded into the one it will receive.
* The broadcaster keeps the last :data:`HISTORY` reload events so a client that reconnects with
  ``Last-Event-ID`` (or ``?since=``) gets what it missed, merged. A client further behind than
  that, or from another server run (its run id is not ours: generations restart at 0 each
  run, so a page from an earlier run could otherwise look up to date), gets a full reload,
  which is always correct.
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .._direct import DirectChunks
from ._events import Action, Event, ReloadEvent, StatusEvent, StatusKind, encode, merge_all

#: Reload events kept for catch-up. Older generations get a full reload instead.
HISTORY = 256


@attrs.define(eq=False)
class Subscriber:
    """One stream's pending state: at most one merged reload and one status, plus a wakeup.

    The wakeup is the writer task itself, parked with :func:`trio.lowlevel.wait_task_rescheduled`
    and rescheduled by the first offer: a broadcast to N subscribers allocates no per-subscriber
    synchronisation object (a :class:`trio.Event` per take would be N objects per broadcast that
    live until the next one, which is what drives the cyclic GC's full collections).
    """

    #: The server run's id, which the events' SSE ids carry.
    run: str = ""
    _reload: ReloadEvent | None = None
    _status: StatusEvent | None = None
    _signalled: bool = False
    #: Time of the last write to the client (Trio's clock), for the keepalive.
    last_sent: float = 0.0
    #: Set by the stream once its response has started: lets an offer write the event to
    #: the socket itself while the writer is parked (see :meth:`_write_now`).
    direct: DirectChunks | None = None
    #: An offer's chunk was only partly taken by the kernel: the socket writer keeps the
    #: rest (ahead of every later write) and the writer has it written.
    _unfinished: bool = False
    _waiter: trio.lowlevel.Task | None = attrs.field(default=None, init=False)
    _abort_fn: Callable[[object], trio.lowlevel.Abort] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._abort_fn = self._abort  # bound once: parking allocates nothing

    def offer_reload(self, event: ReloadEvent, status: StatusEvent | None = None) -> None:
        """Offer a reload (and, with ``status``, a status to go out with it, first)."""
        if self._reload is None and self._write_now(event, status):
            return
        if status is not None:
            self._status = status
        self._reload = event if self._reload is None else self._reload.merge(event)
        self._wake()

    def offer_status(self, event: StatusEvent) -> None:
        if self._write_now(event):
            return
        self._status = event
        self._wake()

    def _write_now(self, event: Event, first: StatusEvent | None = None) -> bool:
        """Write ``event`` (after ``first``) to the client here and now, if the writer is
        parked with nothing pending and the socket takes it: a broadcast then wakes no task
        per stream (what the writer would do, done without the trip through the scheduler).
        The part the kernel does not take is left to the writer, which is woken for it."""
        direct = self.direct
        if (
            direct is None
            or self._waiter is None
            or self._status is not None
            or self._reload is not None
            or self._unfinished
            or not direct.usable()
        ):
            return False
        data = encode(event, self.run)
        if first is not None:
            data = encode(first, self.run) + data
        unfinished = direct.send_chunk_now(data)
        if unfinished is None:
            return False
        self.last_sent = trio.current_time()
        if unfinished:
            self._unfinished = True
            self._wake()
        return True

    def take_unfinished(self) -> bool:
        """Whether an offer left a chunk unfinished (then have it finished first)."""
        unfinished, self._unfinished = self._unfinished, False
        return unfinished

    def wake(self) -> None:
        """Wake the writer without an event (the server is closing, or a keepalive is due)."""
        self._wake()

    def _wake(self) -> None:
        self._signalled = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    @property
    def pending(self) -> bool:
        return self._reload is not None or self._status is not None or self._unfinished

    async def wait(self) -> None:
        """Block until something was offered (or :meth:`wake`) since the last :meth:`take`.

        One task at a time. A checkpoint either way, as :meth:`trio.Event.wait` is.
        """
        if self._signalled:
            await trio.lowlevel.checkpoint()
            return
        assert self._waiter is None, "one writer per subscriber"
        self._waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_fn)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def take(self) -> list[Event]:
        """Everything pending, status first (the page may reload on the reload event)."""
        events: list[Event] = []
        if self._status is not None:
            events.append(self._status)
        if self._reload is not None:
            events.append(self._reload)
        self._status = None
        self._reload = None
        self._signalled = False
        return events


@attrs.define(eq=False)
class Broadcaster:
    """The current generation, build status and recent reloads, and the open subscribers."""

    generation: int = 0
    status: StatusEvent | None = None
    #: Identifies this server run; pages and event ids carry it with the generation.
    run: str = attrs.field(factory=lambda: secrets.token_hex(4))
    _history: collections.deque[ReloadEvent] = attrs.field(
        factory=lambda: collections.deque(maxlen=HISTORY)
    )
    _subscribers: set[Subscriber] = attrs.field(factory=set)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def building(self) -> bool:
        return self.status is not None and self.status.kind == "build_start"

    def publish_reload(
        self, action: Action, paths: tuple[str, ...], status: StatusEvent | None = None
    ) -> ReloadEvent:
        """Record a change of the output as a new generation and offer it to everyone;
        ``status`` (recorded with ``announce=False``) goes out with it, in the same write."""
        self.generation += 1
        event = ReloadEvent(action, paths, self.generation)
        self._history.append(event)
        if status is not None and self.status is not status:
            status = None  # replaced meanwhile: the newer one was announced on its own
        for subscriber in self._subscribers:
            subscriber.offer_reload(event, status)
        return event

    def publish_status(
        self,
        kind: StatusKind,
        *,
        command: str | None = None,
        exit_status: int | None = None,
        output: str = "",
        duration: float | None = None,
        announce: bool = True,
    ) -> StatusEvent:
        """Record the build's new state and offer it to everyone (with ``announce=False``,
        only record it: pages served and streams opened from now on carry it, open streams
        get it from :meth:`announce`, or never if a newer status replaces it first)."""
        event = StatusEvent(kind, self.generation, command, exit_status, output, duration)
        self.status = event
        if announce:
            self.announce(event)
        return event

    def announce(self, event: StatusEvent) -> None:
        """Offer a recorded status to every open stream, if it is still the current one."""
        if self.status is not event:
            return
        for subscriber in self._subscribers:
            subscriber.offer_status(event)

    def missed_since(self, since: int, run: str | None = None) -> ReloadEvent | None:
        """What a client that has seen generation ``since`` of ``run`` missed, merged (or
        ``None``). ``run=None``: a client that does not say, taken to be of this run."""
        if run is not None and run != self.run:
            return ReloadEvent("reload", (), self.generation)  # another run's page
        if since == self.generation:
            return None
        oldest = self._history[0].generation if self._history else self.generation + 1
        if since > self.generation or since < oldest - 1:
            # From another server run, or older than our history: a full reload is always right.
            return ReloadEvent("reload", (), self.generation)
        return merge_all(e for e in self._history if e.generation > since)

    def subscribe(self, since: int | None, run: str | None = None) -> Subscriber:
        """A new subscriber, pre-loaded with what it missed and, where useful, the status.

        A client with a page (``since`` given) always gets the current status: its page may
        show a badge or overlay from a state that ended before it connected. A fresh client
        only gets it while a build runs or after a failed one.
        """
        subscriber = Subscriber(run=self.run)
        if since is not None:
            missed = self.missed_since(since, run)
            if missed is not None:
                subscriber.offer_reload(missed)
        if self.status is not None and (since is not None or self.status.kind != "build_ok"):
            subscriber.offer_status(self.status)
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def wake_all(self) -> None:
        for subscriber in self._subscribers:
            subscriber.wake()

    def page_state(self) -> dict[str, Any]:
        """What a served page embeds: its generation, whether a build runs, the last error."""
        error = None
        if self.status is not None and self.status.kind == "build_error":
            error = self.status.data()
        return {
            "run": self.run,
            "generation": self.generation,
            "building": self.building,
            "error": error,
        }
