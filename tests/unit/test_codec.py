"""The sans-I/O JSON-RPC codec: :func:`parse` and :func:`serialize`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from punie_trio.rpc import (
    ANSWER_START,
    BATCH_IDS,
    INVALID_REQUEST,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ID_CHARS,
    PARSE_ERROR,
    ErrorResponse,
    MalformedMessage,
    Notification,
    Request,
    Response,
    RpcError,
    error_response,
    parse,
    serialize,
    serialize_aside,
)

# -- well-formed messages ---------------------------------------------------------------------


@pytest.mark.parametrize("msg_id", [0, 7, -3, "abc", ""])
def test_request_with_int_and_string_ids(msg_id: Any) -> None:
    text = json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "m", "params": {"a": 1}})
    assert parse(text) == Request(msg_id, "m", {"a": 1})


def test_request_without_params_and_with_array_params() -> None:
    assert parse('{"jsonrpc":"2.0","id":1,"method":"m"}') == Request(1, "m", None)
    assert parse('{"jsonrpc":"2.0","id":1,"method":"m","params":[1,2]}') == Request(1, "m", [1, 2])


def test_notification() -> None:
    assert parse('{"jsonrpc":"2.0","method":"n","params":{"x":"y"}}') == Notification(
        "n", {"x": "y"}
    )
    assert parse('{"jsonrpc":"2.0","method":"n"}') == Notification("n")


@pytest.mark.parametrize("msg_id", [3, "s-3"])
def test_response(msg_id: Any) -> None:
    text = json.dumps({"jsonrpc": "2.0", "id": msg_id, "result": {"ok": True}})
    assert parse(text) == Response(msg_id, {"ok": True})


def test_response_with_null_result() -> None:
    assert parse('{"jsonrpc":"2.0","id":1,"result":null}') == Response(1, None)


@pytest.mark.parametrize("msg_id", [3, "s-3", None])
def test_error_response(msg_id: Any) -> None:
    text = json.dumps(
        {"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32602, "message": "bad", "data": [1]}}
    )
    assert parse(text) == ErrorResponse(msg_id, -32602, "bad", [1])


def test_error_response_without_data() -> None:
    parsed = parse('{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"x"}}')
    assert parsed == ErrorResponse(1, -1, "x", None)


def test_parse_accepts_utf8_bytes() -> None:
    text = '{"jsonrpc":"2.0","method":"n","params":{"s":"é✓"}}'
    assert parse(text.encode()) == Notification("n", {"s": "é✓"})


# -- serialisation ----------------------------------------------------------------------------

MESSAGES = [
    Request(1, "session/prompt", {"sessionId": "s", "prompt": [{"type": "text", "text": "a\nb"}]}),
    Request("req-1", "m"),
    Request(2, "m", [1, "two\n", None]),
    Notification("session/update", {"update": {"text": "line1\nline2\r\n"}}),
    Notification("n"),
    Response(5, {"content": "x\n\ny"}),
    Response("r", None),
    Response(0, [1, 2]),
    ErrorResponse(9, -32602, "Invalid params: bad\nfield", {"why": "multi\nline"}),
    ErrorResponse(None, -32700, "Parse error"),
    ErrorResponse("e", -32603, "boom"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=repr)
def test_serialize_round_trips(msg: Any) -> None:
    text = serialize(msg)
    assert parse(text) == msg
    assert parse(text.encode()) == msg


@pytest.mark.parametrize("msg", MESSAGES, ids=repr)
def test_serialize_is_compact_and_single_line(msg: Any) -> None:
    text = serialize(msg)
    assert "\n" not in text and "\r" not in text
    # Compact: re-dumping with the compact separators gives the same text.
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    assert json.loads(text)["jsonrpc"] == "2.0"


def test_serialize_exact_shapes() -> None:
    assert serialize(Request(1, "m")) == '{"jsonrpc":"2.0","id":1,"method":"m"}'
    assert (
        serialize(Notification("n", {"a": 1})) == '{"jsonrpc":"2.0","method":"n","params":{"a":1}}'
    )
    assert serialize(Response(1, None)) == '{"jsonrpc":"2.0","id":1,"result":null}'
    assert (
        serialize(ErrorResponse(None, -32700, "Parse error"))
        == '{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
    )


@pytest.mark.parametrize(
    "msg", [Response(5, None), ErrorResponse(5, -32600, "in use", {"x": 1}), Response("5", {})]
)
def test_an_answer_spelled_aside_is_the_same_json_told_apart_by_its_start(
    msg: Response | ErrorResponse,
) -> None:
    """``serialize_aside`` (the answer to a request under an id in flight): the same
    message, and it does not begin as every other answer does (``ANSWER_START``)."""
    assert serialize(msg).startswith(ANSWER_START)
    aside = serialize_aside(msg)
    assert not aside.startswith(ANSWER_START)
    assert json.loads(aside) == json.loads(serialize(msg)) and parse(aside) == msg


def test_serialize_keeps_non_ascii_text() -> None:
    assert "é" in serialize(Notification("n", {"s": "é"}))


def test_error_response_helper() -> None:
    err = RpcError(-32002, "Session not found", {"id": "s"})
    assert error_response(4, err) == ErrorResponse(4, -32002, "Session not found", {"id": "s"})


# -- malformed input --------------------------------------------------------------------------


def _malformed(text: str | bytes) -> MalformedMessage:
    with pytest.raises(MalformedMessage) as info:
        parse(text)
    return info.value


@pytest.mark.parametrize("text", ["{", "not json", '{"jsonrpc":"2.0",}', "", "   "])
def test_invalid_json_is_parse_error_without_id(text: str) -> None:
    exc = _malformed(text)
    assert exc.error.code == PARSE_ERROR
    assert exc.id is None
    response = exc.response()
    assert response.code == PARSE_ERROR and response.id is None
    assert json.loads(serialize(response))["id"] is None


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b'{"jsonrpc":"2.0","method":"\xc3"}'])
def test_invalid_utf8_is_parse_error(raw: bytes) -> None:
    exc = _malformed(raw)
    assert exc.error.code == PARSE_ERROR
    assert exc.id is None


@pytest.mark.parametrize(
    ("text", "kind"),
    [("42", "a number"), ('"a string"', "a string"), ("null", "null"), ("true", "a boolean"),
     ("1.5", "a number")],
)  # fmt: skip
def test_non_object_is_invalid_request(text: str, kind: str) -> None:
    """Named as JSON names it: the message said "got NoneType", "got bool", "got float",
    Python's names, which a client (TypeScript, Rust) has never heard of."""
    exc = _malformed(text)
    assert exc.error.code == INVALID_REQUEST
    assert exc.id is None
    assert exc.error.message == f"Invalid request: expected a JSON object, got {kind}"


