"""Sans-I/O JSON-RPC 2.0: parse one message text into an event, serialise events back.

No I/O and no Trio here (the h11 discipline): :func:`parse` turns one text (a WebSocket frame,
an NDJSON line) into exactly one of :class:`Request`, :class:`Notification`, :class:`Response`
or :class:`ErrorResponse`, or raises :class:`MalformedMessage` carrying the error the peer
should answer with. :func:`serialize` produces compact JSON with no embedded newline, so the
same text is a valid NDJSON line.

Error handling: batches are refused (-32600): ACP never sends them, and answering a batch
as one (an array) would break the one-message-per-frame rule of the WebSocket transport.
The refusal names what the batch held (:attr:`MalformedMessage.batch`), so that each of its
requests is refused under its id, as a message of its own.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeGuard

import attrs

from .. import _json
from ._errors import INVALID_REQUEST, PARSE_ERROR, RpcError, concise_message

RequestId = int | str
Params = dict[str, Any] | list[Any] | None


@attrs.frozen
class Request:
    id: RequestId
    method: str
    params: Params = None


@attrs.frozen
class Notification:
    method: str
    params: Params = None


@attrs.frozen
class Response:
    id: RequestId
    result: Any


@attrs.frozen
class ErrorResponse:
    """An error answer. ``id`` is None when the request's id could not be read."""

    id: RequestId | None
    code: int
    message: str
    data: Any = None


Message = Request | Notification | Response | ErrorResponse

#: Longest string id a request may carry, in characters; an integer id must fit in 64 bits
#: (the schema's ``RequestId`` is ``int64`` or a string). A UUID is 36: 1,024 leaves room
#: for any real client's ids.
MAX_ID_CHARS = 1024
#: What a request whose id is out of those bounds is told (-32600, with a null id).
ID_BOUNDS = f"a string of at most {MAX_ID_CHARS} characters, or a 64-bit integer"


def bounded_id(value: RequestId) -> bool:
    """Whether the id ``value`` (a :func:`valid_id`) is within :data:`MAX_ID_CHARS` or 64
    bits.

    Why: an id had no bound but the message's. It is held while its request runs (a
    prompt's for the whole turn, and through a reconnect's grace), and echoed in its answer
    and in refusals: a 15 MB id, or an integer of 4,000 digits no other JSON-RPC peer can
    even read, cost the server what the message size allows for as long as the request
    lived. One length (or range) test per request."""
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS
    return -(2**63) <= value < 2**63


