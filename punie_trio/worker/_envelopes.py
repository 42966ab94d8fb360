"""The envelopes a project worker exchanges with the manager (small attrs values).

Commands flow in on the worker's one command channel. Each turn's events flow out on a
channel that travels inside its :class:`StartTurn`, so the consumer of one turn (its client's
relay) can be slow without delaying any other turn on the same worker.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..acp import ClientCapabilities
from ._events import EventSink


@attrs.frozen
class TurnEnv:
    """What a turn may touch: its working directory and the roots paths must stay inside.
    ``anchors`` (the server's project roots, which every session root lies under) are
    where opening a file starts walking down without following links
    (``_paths.open_beneath``; empty: from ``roots``). ``private`` (the server's data
    directory and config file, each as ``(path, _paths.DATA_DIRECTORY or CONFIG_FILE)``)
    is never touched, though a root may hold it: the data directory holds the bearer token
    and every session's transcript, and a ``write_file`` over its store stopped the server
    saving anything (``punie-trio serve`` started in the home directory serves ``~``, and
    the data directory in it); the config file may hold the token."""

    session_id: str
    cwd: str
    roots: tuple[str, ...]
    capabilities: ClientCapabilities
    anchors: tuple[str, ...] = ()
    private: tuple[tuple[str, str], ...] = ()


# --- out (worker -> manager), on the turn's event channel -----------------------------------


@attrs.frozen
class Update:
    """One ``session/update`` ``update`` object to stream to the session's client."""

    update: dict[str, Any]


@attrs.frozen
class ClientCall:
    """A request the turn needs answered by its client (``fs/*``, ``terminal/*``,
    ``session/request_permission``). Answered with a :class:`ClientReply` command."""

    call_id: int
    method: str
    params: dict[str, Any]


@attrs.frozen
class TurnFinished:
    """The turn is over. ``error`` is set when the model failed (answer -32603).
    ``tool_call_ages``: how long ago (seconds, oldest first) each of the session's tool
    calls of the last minute was made, for the manager to hand to the session's next turn
    (see :class:`StartTurn`)."""

    stop_reason: str
    error: str | None = None
    tool_call_ages: tuple[float, ...] = attrs.field(default=(), eq=False)  # (bookkeeping)


TurnEvent = Update | ClientCall | TurnFinished


# --- in (manager -> worker), on the worker's command channel ---------------------------------


@attrs.frozen
class StartTurn:
    turn_id: int
    env: TurnEnv
    prompt_text: str
    prompt_blocks: tuple[dict[str, Any], ...]
    events: EventSink[TurnEvent] = attrs.field(eq=False, repr=False)
    #: The turn's place in its session (0 for the first, counting recorded turns): tool
    #: call ids must be unique within the session, across its turns and restarts.
    number: int = 0
    #: How long ago each of the session's tool calls of the last minute was made (oldest
    #: first): the per-minute count goes on from there, also in a new worker (a session
    #: closed and resumed gets one). Ages, not times: a worker's clock need not be the
    #: manager's (it could run in a child process).
    tool_call_ages: tuple[float, ...] = ()


@attrs.frozen
class CancelTurn:
    turn_id: int


@attrs.frozen
class ClientReply:
    """The answer to a :class:`ClientCall`. ``unavailable``: no client can take the call
    now (the session's holder does not advertise the method's capability, or, for a
    read, the session is held for a client that is away); the tool does the work on
    disk itself, as for a turn whose client never had the capability."""

    turn_id: int
    call_id: int
    result: Any = None
    error_code: int | None = None
    error_message: str | None = None
    unavailable: bool = False


@attrs.frozen
class ForgetSession:
    """Drop the worker's history of a session (closed or deleted)."""

    session_id: str


@attrs.frozen
class ForgetTurn:
    """Drop a finished turn from the worker's history of its session: its transcript was
    not saved, so the session reloaded from the store would not have it (it is left out
    as a turn whose model failed is). Nothing if it is not the last turn kept."""

    session_id: str
    turn_id: int


@attrs.frozen
class SeedHistory:
    """Give the worker a session's history (loaded from the store)."""

    session_id: str
    history: tuple[tuple[str, str], ...]


Command = StartTurn | CancelTurn | ClientReply | ForgetSession | ForgetTurn | SeedHistory
