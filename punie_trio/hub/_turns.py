"""Turns: a ``session/prompt`` from its registration to its answer, the relay of its
events, the client calls it makes, and its transcript's commit.

Routing: a turn's events arrive on the turn's own channel and are relayed by the turn's
relay task, in the manager's nursery (so a turn can outlive its connection within the
reconnect grace). ``session/update``s therefore go to the session's owner, and
``fs/*``/``terminal/*``/``session/request_permission`` calls to the connection that sent
the running prompt; a slow client blocks only its own relay, whose turn then waits on its
bounded event channel (policy: wait). No other client is delayed.

The cost of a prompt: the reader registers the turn and queues its ``StartTurn`` without
waiting; the peer starts no task for it (the request is a :class:`~punie_trio.rpc.Deferred`,
answered by the relay); a cancel is a ``CancelTurn`` queued from wherever it is decided. So
a prompt costs two task starts (the relay, the worker's turn) and, for a short answer, its
updates and its answer leave in one write.

These are the :class:`~._manager.Manager`'s methods, defined here and bound in its class
body (each takes the manager as ``self``): the state they change is the manager's
(``sessions``, ``_running_turns``, ``_ending``, ``_tool_calls``), and the manager stays the
one object a connection talks to.

Resource handling: a turn's relay (:func:`_relay_turn`) and each of its client calls
(:func:`_client_call`) are tasks in the manager's nursery; the calls run in scopes the
relay cancels when it ends, and it waits (briefly) for them. A relay commits its turn even
when cancelled (shielded, within :data:`PERSIST_TIMEOUT`), and frees the session for its
next prompt whatever happened.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from .._json import without_surrogates
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
from ..store import STOP, Payload, StoreError
from ..worker import (
    CancelTurn,
    ClientCall,
    ClientReply,
    EventReceiver,
    EventSender,
    ForgetTurn,
    StartTurn,
    TurnEnv,
    TurnEvent,
    TurnFinished,
    Update,
    open_event_channel,
    seconds_up,
)
from ._lifecycle import _check_not_loading, shutting_down
from ._session import ActiveTurn, Session, text_of

if TYPE_CHECKING:
    from ._connection import ClientConnection
    from ._manager import Manager

log = logging.getLogger("punie_trio.hub")

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


def begin_prompt(self: Manager, conn: ClientConnection, params: PromptParams) -> ActiveTurn:
    """Register a turn synchronously (so a ``session/cancel`` read next finds it)."""
    if self.closing.is_set():
        raise shutting_down()
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
        self.metrics.tallies.limits["prompts_per_minute"] += 1
        retry = recent[0] + 60.0 - now
        prompts = "prompt" if per_minute == 1 else "prompts"
        raise RpcError(
            INVALID_REQUEST,
            f"Rate limit: {per_minute} {prompts} per minute for this client; "
            f"retry in {seconds_up(retry, 1):.1f} s",
            {"retryAfterSeconds": seconds_up(retry, 3)},  # (up: a client may wait just that)
        )
    recent.append(now)
    turn = ActiveTurn(next(self._turn_ids), conn)
    session.turn = turn
    self._running_turns += 1
    return turn


def start_prompt(self: Manager, conn: ClientConnection, params: PromptParams) -> Deferred:
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
    start = StartTurn(turn.turn_id, env, params.text(), params.prompt, events_send, number, ages)
    if self._command(session.worker, start):
        turn.started = True
    else:
        events_send.close()  # no worker: the relay sees the turn end at once
    self._nursery.start_soon(self._relay_turn, session, turn, params, events_receive)
    return Deferred(functools.partial(self._prompt_cancelled, session, turn))


def _prompt_cancelled(self: Manager, session: Session, turn: ActiveTurn, lost: bool) -> None:
    if lost and self._grace_for(turn.connection):
        # Its sessions are kept for the client (detach decides the same way). Also
        # after a $/cancel_request (told first): its -32800 is kept for the client.
        turn.orphaned = True
        return
    turn.request_cancelled = turn.request_cancelled or not lost
    self.cancel_turn(session, turn)


async def _relay_turn(
    self: Manager,
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
    # Tool calls streamed and not yet ended (completed or failed), in the order opened.
    open_tools: dict[str, None] = {}
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
                    kind = update["sessionUpdate"]
                    streamed.append((kind, encoded))
                    if kind == "agent_message_chunk":
                        agent_text.append(text_of(update))
                    elif kind == "tool_call" or kind == "tool_call_update":
                        _track_tool_call(open_tools, update)
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
            if open_tools:
                # Cut before the turn's end came through (the shutdown's time ran out,
                # or the worker's last updates found no room): the tool calls it left
                # running end failed here, as the worker ends them, or every load
                # replayed them running for ever.
                ended = _cut_tool_calls(open_tools)
                streamed += [("tool_call_update", encoded) for encoded in ended]
                if trio.current_effective_deadline() != -math.inf:
                    # (and told, if its client can still be)
                    held += [prefix + encoded + "}}" for encoded in ended]
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
                self.metrics.tallies.model_failures += 1
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


async def _deliver_held(self: Manager, session: Session, held: list[str]) -> None:
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


async def _answer_orphan(self: Manager, session: Session, turn: ActiveTurn) -> None:
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


async def _client_call(self: Manager, session: Session, turn: ActiveTurn, call: ClientCall) -> None:
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


async def _ask_client(self: Manager, session: Session, turn: ActiveTurn, call: ClientCall) -> None:
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
    self: Manager,
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
    # (The prompt as the model was given it, links and embedded resources included: the
    # live history keeps it so.)
    user_said = params.text()
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
                self.metrics.tallies.store_failures["turn"] += 1
                return "the store did not answer in time"
        session.turns += 1
    except StoreError as exc:
        log.error("could not persist turn of session %s: %s", session.id, exc)
        self.metrics.tallies.store_failures["turn"] += 1
        return str(exc)
    except Exception as exc:  # a store bug must not take the manager down
        log.exception("persisting a turn of session %s failed", session.id)
        self.metrics.tallies.store_failures["turn"] += 1
        return f"{type(exc).__name__}: {exc}"
    if title is not None:
        session.title = title
    return None


#: What a tool call the relay ends (see :func:`_cut_tool_calls`) says.
CUT_TOOL_CALL = (
    "cancelled: the turn ended before this tool call reported its outcome, "
    "so whether it was carried out is not known"
)


def _track_tool_call(open_tools: dict[str, None], update: dict[str, Any]) -> None:
    """Keep ``open_tools`` (the ids of the turn's tool calls not yet ended) up to date
    with a ``tool_call`` or ``tool_call_update`` the turn streamed."""
    tool_id = update.get("toolCallId")
    status = update.get("status")
    if not isinstance(tool_id, str):
        return
    if status == "completed" or status == "failed":
        open_tools.pop(tool_id, None)
    elif update["sessionUpdate"] == "tool_call" or status is not None:
        open_tools[tool_id] = None


def _cut_tool_calls(open_tools: dict[str, None]) -> list[str]:
    """The encoded ``tool_call_update``s that end, failed, the tool calls a turn cut
    before its end left running. The tool-calls page has no status for "cancelled", and
    an IDE shows a call left ``in_progress`` as running for ever, a load's replay too.
    The worker ends such calls itself (saying whether a write may have landed); these
    stand in only where its word never reached the relay, so they say the outcome is
    not known rather than that nothing was done."""
    return [
        updates.encode(updates.tool_call_update(tool_id, status="failed", text=CUT_TOOL_CALL))
        for tool_id in open_tools
    ]


def _title_for(session: Session, params: PromptParams) -> str | None:
    """The title a session without one takes from this prompt: its first line of text,
    cut to :data:`TITLE_CHARS` (None: it has one, or the prompt has no text)."""
    if session.title is not None:
        return None
    # Any line break ends it (splitlines): split at "\n" only, a CRLF prompt named the
    # session "Fix the bug\r". Spaces at its end are no part of a title either.
    lines = params.text().strip().splitlines()
    first_line = lines[0].rstrip() if lines else ""
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
