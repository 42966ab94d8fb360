"""One ACP client connection: the agent side of the protocol on top of a :class:`Peer`.

The connection is transport-blind: stdio, the ``/acp`` WebSocket and in-memory test streams all
arrive as a :class:`MessageStream`. It validates each call (``acp`` parsers, -32602 naming the
field), checks it is allowed (``initialize`` first, session ownership) and hands the work to the
:class:`Manager`.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from .. import acp
from .._version import __version__
from ..rpc import (
    INVALID_REQUEST,
    MAX_ID_CHARS,
    Deferred,
    Params,
    Peer,
    RequestId,
    RpcError,
    bounded_id,
    current_request_id,
    method_not_found,
    valid_id,
)
from ..transport import MessageStream
from ._left import LEFT_ANSWERS
from ._manager import Manager
from ._session import MAX_REMEMBERED_ID_CHARS, Session, small_id

log = logging.getLogger("punie_trio.hub")

# Where a client says who it is, so its sessions can be told apart (and, later, re-attached).
CLIENT_ID_META = "punie-trio/clientId"
# Where a re-attaching client lists the ids of the prompts it sent on its previous
# connection and still awaits: only those answers are delivered to it (Manager._flush).
AWAITING_META = "punie-trio/awaiting"
#: Most ids a client may list there (it awaits at most one prompt per session), or
#: ``--max-sessions-per-connection`` if that is more.
MAX_AWAITING = 1000
#: Longest string id it may list, in characters (integer ids: 64 bits): the bound of every
#: request id (``rpc.MAX_ID_CHARS``), so an id the server took can be listed. It keeps the
#: whole list near 1 MB at most.
MAX_AWAITED_ID_CHARS = MAX_ID_CHARS
#: Most prompts (run or refused) remembered per connection: more than its outbox can hold
#: unwritten.
MAX_REFUSED = 1024
#: Most answers to its other requests a connection remembers (``ClientConnection.answers``),
#: as many as are kept for a client's return.
MAX_ANSWERS = LEFT_ANSWERS

#: Requests a ``$/cancel_request`` does not cancel (``Peer.uncancellable``).
_UNCANCELLABLE = frozenset({acp.INITIALIZE})

AGENT_INFO = {"name": "punie-trio", "title": "punie-trio", "version": __version__}


@attrs.define(eq=False)
class ClientConnection:
    """Serve one client. ``run`` (startable) returns when the client is gone.

    Resource handling: every task of the connection (reader, writer, one per request) lives in
    its Peer's nursery, inside :meth:`run`; leaving ``run`` cancels them all, and the manager
    then forgets the connection's sessions. (A prompt's turn and relay live in the manager's
    nursery: the peer holds only its Deferred.)
    """

    manager: Manager
    transport: str = "unknown"
    id: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    capabilities: acp.ClientCapabilities = attrs.field(factory=acp.ClientCapabilities)
    client_info: dict[str, Any] | None = None
    #: Called (after the turns are cancelled) when a stdio client's input ends: where stdio
    #: is the only transport the server then bounds its exit, which must not wait for good
    #: on a client that stopped reading too (``server._serve_stdio``).
    on_input_end: Callable[[], None] | None = None
    initialized: bool = False
    client_id: str | None = None
    #: Let in past a full ``max_connections`` (``Manager.admit_upgrade``): it may only
    #: send ``initialize`` naming a client id whose connection a probe finds dead, and
    #: takes that connection's place (``Manager.promote``); refused and closed otherwise.
    on_probation: bool = False
    #: Whether a probe (``Manager.alive``) can find this connection dead, so that a
    #: client taking its place could be let in on probation past a full limit
    #: (``Manager.admit_upgrade``): not the ``--stdio`` one, nor a WebSocket the
    #: heartbeat cannot watch (over HTTP/2): those are taken for alive.
    probeable: bool = True
    #: How the transport is to close once :meth:`run` returns (a WebSocket close code
    #: and reason), if not as usual: set when a connection on probation is refused.
    close_with: tuple[int, str] | None = attrs.field(default=None, init=False)
    # On probation: whether its initialize has been read (the deadline for it is met).
    _initialize_read: bool = attrs.field(default=False, init=False)
    #: The request ids whose answers this client still awaits from its previous connection
    #: (``_meta["punie-trio/awaiting"]``); each is taken out once its answer is sent.
    #: (A frozenset, replaced when it changes: the shared empty one costs an idle
    #: connection nothing, an empty set 216 bytes.)
    awaiting: frozenset[RequestId] = attrs.field(default=frozenset(), init=False)
    peer: Peer | None = attrs.field(default=None, init=False)
    #: Sessions this connection's ``session/load``/``resume`` requests are loading, one
    #: entry per request, from when it is read until it ends: a prompt or close read
    #: meanwhile is refused as "still loading", also before the load has claimed the live
    #: session (``Manager.owned_session``). (A tuple, for the same reason as ``awaiting``.)
    loads_pending: tuple[str, ...] = attrs.field(default=(), init=False)
    # Start times of recent prompts, for the prompts-per-minute limit.
    # (A list, not a deque: an idle connection's empty list costs 56 bytes, a deque 760.)
    prompt_times: list[float] = attrs.field(factory=list, init=False)
    #: The prompts sent on this connection, run or refused at once (rate limit, a prompt
    #: already running, ...): request id to the session id it named, the newest
    #: :data:`MAX_REFUSED` (None until the first; only for a client that gave a client
    #: id). Should the connection drop before writing such a prompt's answer or error, it
    #: goes back in its place in that session's backlog, for a re-attaching client that
    #: awaits the id (Manager._keep_unsent). (Of the prompts that ran, only each session's
    #: last was known: an earlier one's answer, unwritten, was sent after the later turn.)
    prompt_sessions: dict[RequestId, str] | None = attrs.field(default=None, init=False)
    #: The newest answers queued to this client's requests but its prompts (which their
    #: sessions keep: ``Session.last_answer``; but for the last of a session it closed,
    #: ``Manager.remember_closed_answer``), as their text, by request id, in the order
    #: queued: the newest :data:`MAX_ANSWERS`, within ``outbox_bytes`` (None until the
    #: first; only for a client that gave a client id). A request read under an id holds
    #: None there until its answer is queued (a prompt takes its id out): the id's older
    #: answer is not the client's any more. Should the connection drop, those written
    #: are kept for the client's return, and no session's last answer under an id here is
    #: sent again (``Manager._keep_written_answers``): written, an answer may have been
    #: lost in flight, and a client back awaiting its id says it was.
    answers: dict[RequestId, str | None] | None = attrs.field(default=None, init=False)
    #: Of the ids in :attr:`answers`, those of ``session/load`` requests, to the session
    #: each loads: its replay was written before its answer, and may have been lost in
    #: flight with it (``Manager._keep_written_answers``). None until the first.
    loads: dict[RequestId, str] | None = attrs.field(default=None, init=False)
    # The memory the texts in ``answers`` take (``sys.getsizeof``, as the outbox counts).
    _answers_bytes: int = attrs.field(default=0, init=False)

    async def run(
        self,
        stream: MessageStream,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        peer = self.peer = Peer(
            stream,
            self,
            outbox_size=self.manager.limits.outbox_limit,
            outbox_bytes=self.manager.limits.outbox_bytes,
            observer=self.manager.metrics,
            # stdin EOF closes only the client's sending half: cancel our turns, but let
            # every request read so far be answered (a piped script gets all its answers).
            on_eof=self._input_ended if self.transport == "stdio" else None,
            # A re-attaching initialize delivers what its sessions kept after its answer,
            # in its own task: cancelled by a $/cancel_request read before that task ran,
            # the answer went but the rest was cut, and the client waited for it for ever.
            uncancellable=_UNCANCELLABLE,
        )
        self.manager.attach(self)
        try:
            await peer.run(task_status=task_status)
        finally:
            self.manager.detach(self)

    def _input_ended(self) -> None:
        self._cancel_turns()
        if self.on_input_end is not None:
            self.on_input_end()

    def _cancel_turns(self) -> None:
        for session in self.manager.sessions.values():
            if session.turn is not None and session.turn.connection is self:
                self.manager.cancel_turn(session, session.turn)

    # -- outgoing (used by the manager's relays) ----------------------------------------------

    async def send_encoded_many(self, texts: Sequence[str]) -> None:
        assert self.peer is not None
        await self.peer.send_encoded_many(texts)

    async def send_encoded(self, text: str) -> None:
        """Send a message already encoded (a ``session/update`` built with
        ``acp.updates.notification``)."""
        assert self.peer is not None
        await self.peer.send_encoded(text)

    async def wait_for_room(self) -> None:
        """Wait until this connection's outbox is below its bounds (see
        :meth:`Peer.wait_for_room`); at once if it has ended."""
        if self.peer is not None:
            await self.peer.wait_for_room()

    def send_encoded_now(self, texts: list[str]) -> bool:
        """Queue encoded messages without waiting (see :meth:`Peer.send_encoded_now`)."""
        return self.peer is not None and self.peer.send_encoded_now(texts)

    async def call_client(self, method: str, params: dict[str, Any]) -> Any:
        assert self.peer is not None
        return await self.peer.request(method, params)

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        assert self.peer is not None
        await self.peer.notify(method, params)

    def answer_now(
        self, request_id: Any, result: Any, error: RpcError | None, before: Sequence[str] = ()
    ) -> bool:
        return self.peer is not None and self.peer.answer_now(
            request_id, result, error, before=before
        )

    def request_refused(self, request_id: RequestId) -> None:
        self.stop_awaiting(request_id)  # (the client used the id again: see handle_request)

    def stop_awaiting(self, request_id: RequestId | None) -> None:
        """``request_id``'s old answer is no longer for this client (sent, or the id is
        in use again)."""
        if request_id in self.awaiting:
            self.awaiting = self.awaiting - {request_id}

    def has_in_flight(self, request_id: Any) -> bool:
        """Whether this connection's client has a request with ``request_id`` unanswered."""
        return self.peer is not None and self.peer.in_flight(request_id)

    async def send_answer(
        self, request_id: Any, result: Any, error: RpcError | None, *, aside: bool = False
    ) -> None:
        assert self.peer is not None
        await self.peer.send_answer(request_id, result, error, aside=aside)

    # -- Dispatcher ---------------------------------------------------------------------------

    def handle_request(self, method: str, params: Params) -> Awaitable[Any] | Deferred:
        if self.awaiting:
            # An id the client uses again is one it no longer awaits an old answer under.
            request_id = current_request_id.get(None)
            if request_id in self.awaiting:
                self.stop_awaiting(request_id)
                self.manager.forget_old_answers(self, request_id)
        if self.answers is not None:  # (a client id: what is kept for its return)
            self._reused(method, params)
        if method == acp.INITIALIZE:
            if self.on_probation:
                return self._initialize_on_probation(params)
            return self._initialize_request(*self._initialize_params(params))
        if not self.initialized:
            if self.on_probation and self.manager.has_room():
                # A place came free since the upgrade: one like any other from now on (it
                # was told "Connection limit reached" and closed, with room for it).
                self.manager.promote(self)
            if self.on_probation:
                return self._refused_on_probation(
                    f"a connection let in past the limit may only send initialize, "
                    f"not {method}, naming its client id"
                )
            if method.startswith("_") or method in acp.AGENT_METHODS:
                raise RpcError(INVALID_REQUEST, f"Invalid request: call initialize before {method}")
            raise method_not_found(method)
        manager = self.manager
        if method == acp.SESSION_NEW:
            parsed = acp.parse_new_session(params)
            return manager.new_session(self, parsed)
        if method == acp.SESSION_LOAD:
            ref = acp.parse_load_session(params, mcp_required=True)
            return manager.load_session(self, ref, replay=True)
        if method == acp.SESSION_RESUME:
            ref = acp.parse_load_session(params, mcp_required=False)
            return manager.load_session(self, ref, replay=False)
        if method == acp.SESSION_LIST:
            return manager.list_sessions(acp.parse_list_sessions(params))
        if method == acp.SESSION_CLOSE:
            # (Both go on if the connection drops first: the client asked for them.)
            session_id = acp.parse_session_id(params).session_id
            return manager.despite_a_drop(self, manager.close_session(self, session_id))
        if method == acp.SESSION_DELETE:
            session_id = acp.parse_session_id(params).session_id
            return manager.despite_a_drop(self, manager.delete_session(self, session_id))
        if method == acp.SESSION_PROMPT:
            self._sent_prompt(params)
            try:
                prompt = acp.parse_prompt(params, max_bytes=manager.limits.max_prompt_bytes)
            except acp.PromptTooLarge:
                manager.metrics.tallies.limits["max_prompt_bytes"] += 1
                raise
            return manager.start_prompt(self, prompt)
        if method == acp.SESSION_CANCEL:
            # A notification in ACP; sent with an id it is answered (-32002 if not ours).
            manager.cancel(self, acp.parse_session_id(params).session_id)
            return _ready(None)
        if method == acp.AUTHENTICATE:
            # A baseline method (overview page); its methodId "must be one of the methods
            # advertised in the initialize response" (the schema), and none are: the token
            # is checked before the connection exists (web/_auth.py).
            method_id = acp.parse_authenticate(params)
            raise RpcError.invalid_params(
                f"Invalid params: methodId {method_id!r} is not an advertised auth method "
                "(authMethods is empty: this agent needs no authentication)"
            )
        raise method_not_found(method)

    def _reused(self, method: str, params: Params) -> None:
        """The request being read uses its id: an older answer under it (one this
        connection queued, or a prompt's: :attr:`prompt_sessions`) is not the client's
        any more (see :attr:`answers`); a load's is remembered with the session it loads
        (:attr:`loads`). Only for a client that gave a client id: a connection without
        one pays one test per request for all of it."""
        answers = self.answers
        assert answers is not None
        request_id = current_request_id.get(None)
        if self.prompt_sessions and request_id is not None:
            # (nor one whose old answer or refusal, if unwritten, is to be kept for it)
            self.prompt_sessions.pop(request_id, None)
        if request_id in answers:
            self._forget_answer(request_id)
        if method == acp.SESSION_PROMPT or not small_id(request_id):
            return
        load = None
        session_id = params.get("sessionId") if isinstance(params, dict) else None
        if (
            method == acp.SESSION_LOAD
            and isinstance(session_id, str)
            and len(session_id) <= MAX_REMEMBERED_ID_CHARS
        ):
            live = self.manager.sessions.get(session_id)
            load = session_id if live is None else live.id
        self.answered(request_id, None, load=load)

    def answered(self, request_id: RequestId, text: str | None, load: str | None = None) -> None:
        """Remember ``text``, queued to answer ``request_id`` (None: a request under it is
        read, not answered yet), as the newest answer under that id (see
        :attr:`answers`); ``load``: the session a ``session/load`` under that id loads
        (see :attr:`loads`). Called by the peer (``Peer.on_answer``) as each answer is
        queued, and for a kept answer sent again (``_left._written_again``)."""
        answers = self.answers
        if answers is None or not small_id(request_id):
            return
        old = answers.pop(request_id, None)  # (re-inserted: the newest)
        if old is not None:
            self._answers_bytes -= sys.getsizeof(old)
        answers[request_id] = text
        if text is not None:
            self._answers_bytes += sys.getsizeof(text)
        if load is not None:
            if self.loads is None:
                self.loads = {}
            self.loads[request_id] = load
        # Within a count and an outbox's bytes, but for the newest (as the outbox takes
        # one message over its budget): what may be lost in flight is what was written
        # last, and a session/list page is 10 KB and more.
        budget = self.manager.limits.outbox_bytes
        while len(answers) > MAX_ANSWERS or (self._answers_bytes > budget and len(answers) > 1):
            self._forget_answer(next(iter(answers)))

    def _forget_answer(self, request_id: RequestId) -> None:
        assert self.answers is not None
        text = self.answers.pop(request_id)
        if text is not None:
            self._answers_bytes -= sys.getsizeof(text)
        if self.loads:
            self.loads.pop(request_id, None)

    def _sent_prompt(self, params: Params) -> None:
        """Remember a prompt (run or refused), by the session it named (if it names one)."""
        if not self.client_id:
            return  # (nothing is kept for a client that cannot come back)
        request_id = current_request_id.get(None)
        session_id = params.get("sessionId") if isinstance(params, dict) else None
        if not (small_id(request_id) and isinstance(session_id, str)):
            return
        if len(session_id) > MAX_REMEMBERED_ID_CHARS:
            return  # (no session of ours has such an id: nothing would be kept for it)
        live = self.manager.sessions.get(session_id)
        if live is not None:
            session_id = live.id  # (its string, not one more copy per prompt)
        self.remember_prompt(request_id, session_id)

    def remember_prompt(self, request_id: RequestId, session_id: str) -> None:
        """Remember ``request_id`` as a prompt of ``session_id`` (:attr:`prompt_sessions`):
        one sent here, or one of an earlier connection whose answer a flush handed this
        one (``Manager._flush``): as its own, that answer is kept for its client's return
        should this connection close the session and drop before it is read
        (``Manager.remember_closed_answer``)."""
        prompts = self.prompt_sessions
        if prompts is None:
            prompts = self.prompt_sessions = {}
        prompts[request_id] = session_id
        if len(prompts) > MAX_REFUSED:
            del prompts[next(iter(prompts))]

    def handle_notification(self, method: str, params: Params) -> None:
        if method == acp.SESSION_CANCEL and self.initialized:
            ref = acp.parse_session_id(params)
            self.manager.cancel(self, ref.session_id)
        elif not method.startswith("_"):
            log.debug("ignored notification %s", method)

    def _initialize_params(
        self, params: Params
    ) -> tuple[acp.InitializeParams, str | None, frozenset[RequestId]]:
        """``initialize``'s params, checked (-32602 naming the field), and its client id
        and awaited ids; nothing changes yet."""
        if self.initialized:
            # Once per connection (the initialization page). A second one could name
            # another client id and take that client's sessions on top of its own.
            raise RpcError(
                INVALID_REQUEST, "Invalid request: the connection is already initialized"
            )
        init = acp.parse_initialize(params)
        most = max(MAX_AWAITING, self.manager.limits.max_sessions_per_connection)
        awaiting = _awaiting(init.meta.get(AWAITING_META), most)
        client_id = init.meta.get(CLIENT_ID_META)
        if client_id is not None and (
            not isinstance(client_id, str)
            or not 0 < len(client_id) <= 200
            or not client_id.isprintable()
        ):
            raise RpcError.invalid_params(
                f"Invalid params: _meta.{CLIENT_ID_META} must be a non-empty string of "
                "at most 200 printable characters"
            )
        return init, client_id, awaiting

    def _initialize_request(
        self, init: acp.InitializeParams, client_id: str | None, awaiting: frozenset[RequestId]
    ) -> Awaitable[dict[str, Any]]:
        """Answer ``initialize`` (its params checked): at once, or once the connection
        that holds its client id has been probed."""
        manager = self.manager
        if (
            client_id is not None
            and manager.alive is not None
            and manager.holder_of(client_id, self) is not None
        ):
            # (Held here, synchronously: the next message is not read meanwhile.)
            assert self.peer is not None
            held = self.peer.hold_reading()
            return self._initialize_after_take_over(init, client_id, awaiting, held)
        return self._initialize(init, client_id, awaiting)

    async def _initialize_after_take_over(
        self,
        init: acp.InitializeParams,
        client_id: str,
        awaiting: frozenset[RequestId],
        held: trio.Event,
    ) -> dict[str, Any]:
        """``initialize`` naming a client id another open connection holds: answered once
        the manager has probed that connection (``Manager.take_over``): -32600 if it is
        alive, else as any initialize once it has been dropped (its sessions re-attach
        here). Nothing more is read from this client until ``held`` is set
        (``Peer.hold_reading``), so a request pipelined behind the initialize is handled
        as if it had been answered at once. Every other client is unaffected.

        On probation, the holder's place is this connection's once it has detached
        (``Manager.detach`` promotes it); refused, a connection still on probation is
        closed, unless a place came free meanwhile (it then stays, as anywhere)."""
        try:
            try:
                await self.manager.take_over(self, client_id)
            except RpcError as refused:
                if self.on_probation and self.manager.has_room():
                    self.manager.promote(self)
                if self.on_probation:
                    self._close_on_probation()
                    raise self.manager.limit_reached(refused.message) from None
                raise
            if self.on_probation:  # (the holder left, but not by the probe: see detach)
                if not self.manager.has_room():
                    self._close_on_probation()
                    raise self.manager.limit_reached(
                        f"no place came free for client id {client_id!r}"
                    )
                self.manager.promote(self)
            answer = self._initialize(init, client_id, awaiting)  # (no await since)
        finally:
            held.set()
        return await answer

    def _initialize_on_probation(self, params: Params) -> Awaitable[dict[str, Any]]:
        """``initialize`` on a connection let in past a full limit (``on_probation``):
        taken on only if it names a client id another open connection holds (probed
        next: :meth:`_initialize_after_take_over`), or if a place has come free since
        the upgrade (then as any initialize); else refused (-32600 naming the limit)
        and the connection closed (1013). Bad params are refused so too, unless a place
        has come free: a connection still on probation gets one try."""
        manager = self.manager
        self._initialize_read = True
        if manager.has_room():
            # Before its params are checked: with a place free it is one like any other,
            # whatever its initialize (bad params were answered "Connection limit
            # reached" and the connection closed, with room for it).
            manager.promote(self)
            return self._initialize_request(*self._initialize_params(params))
        try:
            init, client_id, awaiting = self._initialize_params(params)
        except RpcError as exc:  # (its code kept: -32602 names the field)
            self._close_on_probation()
            message = manager.limit_reached(exc.message).message
            return _raise(RpcError(exc.code, message, exc.data))
        if client_id is None:
            return self._refused_on_probation(
                f"a connection past the limit may only take the place of its own client's "
                f"connection that no longer answers: name its client id in "
                f"initialize _meta.{CLIENT_ID_META}"
            )
        if manager.holder_of(client_id, self) is None:
            return self._refused_on_probation(
                f"no open connection holds client id {client_id!r}, so this one can take "
                "no connection's place"
            )
        assert self.peer is not None
        held = self.peer.hold_reading()
        return self._initialize_after_take_over(init, client_id, awaiting, held)

    def _refused_on_probation(self, why: str) -> Awaitable[Any]:
        """Refuse the request being read (on probation) with the limit's -32600 saying
        ``why``, and close the connection once that answer is written."""
        self._close_on_probation()
        return _raise(self.manager.limit_reached(why))

    def end_probation_unless_initializing(self, why: str) -> None:
        """Close this connection (1013, the limit's reason and ``why``) if it is on
        probation and has not sent its ``initialize`` (the app's deadline for it); if a
        place has come free meanwhile, it takes it instead, and is one like any other
        (the heartbeat's deadline for ``initialize`` then holds: it was closed for "the
        connection limit" with room for it)."""
        if self.on_probation and not self._initialize_read and self.close_with is None:
            if self.manager.has_room() and not self.manager.closing.is_set():
                self.manager.promote(self)
                return
            log.info("closing a connection on probation: %s", why)
            self._close_on_probation(why)

    def _close_on_probation(self, why: str | None = None) -> None:
        """End this connection once the answers under way are written: nothing more is
        read (``Peer.finish``), and the transport closes with the limit's reason (at a
        shutdown, as every connection does then: going away, not "try again later")."""
        if not self.manager.closing.is_set():
            if self.close_with is None:  # (counted once: the limit turned it away)
                self.manager.metrics.tallies.limits["max_connections"] += 1
            self.close_with = self.manager.close_reason(why)
        if self.peer is not None:
            self.peer.finish()

    def _initialize(
        self, init: acp.InitializeParams, client_id: str | None, awaiting: frozenset[RequestId]
    ) -> Awaitable[dict[str, Any]]:
        if client_id is not None:
            self.manager.check_client_id(client_id, self)
        self.capabilities = init.capabilities
        self.client_info = init.client_info
        if client_id is not None:
            self.client_id = client_id
            self.prompt_times = self.manager.prompt_times_for(client_id)
            if self.peer is not None:  # (kept should it drop: see answers)
                self.answers = {}
                self.peer.on_answer = self.answered
        self.awaiting = awaiting
        self.stop_awaiting(current_request_id.get(None))  # (initialize's own id)
        self.initialized = True
        # Synchronously, before the next message is read: a request pipelined behind
        # initialize (a prompt on a re-attached session) must find the sessions its
        # own. (Reclaimed in the answer's task, such a prompt was refused at random.)
        sessions = self.manager.reclaim(self)
        expired = self.manager.expired_for(self.client_id, self.awaiting)
        if not (sessions or expired or self.awaiting) or self.peer is None:
            return _ready(_initialize_result())
        # What the sessions send from now on (a turn's updates, an orphaned prompt's
        # answer) waits behind initialize's answer: the first message a client reads is
        # the result of its initialize. (A turn ending as its client came back had its
        # prompt's answer written first, which a client still waiting for that result
        # could take for a stray message.)
        first = (self.peer.hold_writing(), self.peer.queued())
        return self._initialized(_initialize_result(), sessions, expired, first)

    async def _initialized(
        self,
        result: dict[str, Any],
        sessions: list[Session],
        expired: list[str],
        first: tuple[trio.Event, int],
    ) -> dict[str, Any]:
        # ``sessions``, left within grace, are this connection's again (reclaimed when the
        # request was read), and what they produced meanwhile follows the answer (queued
        # ahead of what they sent since: ``first``, the writing held until then). So do
        # the reload notices of the ``expired`` sessions (whose grace ended while away),
        # and the answers to the awaited requests nothing will answer.
        held, place = first
        try:
            request_id = current_request_id.get(None)
            if request_id is not None and self.peer is not None:
                self.peer.answer_now(request_id, result, at=place)  # (False: on return)
        finally:
            assert self.peer is not None
            self.peer.release_writing(held)
        await self.manager.deliver_missed(self, sessions, expired)
        await self.manager.refuse_unanswerable(self)
        return result