class MalformedMessage(Exception):
    """The text is not a valid JSON-RPC 2.0 message.

    ``error`` is what to answer with; ``id`` is the request id when one could be read (so
    the answer can be correlated), else None. ``batch``: for a batch, what its elements
    were, in order, as ``("request", id)`` and ``("response", id)`` for each with a valid
    id, up to :data:`BATCH_IDS` of each (the peer refuses each request under its id, and
    fails each request of its own answered there); ``unnamed``: how many requests with a
    valid id it held past those (refused as one, with a null id).
    """

    def __init__(
        self,
        error: RpcError,
        id: RequestId | None = None,
        batch: tuple[tuple[str, RequestId], ...] = (),
        unnamed: int = 0,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.id = id
        self.batch = batch
        self.unnamed = unnamed

    def response(self) -> ErrorResponse:
        return ErrorResponse(self.id, self.error.code, self.error.message, self.error.data)


#: What a batch is told (each of its requests, under its id).
BATCH_REFUSED = (
    "Batch requests are not supported: send each message on its own (a line, or a frame)"
)

#: How many of a batch's requests are refused each under its id (and how many of its
#: answers fail the request of ours they answer): the default ``max_concurrent_requests``,
#: as many requests as a client may have in flight at once. The rest get one refusal.
BATCH_IDS = 256


def _in_batch(batch: list[Any]) -> MalformedMessage:
    """The refusal of ``batch``, naming the requests and answers in it that carry a valid
    id, up to :data:`BATCH_IDS` of each, and counting the requests past those (see
    :attr:`MalformedMessage.batch`).

    Why the bound: a batch of 16 MiB holds some 625,000 tiny requests. Each refused
    under its id, it got 93 MB of refusals (9.8 s of its reader's time), and its ids
    (with the parsed batch, which the refusal's traceback held through :func:`parse`'s
    frame) took 178 MB for as long as the client took to read them: for good, if it did
    not read. Bounded, a batch costs what any message of its size does."""
    found = []
    requests = responses = unnamed = 0
    for element in batch:
        if not isinstance(element, dict):
            continue
        element_id = element.get("id")
        if not (valid_id(element_id) and bounded_id(element_id)):
            continue
        if "method" in element:
            if requests == BATCH_IDS:
                unnamed += 1
                continue
            requests += 1
            found.append(("request", element_id))
        elif ("result" in element or "error" in element) and responses < BATCH_IDS:
            responses += 1
            found.append(("response", element_id))
    refused = f"{BATCH_REFUSED} ({unnamed} more requests in it refused here)"
    return MalformedMessage(
        RpcError(INVALID_REQUEST, refused if unnamed else BATCH_REFUSED),
        batch=tuple(found),
        unnamed=unnamed,
    )


def valid_id(value: Any) -> TypeGuard[RequestId]:
    # bool is an int subclass; JSON true/false is not a valid id.
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def parse(text: str | bytes) -> Message:
    """Parse one JSON-RPC message.

    Raises :class:`MalformedMessage` with -32700 for text that is not strict JSON (or not
    UTF-8, or nested too deeply: see :func:`punie_trio._json.loads`),
    and -32600 for JSON that is not a single well-formed JSON-RPC 2.0 object.
    """
    try:
        obj = _json.loads(text)
    except ValueError as exc:
        raise MalformedMessage(RpcError(PARSE_ERROR, f"Parse error: {exc}")) from None
    if isinstance(obj, list):
        refusal = _in_batch(obj)
        del obj  # (not held by the refusal's traceback, through this frame: see _in_batch)
        raise refusal
    if not isinstance(obj, dict):
        kind = _json.kind(obj)
        raise MalformedMessage(
            RpcError(INVALID_REQUEST, f"Invalid request: expected a JSON object, got {kind}")
        )
    raw_id = obj.get("id")
    msg_id: RequestId | None = raw_id if valid_id(raw_id) else None

    def invalid(why: str) -> MalformedMessage:
        return MalformedMessage(RpcError(INVALID_REQUEST, f"Invalid request: {why}"), msg_id)

    if obj.get("jsonrpc") != "2.0":
        raise invalid('"jsonrpc" must be "2.0"')
    if "id" in obj and raw_id is not None and msg_id is None:
        raise invalid('"id" must be a string or an integer')

    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str):
            raise invalid('"method" must be a string')
        params = obj.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise invalid('"params" must be an object or an array')
        if "id" not in obj:
            return Notification(method, params)
        if msg_id is None:
            raise invalid('"id" must be a string or an integer')
        if not bounded_id(msg_id):
            raise MalformedMessage(
                RpcError(INVALID_REQUEST, f'Invalid request: "id" must be {ID_BOUNDS}')
            )
        return Request(msg_id, method, params)

    if "result" in obj and "error" not in obj:
        if msg_id is None:
            raise invalid('a response needs a string or integer "id"')
        return Response(msg_id, obj["result"])
    if "error" in obj and "result" not in obj:
        err = obj["error"]
        if (
            not isinstance(err, dict)
            or not isinstance(err.get("code"), int)
            or not isinstance(err.get("message"), str)
        ):
            raise invalid('"error" must be an object with an integer "code" and a "message"')
        if raw_id is not None and msg_id is None:
            raise invalid('"id" must be a string or an integer')
        return ErrorResponse(msg_id, err["code"], err["message"], err.get("data"))
    raise invalid('expected "method", or exactly one of "result" and "error"')


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip_space(text: str, i: int) -> int:
    match = _WHITESPACE.match(text, i)
    return match.end() if match else i


