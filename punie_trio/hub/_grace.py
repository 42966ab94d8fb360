"""Reconnect grace: what a client that said who it is (``_meta["punie-trio/clientId"]``)
keeps while its connection is down, and how it gets it back.

A connection that ends under a client id keeps its sessions for ``grace_seconds``: their
turns run on (a turn's relay lives in the manager's nursery, not the connection's), and
what they produce is kept on each session (``Session.pending``; past ``detached_buffer``
updates, or ``detached_bytes`` of them, the client is told to reload instead) until the
client re-attaches (:func:`reclaim`, then :func:`deliver_missed`), or its grace ends and
the sessions are dropped (they stay loadable from the store, and the client is owed a
reload notice, :func:`expired_for`). The sessions of any other client are dropped when it
leaves.

These are the :class:`~._manager.Manager`'s methods, defined here and bound in its class
body (each takes the manager as ``self``): the state they change is the manager's
(``sessions``, ``_reattached``, ``_expired``, ``_unconfirmed``, ``_left_prompt_times``),
and the manager stays the one object a connection talks to. The answers a client back is
owed that no session keeps (``_left_answers``) are ``_left.py``'s.

Resource handling: a connection's sessions are dropped when it leaves; its turns are
cancelled (the peer tells the manager through the prompt's Deferred, and :func:`detach`
cancels the rest), unless its client keeps them within grace. Each client away has one
timer task in the manager's nursery (:func:`_expire_grace`), ended by its re-attach or by
its grace's end; the clients away, with the live connections, stay within
``max_connections`` (:func:`_bound_detached`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..acp import updates
from ..rpc import (
    ANSWER_START,
    INVALID_REQUEST,
    PeerClosed,
    RequestId,
    RpcError,
)
from ._left import _keep_left, _keep_written_answers, forget_left_answers
from ._session import (
    RELOAD_REQUIRED,
    Pending,
    Session,
    answer_id,
    as_sent,
    json_string_at,
    small_id,
)

if TYPE_CHECKING:
    from ._connection import ClientConnection
    from ._manager import Manager

log = logging.getLogger("punie_trio.hub")

#: The longest an ``initialize`` waits to take a client id over from a silent connection
#: (its probe, then its disconnect's clean-up: each bounded far below this).
TAKE_OVER_WITHIN = 30.0


def detach(self: Manager, conn: ClientConnection) -> None:
    """Forget a connection that ended. A client that said who it is keeps its sessions
    for ``grace_seconds`` (turns run on, what they produce is kept for it); the sessions
    of any other client are dropped (they stay loadable from the store).

    A grace of 0 is a grace period that ends at once: the sessions are dropped here,
    but a client that said who it is is still told, when it comes back, to reload
    those that lost something (:func:`_end_grace`): it once waited for ever for the
    answer of the turn cut under it."""
    try:
        _detach(self, conn)
    finally:
        self.on_probation.discard(conn)
        leaving = self._leaving.pop(conn, None)
        if leaving is not None:
            # The connection whose take_over probed conn takes its place, if it was let
            # in on probation past a full limit: now, before anything else can take it.
            claimant = self._claims.get(conn.client_id or "")
            if claimant is not None and claimant.on_probation:
                self.promote(claimant)
            leaving.set()  # (a take_over waits for this: conn's sessions are decided)


def _detach(self: Manager, conn: ClientConnection) -> None:
    self.connections.discard(conn)
    owned = [s for s in self.sessions.values() if s.owner is conn]
    client_id = conn.client_id
    if client_id and conn.prompt_times:
        self._keep_prompt_times(client_id, conn.prompt_times)
    # (As _grace_for, but for the length: a client that can be told when it is back.)
    told = bool(client_id) and self._nursery is not None and not self.closing.is_set()
    grace = told and self._grace_for(conn)
    unsent = conn.peer.unsent() if told and conn.peer is not None else []
    if conn.answers:
        _keep_written_answers(self, conn, owned, unsent if told else None)
    if unsent:
        assert client_id is not None
        self._keep_reload_notices(client_id, owned, unsent)
        self._keep_unsent(owned, unsent, conn.prompt_sessions or {}, client_id)
    if client_id and told and owned:
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


async def take_over(self: Manager, conn: ClientConnection, client_id: str) -> None:
    """Let ``conn``, whose ``initialize`` names ``client_id``, have it: at once if no
    other open connection holds it; else once that connection, probed (:attr:`alive`:
    pinged, and silent for a few seconds), has been dropped and detached (its sessions
    kept within grace, for ``conn`` to reclaim). -32600 if the holder is alive (or
    cannot be told dead), or another connection is taking the id over meanwhile (two
    connections racing for one id: one probe, and at most one winner). The caller
    decides (``check_client_id``, ``reclaim``) right after, with no await between.

    Why: a connection left half-open (a network flap, a laptop's resume) looks open
    until the heartbeat's sweep finds it silent, 60-70 s later; the client coming back
    under its id was refused its own sessions (-32600) for that long. The refusal of a
    live holder stays: one client must not take over another's live sessions by naming
    its id while it is connected.

    Error handling: past :data:`TAKE_OVER_WITHIN` (a holder whose disconnect does not
    finish) it is -32600 too; the client may try again."""
    holder = self.holder_of(client_id, conn)
    if holder is None or self.alive is None or client_id in self._claims:
        self.check_client_id(client_id, conn)  # (raises if held or claimed)
        return
    self._claims[client_id] = conn
    # Nothing more is written to the holder meanwhile: half-open, it would never get it,
    # and what was written is never sent again. Held, it is kept for ``conn`` if the
    # holder is dropped (_keep_unsent), and goes on to the holder if it is alive.
    peer = holder.peer
    held = peer.hold_writing() if peer is not None else None
    try:
        with trio.move_on_after(TAKE_OVER_WITHIN) as waited:
            gone = await self._gone_after_probe(holder)
    finally:
        del self._claims[client_id]
        if peer is not None and held is not None:
            peer.release_writing(held)
    if waited.cancelled_caught:
        raise RpcError(
            INVALID_REQUEST,
            f"Client id {client_id!r} is in use by a connection that was found silent and "
            "is still closing; try again",
        )
    if not gone:
        raise RpcError(
            INVALID_REQUEST,
            f"Client id {client_id!r} is in use by another open connection (alive: it answered "
            "a ping, or cannot be pinged)"
            if not self.closing.is_set()
            else f"Client id {client_id!r} is in use: the server is shutting down",
        )


async def _gone_after_probe(self: Manager, holder: ClientConnection) -> bool:
    """Probe ``holder``: True once it has detached (dropped as silent, or it ended by
    itself meanwhile); False if it is alive, or the server starts shutting down (the
    shutdown does not wait for a probe)."""
    assert self.alive is not None
    alive = self.alive
    left = self._leaving.setdefault(holder, trio.Event())
    gone = False
    try:
        async with trio.open_nursery() as nursery:

            async def probe() -> None:
                if await alive(holder):
                    nursery.cancel_scope.cancel()

            async def shutdown() -> None:
                await self.closing.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(probe)
            nursery.start_soon(shutdown)
            await left.wait()
            gone = True
            nursery.cancel_scope.cancel()  # (also if it left by itself: no need to wait on)
    finally:
        if not left.is_set() and self._leaving.get(holder) is left:
            del self._leaving[holder]
    return gone


def _keep_unsent(
    self: Manager,
    owned: list[Session],
    texts: list[str],
    prompts: Mapping[RequestId, str],
    client_id: str | None = None,
) -> None:
    """Put what a dropped connection had queued but never written back in front of its
    sessions' backlogs (it is older than anything kept since): their updates, the
    answers of its prompts, and the errors of those refused at once, in their places
    (``prompts``: the connection's prompts, request id to session id; each session's
    last answered prompt too). The other answers are kept for the return
    of ``client_id`` (None: a client that cannot come back), as a cut close's is
    (:func:`._left.keep_left_answer`): those of a session closed or deleted before the drop
    was seen (the close's own, and its cancelled prompt's), and of any other request.
    The rest (our own requests, a session/load's replay, spelled apart:
    ``updates.REPLAY_START``) belonged to that connection alone; so did the answer to
    a request sent under an id in flight (refused as in use: ``rpc.serialize_aside``),
    which is not that request's (kept, it answered the prompt in flight under its id to
    the client back awaiting it). What was written is
    not repeated: whether it arrived cannot be known without the client
    acknowledging it. Each text is looked at once.

    Why the refusals: a re-attaching client that awaits a refused prompt's id would
    otherwise wait for ever (its prompt never ran, so the store has no turn to say
    so); kept, the error is delivered under the rule of any kept answer.

    Why the other answers: a close had run to its end, its session gone, and the
    client, back awaiting its id and its prompt's, was told "no answer to this request
    will come" for each, though neither answer had left the server."""
    if not texts:
        return
    by_id = {s.id: s for s in owned}
    answered = {s.answered_id: s for s in owned if s.answered_id is not None}
    for request_id, sent_in in prompts.items():
        if sent_in in by_id and request_id not in answered:
            answered[request_id] = by_id[sent_in]
    # Answers kept already, not to be kept again as left answers: a session's (one it
    # kept, or one kept for it here), and a close's or delete's that goes on past the
    # drop (its own answer is to come: the -32800 its cut handler queued is not it).
    skipped: set[RequestId | None] = set()
    if client_id:
        skipped.update(answer_id(p) for s in owned for p in s.pending if p[0] != "update")
        skipped.update(self._left_answers.get(client_id, ()))
    kept: dict[str, list[Pending]] = {}
    others: list[tuple[RequestId, str]] = []  # (the other answers, for client_id)
    for text in texts:
        if text.startswith(updates.NOTIFICATION_START):
            session_id = json_string_at(text, len(updates.NOTIFICATION_START))
            session = by_id.get(session_id) if session_id is not None else None
            if session is not None:
                kept.setdefault(session.id, []).append(("update", text))
            continue
        if not (answered or client_id) or not text.startswith(ANSWER_START):
            continue
        try:
            msg = json.loads(text)
        except ValueError:  # pragma: no cover - we wrote it
            continue
        if "method" in msg:
            continue  # (a request of ours)
        request_id = msg.get("id")
        session = answered.get(request_id)
        result = msg.get("result")
        prompt_answer = "error" in msg or (isinstance(result, dict) and "stopReason" in result)
        if session is not None and prompt_answer:
            kept.setdefault(session.id, []).append(("message", text, request_id))
            skipped.add(request_id)
        elif client_id:
            others.append((request_id, text))
    for request_id, text in others:
        if request_id not in skipped:
            assert client_id is not None
            _keep_left(self, client_id, request_id, text)
    for session_id, items in kept.items():
        session = by_id[session_id]
        rest, session.pending = session.pending, []
        session.kept_updates = session.kept_bytes = 0
        for item in (*items, *rest):
            self._buffer(session, item)


