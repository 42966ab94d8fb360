"""The JSON-RPC :class:`Peer` over in-memory and NDJSON streams.

Time is a MockClock (``autojump_clock``): a deadlock shows up as a ``TooSlowError`` from
``trio.fail_after`` at once, never as a hung test, and no test waits on the wall clock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from punie_trio.rpc import (
    BATCH_IDS,
    CANCEL_REQUEST,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    REQUEST_CANCELLED,
    Deferred,
    Params,
    Peer,
    PeerClosed,
    RpcError,
    current_request_id,
    method_not_found,
    peek_envelope,
)
from punie_trio.transport import MemoryMessageStream, NdjsonStream, memory_message_stream_pair

Handler = Callable[[Params], Awaitable[Any]]


class Dispatcher:
    """Routes requests to ``handlers``; records notifications."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.notifications: list[tuple[str, Params]] = []
        self.refused: list[Any] = []

    def handle_request(self, method: str, params: Params) -> Awaitable[Any]:
        handler = self.handlers.get(method)
        if handler is None:
            raise method_not_found(method)
        return handler(params)

    def handle_notification(self, method: str, params: Params) -> None:
        self.notifications.append((method, params))

    def request_refused(self, request_id: Any) -> None:
        self.refused.append(request_id)


async def echo(params: Params) -> Any:
    return params


class Raw:
    """The other side of a peer, as raw JSON texts."""

    def __init__(self, stream: MemoryMessageStream) -> None:
        self.stream = stream

    async def send(self, msg: dict[str, Any]) -> None:
        await self.stream.send_message(json.dumps({"jsonrpc": "2.0", **msg}))

    async def send_text(self, text: str) -> None:
        await self.stream.send_message(text)

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(10):
            msg: dict[str, Any] = json.loads(await self.stream.receive_message())
        assert msg["jsonrpc"] == "2.0"
        return msg


async def start_peer(
    nursery: trio.Nursery, dispatcher: Dispatcher, **kwargs: Any
) -> tuple[Peer, Raw]:
    ours, theirs = memory_message_stream_pair()
    peer = Peer(ours, dispatcher, **kwargs)
    await nursery.start(peer.run)
    return peer, Raw(theirs)


# -- correlation ------------------------------------------------------------------------------


async def test_answers_carry_the_callers_int_and_string_ids() -> None:
    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, Dispatcher({"echo": echo}))
        await raw.send({"id": 7, "method": "echo", "params": {"n": 7}})
        await raw.send({"id": "seven", "method": "echo", "params": {"n": "seven"}})
        await raw.send({"id": 0, "method": "echo", "params": [0]})
        answers = {}
        for _ in range(3):
            msg = await raw.recv()
            answers[msg["id"]] = msg["result"]
        assert answers == {7: {"n": 7}, "seven": {"n": "seven"}, 0: [0]}
        nursery.cancel_scope.cancel()


async def test_outbound_requests_are_correlated_out_of_order() -> None:
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher())
        results: dict[str, Any] = {}

        async def ask(name: str) -> None:
            results[name] = await peer.request("q", {"name": name})

        nursery.start_soon(ask, "first")
        first = await raw.recv()
        nursery.start_soon(ask, "second")
        second = await raw.recv()
        assert first["method"] == second["method"] == "q"
        assert first["id"] != second["id"]
        # Answer in the opposite order.
        await raw.send({"id": second["id"], "result": "for-second"})
        await raw.send({"id": first["id"], "result": "for-first"})
        await trio.testing.wait_all_tasks_blocked()
        assert results == {"first": "for-first", "second": "for-second"}
        nursery.cancel_scope.cancel()


async def test_error_answer_raises_rpc_error() -> None:
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher())

        async def answer() -> None:
            msg = await raw.recv()
            await raw.send(
                {"id": msg["id"], "error": {"code": -32002, "message": "nope", "data": 1}}
            )

        nursery.start_soon(answer)
        with pytest.raises(RpcError) as info:
            await peer.request("q")
        assert (info.value.code, info.value.message, info.value.data) == (-32002, "nope", 1)
        nursery.cancel_scope.cancel()


async def test_notify_and_incoming_notifications() -> None:
    dispatcher = Dispatcher()
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, dispatcher)
        await peer.notify("hello", {"a": 1})
        assert await raw.recv() == {"jsonrpc": "2.0", "method": "hello", "params": {"a": 1}}
        await raw.send({"method": "note", "params": {"b": 2}})
        await raw.send({"method": "bare"})
        await trio.testing.wait_all_tasks_blocked()
        assert dispatcher.notifications == [("note", {"b": 2}), ("bare", None)]
        nursery.cancel_scope.cancel()


# -- concurrency ------------------------------------------------------------------------------


async def test_handler_awaiting_the_other_side_does_not_block_the_reader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A calls B's ``outer``; B's handler calls A's ``inner``; A's ``inner`` calls B's ``leaf``.
    Every answer needs the readers to keep serving while handlers wait."""
    a_stream, b_stream = memory_message_stream_pair()
    a_dispatch, b_dispatch = Dispatcher(), Dispatcher()
    peer_a = Peer(a_stream, a_dispatch)
    peer_b = Peer(b_stream, b_dispatch)

    async def outer(params: Params) -> Any:
        inner = await peer_b.request("inner", {"from": "outer"})
        return {"outer": inner}

    async def inner(params: Params) -> Any:
        leaf = await peer_a.request("leaf")
        return {"inner": leaf}

    async def leaf(params: Params) -> Any:
        return "leaf"

    b_dispatch.handlers.update(outer=outer, leaf=leaf)
    a_dispatch.handlers.update(inner=inner)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(peer_a.run)
            await nursery.start(peer_b.run)
            results = await _gather(
                lambda: peer_a.request("outer"),
                lambda: peer_a.request("leaf"),
                lambda: peer_b.request("inner"),
            )
            assert results == [{"outer": {"inner": "leaf"}}, "leaf", {"inner": "leaf"}]
            nursery.cancel_scope.cancel()


async def _gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await calls[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return results


async def test_slow_handler_does_not_delay_other_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    async def slow(params: Params) -> Any:
        await release.wait()
        return "slow"

    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, Dispatcher({"slow": slow, "echo": echo}))
        await raw.send({"id": 1, "method": "slow"})
        await raw.send({"id": 2, "method": "echo", "params": ["fast"]})
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 2, "result": ["fast"]}
        release.set()
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 1, "result": "slow"}
        nursery.cancel_scope.cancel()


async def test_send_encoded_many_sends_a_page_larger_than_the_outbox_in_order() -> None:
    """A replayed page is queued as many at a time as the outbox holds, and waits for
    room in between: a page of 50 through an outbox of 4 arrives whole and in order."""
    page = [f'{{"jsonrpc":"2.0","method":"n","params":{{"i":{i}}}}}' for i in range(50)]
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher(), outbox_size=4)
        sent = False

        async def send_page() -> None:
            nonlocal sent
            await peer.send_encoded_many(page)
            sent = True

        nursery.start_soon(send_page)
        got = [(await raw.recv())["params"]["i"] for _ in range(50)]
        await trio.testing.wait_all_tasks_blocked()
        assert sent and got == list(range(50))
        nursery.cancel_scope.cancel()


async def test_send_encoded_many_on_a_closed_peer_is_peer_closed() -> None:
    ours, theirs = memory_message_stream_pair()
    peer = Peer(ours, Dispatcher(), outbox_size=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        await theirs.aclose()  # the other side leaves: run() ends, the outbox closes
    with pytest.raises(PeerClosed):
        await peer.send_encoded_many(['{"jsonrpc":"2.0","method":"n"}'] * 10)


# -- cancellation -----------------------------------------------------------------------------


async def test_timeout_around_request_sends_cancel_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher())
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(3):
                await peer.request("slow", {"x": 1})
        sent = await raw.recv()
        assert sent["method"] == "slow"
        cancel = await raw.recv()
        assert cancel == {
            "jsonrpc": "2.0",
            "method": CANCEL_REQUEST,
            "params": {"requestId": sent["id"]},
        }
        # A late answer to the cancelled request is ignored, and the peer still works.
        await raw.send({"id": sent["id"], "result": "late"})
        nursery.start_soon(raw.send, {"id": sent["id"] + 1, "result": "next"})
        assert await peer.request("next") == "next"
        nursery.cancel_scope.cancel()


async def test_a_cancel_request_for_a_timed_out_request_is_sent_when_the_outbox_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The ``$/cancel_request`` for our request that timed out goes out even when the
    outbox is full (a client that reads slowly while a turn streams): it was dropped, and
    the client went on waiting to answer a request no one awaited any more (a permission
    dialog left open for good). A request cancelled before it was queued is not
    cancelled to the client, which never saw it."""
    ours, theirs = memory_message_stream_pair(buffer=0)
    peer = Peer(ours, Dispatcher(), outbox_size=1)
    raw = Raw(theirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)

        async def ask(method: str) -> None:
            with trio.move_on_after(3):
                await peer.request(method)

        nursery.start_soon(ask, "ask")
        await trio.testing.wait_all_tasks_blocked()  # the writer holds it: no one reads
        nursery.start_soon(peer.notify, "update", {"n": 1})  # fills the outbox
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "never-queued")  # waits for room
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(5)  # both time out
        received = [await raw.recv() for _ in range(3)]
        asked = received[0]
        assert asked["method"] == "ask"
        assert received[1:] == [
            {"jsonrpc": "2.0", "method": "update", "params": {"n": 1}},
            {"jsonrpc": "2.0", "method": CANCEL_REQUEST, "params": {"requestId": asked["id"]}},
        ]
        with trio.move_on_after(1):
            extra = await theirs.receive_message()
            raise AssertionError(f"more was sent: {extra}")
        nursery.cancel_scope.cancel()