def test_batch_is_refused() -> None:
    exc = _malformed('[{"jsonrpc":"2.0","id":1,"method":"m"}]')
    assert exc.error.code == INVALID_REQUEST
    assert "Batch" in exc.error.message
    assert _malformed("[]").error.code == INVALID_REQUEST


def test_a_refused_batch_names_the_requests_and_answers_it_held() -> None:
    """So that each request can be refused under its id, and each answer fail the request
    of ours it answers (see the peer's test): refused as one, with a null id, they were
    waited for for good."""
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "m"},
        {"jsonrpc": "2.0", "method": "note"},
        {"jsonrpc": "2.0", "id": "r", "result": {}},
        {"jsonrpc": "2.0", "id": 2, "error": {"code": 1, "message": "no"}},
        {"jsonrpc": "2.0", "id": True, "method": "m"},
        {"jsonrpc": "2.0", "id": "x" * (MAX_ID_CHARS + 1), "method": "m"},
        42,
        {"jsonrpc": "2.0", "id": "s", "method": "m"},
    ]
    exc = _malformed(json.dumps(batch))
    assert exc.id is None
    assert exc.batch == (("request", 1), ("response", "r"), ("response", 2), ("request", "s"))
    assert _malformed("[]").batch == ()
    assert _malformed("{}").batch == ()


