"""The session lifecycle: the paths a session may have, and ``session/new``, ``load``,
``resume``, ``list``, ``close`` and ``delete``.

A session's cwd and additional directories are checked and resolved once, on a worker
thread (:func:`checked_paths`: resolving walks the file system, which may not answer),
and the session keeps them resolved as checked: resolving them again later could give
another path (a symlink swapped meanwhile), one never checked.

A load reads the stored session, then claims the live one with no await between its
checks and the claim (``Session.loading``): a concurrent load, or a prompt or close of the
session, is refused from there on. A load or delete first waits for the turn cut as its
session was dropped (``Manager._ending``) to be recorded, or it would read the store
without that turn.

These are the :class:`~._manager.Manager`'s methods, defined here and bound in its class
body (each takes the manager as ``self``): the state they change is the manager's
(``sessions``, ``_deleting``, ``_drops``), and the manager stays the one object a
connection talks to.

Resource handling: a live session is registered by ``Manager._open`` and forgotten by
``Manager._drop_session`` (which start and stop its project's worker: see ``_manager.py``);
it stays loadable from the store. A load that fails or is cancelled drops a session it
opened: none is left open half-loaded.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

import trio

from .. import acp
from .._json import is_name_text
from .._paths import resolved
from .._threads import RootNotAnswering, root_of, run_sync_under
from ..acp import updates
from ..rpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    REQUEST_CANCELLED,
    RESOURCE_NOT_FOUND,
    PeerClosed,
    RpcError,
    current_request_id,
)
from ..store import (
    STOP,
    BadCursor,
    SessionRecord,
    StoreError,
    UnknownSessionError,
    under_roots,
)
from ..worker import SeedHistory
from ._session import Session, turn_history

if TYPE_CHECKING:
    from ._connection import ClientConnection
    from ._left import LeftAnswer
    from ._manager import Manager

log = logging.getLogger("punie_trio.hub")

T = TypeVar("T")
Args = TypeVarTuple("Args")

# Transcript entries read per page by session/load and session/resume.
REPLAY_PAGE = 2000


def _store_failed(exc: StoreError) -> RpcError:
    """-32603 for a store that cannot do what a request needs (a damaged row, a failing
    disk), logged as a warning with its message: the store names the trouble, and a
    traceback of the hub would only bury it."""
    log.warning("session store: %s", exc)
    return RpcError(INTERNAL_ERROR, f"Internal error: {exc}")


def shutting_down() -> RpcError:
    """The answer to a request the server's shutdown aborts (or refuses as it begins).

    -32800, not -32603: the schema's ``ErrorCode`` is for "execution of the method ...
    aborted ... because of resource constraints or shutdown", and the cancellation page
    asks an agent that cancels a request itself to answer it as if the client had (a
    client then takes it as cancelled, as it does a prompt's ``stopReason: cancelled``
    at shutdown, not as the agent failing). It was -32603, "Internal error"."""
    return RpcError(REQUEST_CANCELLED, "Server is shutting down")


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


def _roots_containing(self: Manager, path: Path) -> list[str]:
    """The served roots ``path`` lies under (``is_relative_to`` counts the root itself)."""
    return [r for r in self.roots if path.is_relative_to(r)]


def checked_cwd(self: Manager, cwd: str) -> tuple[str, str]:
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


def check_inside_roots(
    self: Manager, paths: tuple[str, ...], field: str, first: int = 0
) -> tuple[str, ...]:
    """Each of ``paths`` (additional directories) must be a directory inside a root: a
    missing one would be checked only when a tool first uses it, and by then it could
    have been made a symlink to anywhere. Returns them resolved, as checked: the
    session keeps these (resolving again could give another path, never checked).
    ``first``: the index in ``field`` of the first of ``paths`` (for the messages)."""
    checked: list[str] = []
    for i, path in enumerate(paths, first):
        where = f"{field}[{i}]"
        resolved_path = _resolve_param(path, where)
        if not self._roots_containing(resolved_path):
            raise RpcError.invalid_params(
                f"Invalid params: {where} {path!r} is outside the project roots "
                f"({', '.join(self.roots)})"
            )
        if not resolved_path.is_dir():
            raise RpcError.invalid_params(f"Invalid params: {where} {path!r} is not a directory")
        checked.append(str(resolved_path))
    return tuple(checked)


async def checked_paths(
    self: Manager, cwd: str, additional: tuple[str, ...]
) -> tuple[str, str, tuple[str, ...]]:
    """``(project root, cwd, additional directories)``, resolved and checked as
    :func:`checked_cwd` and :func:`check_inside_roots` check them (-32602 naming the
    first that fails), on a worker thread.

    Why a thread: resolving walks the file system (a ``stat`` a component, and one to see
    a directory), and on the event loop a ``cwd`` on a network mount that stopped
    answering froze every client of the server. Only this request waits now, and its
    cancel (``$/cancel_request``, its connection closing, shutdown) does not wait for the
    walk (``abandon_on_cancel``: it only reads, and its thread ends when the file system
    answers). As :func:`~punie_trio.worker._tools.resolve_tool_path` does for a tool.

    The thread is one of the threads of the root the path names (:func:`in_root_thread`),
    so a hung mount under one root holds none of another's: the paths are checked in
    runs, each of the paths one after another that name the same root (all of them, in
    one thread hop, for a session within one root), in order, so the first that fails
    is still the one named."""
    paths = (cwd, *additional)
    keys = [root_of(p, self.roots) for p in paths]
    root = resolved_cwd = ""
    checked: list[str] = []
    for key, group in itertools.groupby(range(len(paths)), key=keys.__getitem__):
        run = list(group)  # (indexes in paths; additional's are one less)
        start, end = run[0], run[-1] + 1
        if start == 0:
            root, resolved_cwd, done = await in_root_thread(
                key, self._checked_paths, cwd, additional[: end - 1]
            )
        else:
            done = await in_root_thread(
                key,
                self.check_inside_roots,
                additional[start - 1 : end - 1],
                "additionalDirectories",
                start - 1,
            )
        checked += done
    return root, resolved_cwd, tuple(checked)


async def in_root_thread(root: str, fn: Callable[[*Args], T], *args: *Args) -> T:
    """``fn(*args)`` in one of ``root``'s threads (``_threads.run_sync_under``: abandoned on
    cancel), for a path check; a root whose threads have all been held by a file system
    that does not answer is -32603 naming it, not a wait for ever."""
    try:
        return await run_sync_under(root, fn, *args)
    except RootNotAnswering as exc:
        log.warning("%s", exc)
        raise RpcError(INTERNAL_ERROR, f"Internal error: {exc}") from None


def _checked_paths(
    self: Manager, cwd: str, additional: tuple[str, ...]
) -> tuple[str, str, tuple[str, ...]]:
    """(On a worker thread.) :func:`checked_paths`' work."""
    root, resolved_cwd = self.checked_cwd(cwd)
    return root, resolved_cwd, self.check_inside_roots(additional, "additionalDirectories")