def _keep_reload_notices(
    self: Manager, client_id: str, owned: list[Session], texts: list[str]
) -> None:
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


def _grace_for(self: Manager, conn: ClientConnection) -> bool:
    """Whether ``conn``'s sessions (and running turns) wait for its client to come back:
    it said who it is, grace is on, and the manager runs and is not closing."""
    return (
        bool(conn.client_id)
        and self.limits.grace_seconds > 0
        and self._nursery is not None
        and not self.closing.is_set()
    )


def _keep_prompt_times(self: Manager, client_id: str, times: list[float]) -> None:
    """Remember a leaving client's prompt times for the rate limit's window: for at most
    ``max_connections`` client ids, the oldest to leave forgotten first, and none for a
    client whose last prompt is older than the window.

    Why the count: bounded by the window alone, the dict held every client id that left
    in the last minute, and a token holder coming and going under fresh ids (199
    connections a second on a 2-core machine) grew it by 12,000 entries a minute; each
    leave also scanned the whole dict (1 ms a leave at 4,000 entries). A client id
    forgotten early starts with a fresh count, as one back after the window does: the
    limit guards against a runaway client, not a token holder, who can use fresh ids.

    The dict is in the order clients left (re-inserted on each leave), so the sweep looks
    only at its front: a client gone longer than the window has a last prompt older than
    that too, and an entry expired behind a live one waits for it (still within the
    count)."""
    left = self._left_prompt_times
    horizon = trio.current_time() - 60.0
    while left:
        oldest = next(iter(left))
        if left[oldest][-1] > horizon and len(left) < self.limits.max_connections:
            break
        del left[oldest]
    left.pop(client_id, None)  # (re-inserted: now the newest)
    left[client_id] = times