def test_a_refused_batch_names_at_most_batch_ids_requests_and_answers_and_counts_the_rest() -> None:
    """A batch of 16 MiB holds some 625,000 tiny requests: each named (and the parsed
    batch held by the exception's traceback while they were refused) took 178 MB for as
    long as the client took to read 93 MB of refusals (for good if it did not read)."""
    batch: list[Any] = [{"jsonrpc": "2.0", "id": "r", "result": {}}]
    batch += [{"jsonrpc": "2.0", "id": i, "method": "m"} for i in range(BATCH_IDS + 5)]
    batch += [{"jsonrpc": "2.0", "id": f"a{i}", "result": {}} for i in range(BATCH_IDS)]
    exc = _malformed(json.dumps(batch))
    requests = [i for kind, i in exc.batch if kind == "request"]
    answers = [i for kind, i in exc.batch if kind == "response"]
    assert requests == list(range(BATCH_IDS))
    assert answers == ["r", *(f"a{i}" for i in range(BATCH_IDS - 1))]
    assert exc.unnamed == 5  # (requests past the bound: refused as one, with a null id)
    assert _malformed(json.dumps(batch[:3])).unnamed == 0
    # The parsed batch is not held by the exception (its traceback, through parse's frame).
    tb = exc.__traceback__
    while tb is not None:
        assert not any(v is not exc and isinstance(v, list) for v in tb.tb_frame.f_locals.values())
        tb = tb.tb_next


@pytest.mark.parametrize(
    ("obj", "expected_id", "fragment"),
    [
        ({"id": 1, "method": "m"}, 1, "jsonrpc"),
        ({"jsonrpc": "1.0", "id": 2, "method": "m"}, 2, "jsonrpc"),
        ({"jsonrpc": 2.0, "id": "x", "method": "m"}, "x", "jsonrpc"),
        ({"jsonrpc": "2.0", "id": 3, "method": 5}, 3, "method"),
        ({"jsonrpc": "2.0", "id": "s", "method": None}, "s", "method"),
        ({"jsonrpc": "2.0", "id": 4, "method": "m", "params": "str"}, 4, "params"),
        ({"jsonrpc": "2.0", "id": 4, "method": "m", "params": 12}, 4, "params"),
        ({"jsonrpc": "2.0", "method": "n", "params": "str"}, None, "params"),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "m"}, None, "id"),
        ({"jsonrpc": "2.0", "id": True, "method": "m"}, None, "id"),
        ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "m"}, None, "id"),
        ({"jsonrpc": "2.0", "id": [1], "method": "m"}, None, "id"),
        ({"jsonrpc": "2.0", "id": None, "method": "m"}, None, "id"),
        ({"jsonrpc": "2.0", "id": 5}, 5, "method"),
        ({"jsonrpc": "2.0", "id": 6, "result": 1, "error": {"code": 1, "message": "x"}}, 6, ""),
        ({"jsonrpc": "2.0", "result": 1}, None, "id"),
        ({"jsonrpc": "2.0", "id": 1.0, "result": 1}, None, "id"),
        ({"jsonrpc": "2.0", "id": 7, "error": "bad"}, 7, "error"),
        ({"jsonrpc": "2.0", "id": 7, "error": {"code": "1", "message": "x"}}, 7, "error"),
        ({"jsonrpc": "2.0", "id": 7, "error": {"code": 1}}, 7, "error"),
        ({"jsonrpc": "2.0", "id": False, "error": {"code": 1, "message": "x"}}, None, "id"),
    ],
)
def test_wrong_shapes_are_invalid_requests(
    obj: dict[str, Any], expected_id: Any, fragment: str
) -> None:
    exc = _malformed(json.dumps(obj))
    assert exc.error.code == INVALID_REQUEST
    assert exc.id == expected_id
    assert fragment in exc.error.message
    response = exc.response()
    assert response == ErrorResponse(expected_id, INVALID_REQUEST, exc.error.message, None)
    # The answer itself is a valid message carrying the id when one could be read.
    assert parse(serialize(response)) == response


