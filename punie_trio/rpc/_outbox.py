"""``Outbox``: the bounded queue between a peer's senders and its one writer task.

Why not a memory channel: a connection holds its outbox for as long as it is open, idle or
not, and a ``trio.open_memory_channel`` pair costs about 2 KiB (its state, a ``deque``, two
``OrderedDict``s of waiting tasks and the two channel objects). An idle connection's outbox
here is a list and five slots (its two bounds, its byte count, the closed flag, the taker);
the parking lot for senders waiting on a full outbox is made only when one has to wait. It
also suits the writer better: :meth:`take` hands over everything queued at once.

The bound is in messages and in bytes: a count alone let a client that stops reading pin
256 messages of any size (an audit: 120 answers of 1 MiB, 300 MB held for one
connection). Bytes are what the queued texts take in memory (``sys.getsizeof``: a byte per
character for ASCII text, two or four for others), read in O(1).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import trio

_size = sys.getsizeof

#: The default byte budget of a connection's outbox (``--outbox-bytes``): far above what a
#: client that reads keeps queued (a streamed turn's updates are a few hundred bytes each,
#: and the writer takes everything queued at each pass), and 256 connections that all
#: stop reading hold at most 256 MiB of it.
OUTBOX_BYTES = 1024 * 1024


class LimitObserver(Protocol):
    """What an outbox tells of its bound being hit (the peer's ``PeerObserver``)."""

    def limit_hit(self, limit: str) -> None: ...


class Outbox:
    """A FIFO of message texts holding at most ``limit`` messages and, but for one
    message, ``byte_limit`` bytes: many senders, one taker.

    Senders wait while it is full (backpressure): ``limit`` messages queued, or
    ``byte_limit`` bytes or more (a message is queued while there are fewer, so one larger
    than the budget still goes, alone). :meth:`close` ends it: waiting and later senders
    get :class:`trio.ClosedResourceError`; the taker still gets what was queued, then
    :class:`trio.EndOfChannel`.
    """

    __slots__ = (
        "_byte_limit",
        "_bytes",
        "_closed",
        "_items",
        "_limit",
        "_senders",
        "_taker",
        "observer",
    )

    def __init__(self, limit: int, byte_limit: int = sys.maxsize) -> None:
        if limit < 1 or byte_limit < 1:
            raise ValueError("an outbox holds at least one message")
        self._limit = limit
        self._byte_limit = byte_limit
        #: The size of what is queued (reset to 0 whenever the outbox empties).
        self._bytes = 0
        self._items: list[str | bytes] = []
        self._closed = False
        self._taker: trio.lowlevel.Task | None = None
        self._senders: trio.lowlevel.ParkingLot | None = None
        #: Told ``limit_hit("outbox")`` as a producer starts to wait for room (its client
        #: does not read fast enough): only then, so the common case pays nothing. (The
        #: peer's observer itself: a callback made for it would cost each connection.)
        self.observer: LimitObserver | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def full(self) -> bool:
        """Senders would wait: ``limit`` messages, or ``byte_limit`` bytes, are queued."""
        return len(self._items) >= self._limit or self._bytes >= self._byte_limit

    def queued_bytes(self) -> int:
        """The size of what is queued (see the module's docstring)."""
        return self._bytes

    def send_nowait(self, text: str) -> None:
        """Queue ``text``, or raise :class:`trio.WouldBlock` when full."""
        if self._closed:
            raise trio.ClosedResourceError("outbox is closed")
        if self.full:
            raise trio.WouldBlock
        self.force(text)

    def send_some_nowait(self, texts: Sequence[str], start: int = 0) -> int:
        """Queue ``texts[start:]`` in order while there is room, as :meth:`send_nowait`
        of each would; return how many were queued (0 when full).

        Why: a ``session/load`` queues 19,000 replayed notifications for 1,000 turns, and
        a call (and a coroutine, in the peer) per message cost more than the queueing."""
        if self._closed:
            raise trio.ClosedResourceError("outbox is closed")
        items, limit, byte_limit = self._items, self._limit, self._byte_limit
        size = self._bytes
        index, count = start, len(texts)
        while index < count and len(items) < limit and size < byte_limit:
            text = texts[index]
            items.append(text)
            size += _size(text)
            index += 1
        self._bytes = size
        self.wake()
        return index - start

    def force(self, text: str, *, wake: bool = True, at: int | None = None) -> None:
        """Queue ``text`` even when full (answers to requests running here: their number
        is bounded by the peer's request limit, and a finished request must not wait).

        ``wake=False`` leaves a waiting taker waiting: the caller then either writes the
        queue itself (:meth:`taker_waiting`, :meth:`take_now`) or calls :meth:`wake`, in
        the same scheduler step. ``at``: queued at that index, behind what was queued
        before it and ahead of what came since (see ``Peer.answer_now``'s ``at``)."""
        if self._closed:
            raise trio.ClosedResourceError("outbox is closed")
        if at is None:
            self._items.append(text)
        else:
            self._items.insert(at, text)
        self._bytes += _size(text)
        if wake and self._taker is not None:
            task, self._taker = self._taker, None
            trio.lowlevel.reschedule(task)

    @property
    def taker_waiting(self) -> bool:
        """The taker waits in :meth:`take` (so nothing taken is being written)."""
        return self._taker is not None

    def wake(self) -> None:
        """Wake a waiting taker if anything is queued (after ``force(..., wake=False)``)."""
        if self._taker is not None and self._items:
            task, self._taker = self._taker, None
            trio.lowlevel.reschedule(task)

    def peek(self) -> list[str | bytes]:
        """What is queued, in order, left queued (see :meth:`take_now`)."""
        return self._items

    def take_now(self, count: int) -> None:
        """Drop the first ``count`` items, which the caller has written itself while the
        taker waited (it keeps waiting). Senders waiting for room are woken."""
        size = sum(map(_size, self._items[:count]))
        del self._items[:count]
        self._dropped(size)
        if self._senders is not None:
            self._senders.unpark(count=count)

    def withdraw(self, text: str) -> bool:
        """Take ``text`` (that very object) out of the queue if the taker has not taken it
        yet; False if it has (it is written, or being written), or it was never queued.
        Senders waiting for room are woken.

        Why: a request of the peer's abandoned while it still waits here (behind what a
        slow client has not read) is one the client has never seen; sent all the same,
        with a ``$/cancel_request`` after it, the client showed what no one awaited (a
        permission dialog), and the cancel went past the bound. Only on such a
        cancellation: a scan of at most the queue, which the common case never pays."""
        items = self._items
        for index in range(len(items) - 1, -1, -1):  # (it was queued lately: from the end)
            if items[index] is text:
                del items[index]
                self._dropped(_size(text))
                if self._senders is not None:
                    self._senders.unpark(count=1)
                return True
        return False

    def put_front(self, data: str | bytes) -> None:
        """Queue ``data`` ahead of everything and wake the taker (the peer's marker: finish
        a write begun with :meth:`take_now`)."""
        if self._closed:
            raise trio.ClosedResourceError("outbox is closed")
        self._items.insert(0, data)
        self._bytes += _size(data)
        self.wake()

    def put_back(self, items: Sequence[str]) -> None:
        """Queue ``items``, just taken, ahead of everything again, waking no one (the
        taker's own, for a batch it must not write yet: see ``Peer.hold_writing``)."""
        self._items[:0] = items
        self._bytes += sum(map(_size, items))

    async def send(self, text: str) -> None:
        """Queue ``text``, waiting while the outbox is full. Always a checkpoint."""
        await trio.lowlevel.checkpoint_if_cancelled()
        told = False
        while True:
            try:
                self.send_nowait(text)
            except trio.WouldBlock:
                if not told and self.observer is not None:
                    told = True
                    self.observer.limit_hit("outbox")
                await self._wait_for_taker()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return

    async def wait_for_room(self) -> None:
        """Wait until a sender would not wait (or the outbox is closed): for a producer
        about to :meth:`force` messages that must not wait once queued (a finished turn's
        last updates, with its answer).

        No checkpoint while there is room, the common case: a turn's answer then leaves in
        the scheduler step of its commit, not one later (a trip through the scheduler per
        answer, which every prompt would pay). The caller makes its own."""
        if self.full and not self._closed:
            if self.observer is not None:
                self.observer.limit_hit("outbox")
            while self.full and not self._closed:
                await self._wait_for_taker()

    async def _wait_for_taker(self) -> None:
        """Park until the taker takes something (or the outbox closes)."""
        if self._senders is None:
            self._senders = trio.lowlevel.ParkingLot()
        await self._senders.park()

    async def take(self, most: int) -> list[str | bytes]:
        """Everything queued, up to ``most`` messages and (but for the first) the byte
        budget, waiting until there is something. Raises :class:`trio.EndOfChannel` once
        closed and drained. One taker at a time."""
        if self._taker is not None:
            raise trio.BusyResourceError("another task is taking from this outbox")
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._items:
            if self._closed:
                raise trio.EndOfChannel
            self._taker = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._taker = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        items = self._items
        if len(items) <= most and self._bytes <= self._byte_limit:
            self._items = []
            self._bytes = 0
        else:
            # Messages queued past the bounds (answers) leave in batches of the bounds
            # too: what the writer holds while it writes is bounded like the queue.
            count, size, budget = 0, 0, self._byte_limit
            for item in items[:most]:
                if count and size + _size(item) > budget:
                    break
                count += 1
                size += _size(item)
            self._items = items[count:]
            items = items[:count]
            self._dropped(size)
        if self._senders is not None:
            self._senders.unpark(count=len(items))
        return items

    def unsent(self) -> list[str]:
        """Take what is still queued, once closed and its taker gone: messages no one
        wrote (markers left out). The caller may deliver them another way."""
        if not self._closed or self._taker is not None:
            return []
        items, self._items = self._items, []
        self._bytes = 0
        return [item for item in items if isinstance(item, str)]

    def _dropped(self, size: int) -> None:
        """Account for items of ``size`` bytes, just taken out of the queue."""
        self._bytes = max(0, self._bytes - size) if self._items else 0

    def close(self) -> None:
        """End the outbox (idempotent): wake the taker and every waiting sender."""
        if self._closed:
            return
        self._closed = True
        if self._taker is not None:
            task, self._taker = self._taker, None
            trio.lowlevel.reschedule(task)
        if self._senders is not None:
            self._senders.unpark_all()
