"""The project worker: runs every agent turn for the sessions on one project root.

It sees the manager only through two kinds of channel: the command channel it reads
(:data:`Command` envelopes) and each turn's event channel it writes (:data:`TurnEvent`).
Nothing else crosses, so the same worker can later run in a child process with the envelopes
as NDJSON over pipes.

Resource handling: every turn is a task in the worker's nursery, inside its own CancelScope.
When the command channel closes, running turns are cancelled and :meth:`ProjectWorker.run`
returns once they have all reported.

Error handling: a turn whose event channel is gone (its client left) ends as cancelled; a
model that raises ends its turn with ``TurnFinished(error=...)`` and never the worker.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from ..acp import updates
from ._envelopes import (
    CancelTurn,
    ClientCall,
    ClientReply,
    Command,
    ForgetSession,
    ForgetTurn,
    StartTurn,
    TurnEvent,
    TurnFinished,
    Update,
)
from ._models import Model
from ._tools import (
    TOOLS,
    CallState,
    ClientUnavailable,
    ToolError,
    resolve_tool_path,
    shown_output,
)

log = logging.getLogger("punie_trio.worker")

# Time a cancelled turn gets to report TurnFinished before it gives up.
FINAL_SEND_TIMEOUT = 2.0
# A model handing over events faster than they are consumed yields to the scheduler at
# least this often (when the turn's channel is full it waits anyway).
EMIT_YIELD_EVERY = 16
# Queued commands handled after the one a step starts with, before the worker yields.
COMMANDS_PER_STEP = 64


class ClientCallError(Exception):
    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


@attrs.define(eq=False)
class _Turn:
    start: StartTurn
    # The session's history, taken when the command is handled: a ForgetSession handled
    # in the same step then drops it (taken when the task ran, it was made anew after the
    # forget and kept for the worker's life).
    history: list[tuple[str, str]]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    calls: dict[int, _Reply] = attrs.field(factory=dict)
    call_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    tool_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    agent_text: list[str] = attrs.field(factory=list)
    emitted: int = 0  # events handed over since the model last yielded
    # The tool calls reported in progress and not yet finished, by id (a cancelled turn
    # reports them failed: a tool call left in_progress spins in the IDE for ever), each
    # with what it may have done all the same (CallState).
    open_tools: dict[str, CallState] = attrs.field(factory=dict)


@attrs.define(eq=False)
class _Reply:
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: ClientReply | None = None


@attrs.define(eq=False)
class _Context:
    """The :class:`TurnContext` a model drives."""

    worker: ProjectWorker
    turn: _Turn
    history: Sequence[tuple[str, str]]

    @property
    def session_id(self) -> str:
        return self.turn.start.env.session_id

    @property
    def prompt_text(self) -> str:
        return self.turn.start.prompt_text

    @property
    def turn_number(self) -> int:
        return self.turn.start.number

    async def _emit(self, event: TurnEvent) -> None:
        # Hand the event over without a trip through the scheduler while the turn's channel
        # has room (each trip costs an epoll_wait; a model streaming thousands of chunks
        # would pay it per chunk). It stays a cancellation point, waits when the channel is
        # full (backpressure), and yields every EMIT_YIELD_EVERY events so other tasks run.
        await trio.lowlevel.checkpoint_if_cancelled()
        turn = self.turn
        try:
            turn.start.events.send_nowait(event)
        except trio.WouldBlock:
            turn.emitted = 0
            await turn.start.events.send(event)
            return
        turn.emitted += 1
        if turn.emitted >= EMIT_YIELD_EVERY:
            turn.emitted = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def text(self, chunk: str) -> None:
        # Counted once handed over, not before: a chunk the cancel stops in _emit is
        # never sent nor stored, and counted first it was in the live history (the
        # model's next prompt saw text the client never did) but not in the one a load
        # gives from the store.
        await self._emit(Update(updates.agent_message_chunk(chunk)))
        self.turn.agent_text.append(chunk)

    async def thought(self, chunk: str) -> None:
        await self._emit(Update(updates.agent_thought_chunk(chunk)))

    async def plan(self, entries: Sequence[Any]) -> None:
        await self._emit(Update(updates.plan(entries)))

    async def call_client(self, method: str, params: dict[str, Any]) -> Any:
        call_id = next(self.turn.call_ids)
        slot = _Reply()
        self.turn.calls[call_id] = slot
        try:
            await self._emit(ClientCall(call_id, method, params))
            await slot.done.wait()
        finally:
            del self.turn.calls[call_id]
        reply = slot.reply
        assert reply is not None
        if reply.unavailable:
            raise ClientUnavailable(method)
        if reply.error_message is not None:
            raise ClientCallError(reply.error_code, reply.error_message)
        return reply.result

    async def tool(self, name: str, tool_input: dict[str, Any]) -> Any:
        # Unique within the session (the schema's rule), turn after turn: call_T_N is the
        # session's T-th turn's N-th tool call (an IDE updates a tool call by its id).
        tool_id = f"call_{self.turn.start.number + 1}_{next(self.turn.tool_ids)}"
        refusal = self.worker.rate_limit_tool(self.session_id)
        if refusal is not None:
            await self._emit(
                Update(updates.tool_call(tool_id, name, status="failed", raw_input=tool_input))
            )
            await self._emit(
                Update(updates.tool_call_update(tool_id, status="failed", text=refusal))
            )
            return None
        spec = TOOLS.get(name)
        if spec is None:
            await self._emit(
                Update(updates.tool_call(tool_id, name, status="failed", raw_input=tool_input))
            )
            message = f"unsupported tool {name!r} (available: {', '.join(sorted(TOOLS))})"
            await self._emit(
                Update(updates.tool_call_update(tool_id, status="failed", text=message))
            )
            return None
        path = tool_input.get("path")
        refused: ToolError | None = None
        resolved = None
        if spec.uses_path:
            try:
                resolved = await resolve_tool_path(self.turn.start.env, tool_input)
            except ToolError as exc:
                refused = exc
        # An IDE's follow-along opens these: the absolute path the tool will use (the one
        # an fs/* request carries), none for a path it refuses. (Collapsing ``..`` as text
        # pointed it at a file the call refused, outside the project, and at the wrong
        # file where a symlink came before the ``..``.)
        locations = [str(resolved)] if resolved is not None else []
        title = f"{spec.title} {path}" if isinstance(path, str) else spec.title
        await self._emit(
            Update(
                updates.tool_call(
                    tool_id, title, kind=spec.kind, raw_input=tool_input, locations=locations
                )
            )
        )
        # Open from its report until its last update has been handed over: a cancel
        # anywhere in between (an emit raises Cancelled before it sends anything) leaves
        # it to ProjectWorker._run_turn, which reports it failed.
        open_tools = self.turn.open_tools
        state = open_tools[tool_id] = CallState()
        await self._emit(Update(updates.tool_call_update(tool_id, status="in_progress")))
        try:
            if refused is not None:
                raise refused
            env = self.turn.start.env
            output = await spec.run(env, tool_input, self.call_client, resolved, state)
        except (ToolError, ClientCallError) as exc:
            await self._emit(
                Update(updates.tool_call_update(tool_id, status="failed", text=str(exc)))
            )
            del open_tools[tool_id]
            return None
        shown, raw = shown_output(output)
        await self._emit(
            Update(
                updates.tool_call_update(tool_id, status="completed", text=shown, raw_output=raw)
            )
        )
        del open_tools[tool_id]
        return output


def seconds_up(seconds: float, digits: int) -> float:
    """``seconds`` rounded up to ``digits`` decimals: a wait to tell a client (or model)
    that is over the rate limit. Rounded to nearest, 59.9994 s was told as 59.999 (and
    59.94 s as "59.9 s"), and one that waited just that long came back before the oldest
    call left the window and was refused again."""
    scale = 10.0**digits
    return math.ceil(seconds * scale) / scale


@attrs.define(eq=False)
class ToolCallLimiter:
    """Tool calls per minute per session.

    A worker keeps one for its turns; the manager keeps one too, between a session's
    turns, and hands each turn its session's recent calls as ages
    (``StartTurn.tool_call_ages``, back in ``TurnFinished``): a worker ends with its root's
    last session, and a session closed and resumed gets a new one, so a count the worker
    kept alone started over each time (an audit got 3 more calls a minute per close and
    resume). Sessions whose last call is over a minute old are swept as the table
    doubles, so it stays about as large as the sessions that called a tool in the last
    minute.
    """

    per_minute: int = 240
    _times: dict[str, collections.deque[float]] = attrs.field(factory=dict, init=False)
    _sweep_at: int = attrs.field(default=64, init=False)

    def count(self, session_id: str, now: float) -> str | None:
        """Count a tool call of ``session_id`` at ``now``; a message if it is over the
        limit (the call is then reported failed to the client and the model goes on)."""
        recent = self._recent(session_id, now)
        if len(recent) >= self.per_minute:
            calls = "tool call" if self.per_minute == 1 else "tool calls"
            return (
                f"rate limit: {self.per_minute} {calls} per minute in this session; "
                f"retry in {seconds_up(recent[0] + 60.0 - now, 1):.1f} s"
            )
        recent.append(now)
        return None

    def ages(self, session_id: str, now: float) -> tuple[float, ...]:
        """How long before ``now`` each of the session's calls of the last minute was."""
        recent = self._times.get(session_id)
        return tuple(now - t for t in recent if t > now - 60.0) if recent else ()

    def seed(self, session_id: str, ages: Sequence[float], now: float) -> None:
        """Take the session's recent calls as :meth:`ages` gave them (elsewhere)."""
        if not ages:
            self._times.pop(session_id, None)
            return
        recent = self._recent(session_id, now)  # (a new key sweeps as the table grows)
        recent.clear()
        recent.extend(now - age for age in ages if age < 60.0)

    def _recent(self, session_id: str, now: float) -> collections.deque[float]:
        recent = self._times.get(session_id)
        if recent is None:
            if len(self._times) >= self._sweep_at:
                self._sweep(now)
            recent = self._times[session_id] = collections.deque()
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        return recent

    def _sweep(self, now: float) -> None:
        for session_id in [k for k, v in self._times.items() if not v or v[-1] <= now - 60.0]:
            del self._times[session_id]
        self._sweep_at = 2 * len(self._times) + 64  # (amortised: a sweep per doubling)

    def __len__(self) -> int:
        return len(self._times)


