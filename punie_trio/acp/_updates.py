"""Builders for ``session/update`` payloads (the ``update`` object), sans-I/O.

They return plain dicts shaped exactly as the v1 schema's ``SessionUpdate`` variants, so the
same object can be sent, stored in the transcript and replayed byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import _json


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def agent_message_chunk(text: str) -> dict[str, Any]:
    return {"sessionUpdate": "agent_message_chunk", "content": text_block(text)}


def agent_thought_chunk(text: str) -> dict[str, Any]:
    return {"sessionUpdate": "agent_thought_chunk", "content": text_block(text)}


def user_message_chunk(block: Mapping[str, Any]) -> dict[str, Any]:
    return {"sessionUpdate": "user_message_chunk", "content": dict(block)}


def session_info(title: str) -> dict[str, Any]:
    """A ``session_info_update`` naming the session (only changed fields are sent)."""
    return {"sessionUpdate": "session_info_update", "title": title}


_PRIORITIES = ("high", "medium", "low")
_PLAN_STATUSES = ("pending", "in_progress", "completed")


def plan_entry(entry: Mapping[str, Any] | str) -> dict[str, Any]:
    """A plan entry from a full entry or a bare string (priority medium, status pending)."""
    if isinstance(entry, str):
        return {"content": entry, "priority": "medium", "status": "pending"}
    priority = entry.get("priority", "medium")
    status = entry.get("status", "pending")
    return {
        "content": str(entry.get("content", "")),
        "priority": priority if priority in _PRIORITIES else "medium",
        "status": status if status in _PLAN_STATUSES else "pending",
    }


def plan(entries: Iterable[Mapping[str, Any] | str]) -> dict[str, Any]:
    return {"sessionUpdate": "plan", "entries": [plan_entry(e) for e in entries]}


def tool_call(
    tool_call_id: str,
    title: str,
    *,
    kind: str = "other",
    status: str = "pending",
    raw_input: Any = None,
    locations: Iterable[str] = (),
) -> dict[str, Any]:
    update: dict[str, Any] = {
        "sessionUpdate": "tool_call",
        "toolCallId": tool_call_id,
        "title": title,
        "kind": kind,
        "status": status,
    }
    if raw_input is not None:
        update["rawInput"] = raw_input
    locs = [{"path": p} for p in locations]
    if locs:
        update["locations"] = locs
    return update


def tool_call_update(
    tool_call_id: str,
    *,
    status: str | None = None,
    text: str | None = None,
    raw_output: Any = None,
) -> dict[str, Any]:
    update: dict[str, Any] = {"sessionUpdate": "tool_call_update", "toolCallId": tool_call_id}
    if status is not None:
        update["status"] = status
    if text is not None:
        update["content"] = [{"type": "content", "content": text_block(text)}]
    if raw_output is not None:
        update["rawOutput"] = raw_output
    return update


# -- encoded form: each update is encoded once, sent, stored and replayed as text -----------


def encode(update: Mapping[str, Any]) -> str:
    """The compact JSON text of an update object (the wire encoding of the JSON-RPC codec),
    strict: a NaN or infinity is written as ``null`` (:func:`punie_trio._json.dumps_finite`)."""
    return _json.dumps_finite(update)


def notification(session_id: str, update_json: str) -> str:
    """The JSON-RPC text of a ``session/update`` notification around an encoded update.

    Byte for byte what serialising the notification object would give, without decoding
    ``update_json`` (a replayed transcript is spliced straight from the store). Sending
    many for one session: ``notification_prefix(session_id) + update_json + "}}"``.
    """
    return notification_prefix(session_id) + update_json + "}}"


#: How every ``session/update`` notification we encode starts, up to its session id.
NOTIFICATION_START = '{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":'


def notification_prefix(session_id: str) -> str:
    """The text of a session's ``session/update`` notifications up to the update object."""
    return NOTIFICATION_START + _json.dumps(session_id) + ',"update":'


#: How a ``session/load`` replay spells its ``session/update`` notifications: the same JSON
#: object, its first two keys swapped, so the replayed are told apart from live output at
#: no cost per message. What a dropped connection never wrote of its sessions' live
#: output is delivered when its client re-attaches (``Manager._keep_unsent`` looks for
#: :data:`NOTIFICATION_START`); a replay it never wrote must not be: the client sent no
#: load on the new connection and would take a stale transcript for new updates.
REPLAY_START = '{"method":"session/update","jsonrpc":"2.0","params":{"sessionId":'


def replay_prefix(session_id: str) -> str:
    """:func:`notification_prefix`, spelled as a replay (see :data:`REPLAY_START`)."""
    return REPLAY_START + _json.dumps(session_id) + ',"update":'