def _check_session_quota(self: Manager, conn: ClientConnection) -> None:
    owned = sum(1 for s in self.sessions.values() if s.owner is conn)
    if owned >= self.limits.max_sessions_per_connection:
        self.metrics.tallies.limits["max_sessions_per_connection"] += 1
        raise RpcError(
            INVALID_REQUEST,
            f"Session limit reached: {owned} sessions open on this connection "
            f"(max {self.limits.max_sessions_per_connection}); close one first",
        )


async def new_session(
    self: Manager, conn: ClientConnection, params: acp.NewSessionParams
) -> dict[str, Any]:
    """``session/new``: check its paths (:meth:`checked_paths`, in a thread), then
    register the session (the quota checked with no await before the claim, so two
    concurrent requests cannot both take the last place) and store it
    (:meth:`persist_new`)."""
    if self.closing.is_set():
        raise shutting_down()
    root, cwd, additional = await self.checked_paths(params.cwd, params.additional_directories)
    if self.closing.is_set():  # (the walk may have waited into the shutdown)
        raise shutting_down()
    self._check_session_quota(conn)
    session_id = f"sess_{uuid.uuid4().hex}"
    session = self._open(conn, session_id, root, cwd, additional)
    return await self.persist_new(session, params.cwd, params.additional_directories)