def prompt_times_for(self: Manager, client_id: str) -> list[float]:
    """The prompt times a client id left with, for its new connection: reconnecting
    does not start a fresh count of ``prompts_per_minute``."""
    return self._left_prompt_times.pop(client_id, [])


def reclaim(self: Manager, conn: ClientConnection) -> list[Session]:
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
    _answers_lost_in_flight(conn, reclaimed)
    # What it does not await is not for it any more: kept in its sessions' backlogs, or
    # kept apart for its return.
    _drop_old_answers(
        reclaimed, conn, lambda i: i not in conn.awaiting, "did not list it as awaited"
    )
    forget_left_answers(self, client_id, conn.awaiting)
    return reclaimed


def forget_old_answers(self: Manager, conn: ClientConnection, reused: RequestId) -> None:
    """Drop the old answer under ``reused`` (kept in a backlog of ``conn``'s sessions, to
    come from an orphaned turn of theirs, or kept apart for the client's return:
    :func:`._left.forget_left_answers`): ``conn``'s client, which awaited it, uses the id again
    for a request of its own (see :func:`_drop_old_answers`)."""
    forget_left_answers(self, conn.client_id, reused=reused)
    owned = [s for s in self.sessions.values() if s.owner is conn]
    _drop_old_answers(owned, conn, lambda i: i == reused, "uses its id again")


