"""The manager: every connection, session and project worker of the process.

State changes are plain synchronous code between awaits (Trio's cooperative scheduling makes
them atomic), so there is no lock anywhere, and none is ever held across network I/O.

Routing: a turn's events arrive on the turn's own channel and are relayed by the turn's relay
task, in the manager's nursery (so a turn can outlive its connection within the reconnect
grace). ``session/update``s therefore go to the session's owner, and ``fs/*``/``terminal/*``/
``session/request_permission`` calls to the connection that sent the running prompt; a slow
client blocks only its own relay, whose turn then waits on its bounded event channel (policy:
wait). No other client is delayed.

The cost of a prompt: the reader registers the turn and queues its ``StartTurn`` without
waiting; the peer starts no task for it (the request is a :class:`~punie_trio.rpc.Deferred`,
answered by the relay); a cancel is a ``CancelTurn`` queued from wherever it is decided. So a
prompt costs two task starts (the relay, the worker's turn) and, for a short answer, its
updates and its answer leave in one write.

Resource handling: workers live in the manager's worker nursery, one per project root, started
with the first session on the root and stopped (command channel closed) with its last. A
connection's sessions are dropped when it leaves; its turns are cancelled (the peer tells the
manager through the prompt's Deferred, and :meth:`Manager.detach` cancels the rest).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._json import without_surrogates
from .._metrics import Metrics
from ..acp import FS_READ_TEXT_FILE, FS_WRITE_TEXT_FILE, PromptParams, updates
from ..rpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    REQUEST_CANCELLED,
    Deferred,
    PeerClosed,
    RpcError,
    current_request_id,
)
from ..store import (
    STOP,
    MemoryStore,
    Payload,
    Store,
    StoreError,
)
from ..worker import (
    CancelTurn,
    ClientCall,
    ClientReply,
    Command,
    EventReceiver,
    EventSender,
    ForgetSession,
    ForgetTurn,
    Model,
    ProjectWorker,
    StartTurn,
    ToolCallLimiter,
    TurnEnv,
    TurnEvent,
    TurnFinished,
    Update,
    open_event_channel,
)
from . import _grace, _lifecycle
from ._lifecycle import _check_not_loading
from ._session import (
    ActiveTurn,
    Limits,
    Session,
    WorkerHandle,
    text_of,
    user_text,
)

if TYPE_CHECKING:
    from ._connection import ClientConnection

log = logging.getLogger("punie_trio.hub")

# Commands queued to one worker. The worker loop never blocks, so senders wait (briefly).
WORKER_COMMAND_BUFFER = 64
# Events of one turn not yet relayed to its client. Full: the turn waits (its client is slow).
TURN_EVENT_BUFFER = 32
# Time a finished or cancelled turn gets to commit its transcript, even when cancelled.
PERSIST_TIMEOUT = 10.0
# A lone turn on a store whose commit takes time writes its last updates before the commit
# when at least this many are held: reading them keeps the client busy while the commit
# runs. Fewer (an echo's one) leave with the answer: a second write costs more than the
# overlap saves (1 client, echo prompts: 0.94x -> 0.83x the SDK's prompts/s).
EARLY_WRITE_UPDATES = 4
# How long a finished turn's relay waits for its cancelled client calls to end (each only
# has to queue its $/cancel_request: one scheduler pass).
CALLS_END_TIMEOUT = 1.0
# Titles are the first prompt's first line, this long at most.
TITLE_CHARS = 80


@attrs.define(eq=False)
class Manager:
    """Routes every session. Start :meth:`run` in the root nursery before serving clients."""

    roots: tuple[str, ...]
    model: Model
    metrics: Metrics = attrs.field(factory=Metrics)
    limits: Limits = attrs.field(factory=Limits)
    closing: trio.Event = attrs.field(factory=trio.Event)
    store: Store = attrs.field(factory=MemoryStore)
    # The server's own files, which no tool may touch though a root may hold them: the
    # data directory and the config file, as ``(path, what)`` (``TurnEnv.private``).
    private: tuple[tuple[str, str], ...] = ()
    connections: set[ClientConnection] = attrs.field(factory=set, init=False)
    sessions: dict[str, Session] = attrs.field(factory=dict, init=False)
    workers: dict[str, WorkerHandle] = attrs.field(factory=dict, init=False)
    _turn_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _reattached: dict[str, trio.Event] = attrs.field(factory=dict, init=False)
    # The prompt times of clients (by client id) whose connection ended in the last minute:
    # a client that reconnects under its id goes on with its count (see prompt_times_for).
    _left_prompt_times: dict[str, list[float]] = attrs.field(factory=dict, init=False)
    # Session ids a session/delete is removing (how many deletes of each are under way).
    _deleting: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    # Each session's tool calls of the last minute, between its turns (a session outlives
    # its worker): handed to each turn as ages, and back when it ends.
    _tool_calls: ToolCallLimiter = attrs.field(init=False)
    # Turns registered and not yet finished, in every session (the store's group commit
    # need not wait for company when there is none).
    _running_turns: int = attrs.field(default=0, init=False)
    # The running turns of sessions dropped while they ran (a client left without grace,
    # or its grace ended), by session id, until each is recorded: a load (or delete) of
    # the session waits for it, or it would read the store without that turn.
    _ending: dict[str, ActiveTurn] = attrs.field(factory=dict, init=False)
    # Sessions dropped so far (any of them): a load whose read of the stored session
    # began before a drop reads it again once it has claimed it (see _load_session).
    _drops: int = attrs.field(default=0, init=False)
    # By client id: the sessions its grace period's end dropped with something the client
    # had not got (a running turn, kept updates or answers). It is told to reload them
    # when it comes back (see expired_for); at most max_connections client ids, oldest
    # forgotten first.
    _expired: dict[str, list[str]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.roots = tuple(str(Path(r).resolve()) for r in self.roots)
        self.private = tuple((str(Path(p).resolve()), what) for p, what in self.private)
        self._tool_calls = ToolCallLimiter(self.limits.tool_calls_per_minute)
        self.metrics.track(
            lambda: len(self.connections), lambda: len(self.sessions), lambda: len(self.workers)
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the worker nursery until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self.closing.wait()
                self._finish_connections()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for handle in self.workers.values():
                    handle.commands.close()

    # -- connections --------------------------------------------------------------------------

    def attach(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        if self.closing.is_set():
            self._finish_connections()

    def _finish_connections(self) -> None:
        """At shutdown: cancel every turn (each answers ``cancelled``), and have every
        connection stop reading and drain its answers. One watcher here rather than a task
        per connection: an idle connection then costs no task of its own."""
        self.cancel_all_turns()
        for conn in self.connections:
            if conn.peer is not None:
                conn.peer.finish()

    def check_client_id(self, client_id: str) -> None:
        if any(c.client_id == client_id and c.initialized for c in self.connections):
            raise RpcError(
                INVALID_REQUEST, f"Client id {client_id!r} is in use by another open connection"
            )

    # -- reconnect grace: _grace.py -----------------------------------------------------------

    detach = _grace.detach
    _keep_unsent = _grace._keep_unsent
    _keep_reload_notices = _grace._keep_reload_notices
    _grace_for = _grace._grace_for
    _keep_prompt_times = _grace._keep_prompt_times
    prompt_times_for = _grace.prompt_times_for
    reclaim = _grace.reclaim
    deliver_missed = _grace.deliver_missed
    _held_by = _grace._held_by
    _expire_grace = _grace._expire_grace
    _end_grace = _grace._end_grace
    _owe = _grace._owe
    expired_for = _grace.expired_for
    _bound_detached = _grace._bound_detached
    _buffer = _grace._buffer
    _flush = _grace._flush
    _deliver = _grace._deliver

    # -- sessions -----------------------------------------------------------------------------

    # The session lifecycle: _lifecycle.py.
    _roots_containing = _lifecycle._roots_containing
    checked_cwd = _lifecycle.checked_cwd
    check_inside_roots = _lifecycle.check_inside_roots
    _check_session_quota = _lifecycle._check_session_quota
    new_session = _lifecycle.new_session
    persist_new = _lifecycle.persist_new
    _serves = _lifecycle._serves
    _stored = _lifecycle._stored
    load_session = _lifecycle.load_session
    _unmark_after = staticmethod(_lifecycle._unmark_after)
    _load_session = _lifecycle._load_session
    _loadable = _lifecycle._loadable
    _replay = _lifecycle._replay
    list_sessions = _lifecycle.list_sessions
    _list_sessions = _lifecycle._list_sessions
    close_session = _lifecycle.close_session
    delete_session = _lifecycle.delete_session
    _waited_for_cut_turn = _lifecycle._waited_for_cut_turn
    owned_session = _lifecycle.owned_session

    def _open(
        self,
        conn: ClientConnection,
        session_id: str,
        root: str,
        cwd: str,
        additional: tuple[str, ...],
        *,
        turns: int = 0,
        title: str | None = None,
    ) -> Session:
        """Register a live session owned by ``conn``; ``root``, ``cwd`` and ``additional``
        as :meth:`checked_cwd` and :meth:`check_inside_roots` returned them."""
        worker = self._worker_for(root)
        session = Session(
            id=session_id,
            root=root,
            cwd=cwd,
            additional_directories=additional,
            owner=conn,
            worker=worker,
            turns=turns,
            title=title,
        )
        self.sessions[session.id] = session
        worker.sessions.add(session.id)
        return session

    def _drop_session(self, session: Session) -> None:
        """Forget a live session (it stays loadable from the store), cancelling its turn if
        one still runs (its relay records it as cancelled)."""
        if session.turn is not None:
            self.cancel_turn(session, session.turn)
            self._ending[session.id] = session.turn  # (until it is recorded)
        del self.sessions[session.id]
        self._drops += 1
        self.store.forget(session.id)
        handle = session.worker
        handle.sessions.discard(session.id)
        # (In order: a load of the same session that follows seeds its history after this.)
        self._command(handle, ForgetSession(session.id))
        if not handle.sessions:
            self.workers.pop(handle.root, None)
            if handle.backlog is not None:
                handle.close_after_backlog = True  # (the worker needs what waits there)
            else:
                handle.commands.close()

    def _worker_for(self, root: str) -> WorkerHandle:
        handle = self.workers.get(root)
        if handle is not None:
            return handle
        if self._nursery is None:
            raise RpcError(INTERNAL_ERROR, "Manager is not running")
        send, receive = trio.open_memory_channel[Command](WORKER_COMMAND_BUFFER)
        worker = ProjectWorker(
            root, self.model, receive, tool_calls_per_minute=self.limits.tool_calls_per_minute
        )
        handle = WorkerHandle(root, worker, send)
        self.workers[root] = handle
        self._nursery.start_soon(handle.worker.run, name=f"worker:{root}")
        return handle

    # -- turns --------------------------------------------------------------------------------

    def begin_prompt(self, conn: ClientConnection, params: PromptParams) -> ActiveTurn:
        """Register a turn synchronously (so a ``session/cancel`` read next finds it)."""
        if self.closing.is_set():
            raise RpcError(INTERNAL_ERROR, "Server is shutting down")
        session = self.owned_session(conn, params.session_id)
        if session.closing:
            raise RpcError(INVALID_REQUEST, f"Session {session.id} is closing")
        if session.turn is not None:
            raise RpcError(INVALID_REQUEST, f"Session {session.id} already has a prompt running")
        _check_not_loading(conn, session)
        now = trio.current_time()
        recent = conn.prompt_times
        expired = next((i for i, t in enumerate(recent) if t > now - 60.0), len(recent))
        del recent[:expired]
        per_minute = self.limits.prompts_per_minute
        if len(recent) >= per_minute:
            retry = recent[0] + 60.0 - now
            prompts = "prompt" if per_minute == 1 else "prompts"
            raise RpcError(
                INVALID_REQUEST,
                f"Rate limit: {per_minute} {prompts} per minute on this connection; "
                f"retry in {retry:.1f} s",
                {"retryAfterSeconds": round(retry, 3)},
            )
        recent.append(now)
        turn = ActiveTurn(next(self._turn_ids), conn)
        session.turn = turn
        self._running_turns += 1
        return turn

    def cancel(self, conn: ClientConnection, session_id: str) -> None:
        session = self.owned_session(conn, session_id)
        if session.turn is not None:
            self.cancel_turn(session, session.turn)

    def cancel_all_turns(self) -> None:
        for session in self.sessions.values():
            if session.turn is not None:
                self.cancel_turn(session, session.turn)

    def cancel_turn(self, session: Session, turn: ActiveTurn) -> None:
        """Have the worker cancel ``turn`` (idempotent; the turn then ends ``cancelled``).
        Queued without waiting: the worker reads its commands in order, so the cancel always
        follows the turn's ``StartTurn`` (queued first: see :meth:`_command`)."""
        if turn.cancel_requested:
            return
        turn.cancel_requested = True
        if turn.started:
            self._command(session.worker, CancelTurn(turn.turn_id))

    def _command(self, handle: WorkerHandle, command: Command) -> bool:
        """Queue ``command`` for a worker without waiting, after every command queued for it
        before (False, dropped, if the worker is gone: its turns went with it).

        Why in order, always: the worker acts on a session's commands as they come, and a
        ``ForgetSession`` that arrived after the ``SeedHistory`` of the same session's
        reload wiped the history it had just been given (a review: half the time, when the
        drop met a full channel and a task sent it later). So past the channel's bound
        (:data:`WORKER_COMMAND_BUFFER`: a burst) commands wait in the handle's backlog,
        which one task sends on in order, and every later one joins the backlog too."""
        backlog = handle.backlog
        if backlog is not None:
            backlog.append(command)
            return True
        try:
            handle.commands.send_nowait(command)
        except trio.WouldBlock:
            if self._nursery is None:
                return False  # shutting down: the workers are being cancelled
            handle.backlog = collections.deque((command,))
            self._nursery.start_soon(self._send_backlog, handle)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def _send_backlog(self, handle: WorkerHandle) -> None:
        """Send the handle's backlog on, in order: as many as the channel takes at once,
        then wait for room for the next. (Not one ``send`` each: every send is a trip
        through the scheduler, and at 100 clients prompting the backlog held dozens of
        StartTurns, so the last waited dozens of passes: 30% fewer prompts/s.)"""
        backlog = handle.backlog
        assert backlog is not None
        commands = handle.commands
        try:
            while backlog:
                try:
                    while backlog:
                        commands.send_nowait(backlog[0])
                        backlog.popleft()
                except trio.WouldBlock:
                    await commands.send(backlog[0])  # waits for room
                    backlog.popleft()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the worker is gone, and its turns with it
        finally:
            handle.backlog = None
            # A turn whose start is not sent ends at once, as one with no worker does:
            # its relay records it (else it waits for events that never come).
            for command in backlog:
                if isinstance(command, StartTurn):
                    command.events.close()
            if handle.close_after_backlog:
                commands.close()

    def start_prompt(self, conn: ClientConnection, params: PromptParams) -> Deferred:
        """The ``session/prompt`` handler, all synchronous (in the connection's reader):
        register the turn, queue its ``StartTurn`` and start its relay in the manager's
        nursery (so a turn can outlive its connection within grace). The relay answers.

        The returned :class:`Deferred` hears from the peer if the request is cancelled
        (``$/cancel_request``: the turn is cancelled and answered -32800, or, if it had
        ended, with its stop reason) or its connection ends first: the turn is cancelled,
        unless the client left with a client id within grace, in which case it runs on,
        orphaned, and its answer waits for the client."""
        if self._nursery is None:
            raise RpcError(INTERNAL_ERROR, "Manager is not running")
        turn = self.begin_prompt(conn, params)
        turn.request_id = current_request_id.get(None)
        session = self.sessions[params.session_id]
        events_send: EventSender[TurnEvent]
        events_receive: EventReceiver[TurnEvent]
        events_send, events_receive = open_event_channel(TURN_EVENT_BUFFER)
        # The served roots as anchors: every root of a session lies under one of them.
        env = TurnEnv(
            session.id,
            session.cwd,
            session.allowed_roots,
            conn.capabilities,
            self.roots,
            self.private,
        )
        number = max(session.turns, session.started)
        session.started = number + 1
        ages = self._tool_calls.ages(session.id, trio.current_time())
        start = StartTurn(
            turn.turn_id, env, params.text(), params.prompt, events_send, number, ages
        )
        if self._command(session.worker, start):
            turn.started = True
        else:
            events_send.close()  # no worker: the relay sees the turn end at once
        self._nursery.start_soon(self._relay_turn, session, turn, params, events_receive)
        return Deferred(functools.partial(self._prompt_cancelled, session, turn))

    def _prompt_cancelled(self, session: Session, turn: ActiveTurn, lost: bool) -> None:
        if lost and self._grace_for(turn.connection):
            # Its sessions are kept for the client (detach decides the same way).
            turn.orphaned = True
            return
        turn.request_cancelled = not lost
        self.cancel_turn(session, turn)

    async def _relay_turn(
        self,
        session: Session,
        turn: ActiveTurn,
        params: PromptParams,
        events: EventReceiver[TurnEvent],
    ) -> None:
        """Relay one turn's events to the session's owner (or keep them while it is away),
        commit the transcript, then answer the prompt.

        No nursery and no wait between the turn's last update and its answer: the updates
        that arrive together with the turn's end are held until its transcript is committed
        and then queued with the answer, so for a short turn everything leaves in one write
        (not the updates while the commit runs and the answer after it: two writes, two
        packets for the client to read). Except for a lone turn on a store whose commit
        takes time (``Store.slow_commit``) holding :data:`EARLY_WRITE_UPDATES` or more: they
        are written first, so the client reads them while the commit runs (1 client on
        SQLite, 20-step turns: +8% turns/s). With other turns running the server's CPU is
        the limit, and one write is cheaper."""
        started = trio.current_time()
        finished: TurnFinished | None = None
        streamed: list[tuple[str, str]] = []  # (kind, encoded update)
        agent_text: list[str] = []
        held: list[str] = []  # the last batch's notifications, sent with the answer
        prefix = updates.notification_prefix(session.id)
        try:
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                while True:
                    try:
                        event = await events.receive()
                    except trio.EndOfChannel:
                        break
                    # One scheduler trip per batch: relay whatever else is queued too.
                    batch: list[str] = []
                    while isinstance(event, Update):
                        # Encoded once: sent, buffered for a detached client and stored.
                        update = event.update
                        encoded = updates.encode(update)
                        streamed.append((update["sessionUpdate"], encoded))
                        if update["sessionUpdate"] == "agent_message_chunk":
                            agent_text.append(text_of(update))
                        batch.append(prefix + encoded + "}}")
                        try:
                            event = events.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    if isinstance(event, TurnFinished):
                        finished = event
                        self._tool_calls.seed(session.id, event.tool_call_ages, trio.current_time())
                        held = batch  # what the channel held: TURN_EVENT_BUFFER (+ the sender's)
                        break
                    for notification in batch:
                        await self._deliver(session, notification)
                    # (No nursery: shutting down, the turn is being cancelled.)
                    if isinstance(event, ClientCall) and self._nursery is not None:
                        self._nursery.start_soon(self._client_call, session, turn, event)
        finally:
            events.close()
            turn.relaying = False
            if turn.calls:
                # The client hears that its pending requests are void ($/cancel_request,
                # sent by each call as it ends) before the prompt's answer, as the
                # cancellation page's cascade has it: wait for them to end.
                turn.calls_ended = trio.Event()
                for scope in turn.calls:
                    scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(CALLS_END_TIMEOUT):
                    await turn.calls_ended.wait()
            if finished is None and turn.started:
                # Cancelled from outside (shutdown) or the worker is gone: stop the turn.
                turn.cancel_requested = True
                self._command(session.worker, CancelTurn(turn.turn_id))
            try:
                stop = finished.stop_reason if finished is not None else "cancelled"
                title = _title_for(session, params)
                named: str | None = None
                if title is not None:
                    # Named after its first prompt; recorded with the turn, so a load
                    # replays it where it was sent, and sent once the turn is recorded.
                    encoded = updates.encode(updates.session_info(title))
                    streamed.append(("session_info_update", encoded))
                    named = prefix + encoded + "}}"
                if (
                    len(held) >= EARLY_WRITE_UPDATES
                    and self.store.slow_commit
                    and self._running_turns == 1
                    and _answer_follows(session, turn)
                    and turn.connection.send_encoded_now(held)
                ):
                    held = []
                failed = finished.error if finished is not None else None
                persist_error = await self._persist_turn(
                    session, params, streamed, stop, "".join(agent_text), title, failed
                )
                if persist_error is not None and finished is not None:
                    # Not in the store: not in the model's history either (before the
                    # answer, so before any later StartTurn of the session).
                    self._command(session.worker, ForgetTurn(session.id, turn.turn_id))
                if held:
                    # The last updates go with the answer, queued past the outbox's
                    # bounds: wait for room first, as the other updates do, or a client
                    # that reads nothing has every finished turn's updates queued for it
                    # (an audit: 120 echoed prompts of 1 MiB, 300 MB held). After the
                    # commit, holding no more than those (at most one turn a session);
                    # at once if the connection has ended. (Cancelled only as the
                    # shutdown's time runs out: the turn is recorded, not answered.)
                    streamed, agent_text = [], []
                    await turn.connection.wait_for_room()
                if self.sessions.get(session.id) is not session:
                    # Dropped while its turn ran (the client left without grace, or its
                    # grace ended): the commit remembered it in the store again.
                    self.store.forget(session.id)
                if named is not None and persist_error is None:
                    held.append(named)
                self.metrics.prompt_done(stop, trio.current_time() - started)
                if finished is not None and finished.error is not None:
                    turn.error = RpcError(
                        INTERNAL_ERROR, f"Internal error: the model failed: {finished.error}"
                    )
                elif persist_error is not None:
                    turn.error = RpcError(
                        INTERNAL_ERROR, f"Internal error: the turn was not saved: {persist_error}"
                    )
                elif turn.request_cancelled and stop == "cancelled":
                    # (A cancel that came once the turn had ended cancelled nothing: the
                    # answer is the stop reason the turn was recorded with, below.)
                    turn.error = RpcError(REQUEST_CANCELLED, "Request cancelled")
                else:
                    turn.response = {"stopReason": stop}
                # The usual case: the owner sent the prompt and missed nothing, so the last
                # updates and the answer are queued together (and written at once if its
                # writer is idle). Otherwise the updates take the owner's way first.
                together = _answer_follows(session, turn)
                if held and not together:
                    await self._deliver_held(session, held)
                elif not together and not turn.orphaned and session.owner is turn.connection:
                    # Nothing held, but the owner has a backlog going out (it re-attached):
                    # the answer follows it.
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(PERSIST_TIMEOUT),
                        contextlib.suppress(PeerClosed),
                    ):
                        await self._flush(session, turn.connection)
            finally:
                # Whatever happened above, the session is free for its next prompt.
                session.turn = None
                self._running_turns -= 1
                if self._ending.get(session.id) is turn:
                    del self._ending[session.id]
                turn.finished.set()
            if turn.request_id is not None:
                if turn.orphaned:
                    await self._answer_orphan(session, turn)
                # (False if the connection ended meanwhile: nobody is left to answer;
                # held updates are then kept for the owner like any other.)
                elif turn.connection.answer_now(
                    turn.request_id, turn.response, turn.error, before=held if together else ()
                ):
                    session.answered_id = turn.request_id
                elif together and held:
                    await self._deliver_held(session, held)
            owner = session.owner
            if session.overflowed and owner is not None and session.turn is None:
                # A reload_required still owed (a flush during the turn could not send it:
                # a load is refused while a turn runs) goes now, after the answer.
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(PERSIST_TIMEOUT),
                    contextlib.suppress(PeerClosed),
                ):
                    await self._flush(session, owner)

    async def _deliver_held(self, session: Session, held: list[str]) -> None:
        """Queue a finished turn's last updates (see :meth:`_relay_turn`) without waiting
        for room: they go out just before the answer. Kept for a detached owner; behind
        updates it missed (it is re-attaching), sent after them, shielded like an answer."""
        conn = session.owner
        if conn is not None and (session.pending or session.flush_done is not None):
            sent = 0
            with trio.CancelScope(shield=True), trio.move_on_after(PERSIST_TIMEOUT):
                for notification in held:
                    await self._deliver(session, notification)
                    sent += 1
            for notification in held[sent:]:  # the client has not read for that long
                self._buffer(session, ("update", notification))
        elif conn is None or not conn.send_encoded_now(held):
            for notification in held:
                self._buffer(session, ("update", notification))

    async def _answer_orphan(self, session: Session, turn: ActiveTurn) -> None:
        # Kept behind what the session kept for its client, and sent with it: an item
        # whose send fails or times out (the client has not read for PERSIST_TIMEOUT)
        # stays kept (see _flush).
        self._buffer(session, ("answer", turn.request_id, turn.response, turn.error))
        conn = session.owner
        if conn is None:
            return
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(PERSIST_TIMEOUT),
            contextlib.suppress(PeerClosed),
        ):
            await self._flush(session, conn)

    async def _client_call(self, session: Session, turn: ActiveTurn, call: ClientCall) -> None:
        """Ask the client (the session's owner: the prompting connection, or the one that
        re-attached it) and hand the answer back to the waiting turn. Cancelled when the
        turn's relay ends."""
        if not turn.relaying:
            return
        with trio.CancelScope() as scope:
            turn.calls.add(scope)
            try:
                await self._ask_client(session, turn, call)
            finally:
                turn.calls.discard(scope)
                if not turn.calls and turn.calls_ended is not None:
                    turn.calls_ended.set()

    async def _ask_client(self, session: Session, turn: ActiveTurn, call: ClientCall) -> None:
        reply: ClientReply
        conn = session.owner
        try:
            if not _can_take(conn, call.method):
                reply = ClientReply(turn.turn_id, call.call_id, unavailable=True)
            elif conn is None:
                raise PeerClosed("the client is disconnected")
            else:
                with trio.fail_after(self.limits.client_call_timeout):
                    result = await conn.call_client(call.method, call.params)
                reply = ClientReply(turn.turn_id, call.call_id, result=result)
        except RpcError as exc:
            reply = ClientReply(
                turn.turn_id, call.call_id, error_code=exc.code, error_message=exc.message
            )
        except trio.TooSlowError:
            reply = ClientReply(
                turn.turn_id,
                call.call_id,
                error_message=f"client did not answer {call.method} within "
                f"{self.limits.client_call_timeout:g} s",
            )
        except PeerClosed as exc:
            reply = ClientReply(turn.turn_id, call.call_id, error_message=str(exc))
        self._command(session.worker, reply)

    async def _persist_turn(
        self,
        session: Session,
        params: PromptParams,
        streamed: list[tuple[str, str]],
        stop: str,
        agent_text: str,
        title: str | None = None,
        failed: str | None = None,
    ) -> str | None:
        """Commit the turn's transcript before its answer is sent (an answered turn is never
        lost). A relay cancelled meanwhile (shutdown) records its turn too, as cancelled.
        ``title`` (the session's first) is recorded with the turn, in its transaction (saved
        by a write of its own after it, a kill between the two left the transcript naming
        the session and its record untitled; its next turn then named it after that later
        prompt). ``failed`` is the model's error, recorded so a load leaves the turn out of
        the model's history as the live session did. Returns an error message, or None
        once committed."""
        entries: list[tuple[str, Payload]] = [
            ("user_message_chunk", updates.user_message_chunk(block)) for block in params.prompt
        ]
        entries += streamed
        # The turn's history rides on its stop entry: a load then decodes one entry per
        # turn, not every chunk (older stores without it fall back to the chunks).
        user_said = user_text(params.prompt)
        stop_entry: dict[str, Any] = {"stopReason": stop, "history": [user_said, agent_text]}
        if failed is not None:
            stop_entry["error"] = failed
        entries.append((STOP, stop_entry))
        alone = self._running_turns == 1
        try:
            if trio.current_effective_deadline() != -math.inf:
                # No scope (one costs ~9 us a prompt): append_turn is not interruptible
                # once begun (the Store protocol), and this task is not cancelled yet.
                await self.store.append_turn(
                    session.id, session.turns, entries, alone=alone, title=title
                )
            else:
                # Cancelled (shutting down): shielded, so the turn is still recorded, as
                # cancelled; with a deadline, so a store that hangs cannot hold shutdown.
                deadline = trio.current_time() + PERSIST_TIMEOUT
                with trio.CancelScope(shield=True, deadline=deadline) as scope:
                    await self.store.append_turn(
                        session.id, session.turns, entries, alone=alone, title=title
                    )
                if scope.cancelled_caught:
                    log.error("persisting a turn of session %s timed out", session.id)
                    return "the store did not answer in time"
            session.turns += 1
        except StoreError as exc:
            log.error("could not persist turn of session %s: %s", session.id, exc)
            return str(exc)
        except Exception as exc:  # a store bug must not take the manager down
            log.exception("persisting a turn of session %s failed", session.id)
            return f"{type(exc).__name__}: {exc}"
        if title is not None:
            session.title = title
        return None


