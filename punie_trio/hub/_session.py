"""What the manager keeps per session and per turn, the limits it enforces, and how a
turn's history is read back from its transcript entries: plain data and pure functions
(the manager, in ``_manager.py`` and the modules its methods live in, changes them)."""

from __future__ import annotations

import collections
import json
from typing import TYPE_CHECKING, Any, TypeGuard

import attrs
import trio

from ..acp import prompt_text
from ..rpc import RequestId, Response, RpcError, error_response, serialize
from ..rpc._outbox import OUTBOX_BYTES
from ..worker import Command, ProjectWorker

if TYPE_CHECKING:
    from ._connection import ClientConnection

#: Sent to a re-attached client whose missed updates overflowed the buffer (and for
#: whatever else it may have missed: ``_grace.py``).
RELOAD_REQUIRED = "_punie-trio/reload_required"
#: The longest string request id remembered once its request has ended (a request id may
#: be any string, up to the message's size: 1,024 of 16 MiB each would pin 16 GiB).
MAX_REMEMBERED_ID_CHARS = 256
# How long a client gets to answer fs/*, terminal/*, permission requests.
CLIENT_CALL_TIMEOUT = 300.0
#: The default bytes of updates kept per session while its client is away
#: (``--detached-bytes``): four times a connection's outbox budget. An away client
#: applies no backpressure, so without a byte bound a turn's 1,024 kept updates could
#: be tool outputs of 130 KB each (130 MB per session, 64 sessions per client).
DETACHED_BYTES = 4 * 1024 * 1024


@attrs.frozen
class Limits:
    """Bounds on what clients may ask for (see docs/configuration.md)."""

    max_prompt_bytes: int = 1024 * 1024
    max_sessions_per_connection: int = 64
    max_connections: int = 256
    prompts_per_minute: int = 120
    tool_calls_per_minute: int = 240
    outbox_limit: int = 256
    outbox_bytes: int = OUTBOX_BYTES
    grace_seconds: float = 300.0
    detached_buffer: int = 1024
    detached_bytes: int = DETACHED_BYTES
    client_call_timeout: float = CLIENT_CALL_TIMEOUT


@attrs.define(eq=False)
class WorkerHandle:
    root: str
    worker: ProjectWorker
    commands: trio.MemorySendChannel[Command]
    sessions: set[str] = attrs.field(factory=set)
    #: Commands waiting for room in ``commands``, in order (see ``Manager._command``). Not
    #: bounded itself: what can wait is what the limits bound (a StartTurn and a CancelTurn
    #: per running turn, a reply per client call, a seed and a forget per session).
    backlog: collections.deque[Command] | None = None
    #: The worker lost its last session while commands waited in ``backlog``: its channel
    #: is closed once they are sent (closed under them, a waiting StartTurn was lost and
    #: its turn never ended).
    close_after_backlog: bool = False


@attrs.define(eq=False)
class ActiveTurn:
    turn_id: int
    connection: ClientConnection  # the connection that sent the prompt
    request_id: RequestId | None = None
    # StartTurn is queued for the worker, in order (a CancelTurn may follow it).
    started: bool = False
    cancel_requested: bool = False
    # The client cancelled the request itself ($/cancel_request): answer -32800 if that
    # cut the turn (one that had ended already is answered with its stop reason).
    request_cancelled: bool = False
    finished: trio.Event = attrs.field(factory=trio.Event)
    response: dict[str, Any] | None = None
    error: RpcError | None = None
    # The prompting connection is gone (its client dropped within grace): the answer is
    # delivered to whoever re-attaches the session.
    orphaned: bool = False
    # Scopes of the tasks asking the client on the turn's behalf (cancelled with the turn).
    calls: set[trio.CancelScope] = attrs.field(factory=set)
    # Set when the last of ``calls`` has ended, once the relay waits for that.
    calls_ended: trio.Event | None = None
    relaying: bool = True


# What a detached session keeps for its client: ("update", encoded notification) or
# ("answer", request_id, response, error), in the order they happened.
# ("message", encoded text, request_id): an answer kept as written (one a dropped connection
# never sent); always kept, like an answer.
Pending = tuple[Any, ...]