def _drop_old_answers(
    sessions: Sequence[Session],
    conn: ClientConnection,
    unwanted: Callable[[Any], bool],
    why: str,
) -> None:
    """Drop the answers to prompts of dropped connections that ``conn`` (which holds
    ``sessions``) does not want (``unwanted``: it did not list the id as awaited, or it
    uses it again): those kept in the sessions' backlogs, and that of a turn still
    running orphaned (it will not be kept when it ends). Logged, as a flush logs one
    (:func:`_answer_unwanted`).

    Why now, not only as a flush sends a backlog to ``conn``: ``conn`` may drop first
    (the turn still running, or the backlog unsent), and the answer was then kept for the
    next connection, which took it for that of its own request under the id (sent on
    ``conn``, its answer left unwritten too), and got it ahead of that one. The client
    said on ``conn`` that the old answer is not its; that holds past ``conn``."""
    for session in sessions:
        turn = session.turn
        if (
            turn is not None
            and turn.orphaned
            and turn.connection is not conn
            and turn.request_id is not None
            and unwanted(turn.request_id)
        ):
            _log_unwanted(session, turn.request_id, why)
            turn.request_id = None  # (so nothing answers it: _relay_turn)
        if not any(p[0] != "update" and unwanted(answer_id(p)) for p in session.pending):
            continue
        kept = []
        for item in session.pending:
            if item[0] != "update" and unwanted(answer_id(item)):
                _log_unwanted(session, answer_id(item), why)
            else:
                kept.append(item)
        session.pending = kept


def _answers_lost_in_flight(conn: ClientConnection, reclaimed: list[Session]) -> None:
    """Keep again, for :func:`deliver_missed`, each reclaimed session's last answer that
    ``conn``'s client says it never got, followed by a reload notice.

    Why: an answer written to a connection that then dropped may never have reached its
    client (it was in a socket buffer, or in a batch the client discarded as it closed),
    and nothing tells the server so, except the re-attaching client listing its id as
    awaited (``_meta["punie-trio/awaiting"]``). Not kept, the client waited for ever for
    it. The updates written before it may have been lost with it, hence the notice. Only
    the answer handed to the session's previous holder is sent again (taken here, at
    each re-attach), and not under an id the client awaits from a turn that still runs
    or an answer kept anyway (ids may be reused)."""
    if not conn.awaiting:
        for session in reclaimed:
            session.last_answer = None
        return
    live: set[RequestId | None] = set()
    for session in reclaimed:
        if session.turn is not None:
            live.add(session.turn.request_id)
        live.update(answer_id(p) for p in session.pending if p[0] != "update")
    for session in reclaimed:
        item, session.last_answer = session.last_answer, None
        if item is None:
            continue
        request_id = answer_id(item)
        if request_id in conn.awaiting and request_id not in live:
            log.info(
                "session %s: sending the answer to request %.80r again: the client "
                "re-attached awaiting it (lost in flight when its connection dropped)",
                session.id, request_id,
            )  # fmt: skip
            # As it was sent (encoded again): the same answer, not a new one, so an
            # error is not counted again in punie_errors_total.
            session.pending.insert(0, as_sent(item))
            session.overflowed = True


