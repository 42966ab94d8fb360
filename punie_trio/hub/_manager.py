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
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Awaitable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .. import acp
from .._json import is_name_text, without_surrogates
from .._metrics import Metrics
from .._paths import resolved
from ..acp import FS_READ_TEXT_FILE, FS_WRITE_TEXT_FILE, PromptParams, updates
from ..rpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    REQUEST_CANCELLED,
    Deferred,
    PeerClosed,
    RequestId,
    RpcError,
    current_request_id,
)
from ..store import (
    STOP,
    BadCursor,
    MemoryStore,
    Payload,
    SessionRecord,
    Store,
    StoreError,
    UnknownSessionError,
    under_roots,
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
    SeedHistory,
    StartTurn,
    ToolCallLimiter,
    TurnEnv,
    TurnEvent,
    TurnFinished,
    Update,
    open_event_channel,
)
from ._session import (
    ActiveTurn,
    Limits,
    Pending,
    Session,
    WorkerHandle,
    json_string_at,
    small_id,
    text_of,
    turn_history,
    user_text,
)

if TYPE_CHECKING:
    from ._connection import ClientConnection

log = logging.getLogger("punie_trio.hub")

# Commands queued to one worker. The worker loop never blocks, so senders wait (briefly).
WORKER_COMMAND_BUFFER = 64
# Events of one turn not yet relayed to its client. Full: the turn waits (its client is slow).
TURN_EVENT_BUFFER = 32
# Transcript entries read per page by session/load and session/resume.
REPLAY_PAGE = 2000
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
# Sent to a re-attached client whose missed updates overflowed the buffer.
RELOAD_REQUIRED = "_punie-trio/reload_required"
# Titles are the first prompt's first line, this long at most.
TITLE_CHARS = 80


def _store_failed(exc: StoreError) -> RpcError:
    """-32603 for a store that cannot do what a request needs (a damaged row, a failing
    disk), logged as a warning with its message: the store names the trouble, and a
    traceback of the hub would only bury it."""
    log.warning("session store: %s", exc)
    return RpcError(INTERNAL_ERROR, f"Internal error: {exc}")


def _check_not_loading(conn: ClientConnection, session: Session) -> None:
    """Refuse a prompt or close of a session being loaded: claimed by its load, or (the
    connection reloading a session it holds) with the load read but still reading the
    store (``conn.loads_pending``)."""
    if session.loading or session.id in conn.loads_pending:
        raise _still_loading(session.id)


def _still_loading(session_id: str) -> RpcError:
    """The refusal of a request on a session a ``session/load`` or ``resume`` is making live
    (or, on the loading connection, still reading from the store)."""
    return RpcError(INVALID_REQUEST, f"Session {session_id} is still loading")