async def test_a_request_abandoned_while_still_in_the_outbox_is_withdrawn_unsent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Our request abandoned (timed out, its turn cancelled) while it still waits in the
    outbox behind what a slow client has not read is taken out of the outbox: the client
    never saw it, and neither it nor a ``$/cancel_request`` for it is sent. Both were
    sent, so the client showed (a permission dialog) what no one awaited, to close it at
    once, and the cancel went past the outbox's bound."""
    ours, theirs = memory_message_stream_pair(buffer=0)
    peer = Peer(ours, Dispatcher(), outbox_size=4)
    raw = Raw(theirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        nursery.start_soon(peer.notify, "update", {"n": 1})
        await trio.testing.wait_all_tasks_blocked()  # the writer holds it: no one reads
        with trio.move_on_after(3):
            await peer.request("ask")  # queued behind it, never taken
        assert peer.queued() == 0
        nursery.start_soon(peer.notify, "update", {"n": 2})
        assert await raw.recv() == {"jsonrpc": "2.0", "method": "update", "params": {"n": 1}}
        assert await raw.recv() == {"jsonrpc": "2.0", "method": "update", "params": {"n": 2}}
        with trio.move_on_after(1):
            extra = await theirs.receive_message()
            raise AssertionError(f"more was sent: {extra}")
        nursery.cancel_scope.cancel()


def slow_handler() -> tuple[Handler, trio.Event]:
    """A handler that waits for ever, and the event it sets once it is cancelled."""
    ended = trio.Event()

    async def slow(params: Params) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    return slow, ended


async def test_timeout_cancels_the_remote_handler(autojump_clock: trio.testing.MockClock) -> None:
    """Between two peers: the caller's timeout cancels the callee's handler, which answers
    -32800 (ignored by the caller, who already gave up)."""
    a_stream, b_stream = memory_message_stream_pair()
    slow, handler_cancelled = slow_handler()

    peer_a = Peer(a_stream, Dispatcher())
    peer_b = Peer(b_stream, Dispatcher({"slow": slow}))
    async with trio.open_nursery() as nursery:
        await nursery.start(peer_a.run)
        await nursery.start(peer_b.run)
        started = trio.current_time()
        with trio.move_on_after(2):
            await peer_a.request("slow")
        assert trio.current_time() - started == pytest.approx(2)
        with trio.fail_after(1):
            await handler_cancelled.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert peer_b._running == {}
        assert peer_a._pending == {}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("request_id", [5, "five"])
async def test_incoming_cancel_request_cancels_the_handler(
    autojump_clock: trio.testing.MockClock, request_id: Any
) -> None:
    slow, cancelled = slow_handler()

    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, Dispatcher({"slow": slow}))
        await raw.send({"id": request_id, "method": "slow"})
        await trio.testing.wait_all_tasks_blocked()
        # Cancelling an unknown id, or with junk params, does nothing.
        await raw.send({"method": CANCEL_REQUEST, "params": {"requestId": 999}})
        await raw.send({"method": CANCEL_REQUEST, "params": [request_id]})
        await raw.send({"method": CANCEL_REQUEST, "params": {"requestId": [request_id]}})
        await raw.send({"method": CANCEL_REQUEST})
        await trio.testing.wait_all_tasks_blocked()
        assert not cancelled.is_set()
        await raw.send({"method": CANCEL_REQUEST, "params": {"requestId": request_id}})
        answer = await raw.recv()
        assert answer["id"] == request_id
        assert answer["error"]["code"] == REQUEST_CANCELLED
        assert cancelled.is_set()
        nursery.cancel_scope.cancel()


async def test_a_cancel_request_leaves_an_uncancellable_method_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``$/cancel_request`` for a request of an ``uncancellable`` method is ignored (the
    cancellation page: the receiver MAY cancel), and the request answers as usual; the
    end of the connection still cancels it."""
    release = trio.Event()

    async def steady(params: Params) -> Any:
        await release.wait()
        return "done"

    slow, cancelled = slow_handler()
    ours, theirs = memory_message_stream_pair()
    peer = Peer(
        ours,
        Dispatcher({"steady": steady, "slow": slow}),
        uncancellable=frozenset({"steady", "slow"}),
    )
    raw = Raw(theirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        await raw.send({"id": 1, "method": "steady"})
        await raw.send({"method": CANCEL_REQUEST, "params": {"requestId": 1}})
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 1, "result": "done"}
        assert not peer._not_cancellable  # (forgotten once answered)
        await raw.send({"id": 2, "method": "slow"})
        await raw.send({"method": CANCEL_REQUEST, "params": {"requestId": 2}})
        await trio.testing.wait_all_tasks_blocked()
        assert not cancelled.is_set()
        await theirs.aclose()
    assert cancelled.is_set()


async def test_a_cancel_request_sent_with_an_id_acts_and_is_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``$/cancel_request`` is a notification; sent with an id, as a request, it cancels
    as the notification does and is answered ``null`` (as ``session/cancel`` sent with an
    id is), and params without a usable ``requestId`` are -32602. It was -32601 "method
    not found", for a method that exists, and cancelled nothing."""
    slow, cancelled = slow_handler()

    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, Dispatcher({"slow": slow}))
        await raw.send({"id": 1, "method": "slow"})
        for bad_id, params in ((2, None), (3, {"requestId": [1]}), (4, [1])):
            await raw.send({"id": bad_id, "method": CANCEL_REQUEST, "params": params})
            answer = await raw.recv()
            assert answer["id"] == bad_id and answer["error"]["code"] == -32602, answer
            assert "requestId" in answer["error"]["message"]
        await raw.send({"id": 5, "method": CANCEL_REQUEST, "params": {"requestId": 999}})
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 5, "result": None}  # (nothing)
        assert not cancelled.is_set()
        await raw.send({"id": 6, "method": CANCEL_REQUEST, "params": {"requestId": 1}})
        answers = {m["id"]: m for m in (await raw.recv(), await raw.recv())}
        assert answers[6] == {"jsonrpc": "2.0", "id": 6, "result": None}
        assert answers[1]["error"]["code"] == REQUEST_CANCELLED
        assert cancelled.is_set()
        nursery.cancel_scope.cancel()