@attrs.define(eq=False)
class ProjectWorker:
    """Runs turns for one project root. Feed it :data:`Command` envelopes on ``commands``."""

    root: str
    model: Model
    commands: trio.MemoryReceiveChannel[Command]
    tool_calls_per_minute: int = 240
    #: Where a tool call refused by the rate limit is counted, under
    #: ``"tool_calls_per_minute"`` (the manager's ``Metrics.tallies.limits``; None: not).
    limit_hits: dict[str, int] | None = None
    _turns: dict[int, _Turn] = attrs.field(factory=dict, init=False)
    _tool_calls: ToolCallLimiter = attrs.field(init=False)
    _history: dict[str, list[tuple[str, str]]] = attrs.field(factory=dict, init=False)
    #: By session: the turn whose (user, agent) pair ends its history (for ForgetTurn).
    _last_kept: dict[str, int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._tool_calls = ToolCallLimiter(self.tool_calls_per_minute)

    def rate_limit_tool(self, session_id: str) -> str | None:
        """Count a tool call of ``session_id`` (see :class:`ToolCallLimiter`)."""
        refused = self._tool_calls.count(session_id, trio.current_time())
        if refused is not None and self.limit_hits is not None:
            self.limit_hits["tool_calls_per_minute"] += 1
        return refused

    @property
    def running_turns(self) -> int:
        return len(self._turns)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async with self.commands:
                async for command in self.commands:
                    self._handle(command, nursery)
                    # And what else is queued (up to COMMANDS_PER_STEP more), in the same
                    # step: with many clients a scheduler trip per command would cost more
                    # than the command.
                    for _ in range(COMMANDS_PER_STEP):
                        try:
                            command = self.commands.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        self._handle(command, nursery)
            # No more commands: the manager is done with this root.
            for turn in self._turns.values():
                turn.scope.cancel()

    def _handle(self, command: Command, nursery: trio.Nursery) -> None:
        if isinstance(command, StartTurn):
            turn = _Turn(command, self._history.setdefault(command.env.session_id, []))
            self._turns[command.turn_id] = turn
            nursery.start_soon(self._run_turn, turn)
        elif isinstance(command, CancelTurn):
            running = self._turns.get(command.turn_id)
            if running is not None:
                running.scope.cancel()
        elif isinstance(command, ClientReply):
            running = self._turns.get(command.turn_id)
            slot = running.calls.get(command.call_id) if running else None
            if slot is not None and not slot.done.is_set():
                slot.reply = command
                slot.done.set()
        elif isinstance(command, ForgetSession):
            self._history.pop(command.session_id, None)
            self._last_kept.pop(command.session_id, None)
        elif isinstance(command, ForgetTurn):
            if self._last_kept.get(command.session_id) == command.turn_id:
                del self._last_kept[command.session_id]
                del self._history[command.session_id][-2:]
        else:
            self._history[command.session_id] = list(command.history)
            self._last_kept.pop(command.session_id, None)

    async def _run_turn(self, turn: _Turn) -> None:
        start = turn.start
        history = turn.history
        # The list itself, not a copy (a long session would copy its whole history every
        # turn): it changes only after the turn, below, and a session runs one turn at a time.
        ctx = _Context(self, turn, history)
        session_id = start.env.session_id
        self._tool_calls.seed(session_id, start.tool_call_ages, trio.current_time())
        finished: TurnFinished
        try:
            with turn.scope:
                stop = await self.model.run_turn(ctx)
            finished = TurnFinished("cancelled" if turn.scope.cancelled_caught else stop)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            finished = TurnFinished("cancelled")
        except Exception as exc:
            log.exception("model %s failed in session %s", self.model.name, start.env.session_id)
            finished = TurnFinished("end_turn", error=f"{type(exc).__name__}: {exc}")
        finally:
            del self._turns[start.turn_id]
        ages = self._tool_calls.ages(session_id, trio.current_time())
        finished = attrs.evolve(finished, tool_call_ages=ages)
        if finished.error is None and finished.stop_reason != "refusal":
            # (A refused turn "won't be included in the next prompt": the StopReason schema.)
            history.append(("user", start.prompt_text))
            history.append(("agent", "".join(turn.agent_text)))
            self._last_kept[session_id] = start.turn_id
        # A tool call the turn left running ends failed: the tool-calls page has no status
        # for "cancelled", and an IDE shows an in_progress call as running for ever. One
        # that may have changed something all the same (a write the cancel did not wait
        # for) says what, not just "cancelled": failed must not read as "nothing written".
        why = "cancelled" if finished.stop_reason == "cancelled" else "the turn ended first"
        final: list[TurnEvent] = [
            Update(
                updates.tool_call_update(
                    tool_id,
                    status="failed",
                    text=why if state.may_have is None else f"{why}, but {state.may_have}",
                )
            )
            for tool_id, state in turn.open_tools.items()
        ]
        final.append(finished)
        # Without a scheduler trip when there is room (the usual case): the relay then finds
        # the turn's last updates and its end together.
        sent = 0
        try:
            for event in final:
                start.events.send_nowait(event)
                sent += 1
        except trio.WouldBlock:
            deadline = trio.current_time() + FINAL_SEND_TIMEOUT
            with (
                trio.CancelScope(shield=True, deadline=deadline),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                for event in final[sent:]:
                    await start.events.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        start.events.close()
