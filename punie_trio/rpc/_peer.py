"""One bidirectional JSON-RPC endpoint over a :class:`MessageStream`.

A :class:`Peer` runs three kinds of task in its own nursery: one reader, one writer draining
a bounded outbox (so frames never interleave), and one task per incoming request (so a
handler that awaits the other side never blocks the reader that will deliver the answer).

Ordering: the dispatcher's ``handle_request``/``handle_notification`` are *synchronous* and
called by the reader in arrival order. A handler validates and registers its work there and
returns the awaitable that does the rest. That is what makes ``session/prompt`` followed at
once by ``session/cancel`` race-free: the prompt's turn is registered before the cancel is read.

A handler may instead return a :class:`Deferred`: the work runs elsewhere (a turn runs in its
project worker and is relayed by a task that outlives the connection within the reconnect
grace) and whoever has it answers with :meth:`Peer.answer_now`. No task is started here for
it, which matters for a request as frequent as ``session/prompt``.

Resource handling: :meth:`run` owns every task. When it returns (the stream ended, the writer
failed, or the caller cancelled it) request handlers are cancelled and every pending outbound
request fails with :class:`PeerClosed`.

Error handling: malformed input is answered (-32700/-32600 with the id when readable) and the
peer keeps reading; a handler's :class:`RpcError` becomes that error response, any other
exception a logged -32603; an error response with ``id: null`` from the other side is logged.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, cast

import attrs
import trio

from ..transport import (
    HEAD_BYTES,
    BatchSender,
    MessageStream,
    MessageTooLarge,
    NotSent,
    NowSender,
)
from ._codec import (
    BATCH_REFUSED,
    ErrorResponse,
    MalformedMessage,
    Message,
    Notification,
    Params,
    Request,
    RequestId,
    Response,
    parse,
    peek_envelope,
    serialize,
    serialize_aside,
    valid_id,
)
from ._errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    REQUEST_CANCELLED,
    PeerClosed,
    RpcError,
)
from ._outbox import OUTBOX_BYTES, Outbox

log = logging.getLogger("punie_trio.rpc")

CANCEL_REQUEST = "$/cancel_request"
# Most messages the writer hands to the transport at once.
WRITE_BATCH = 64
# Queued ahead of everything when answer_now wrote part of the queue itself: the writer
# has the transport write the rest it kept (NowSender.finish_sending).
FINISH_SENDING = b""

# The id of the request whose handler is running in this task (each handler task has its own
# context), so a handler can answer it later from elsewhere (see Peer.send_answer).
current_request_id: contextvars.ContextVar[RequestId] = contextvars.ContextVar("current_request_id")


class Dispatcher(Protocol):
    """What a :class:`Peer` calls for incoming calls. Both methods run in the reader task."""

    def handle_request(self, method: str, params: Params) -> Awaitable[Any] | Deferred:
        """Validate and register synchronously (raise :class:`RpcError` to refuse), then
        return the awaitable whose result is the response, or a :class:`Deferred` for a
        request answered later with :meth:`Peer.answer_now`."""
        ...

    def handle_notification(self, method: str, params: Params) -> None:
        """Act on a notification without blocking. Unknown ones should be ignored."""
        ...

    def request_refused(self, request_id: RequestId) -> None:
        """A request with ``request_id`` was refused (or, a ``$/cancel_request``, answered)
        before :meth:`handle_request` saw it (its id in use, or too many in flight): the
        client has used the id all the same."""
        ...


class PeerObserver(Protocol):
    """Hooks for metrics. Called synchronously; must not block."""

    def message_in(self) -> None: ...

    def message_out(self, count: int = 1) -> None: ...

    def error_sent(self, code: int) -> None: ...

    def limit_hit(self, limit: str) -> None:
        """A limit of the connection's was hit: ``"outbox"`` (a producer waits for a
        client that does not read), ``"concurrent_requests"``, ``"max_message_bytes"``."""


class _NullObserver:
    def message_in(self) -> None:
        pass

    def message_out(self, count: int = 1) -> None:
        pass

    def error_sent(self, code: int) -> None:
        pass

    def limit_hit(self, limit: str) -> None:
        pass


class _Gone:
    """The dispatcher of a peer whose :meth:`Peer.run` is over (nothing calls it)."""

    def handle_request(self, method: str, params: Params) -> Awaitable[Any] | Deferred:
        raise RpcError(INTERNAL_ERROR, "connection closed")

    def handle_notification(self, method: str, params: Params) -> None:
        pass

    def request_refused(self, request_id: RequestId) -> None:
        pass


_GONE = _Gone()


@attrs.define(eq=False, slots=True)
class Deferred:
    """Returned by :meth:`Dispatcher.handle_request` for a request it answers later, from
    another task, with :meth:`Peer.answer_now` (which cannot fail for lack of room: an answer
    is always queued, so the number of answers in the outbox stays bounded by the number of
    running requests).

    ``on_cancel(lost)`` is called if the request is still unanswered when the other side
    sends ``$/cancel_request`` for it (``lost`` False: the request stays running, the
    owner should answer it soon, usually with :data:`REQUEST_CANCELLED`), or when the
    connection goes away or is cancelled (``lost`` True when the other side left; the
    request is dropped from the peer, its answer can no longer be delivered here). At
    most once for each ``lost``, and once in all but for a request the other side
    cancelled and then left: that one is told both, because its owner may keep its
    answer for a client that comes back (told only of the cancel, a cancelled prompt's
    answer went nowhere). It runs synchronously in the peer's task and must not block.
    """

    on_cancel: Callable[[bool], None]
    cancelled: bool = False
    lost: bool = False

    def _cancel(self, lost: bool) -> None:
        if lost and not self.lost:
            self.lost = self.cancelled = True
            self.on_cancel(True)
        elif not self.cancelled:
            self.cancelled = True
            self.on_cancel(lost)


@attrs.define(eq=False)
class _PendingCall:
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@attrs.define(eq=False)
class Peer:
    """A JSON-RPC 2.0 endpoint. Call :meth:`run` (startable) and then :meth:`request` and
    :meth:`notify` from any task while it runs.

    ``outbox_size`` bounds queued outgoing messages, and ``outbox_bytes`` their size; when
    either is reached, senders wait (backpressure on whoever produces: a slow client slows
    only the work addressed to it).
    ``max_concurrent_requests`` bounds handler tasks; past it requests are refused with
    -32603 rather than queued, because a handler may be waiting on a reply that only the
    (unblocked) reader can deliver.
    """

    stream: MessageStream
    dispatcher: Dispatcher
    outbox_size: int = 256
    max_concurrent_requests: int = 256
    outbox_bytes: int = OUTBOX_BYTES
    observer: PeerObserver = attrs.field(factory=_NullObserver)
    # Called when the other side ends its half of a half-closable stream (NDJSON EOF). When
    # set, running handlers are not cancelled at EOF: they finish and their answers drain
    # (the callback is where the owner cuts long work short, e.g. cancels turns).
    on_eof: Callable[[], None] | None = None
    #: Methods whose requests a ``$/cancel_request`` does not cancel (the cancellation
    #: page: the receiver MAY cancel). The connection's end still cancels them.
    uncancellable: frozenset[str] = frozenset()
    #: Told each answer to a request of the other side once it is queued (its id and its
    #: text), but a :class:`Deferred`'s (``answer_now``) and one spelled apart
    #: (``serialize_aside``): a client's connection remembers them, for should it drop
    #: they may be lost in flight (``ClientConnection.answered``). None: nothing is told,
    #: at no cost per answer but that test.
    on_answer: Callable[[RequestId, str], None] | None = attrs.field(default=None, init=False)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _pending: dict[RequestId, _PendingCall] = attrs.field(factory=dict, init=False)
    # Running requests: a handler task's cancel scope, or a Deferred answered from elsewhere.
    _running: dict[RequestId, trio.CancelScope | Deferred] = attrs.field(factory=dict, init=False)
    # Running requests already answered by answer_now (made on first use).
    _answered: set[RequestId] | None = attrs.field(default=None, init=False)
    # Running requests of an ``uncancellable`` method (made on first use).
    _not_cancellable: set[RequestId] | None = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    # Set when the last running handler finishes, for whoever waits for that (run's end).
    _handlers_done: trio.Event | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _finishing: bool = attrs.field(default=False, init=False)
    _lost: bool = attrs.field(default=False, init=False)
    _eof: bool = attrs.field(default=False, init=False)
    # Set by hold_reading: the reader reads nothing more until it is set.
    _reading_held: trio.Event | None = attrs.field(default=None, init=False)
    # Set by hold_writing: the writer writes nothing more until it is set (as the last
    # of the holds not yet released, ``_holds``, is).
    _writing_held: trio.Event | None = attrs.field(default=None, init=False)
    _holds: int = attrs.field(default=0, init=False)
    _reader_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _outbox: Outbox = attrs.field(init=False)
    # What the writer had taken but not sent when the stream broke (see unsent()).
    _unwritten: list[str] | None = attrs.field(default=None, init=False)
    # Answers whose handler ended once the stream had broken, too late to be queued (see
    # _queue_answer and unsent()).
    _unqueued: list[str] | None = attrs.field(default=None, init=False)
    _now_sender: NowSender | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._outbox = Outbox(self.outbox_size, self.outbox_bytes)
        self._outbox.observer = self.observer
        self._now_sender = self.stream if isinstance(self.stream, NowSender) else None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lost(self) -> bool:
        """The other side went away (EOF, disconnect, broken stream), as opposed to a
        :meth:`finish` or a cancellation from our side."""
        return self._lost

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the stream ends. Pending requests then fail with :class:`PeerClosed`.

        Resource handling: one nursery holds the writer and every request handler (an idle
        connection is cheaper with one than with a nursery each); each handler has its own
        cancel scope in ``_running``, which is how they are cancelled without the writer.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer, nursery.cancel_scope)
                task_status.started()
                with self._reader_scope:
                    await self._reader()
                if self._writing_held is not None:
                    # The connection is over: what is queued is written (or, the stream
                    # lost, kept as unsent) as it would have been.
                    self._writing_held.set()
                    self._writing_held = None
                    self._holds = 0
                if self._eof and self.on_eof is not None:
                    # The other side closed only its sending half (stdin EOF): our
                    # answers can still reach it, so let the handlers finish.
                    self.on_eof()
                elif not self._finishing:
                    self._drop_deferred()
                    for entry in self._running.values():
                        assert not isinstance(entry, Deferred)
                        entry.cancel()
                if self._running:
                    self._handlers_done = trio.Event()
                    await self._handlers_done.wait()
                # Handlers are done and their last answers queued: let the writer drain them.
                self._outbox.close()
        finally:
            self._close()

    def unsent(self) -> list[str]:
        """Once :meth:`run` has returned: the messages queued that the writer never wrote
        (the stream broke first), in order, then the answers whose handlers ended too
        late to queue them (the stream had broken: see :meth:`_queue_answer`), taken out
        of the peer. Empty before that.

        With a :class:`BatchSender`, a batch whose write failed is not among them: part of
        it may have gone out, and a message must not be sent twice. (Unless the stream
        refused it whole, :class:`~punie_trio.transport.NotSent`: then it is.)"""
        if not self._closed:
            return []
        unwritten, self._unwritten = self._unwritten or [], None
        unqueued, self._unqueued = self._unqueued or [], None
        return unwritten + self._outbox.unsent() + unqueued

    def hold_reading(self) -> trio.Event:
        """Read no further message until the returned event is set. Called by a
        handler's synchronous part: the message being dispatched is then the last one
        read until the event is set (whatever the handler's task does meanwhile).

        Why: a request whose synchronous decision must wait (``initialize`` naming a
        client id whose connection is being probed: ``ClientConnection``) still decides
        before the next message is handled, as it would have at once: a request
        pipelined behind it finds the connection as that decision left it."""
        held = self._reading_held = trio.Event()
        return held

    def queued(self) -> int:
        """How many messages are queued, not yet taken by the writer (an ``at`` of
        :meth:`answer_now`). While writing is held, all that is not written: the writer
        puts back what it takes meanwhile, so a place taken here stays behind what was
        queued before and ahead of what comes after."""
        return len(self._outbox)

    def hold_writing(self) -> trio.Event:
        """Write nothing more to the stream until the returned event is set (or the
        connection ends): what is sent meanwhile stays queued, and is among
        :meth:`unsent` should the stream be lost. (Bytes the stream writes by itself, a
        WebSocket ping, are not held.)

        Why: a connection being probed (``Manager.take_over``: its client id is named by
        a new connection) may be half-open, and what is written to it then never
        arrives, and is never sent again (only what was not written is). Held, it goes
        to the client's new connection if this one is dropped, and on here if not.

        Nothing is held (the event comes back set) once the connection is over: the
        other side left, or :meth:`finish` was called. :meth:`run` then ends with what
        is queued written or unsent, as it releases a hold at that point; held after it,
        the writer waited with a handler's last answer and :meth:`run` never returned
        (the connection, never detached, kept its prober waiting).

        Each hold is its own (the event returned), and writing resumes once every hold
        is released. Two holds at once (a re-attaching ``initialize``'s, whose answer's
        task had not run yet, and a take-over probe's of that connection, taken in that
        scheduler step) once shared one event: the ``initialize``'s release ended the
        probe's hold too, and what the sessions sent during the probe was written to a
        connection perhaps half-open."""
        held = trio.Event()
        if self._lost or self._finishing:
            held.set()
            return held
        if self._writing_held is None or self._writing_held.is_set():
            self._writing_held = trio.Event()
        self._holds += 1
        return held

    def release_writing(self, held: trio.Event) -> None:
        """End the hold :meth:`hold_writing` returned ``held`` for (once: a hold released
        already, or one that held nothing, changes nothing)."""
        if not held.is_set():
            held.set()
            self._holds = max(self._holds - 1, 0)  # (0 once run's end released all)
            if not self._holds and self._writing_held is not None:
                self._writing_held.set()
                self._writing_held = None
        self._outbox.wake()  # (what was queued meanwhile, if the writer waits for it)

    def finish(self) -> None:
        """End gracefully: stop reading, let running handlers complete and their answers
        drain, then return from :meth:`run`. Used at shutdown, after turns were cancelled,
        and to close a connection refused past the connection limit (called from a
        handler's synchronous part, which then returns an awaitable: an error raised
        there is sent by the reader, which the stop cuts)."""
        self._finishing = True
        self._reader_scope.cancel()

    def _drop_deferred(self) -> None:
        """Forget every unanswered :class:`Deferred`, telling each owner why."""
        dropped = [(i, e) for i, e in self._running.items() if isinstance(e, Deferred)]
        for request_id, _ in dropped:
            del self._running[request_id]
        for _, entry in dropped:
            entry._cancel(self._lost)

    def _close(self) -> None:
        self._closed = True
        self._nursery = None
        # The dispatcher (the connection) holds this peer: without this, the two, and
        # everything they hold (the stream, what is queued), would be freed only by the
        # collector, which the server runs rarely. Only the reader calls them; it is done.
        self.dispatcher = _GONE
        self.on_eof = None
        self.on_answer = None
        self._outbox.close()
        self._drop_deferred()
        for call in self._pending.values():
            if not call.done.is_set():
                call.error = PeerClosed("connection closed before the answer arrived")
                call.done.set()

    # -- outgoing ---------------------------------------------------------------------------

    async def _send(self, msg: Message, text: str | None = None) -> None:
        """Queue ``msg`` (spelled as ``text``, if given), an error counted as sent."""
        await self.send_encoded(serialize(msg) if text is None else text)
        if isinstance(msg, ErrorResponse):
            self.observer.error_sent(msg.code)

    async def _queue_answer(self, msg: Response | ErrorResponse) -> None:
        """:meth:`_send` for the answer to a request of the other side: ``on_answer`` is
        told it once it is queued."""
        text = serialize(msg)
        try:
            await self._send(msg, text)
        except BaseException:
            if self._lost:
                # The stream broke first (the writer closed the outbox and cancelled
                # our tasks), as the handler got its result: never written, the answer
                # is among unsent(), after what was queued before it. Dropped here, a
                # session/close's answer was lost without a word though the close took
                # effect, and the client back awaiting it was told -32603.
                if self._unqueued is None:
                    self._unqueued = []
                self._unqueued.append(text)
                if isinstance(msg, ErrorResponse):
                    # (Counted as a queued one is: sent again from what a client away
                    # is kept, an answer is not counted again. It was counted nowhere.)
                    self.observer.error_sent(msg.code)
            raise
        if self.on_answer is not None and msg.id is not None:
            self.on_answer(msg.id, text)

    async def _queue(self, text: str) -> None:
        # No trip through the scheduler while the outbox has room: the writer drains in
        # batches, and a turn streaming thousands of updates would otherwise pay an
        # epoll_wait per update. Waits only when the outbox is full. Callers make the
        # cancellation point.
        try:
            try:
                self._outbox.send_nowait(text)
            except trio.WouldBlock:
                await self._outbox.send(text)
        except trio.ClosedResourceError:
            raise PeerClosed("connection closed") from None

    async def _refuse(self, msg: Response | ErrorResponse) -> None:
        """Send the reader's own answer to a message it does not dispatch (malformed, too
        large, a ``$/cancel_request`` sent as a request, an id in use): spelled apart
        (:func:`serialize_aside`) when another request of the other side is in flight
        under its id, for that answer is not the running request's (kept for a client's
        return as if it were, it was sent to the client back awaiting the prompt under
        that id, whose real answer was then dropped)."""
        if msg.id is not None and msg.id in self._running:
            await self._send(msg, serialize_aside(msg))
        else:
            await self._queue_answer(msg)

    async def notify(self, method: str, params: Params = None) -> None:
        """Send a notification (waits while the outbox is full)."""
        await self._send(Notification(method, params))

    async def send_encoded(self, text: str) -> None:
        """Send a message the caller already encoded (compact JSON-RPC text, no newline):
        the hub encodes each ``session/update`` once and splices stored updates into their
        replay without decoding them. Waits while the outbox is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._queue(text)

    async def send_encoded_many(self, texts: Sequence[str]) -> None:
        """:meth:`send_encoded` for each of ``texts``, in order (a replayed page): queued
        as many at a time as the outbox has room for, waiting for room in between."""
        await trio.lowlevel.checkpoint_if_cancelled()
        outbox = self._outbox
        done, count = 0, len(texts)
        try:
            while (done := done + outbox.send_some_nowait(texts, done)) < count:
                await outbox.send(texts[done])  # full: wait for room for the next one
                done += 1
        except trio.ClosedResourceError:
            raise PeerClosed("connection closed") from None

    async def wait_for_room(self) -> None:
        """Wait until the outbox is below its bounds, or closed: for a producer about to
        queue messages past them (:meth:`answer_now`'s ``before``), so that a client that
        does not read holds only a bounded backlog however many turns finish for it."""
        await self._outbox.wait_for_room()

    def send_encoded_now(self, texts: Iterable[str]) -> bool:
        """Queue already encoded messages at once, even past the outbox's bound (the
        caller bounds how many: a turn's last updates), and write them from this task if
        the writer is idle (as :meth:`answer_now` does). False if the outbox is closed
        (nothing queued)."""
        if self._outbox.closed:
            return False
        for text in texts:
            self._outbox.force(text, wake=False)
        self._write_queued_now()
        return True

    def answer_now(
        self,
        request_id: RequestId,
        result: Any = None,
        error: RpcError | None = None,
        *,
        before: Sequence[str] = (),
        at: int | None = None,
    ) -> bool:
        """Queue the answer to a request that is still running here, from whichever task
        has it (a turn's relay answers ``session/prompt`` in the same scheduler pass as the
        turn's last update, so both leave in one write).

        For a :class:`Deferred` request this is how it is answered: the answer is queued
        even when the outbox is full, and False means only that the request is no longer
        running here (answered, or dropped with its connection). For a request with a
        handler task, the handler's own outcome is then dropped, and a ``$/cancel_request``
        for it is ignored; False (nothing queued) if it is not running here, is answered
        already, or the outbox is full or closed: the handler's return value answers it.

        ``before``: encoded messages to send just ahead of the answer (a turn's last
        updates), for a :class:`Deferred` request only (nothing is queued when it returns
        False). When the writer is idle and the stream is a
        :class:`~punie_trio.transport.NowSender`, this task writes the queue itself: the
        answer leaves now rather than in the writer's next scheduler step.

        ``at``: for a request with a handler task, queue the answer at that place in the
        outbox (:meth:`queued` when it was taken), ahead of what was queued since, and
        even when full (``initialize``'s answer on a re-attach: see ``ClientConnection``)."""
        entry = self._running.get(request_id)
        if entry is None or (self._answered is not None and request_id in self._answered):
            return False
        msg: Message = (
            Response(request_id, result)
            if error is None
            else ErrorResponse(request_id, error.code, error.message, error.data)
        )
        if isinstance(entry, Deferred):
            outbox = self._outbox
            if outbox.closed:
                return False
            for text in before:
                outbox.force(text, wake=False)
            outbox.force(serialize(msg), wake=False)
            self._write_queued_now()
            del self._running[request_id]
            if error is not None:
                self.observer.error_sent(error.code)
            if not self._running and self._handlers_done is not None:
                self._handlers_done.set()
            return True
        if before:
            raise ValueError("before= is for Deferred requests only")
        try:
            if at is None:
                self._outbox.send_nowait(serialize(msg))
            else:  # (queued even when full, as a Deferred's answer is)
                self._outbox.force(serialize(msg), at=min(at, len(self._outbox)))
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        if error is not None:
            self.observer.error_sent(error.code)
        if self._answered is None:
            self._answered = set()
        self._answered.add(request_id)
        return True

    def _write_queued_now(self) -> None:
        """Write what is queued from this task if the writer waits and the stream can
        write synchronously; else (or for what the socket did not take) wake the writer."""
        outbox = self._outbox
        sender = self._now_sender
        held = self._writing_held
        if sender is not None and outbox.taker_waiting and (held is None or held.is_set()):
            # The writer parks only on an empty outbox, so all of it was queued by this
            # call without waking it: texts, never the FINISH_SENDING marker (which wakes).
            texts = cast(list[str], outbox.peek())
            count = len(texts)
            try:
                pending = sender.send_messages_now(texts)
            except Exception:  # the writer meets it too and ends the connection
                log.exception("writing a turn's answer failed")
                pending = None
            if pending is not None:
                outbox.take_now(count)
                self.observer.message_out(count)
                if pending:  # the writer writes the rest before anything else
                    outbox.put_front(FINISH_SENDING)
                return
        outbox.wake()

    async def request(self, method: str, params: Params = None) -> Any:
        """Send a request and wait for its answer.

        Raises :class:`RpcError` for an error answer and :class:`PeerClosed` if the
        connection ends first. Per-request timeouts are Trio scopes around the call
        (``with trio.fail_after(t): await peer.request(...)``): when the wait is cancelled
        or times out, the other side is told with ``$/cancel_request``.
        """
        request_id = next(self._ids)
        call = _PendingCall()
        self._pending[request_id] = call
        text = serialize(Request(request_id, method, params))
        queued = False
        try:
            await self.send_encoded(text)
            queued = True
            await call.done.wait()
        except trio.Cancelled:
            if queued and not call.done.is_set():
                self._tell_cancelled(request_id, text)
            raise
        finally:
            del self._pending[request_id]
        if call.error is not None:
            raise call.error
        return call.result

    def in_flight(self, request_id: RequestId) -> bool:
        """Whether a request the client sent under ``request_id`` is not answered yet."""
        return request_id in self._running

    async def send_answer(
        self,
        request_id: RequestId,
        result: Any = None,
        error: RpcError | None = None,
        *,
        aside: bool = False,
    ) -> None:
        """Answer a request this peer did not dispatch here: a prompt that ran on while its
        client was away and reconnected (the shim keeps the IDE's request id). ``aside``:
        spelled apart (:func:`serialize_aside`), for an answer not to be kept for the
        client's return should it be left unwritten (``hub._grace._keep_unsent``)."""
        msg: Response | ErrorResponse
        if error is not None:
            msg = ErrorResponse(request_id, error.code, error.message, error.data)
        else:
            msg = Response(request_id, result)
        await self._send(msg, serialize_aside(msg) if aside else None)

    def _tell_cancelled(self, request_id: RequestId, text: str) -> None:
        """Tell the client that our request ``request_id`` (queued as ``text``,
        unanswered) is abandoned: taken out of the outbox if it is still there, unseen
        (:meth:`Outbox.withdraw`: it and a cancel were both sent, and the client showed
        what no one awaited); else ``$/cancel_request``, now, even past a full outbox.

        Why past the bound: the caller is being cancelled and cannot wait, and dropped
        (as it was when a client read slowly while a turn streamed) the client was never
        told: it went on waiting to answer a request no one awaited any more (a permission
        dialog left open for good, its answer then ignored). The overshoot is bounded: one
        such message per request of ours that the writer took (written, or being written)
        and that is unanswered, and those are bounded by the turns and tool calls
        running."""
        if self._outbox.closed:
            return  # (the connection is over: nothing can be sent)
        if self._outbox.withdraw(text):
            return
        self._outbox.force(serialize(Notification(CANCEL_REQUEST, {"requestId": request_id})))

    async def _writer(self, cancel_scope: trio.CancelScope) -> None:
        outbox = self._outbox
        stream = self.stream
        send_batch = stream.send_messages if isinstance(stream, BatchSender) else None
        try:
            while True:
                # Everything queued (up to WRITE_BATCH): one scheduler trip, and with a
                # BatchSender one system call, per batch rather than per message.
                try:
                    taken = await outbox.take(WRITE_BATCH)
                except trio.EndOfChannel:
                    break
                if isinstance(taken[0], bytes):  # FINISH_SENDING: see _write_queued_now
                    assert self._now_sender is not None
                    await self._now_sender.finish_sending()
                    del taken[0]
                    if not taken:
                        continue
                batch = cast(list[str], taken)
                held = self._writing_held
                if held is not None:
                    if self._writing_held is held and held.is_set():
                        self._writing_held = None
                    if not held.is_set():
                        # Put back, not kept aside: what is queued meanwhile may go ahead
                        # of it (answer_now's ``at``: a re-attaching initialize's answer
                        # behind what was queued before the hold, and ahead of this).
                        # (Kept aside here, the answer was queued behind it all the same.)
                        outbox.put_back(batch)
                        await held.wait()
                        continue
                if send_batch is not None and len(batch) > 1:
                    try:
                        # One write: if it fails, how much went is unknown, unless none did.
                        await send_batch(batch)
                    except NotSent:
                        self._unwritten = batch
                        raise
                else:
                    for written, text in enumerate(batch):
                        try:
                            await stream.send_message(text)
                        except BaseException:
                            # This one and the rest were not sent: see unsent(). Those
                            # before it were, and count (only whole batches did).
                            self._unwritten = batch[written:]
                            if written:
                                self.observer.message_out(written)
                            raise
                self.observer.message_out(len(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("peer writer: stream closed")
            self._lost = True
        finally:
            outbox.close()
        # Whether drained or broken, the connection is over for everyone.
        cancel_scope.cancel()

    # -- incoming ---------------------------------------------------------------------------

    async def _reader(self) -> None:
        try:
            await self._read_all()
        except PeerClosed:
            # The writer ended (the stream broke) and closed the outbox while an answer of
            # ours was being queued: the connection is over (it escaped as an ASGI error).
            self._lost = True

    async def _read_all(self) -> None:
        while True:
            try:
                text = await self.stream.receive_message()
            except MessageTooLarge as exc:
                await self._refuse_oversized(exc)
                continue
            except trio.EndOfChannel:
                self._lost = self._eof = True
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lost = True
                return
            self.observer.message_in()
            try:
                msg = parse(text)
            except MalformedMessage as exc:
                if exc.error.code == PARSE_ERROR:
                    why = exc.error.message.removeprefix("Parse error: ")
                    failure = f"the answer is not JSON: {why}"
                    await self._refuse_unread(_head(text), exc.error, failure)
                elif exc.batch:
                    await self._refuse_batch(exc)
                else:
                    await self._refuse(exc.response())
                continue
            await self._dispatch(msg)
            held = self._reading_held
            if held is not None:
                self._reading_held = None
                await held.wait()

    async def _refuse_oversized(self, exc: MessageTooLarge) -> None:
        """Answer a message dropped for its size (-32600): see :meth:`_refuse_unread`."""
        self.observer.limit_hit("max_message_bytes")
        error = RpcError(INVALID_REQUEST, f"Invalid request: {exc}")
        await self._refuse_unread(exc.head, error, f"the answer's {exc}")

    async def _refuse_unread(self, head: bytes, error: RpcError, failure: str) -> None:
        """Answer a message that could not be read (too large, not JSON) with ``error``,
        under its id if it was a request whose ``head`` (its first bytes) names one. If it
        was the answer to one of our requests, that request fails now, with the error's
        code and ``failure`` (why): it would otherwise wait out its timeout (the
        client-call timeout, 300 s), which then says the peer did not answer. (``error``
        goes out then too, with a null id: the only way to tell the peer.)

        Why the id: answered with a null one, a request whose JSON broke after its id
        (bad UTF-8 in a file's text) could not be told from any other by the client, which
        waited for its answer for good."""
        kind, request_id = peek_envelope(head)
        if kind == "response" and request_id is not None:
            self._resolve(request_id, error=RpcError(error.code, failure))
        if kind != "request":
            request_id = None
        elif request_id is not None:
            self.dispatcher.request_refused(request_id)
        await self._refuse(ErrorResponse(request_id, error.code, error.message, error.data))

    async def _refuse_batch(self, exc: MalformedMessage) -> None:
        """Refuse a batch: each request in it under its id (as a message of its own, the
        -32600 of ``exc``), and each answer in it to a request of ours fails that request
        now; a batch with no request, or with requests past those named
        (:data:`BATCH_IDS`), gets one refusal with a null id (which counts those).

        Why: refused as one, with a null id, the client could not tell which requests
        were refused and waited for their answers for good; our request answered there
        waited out its timeout (300 s for a client call), which then said the client had
        not answered."""
        refused = False
        for kind, request_id in exc.batch:
            if kind == "response":
                failure = RpcError(
                    exc.error.code, "the answer came in a batch, which is not supported"
                )
                self._resolve(request_id, error=failure)
                continue
            self.dispatcher.request_refused(request_id)
            error = ErrorResponse(request_id, exc.error.code, BATCH_REFUSED)
            await self._refuse(error)
            refused = True
        if exc.unnamed or not refused:
            await self._refuse(exc.response())

    async def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Request):
            await self._start_request(msg)
        elif isinstance(msg, Notification):
            self._on_notification(msg)
        elif isinstance(msg, Response):
            self._resolve(msg.id, result=msg.result)
        elif msg.id is None:
            log.warning("peer sent an error without an id: %s (code %s)", msg.message, msg.code)
        else:
            self._resolve(msg.id, error=RpcError(msg.code, msg.message, msg.data))

    def _resolve(
        self, request_id: RequestId, *, result: Any = None, error: RpcError | None = None
    ) -> None:
        call = self._pending.get(request_id)
        if call is None or call.done.is_set():
            log.warning("answer for unknown or finished request id %r ignored", request_id)
            return
        call.result, call.error = result, error
        call.done.set()

    def _on_notification(self, msg: Notification) -> None:
        if msg.method == CANCEL_REQUEST:
            request_id = msg.params.get("requestId") if isinstance(msg.params, dict) else None
            if valid_id(request_id):
                self._cancel_request(request_id)
            return
        try:
            self.dispatcher.handle_notification(msg.method, msg.params)
        except RpcError as exc:
            log.warning("notification %s refused: %s", msg.method, exc)
        except Exception:
            log.exception("notification handler for %s failed", msg.method)

    def _cancel_request(self, request_id: RequestId) -> None:
        """Cancel the handler of the other side's request ``request_id``, if it runs."""
        entry = self._running.get(request_id)
        if isinstance(entry, Deferred):
            entry._cancel(False)
        elif (
            entry is not None
            and not (self._answered and request_id in self._answered)
            and not (self._not_cancellable and request_id in self._not_cancellable)
        ):
            entry.cancel()

    async def _cancel_request_with_id(self, msg: Request) -> None:
        """``$/cancel_request`` sent as a request: it cancels as the notification does and
        is answered ``null`` (as ``session/cancel`` sent with an id is); params without a
        usable ``requestId`` are -32602. (It was -32601, "method not found", for a method
        that exists, and it cancelled nothing.)"""
        self.dispatcher.request_refused(msg.id)  # (its id used: see request_refused)
        params = msg.params
        request_id = params.get("requestId") if isinstance(params, dict) else None
        if not valid_id(request_id):
            message = "Invalid params: requestId must be the string or integer id of a request"
            await self._refuse(ErrorResponse(msg.id, INVALID_PARAMS, message))
            return
        self._cancel_request(request_id)
        await self._refuse(Response(msg.id, None))

    async def _start_request(self, msg: Request) -> None:
        if msg.method == CANCEL_REQUEST:
            await self._cancel_request_with_id(msg)
            return
        if msg.id in self._running:
            self.dispatcher.request_refused(msg.id)
            error = RpcError(INVALID_REQUEST, f"Invalid request: id {msg.id!r} is already in use")
            await self._refuse(ErrorResponse(msg.id, error.code, error.message))
            return
        if len(self._running) >= self.max_concurrent_requests:
            self.observer.limit_hit("concurrent_requests")
            self.dispatcher.request_refused(msg.id)
            error = RpcError(
                INTERNAL_ERROR,
                f"Too many concurrent requests (limit {self.max_concurrent_requests})",
            )
            await self._queue_answer(ErrorResponse(msg.id, error.code, error.message))
            return
        # The handler's synchronous part may want the id (to answer a Deferred later).
        current_request_id.set(msg.id)
        try:
            awaitable = self.dispatcher.handle_request(msg.method, msg.params)
        except RpcError as exc:
            await self._queue_answer(ErrorResponse(msg.id, exc.code, exc.message, exc.data))
            return
        except Exception as exc:
            log.exception("request handler for %s failed", msg.method)
            await self._queue_answer(
                ErrorResponse(msg.id, INTERNAL_ERROR, f"Internal error: {exc}")
            )
            return
        if isinstance(awaitable, Deferred):
            self._running[msg.id] = awaitable
            return
        scope = trio.CancelScope()
        self._running[msg.id] = scope
        if msg.method in self.uncancellable:
            if self._not_cancellable is None:
                self._not_cancellable = set()
            self._not_cancellable.add(msg.id)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_handler, msg, awaitable, scope)

    async def _run_handler(
        self, msg: Request, awaitable: Awaitable[Any], scope: trio.CancelScope
    ) -> None:
        try:
            answer = await self._answer(msg, awaitable, scope)
            if answer is not None and not (self._answered and msg.id in self._answered):
                await self._queue_answer(answer)
        except PeerClosed:
            pass
        finally:
            # Only now: a $/cancel_request for this id is moot once the answer is queued.
            self._running.pop(msg.id, None)
            if self._answered:
                self._answered.discard(msg.id)
            if self._not_cancellable:
                self._not_cancellable.discard(msg.id)
            if not self._running and self._handlers_done is not None:
                self._handlers_done.set()

    async def _answer(
        self, msg: Request, awaitable: Awaitable[Any], scope: trio.CancelScope
    ) -> Response | ErrorResponse | None:
        current_request_id.set(msg.id)
        try:
            with scope:
                result = await awaitable
        except RpcError as exc:
            return ErrorResponse(msg.id, exc.code, exc.message, exc.data)
        except PeerClosed:
            return None
        except Exception as exc:
            log.exception("request handler for %s failed", msg.method)
            return ErrorResponse(msg.id, INTERNAL_ERROR, f"Internal error: {exc}")
        if scope.cancelled_caught:
            return ErrorResponse(msg.id, REQUEST_CANCELLED, "Request cancelled")
        return Response(msg.id, result)


def _head(text: str | bytes) -> bytes:
    """The first bytes of a message (at most :data:`HEAD_BYTES`), for :func:`peek_envelope`."""
    if isinstance(text, str):
        text = text[:HEAD_BYTES].encode("utf-8", "surrogatepass")
    return bytes(text[:HEAD_BYTES])


def method_not_found(method: str) -> RpcError:
    return RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")
