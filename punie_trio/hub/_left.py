"""Answers kept apart for a client's return: those no session keeps. The answers of its
``session/close`` and ``delete`` requests that went on after their connection dropped
(:func:`keep_left_answer`), those a dropped connection never wrote (``_grace._keep_unsent``)
and those it wrote, which may have been lost in flight (:func:`_keep_written_answers`:
any request's but a prompt's, and the last of each session it closed), kept by client id
in ``Manager._left_answers``; and, as a client comes back, the sending of those it
awaits, and the -32603 for each id it awaits that nothing will answer
(:func:`refuse_unanswerable`).

Why apart from the sessions' backlogs (``Session.pending``): a session keeps its updates
and its prompts' answers in the order they came (each request's own updates before its
answer), and it may be gone (closed, deleted, its grace ended) while its client is still
owed an answer; these answers belong to no session's order, and are kept by client id,
each for the grace period once it is known.

As in ``_grace.py``, these are the :class:`~._manager.Manager`'s methods (each takes the
manager as ``self``), bound in its class body."""

from __future__ import annotations

import math
import sys
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..rpc import INTERNAL_ERROR, RequestId, RpcError
from ._session import RELOAD_REQUIRED, Session, answer_id, as_sent, small_id

if TYPE_CHECKING:
    from ._connection import ClientConnection
    from ._manager import Manager


def _keep_written_answers(
    self: Manager, conn: ClientConnection, owned: list[Session], unsent: list[str] | None
) -> None:
    """Keep for the return of ``conn``'s client (as a cut close's answer is:
    :func:`keep_left_answer`) the answers ``conn`` wrote to its requests but its prompts
    (``ClientConnection.answers``); those it never wrote (``unsent``) are kept by
    :func:`._grace._keep_unsent`, in their places. Not under an id a request still running at
    the drop uses (its answer is to come, or not: a close's is kept already). And no
    session of ``conn``'s (``owned``) sends its last answer again under an id there:
    the client used the id since. (None for ``unsent``: a client that cannot be told,
    for which nothing is kept.)

    Why: a ``session/close``, its answer written just before the drop, had taken effect,
    and the client, back awaiting its id (the answer was lost in flight: a client back
    awaiting an id says so), was told "no answer to this request will come", as if the
    close had failed; so too the answer of any request but a prompt (a session/new's,
    whose session was made). A close's id was not watched (only prompts' were), so
    whether the client used it again since was not known: now every request's id is, on
    a connection with a client id (``ClientConnection.answers``: None under an id whose
    request runs, so that no older answer stands for it).

    Why the sessions' last answers: a prompt's answer, written and lost in flight, is
    sent again to a client back awaiting its id (:func:`._grace._answers_lost_in_flight`); the
    client that had used that id again (for a ``session/list``) and awaited that
    request's answer got the prompt's (``{"stopReason": ...}`` for its list).

    Why a reload notice after a load's answer (:func:`_send_left_answers`): the load's
    replay was written before it, and lost with it; the client, back and given the
    answer alone, took its load for done and showed a session without its history."""
    answers, conn.answers = conn.answers or {}, None
    loads, conn.loads = conn.loads or {}, None
    for session in owned:
        item = session.last_answer
        if item is not None and answer_id(item) in answers:
            session.last_answer = None  # (its id used again since)
    client_id = conn.client_id
    if unsent is None or not client_id:
        return
    not_written = set(unsent)
    kept = self._left_answers.pop(client_id, {})  # (re-inserted: now the newest)
    ahead: dict[RequestId, LeftAnswer] = {}  # (written before all that was kept)
    for request_id, text in answers.items():
        if text is None or text in not_written or request_id in kept:
            continue
        answer = ahead[request_id] = LeftAnswer.of_text(text)
        # A load's replay went out before its answer: lost with it, the client back
        # awaiting the answer is told to reload the session after it.
        answer.reload = loads.get(request_id)
    ahead.update(kept)
    if ahead:
        _bound_left(self, client_id, ahead)


