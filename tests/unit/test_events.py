"""The turn event channel (worker._events): trio's memory-channel semantics for one sender
and one receiver."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from punie_trio.worker import EventReceiver, EventSender, open_event_channel


def _channel(limit: int) -> tuple[EventSender[object], EventReceiver[object]]:
    return open_event_channel(limit)


async def test_fifo_and_bound() -> None:
    send, receive = _channel(2)
    send.send_nowait(1)
    send.send_nowait(2)
    with pytest.raises(trio.WouldBlock):
        send.send_nowait(3)
    assert receive.receive_nowait() == 1
    assert await receive.receive() == 2
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


async def test_receive_waits_and_a_send_hands_over() -> None:
    send, receive = _channel(1)
    got: list[str] = []

    async def consumer() -> None:
        got.append(await receive.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        send.send_nowait("a")
    assert got == ["a"]


async def test_send_waits_for_room_in_order() -> None:
    send, receive = _channel(1)
    send.send_nowait(1)
    sent = False

    async def producer() -> None:
        nonlocal sent
        await send.send(2)
        sent = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent
        assert receive.receive_nowait() == 1  # makes room: 2 joins the queue
        await trio.testing.wait_all_tasks_blocked()
        assert sent
        assert receive.receive_nowait() == 2


async def test_close_of_the_sender_ends_after_what_was_sent() -> None:
    send, receive = _channel(4)
    send.send_nowait(1)
    send.close()
    send.close()  # idempotent
    assert await receive.receive() == 1
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()
    with pytest.raises(trio.EndOfChannel):
        await receive.receive()
    with pytest.raises(trio.ClosedResourceError):
        send.send_nowait(2)


async def test_close_of_the_sender_wakes_a_waiting_receiver() -> None:
    send, receive = _channel(1)

    async def consumer() -> None:
        with pytest.raises(trio.EndOfChannel):
            await receive.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        send.close()


async def test_close_of_the_receiver_breaks_the_sender_waiting_or_not() -> None:
    send, receive = _channel(1)
    send.send_nowait(1)

    async def producer() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await send.send(2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        receive.close()
    with pytest.raises(trio.BrokenResourceError):
        send.send_nowait(3)
    with pytest.raises(trio.ClosedResourceError):
        receive.receive_nowait()


async def test_waits_are_cancellable_and_leave_the_channel_usable() -> None:
    send, receive = _channel(1)
    with trio.move_on_after(0) as scope:
        await receive.receive()
    assert scope.cancelled_caught
    send.send_nowait(1)
    with trio.move_on_after(0) as scope:
        await send.send(2)
    assert scope.cancelled_caught
    assert receive.receive_nowait() == 1
    with pytest.raises(trio.WouldBlock):  # the cancelled send left nothing behind
        receive.receive_nowait()


async def test_send_and_receive_are_checkpoints() -> None:
    send, receive = _channel(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await send.send(1)
    send.send_nowait(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await receive.receive()
    assert receive.receive_nowait() == 1


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        _channel(0)
