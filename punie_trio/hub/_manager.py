"""The manager: every connection, session and project worker of the process.

State changes are plain synchronous code between awaits (Trio's cooperative scheduling makes
them atomic), so there is no lock anywhere, and none is ever held across network I/O.

Routing: a turn's events arrive on the turn's own channel and are relayed by the task serving
that ``session/prompt``, in the prompting connection's nursery. ``session/update``s therefore
go to the session's owner, and ``fs/*``/``terminal/*``/``session/request_permission`` calls to
the connection that sent the running prompt; a slow client blocks only its own relay, whose
turn then waits on its bounded event channel (policy: wait). No other client is delayed.

Resource handling: workers live in the manager's worker nursery, one per project root, started
with the first session on the root and stopped (command channel closed) with its last. A
connection's sessions are dropped when it leaves; its turns were already cancelled by its
Peer's nursery, and the relay's ``finally`` tells the worker so.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .. import acp
from .._metrics import Metrics
from ..acp import PromptParams
from ..rpc import INTERNAL_ERROR, INVALID_REQUEST, PeerClosed, RpcError
from ..worker import (
    CancelTurn,
    ClientCall,
    ClientReply,
    Command,
    ForgetSession,
    Model,
    ProjectWorker,
    StartTurn,
    TurnEnv,
    TurnEvent,
    TurnFinished,
    Update,
)

if TYPE_CHECKING:
    from ._connection import ClientConnection

log = logging.getLogger("punie_trio.hub")

# Commands queued to one worker. The worker loop never blocks, so senders wait (briefly).
WORKER_COMMAND_BUFFER = 64
# Events of one turn not yet relayed to its client. Full: the turn waits (its client is slow).
TURN_EVENT_BUFFER = 32
# How long a client gets to answer fs/*, terminal/*, permission requests.
CLIENT_CALL_TIMEOUT = 300.0


@attrs.frozen
class Limits:
    """Bounds on what clients may ask for (see docs/configuration.md)."""

    max_prompt_bytes: int = 1024 * 1024
    max_sessions_per_connection: int = 64
    client_call_timeout: float = CLIENT_CALL_TIMEOUT


@attrs.define(eq=False)
class WorkerHandle:
    root: str
    worker: ProjectWorker
    commands: trio.MemorySendChannel[Command]
    sessions: set[str] = attrs.field(factory=set)


@attrs.define(eq=False)
class ActiveTurn:
    turn_id: int
    connection: ClientConnection
    cancel_requested: trio.Event = attrs.field(factory=trio.Event)
    finished: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class Session:
    id: str
    root: str
    cwd: str
    additional_directories: tuple[str, ...]
    owner: ClientConnection
    worker: WorkerHandle
    turn: ActiveTurn | None = None

    @property
    def allowed_roots(self) -> tuple[str, ...]:
        return (self.root, *self.additional_directories)


@attrs.define(eq=False)
class Manager:
    """Routes every session. Start :meth:`run` in the root nursery before serving clients."""

    roots: tuple[str, ...]
    model: Model
    metrics: Metrics = attrs.field(factory=Metrics)
    limits: Limits = attrs.field(factory=Limits)
    closing: trio.Event = attrs.field(factory=trio.Event)
    connections: set[ClientConnection] = attrs.field(factory=set, init=False)
    sessions: dict[str, Session] = attrs.field(factory=dict, init=False)
    workers: dict[str, WorkerHandle] = attrs.field(factory=dict, init=False)
    _turn_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _idle: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        self.roots = tuple(str(Path(r).resolve()) for r in self.roots)
        self.metrics.track(
            lambda: len(self.connections), lambda: len(self.sessions), lambda: len(self.workers)
        )
        self._idle.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the worker nursery until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for handle in self.workers.values():
                    handle.commands.close()

    # -- connections --------------------------------------------------------------------------

    def attach(self, conn: ClientConnection) -> None:
        self.connections.add(conn)

    def detach(self, conn: ClientConnection) -> None:
        """Forget a connection that ended, and every session it owned."""
        self.connections.discard(conn)
        for session in [s for s in self.sessions.values() if s.owner is conn]:
            self._drop_session(session)

    # -- sessions -----------------------------------------------------------------------------

    def project_root_for(self, cwd: str) -> str:
        """The most specific project root containing ``cwd`` (resolved), or -32602."""
        resolved = Path(cwd).resolve()
        matches = [r for r in self.roots if resolved == Path(r) or resolved.is_relative_to(r)]
        if not matches:
            allowed = ", ".join(self.roots)
            raise RpcError.invalid_params(
                f"Invalid params: cwd {cwd!r} is outside the project roots ({allowed})"
            )
        return max(matches, key=len)

    def check_inside_roots(self, paths: tuple[str, ...], field: str) -> None:
        for i, path in enumerate(paths):
            resolved = Path(path).resolve()
            if not any(resolved == Path(r) or resolved.is_relative_to(r) for r in self.roots):
                raise RpcError.invalid_params(
                    f"Invalid params: {field}[{i}] {path!r} is outside the project roots "
                    f"({', '.join(self.roots)})"
                )

    def new_session(self, conn: ClientConnection, params: acp.NewSessionParams) -> Session:
        if self.closing.is_set():
            raise RpcError(INTERNAL_ERROR, "Server is shutting down")
        root = self.project_root_for(params.cwd)
        self.check_inside_roots(params.additional_directories, "additionalDirectories")
        owned = sum(1 for s in self.sessions.values() if s.owner is conn)
        if owned >= self.limits.max_sessions_per_connection:
            raise RpcError(
                INVALID_REQUEST,
                f"Session limit reached: {owned} sessions open on this connection "
                f"(max {self.limits.max_sessions_per_connection})",
            )
        worker = self._worker_for(root)
        session = Session(
            id=f"sess_{uuid.uuid4().hex}",
            root=root,
            cwd=str(Path(params.cwd).resolve()),
            additional_directories=tuple(
                str(Path(p).resolve()) for p in params.additional_directories
            ),
            owner=conn,
            worker=worker,
        )
        self.sessions[session.id] = session
        worker.sessions.add(session.id)
        return session

    def owned_session(self, conn: ClientConnection, session_id: str) -> Session:
        """The session, if ``conn`` owns it; -32002 otherwise (unknown and foreign sessions
        get the same answer, so ids cannot be probed)."""
        session = self.sessions.get(session_id)
        if session is None or session.owner is not conn:
            raise RpcError.not_found(f"Session not found: {session_id}")
        return session

    def _drop_session(self, session: Session) -> None:
        del self.sessions[session.id]
        handle = session.worker
        handle.sessions.discard(session.id)
        try:
            handle.commands.send_nowait(ForgetSession(session.id))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the worker is going away anyway, or will drop the history with itself
        if not handle.sessions:
            self.workers.pop(handle.root, None)
            handle.commands.close()

    def _worker_for(self, root: str) -> WorkerHandle:
        handle = self.workers.get(root)
        if handle is not None:
            return handle
        if self._nursery is None:
            raise RpcError(INTERNAL_ERROR, "Manager is not running")
        send, receive = trio.open_memory_channel[Command](WORKER_COMMAND_BUFFER)
        handle = WorkerHandle(root, ProjectWorker(root, self.model, receive), send)
        self.workers[root] = handle
        self._nursery.start_soon(handle.worker.run, name=f"worker:{root}")
        return handle

    # -- turns --------------------------------------------------------------------------------

    def begin_prompt(self, conn: ClientConnection, params: PromptParams) -> ActiveTurn:
        """Register a turn synchronously (so a ``session/cancel`` read next finds it)."""
        if self.closing.is_set():
            raise RpcError(INTERNAL_ERROR, "Server is shutting down")
        session = self.owned_session(conn, params.session_id)
        if session.turn is not None:
            raise RpcError(INVALID_REQUEST, f"Session {session.id} already has a prompt running")
        turn = ActiveTurn(next(self._turn_ids), conn)
        session.turn = turn
        self._idle = trio.Event()
        return turn

    def cancel(self, conn: ClientConnection, session_id: str) -> None:
        session = self.owned_session(conn, session_id)
        if session.turn is not None:
            session.turn.cancel_requested.set()

    def cancel_all_turns(self) -> None:
        for session in self.sessions.values():
            if session.turn is not None:
                session.turn.cancel_requested.set()

    async def wait_idle(self) -> None:
        """Wait until no turn is running (used by shutdown after :meth:`cancel_all_turns`)."""
        while any(s.turn is not None for s in self.sessions.values()):
            await self._idle.wait()

    async def run_prompt(
        self, session_id: str, turn: ActiveTurn, params: PromptParams
    ) -> dict[str, Any]:
        """Run one turn on the session's worker and relay its events; return the response."""
        session = self.sessions[session_id]
        started = trio.current_time()
        events_send, events_receive = trio.open_memory_channel[TurnEvent](TURN_EVENT_BUFFER)
        env = TurnEnv(session.id, session.cwd, session.allowed_roots, turn.connection.capabilities)
        finished: TurnFinished | None = None
        try:
            async with events_receive, trio.open_nursery() as nursery:
                await session.worker.commands.send(
                    StartTurn(turn.turn_id, env, params.text(), params.prompt, events_send)
                )
                nursery.start_soon(self._forward_cancel, session, turn)
                async for event in events_receive:
                    if isinstance(event, Update):
                        await turn.connection.send_update(session.id, event.update)
                    elif isinstance(event, ClientCall):
                        nursery.start_soon(self._client_call, session, turn, event)
                    else:
                        finished = event
                        break
                nursery.cancel_scope.cancel()
        finally:
            if finished is None:
                # Cancelled from outside (the client left, or $/cancel_request): stop the turn.
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(1.0):
                        await session.worker.commands.send(CancelTurn(turn.turn_id))
            stop = finished.stop_reason if finished is not None else "cancelled"
            self.metrics.prompts.labels(stop_reason=stop).inc()
            self.metrics.prompt_latency.observe(trio.current_time() - started)
            session.turn = None
            turn.finished.set()
            if not any(s.turn is not None for s in self.sessions.values()):
                self._idle.set()
        assert finished is not None
        if finished.error is not None:
            raise RpcError(INTERNAL_ERROR, f"Internal error: the model failed: {finished.error}")
        return {"stopReason": finished.stop_reason}

    async def _forward_cancel(self, session: Session, turn: ActiveTurn) -> None:
        await turn.cancel_requested.wait()
        await session.worker.commands.send(CancelTurn(turn.turn_id))

    async def _client_call(self, session: Session, turn: ActiveTurn, call: ClientCall) -> None:
        reply: ClientReply
        try:
            with trio.fail_after(self.limits.client_call_timeout):
                result = await turn.connection.call_client(call.method, call.params)
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
        await session.worker.commands.send(reply)