async def deliver_missed(
    self: Manager, conn: ClientConnection, sessions: list[Session], expired: Sequence[str] = ()
) -> None:
    """Send ``conn`` what its reclaimed ``sessions`` produced while it was away
    (updates, then answers), in order, each exactly once; then tell it to reload the
    ``expired`` sessions (:meth:`expired_for`). A notice not sent (the connection
    ended) stays owed to the client id. A session its client closed as its previous
    connection dropped (kept, marked closing, for what it had not got: see
    ``_lifecycle.close_session``) is dropped once that is sent."""
    told = 0
    try:
        for session in sessions:
            await self._flush(session, conn)
            if session.closing and session.turn is None and self._held_by(conn, session.id):
                # Closed as its previous connection dropped (_lifecycle.close_session),
                # and kept for this: now sent, the close takes effect. Its last answer
                # (the cancelled turn's, just handed to conn) is kept for the client's
                # return as any closed session's is: should conn drop before its client
                # reads it, it went with the session, and the client, back awaiting
                # it, was told -32603 though the answer was known.
                self.remember_closed_answer(conn, session)
                self._drop_session(session)
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


def _held_by(self: Manager, conn: ClientConnection, session_id: str) -> bool:
    session = self.sessions.get(session_id)
    return session is not None and session.owner is conn


async def _expire_grace(self: Manager, client_id: str, event: trio.Event) -> None:
    with trio.move_on_after(self.limits.grace_seconds):
        await event.wait()
    if event.is_set():
        return  # re-attached, or its grace was ended early (_bound_detached)
    self._end_grace(client_id)


def _end_grace(self: Manager, client_id: str) -> None:
    """Drop the sessions ``client_id`` left (their turns are cancelled): they stay
    loadable from the store. Those that drop something the client has not got (a
    running turn, kept updates or answers) are remembered, so that the client, should
    it come back, is told to reload them rather than wait for an answer that will
    never come; not those it closed (as its connection dropped: ``closing``)."""
    self._reattached.pop(client_id, None)
    missed: list[str] = []
    unconfirmed: dict[RequestId, str] = {}
    for session in [s for s in self.sessions.values() if s.detached_client == client_id]:
        if session.closing:
            pass  # (its client closed it: nothing to reload)
        elif session.turn is not None or session.pending or session.overflowed:
            missed.append(session.id)
        elif session.last_answer is not None:
            request_id = answer_id(session.last_answer)
            if small_id(request_id):  # (a huge id is not kept past its session)
                unconfirmed[request_id] = session.id
        self._drop_session(session)
    if missed:
        self._owe(client_id, missed)
    if unconfirmed:
        unconfirmed.update(self._unconfirmed.pop(client_id, {}))  # (the older ones)
        self._unconfirmed[client_id] = unconfirmed
        while len(self._unconfirmed) > self.limits.max_connections:
            del self._unconfirmed[next(iter(self._unconfirmed))]


def _owe(self: Manager, client_id: str, session_ids: Sequence[str]) -> None:
    """Remember reload notices owed to ``client_id`` (after any it is owed already),
    within the bound of ``max_connections`` client ids, the oldest forgotten first."""
    owed = self._expired.pop(client_id, [])  # (re-inserted: now the newest)
    for session_id in session_ids:
        if session_id not in owed:  # (each session told once)
            owed.append(session_id)
    self._expired[client_id] = owed
    while len(self._expired) > self.limits.max_connections:
        del self._expired[next(iter(self._expired))]


def expired_for(
    self: Manager, client_id: str | None, awaiting: Collection[RequestId] = ()
) -> list[str]:
    """The sessions whose grace period ended with something ``client_id`` missed (see
    :meth:`_end_grace`), taken: its connection tells it to reload each, once. With them,
    those whose last answer the client says it still awaits (``awaiting``): it was lost
    in flight (see :func:`_answers_lost_in_flight`)."""
    if not client_id:
        return []
    expired = self._expired.pop(client_id, [])
    for request_id, session_id in self._unconfirmed.pop(client_id, {}).items():
        if request_id in awaiting and session_id not in expired:
            expired.append(session_id)
    return expired


def _bound_detached(self: Manager) -> None:
    """Keep the clients away within grace, with the live connections, within
    ``max_connections``: past it, the client away longest loses its grace now.

    Why: each client away keeps up to ``max_sessions_per_connection`` sessions and
    their running turns, and a client may come and go under a fresh client id each
    time: bounded only by the grace period, a token holder could pile up thousands
    of sessions and turns (an audit reached 3,200 running turns and 900 MB). So the
    sessions kept for absent clients are bounded like those of connected ones.
    """
    limit = self.limits.max_connections
    # Connections on probation are not counted (they are past the limit, and each takes
    # a place only as another leaves); nor is a client away whose id a connection is
    # taking over (take_over): that connection is its client, back, and counted already.
    # (Counted twice, a client taking over its half-open connection at a full server
    # would lose the very sessions it came back for.)
    connected = len(self.connections) - len(self.on_probation)
    claimed = sum(c in self._reattached for c in self._claims)  # (a few take-overs)
    while connected + len(self._reattached) - claimed > limit:
        client_id = next((c for c in self._reattached if c not in self._claims), None)
        if client_id is None:
            break  # (away the longest, and not being taken over: none)
        log.warning(
            "ending the grace period of client %r early: %d clients away and %d "
            "connected, over the connection limit (%d)",
            client_id, len(self._reattached) - claimed, connected, limit,
        )  # fmt: skip
        self.metrics.tallies.limits["max_connections"] += 1
        self._reattached[client_id].set()  # (its timer ends)
        self._end_grace(client_id)


