"""The manager: every connection, session and project worker of the process.

State changes are plain synchronous code between awaits (Trio's cooperative scheduling makes
them atomic), so there is no lock anywhere, and none is ever held across network I/O.

:class:`Manager` holds that state and is the one object a connection talks to. What it does
lives in private modules along its seams, as functions that take the manager as ``self``,
bound in its class body as its methods (so a connection, a test or another part calls
``manager.detach(conn)`` or ``self._flush(session, conn)`` as before, and mypy checks each
against the Manager's fields). Functions over the manager's state, not classes with state
of their own: the parts share it (a turn's relay keeps updates for a client away, a load
waits for a turn its session's drop cut, an expiring grace drops sessions).

- ``_grace.py``, the reconnect grace: a client that said who it is keeps its sessions while
  away, and gets what they produced when it comes back;
- ``_left.py``, the answers kept apart for such a client's return, those no session keeps
  (a cut close's, and those its dropped connection wrote or never wrote), and the -32603
  for each id it awaits that nothing will answer;
- ``_probation.py``, the connection limit, and the way back in past it for a client whose
  old connection a probe finds dead;
- ``_lifecycle.py``, the session lifecycle: path checks, ``session/new``, ``load``,
  ``resume``, ``list``, ``close`` and ``delete``;
- ``_turns.py``, turns: a prompt's registration, the relay of its events (routing, and what
  a prompt costs, are told there), its client calls and its transcript's commit;
- here: the connections, the live sessions and their project workers, the cancellation of
  a turn, and the order of the commands queued to each worker.

Resource handling: workers live in the manager's worker nursery, one per project root, started
with the first session on the root and stopped (command channel closed) with its last. A
connection's sessions are dropped when it leaves; its turns are cancelled (the peer tells the
manager through the prompt's Deferred, and :meth:`Manager.detach` cancels the rest).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from .._metrics import Metrics
from ..rpc import INTERNAL_ERROR, INVALID_REQUEST, RequestId, RpcError
from ..store import MemoryStore, Store
from ..worker import (
    CancelTurn,
    Command,
    ForgetSession,
    Model,
    ProjectWorker,
    StartTurn,
    ToolCallLimiter,
)
from . import _grace, _left, _lifecycle, _probation, _turns
from ._session import ActiveTurn, Limits, Session, WorkerHandle

if TYPE_CHECKING:
    from ._connection import ClientConnection

# Commands queued to one worker. The worker loop never blocks, so senders wait (briefly).
WORKER_COMMAND_BUFFER = 64


@attrs.define(eq=False)
class Manager:
    """Routes every session. Start :meth:`run` in the root nursery before serving clients.

    Its fields are all the manager's state; most of its methods are bound from
    ``_grace.py``, ``_left.py``, ``_lifecycle.py`` and ``_turns.py`` (see the module
    docstring)."""

    roots: tuple[str, ...]
    model: Model
    metrics: Metrics = attrs.field(factory=Metrics)
    limits: Limits = attrs.field(factory=Limits)
    closing: trio.Event = attrs.field(factory=trio.Event)
    store: Store = attrs.field(factory=MemoryStore)
    # The server's own files, which no tool may touch though a root may hold them: the
    # data directory and the config file, as ``(path, what)`` (``TurnEnv.private``).
    private: tuple[tuple[str, str], ...] = ()
    #: Whether an open connection is alive right now (``web._heartbeat.Heartbeat.alive``:
    #: pinged, heard from within a short window, else dropped and False); set by the app
    #: that watches its connections. None: no connection can be told dead, and a client
    #: id in use is refused at once (see :meth:`take_over`).
    alive: Callable[[ClientConnection], Awaitable[bool]] | None = None
    connections: set[ClientConnection] = attrs.field(factory=set, init=False)
    sessions: dict[str, Session] = attrs.field(factory=dict, init=False)
    workers: dict[str, WorkerHandle] = attrs.field(factory=dict, init=False)
    _turn_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _reattached: dict[str, trio.Event] = attrs.field(factory=dict, init=False)
    # The prompt times of clients (by client id) whose connection ended in the last minute:
    # a client that reconnects under its id goes on with its count (see prompt_times_for).
    # At most max_connections client ids, in the order they left, oldest forgotten first.
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
    # By client id: the sessions its grace period's end dropped idle but for their last
    # answer, which may have been lost in flight (Session.last_answer), by that answer's
    # request id: a client back awaiting one is told to reload its session (see
    # expired_for). Bounded as _expired.
    _unconfirmed: dict[str, dict[RequestId, str]] = attrs.field(factory=dict, init=False)
    # By client id: the answers of its session/close and session/delete requests that
    # went on after their connection dropped (despite_a_drop), and those its dropped
    # connection never wrote that no session keeps (_keep_unsent), by request id, kept
    # for the client's return (refuse_unanswerable sends those it awaits). Bounded as
    # _expired, LEFT_ANSWERS a client; a client's, all grace_seconds past done, are
    # forgotten as the next answer is kept (_left._bound_left).
    _left_answers: dict[str, dict[RequestId, _left.LeftAnswer]] = attrs.field(
        factory=dict, init=False
    )
    # By client id: the connection whose initialize is probing the connection that holds
    # it (take_over); another connection naming the id meanwhile is refused.
    _claims: dict[str, ClientConnection] = attrs.field(factory=dict, init=False)
    # Connections a take_over waits to see detached: set by detach.
    _leaving: dict[ClientConnection, trio.Event] = attrs.field(factory=dict, init=False)
    #: WebSocket upgrades accepted and not yet attached (``web._app``: admit_upgrade),
    #: counted against ``max_connections`` (simultaneous handshakes must not slip past
    #: it), and those let in on probation, counted against ``_probation.MAX_ON_PROBATION``.
    upgrading: int = attrs.field(default=0, init=False)
    upgrading_on_probation: int = attrs.field(default=0, init=False)
    #: The open connections let in past a full ``max_connections`` on probation, each
    #: only to take the place of a connection found dead (see ``_probation.py``).
    on_probation: set[ClientConnection] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self.roots = tuple(str(Path(r).resolve()) for r in self.roots)
        self.private = tuple((str(Path(p).resolve()), what) for p, what in self.private)
        self._tool_calls = ToolCallLimiter(self.limits.tool_calls_per_minute)
        self.metrics.track(
            lambda: len(self.connections),
            lambda: len(self.sessions),
            lambda: len(self.workers),
            self._in_grace,
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

    def _in_grace(self) -> tuple[int, int]:
        """(Read at scrape time.) The sessions held for clients away within their grace
        period (no owner: see ``_grace.detach``), and those clients."""
        held = sum(1 for s in self.sessions.values() if s.owner is None)
        return held, len(self._reattached)

    def attach(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        if conn.on_probation:
            self.on_probation.add(conn)
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

    def check_client_id(self, client_id: str, conn: ClientConnection) -> None:
        """Refuse (-32600) a client id held by another open connection, or being taken
        over by another (:meth:`take_over`)."""
        claimant = self._claims.get(client_id)
        if claimant is not None and claimant is not conn:
            raise RpcError(
                INVALID_REQUEST,
                f"Client id {client_id!r} is being taken over by another connection "
                "(the open connection that holds it is being probed)",
            )
        if self.holder_of(client_id, conn) is not None:
            raise _in_use(client_id)

    def holder_of(self, client_id: str, conn: ClientConnection) -> ClientConnection | None:
        """The open connection other than ``conn`` initialized under ``client_id``."""
        for other in self.connections:
            if other.client_id == client_id and other.initialized and other is not conn:
                return other
        return None

    # The connection limit, and probation past it: _probation.py.
    has_room = _probation.has_room
    admit_upgrade = _probation.admit_upgrade
    probation_could_admit = _probation.probation_could_admit
    upgraded = _probation.upgraded
    promote = _probation.promote
    limit_reached = _probation.limit_reached
    close_reason = _probation.close_reason

    # -- reconnect grace: _grace.py -----------------------------------------------------------

    detach = _grace.detach
    take_over = _grace.take_over
    _gone_after_probe = _grace._gone_after_probe
    _keep_unsent = _grace._keep_unsent
    _keep_reload_notices = _grace._keep_reload_notices
    _grace_for = _grace._grace_for
    _keep_prompt_times = _grace._keep_prompt_times
    prompt_times_for = _grace.prompt_times_for
    reclaim = _grace.reclaim
    deliver_missed = _grace.deliver_missed
    forget_old_answers = _grace.forget_old_answers
    _held_by = _grace._held_by
    _expire_grace = _grace._expire_grace
    _end_grace = _grace._end_grace
    _owe = _grace._owe
    expired_for = _grace.expired_for
    _bound_detached = _grace._bound_detached
    _buffer = _grace._buffer
    _flush = _grace._flush
    _deliver = _grace._deliver

    # What a client back is owed that no session keeps: _left.py.
    refuse_unanswerable = _left.refuse_unanswerable
    keep_left_answer = _left.keep_left_answer
    remember_closed_answer = _left.remember_closed_answer
    _send_left_answers = _left._send_left_answers

    # -- sessions -----------------------------------------------------------------------------

    # The session lifecycle: _lifecycle.py.
    _roots_containing = _lifecycle._roots_containing
    checked_cwd = _lifecycle.checked_cwd
    check_inside_roots = _lifecycle.check_inside_roots
    checked_paths = _lifecycle.checked_paths
    _checked_paths = _lifecycle._checked_paths
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
    despite_a_drop = _lifecycle.despite_a_drop
    delete_session = _lifecycle.delete_session
    _waited_for_cut_turn = _lifecycle._waited_for_cut_turn
    owned_session = _lifecycle.owned_session

    # The live sessions, and their workers.

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
        as :meth:`checked_paths` returned them."""
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
            root,
            self.model,
            receive,
            tool_calls_per_minute=self.limits.tool_calls_per_minute,
            limit_hits=self.metrics.tallies.limits,
        )
        handle = WorkerHandle(root, worker, send)
        self.workers[root] = handle
        self._nursery.start_soon(handle.worker.run, name=f"worker:{root}")
        return handle

    # -- turns --------------------------------------------------------------------------------

    # A prompt's turn, its relay, its client calls and its commit: _turns.py.
    begin_prompt = _turns.begin_prompt
    start_prompt = _turns.start_prompt
    _prompt_cancelled = _turns._prompt_cancelled
    _relay_turn = _turns._relay_turn
    _deliver_held = _turns._deliver_held
    _answer_orphan = _turns._answer_orphan
    _client_call = _turns._client_call
    _ask_client = _turns._ask_client
    _persist_turn = _turns._persist_turn

    # Cancelling a turn, and the order of the commands queued to a worker.

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


def _in_use(client_id: str) -> RpcError:
    return RpcError(
        INVALID_REQUEST, f"Client id {client_id!r} is in use by another open connection"
    )
