"""The test suite's ACP schema checker refuses what a strict client would: a field of our
own at the root of a spec type, a misspelt optional field, an error object or envelope out
of shape. (The schema as written leaves objects open and let all of these through.)"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from ..acp_schema import SchemaChecker


def _update(update: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "session/update",
        "params": {"sessionId": "s", "update": update, **params},
    }


TOOL_CALL = {
    "sessionUpdate": "tool_call",
    "toolCallId": "call_1_1",
    "title": "Read file a",
    "kind": "read",
    "status": "pending",
    "rawInput": {"path": "a", "anything": [1]},
    "locations": [{"path": "/p/a"}],
    "_meta": {"ours": True},
}


def test_valid_messages_pass() -> None:
    checker = SchemaChecker()
    checker.agent_sent(_update(TOOL_CALL))
    checker.agent_sent(_update({"sessionUpdate": "plan", "entries": []}))
    checker.client_sent({"jsonrpc": "2.0", "id": 1, "method": "session/list"})
    checker.agent_sent({"jsonrpc": "2.0", "id": 1, "result": {"sessions": []}})
    checker.agent_sent({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "x"}})
    assert checker.checked == 4


@pytest.mark.parametrize(
    "msg",
    [
        _update(TOOL_CALL, extra=1),  # a root field on the notification's params
        _update({**TOOL_CALL, "rawinput": {}}),  # misspelt
        _update(
            {
                "sessionUpdate": "agent_message_chunk",
                "content": {"type": "text", "text": "x", "bold": True},
            }
        ),  # in a content block
        _update(
            {
                "sessionUpdate": "plan",
                "entries": [
                    {"content": "a", "priority": "high", "status": "pending", "done": False}
                ],
            }
        ),  # in a plan entry
        _update({**TOOL_CALL, "status": "cancelled"}),  # not one of the enum's values
        {"jsonrpc": "2.0", "id": 1, "error": {"code": "-32602", "message": "x"}},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "x", "why": 1}},
        {"jsonrpc": "2.0", "id": 1.5, "error": {"code": -32602, "message": "x"}},
        {"jsonrpc": "2.0", "method": "session/update", "params": {}, "extra": 1},
    ],
)
def test_what_a_strict_client_refuses_is_refused(msg: dict[str, Any]) -> None:
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        SchemaChecker().agent_sent(msg)


def test_a_response_of_the_wrong_shape_for_its_method_is_refused() -> None:
    checker = SchemaChecker()
    checker.client_sent({"jsonrpc": "2.0", "id": 7, "method": "session/list"})
    with pytest.raises(jsonschema.ValidationError):
        checker.agent_sent(
            {"jsonrpc": "2.0", "id": 7, "result": {"sessions": [{"sessionId": "s",
             "cwd": "/p", "messageCount": 3}]}}
        )  # fmt: skip


def test_not_strict_reads_the_schema_as_written() -> None:
    SchemaChecker(strict=False).agent_sent(_update(TOOL_CALL, extra=1))


def _ask(tool_call: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "session/request_permission",
        "params": {
            "sessionId": "s",
            "toolCall": tool_call,
            "options": [{"optionId": "a", "name": "Allow", "kind": "allow_once"}],
        },
    }


def test_a_base_type_used_as_it_is_is_closed_too() -> None:
    """A definition that others extend through ``allOf`` (``ToolCallUpdate``: the
    ``tool_call_update`` update) was left open wherever it is used as it is: a misspelt
    field in ``session/request_permission``'s ``toolCall`` passed. Only the objects that
    extend it see it open now."""
    SchemaChecker().agent_sent(_ask({"toolCallId": "call_1_1", "status": "pending"}))
    with pytest.raises(jsonschema.ValidationError):
        SchemaChecker().agent_sent(_ask({"toolCallId": "call_1_1", "rawinput": {}}))
    SchemaChecker().agent_sent(
        _update({"sessionUpdate": "tool_call_update", "toolCallId": "c", "status": "failed"})
    )
    with pytest.raises(jsonschema.ValidationError):
        SchemaChecker().agent_sent(
            _update({"sessionUpdate": "tool_call_update", "toolCallId": "c", "rawinput": {}})
        )