def remember_closed_answer(self: Manager, conn: ClientConnection, session: Session) -> None:
    """Remember on ``conn`` the last answer of ``session``, which it closes (or deletes):
    that of a prompt it sent (``prompt_sessions``), among the answers it wrote
    (``ClientConnection.answers``), kept at its drop for its client's return
    (:func:`_keep_written_answers`) unless the client uses the id again meanwhile.

    Why: written to the connection before its drop was seen, such an answer may have
    been lost in flight, and a client back awaiting its id says it was. A session kept
    within grace sends it again (:func:`._grace._answers_lost_in_flight`); a closed one was
    gone with it, and the client (which sent a prompt, closed its session, and dropped)
    was told -32603 "no answer to this request will come", though the answer was
    known."""
    item = session.last_answer
    prompts = conn.prompt_sessions
    if item is None or not prompts:
        return  # (prompts: only for a client that gave a client id)
    request_id = answer_id(item)
    if request_id is None or prompts.get(request_id) != session.id:
        return  # (not its prompt, or its id used again since)
    conn.answered(request_id, as_sent(item)[1])


async def refuse_unanswerable(self: Manager, conn: ClientConnection) -> None:
    """Answer at once each id ``conn``'s client awaits that nothing here will answer
    (-32603), once what its sessions kept has been sent: no turn of its sessions runs
    for it and no answer is kept under it. Its prompt's turn was cut by a restart, or
    as its session's grace period ended, or the id was never a prompt's.

    Why: the client waits for each awaited id's answer, and none would ever come: it
    waited for ever (a reload notice names a session, not the request; after a restart
    there is none). An id the client has in flight again, or used again, is not awaited
    any more and is left alone.

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
        answered.update(answer_id(p) for p in session.pending if p[0] != "update")
    left = self._left_answers.pop(conn.client_id, {}) if conn.client_id else {}
    # The kept answers it awaits, taken out of ``_left_answers``: those past their grace
    # period are not sent, so they are refused as any other. (Counted as to come, they
    # once got neither, and the client waited for ever.) Until each is sent, they are
    # put back should this end early (the connection dropping while a refusal waits for
    # room); put back only by the sends after the refusals', they were once lost there,
    # and the client back again was told -32603 for each.
    waiting = _left_awaited(self, conn, left)
    answered.update(request_id for request_id, _ in waiting)
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
        "answer is kept under its id here (the server restarted, or the session's grace "
        "period ended); session/load the session to see what was recorded",
    )
    try:
        for request_id in refused:
            # Spelled apart: left unwritten by a drop, it is not kept as the id's answer.
            # Refused anew at the next return (nothing can answer it meanwhile), it lost
            # nothing; kept, it was newer than the real answers sent after it, which
            # its bytes then pushed out of what is kept (_bound_left): a client dropping
            # in a loop was told -32603 for every id, though their answers were known.
            await conn.send_answer(request_id, None, error, aside=True)
        await self._send_left_answers(conn, waiting)
    except BaseException:
        _keep_left_again(self, conn, waiting)
        raise


#: The most answers kept for one client id's return: of its closes and deletes cut by a
#: drop, and those its dropped connections never wrote that no session keeps.
LEFT_ANSWERS = 64


@attrs.define(eq=False)
class LeftAnswer:
    """An answer kept for a client's return: of a ``session/close`` or ``session/delete``
    that went on after its connection dropped (``_lifecycle.despite_a_drop``), ``done``
    once it is known; or one its dropped connection never wrote (``text``)."""

    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: RpcError | None = None
    #: When it was done (``trio.current_time``): kept ``grace_seconds`` after that.
    done_at: float = math.inf
    #: The answer as its connection queued it and never wrote it (``_keep_unsent``),
    #: kept as that text: sent as it is, and its memory is what the outbox held.
    text: str | None = None
    #: The session a ``session/load`` answered here loaded (its answer written, and
    #: lost in flight with the replay before it): told to reload once it is sent.
    reload: str | None = None

    @classmethod
    def of_text(cls, text: str) -> LeftAnswer:
        """One known already: an answer a dropped connection queued and never wrote."""
        answer = cls(text=text)
        answer.settle(None, None)  # (its text is the answer)
        return answer

    def size(self) -> int:
        """The memory its text takes (``sys.getsizeof``, as the outbox counts)."""
        return sys.getsizeof(self.text) if self.text is not None else 0

    def settle(self, result: Any, error: RpcError | None) -> None:
        self.result, self.error = result, error
        self.done_at = trio.current_time()
        self.done.set()


def keep_left_answer(
    self: Manager, conn: ClientConnection, request_id: RequestId | None
) -> LeftAnswer | None:
    """Keep, for the return of ``conn``'s client, the answer of its close or delete
    ``request_id`` that goes on after ``conn`` dropped; the :class:`LeftAnswer` to settle
    once it is done (None: nothing kept, for a client that gave no id, or a huge id).

    Why: the close took effect, but its answer was lost with the connection, and the
    client, back awaiting it (``_meta["punie-trio/awaiting"]``), was told "no answer to
    this request will come" (-32603), as if the close had failed."""
    return _keep_left(self, conn.client_id, request_id)