def test_invalid_request_id_survives_into_serialized_error() -> None:
    exc = _malformed('{"jsonrpc":"1.0","id":"abc","method":"m"}')
    wire = json.loads(serialize(exc.response()))
    assert wire["id"] == "abc"
    assert wire["error"]["code"] == INVALID_REQUEST


def test_bool_id_is_not_treated_as_int() -> None:
    # JSON true is a Python bool, an int subclass: it must not be read as id 1.
    exc = _malformed('{"jsonrpc":"2.0","id":true,"method":"m"}')
    assert exc.id is None


@pytest.mark.parametrize(
    "msg_id", ["x" * (MAX_ID_CHARS + 1), "\u00e9" * (MAX_ID_CHARS + 1), 2**63, -(2**63) - 1]
)
def test_a_request_id_past_its_bounds_is_invalid_with_a_null_id(msg_id: Any) -> None:
    """A request's id is a string of at most 1,024 characters or a 64-bit integer (the
    schema's ``int64``): it had no bound but the message's, so a 15 MB id was held for
    as long as its request ran and echoed in every answer to it. Past the bound it is
    -32600 naming the bound, answered with a null id (the id is not one to echo)."""
    exc = _malformed(json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "m"}))
    assert exc.error.code == INVALID_REQUEST and exc.id is None
    assert exc.error.message == (
        'Invalid request: "id" must be a string of at most 1024 characters, or a 64-bit integer'
    )


@pytest.mark.parametrize("msg_id", ["x" * MAX_ID_CHARS, 2**63 - 1, -(2**63)])
def test_a_request_id_at_its_bounds_is_taken(msg_id: Any) -> None:
    text = json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "m"})
    assert parse(text) == Request(msg_id, "m")


def test_valid_id_refuses_booleans_and_floats() -> None:
    # JSON true is a Python int; it must not pass for request id 1 (e.g. in $/cancel_request).
    from punie_trio.rpc._codec import valid_id

    assert valid_id(1) and valid_id("a")
    assert not valid_id(True) and not valid_id(1.0) and not valid_id(None)


@pytest.mark.parametrize("text", ["[NaN]", '{"id": 1e400}', "[" * 100_000, '{"a":' * 100_000])
def test_json_that_cannot_be_carried_is_a_parse_error(text: str) -> None:
    """NaN/Infinity, numbers beyond a double and nesting deeper than the parser can go are
    -32700 with id null (the last once escaped as RecursionError and closed the socket)."""
    with pytest.raises(MalformedMessage) as info:
        parse(text)
    assert info.value.error.code == PARSE_ERROR
    assert info.value.id is None


def test_a_long_error_message_is_cut_with_its_length() -> None:
    """Messages name the value they refuse; one a client sent a megabyte of is cut (the
    schema's ``Error.message`` is "a concise single sentence")."""
    exact = "m" * MAX_ERROR_MESSAGE_CHARS
    assert json.loads(serialize(ErrorResponse(1, -32602, exact)))["error"]["message"] == exact
    sent = json.loads(serialize(ErrorResponse(1, -32602, "Invalid params: " + "x" * 10_000)))
    message = sent["error"]["message"]
    assert len(message) == MAX_ERROR_MESSAGE_CHARS
    assert message.startswith("Invalid params: xxx")
    assert message.endswith("... (cut: the message had 10016 characters)")