async def persist_new(
    self: Manager,
    session: Session,
    cwd_sent: str | None = None,
    directories_sent: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Store a session :meth:`new_session` opened; ``cwd_sent`` and ``directories_sent``:
    its cwd and additional directories as the client sent them (what session/list
    reports; the live session holds them resolved)."""
    now = time.time()
    record = SessionRecord(
        id=session.id,
        root=session.root,
        cwd=session.cwd,
        client_id=session.owner.client_id if session.owner else None,
        # As sent, as the cwd is: session/list reported them resolved beside a cwd as
        # sent. (Nothing checks a path against them: a load sends its own again.)
        additional_directories=(
            session.additional_directories if directories_sent is None else directories_sent
        ),
        created_at=now,
        updated_at=now,
        cwd_sent=cwd_sent,
    )
    try:
        await self.store.create_session(record)
    except StoreError as exc:
        self.metrics.tallies.store_failures["create_session"] += 1
        if self.sessions.get(session.id) is session:
            self._drop_session(session)
        raise RpcError(INTERNAL_ERROR, f"Internal error: cannot store the session: {exc}") from None
    except BaseException:
        # Cancelled before its write (a $/cancel_request, a drop, the shutdown, while the
        # write waited for the store's thread: a delete, a settling checkpoint). Left
        # open, the session stayed live and never stored, its id known to nobody: it
        # held a place of the connection's session limit (within grace, of the client
        # id's, every turn of it failing to save) until the connection ended.
        if self.sessions.get(session.id) is session:
            self._drop_session(session)
        raise
    return {"sessionId": session.id}


def _serves(self: Manager, record: SessionRecord) -> bool:
    """Whether ``record``'s working directory lies under a root this server serves
    (the store may hold sessions of roots no longer passed with ``--project``): the
    test the store's ``list_sessions(roots=...)`` makes, so a load and a listing
    never disagree on which sessions are served."""
    return under_roots(record.cwd, self.roots)


async def _stored(self: Manager, session_id: str) -> SessionRecord:
    try:
        record = await self.store.get_session(session_id)
    except StoreError as exc:
        self.metrics.tallies.store_failures["read"] += 1
        raise _store_failed(exc) from None
    if record is None or not self._serves(record):
        raise RpcError.not_found(f"Session not found: {session_id}")
    return record


def load_session(
    self: Manager, conn: ClientConnection, ref: acp.SessionRef, *, replay: bool
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
    self: Manager, conn: ClientConnection, ref: acp.SessionRef, replay: bool
) -> dict[str, Any]:
    if self.closing.is_set():
        raise shutting_down()
    assert ref.cwd is not None
    root, cwd, additional = await self.checked_paths(ref.cwd, ref.additional_directories)
    while await self._waited_for_cut_turn(ref.session_id):
        pass  # (before reading: a read its commit lands in, ending it, would miss it)
    drops = self._drops
    record = await self._stored(ref.session_id)
    # The stored cwd as it resolves now. Mostly it is the cwd just checked, resolved (the
    # store keeps it so), and resolving it again would give it back: no walk then.
    # Otherwise a walk, in a thread (see checked_paths), before the wait below, which must
    # stay the last await before the claim. (A session's cwd never changes: a record read
    # again has it.)
    stored_cwd = record.cwd
    if stored_cwd != cwd:
        stored_cwd = str(
            await in_root_thread(
                root_of(record.cwd, self.roots), _resolve_param, record.cwd, "stored cwd"
            )
        )
    while await self._waited_for_cut_turn(ref.session_id):
        # Read the store again now the cut turn is recorded (the replay, the history
        # and the turn count include it).
        drops = self._drops
        record = await self._stored(ref.session_id)
    if self.closing.is_set():  # (the reads above may have waited into the shutdown)
        raise shutting_down()
    if cwd != stored_cwd:
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
    operation = "read"  # (what a StoreError failed, for punie_store_failures_total)
    try:
        if not opened:
            # What the session kept for its client (it re-attached, and its backlog may
            # still be going out, or wait for the next flush) goes first: sent beside the
            # replay, the two interleaved, and the client took live updates for the
            # transcript and saw the turn twice, mixed. (_flush waits for a flush under
            # way.)
            await self._flush(live, conn)
        if opened and self._drops != drops:
            # A session was dropped while the store was read: perhaps this one, live
            # on another connection then, its last turn recorded before the read came
            # back (so not waited for above). The record read may predate that turn,
            # which the replay, read later, holds: the session's next turn reused its
            # number and was not saved. Claimed now, nothing else writes it: read again.
            record = await self._stored(ref.session_id)
            live.turns, live.title = record.turns, record.title
        history = await self._replay(conn, live, replay)
        if ref.additional_directories != record.additional_directories:
            # The roots asked for are the session's now, in the store too (what
            # session/list reports, as sent, like the cwd). Written once the replay is
            # through: a load failed or cancelled before leaves the stored roots as they
            # were, as the live ones.
            operation = "update_session"
            await self.store.update_session(
                record.id, additional_directories=ref.additional_directories
            )
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
            self.metrics.tallies.store_failures[operation] += 1
            raise _store_failed(exc) from None
        raise
    finally:
        live.loading = False
    return {}


def _loadable(self: Manager, conn: ClientConnection, session_id: str) -> Session | None:
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
    self: Manager, conn: ClientConnection, session: Session, replay: bool
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
    # Closed here however the load ends (aclosing): cancelled between two pages (a
    # $/cancel_request, a drop, the shutdown), the generator was left suspended for the
    # garbage collector, which Trio finalizes in a task of its own, with a
    # ResourceWarning ("was garbage collected before it had been exhausted").
    pages = self.store.transcript_rows(session.id, REPLAY_PAGE)
    try:
        async with contextlib.aclosing(pages):
            async for rows in pages:
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


async def list_sessions(self: Manager, params: acp.ListSessionsParams) -> dict[str, Any]:
    cwd = None
    if params.cwd is not None:
        # Sessions store their cwd resolved (symlinks followed): filter on the same form,
        # resolved in a thread as every path check is (see checked_paths).
        checked = await in_root_thread(
            root_of(params.cwd, self.roots), _resolve_param, params.cwd, "cwd"
        )
        cwd = str(checked)
    return await self._list_sessions(cwd, params.cursor)


async def _list_sessions(self: Manager, cwd: str | None, cursor: str | None) -> dict[str, Any]:
    try:
        # Only sessions under the roots this server serves (a store may outlive a
        # --project), left out by the store's query: dropped from each page after it,
        # 50 newer sessions of another root made a first page of nothing but a cursor.
        records, cursor = await self.store.list_sessions(cwd=cwd, cursor=cursor, roots=self.roots)
    except BadCursor as exc:
        raise RpcError.invalid_params(f"Invalid params: cursor is not valid ({exc})") from None
    except StoreError as exc:  # (the store's trouble, not the client's cursor)
        self.metrics.tallies.store_failures["read"] += 1
        raise _store_failed(exc) from None
    sessions = [
        {
            "sessionId": r.id,
            # As the client sent it (the session-list page: "cwd is immutable after
            # session setup"); it filters and loads by either spelling.
            "cwd": r.cwd_sent or r.cwd,
            "title": r.title,
            "updatedAt": datetime.fromtimestamp(r.updated_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
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


async def close_session(self: Manager, conn: ClientConnection, session_id: str) -> dict[str, Any]:
    """Cancel the session's running turn, wait for it to finish, send what the session
    still keeps for ``conn``, forget the live session (it stays loadable from the store).

    Why send what is kept first: a session re-attached with its backlog still going out
    was closed at once, and that backlog (and the old prompt's answer) followed the
    close's answer. A close is a cancel (the session-setup page), and a cancelled turn's
    updates come before its answer (the prompt-turn page).

    Should ``conn`` drop meanwhile (the close goes on: :func:`despite_a_drop`), the
    close still takes effect; but a session kept within grace with what its client has
    not got (the cancelled turn's answer, which the client awaits) stays, marked
    closing, until its client re-attaches and has been sent it (``deliver_missed``
    then drops it) or its grace ends."""
    session = self.owned_session(conn, session_id)
    _check_not_loading(conn, session)
    # Claimed before the first await: a prompt read while the turn winds down (its
    # relay ends a pass or two before this resumes) would otherwise start on a session
    # about to be dropped, and run on after close was answered.
    session.closing = True
    try:
        turn = session.turn
        if turn is not None:
            self.cancel_turn(session, turn)
            await turn.finished.wait()
        await self._flush(session, conn)  # (waits for a flush under way)
    except PeerClosed:
        pass  # (conn dropped: what is still kept is for its client's return, below)
    except BaseException:
        # The close itself was cancelled ($/cancel_request): the session stays, usable
        # (its turn is cancelled anyway).
        session.closing = False
        raise
    if self.sessions.get(session_id) is not session:
        return {}  # (dropped meanwhile: its client left without grace, or its grace ended)
    if session.pending and (session.owner is None or (conn.peer is not None and conn.peer.lost)):
        # Kept for its client (see above), also when conn is gone but not yet detached
        # (detach keeps it within grace, or drops it).
        return {}
    self.remember_closed_answer(conn, session)
    self._drop_session(session)
    return {}


async def despite_a_drop(self: Manager, conn: ClientConnection, work: Awaitable[T]) -> T:
    """Await ``work`` (a ``session/close`` or ``delete``) in the manager's nursery: should
    ``conn``'s connection drop before it is done, it goes on to the end; cancelled any
    other way (``$/cancel_request``), it is cancelled, as it would have been in place.

    A cancel that comes too late to stop the work (a store's delete, once begun, runs to
    its end) gets the work's own answer, not -32800: the client must not take a session
    it deleted for still there.

    Why: the request was received; the client asked for the close, and only its answer
    is lost in flight. Cut with the connection (as every request handler is), the close
    left the session live, kept within grace for the client, which came back to a
    session it had closed (counted against its session limit, never closed again),
    and a delete left the stored session too. Its answer, lost with the connection, is
    kept for the client's return (``Manager.keep_left_answer``; a client back awaiting
    it was told "no answer to this request will come", as if the close had failed).

    Error handling: an error the work meets after its connection dropped has no
    request left to answer: one the hub did not expect is logged with its traceback
    here, as the peer logs a failing handler's (it was kept for the gone handler and
    lost without a word); a refusal (:class:`RpcError`) is the client's news, and a
    store's trouble is logged where it is met."""
    nursery = self._nursery
    if nursery is None:
        return await work
    request_id = current_request_id.get(None)
    done = trio.Event()
    scope = trio.CancelScope()
    outcome: list[T] = []
    failure: list[Exception] = []
    left: LeftAnswer | None = None  # (the handler was cut with its connection)
    gone = False

    def settle(left: LeftAnswer) -> None:
        if failure:
            error = failure[0]
            left.settle(None, error if isinstance(error, RpcError) else _internal(error))
        elif outcome:
            left.settle(outcome[0], None)
        else:  # (cancelled with the manager's nursery: a shutdown's end)
            left.settle(None, shutting_down())

    async def run() -> None:
        try:
            with scope:
                outcome.append(await work)
        except Exception as exc:
            if gone and not isinstance(exc, RpcError):
                log.exception("a session/close or delete whose connection dropped failed")
            failure.append(exc)
        finally:
            if left is not None:  # kept for its client's return
                settle(left)
            done.set()

    nursery.start_soon(run, name="close or delete")
    try:
        await done.wait()
    except trio.Cancelled:
        if conn.peer is not None and conn.peer.lost:
            gone = True
            left = self.keep_left_answer(conn, request_id)
            if left is not None and done.is_set():
                # The work ended as the drop cut this handler (the cancel came before
                # the handler saw the end): run() has settled nothing, so settle here.
                # Left unsettled, the client back awaiting the id got nothing, ever.
                settle(left)
            raise
        scope.cancel()
        with trio.CancelScope(shield=True):
            await done.wait()  # (its clean-up done: the session usable again)
        if not outcome and not failure:
            raise
        # It ran to its end all the same: the cancel came once the store's delete had
        # begun, which nothing interrupts. Answered -32800, "Request cancelled", the
        # client took the session it had deleted for still there. (Not re-raised, the
        # Cancelled ends here: should a scope outside the request's own be cancelled,
        # the answer's send is the next checkpoint, and it lands there.)
    if failure:
        raise failure[0]
    if not outcome:  # (cancelled with the manager's nursery: a shutdown's end)
        raise shutting_down()
    return outcome[0]


def _internal(exc: Exception) -> RpcError:
    """The answer to a request whose handler raised ``exc``, as the peer gives it."""
    return RpcError(INTERNAL_ERROR, f"Internal error: {exc}")


async def delete_session(self: Manager, conn: ClientConnection, session_id: str) -> dict[str, Any]:
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
            except RpcError as exc:
                if exc.code != RESOURCE_NOT_FOUND:
                    # The store could not be read (-32603): whether the session is
                    # there is not known, and it is not deleted. Taken for "not
                    # there", this answered {}, done, with the session still stored.
                    raise
                # Already deleted or never existed (or not under our roots: left
                # alone). The session-delete page: this SHOULD succeed silently.
                return {}
        try:
            await self.store.delete_session(session_id)
        except StoreError as exc:  # (closed above, if it was live: it stays loadable)
            self.metrics.tallies.store_failures["delete_session"] += 1
            raise _store_failed(exc) from None
    finally:
        self._deleting[session_id] -= 1
        if not self._deleting[session_id]:
            del self._deleting[session_id]
    return {}


async def _waited_for_cut_turn(self: Manager, session_id: str) -> bool:
    """Wait for the turn cut as the session was dropped (``_ending``) to be recorded;
    False at once if there is none. A load or delete reading the store before it is
    would miss that turn."""
    ending = self._ending.get(session_id)
    if ending is None:
        return False
    await ending.finished.wait()
    return True


def owned_session(self: Manager, conn: ClientConnection, session_id: str) -> Session:
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