def _keep_left(
    self: Manager, client_id: str | None, request_id: RequestId | None, text: str | None = None
) -> LeftAnswer | None:
    """:func:`keep_left_answer`, by client id; with ``text``, an answer known already
    (one a dropped connection never wrote, as it was queued)."""
    if not client_id or not small_id(request_id):
        return None
    now = trio.current_time()
    grace = self.limits.grace_seconds
    kept = self._left_answers.pop(client_id, {})  # (re-inserted: now the newest)
    for old in [i for i, a in kept.items() if a.done_at + grace < now]:
        del kept[old]
    kept.pop(request_id, None)  # (an id used again: the newest answer)
    answer = kept[request_id] = LeftAnswer() if text is None else LeftAnswer.of_text(text)
    _bound_left(self, client_id, kept)
    return answer


def forget_left_answers(
    self: Manager,
    client_id: str | None,
    awaited: Collection[RequestId] = (),
    reused: RequestId | None = None,
) -> None:
    """Forget the answers kept for ``client_id``'s return (:func:`keep_left_answer`) that
    its new connection does not await (``awaited``, as its ``initialize`` is read), or,
    given ``reused``, the one under that id, which it uses again for a request of its own.

    Why: such an answer is not for the client any more, and it stood for its id: the
    answer of a new request under that id, left unwritten by a drop, was not kept (as
    one kept already), and the client, back awaiting the id, got the old answer for its
    new request. They were forgotten only by a return that awaited something."""
    if not client_id:
        return
    kept = self._left_answers.get(client_id)
    if not kept:
        return
    if reused is not None:
        kept.pop(reused, None)
    else:
        for request_id in [i for i in kept if i not in awaited]:
            del kept[request_id]
    if not kept:
        del self._left_answers[client_id]


def _bound_left(self: Manager, client_id: str, kept: dict[RequestId, LeftAnswer]) -> None:
    """Keep ``kept`` as ``client_id``'s left answers (now the newest client id), within
    :data:`LEFT_ANSWERS` for it and ``max_connections`` client ids, the oldest of each
    forgotten first; and forget the clients, from the one kept for longest, whose
    answers are all past their grace period.

    Why the sweep: a client's answers were forgotten only when it kept another, so
    those of a client that never came back stayed, past their grace period, for as
    long as the server ran (up to 64 answers for each of ``max_connections`` client
    ids, any request's among them: ``_keep_unsent``). The dict is in the order clients
    kept answers (re-inserted on each), so the sweep looks only at its front; one
    expired behind a live one waits for it (still within the count)."""
    left = self._left_answers
    deadline = trio.current_time() - self.limits.grace_seconds
    while left:
        oldest = next(iter(left))
        if any(a.done_at >= deadline for a in left[oldest].values()):
            break
        del left[oldest]
    while len(kept) > LEFT_ANSWERS:
        del kept[next(iter(kept))]
    # And within an outbox's bytes (but for the newest, as the outbox takes one message
    # over its budget): each drop kept what its outbox held, and they piled up over a
    # client's drops, up to 64 of any size (a session/list page is 10 KB and more).
    size = sum(a.size() for a in kept.values())
    while size > self.limits.outbox_bytes and len(kept) > 1:
        size -= kept.pop(next(iter(kept))).size()
    self._left_answers[client_id] = kept
    while len(self._left_answers) > self.limits.max_connections:
        del self._left_answers[next(iter(self._left_answers))]