def _buffer(self: Manager, session: Session, item: Pending) -> None:
    """Keep what a detached client missed; past ``detached_buffer`` updates, or
    ``detached_bytes`` of them, the client is told to ``session/load`` instead (answers
    are always kept)."""
    if item[0] == "update":
        if session.overflowed:
            return
        size = sys.getsizeof(item[1])  # (as the outbox counts: the memory it takes)
        limits = self.limits
        if (
            session.kept_updates >= limits.detached_buffer
            or session.kept_bytes + size > limits.detached_bytes
        ):
            self.metrics.tallies.limits["detached_buffer"] += 1
            session.overflowed = True
            session.pending = [p for p in session.pending if p[0] != "update"]
            session.kept_updates = session.kept_bytes = 0
            return
        session.kept_updates += 1
        session.kept_bytes += size
    session.pending.append(item)


async def _flush(self: Manager, session: Session, conn: ClientConnection) -> None:
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


async def _deliver(self: Manager, session: Session, update: str) -> None:
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


def _answered(session: Session, conn: ClientConnection, item: Pending) -> None:
    """An old answer (``item``) was handed to ``conn``: it awaits it no more, and it is the
    session's last answer (should ``conn`` drop before writing it, ``_keep_unsent`` keeps
    it; should it drop before its client read it, see :func:`_answers_lost_in_flight`),
    and a prompt of ``conn``'s (should ``conn`` close the session, then drop before its
    client read it: ``_left.remember_closed_answer``; a closed session's last answer
    was kept only for the connection that sent the prompt, and the client back awaiting
    it was told -32603)."""
    request_id = answer_id(item)
    conn.stop_awaiting(request_id)
    session.answered_id = request_id
    session.last_answer = item
    if conn.client_id and small_id(request_id):
        conn.remember_prompt(request_id, session.id)


def _answer_unwanted(
    session: Session, conn: ClientConnection, request_id: RequestId | None
) -> bool:
    """Whether the answer to a prompt sent on a dropped connection is kept from ``conn``,
    the connection that re-attached the session (dropped, logged: the turn is in the
    store, and ``session/load`` replays it); else ``conn`` is to get it (and no longer
    awaits it once it is sent: :func:`_answered`).

    Why: the answer keeps the prompt's id, which only a client that carries its ids over
    to the new connection (as the ``punie-trio acp`` shim, a later issue, is to carry the
    IDE's) can match. A client that starts its ids afresh may have reused that id for a
    new request, in flight, answered already, or sent and not yet read: it would take the
    old turn's answer for its new request's. The server cannot tell the two apart, so the
    client says which answers it awaits (``_meta["punie-trio/awaiting"]`` in
    ``initialize``), and only those are sent, never one whose id it has in flight again.
    """
    if request_id in conn.awaiting and not conn.has_in_flight(request_id):
        return False
    if conn.peer is not None and conn.peer.lost:
        # Gone, not yet detached: whatever it takes goes back at its detach (unwritten)
        # or stays the session's last answer (written), for its client's return. It may
        # be the very connection that sent the prompt, and a close of the session
        # flushed its turn's answer to it: dropped here as "not awaited", the answer of
        # a prompt it never said it did not await was lost.
        return False
    _log_unwanted(
        session,
        request_id,
        "has its own request with that id in flight"
        if request_id in conn.awaiting
        else "did not list it as awaited",
    )
    return True


def _log_unwanted(session: Session, request_id: RequestId | None, why: str) -> None:
    log.info(
        # (%.80r: a request id may be any string up to the message's size, 16 MiB.)
        "session %s: not delivering the answer to request %.80r of a dropped connection: "
        "the re-attached connection %s",
        session.id, request_id, why,
    )  # fmt: skip