# -- errors -----------------------------------------------------------------------------------


async def test_handler_rpc_error_becomes_the_error_response() -> None:
    async def refuse(params: Params) -> Any:
        raise RpcError(-32002, "Session not found: s", {"sessionId": "s"})

    def refuse_sync(params: Params) -> Awaitable[Any]:
        raise RpcError.invalid_params("Invalid params: cwd is required")

    dispatcher = Dispatcher({"refuse": refuse})
    dispatcher.handlers["sync"] = refuse_sync  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, dispatcher)
        await raw.send({"id": 1, "method": "refuse"})
        assert await raw.recv() == {
            "jsonrpc": "2.0",
            "id": 1,
            "error": {
                "code": -32002,
                "message": "Session not found: s",
                "data": {"sessionId": "s"},
            },
        }
        await raw.send({"id": 2, "method": "sync"})
        answer = await raw.recv()
        assert answer["id"] == 2
        assert answer["error"] == {"code": -32602, "message": "Invalid params: cwd is required"}
        nursery.cancel_scope.cancel()


async def test_handler_crash_is_internal_error_and_peer_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def crash(params: Params) -> Any:
        raise ValueError("kaboom")

    def crash_sync(params: Params) -> Awaitable[Any]:
        raise KeyError("sync kaboom")

    dispatcher = Dispatcher({"crash": crash, "echo": echo})
    dispatcher.handlers["crash_sync"] = crash_sync  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, dispatcher)
        with caplog.at_level(logging.ERROR, logger="punie_trio.rpc"):
            await raw.send({"id": 1, "method": "crash"})
            answer = await raw.recv()
            assert answer["id"] == 1
            assert answer["error"]["code"] == INTERNAL_ERROR
            assert "kaboom" in answer["error"]["message"]
            await raw.send({"id": 2, "method": "crash_sync"})
            answer = await raw.recv()
            assert answer["id"] == 2 and answer["error"]["code"] == INTERNAL_ERROR
        assert any("crash" in r.getMessage() for r in caplog.records)
        await raw.send({"id": 3, "method": "echo", "params": {"still": "alive"}})
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 3, "result": {"still": "alive"}}
        nursery.cancel_scope.cancel()


async def test_notification_handler_errors_are_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    class Picky(Dispatcher):
        def handle_notification(self, method: str, params: Params) -> None:
            if method == "refuse":
                raise RpcError.invalid_params("no")
            if method == "crash":
                raise RuntimeError("boom")
            super().handle_notification(method, params)

    dispatcher = Picky({"echo": echo})
    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, dispatcher)
        await raw.send({"method": "refuse"})
        await raw.send({"method": "crash"})
        await raw.send({"method": "fine"})
        await raw.send({"id": 1, "method": "echo", "params": [1]})
        assert (await raw.recv())["result"] == [1]
        assert dispatcher.notifications == [("fine", None)]
        nursery.cancel_scope.cancel()


async def test_unknown_method() -> None:
    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, Dispatcher())
        await raw.send({"id": "u", "method": "no/such"})
        answer = await raw.recv()
        assert answer["id"] == "u"
        assert answer["error"]["code"] == METHOD_NOT_FOUND
        assert "no/such" in answer["error"]["message"]
        nursery.cancel_scope.cancel()


async def test_malformed_input_is_answered_and_reading_goes_on() -> None:
    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, Dispatcher({"echo": echo}))
        await raw.send_text("{not json")
        answer = await raw.recv()
        assert answer["id"] is None and answer["error"]["code"] == PARSE_ERROR
        await raw.send_text('{"jsonrpc":"1.0","id":4,"method":"echo"}')
        answer = await raw.recv()
        assert answer["id"] == 4 and answer["error"]["code"] == INVALID_REQUEST
        await raw.send_text("[1,2]")
        answer = await raw.recv()
        assert answer["id"] is None and answer["error"]["code"] == INVALID_REQUEST
        await raw.send({"id": 5, "method": "echo", "params": [5]})
        assert (await raw.recv())["result"] == [5]
        nursery.cancel_scope.cancel()


async def test_a_batch_is_refused_request_by_request_and_fails_the_answers_in_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A batch (ACP has none): each request in it is refused under its own id, and an
    answer in it fails the request of ours it answers, at once. Refused as one, with a
    null id, no request in it was ever answered (the client waited for good), and our
    request waited out its timeout."""
    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher({"echo": echo})
        peer, raw = await start_peer(nursery, dispatcher)
        failure: list[RpcError] = []

        async def ask() -> None:
            with pytest.raises(RpcError) as caught:
                await peer.request("fs/read_text_file", {"path": "/p"})
            failure.append(caught.value)

        nursery.start_soon(ask)
        ours = await raw.recv()
        before = trio.current_time()
        batch = [
            {"jsonrpc": "2.0", "id": 1, "method": "echo"},
            {"jsonrpc": "2.0", "method": "note"},
            {"jsonrpc": "2.0", "id": ours["id"], "result": {"content": "x"}},
            {"jsonrpc": "2.0", "id": "two", "method": "echo"},
        ]
        await raw.send_text(json.dumps(batch))
        answers = [await raw.recv(), await raw.recv()]
        assert [a["id"] for a in answers] == [1, "two"]
        for answer in answers:
            assert answer["error"]["code"] == INVALID_REQUEST
            assert answer["error"]["message"].startswith("Batch requests are not supported")
        assert dispatcher.refused == [1, "two"]
        assert dispatcher.notifications == []  # (nothing in it is run)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == before  # no timeout was waited for
        assert failure[0].code == INVALID_REQUEST
        assert failure[0].message == "the answer came in a batch, which is not supported"
        # A batch without a request: one answer, with a null id, as before.
        await raw.send_text(json.dumps([{"jsonrpc": "2.0", "method": "note"}]))
        answer = await raw.recv()
        assert answer["id"] is None and answer["error"]["code"] == INVALID_REQUEST
        await raw.send({"id": 5, "method": "echo", "params": [5]})
        assert (await raw.recv())["result"] == [5]
        nursery.cancel_scope.cancel()


async def test_a_batch_past_batch_ids_requests_gets_one_refusal_for_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each request of a batch is refused under its id up to :data:`BATCH_IDS`, the rest
    by one refusal with a null id that counts them: the answers to a batch are bounded.
    Refused each under its own id, a 16 MiB batch of tiny requests (625,000) got 93 MB
    of refusals, 9.8 s of the reader's time, and held 178 MB while they drained."""
    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher({"echo": echo})
        _, raw = await start_peer(nursery, dispatcher)
        extra = 1000
        batch = [{"jsonrpc": "2.0", "id": i, "method": "echo"} for i in range(BATCH_IDS + extra)]
        await raw.send_text(json.dumps(batch))
        await raw.send({"id": "after", "method": "echo", "params": [5]})
        answers = []
        while not answers or answers[-1].get("id") != "after":
            answers.append(await raw.recv())
        assert [a["id"] for a in answers[:BATCH_IDS]] == list(range(BATCH_IDS))
        rest = answers[BATCH_IDS]
        assert rest["id"] is None and rest["error"]["code"] == INVALID_REQUEST
        assert rest["error"]["message"].startswith("Batch requests are not supported")
        assert f"{extra} more requests" in rest["error"]["message"]
        assert answers[BATCH_IDS + 1 :] == [{"jsonrpc": "2.0", "id": "after", "result": [5]}]
        assert dispatcher.refused == list(range(BATCH_IDS))
        nursery.cancel_scope.cancel()