def _left_awaited(
    self: Manager, conn: ClientConnection, left: dict[RequestId, LeftAnswer]
) -> list[tuple[RequestId, LeftAnswer]]:
    """The answers in ``left`` (``conn``'s client's, taken: :func:`keep_left_answer`) to
    send it, in the order they were kept: those it awaits, not past their grace period.
    The rest are dropped (not awaited: the client does not want them)."""
    now = trio.current_time()
    return [
        (request_id, answer)
        for request_id, answer in left.items()
        if request_id in conn.awaiting and answer.done_at + self.limits.grace_seconds >= now
    ]


async def _send_left_answers(
    self: Manager, conn: ClientConnection, waiting: list[tuple[RequestId, LeftAnswer]]
) -> None:
    """Send ``conn`` the answers ``waiting`` (:func:`_left_awaited`: those kept for its
    client's return, :func:`keep_left_answer`), each once it is done, taking
    each out of ``waiting`` once it is queued (or no longer awaited): what is left
    there if this ends early was not sent, for the caller to keep again
    (:func:`_keep_left_again`)."""
    while waiting:
        request_id, answer = waiting[0]
        await answer.done.wait()
        sent = request_id in conn.awaiting and not conn.has_in_flight(request_id)
        if sent:
            if answer.text is not None:
                await conn.send_encoded(answer.text)
            else:
                await conn.send_answer(request_id, answer.result, answer.error)
                answer.text = as_sent(("answer", request_id, answer.result, answer.error))[1]
            conn.stop_awaiting(request_id)
            _written_again(conn, request_id, answer)
        waiting.pop(0)
        if sent and answer.reload is not None:
            # (Not owed again if this send fails: the answer went, as for a flush's.)
            await conn.notify(
                RELOAD_REQUIRED,
                {"sessionId": answer.reload, "reason": "updates were missed while disconnected"},
            )


def _written_again(conn: ClientConnection, request_id: RequestId, answer: LeftAnswer) -> None:
    """Remember on ``conn`` the kept answer it was handed (queued: written, or kept as
    unwritten should it drop first), as one it answered itself
    (``ClientConnection.answered``; a load's with the session to reload after it): kept
    again at its drop (:func:`_keep_written_answers`) for a client back still awaiting
    it, unless the client uses its id again meanwhile.

    Why: the client's awaiting list at each return is its only acknowledgement. An
    answer sent again and lost in flight again (the client dropped a second time before
    reading it) was gone: back a third time, still awaiting its id, the client was told
    -32603 "no answer to this request will come", though the answer was known."""
    assert answer.text is not None
    conn.answered(request_id, answer.text, load=answer.reload)


def _keep_left_again(
    self: Manager, conn: ClientConnection, waiting: list[tuple[RequestId, LeftAnswer]]
) -> None:
    """Keep again, for the client's next return, the answers ``waiting`` that ``conn``
    did not send (it ended first): ahead of any kept for the client since (they are
    older), but not over an answer kept since under the same id (the newer)."""
    waiting = [(i, a) for i, a in waiting if i in conn.awaiting]  # (not one used again)
    if not waiting or not conn.client_id:
        return
    kept = dict(waiting)
    kept.update(self._left_answers.pop(conn.client_id, {}))
    _bound_left(self, conn.client_id, kept)