def _held_elsewhere(session: Session) -> RpcError:
    """The refusal for a session that another connection holds: open there, or kept for a
    client that left and may come back within its grace period (not named: a client id
    is what re-attaches its sessions, and any token holder could read this answer)."""
    if session.owner is None and session.detached_client is not None:
        return RpcError(
            INVALID_REQUEST,
            f"Session {session.id} is kept for a client that is away and may reconnect "
            "within its grace period; it is open to others once that ends",
        )
    return RpcError(INVALID_REQUEST, f"Session {session.id} is open on another connection")


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
    # By client id: the sessions its grace period's end dropped idle but for their last
    # answer, which may have been lost in flight (Session.last_answer), by that answer's
    # request id: a client back awaiting one is told to reload its session (see
    # expired_for). Bounded as _expired.
    _unconfirmed: dict[str, dict[RequestId, str]] = attrs.field(factory=dict, init=False)

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

    def detach(self, conn: ClientConnection) -> None:
        """Forget a connection that ended. A client that said who it is keeps its sessions
        for ``grace_seconds`` (turns run on, what they produce is kept for it); the sessions
        of any other client are dropped (they stay loadable from the store).

        A grace of 0 is a grace period that ends at once: the sessions are dropped here,
        but a client that said who it is is still told, when it comes back, to reload
        those that lost something (:meth:`_end_grace`): it once waited for ever for the
        answer of the turn cut under it."""
        self.connections.discard(conn)
        owned = [s for s in self.sessions.values() if s.owner is conn]
        client_id = conn.client_id
        if client_id and conn.prompt_times:
            self._keep_prompt_times(client_id, conn.prompt_times)
        # (As _grace_for, but for the length: a client that can be told when it is back.)
        told = bool(client_id) and self._nursery is not None and not self.closing.is_set()
        grace = told and self._grace_for(conn)
        unsent = conn.peer.unsent() if told and conn.peer is not None else []
        if unsent:
            assert client_id is not None
            self._keep_reload_notices(client_id, owned, unsent)
        if client_id and told and owned:
            self._keep_unsent(owned, unsent, conn.refused_prompts or {})
            for session in owned:
                session.owner = None
                session.detached_client = client_id
            if not grace:
                self._end_grace(client_id)
                return
            event = self._reattached.setdefault(client_id, trio.Event())
            assert self._nursery is not None
            self._nursery.start_soon(self._expire_grace, client_id, event)
            self._bound_detached()
            return
        for session in owned:
            self._drop_session(session)

    def _keep_unsent(
        self, owned: list[Session], texts: list[str], refused: Mapping[RequestId, str]
    ) -> None:
        """Put what a dropped connection had queued but never written back in front of its
        sessions' backlogs (it is older than anything kept since): their updates, the
        answer of each one's last prompt, and the errors of prompts refused at once
        (``refused``: request id to session id). The rest (answers to other requests,
        our own requests, a session/load's replay, spelled apart:
        ``updates.REPLAY_START``) belonged to that connection alone. What was written is
        not repeated: whether it arrived cannot be known without the client
        acknowledging it.

        Why the refusals: a re-attaching client that awaits a refused prompt's id would
        otherwise wait for ever (its prompt never ran, so the store has no turn to say
        so); kept, the error is delivered under the rule of any kept answer."""
        if not texts:
            return
        by_id = {s.id: s for s in owned}
        answered = {s.answered_id: s for s in owned if s.answered_id is not None}
        for request_id, refused_in in refused.items():
            if refused_in in by_id and request_id not in answered:
                answered[request_id] = by_id[refused_in]
        kept: dict[str, list[Pending]] = {}
        for text in texts:
            if text.startswith(updates.NOTIFICATION_START):
                session_id = json_string_at(text, len(updates.NOTIFICATION_START))
                session = by_id.get(session_id) if session_id is not None else None
                if session is not None:
                    kept.setdefault(session.id, []).append(("update", text))
            elif answered and text.startswith('{"jsonrpc":"2.0","id":'):
                try:
                    msg = json.loads(text)
                except ValueError:  # pragma: no cover - we wrote it
                    continue
                session = answered.get(msg.get("id"))
                result = msg.get("result")
                prompt_answer = "error" in msg or (
                    isinstance(result, dict) and "stopReason" in result
                )
                if session is not None and prompt_answer:
                    kept.setdefault(session.id, []).append(("message", text, msg["id"]))
        for session_id, items in kept.items():
            session = by_id[session_id]
            rest, session.pending = session.pending, []
            session.kept_updates = session.kept_bytes = 0
            for item in (*items, *rest):
                self._buffer(session, item)

    def _keep_reload_notices(self, client_id: str, owned: list[Session], texts: list[str]) -> None:
        """Reload notices a dropped connection queued but never wrote are owed again: a
        session of its kept within grace is marked to be told again when it re-attaches,
        and any other (one whose grace had ended) is owed to the client id. Without the
        notice the client waits for ever for the answer it awaits."""
        by_id = {s.id: s for s in owned}
        owed: list[str] = []
        for text in texts:
            if RELOAD_REQUIRED not in text[:100]:
                continue
            try:
                msg = json.loads(text)
            except ValueError:  # pragma: no cover - we wrote it
                continue
            params = msg.get("params")
            session_id = params.get("sessionId") if isinstance(params, dict) else None
            if msg.get("method") != RELOAD_REQUIRED or not isinstance(session_id, str):
                continue
            session = by_id.get(session_id)
            if session is not None:
                session.overflowed = True  # (its flush tells it, once no turn runs)
            else:
                owed.append(session_id)
        if owed:
            self._owe(client_id, owed)

    def _grace_for(self, conn: ClientConnection) -> bool:
        """Whether ``conn``'s sessions (and running turns) wait for its client to come back:
        it said who it is, grace is on, and the manager runs and is not closing."""
        return (
            bool(conn.client_id)
            and self.limits.grace_seconds > 0
            and self._nursery is not None
            and not self.closing.is_set()
        )

    def _keep_prompt_times(self, client_id: str, times: list[float]) -> None:
        """Remember a leaving client's prompt times for the rate limit's window (and forget
        those of clients gone longer than that: the dict stays as small as the churn of
        the last minute)."""
        horizon = trio.current_time() - 60.0
        for gone in [c for c, t in self._left_prompt_times.items() if t[-1] <= horizon]:
            del self._left_prompt_times[gone]
        self._left_prompt_times[client_id] = times

    def prompt_times_for(self, client_id: str) -> list[float]:
        """The prompt times a client id left with, for its new connection: reconnecting
        does not start a fresh count of ``prompts_per_minute``."""
        return self._left_prompt_times.pop(client_id, [])

    def check_client_id(self, client_id: str) -> None:
        if any(c.client_id == client_id and c.initialized for c in self.connections):
            raise RpcError(
                INVALID_REQUEST, f"Client id {client_id!r} is in use by another open connection"
            )

    def reclaim(self, conn: ClientConnection) -> list[Session]:
        """Give ``conn`` the sessions its client id left within grace (synchronously: a
        request it sends next finds them its own); return them, for
        :meth:`deliver_missed`."""
        client_id = conn.client_id
        if not client_id:
            return []
        event = self._reattached.pop(client_id, None)
        if event is not None:
            event.set()
        reclaimed = []
        for session in self.sessions.values():
            if session.detached_client == client_id and session.owner is None:
                session.owner = conn
                session.detached_client = None
                reclaimed.append(session)
        self._answers_lost_in_flight(conn, reclaimed)
        return reclaimed

    @staticmethod
    def _answers_lost_in_flight(conn: ClientConnection, reclaimed: list[Session]) -> None:
        """Keep again, for :meth:`deliver_missed`, each reclaimed session's last answer
        that ``conn``'s client says it never got, followed by a reload notice.

        Why: an answer written to a connection that then dropped may never have reached
        its client (it was in a socket buffer, or in a batch the client discarded as it
        closed), and nothing tells the server so, except the re-attaching client listing
        its id as awaited (``_meta["punie-trio/awaiting"]``). Not kept, the client waited
        for ever for it. The updates written before it may have been lost with it, hence
        the notice. Only the answer handed to the session's previous holder is sent again
        (taken here, at each re-attach), and not under an id the client awaits from a
        turn that still runs or an answer kept anyway (ids may be reused)."""
        if not conn.awaiting:
            for session in reclaimed:
                session.last_answer = None
            return
        live: set[RequestId | None] = set()
        for session in reclaimed:
            if session.turn is not None:
                live.add(session.turn.request_id)
            live.update(_answer_id(p) for p in session.pending if p[0] != "update")
        for session in reclaimed:
            item, session.last_answer = session.last_answer, None
            if item is None:
                continue
            request_id = _answer_id(item)
            if request_id in conn.awaiting and request_id not in live:
                log.info(
                    "session %s: sending the answer to request %.80r again: the client "
                    "re-attached awaiting it (lost in flight when its connection dropped)",
                    session.id, request_id,
                )  # fmt: skip
                session.pending.insert(0, item)
                session.overflowed = True

    async def deliver_missed(
        self, conn: ClientConnection, sessions: list[Session], expired: Sequence[str] = ()
    ) -> None:
        """Send ``conn`` what its reclaimed ``sessions`` produced while it was away
        (updates, then answers), in order, each exactly once; then tell it to reload the
        ``expired`` sessions (:meth:`expired_for`). A notice not sent (the connection
        ended) stays owed to the client id."""
        told = 0
        try:
            for session in sessions:
                await self._flush(session, conn)
            for session_id in expired:
                if self._held_by(conn, session_id):
                    told += 1  # (loaded again meanwhile, behind the initialize: it knows)
                    continue
                await conn.notify(
                    RELOAD_REQUIRED,
                    {
                        "sessionId": session_id,
                        "reason": "the grace period ended while disconnected",
                    },
                )
                told += 1
        except BaseException:
            if conn.client_id and told < len(expired):
                self._owe(conn.client_id, [s for s in expired[told:] if not self._held_by(conn, s)])
            raise

    async def refuse_unanswerable(self, conn: ClientConnection) -> None:
        """Answer at once each id ``conn``'s client awaits that nothing here will answer
        (-32603), once what its sessions kept has been sent: no turn of its sessions runs
        for it and no answer is kept under it. Its prompt's turn was cut by a restart, or
        as its session's grace period ended, or the id was never a prompt's.

        Why: the client waits for each awaited id's answer, and none would ever come: it
        waited for ever (a reload notice names a session, not the request; after a
        restart there is none). An id the client has in flight again, or used again, is
        not awaited any more and is left alone.

        Decided once no backlog of the client's sessions is going out (an answer a flush
        has taken is in neither place), with no wait until each refused id is no longer
        awaited: nothing can answer it later, and a flush that does not find it awaited
        does not send it."""
        while conn.awaiting:
            owned = [s for s in self.sessions.values() if s.owner is conn]
            flushing = next((s.flush_done for s in owned if s.flush_done is not None), None)
            if flushing is None:
                break
            await flushing.wait()
        else:
            return
        answered: set[RequestId | None] = set()
        for session in owned:
            if session.turn is not None and session.turn.orphaned:
                answered.add(session.turn.request_id)
            answered.update(_answer_id(p) for p in session.pending if p[0] != "update")
        refused = [
            request_id
            for request_id in conn.awaiting
            if request_id not in answered and not conn.has_in_flight(request_id)
        ]
        for request_id in refused:
            conn.stop_awaiting(request_id)
        error = RpcError(
            INTERNAL_ERROR,
            "Internal error: no answer to this request will come: no prompt runs and no "
            "answer is kept under its id here (the server restarted, or the session's "
            "grace period ended); session/load the session to see what was recorded",
        )
        for request_id in refused:
            await conn.send_answer(request_id, None, error)

    def _held_by(self, conn: ClientConnection, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        return session is not None and session.owner is conn

    async def _expire_grace(self, client_id: str, event: trio.Event) -> None:
        with trio.move_on_after(self.limits.grace_seconds):
            await event.wait()
        if event.is_set():
            return  # re-attached, or its grace was ended early (_bound_detached)
        self._end_grace(client_id)

    def _end_grace(self, client_id: str) -> None:
        """Drop the sessions ``client_id`` left (their turns are cancelled): they stay
        loadable from the store. Those that drop something the client has not got (a
        running turn, kept updates or answers) are remembered, so that the client, should
        it come back, is told to reload them rather than wait for an answer that will
        never come."""
        self._reattached.pop(client_id, None)
        missed: list[str] = []
        unconfirmed: dict[RequestId, str] = {}
        for session in [s for s in self.sessions.values() if s.detached_client == client_id]:
            if session.turn is not None or session.pending or session.overflowed:
                missed.append(session.id)
            elif session.last_answer is not None:
                answer_id = _answer_id(session.last_answer)
                if small_id(answer_id):  # (a huge id is not kept past its session)
                    unconfirmed[answer_id] = session.id
            self._drop_session(session)
        if missed:
            self._owe(client_id, missed)
        if unconfirmed:
            unconfirmed.update(self._unconfirmed.pop(client_id, {}))  # (the older ones)
            self._unconfirmed[client_id] = unconfirmed
            while len(self._unconfirmed) > self.limits.max_connections:
                del self._unconfirmed[next(iter(self._unconfirmed))]

    def _owe(self, client_id: str, session_ids: Sequence[str]) -> None:
        """Remember reload notices owed to ``client_id`` (after any it is owed already),
        within the bound of ``max_connections`` client ids, the oldest forgotten first."""
        owed = self._expired.pop(client_id, [])  # (re-inserted: now the newest)
        for session_id in session_ids:
            if session_id not in owed:  # (each session told once)
                owed.append(session_id)
        self._expired[client_id] = owed
        while len(self._expired) > self.limits.max_connections:
            del self._expired[next(iter(self._expired))]

    def expired_for(self, client_id: str | None, awaiting: Collection[RequestId] = ()) -> list[str]:
        """The sessions whose grace period ended with something ``client_id`` missed (see
        :meth:`_end_grace`), taken: its connection tells it to reload each, once. With
        them, those whose last answer the client says it still awaits (``awaiting``): it
        was lost in flight (see :meth:`_answers_lost_in_flight`)."""
        if not client_id:
            return []
        expired = self._expired.pop(client_id, [])
        for answer_id, session_id in self._unconfirmed.pop(client_id, {}).items():
            if answer_id in awaiting and session_id not in expired:
                expired.append(session_id)
        return expired

    def _bound_detached(self) -> None:
        """Keep the clients away within grace, with the live connections, within
        ``max_connections``: past it, the client away longest loses its grace now.

        Why: each client away keeps up to ``max_sessions_per_connection`` sessions and
        their running turns, and a client may come and go under a fresh client id each
        time: bounded only by the grace period, a token holder could pile up thousands
        of sessions and turns (an audit reached 3,200 running turns and 900 MB). So the
        sessions kept for absent clients are bounded like those of connected ones.
        """
        limit = self.limits.max_connections
        while self._reattached and len(self.connections) + len(self._reattached) > limit:
            client_id, event = next(iter(self._reattached.items()))  # away the longest
            log.warning(
                "ending the grace period of client %r early: %d clients away and %d "
                "connected, over the connection limit (%d)",
                client_id, len(self._reattached), len(self.connections), limit,
            )  # fmt: skip
            event.set()  # (its timer ends)
            self._end_grace(client_id)

    def _buffer(self, session: Session, item: Pending) -> None:
        """Keep what a detached client missed; past ``detached_buffer`` updates, or
        ``detached_bytes`` of them, the client is told to ``session/load`` instead
        (answers are always kept)."""
        if item[0] == "update":
            if session.overflowed:
                return
            size = sys.getsizeof(item[1])  # (as the outbox counts: the memory it takes)
            limits = self.limits
            if (
                session.kept_updates >= limits.detached_buffer
                or session.kept_bytes + size > limits.detached_bytes
            ):
                session.overflowed = True
                session.pending = [p for p in session.pending if p[0] != "update"]
                session.kept_updates = session.kept_bytes = 0
                return
            session.kept_updates += 1
            session.kept_bytes += size
        session.pending.append(item)

    async def _flush(self, session: Session, conn: ClientConnection) -> None:
        """Send ``conn`` what ``session`` kept for its owner, before anything newer.

        One sender at a time: a relay and a re-attaching connection (or an orphan's answer)
        may both want to send a session's backlog, and two tasks waiting for room in an
        outbox may be let in in either order. So whoever finds a flush under way waits for
        it to end (then looks again), and a caller that returns from here finds the
        backlog sent. Error handling: an item whose send fails (the connection ended, or
        the caller was cancelled before it was queued) goes back to the front, to be
        delivered by whoever comes next: nothing is lost and nothing is sent twice.
        """
        while session.flush_done is not None:
            await session.flush_done.wait()
        if not session.pending and not (session.overflowed and session.turn is None):
            return
        done = session.flush_done = trio.Event()
        try:
            while session.pending and session.owner is conn:
                item = session.pending.pop(0)
                is_update = item[0] == "update"
                size = sys.getsizeof(item[1]) if is_update else 0
                session.kept_updates -= is_update
                session.kept_bytes -= size
                try:
                    if is_update:
                        await conn.send_encoded(item[1])
                    elif item[0] == "message":  # an answer, as written
                        if not _answer_unwanted(session, conn, item[2]):
                            await conn.send_encoded(item[1])
                            _answered(session, conn, item)
                    else:
                        _, request_id, response, error = item
                        if not _answer_unwanted(session, conn, request_id):
                            await conn.send_answer(request_id, response, error)
                            _answered(session, conn, item)
                except BaseException:
                    session.pending.insert(0, item)
                    session.kept_updates += is_update
                    session.kept_bytes += size
                    raise
            # Told after what was kept (the answers), once no turn of the session runs: at
            # re-attach, or after the answer of the turn that ran on (a session/load is
            # refused while a turn runs).
            if session.overflowed and session.turn is None and session.owner is conn:
                await conn.notify(
                    RELOAD_REQUIRED,
                    {"sessionId": session.id, "reason": "updates were missed while disconnected"},
                )
                session.overflowed = False  # only once sent: a failed send leaves it owed
        finally:
            session.flush_done = None
            done.set()

    async def _deliver(self, session: Session, update: str) -> None:
        """Send ``update`` (an encoded ``session/update`` notification) to the session's
        owner, or keep it for the owner's return."""
        conn = session.owner
        if conn is not None:
            try:
                await self._flush(session, conn)
                await conn.send_encoded(update)
                return
            except PeerClosed:
                pass
        self._buffer(session, ("update", update))

    # -- sessions -----------------------------------------------------------------------------

    def _roots_containing(self, path: Path) -> list[str]:
        """The served roots ``path`` lies under (``is_relative_to`` counts the root itself)."""
        return [r for r in self.roots if path.is_relative_to(r)]

    def checked_cwd(self, cwd: str) -> tuple[str, str]:
        """``(project root, cwd resolved)``: the most specific project root containing
        ``cwd``, or -32602; so is a ``cwd`` that is not a directory (every tool of the
        session would fail in it). The session keeps this resolved cwd: resolving it again
        later could give another path (a symlink swapped meanwhile), one never checked."""
        path = _resolve_param(cwd, "cwd")
        matches = self._roots_containing(path)
        if not matches:
            allowed = ", ".join(self.roots)
            raise RpcError.invalid_params(
                f"Invalid params: cwd {cwd!r} is outside the project roots ({allowed})"
            )
        if not path.is_dir():
            raise RpcError.invalid_params(f"Invalid params: cwd {cwd!r} is not a directory")
        return max(matches, key=len), str(path)

    def check_inside_roots(self, paths: tuple[str, ...], field: str) -> tuple[str, ...]:
        """Each of ``paths`` (additional directories) must be a directory inside a root: a
        missing one would be checked only when a tool first uses it, and by then it could
        have been made a symlink to anywhere. Returns them resolved, as checked: the
        session keeps these (resolving again could give another path, never checked)."""
        checked: list[str] = []
        for i, path in enumerate(paths):
            where = f"{field}[{i}]"
            resolved_path = _resolve_param(path, where)
            if not self._roots_containing(resolved_path):
                raise RpcError.invalid_params(
                    f"Invalid params: {where} {path!r} is outside the project roots "
                    f"({', '.join(self.roots)})"
                )
            if not resolved_path.is_dir():
                raise RpcError.invalid_params(
                    f"Invalid params: {where} {path!r} is not a directory"
                )
            checked.append(str(resolved_path))
        return tuple(checked)

    def _check_session_quota(self, conn: ClientConnection) -> None:
        owned = sum(1 for s in self.sessions.values() if s.owner is conn)
        if owned >= self.limits.max_sessions_per_connection:
            raise RpcError(
                INVALID_REQUEST,
                f"Session limit reached: {owned} sessions open on this connection "
                f"(max {self.limits.max_sessions_per_connection}); close one first",
            )

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

    def new_session(self, conn: ClientConnection, params: acp.NewSessionParams) -> Session:
        """Register a new session synchronously; :meth:`persist_new` then stores it."""
        if self.closing.is_set():
            raise RpcError(INTERNAL_ERROR, "Server is shutting down")
        root, cwd = self.checked_cwd(params.cwd)
        additional = self.check_inside_roots(params.additional_directories, "additionalDirectories")
        self._check_session_quota(conn)
        session_id = f"sess_{uuid.uuid4().hex}"
        return self._open(conn, session_id, root, cwd, additional)

    async def persist_new(self, session: Session, cwd_sent: str | None = None) -> dict[str, Any]:
        """Store a session :meth:`new_session` opened; ``cwd_sent``: its cwd as the client
        sent it (what session/list reports)."""
        now = time.time()
        record = SessionRecord(
            id=session.id,
            root=session.root,
            cwd=session.cwd,
            client_id=session.owner.client_id if session.owner else None,
            additional_directories=session.additional_directories,
            created_at=now,
            updated_at=now,
            cwd_sent=cwd_sent,
        )
        try:
            await self.store.create_session(record)
        except StoreError as exc:
            if self.sessions.get(session.id) is session:
                self._drop_session(session)
            raise RpcError(
                INTERNAL_ERROR, f"Internal error: cannot store the session: {exc}"
            ) from None
        return {"sessionId": session.id}

    def _serves(self, record: SessionRecord) -> bool:
        """Whether ``record``'s working directory lies under a root this server serves
        (the store may hold sessions of roots no longer passed with ``--project``): the
        test the store's ``list_sessions(roots=...)`` makes, so a load and a listing
        never disagree on which sessions are served."""
        return under_roots(record.cwd, self.roots)

    async def _stored(self, session_id: str) -> SessionRecord:
        try:
            record = await self.store.get_session(session_id)
        except StoreError as exc:
            raise _store_failed(exc) from None
        if record is None or not self._serves(record):
            raise RpcError.not_found(f"Session not found: {session_id}")
        return record

    def load_session(
        self, conn: ClientConnection, ref: acp.SessionRef, *, replay: bool
    ) -> Awaitable[dict[str, Any]]:
        """``session/load`` (``replay``) and ``session/resume``: make a stored session live
        on ``conn``, give the worker its history, and (for load) replay the transcript as
        ``session/update``s before answering.

        Marked pending on ``conn`` here, in the connection's reader, before the next message
        is read: the load reads the stored session before it can claim the live one, and a
        prompt or close pipelined behind it must hear "still loading" meanwhile too (it
        heard "Session not found", of a session that exists)."""
        conn.loads_pending += (ref.session_id,)
        return self._unmark_after(conn, ref, self._load_session(conn, ref, replay))

    @staticmethod
    async def _unmark_after(
        conn: ClientConnection, ref: acp.SessionRef, load: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        try:
            return await load
        finally:
            pending = list(conn.loads_pending)
            pending.remove(ref.session_id)
            conn.loads_pending = tuple(pending)

    async def _load_session(
        self, conn: ClientConnection, ref: acp.SessionRef, replay: bool
    ) -> dict[str, Any]:
        if self.closing.is_set():
            raise RpcError(INTERNAL_ERROR, "Server is shutting down")
        assert ref.cwd is not None
        root, cwd = self.checked_cwd(ref.cwd)
        additional = self.check_inside_roots(ref.additional_directories, "additionalDirectories")
        while await self._waited_for_cut_turn(ref.session_id):
            pass  # (before reading: a read its commit lands in, ending it, would miss it)
        drops = self._drops
        record = await self._stored(ref.session_id)
        while await self._waited_for_cut_turn(ref.session_id):
            # Read the store again now the cut turn is recorded (the replay, the history
            # and the turn count include it).
            drops = self._drops
            record = await self._stored(ref.session_id)
        if self.closing.is_set():  # (the reads above may have waited into the shutdown)
            raise RpcError(INTERNAL_ERROR, "Server is shutting down")
        if cwd != str(_resolve_param(record.cwd, "stored cwd")):
            # "cwd is immutable after session setup" (session-list page); only the extra
            # roots may differ from one load to the next (session-setup page).
            raise RpcError.invalid_params(
                f"Invalid params: cwd {ref.cwd!r} is not the cwd of session {record.id} "
                f"({record.cwd}); a session keeps the cwd it was created with"
            )
        # Claimed with no await between the check and the claim: a concurrent load or a
        # prompt is refused from here on, so only this request writes what follows.
        live = self._loadable(conn, ref.session_id)
        opened = live is None
        previous = live.additional_directories if live is not None else ()
        if live is not None:
            live.additional_directories = additional
        else:
            live = self._open(
                conn,
                record.id,
                root,
                cwd,
                # Only what this request asked for (checked above): stored roots are not
                # restored implicitly (session-setup page), they may no longer be allowed.
                additional,
                turns=record.turns,
                title=record.title,
            )
        live.loading = True  # no prompt, close or delete until the history is in place
        try:
            if not opened:
                # What the session kept for its client (it re-attached, and its backlog
                # may still be going out, or wait for the next flush) goes first: sent
                # beside the replay, the two interleaved, and the client took live updates
                # for the transcript and saw the turn twice, mixed. (_flush waits for a
                # flush under way.)
                await self._flush(live, conn)
            if opened and self._drops != drops:
                # A session was dropped while the store was read: perhaps this one, live
                # on another connection then, its last turn recorded before the read came
                # back (so not waited for above). The record read may predate that turn,
                # which the replay, read later, holds: the session's next turn reused its
                # number and was not saved. Claimed now, nothing else writes it: read again.
                record = await self._stored(ref.session_id)
                live.turns, live.title = record.turns, record.title
            if additional != record.additional_directories:
                # The roots asked for are the session's now, in the store too (what
                # session/list reports).
                await self.store.update_session(record.id, additional_directories=additional)
            history = await self._replay(conn, live, replay)
            self._command(live.worker, SeedHistory(live.id, tuple(history)))
        except BaseException as exc:
            # Failed or cancelled: a session this load opened is not left open half-loaded
            # (no history: its next prompt would start from nothing), and one that was
            # open keeps the roots it had.
            if opened and self.sessions.get(live.id) is live:
                self._drop_session(live)
            elif not opened:
                live.additional_directories = previous
            if isinstance(exc, UnknownSessionError):  # deleted meanwhile (by another process)
                raise RpcError.not_found(f"Session not found: {record.id}") from None
            if isinstance(exc, StoreError):
                raise _store_failed(exc) from None
            raise
        finally:
            live.loading = False
        return {}

    def _loadable(self, conn: ClientConnection, session_id: str) -> Session | None:
        """The live session ``conn`` may load again (None: not live, and ``conn`` may open
        one more), or the refusal."""
        if session_id in self._deleting:
            raise RpcError.not_found(f"Session not found: {session_id} (being deleted)")
        live = self.sessions.get(session_id)
        if live is None:
            self._check_session_quota(conn)
            return None
        if live.owner is not conn:
            raise _held_elsewhere(live)
        if live.closing:
            raise RpcError(INVALID_REQUEST, f"Session {session_id} is closing")
        if live.loading:
            raise _still_loading(session_id)
        if live.turn is not None:
            raise RpcError(INVALID_REQUEST, f"Session {session_id} has a prompt running")
        return live

    async def _replay(
        self, conn: ClientConnection, session: Session, replay: bool
    ) -> list[tuple[str, str]]:
        """Read the transcript page by page (the store reads the next page on its thread
        while this one is sent), replaying each update unless ``replay`` is false, and
        return the conversation history: ``("user", text), ("agent", text)`` per turn."""
        history: list[tuple[str, str]] = []
        # This turn's message chunks, for a stop entry without history (an older store).
        chunks: list[tuple[str, str]] = []
        # (Spelled as a replay: what a dropped connection never wrote of it is not kept
        # for its client as live output, see _keep_unsent.)
        prefix = updates.replay_prefix(session.id)
        try:
            async for rows in self.store.transcript_rows(session.id, REPLAY_PAGE):
                for _, kind, payload_json in rows:
                    if kind == STOP:
                        history += turn_history(payload_json, chunks)
                        chunks.clear()
                    elif kind == "user_message_chunk" or kind == "agent_message_chunk":
                        chunks.append((kind, payload_json))
                if replay:
                    await conn.send_encoded_many(
                        [prefix + payload + "}}" for _, kind, payload in rows if kind != STOP]
                    )
        except UnknownSessionError:  # deleted meanwhile
            raise RpcError.not_found(f"Session not found: {session.id}") from None
        return history

    def list_sessions(self, params: acp.ListSessionsParams) -> Awaitable[dict[str, Any]]:
        # Sessions store their cwd resolved (symlinks followed): filter on the same form.
        # Resolved here, in the synchronous part, like every other path check.
        cwd = str(_resolve_param(params.cwd, "cwd")) if params.cwd is not None else None
        return self._list_sessions(cwd, params.cursor)

    async def _list_sessions(self, cwd: str | None, cursor: str | None) -> dict[str, Any]:
        try:
            # Only sessions under the roots this server serves (a store may outlive a
            # --project), left out by the store's query: dropped from each page after it,
            # 50 newer sessions of another root made a first page of nothing but a cursor.
            records, cursor = await self.store.list_sessions(
                cwd=cwd, cursor=cursor, roots=self.roots
            )
        except BadCursor as exc:
            raise RpcError.invalid_params(f"Invalid params: cursor is not valid ({exc})") from None
        except StoreError as exc:  # (the store's trouble, not the client's cursor)
            raise _store_failed(exc) from None
        sessions = [
            {
                "sessionId": r.id,
                # As the client sent it (the session-list page: "cwd is immutable after
                # session setup"); it filters and loads by either spelling.
                "cwd": r.cwd_sent or r.cwd,
                "title": r.title,
                "updatedAt": datetime.fromtimestamp(r.updated_at, UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                ),
                **(
                    {"additionalDirectories": list(r.additional_directories)}
                    if r.additional_directories
                    else {}
                ),
            }
            for r in records
        ]
        result: dict[str, Any] = {"sessions": sessions}
        if cursor is not None:
            result["nextCursor"] = cursor
        return result

    async def close_session(self, conn: ClientConnection, session_id: str) -> dict[str, Any]:
        """Cancel the session's running turn, wait for it to finish, forget the live session
        (it stays loadable from the store)."""
        session = self.owned_session(conn, session_id)
        _check_not_loading(conn, session)
        # Claimed before the first await: a prompt read while the turn winds down (its
        # relay ends a pass or two before this resumes) would otherwise start on a session
        # about to be dropped, and run on after close was answered.
        session.closing = True
        turn = session.turn
        if turn is not None:
            self.cancel_turn(session, turn)
            try:
                await turn.finished.wait()
            except BaseException:
                # The close itself was cancelled ($/cancel_request, or its connection
                # left): the session stays, usable (its turn is cancelled anyway).
                session.closing = False
                raise
        if self.sessions.get(session_id) is session:
            self._drop_session(session)
        return {}

    async def delete_session(self, conn: ClientConnection, session_id: str) -> dict[str, Any]:
        live = self.sessions.get(session_id)
        if live is not None or session_id in conn.loads_pending:
            self.owned_session(conn, session_id)  # (refused before anything is claimed)
        # Claimed for the whole delete: a session/load of it is refused meanwhile, so no
        # load can make it live between the checks below and the row's removal (it would
        # be left live with nothing stored: every later turn failed to save).
        self._deleting[session_id] += 1
        try:
            if live is not None:
                await self.close_session(conn, session_id)
            else:
                while await self._waited_for_cut_turn(session_id):
                    pass  # (its commit would fail on no session)
                try:
                    await self._stored(session_id)
                except RpcError:
                    # Already deleted or never existed (or not under our roots: left
                    # alone). The session-delete page: this SHOULD succeed silently.
                    return {}
            try:
                await self.store.delete_session(session_id)
            except StoreError as exc:  # (closed above, if it was live: it stays loadable)
                raise _store_failed(exc) from None
        finally:
            self._deleting[session_id] -= 1
            if not self._deleting[session_id]:
                del self._deleting[session_id]
        return {}

    async def _waited_for_cut_turn(self, session_id: str) -> bool:
        """Wait for the turn cut as the session was dropped (``_ending``) to be recorded;
        False at once if there is none. A load or delete reading the store before it is
        would miss that turn."""
        ending = self._ending.get(session_id)
        if ending is None:
            return False
        await ending.finished.wait()
        return True

    def owned_session(self, conn: ClientConnection, session_id: str) -> Session:
        """The session, if ``conn`` owns it; otherwise -32002 if it is not live, and the
        refusal that says who holds it if another connection (or a client away within its
        grace period) does. (Hiding the holder would hide nothing: every client with the
        token sees the session in session/list, and session/load says the same.)"""
        session = self.sessions.get(session_id)
        if session is None:
            if session_id in conn.loads_pending:  # (not yet claimed by its load)
                raise _still_loading(session_id)
            raise RpcError.not_found(f"Session not found: {session_id}")
        if session.owner is not conn:
            raise _held_elsewhere(session)
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
            # Its sessions are kept for the client (detach decides the same way). Also
            # after a $/cancel_request (told first): its -32800 is kept for the client.
            turn.orphaned = True
            return
        turn.request_cancelled = turn.request_cancelled or not lost
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
                    session.last_answer = ("answer", turn.request_id, turn.response, turn.error)
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


def _resolve_param(path: str, where: str) -> Path:
    """``path`` :func:`resolved`; one that cannot be (a symlink loop, a directory removed
    under the walk) is -32602 naming ``where``, not an internal error. So is one that
    resolves (through a symlink) to a path that is not UTF-8: the store refused such a
    cwd with an internal error, and an additional directory was listed with an escape
    (``\\udce9``) that no load could send back."""
    try:
        checked = resolved(path)
    except (OSError, RuntimeError) as exc:  # (3.11 reports a symlink loop as RuntimeError)
        raise RpcError.invalid_params(
            f"Invalid params: {where} {path!r} cannot be resolved: {exc}"
        ) from None
    if not is_name_text(checked):
        raise RpcError.invalid_params(
            f"Invalid params: {where} {path!r} resolves to {checked!r}, a path that is not "
            "UTF-8 (no client could name it)"
        )
    return Path(checked)


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


def _answer_id(item: Pending) -> RequestId | None:
    """The request id a kept answer (an ``"answer"`` or ``"message"`` item) answers."""
    request_id: RequestId | None = item[1] if item[0] == "answer" else item[2]
    return request_id


def _answered(session: Session, conn: ClientConnection, item: Pending) -> None:
    """An old answer (``item``) was handed to ``conn``: it awaits it no more, and it is the
    session's last answer (should ``conn`` drop before writing it, ``_keep_unsent`` keeps
    it; should it drop before its client read it, see ``_answers_lost_in_flight``)."""
    request_id = _answer_id(item)
    conn.stop_awaiting(request_id)
    session.answered_id = request_id
    session.last_answer = item


def _answer_unwanted(
    session: Session, conn: ClientConnection, request_id: RequestId | None
) -> bool:
    """Whether the answer to a prompt sent on a dropped connection is kept from ``conn``,
    the connection that re-attached the session (dropped, logged: the turn is in the
    store, and ``session/load`` replays it); else ``conn`` is to get it (and no longer
    awaits it once it is sent: :func:`_answered`).

    Why: the answer keeps the prompt's id, which only a client that carries its ids over
    to the new connection (as ``punie-trio acp`` carries the IDE's) can match. A client
    that starts its ids afresh may have reused that id for a new request, in flight,
    answered already, or sent and not yet read: it would take the old turn's answer for
    its new request's. The server cannot tell the two apart, so the client says which
    answers it awaits (``_meta["punie-trio/awaiting"]`` in ``initialize``), and only those
    are sent, never one whose id it has in flight again.
    """
    if request_id in conn.awaiting and not conn.has_in_flight(request_id):
        return False
    log.info(
        # (%.80r: a request id may be any string up to the message's size, 16 MiB.)
        "session %s: not delivering the answer to request %.80r of a dropped connection: "
        "the re-attached connection %s",
        session.id, request_id,
        "has its own request with that id in flight" if request_id in conn.awaiting
        else "did not list it as awaited",
    )  # fmt: skip
    return True