async def test_duplicate_in_flight_id_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    release = trio.Event()

    async def slow(params: Params) -> Any:
        await release.wait()
        return params

    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher({"slow": slow})
        _, raw = await start_peer(nursery, dispatcher)
        await raw.send({"id": 1, "method": "slow", "params": ["first"]})
        await raw.send({"id": 1, "method": "slow", "params": ["second"]})
        answer = await raw.recv()
        assert answer["id"] == 1
        assert answer["error"]["code"] == INVALID_REQUEST
        assert "already in use" in answer["error"]["message"]
        assert dispatcher.refused == [1]  # (told: the client used the id)
        release.set()
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 1, "result": ["first"]}
        # Once answered, the id may be reused.
        await raw.send({"id": 1, "method": "slow", "params": ["third"]})
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 1, "result": ["third"]}
        nursery.cancel_scope.cancel()


async def test_max_concurrent_requests(autojump_clock: trio.testing.MockClock) -> None:
    release = trio.Event()

    async def slow(params: Params) -> Any:
        await release.wait()
        return "done"

    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher({"slow": slow})
        _, raw = await start_peer(nursery, dispatcher, max_concurrent_requests=2)
        for i in range(3):
            await raw.send({"id": i, "method": "slow"})
        answer = await raw.recv()
        assert answer["id"] == 2
        assert answer["error"]["code"] == INTERNAL_ERROR
        assert "limit 2" in answer["error"]["message"]
        assert dispatcher.refused == [2]
        release.set()
        done = {(await raw.recv())["id"] for _ in range(2)}
        assert done == {0, 1}
        # Capacity is back once they finished.
        await raw.send({"id": 9, "method": "slow"})
        assert (await raw.recv()) == {"jsonrpc": "2.0", "id": 9, "result": "done"}
        nursery.cancel_scope.cancel()


async def test_error_with_null_id_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher({"echo": echo}))
        with caplog.at_level(logging.WARNING, logger="punie_trio.rpc"):
            await raw.send({"id": None, "error": {"code": -32700, "message": "Parse error"}})
            await raw.send({"id": 1, "method": "echo", "params": ["ok"]})
            assert (await raw.recv())["result"] == ["ok"]
        assert any(
            "without an id" in r.getMessage() and r.levelno == logging.WARNING
            for r in caplog.records
        )
        assert not peer.closed
        nursery.cancel_scope.cancel()


async def test_answer_for_unknown_id_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, Dispatcher({"echo": echo}))
        with caplog.at_level(logging.WARNING, logger="punie_trio.rpc"):
            await raw.send({"id": 12345, "result": "who?"})
            await raw.send({"id": 1, "method": "echo", "params": ["ok"]})
            assert (await raw.recv())["result"] == ["ok"]
        assert any("12345" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()


# -- ending -----------------------------------------------------------------------------------


async def test_eof_fails_pending_outbound_requests() -> None:
    ours, theirs = memory_message_stream_pair()
    peer = Peer(ours, Dispatcher())
    outcome: list[BaseException] = []

    async def ask() -> None:
        try:
            await peer.request("never")
        except PeerClosed as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        nursery.start_soon(ask)
        assert json.loads(await theirs.receive_message())["method"] == "never"
        await theirs.aclose()
    # run() returned by itself when the stream ended.
    assert peer.closed
    assert len(outcome) == 1 and isinstance(outcome[0], PeerClosed)
    with pytest.raises(PeerClosed):
        await peer.request("after")
    with pytest.raises(PeerClosed):
        await peer.notify("after")


async def test_eof_cancels_running_handlers() -> None:
    slow, cancelled = slow_handler()

    ours, theirs = memory_message_stream_pair()
    peer = Peer(ours, Dispatcher({"slow": slow}))
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        await Raw(theirs).send({"id": 1, "method": "slow"})
        await trio.testing.wait_all_tasks_blocked()
        await theirs.aclose()
    assert cancelled.is_set()


async def test_finish_lets_running_handlers_answer(autojump_clock: trio.testing.MockClock) -> None:
    release = trio.Event()
    ours, theirs = memory_message_stream_pair()

    async def slow(params: Params) -> Any:
        await release.wait()
        return "finished"

    peer = Peer(ours, Dispatcher({"slow": slow}))
    raw = Raw(theirs)
    run_done = trio.Event()

    async def run_peer(task_status: trio.TaskStatus[None]) -> None:
        await peer.run(task_status=task_status)
        run_done.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_peer)
            await raw.send({"id": 1, "method": "slow"})
            await trio.testing.wait_all_tasks_blocked()
            peer.finish()
            await trio.testing.wait_all_tasks_blocked()
            assert not run_done.is_set()
            # New input is no longer read.
            await raw.send({"id": 2, "method": "slow"})
            release.set()
            await run_done.wait()
            assert await raw.recv() == {"jsonrpc": "2.0", "id": 1, "result": "finished"}
            # The request sent after finish() was never read, so never answered.
            with trio.move_on_after(1) as idle:
                await theirs.receive_message()
            assert idle.cancelled_caught
    assert peer.closed


async def test_cancelling_run_fails_pending_requests() -> None:
    ours, theirs = memory_message_stream_pair()
    peer = Peer(ours, Dispatcher())
    errors: list[BaseException] = []

    async def ask() -> None:
        try:
            await peer.request("q")
        except PeerClosed as exc:
            errors.append(exc)

    async with trio.open_nursery() as outer, trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        outer.start_soon(ask)
        await theirs.receive_message()
        nursery.cancel_scope.cancel()
    assert len(errors) == 1


# -- NDJSON -----------------------------------------------------------------------------------


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", **msg}).encode() + b"\n"


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> dict[str, Any]:
        with trio.fail_after(10):
            while b"\n" not in self.buffer:
                data = await self.stream.receive_some()
                if not data:
                    raise EOFError
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result