@attrs.define(eq=False)
class Session:
    id: str
    root: str
    cwd: str
    additional_directories: tuple[str, ...]
    owner: ClientConnection | None
    worker: WorkerHandle
    turn: ActiveTurn | None = None
    turns: int = 0
    # Turns started in this live session, counted on from ``turns``: a turn's number (its
    # tool call ids, the script's turn) stays unique when an earlier one failed to save.
    started: int = 0
    title: str | None = None
    # While the owner is away within its grace period: its client id and what it missed.
    detached_client: str | None = None
    # A list, not a deque: empty for almost every session, and 56 bytes that way, not 760.
    pending: list[Pending] = attrs.field(factory=list)
    # How many of ``pending`` are updates, counted as they come and go: the bound is
    # checked per update kept, and walking ``pending`` for it made a turn's output while
    # its client was away cost time quadratic in its length.
    kept_updates: int = 0
    # And the memory their texts take (``sys.getsizeof``, as the outbox counts).
    kept_bytes: int = 0
    overflowed: bool = False
    # Set while a task sends ``pending`` to the owner (see Manager._flush): the others wait.
    flush_done: trio.Event | None = None
    # The request id of the last prompt answered to the owner (see Manager._keep_unsent).
    answered_id: RequestId | None = None
    # That answer, as a pending item, until the session is next re-attached: written to a
    # connection that then dropped, it may have been lost in flight, and a client that
    # re-attaches awaiting its id never got it (see _grace._answers_lost_in_flight).
    last_answer: Pending | None = None
    # A session/load or session/resume is replaying it or seeding its history.
    loading: bool = False
    # A session/close (or delete) has begun: no new prompt or load, though the running
    # turn may take a few scheduler passes to end.
    closing: bool = False

    @property
    def allowed_roots(self) -> tuple[str, ...]:
        return (self.root, *self.additional_directories)


def small_id(request_id: object) -> TypeGuard[RequestId]:
    """Whether ``request_id`` is one kept once its request has ended (a refusal, an
    answer that may have been lost): a string of at most :data:`MAX_REMEMBERED_ID_CHARS`,
    or an integer of 64 bits (JSON's may be of any size)."""
    if isinstance(request_id, str):
        return len(request_id) <= MAX_REMEMBERED_ID_CHARS
    return isinstance(request_id, int) and -(2**63) <= request_id < 2**63


def answer_id(item: Pending) -> RequestId | None:
    """The request id a kept answer (an ``"answer"`` or ``"message"`` item) answers."""
    request_id: RequestId | None = item[1] if item[0] == "answer" else item[2]
    return request_id


def as_sent(item: Pending) -> Pending:
    """A kept answer as a ``"message"`` item: sent as it is, like one a dropped connection
    never wrote, rather than answered anew (:meth:`Peer.send_answer` counts an error)."""
    if item[0] != "answer":
        return item
    _, request_id, response, error = item
    msg = Response(request_id, response) if error is None else error_response(request_id, error)
    return ("message", serialize(msg), request_id)


def json_string_at(text: str, start: int) -> str | None:
    """The JSON string starting at ``text[start]`` (a quote), decoded; None if not one."""
    try:
        value, _ = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


_DECODER = json.JSONDecoder()


def text_of(update: dict[str, Any]) -> str:
    """The text of a message chunk update ("" for a non-text content block)."""
    content = update.get("content")
    text = content.get("text") if isinstance(content, dict) else None
    return text if isinstance(text, str) else ""


def turn_history(stop_json: str, chunks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A turn's ``[("user", text), ("agent", text)]``: from its stop entry's ``history``, or
    (a store written before that existed) from its ``(kind, payload_json)`` message chunks.
    Nothing for a turn that ended in ``refusal``: it "won't be included in the next prompt"
    (the schema's ``StopReason``), after a load as before it; nor for one whose model failed
    (its stop entry has an ``error``), which the live session left out too."""
    stop = json.loads(stop_json)
    if stop.get("stopReason") == "refusal" or "error" in stop:
        return []
    summary = stop.get("history")
    if (
        isinstance(summary, list)
        and len(summary) == 2
        and all(isinstance(part, str) for part in summary)
    ):
        return [("user", summary[0]), ("agent", summary[1])]
    user = prompt_text(json.loads(p).get("content") for k, p in chunks if k == "user_message_chunk")
    agent = "".join(text_of(json.loads(p)) for k, p in chunks if k == "agent_message_chunk")
    return [("user", user), ("agent", agent)]