def _initialize_result() -> dict[str, Any]:
    # We speak exactly version 1: answer with it whatever the client asked (the client
    # disconnects if it cannot speak it), as the initialization page prescribes.
    return {
        "protocolVersion": acp.PROTOCOL_VERSION,
        "agentCapabilities": {
            "loadSession": True,
            "promptCapabilities": {"image": False, "audio": False, "embeddedContext": True},
            "mcpCapabilities": {"http": False, "sse": False},
            "sessionCapabilities": {
                "list": {},
                "resume": {},
                "close": {},
                "delete": {},
                "additionalDirectories": {},
            },
            # The extensions (extensibility page: advertised in a capability's _meta).
            "_meta": {
                "punie-trio": {
                    "clientId": True,  # _meta["punie-trio/clientId"] in initialize
                    "reloadRequired": True,  # the _punie-trio/reload_required notice
                    "awaiting": True,  # _meta["punie-trio/awaiting"] in initialize
                }
            },
        },
        "authMethods": [],
        "agentInfo": AGENT_INFO,
    }


async def _ready(value: Any) -> Any:
    """Wrap a result computed synchronously in the reader as the awaitable the Peer expects."""
    return value


async def _raise(error: RpcError) -> Any:
    """An error the Peer answers from a handler's task rather than the reader's (the
    reader may be stopping: ``Peer.finish``, and its own sends are then cut)."""
    raise error