@pytest.mark.parametrize("split", [False, True])
async def test_ndjson_oversized_line_is_refused_and_next_line_served(
    autojump_clock: trio.testing.MockClock, split: bool
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = NdjsonStream(ours, ours, max_message_bytes=200)
    peer = Peer(stream, Dispatcher({"echo": echo}))
    reader = LineReader(theirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        huge = _line({"id": 1, "method": "echo", "params": {"s": "x" * 1000}})
        if split:
            # The oversized line arrives in pieces, each under the limit.
            for i in range(0, len(huge), 150):
                await theirs.send_all(huge[i : i + 150])
                await trio.testing.wait_all_tasks_blocked()
        else:
            await theirs.send_all(huge)
        await theirs.send_all(_line({"id": 2, "method": "echo", "params": ["small"]}))
        answer = await reader.next()
        assert answer["id"] == 1  # (read from the line's head)
        assert answer["error"]["code"] == INVALID_REQUEST
        assert "200" in answer["error"]["message"]
        assert await reader.next() == {"jsonrpc": "2.0", "id": 2, "result": ["small"]}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("split", [False, True])
async def test_ndjson_an_oversized_answer_fails_its_request_at_once(
    autojump_clock: trio.testing.MockClock, split: bool
) -> None:
    """Our request's answer dropped for its size once left the request waiting for its
    timeout (which then said the client had not answered): it fails now, saying why."""
    ours, theirs = trio.testing.memory_stream_pair()
    peer = Peer(NdjsonStream(ours, ours, max_message_bytes=200), Dispatcher())
    reader = LineReader(theirs)
    failure: list[RpcError] = []

    async def ask() -> None:
        with pytest.raises(RpcError) as caught:
            await peer.request("fs/read_text_file", {"path": "/big"})
        failure.append(caught.value)

    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        nursery.start_soon(ask)
        request = await reader.next()
        huge = _line({"jsonrpc": "2.0", "id": request["id"], "result": {"content": "x" * 999}})
        step = 150 if split else len(huge)
        for i in range(0, len(huge), step):
            await theirs.send_all(huge[i : i + step])
            await trio.testing.wait_all_tasks_blocked()
        before = trio.current_time()
        answer = await reader.next()  # the peer hears why its answer was dropped
        assert answer["id"] is None and answer["error"]["code"] == INVALID_REQUEST
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == before  # no timeout was waited for
        assert failure[0].code == INVALID_REQUEST
        assert failure[0].message == "the answer's message exceeds the 200-byte limit"
        nursery.cancel_scope.cancel()


async def test_ndjson_a_request_not_json_after_its_id_gets_the_parse_error_under_its_id() -> None:
    """A request whose JSON breaks after its id (bad UTF-8 in a file's text, a bad escape):
    the -32700 carries the id its head names, as an oversized line's -32600 does, and the
    client's request ends there. With a null id the client could not tell which request it
    was, and waited for its answer for good."""
    ours, theirs = trio.testing.memory_stream_pair()
    dispatcher = Dispatcher({"echo": echo})
    peer = Peer(NdjsonStream(ours, ours), dispatcher)
    reader = LineReader(theirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        await theirs.send_all(b'{"jsonrpc":"2.0","id":7,"method":"echo","params":["\xff"]}\n')
        answer = await reader.next()
        assert answer["id"] == 7 and answer["error"]["code"] == PARSE_ERROR
        assert "can't decode byte 0xff" in answer["error"]["message"]
        assert dispatcher.refused == [7]  # (told: the client used the id)
        await theirs.send_all(b'{"method":"echo","id":"s","params":{"a": nope}}\n')
        answer = await reader.next()
        assert answer["id"] == "s" and answer["error"]["code"] == PARSE_ERROR
        # No id before the break, or no sign of a request: null, as before.
        for line in (b'{"id":8,"nope"', b'{"id":9 junk', b'{"id":"\\x","method":"echo"}'):
            await theirs.send_all(line + b"\n")
            answer = await reader.next()
            assert answer["id"] is None and answer["error"]["code"] == PARSE_ERROR, line
        assert dispatcher.refused == [7, "s"]
        await theirs.send_all(_line({"id": 5, "method": "echo", "params": [5]}))
        assert await reader.next() == {"jsonrpc": "2.0", "id": 5, "result": [5]}
        nursery.cancel_scope.cancel()


async def test_ndjson_an_answer_that_is_not_json_fails_its_request_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The client's answer to our request, unreadable (bad UTF-8 in a file's content): the
    request fails now, saying why. It waited out its timeout (the client-call timeout, 300
    s by default), which then said that the client had not answered."""
    ours, theirs = trio.testing.memory_stream_pair()
    peer = Peer(NdjsonStream(ours, ours), Dispatcher())
    reader = LineReader(theirs)
    failure: list[RpcError] = []

    async def ask() -> None:
        with pytest.raises(RpcError) as caught:
            await peer.request("fs/read_text_file", {"path": "/latin1"})
        failure.append(caught.value)

    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        nursery.start_soon(ask)
        request = await reader.next()
        before = trio.current_time()
        head = f'{{"jsonrpc":"2.0","id":{request["id"]},"result":{{"content":"'.encode()
        await theirs.send_all(head + b'caf\xe9"}}\n')
        answer = await reader.next()  # the client hears why its answer was dropped
        assert answer["id"] is None and answer["error"]["code"] == PARSE_ERROR
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == before  # no timeout was waited for
        assert failure[0].code == PARSE_ERROR
        assert failure[0].message.startswith("the answer is not JSON: ")
        assert "can't decode byte 0xe9" in failure[0].message
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'{"jsonrpc":"2.0","id":7,"result":{"content":"xx', ("response", 7)),
        (b' { "id" : "a" , "method" : "x", "params": {"a": "', ("request", "a")),
        (b'{"jsonrpc":"2.0","error":{"code":1,"message":"', ("response", None)),
        (b'{"params":{"a":1},"id":3,"method":"m","x":"', ("request", 3)),
        (b'{"id":12', (None, None)),  # a number at the cut may be cut itself
        (b'{"id":true,"result":"', ("response", None)),
        (b'{"id":1.5,"result":"', ("response", None)),
        (b'{"id":"\xc3\xa9",\xc3', (None, "\u00e9")),  # a character cut at the end
        (b'{"id":"\xff","result":"', (None, None)),  # not UTF-8
        (b'[{"id":1,"method":"m"', (None, None)),
        (b"", (None, None)),
        (b'\xef\xbb\xbf{"id":7,"result":"', ("response", 7)),  # a byte-order mark
        (b"{" * 3000, (None, None)),
        # An id past a request id's bounds (a string of 1,024 characters, 64 bits) is
        # none: the refusal echoed up to 4 KB of it, the head's size.
        (b'{"id":"' + b"x" * 1025 + b'","method":"m","params":"', ("request", None)),
        (b'{"id":"' + b"x" * 1024 + b'","method":"m","params":"', ("request", "x" * 1024)),
        (b'{"id":9223372036854775808,"method":"m","params":"', ("request", None)),
    ],
)
def test_peek_envelope_reads_what_the_head_holds(
    head: bytes, expected: tuple[str | None, Any]
) -> None:
    assert peek_envelope(head) == expected


async def test_ndjson_blank_lines_and_crlf_are_skipped() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    peer = Peer(NdjsonStream(ours, ours), Dispatcher({"echo": echo}))
    reader = LineReader(theirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        await theirs.send_all(
            b"\n  \n" + _line({"id": 1, "method": "echo"}).replace(b"\n", b"\r\n")
        )
        assert await reader.next() == {"jsonrpc": "2.0", "id": 1, "result": None}
        nursery.cancel_scope.cancel()


async def test_ndjson_final_line_without_newline_is_delivered() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = NdjsonStream(ours, ours)
    await theirs.send_all(_line({"method": "one"}) + json.dumps({"method": "two"}).encode())
    await theirs.send_eof()
    assert json.loads(await stream.receive_message()) == {"jsonrpc": "2.0", "method": "one"}
    assert json.loads(await stream.receive_message()) == {"method": "two"}
    with pytest.raises(trio.EndOfChannel):
        await stream.receive_message()


async def test_ndjson_final_notification_without_newline_reaches_the_dispatcher() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    dispatcher = Dispatcher()
    peer = Peer(NdjsonStream(ours, ours), dispatcher)
    await theirs.send_all(_line({"method": "first"}) + b'{"jsonrpc":"2.0","method":"last"}')
    await theirs.send_eof()
    with trio.fail_after(10):
        await peer.run()  # returns at EOF
    assert [m for m, _ in dispatcher.notifications] == ["first", "last"]


async def test_ndjson_oversized_final_line_at_eof() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = NdjsonStream(ours, ours, max_message_bytes=10)
    await theirs.send_all(b'{"method":"way too long for ten bytes"}')
    await theirs.send_eof()
    from punie_trio.transport import MessageTooLarge

    with pytest.raises(MessageTooLarge):
        await stream.receive_message()
    with pytest.raises(trio.EndOfChannel):
        await stream.receive_message()


@pytest.mark.parametrize(
    ("last", "taken"),
    [
        (b'{"a":"123"}', False),  # 11 bytes: one over the limit
        (b'{"a":"12"}', True),  # 10 bytes: at it
        (b'{"a":"12"}\r', True),  # and a CR, which is not part of the message
    ],
)
async def test_ndjson_a_last_line_without_its_newline_is_held_to_the_limit(
    last: bytes, taken: bool
) -> None:
    """A last line that ends at EOF is bound as a line ending in a newline is: one byte
    over the limit was taken there (the reader cuts a line only once it holds more than
    the limit and a CR)."""
    from punie_trio.transport import MessageTooLarge

    ours, theirs = trio.testing.memory_stream_pair()
    stream = NdjsonStream(ours, ours, max_message_bytes=10)
    await theirs.send_all(last)
    await theirs.send_eof()
    if taken:
        assert await stream.receive_message() == last.rstrip(b"\r")
    else:
        with pytest.raises(MessageTooLarge):
            await stream.receive_message()
    with pytest.raises(trio.EndOfChannel):
        await stream.receive_message()


async def test_ndjson_the_tail_of_an_oversized_last_line_is_dropped_with_it() -> None:
    """An unterminated line over the limit that ends at EOF: one MessageTooLarge, then the
    end. The tail past the first cut was once returned as a message of its own, so a
    request placed there ran (and plain junk got a second, -32700, answer)."""
    from punie_trio.transport import MessageTooLarge

    ours, theirs = trio.testing.memory_stream_pair()
    stream = NdjsonStream(ours, ours, max_message_bytes=100)
    outcomes: list[object] = []

    async def read_all() -> None:
        while True:
            try:
                outcomes.append(await stream.receive_message())
            except MessageTooLarge:
                outcomes.append("too large")
            except trio.EndOfChannel:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await theirs.send_all(b"x" * 150)  # past the limit: the reader cuts here
        await trio.testing.wait_all_tasks_blocked()
        await theirs.send_all(b'{"jsonrpc":"2.0","id":77,"method":"session/new","params":{}}')
        await trio.testing.wait_all_tasks_blocked()
        await theirs.send_eof()
    assert outcomes == ["too large"]


async def test_ndjson_a_crlf_line_at_the_limit_is_taken() -> None:
    """The CR of a CRLF line is not part of the message (it once counted toward the limit)."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream = NdjsonStream(ours, ours, max_message_bytes=10)
    await theirs.send_all(b'{"a":"12"}\r\n')  # 10 bytes and CRLF
    assert await stream.receive_message() == b'{"a":"12"}'


async def test_ndjson_send_appends_one_newline() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = NdjsonStream(ours, ours)
    await stream.send_message('{"a":"b\\nc"}')
    assert await theirs.receive_some() == b'{"a":"b\\nc"}\n'
    await stream.aclose()
    await stream.aclose()  # idempotent


class _CountingSend(trio.abc.SendStream):
    def __init__(self, inner: trio.abc.SendStream) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_backlog_goes_out_as_one_ndjson_write_in_order() -> None:
    """The writer hands queued messages to a BatchSender together: one send_all."""
    ours, theirs = trio.testing.memory_stream_pair()
    counting = _CountingSend(ours)
    peer = Peer(NdjsonStream(ours, counting), Dispatcher())
    reader = LineReader(theirs)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        for i in range(10):  # queued without a scheduler trip: the writer sees all 10 at once
            await peer.notify("tick", [i])
        for i in range(10):
            assert await reader.next() == {"jsonrpc": "2.0", "method": "tick", "params": [i]}
        nursery.cancel_scope.cancel()
    assert counting.writes == 1


async def test_answer_now_answers_once_and_outlives_a_late_cancel() -> None:
    release = trio.Event()

    async def slow(params: Params) -> Any:
        await release.wait()
        return "from the handler"  # dropped: already answered

    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher({"slow": slow}))
        await raw.send({"id": 7, "method": "slow"})
        await trio.testing.wait_all_tasks_blocked()
        assert not peer.answer_now(8, "no such request")
        assert peer.answer_now(7, {"early": True})
        assert not peer.answer_now(7, "twice")
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 7, "result": {"early": True}}
        await raw.send({"method": "$/cancel_request", "params": {"requestId": 7}})  # moot
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        await raw.send({"id": 9, "method": "slow"})
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 9, "result": "from the handler"}
        nursery.cancel_scope.cancel()