def peek_envelope(head: bytes) -> tuple[str | None, RequestId | None]:
    """What the first bytes of a message too large to parse say of it: its kind
    (``"request"`` for ``method`` or ``params``, ``"response"`` for ``result`` or
    ``error``, None when the head names neither) and its ``id`` (None when the head does
    not hold a valid one), read from the top-level members that end within ``head``.

    Why: an oversized message is dropped unread, and a client's answer to one of our
    requests would leave that request waiting for a timeout that says the client did not
    answer; a request's refusal could not carry its id. Serialisers write ``id`` before
    ``result`` or ``params`` (the members in the order the message was built), so the head
    usually has it. A message that is not JSON is read so too, up to where it breaks
    (``Peer`` answers its -32700 under the id it names). Never raises: a head it cannot
    read gives ``(None, None)``.
    """
    head = _json.without_bom(head)  # (as the parser takes it)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # What comes before the first byte that is not UTF-8 (a character cut at the end
        # of the head, or a message whose bad byte made it unreadable: bad UTF-8 in a
        # file's text, after the id).
        text = head[: exc.start].decode("utf-8")
    kind: str | None = None
    found: Any = None
    i = _skip_space(text, 0)
    if not text.startswith("{", i):
        return None, None
    i += 1
    try:
        while text.startswith('"', i := _skip_space(text, i)):
            key, i = _DECODER.raw_decode(text, i)
            i = _skip_space(text, i)
            if not text.startswith(":", i):
                break
            if key in ("method", "params"):
                kind = kind or "request"
            elif key in ("result", "error"):
                kind = kind or "response"
            value, i = _DECODER.raw_decode(text, _skip_space(text, i + 1))
            if key == "id" and i < len(text):  # (a number at the very end may be cut)
                found = value
            if not text.startswith(",", i := _skip_space(text, i)):
                break
            i += 1
    except (ValueError, RecursionError):
        pass  # the member cut off by the end of the head (or not JSON): what came before
    # (An id past a request id's bounds is none: the refusal would echo up to a head of it.)
    return kind, found if valid_id(found) and bounded_id(found) else None


def _dumps(obj: dict[str, Any]) -> str:
    # ensure_ascii=False keeps text compact; json never emits a raw newline inside strings.
    return _json.dumps(obj)


def serialize(msg: Message) -> str:
    """Compact JSON text of ``msg``, without any newline."""
    if isinstance(msg, Request):
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": msg.id, "method": msg.method}
        if msg.params is not None:
            req["params"] = msg.params
        return _dumps(req)
    if isinstance(msg, Notification):
        note: dict[str, Any] = {"jsonrpc": "2.0", "method": msg.method}
        if msg.params is not None:
            note["params"] = msg.params
        return _dumps(note)
    if isinstance(msg, Response):
        return _dumps({"jsonrpc": "2.0", "id": msg.id, "result": msg.result})
    return _dumps({"jsonrpc": "2.0", "id": msg.id, "error": _error_member(msg)})


#: How :func:`serialize` spells the start of every answer (a result or an error).
ANSWER_START = '{"jsonrpc":"2.0","id":'


def serialize_aside(msg: Response | ErrorResponse) -> str:
    """:func:`serialize`, with the id last (the same JSON, not beginning with
    :data:`ANSWER_START`): for the answer to a request sent under an id the other side
    has in flight already (refused as in use; a ``$/cancel_request`` sent as a request,
    or a message too large, under that id).

    Why: such an answer is not the answer of the request in flight under its id, and a
    client can take one answer per id. Left unwritten by a drop, it was kept for the
    client's return like any answer (``hub._grace._keep_unsent``), and the client back
    awaiting the id got it (the -32600 refusal, say) for its prompt, whose real answer
    was then no longer awaited. Spelled apart, it is left out there at no cost to any
    other message (as a replay's updates are: ``acp.updates.REPLAY_START``)."""
    if isinstance(msg, Response):
        return _dumps({"jsonrpc": "2.0", "result": msg.result, "id": msg.id})
    return _dumps({"jsonrpc": "2.0", "error": _error_member(msg), "id": msg.id})


def _error_member(msg: ErrorResponse) -> dict[str, Any]:
    # (Cut, if a refused value it names made it long: _errors.concise_message.)
    error: dict[str, Any] = {"code": msg.code, "message": concise_message(msg.message)}
    if msg.data is not None:
        error["data"] = msg.data
    return error


def error_response(id: RequestId | None, error: RpcError) -> ErrorResponse:
    return ErrorResponse(id, error.code, error.message, error.data)