def _title_for(session: Session, params: PromptParams) -> str | None:
    """The title a session without one takes from this prompt: its first line of text,
    cut to :data:`TITLE_CHARS` (None: it has one, or the prompt has no text)."""
    if session.title is not None:
        return None
    first_line = params.text().strip().split("\n", 1)[0]
    return without_surrogates(first_line[:TITLE_CHARS]) or None


def _answer_follows(session: Session, turn: ActiveTurn) -> bool:
    """Whether the turn's answer goes straight to the connection that sent the prompt,
    right after its last updates: the owner sent it and has missed nothing (no updates
    kept for it, no backlog being flushed)."""
    return (
        turn.request_id is not None
        and not turn.orphaned
        and session.owner is turn.connection
        and not session.pending
        and session.flush_done is None
    )


def _can_take(conn: ClientConnection | None, method: str) -> bool:
    """Whether ``method`` goes to the session's holder ``conn`` now (else the tool works on
    disk). A turn asks by the capabilities of the client that prompted it, but a client
    that re-attached may advertise others, and the file-system page says an agent MUST
    NOT call a method whose capability the client did not advertise. While the client is
    away a read goes to disk; a write does not (it fails: the client's editor may hold
    unsaved changes to the file, which a write behind its back would clobber)."""
    if method == FS_READ_TEXT_FILE:
        return conn is not None and conn.capabilities.read_text_file
    if method == FS_WRITE_TEXT_FILE:
        return conn is None or conn.capabilities.write_text_file
    return True