async def test_answer_now_with_an_error() -> None:
    async def forever(params: Params) -> Any:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher({"forever": forever}))
        await raw.send({"id": "a", "method": "forever"})
        await trio.testing.wait_all_tasks_blocked()
        assert peer.answer_now("a", error=RpcError(INTERNAL_ERROR, "Internal error: boom"))
        assert await raw.recv() == {
            "jsonrpc": "2.0",
            "id": "a",
            "error": {"code": INTERNAL_ERROR, "message": "Internal error: boom"},
        }
        nursery.cancel_scope.cancel()


# -- Deferred: requests answered from elsewhere, with no handler task ----------------------------


class DeferringDispatcher(Dispatcher):
    """``later`` requests are Deferred: recorded with their id, answered by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.deferred: dict[Any, Deferred] = {}
        self.cancels: list[tuple[Any, bool]] = []

    def handle_request(self, method: str, params: Params) -> Awaitable[Any] | Deferred:
        if method != "later":
            return super().handle_request(method, params)
        request_id = current_request_id.get()
        deferred = Deferred(lambda lost: self.cancels.append((request_id, lost)))
        self.deferred[request_id] = deferred
        return deferred


async def test_deferred_request_starts_no_task_and_is_answered_from_elsewhere() -> None:
    dispatcher = DeferringDispatcher()
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, dispatcher, outbox_size=1)
        await trio.testing.wait_all_tasks_blocked()
        assert peer._nursery is not None
        tasks_before = len(peer._nursery.child_tasks)  # the writer
        await raw.send({"id": 1, "method": "later"})
        await raw.send({"id": 2, "method": "later"})
        await trio.testing.wait_all_tasks_blocked()
        assert set(dispatcher.deferred) == {1, 2}
        assert len(peer._nursery.child_tasks) == tasks_before == 1
        # Answers are queued even past the outbox's limit (here 1): they never wait.
        assert peer.answer_now(2, {"two": True})
        assert peer.answer_now(1, error=RpcError(INTERNAL_ERROR, "Internal error: one"))
        assert not peer.answer_now(1, "twice")
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 2, "result": {"two": True}}
        assert (await raw.recv())["error"]["message"] == "Internal error: one"
        assert dispatcher.cancels == []
        nursery.cancel_scope.cancel()


async def test_cancel_request_reaches_a_deferred_once() -> None:
    dispatcher = DeferringDispatcher()
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, dispatcher)
        await raw.send({"id": 5, "method": "later"})
        await raw.send({"method": CANCEL_REQUEST, "params": {"requestId": 5}})
        await raw.send({"method": CANCEL_REQUEST, "params": {"requestId": 5}})
        await trio.testing.wait_all_tasks_blocked()
        assert dispatcher.cancels == [(5, False)]
        # Still running: its owner answers it (as cancelled).
        assert peer.answer_now(5, error=RpcError(REQUEST_CANCELLED, "Request cancelled"))
        assert (await raw.recv())["error"]["code"] == REQUEST_CANCELLED
        nursery.cancel_scope.cancel()


async def test_a_deferred_cancelled_then_lost_is_told_both() -> None:
    """A request the other side cancelled and whose connection then ends is told of the
    loss too: its owner keeps the answer for a client that may come back (a cancelled
    prompt's -32800 was dropped with the connection, and the re-attached client awaiting
    it waited for ever)."""
    dispatcher = DeferringDispatcher()
    ours, theirs = memory_message_stream_pair()
    peer = Peer(ours, dispatcher)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)
            await Raw(theirs).send({"id": 5, "method": "later"})
            await Raw(theirs).send({"method": CANCEL_REQUEST, "params": {"requestId": 5}})
            await trio.testing.wait_all_tasks_blocked()
            assert dispatcher.cancels == [(5, False)]
            await theirs.aclose()
    assert dispatcher.cancels == [(5, False), (5, True)]


async def test_lost_connection_drops_deferred_requests_and_tells_their_owners() -> None:
    dispatcher = DeferringDispatcher()
    ours, theirs = memory_message_stream_pair()
    peer = Peer(ours, dispatcher)
    # run() returns (ending the nursery) without waiting for the unanswerable request.
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.run)
            await Raw(theirs).send({"id": 3, "method": "later"})
            await trio.testing.wait_all_tasks_blocked()
            await theirs.aclose()
    assert dispatcher.cancels == [(3, True)]
    assert peer.lost
    assert not peer.answer_now(3, "too late")


async def test_finish_waits_for_deferred_answers_to_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dispatcher = DeferringDispatcher()
    with trio.fail_after(5):  # the nursery ends when run() returns
        async with trio.open_nursery() as nursery:
            peer, raw = await start_peer(nursery, dispatcher)
            await raw.send({"id": 4, "method": "later"})
            await trio.testing.wait_all_tasks_blocked()
            peer.finish()
            await trio.sleep(1)
            assert not peer.closed  # still waiting for the answer
            assert peer.answer_now(4, "done")
            assert await raw.recv() == {"jsonrpc": "2.0", "id": 4, "result": "done"}
    assert peer.closed
    assert dispatcher.cancels == []


async def test_cancelled_peer_tells_deferred_owners_not_lost() -> None:
    dispatcher = DeferringDispatcher()
    async with trio.open_nursery() as nursery:
        _, raw = await start_peer(nursery, dispatcher)
        await raw.send({"id": 6, "method": "later"})
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert dispatcher.cancels == [(6, False)]


class NowStream(MemoryMessageStream):
    """A memory stream that is also a NowSender: records what is written synchronously,
    taking at most ``room`` bytes per write (None: refuse, as when the socket is busy) and
    keeping the rest until ``finish_sending``."""

    def __init__(self, inner: MemoryMessageStream, room: int | None) -> None:
        super().__init__(inner._send, inner._receive)
        self.room = room
        self.now: list[str] = []
        self.kept = b""
        self.raw: list[bytes] = []
        self.queued: list[str] = []  # written by the writer task

    def send_messages_now(self, texts: Any) -> bool | None:
        if self.room is None:
            return None
        data = "".join(texts).encode()
        self.now.extend(texts)
        self.kept = data[self.room :]
        return bool(self.kept)

    async def finish_sending(self) -> None:
        self.raw.append(self.kept)
        self.kept = b""

    async def send_message(self, text: str) -> None:
        self.queued.append(text)
        await super().send_message(text)


@pytest.mark.parametrize("room", [None, 1000, 10])
async def test_a_deferred_answer_is_written_by_its_caller_when_the_writer_waits(
    room: int | None,
) -> None:
    """``answer_now(before=...)`` on a NowSender with the writer idle: the updates and the
    answer are written from the calling task, in order; the rest of a partial write goes
    out first through the writer; a stream that cannot write now leaves it all to the
    writer."""
    dispatcher = DeferringDispatcher()
    ours, theirs = memory_message_stream_pair()
    stream = NowStream(ours, room)
    async with trio.open_nursery() as nursery:
        peer = Peer(stream, dispatcher)
        await nursery.start(peer.run)
        raw = Raw(theirs)
        await raw.send({"id": 1, "method": "later"})
        await trio.testing.wait_all_tasks_blocked()
        assert peer.answer_now(1, {"ok": True}, before=['{"u":1}', '{"u":2}'])
        answer = '{"jsonrpc":"2.0","id":1,"result":{"ok":true}}'
        if room is None:
            assert stream.now == []
            await trio.testing.wait_all_tasks_blocked()
            assert stream.queued == ['{"u":1}', '{"u":2}', answer]
        else:
            assert stream.now == ['{"u":1}', '{"u":2}', answer]  # before any other task ran
            await trio.testing.wait_all_tasks_blocked()
            written = ('{"u":1}{"u":2}' + answer).encode()
            assert stream.raw == ([written[room:]] if room < len(written) else [])
            assert stream.queued == []
            # The writer still works afterwards, after the rest of the partial write.
            await peer.notify("later/note")
            await trio.testing.wait_all_tasks_blocked()
            assert len(stream.queued) == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("room", [None, 1000])
async def test_encoded_messages_sent_now_are_written_by_the_caller_when_the_writer_waits(
    room: int | None,
) -> None:
    """``send_encoded_now`` on a NowSender with the writer idle writes from the calling
    task, before any other task runs (a lone turn's last updates leave before its commit);
    a stream that cannot write now leaves them to the writer."""
    ours, _theirs = memory_message_stream_pair()
    stream = NowStream(ours, room)
    async with trio.open_nursery() as nursery:
        peer = Peer(stream, Dispatcher({}))
        await nursery.start(peer.run)
        await trio.testing.wait_all_tasks_blocked()
        assert peer.send_encoded_now(['{"u":1}', '{"u":2}'])
        if room is None:
            assert stream.now == []
            await trio.testing.wait_all_tasks_blocked()
            assert stream.queued == ['{"u":1}', '{"u":2}']
        else:
            assert stream.now == ['{"u":1}', '{"u":2}']
            assert stream.queued == []
        nursery.cancel_scope.cancel()


class _BreakingStream:
    """A stream whose one send waits for ``release``, then finds the connection gone; its
    other side sends ``texts`` and then nothing."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.release = trio.Event()

    async def receive_message(self) -> str:
        if self.texts:
            await trio.lowlevel.checkpoint()
            return self.texts.pop(0)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send_message(self, text: str) -> None:
        await self.release.wait()
        raise trio.BrokenResourceError("connection reset")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_stream_that_breaks_while_the_reader_waits_on_a_full_outbox_ends_quietly() -> None:
    """The reader waits to queue an answer (an error for bad JSON) on a full outbox when the
    writer's send fails: the writer closes the outbox, and the reader's wait ended in
    ``PeerClosed``, which escaped ``run`` (Hypercorn logged "Error in ASGI Framework" with
    a traceback). The connection is just over."""
    stream = _BreakingStream(["not json"] * 5)
    peer = Peer(stream, Dispatcher(), outbox_size=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            await trio.testing.wait_all_tasks_blocked()  # the reader waits on the outbox
            assert len(peer._outbox) == 1
            stream.release.set()
    assert peer.closed and peer.lost


async def test_held_writes_wait_and_are_unsent_if_the_stream_ends_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``hold_writing`` (a connection probed for a take-over, which may be half-open):
    nothing is written while held; released, what waited goes, in order. Should the
    stream end while held, what waited is among ``unsent()``, to be kept for the
    client's next connection, not written into a socket it will never read."""
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher())
        held = peer.hold_writing()
        await peer.notify("a")
        await peer.notify("b")
        with trio.move_on_after(1) as waited:
            await raw.recv()
        assert waited.cancelled_caught  # (nothing was written while held)
        peer.release_writing(held)
        assert [(await raw.recv())["method"] for _ in range(2)] == ["a", "b"]
        await peer.notify("c")
        assert (await raw.recv())["method"] == "c"  # (no hold left behind)

        peer.hold_writing()
        await peer.notify("d")
        await trio.testing.wait_all_tasks_blocked()
        await raw.stream.aclose()  # the client is gone
        with trio.fail_after(1):
            while not peer.closed:
                await trio.testing.wait_all_tasks_blocked()
        assert [json.loads(text)["method"] for text in peer.unsent()] == ["d"]


async def test_two_holds_are_released_each_by_its_own_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two holds at once (a re-attaching ``initialize``'s, whose answer's task has not
    run yet, and a take-over probe's of that same connection, taken in that scheduler
    step): ``hold_writing`` handed the second the first's event, and the first's release
    (the ``initialize`` answered) released the probe's too, so what the connection's
    sessions sent during the probe was written to a connection perhaps half-open, and
    lost. Writing is held until both are released."""
    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher())
        first = peer.hold_writing()
        second = peer.hold_writing()
        await peer.notify("a")
        peer.release_writing(first)
        with trio.move_on_after(1) as waited:
            await raw.recv()
        assert waited.cancelled_caught  # (still held by the second)
        peer.release_writing(second)
        assert (await raw.recv())["method"] == "a"
        peer.release_writing(first)  # (released twice: nothing changes)
        await peer.notify("b")
        assert (await raw.recv())["method"] == "b"  # (no hold left behind)
        nursery.cancel_scope.cancel()


async def test_what_the_writer_takes_while_held_waits_in_the_outbox(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What the writer takes while writing is held goes back to the outbox to wait, so
    ``queued()`` counts it and an answer queued ``at`` a place taken before it goes
    ahead of it (a re-attaching ``initialize``'s answer, ahead of a session's update
    queued between the hold and the answer). Kept aside by the writer, it was written
    first all the same."""
    answered = trio.Event()

    async def answered_at_the_hold(params: Params) -> str:
        await answered.wait()
        return "answered already"

    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher({"init": answered_at_the_hold}))
        await raw.send({"id": 1, "method": "init"})
        await trio.testing.wait_all_tasks_blocked()
        held, place = peer.hold_writing(), peer.queued()
        await peer.notify("update")
        await trio.testing.wait_all_tasks_blocked()  # (the writer took it, and waits)
        assert peer.queued() == place + 1
        assert peer.answer_now(1, {"first": True}, at=place)
        peer.release_writing(held)
        first, second = await raw.recv(), await raw.recv()
        assert first == {"jsonrpc": "2.0", "id": 1, "result": {"first": True}}
        assert second["method"] == "update"
        answered.set()
        nursery.cancel_scope.cancel()


