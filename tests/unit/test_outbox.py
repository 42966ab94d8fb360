"""Outbox: the bounded FIFO between a peer's senders and its writer."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from punie_trio.rpc._outbox import Outbox


async def test_fifo_and_take_hands_over_everything_up_to_most() -> None:
    box = Outbox(10)
    for i in range(5):
        box.send_nowait(str(i))
    assert await box.take(3) == ["0", "1", "2"]
    assert await box.take(10) == ["3", "4"]
    assert len(box) == 0


async def send_waits_for_a_take(box: Outbox, message: str, oldest: str) -> None:
    """On the full ``box``, ``send(message)`` waits (backpressure) until a take of one,
    which gets ``oldest``, makes room; then it has queued it."""
    sent = False

    async def sender() -> None:
        nonlocal sent
        await box.send(message)
        sent = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent  # backpressure: it waits
        assert await box.take(1) == [oldest]
    assert sent


async def test_full_outbox_would_block_and_send_waits_for_room() -> None:
    box = Outbox(2)
    box.send_nowait("a")
    box.send_nowait("b")
    with pytest.raises(trio.WouldBlock):
        box.send_nowait("c")
    await send_waits_for_a_take(box, "c", "a")
    assert await box.take(10) == ["b", "c"]


async def test_taker_waits_for_the_first_message() -> None:
    box = Outbox(4)
    got: list[str] = []

    async def taker() -> None:
        got.extend(await box.take(4))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        box.send_nowait("x")
    assert got == ["x"]


async def test_close_drains_then_ends_and_refuses_senders() -> None:
    box = Outbox(1)
    box.send_nowait("last")
    refused: list[type[BaseException]] = []

    async def blocked_sender() -> None:
        try:
            await box.send("never")
        except trio.ClosedResourceError as exc:
            refused.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
        box.close()  # idempotent
    assert refused == [trio.ClosedResourceError]
    with pytest.raises(trio.ClosedResourceError):
        box.send_nowait("late")
    assert await box.take(5) == ["last"]
    with pytest.raises(trio.EndOfChannel):
        await box.take(5)


async def test_close_wakes_a_waiting_taker() -> None:
    box = Outbox(1)
    async with trio.open_nursery() as nursery:

        async def taker() -> None:
            with pytest.raises(trio.EndOfChannel):
                await box.take(1)

        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        box.close()


async def test_cancelled_taker_leaves_no_trace_and_one_taker_at_a_time() -> None:
    box = Outbox(2)
    with trio.move_on_after(1) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.take, 1)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await box.take(1)
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    box.send_nowait("after")  # no stale taker to reschedule
    assert await box.take(1) == ["after"]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Outbox(0)


@asynccontextmanager
async def waiting_taker(box: Outbox) -> AsyncIterator[list[list[str | bytes]]]:
    """A task parked in ``box.take(10)``; yields the list its one take lands in, and
    waits for that take when the block ends."""
    taken: list[list[str | bytes]] = []

    async def taker() -> None:
        taken.append(await box.take(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        yield taken


async def test_force_without_wake_leaves_the_taker_to_the_caller() -> None:
    """``force(wake=False)`` + ``take_now``: the caller wrote the queue itself and the
    taker never woke; ``put_front`` queues the unwritten rest first and wakes it."""
    box = Outbox(1)
    async with waiting_taker(box) as taken:
        box.force("a", wake=False)
        box.force("b", wake=False)
        assert box.taker_waiting and box.peek() == ["a", "b"]
        box.take_now(2)
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [] and box.taker_waiting and len(box) == 0
        box.force("c", wake=False)
        box.put_front(b"rest of b")
        await trio.testing.wait_all_tasks_blocked()
    assert taken == [[b"rest of b", "c"]]


async def test_wake_after_force_without_wake() -> None:
    box = Outbox(4)
    async with waiting_taker(box) as taken:
        box.wake()  # nothing queued: the taker keeps waiting
        await trio.testing.wait_all_tasks_blocked()
        assert box.taker_waiting
        box.force("x", wake=False)
        box.wake()
    assert taken == [["x"]]


async def test_unsent_hands_back_what_no_one_wrote_once_closed() -> None:
    outbox = Outbox(4)
    outbox.send_nowait("a")
    outbox.put_front(b"")  # the peer's marker is not a message
    outbox.send_nowait("b")
    assert outbox.unsent() == []  # still open: the writer may take them
    outbox.close()
    assert outbox.unsent() == ["a", "b"]
    assert outbox.unsent() == [] and len(outbox) == 0  # taken, once


def size(*texts: str) -> int:
    """What the outbox counts for ``texts`` (the memory they take)."""
    return sum(map(sys.getsizeof, texts))


async def test_the_byte_budget_bounds_the_queue_as_the_count_does() -> None:
    big = "x" * 1000
    box = Outbox(100, byte_limit=size(big, big))
    box.send_nowait(big)
    assert not box.full
    box.send_nowait(big)
    assert box.full and box.queued_bytes() == size(big, big)
    with pytest.raises(trio.WouldBlock):
        box.send_nowait("small")  # two messages of 100, but the bytes are spent
    await send_waits_for_a_take(box, "small", big)
    assert box.queued_bytes() == size(big, "small")
    assert await box.take(10) == [big, "small"]
    assert box.queued_bytes() == 0


async def test_a_message_larger_than_the_budget_goes_alone() -> None:
    huge = "x" * 10_000
    box = Outbox(100, byte_limit=1000)
    box.send_nowait(huge)  # an empty outbox takes it: else it could never be sent
    with pytest.raises(trio.WouldBlock):
        box.send_nowait("a")
    assert await box.take(10) == [huge]
    box.send_nowait("a")


async def test_forced_messages_leave_in_batches_of_the_budget() -> None:
    """Answers queued past the bounds are taken a budget at a time, so what the writer
    holds while it writes is bounded too (but for one message)."""
    text = "y" * 1000
    box = Outbox(100, byte_limit=size(text, text))
    for _ in range(5):
        box.force(text)
    assert box.queued_bytes() == size(*[text] * 5)
    assert await box.take(64) == [text, text]
    assert await box.take(64) == [text, text]
    assert box.queued_bytes() == size(text)
    assert await box.take(64) == [text]
    huge = "z" * 10_000
    box.force(huge)
    box.force(text)
    assert await box.take(64) == [huge]  # the first always goes
    assert await box.take(64) == [text]


async def test_wait_for_room_waits_while_over_a_bound_and_not_once_closed() -> None:
    text = "w" * 1000
    box = Outbox(100, byte_limit=size(text))
    with trio.testing.assert_no_checkpoints():
        await box.wait_for_room()  # room: returns at once (the answer leaves in this step)
    box.force(text)
    box.force(text)
    done = False

    async def waiter() -> None:
        nonlocal done
        await box.wait_for_room()
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not done
        assert await box.take(1) == [text]
        await trio.testing.wait_all_tasks_blocked()
        assert not done  # still at the budget
        assert await box.take(1) == [text]
    assert done
    box.force(text)
    box.close()
    with trio.testing.assert_no_checkpoints():
        await box.wait_for_room()  # closed: no waiting for a writer that is gone


async def test_take_now_and_unsent_give_the_bytes_back() -> None:
    text = "v" * 500
    box = Outbox(100, byte_limit=10_000)
    box.force(text)
    box.force(text)
    box.force("tail")
    box.take_now(1)
    assert box.queued_bytes() == size(text, "tail")
    box.close()
    assert box.unsent() == [text, "tail"]
    assert box.queued_bytes() == 0


def test_byte_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Outbox(1, byte_limit=0)


async def test_send_some_nowait_queues_what_send_nowait_would_and_says_how_many() -> None:
    """A replayed page is queued in bulk: as many as fit, in order, by the count and by
    the byte budget, as one ``send_nowait`` each would; the taker is woken once."""
    big = "x" * 1000
    box = Outbox(4, byte_limit=size(big, big, "a"))
    texts = ["a", big, big, "b", "c"]
    assert box.send_some_nowait(texts) == 3  # the bytes are spent after the second big
    assert box.full and box.send_some_nowait(texts, 3) == 0
    assert await box.take(1) == ["a"]
    assert box.send_some_nowait(texts, 3) == 1  # room for one again (the byte budget)
    assert await box.take(10) == ["x" * 1000, big, "b"]
    assert box.queued_bytes() == 0
    assert box.send_some_nowait(texts, 4) == 1 and await box.take(10) == ["c"]
    got: list[str] = []

    async def taker() -> None:
        got.extend(await box.take(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        assert box.send_some_nowait(["d", "e"]) == 2
    assert got == ["d", "e"]
    box.close()
    with pytest.raises(trio.ClosedResourceError):
        box.send_some_nowait(["f"])


async def test_withdraw_takes_out_only_that_very_text_not_yet_taken() -> None:
    """``withdraw`` (a request of the peer's abandoned while still queued) takes out that
    object, gives its bytes and its place back (a sender waiting for room goes on), and
    is False once the taker has it or for an equal text that is another object."""
    box = Outbox(2)
    first, second = "first", "".join(["sec", "ond"])
    box.send_nowait(first)
    box.send_nowait(second)
    assert not box.withdraw("".join(["sec", "ond"]))  # (equal, not the one queued)
    sent = False

    async def sender() -> None:
        nonlocal sent
        await box.send("third")
        sent = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent  # full: it waits
        assert box.withdraw(second)
    assert sent
    assert box.queued_bytes() == sys.getsizeof(first) + sys.getsizeof("third")
    assert await box.take(10) == [first, "third"]
    assert not box.withdraw(first)  # (taken: written, or being written)
    assert box.queued_bytes() == 0