def _awaiting(value: object, most: int = MAX_AWAITING) -> frozenset[RequestId]:
    """The ids listed in ``_meta["punie-trio/awaiting"]`` (absent: none), at most ``most``
    of them, or -32602. (``most``: :data:`MAX_AWAITING`, or the sessions a connection may
    hold if more: a server allowing 5,000 refused a client back awaiting 1,001 prompts.)

    Why each id is bounded too (:data:`MAX_AWAITED_ID_CHARS`, 64-bit integers): only the
    count was, so a 16 MB initialize could list 15 ids of 1 MB each (or integers of
    4,000 digits), each held for the connection and each echoed back in the -32603 that
    answers an id nothing will answer: 15 MB of answers for one request (measured, 0.3 s).
    """
    if value is None:
        return frozenset()
    if not isinstance(value, list) or len(value) > most or not all(map(_awaitable, value)):
        raise RpcError.invalid_params(
            f"Invalid params: _meta.{AWAITING_META} must be an array of at most "
            f"{most} request ids (strings of at most {MAX_AWAITED_ID_CHARS} "
            "characters, or 64-bit integers)"
        )
    return frozenset(value)


def _awaitable(value: object) -> bool:
    """Whether ``value`` may be listed as an awaited request id (see :func:`_awaiting`)."""
    return valid_id(value) and bounded_id(value)