async def test_a_hold_on_a_connection_already_ending_holds_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection whose client has gone (its reader ended) but whose ``run`` is not
    over (a handler still winds down) is still listed, and may be probed for a take-over.
    ``hold_writing`` then parked its writer for good on the handler's last answer: ``run``
    never returned, the connection was never detached, and the take-over waited for that
    until its 30 s limit and refused the client. Once the reader has ended nothing is
    held (as ``run`` releases a hold then): what is queued goes, or is unsent."""
    release = trio.Event()

    async def winding_down(params: Params) -> str:
        with trio.CancelScope(shield=True):
            await release.wait()
        return "late"

    async with trio.open_nursery() as nursery:
        peer, raw = await start_peer(nursery, Dispatcher({"slow": winding_down}))
        await raw.send({"id": 1, "method": "slow"})
        await trio.testing.wait_all_tasks_blocked()
        await raw.stream.aclose()  # the client is gone; its request winds down
        await trio.testing.wait_all_tasks_blocked()
        assert peer.lost and not peer.closed
        held = peer.hold_writing()  # (a prober releases it only once the connection ends)
        release.set()
        await trio.sleep(60)  # (the clock's time: far past any pass the end needs)
        assert peer.closed and held.is_set()
        nursery.cancel_scope.cancel()


async def test_a_held_reader_reads_nothing_more_until_released() -> None:
    """``hold_reading``, from a handler's synchronous part: the next message is read only
    once the handler releases it (an ``initialize`` that waits for a probe decides
    before a request pipelined behind it is handled)."""
    order: list[str] = []

    async with trio.open_nursery() as nursery:
        release = trio.Event()
        dispatcher = Dispatcher()
        peer, raw = await start_peer(nursery, dispatcher)

        def first(params: Params) -> Awaitable[Any]:
            held = peer.hold_reading()

            async def run() -> str:
                await release.wait()
                order.append("first decided")
                held.set()
                return "first"

            return run()

        async def second(params: Params) -> str:
            order.append("second handled")
            return "second"

        dispatcher.handlers.update({"first": first, "second": second})
        await raw.send({"id": 1, "method": "first"})
        await raw.send({"id": 2, "method": "second"})
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        release.set()
        answers = {(await raw.recv())["id"] for _ in range(2)}
        assert answers == {1, 2}
        assert order == ["first decided", "second handled"]
        nursery.cancel_scope.cancel()


class BreakingStream(MemoryMessageStream):
    """A memory stream whose writes fail once ``broken`` (a socket reset: the write
    fails before the reader has seen the end of the stream)."""

    def __init__(self, inner: MemoryMessageStream) -> None:
        super().__init__(inner._send, inner._receive)
        self.broken = False

    async def send_message(self, text: str) -> None:
        if self.broken:
            raise trio.BrokenResourceError("connection reset")
        await super().send_message(text)


async def test_an_answer_ready_as_the_stream_breaks_is_unsent_not_lost() -> None:
    """A handler's result comes in the scheduler step the writer finds the stream broken
    (a ``session/close`` whose work ended just then: it does not see the cut). Its
    answer could not be queued (the outbox closed, the peer's tasks cancelled), and was
    dropped without a word: not written, and not among ``unsent()`` either, so nothing
    was kept for the client's return, which was told "no answer to this request will
    come" of a close that had taken effect (found by a seeded reconnect test, 1 run in
    about 15). It is among ``unsent()`` now, after what was queued before it."""
    release = trio.Event()

    async def work(params: Params) -> Any:
        with trio.CancelScope(shield=True):  # (its end does not hang on the cut)
            await release.wait()
        return {"done": True}

    ours, theirs = memory_message_stream_pair()
    stream = BreakingStream(ours)
    peer = Peer(stream, Dispatcher({"work": work}))
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        await Raw(theirs).send({"id": "w", "method": "work"})
        await trio.testing.wait_all_tasks_blocked()
        stream.broken = True
        await peer.notify("n")  # (the writer meets the break, and the peer ends)
        await trio.testing.wait_all_tasks_blocked()
        assert peer.lost and not peer.closed  # (run waits for the handler)
        release.set()
    assert peer.closed
    unsent = [json.loads(text) for text in peer.unsent()]
    assert unsent == [
        {"jsonrpc": "2.0", "method": "n"},
        {"jsonrpc": "2.0", "id": "w", "result": {"done": True}},
    ], unsent


class _CountingObserver:
    def __init__(self) -> None:
        self.errors: list[int] = []

    def message_in(self) -> None:
        pass

    def message_out(self, count: int = 1) -> None:
        pass

    def error_sent(self, code: int) -> None:
        self.errors.append(code)

    def limit_hit(self, limit: str) -> None:
        pass


async def test_an_error_answer_ready_as_the_stream_breaks_is_counted_once() -> None:
    """An error answer too late to be queued (the stream broke as its handler ended) is
    among ``unsent()``, kept for the client's return and sent from there uncounted, as
    a kept answer is (it was counted when it was queued). It was counted nowhere:
    ``punie_errors_total`` missed it."""
    release = trio.Event()

    async def work(params: Params) -> Any:
        with trio.CancelScope(shield=True):
            await release.wait()
        raise RpcError(INVALID_REQUEST, "no")

    ours, theirs = memory_message_stream_pair()
    stream = BreakingStream(ours)
    observer = _CountingObserver()
    peer = Peer(stream, Dispatcher({"work": work}), observer=observer)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        await Raw(theirs).send({"id": "w", "method": "work"})
        await trio.testing.wait_all_tasks_blocked()
        stream.broken = True
        await peer.notify("n")
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    unsent = [json.loads(text) for text in peer.unsent()]
    assert unsent[-1]["error"]["code"] == INVALID_REQUEST, unsent
    assert observer.errors == [INVALID_REQUEST]
