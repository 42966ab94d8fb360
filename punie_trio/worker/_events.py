"""A turn's event channel: one producer (the turn, in its worker), one consumer (its relay,
in the manager), bounded.

Why not ``trio.open_memory_channel``: every prompt opens one. A trio channel pair is a state
object with a ``deque`` and two ``OrderedDict``s of waiting tasks (for any number of senders
and receivers, clones, statistics) behind two channel objects; opening one took 3.8 us on
the benchmark machine, and its send and receive paths showed up at 5-7% of the server's CPU
at 100 clients. A turn has exactly one sender and one receiver, so the waiting tasks are two
slots here. The semantics are trio's, for the operations a turn and its relay use:

- ``send_nowait`` raises ``trio.WouldBlock`` when full, ``trio.BrokenResourceError`` once the
  receiver is closed, ``trio.ClosedResourceError`` once the sender is; ``send`` waits for
  room (backpressure: a slow client's relay slows only its own turn).
- ``receive_nowait`` raises ``trio.WouldBlock`` when empty and ``trio.EndOfChannel`` once the
  sender is closed and everything sent was received; ``receive`` waits.
- ``send`` and ``receive`` are checkpoints, as trio's are. ``close`` is idempotent on
  either side.

The sender side is what :class:`~punie_trio.worker.StartTurn` carries; its type there is the
:class:`EventSink` protocol, which a trio ``MemorySendChannel`` satisfies too.
"""

from __future__ import annotations

import collections
from typing import Generic, Protocol, TypeVar

import outcome
import trio

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class EventSink(Protocol[T_contra]):
    """What a turn needs of its event channel (a trio ``MemorySendChannel`` will do)."""

    def send_nowait(self, value: T_contra) -> None: ...

    async def send(self, value: T_contra) -> None: ...

    def close(self) -> None: ...


class _State(Generic[T]):
    __slots__ = (
        "items",
        "limit",
        "receive_closed",
        "receiver",
        "send_closed",
        "sender",
        "sender_item",
    )

    def __init__(self, limit: int) -> None:
        self.items: collections.deque[T] = collections.deque()
        self.limit = limit
        self.receiver: trio.lowlevel.Task | None = None  # waiting in receive()
        self.sender: trio.lowlevel.Task | None = None  # waiting in send() with sender_item
        self.sender_item: T | None = None
        self.send_closed = False
        self.receive_closed = False


def open_event_channel(limit: int) -> tuple[EventSender[T], EventReceiver[T]]:
    """A channel holding at most ``limit`` (>= 1) events not yet received."""
    if limit < 1:
        raise ValueError("an event channel holds at least one event")
    state: _State[T] = _State(limit)
    return EventSender(state), EventReceiver(state)


class EventSender(Generic[T]):
    """The turn's side."""

    __slots__ = ("_state",)

    def __init__(self, state: _State[T]) -> None:
        self._state = state

    def send_nowait(self, value: T) -> None:
        state = self._state
        if state.send_closed:
            raise trio.ClosedResourceError("event channel is closed")
        if state.receive_closed:
            raise trio.BrokenResourceError("the receiver is gone")
        receiver = state.receiver
        if receiver is not None:
            state.receiver = None
            trio.lowlevel.reschedule(receiver, outcome.Value(value))
        elif len(state.items) < state.limit:
            state.items.append(value)
        else:
            raise trio.WouldBlock

    async def send(self, value: T) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.send_nowait(value)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        state = self._state
        if state.sender is not None:
            raise trio.BusyResourceError("another task is sending on this event channel")
        state.sender = trio.lowlevel.current_task()
        state.sender_item = value

        def abort(_: object) -> trio.lowlevel.Abort:
            state.sender = None
            state.sender_item = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        state = self._state
        if state.send_closed:
            return
        state.send_closed = True
        if state.sender is not None:
            sender, state.sender, state.sender_item = state.sender, None, None
            trio.lowlevel.reschedule(sender, outcome.Error(trio.ClosedResourceError()))
        if state.receiver is not None:  # waiting, so nothing is queued
            receiver, state.receiver = state.receiver, None
            trio.lowlevel.reschedule(receiver, outcome.Error(trio.EndOfChannel()))


class EventReceiver(Generic[T]):
    """The relay's side."""

    __slots__ = ("_state",)

    def __init__(self, state: _State[T]) -> None:
        self._state = state

    def receive_nowait(self) -> T:
        state = self._state
        if state.receive_closed:
            raise trio.ClosedResourceError("event channel is closed")
        if state.items:
            value = state.items.popleft()
            sender = state.sender
            if sender is not None:  # there is room now: its event joins the queue
                state.items.append(state.sender_item)  # type: ignore[arg-type]
                state.sender, state.sender_item = None, None
                trio.lowlevel.reschedule(sender)
            return value
        if state.send_closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            value = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return value
        state = self._state
        if state.receiver is not None:
            raise trio.BusyResourceError("another task is receiving on this event channel")
        state.receiver = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            state.receiver = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def close(self) -> None:
        state = self._state
        if state.receive_closed:
            return
        state.receive_closed = True
        state.items.clear()
        if state.sender is not None:
            sender, state.sender, state.sender_item = state.sender, None, None
            trio.lowlevel.reschedule(sender, outcome.Error(trio.BrokenResourceError()))
        if state.receiver is not None:
            receiver, state.receiver = state.receiver, None
            trio.lowlevel.reschedule(receiver, outcome.Error(trio.ClosedResourceError()))
