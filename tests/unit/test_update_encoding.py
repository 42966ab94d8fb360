"""The encoded form of ``session/update``: encoded once, spliced into its notification."""

from __future__ import annotations

import json

import pytest

from punie_trio.acp import updates
from punie_trio.rpc import Notification, serialize

SAMPLES = [
    updates.agent_message_chunk("plain"),
    updates.agent_thought_chunk('quotes " and \\ and\nnewline, unicode é ✓ 🙂'),
    updates.user_message_chunk({"type": "text", "text": "</script> \u2028"}),
    updates.tool_call_update("call_1_1", status="completed", text="ok"),
]


@pytest.mark.parametrize("update", SAMPLES)
@pytest.mark.parametrize("session_id", ["sess_1", 'odd "id" é'])
def test_notification_is_byte_identical_to_serialising_the_object(
    update: dict[str, object], session_id: str
) -> None:
    spliced = updates.notification(session_id, updates.encode(update))
    expected = serialize(
        Notification("session/update", {"sessionId": session_id, "update": update})
    )
    assert spliced == expected
    assert "\n" not in spliced
    assert json.loads(spliced)["params"]["update"] == update


def test_an_update_with_nan_is_encoded_as_strict_json() -> None:
    """A model's NaN went on the wire as NaN (no JSON parser of a strict client takes it)
    and into the store, where it then read as a damaged entry."""
    update = updates.tool_call("c", "t", raw_input={"x": float("nan"), "y": [1e999]})
    encoded = updates.encode(update)
    assert json.loads(encoded)["rawInput"] == {"x": None, "y": [None]}
    assert "NaN" not in encoded and "Infinity" not in encoded
