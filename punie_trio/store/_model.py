"""Values, errors and the rules both store implementations share.

Everything that decides *what* a store accepts or returns lives here, as pure functions, so
``MemoryStore`` and ``SqliteStore`` cannot drift apart: both validate entries, encode
cursors and copy JSON through the same code.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
from collections.abc import Sequence
from typing import Any, Final

import attrs

from .. import _json

#: The pseudo ``sessionUpdate`` kind recording a turn's stop reason: ``{"stopReason": ...}``.
STOP: Final = "stop"

#: The ``sessionUpdate`` kinds a turn's transcript normally holds (plus :data:`STOP`).
#: Other ACP kinds are accepted too: the transcript stores whatever was streamed.
TRANSCRIPT_KINDS: Final = frozenset(
    {
        "user_message_chunk",
        "agent_message_chunk",
        "agent_thought_chunk",
        "plan",
        "tool_call",
        "tool_call_update",
        STOP,
    }
)


class StoreError(Exception):
    """A store operation could not be done: bad input, unknown session, closed store,
    an unreadable database or one written by a newer punie-trio."""


class BadCursor(StoreError):
    """A ``session/list`` cursor that this store did not hand out (the client's error, where
    every other ``StoreError`` of a listing is the store's)."""


class UnknownSessionError(StoreError):
    """The session id names no stored session."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"unknown session {session_id!r}")
        self.session_id = session_id


class _Unset(enum.Enum):
    UNSET = enum.auto()

    def __repr__(self) -> str:
        return "UNSET"


#: Sentinel for "leave this field alone" in ``update_session`` (``None`` is a real value).
UNSET: Final = _Unset.UNSET
Unset = _Unset


@attrs.frozen
class SessionRecord:
    """One ACP session as stored: enough to list it, load it and resume it."""

    id: str
    root: str
    cwd: str
    client_id: str | None = None
    title: str | None = None
    mode: str | None = None
    config: dict[str, Any] = attrs.field(factory=dict)
    additional_directories: tuple[str, ...] = ()
    created_at: float = 0.0
    updated_at: float = 0.0
    turns: int = 0
    #: ``cwd`` as the client sent it in ``session/new`` (``cwd`` is the resolved form the
    #: session was checked in); None: not known (a session stored by an older version).
    cwd_sent: str | None = None


@attrs.frozen
class TranscriptEntry:
    """One streamed ``session/update`` (or a turn's stop reason), in session order.

    ``payload_json`` is the JSON text of exactly the ACP ``update`` object as it was
    streamed, so ``session/load`` splices it into its replayed notifications unchanged (no
    decode and re-encode per entry); ``payload`` decodes it. For :data:`STOP` it is
    ``{"stopReason": ...}``, which the hub extends with the turn's ``history`` (the user's
    and the agent's text) and, when the model failed, its ``error``.
    """

    session_id: str
    seq: int
    turn: int
    kind: str
    payload_json: str

    @property
    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload_json)
        return value


#: An entry's payload for ``append_turn``: the update object, or its JSON text when the
#: caller has already encoded it (the hub encodes each update once, for the wire and here).
Payload = dict[str, Any] | str


# -- JSON -----------------------------------------------------------------------------------


def dump_json(value: Any, what: str) -> str:
    """Serialise compactly, refusing what JSON cannot carry (NaN, sets, objects).

    Keys keep their order and floats round-trip exactly, so ``load_json(dump_json(x)) == x``
    for anything an ACP message can contain.
    """
    try:
        return _json.dumps_strict(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise StoreError(f"{what} is not JSON-serialisable: {exc}") from exc


def load_json(text: str) -> Any:
    return json.loads(text)


def copy_json(value: Any, what: str) -> Any:
    """A deep copy through JSON: what the SQLite store would give back, and detached from
    the caller's (mutable) dict."""
    return load_json(dump_json(value, what))


# -- validation -----------------------------------------------------------------------------


def check_record(rec: SessionRecord) -> SessionRecord:
    """Validate a record for ``create_session`` and return a copy detached from the caller."""
    if not isinstance(rec, SessionRecord):
        raise StoreError(f"expected a SessionRecord, got {type(rec).__name__}")
    if not rec.id:
        raise StoreError("session id must be a non-empty string")
    if not isinstance(rec.config, dict):
        raise StoreError("session config must be a JSON object")
    if rec.turns < 0:
        raise StoreError("session turns must be >= 0")
    if rec.cwd_sent is not None and not isinstance(rec.cwd_sent, str):
        raise StoreError("the cwd as sent must be a string or None")
    return attrs.evolve(
        rec,
        config=copy_json(rec.config, "session config"),
        additional_directories=tuple(rec.additional_directories),
    )


def check_title(title: str | None) -> None:
    """``append_turn``'s ``title``: None or a string (``StoreError`` otherwise)."""
    if title is not None and not isinstance(title, str):
        raise StoreError(f"a title must be a string, not {type(title).__name__}")


def session_changes(
    *,
    title: str | Unset | None,
    mode: str | Unset | None,
    config: dict[str, Any] | Unset,
    client_id: str | Unset | None,
    updated_at: float | Unset,
    additional_directories: Sequence[str] | Unset = UNSET,
) -> dict[str, Any]:
    """The fields ``update_session`` was given (checked), by column name; both stores apply
    exactly this."""
    changes: dict[str, Any] = {}
    if title is not UNSET:
        changes["title"] = title
    if mode is not UNSET:
        changes["mode"] = mode
    if config is not UNSET:
        changes["config"] = check_config(config)
    if client_id is not UNSET:
        changes["client_id"] = client_id
    if updated_at is not UNSET:
        changes["updated_at"] = float(updated_at)
    if additional_directories is not UNSET:
        if isinstance(additional_directories, str | bytes):
            raise StoreError("additional directories must be a sequence of strings")
        try:
            directories = tuple(additional_directories)  # once: it may be an iterator
        except TypeError:
            raise StoreError("additional directories must be a sequence of strings") from None
        if not all(isinstance(d, str) for d in directories):
            raise StoreError("additional directories must be a sequence of strings")
        changes["additional_directories"] = directories
    return changes


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise StoreError("session config must be a JSON object")
    result: dict[str, Any] = copy_json(config, "session config")
    return result


def check_turn(turn: int, entries: Sequence[tuple[str, Payload]]) -> list[tuple[str, str]]:
    """Validate one turn's entries; return them as ``(kind, payload_json)`` pairs.

    A real update's payload must carry ``"sessionUpdate": kind`` (it is the streamed update
    object); a :data:`STOP` payload must carry ``stopReason``. Catching a mismatch here is
    cheaper than discovering on ``session/load`` that a replay is wrong. A payload given as
    JSON text is the caller's own encoding of such an object and is only checked to be an
    object (decoding it again would cost what encoding it once saved).

    The SQLite store keeps a turn as one text, its entries joined by newlines, each
    ``kind + TAB + payload_json`` (see ``_sql.encode_entries``), so a kind may hold neither
    a tab nor a newline and the JSON text no raw newline. ``dump_json`` never writes one
    (JSON escapes control characters inside strings); a pre-encoded payload with one, which
    can only be whitespace between tokens, is refused: encode it compactly.
    """
    if isinstance(turn, bool) or not isinstance(turn, int) or turn < 0:
        raise StoreError(f"turn must be an int >= 0, got {turn!r}")
    out: list[tuple[str, str]] = []
    for index, item in enumerate(entries):
        try:
            kind, payload = item
        except (TypeError, ValueError):
            raise StoreError(f"entry {index} must be a (kind, payload) pair") from None
        if not isinstance(kind, str) or not kind:
            raise StoreError(f"entry {index}: kind must be a non-empty string")
        if "\t" in kind or "\n" in kind:
            raise StoreError(f"entry {index}: kind {kind!r} must not contain a tab or newline")
        if isinstance(payload, str):
            if not payload.startswith("{"):
                raise StoreError(f"entry {index} ({kind}): payload must be a JSON object")
            if "\n" in payload:
                raise StoreError(
                    f"entry {index} ({kind}): payload JSON text must not contain a raw "
                    "newline (encode it compactly)"
                )
            out.append((kind, payload))
            continue
        if not isinstance(payload, dict):
            raise StoreError(f"entry {index} ({kind}): payload must be a JSON object")
        if kind == STOP:
            if "stopReason" not in payload:
                raise StoreError(f"entry {index} (stop): payload needs 'stopReason'")
        elif payload.get("sessionUpdate") != kind:
            raise StoreError(
                f"entry {index} ({kind}): payload's sessionUpdate is "
                f"{payload.get('sessionUpdate')!r}, not {kind!r}"
            )
        out.append((kind, dump_json(payload, f"entry {index} ({kind}) payload")))
    return out


def root_prefix(root: str) -> str:
    """What every path strictly under ``root`` starts with (``/`` for the file system's)."""
    return root if root.endswith("/") else root + "/"


def under_roots(cwd: str, roots: Sequence[str] | None) -> bool:
    """Whether ``cwd`` is one of ``roots`` or lies under one (``None``: no filter). Both
    are resolved absolute paths, as sessions store them: comparing text is comparing path
    components (``/p/ab`` is not under ``/p/a``), as ``Path.is_relative_to`` would."""
    return roots is None or any(cwd == r or cwd.startswith(root_prefix(r)) for r in roots)


#: The stored times (seconds since the epoch) a date can be told from: 0001-01-02 to
#: 9999-12-30 UTC, inside what ``datetime`` and ``time.localtime`` take (a day from each
#: end, for any time zone). A time outside it (only an edited or damaged file holds one)
#: is a damaged row: formatted as ``updatedAt`` it failed every session/list.
MIN_TIME: Final = -62135510400.0
MAX_TIME: Final = 253402128000.0


def stored_time(value: Any) -> float:
    """A stored time as a float, or ``ValueError`` if it is outside :data:`MIN_TIME` to
    :data:`MAX_TIME` (infinities included)."""
    time = float(value)
    if not MIN_TIME <= time <= MAX_TIME:
        raise ValueError(f"time {value!r} is out of range")
    return time


def check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise StoreError(f"limit must be an int >= 1, got {limit!r}")


# -- cursors --------------------------------------------------------------------------------


def encode_cursor(
    position: float, session_id: str, as_of: float | None, cwd: str | Unset | None = UNSET
) -> str:
    """An opaque cursor naming the last session of a page: base64url of
    ``[position, id, as_of, {"cwd": cwd}]``, ``cwd`` the listing's filter (None: every
    session), so that the cursor pages on only the listing it came from
    (:func:`page_start`).

    Keyset (not offset) pagination, on each session's ``updated_at`` as of ``as_of``, the
    newest ``updated_at`` of the listing's first page (:func:`listed_position`): a session
    touched between two pages keeps its place for the rest of the listing, so it is listed
    once, neither skipped (it once moved ahead of the cursor) nor repeated, and cannot shift
    the others under the client. One created meanwhile waits for the next listing.
    """
    # (``as_of`` None: the older form, for a listing begun with such a cursor; ``cwd``
    # unset: a cursor of the form before the filter was in it.)
    value: list[Any] = [position, session_id]
    if as_of is not None:
        value.append(as_of)
        if not isinstance(cwd, Unset):
            value.append({"cwd": cwd})
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_cursor(cursor: str) -> tuple[float, str, float | None, str | Unset | None]:
    """The position :func:`encode_cursor` wrote, and the cwd filter of the listing it
    pages (unset for a cursor of a form without it), or ``StoreError`` for anything else:
    a client may send any string, and only a cursor of ours may reach the query (a stamp
    too large for a float, or an id that SQLite cannot store, included). A cursor of the
    older form ``[updated_at, id]`` reads with ``as_of`` None (positions as they are now)."""
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii"))
        value = json.loads(raw)
    except (UnicodeError, binascii.Error, ValueError, AttributeError):
        raise BadCursor(f"invalid cursor {cursor!r}") from None
    listing: str | Unset | None = UNSET
    if isinstance(value, list) and len(value) == 4:
        cwd = value.pop()
        if not (
            isinstance(cwd, dict)
            and cwd.keys() == {"cwd"}
            and (cwd["cwd"] is None or isinstance(cwd["cwd"], str))
        ):
            raise BadCursor(f"invalid cursor {cursor!r}")
        listing = cwd["cwd"]
    if (
        isinstance(value, list)
        and len(value) in (2, 3)
        and all(_is_stamp(v) for v in value[:1] + value[2:])
        and isinstance(value[1], str)
        and _json.is_name_text(value[1])
    ):
        try:
            stamps = [float(v) for v in value[:1] + value[2:]]
        except OverflowError:  # (an integer of hundreds of digits)
            raise BadCursor(f"invalid cursor {cursor!r}") from None
        if all(math.isfinite(v) for v in stamps):
            return stamps[0], value[1], stamps[1] if len(stamps) == 2 else None, listing
    raise BadCursor(f"invalid cursor {cursor!r}")


def page_start(
    cursor: str | None, cwd: str | None = None
) -> tuple[float | None, str, float | None]:
    """Where a page of the listing of ``cwd`` (None: every session) starts: after
    ``(position, id)``, in the listing begun at ``as_of`` (:func:`decode_cursor`);
    ``(None, "", None)`` for a first page.

    ``BadCursor`` for a cursor of another listing (another ``cwd`` filter, or none where
    this one has one): taken as a place in this one, it started the page somewhere in
    its middle, or past its end, and the client was not told. (A cursor of a form
    without its filter is taken as it was.)"""
    if cursor is None:
        return None, "", None
    last, last_id, as_of, listing = decode_cursor(cursor)
    if not isinstance(listing, Unset) and listing != cwd:
        raise BadCursor(
            f"it continues another listing, of {_listing(listing)}, not of {_listing(cwd)}"
        )
    return last, last_id, as_of


def _listing(cwd: str | None) -> str:
    return "every session" if cwd is None else f"cwd {cwd!r}"


def next_cursor(
    position: float,
    session_id: str,
    start: tuple[float | None, str, float | None],
    newest: float,
    cwd: str | None = None,
) -> str:
    """The cursor after a page of the listing of ``cwd`` that ends at ``(position,
    session_id)`` and began at ``start`` (:func:`page_start`). The listing's moment is its
    first page's ``newest`` position, kept by every later page; a listing paged on from a
    cursor of the older form has none, and goes on in that form."""
    last, _, as_of = start
    return encode_cursor(
        position, session_id, as_of if as_of is not None or last is not None else newest, cwd
    )


def _is_stamp(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def listed_position(
    rec: SessionRecord, as_of: float | None, turn_times: Sequence[float], meta_updated_at: float
) -> float:
    """Where ``rec`` sorts in a listing that began when its newest ``updated_at`` was
    ``as_of``: its ``updated_at`` then. Unchanged since, that is its ``updated_at``; touched
    since (a turn committed after ``as_of``), the later of its last turn's commit time and
    its last metadata write's ``updated_at`` (``meta_updated_at``), each if not after
    ``as_of``, else its creation time. ``turn_times`` are its turns' commit times in turn
    order. The SQL in ``_sql.select_sessions`` computes the same."""
    if as_of is None or rec.updated_at <= as_of:
        return rec.updated_at
    earlier = [t for t in reversed(turn_times) if t <= as_of][:1]
    if meta_updated_at <= as_of:
        earlier.append(meta_updated_at)
    return max(earlier) if earlier else rec.created_at


def after_cursor(position: float, session_id: str, cursor: tuple[float, str]) -> bool:
    """True if a session at ``position`` sorts after ``cursor`` in newest-first,
    id-descending order."""
    last, last_id = cursor
    return position < last or (position == last and session_id < last_id)
